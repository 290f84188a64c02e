"""
Benchmarks. On a GPU the shapes are Qwen3-1.7B's with random bf16 weights; on a CPU, a scaled-down shape.

    python bench.py gpu         # the one call a lent GPU makes: ceilings, sampler, kernels, training, CUDA tests
    python bench.py sampler     # new tokens/s and GB/s of the KV-cache sampler, against transformers' generate
    python bench.py kernels     # peak memory and time of the chunked loss kernels against full-logits versions
    python bench.py train       # one PBSD step: rollout tokens/s, trained tokens/s, MFU, generation vs training
    python bench.py memory      # one rank's memory at the defaults, computed from the 1.7B and 8B shapes
    python bench.py toy         # the toy protocol: every objective, a learning-rate sweep, three seeds, each world

Results print as tables; `toy` also writes out/bench_toy/results.json and its plots (a world each, and the sweep).
"""

import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback

import torch

import loss_kernels
import model as qwen3

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
CPU_SHAPE = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)
# the datasheets' memory bandwidth (TB/s) and dense bf16 rate (TFLOP/s) of the GPUs this project is lent (SXM)
DATASHEETS = {"NVIDIA H100 80GB HBM3": (3.35, 989.0), "NVIDIA H200": (4.8, 989.0)}


def synchronize():
    if CUDA:
        torch.cuda.synchronize()


def timed(fn, repeats=3, warmup=True):
    """Best wall time of fn() over repeats, after one warm-up call."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def random_model(shape, dtype):
    torch.manual_seed(0)
    config = qwen3.Qwen3Config(**shape)
    with torch.device("meta"):
        model = qwen3.Qwen3(config).to(dtype)
    model = model.to_empty(device=DEVICE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.02)
    return model.requires_grad_(False).eval()


def fmt(value, spec, suffix=""):
    """A figure, or n/a where it was not measured (no GPU, no transformers)."""
    return "n/a" if value != value else f"{value:{spec}}{suffix}"


def print_table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for row in (header, ["-" * w for w in widths], *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
    sys.stdout.flush()  # a table survives a run cut off after it (the device's time limit)


SAMPLER_PROMPT, SAMPLER_NEW = (256, 2048) if CUDA else (64, 64)  # prompt and new tokens a row
SAMPLER_BATCHES = (1, 16, 64, 128) if CUDA else (1, 8)


def sampler_model():
    return random_model(QWEN3_1_7B if CUDA else CPU_SHAPE, torch.bfloat16 if CUDA else torch.float32)


def kv_bytes_per_token(model):
    """The keys and values a token keeps in the cache, over all layers."""
    config, dtype = model.config, model.embed_tokens.weight.dtype
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize


def sampler_speed(model, batches=SAMPLER_BATCHES, hf_batches=SAMPLER_BATCHES, hf_new_tokens=256):
    """
    New tokens/s of the sampler (the model as it is) at each batch, GB/s and the share of the roofline it reaches,
    and transformers' generate at hf_batches over the first hf_new_tokens. transformers spends ~0.1 s a step on a
    GPU host and a step costs it more as its cache grows, so timing its first tokens only flatters it: the
    speed-up is a lower bound. The first call's seconds, apart: it compiles the decode step (once a process for
    each kind of step) and records its CUDA graphs.
    """
    config, dtype = model.config, model.embed_tokens.weight.dtype
    prompt_len, new_tokens = SAMPLER_PROMPT, SAMPLER_NEW
    hf_new_tokens = min(new_tokens, hf_new_tokens)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tb_per_s = datasheet()[0]
    hf = None
    if set(batches) & set(hf_batches):  # transformers' copy of the weights only where it is timed
        try:
            import transformers
            shape = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
            hf_config = transformers.Qwen3Config(**{**shape, "max_position_embeddings": prompt_len + new_tokens})
            with torch.device(DEVICE):
                hf = transformers.Qwen3ForCausalLM(hf_config).to(dtype).eval()
            hf.load_state_dict(qwen3.hf_tensors(model), strict=False)  # tied: no lm_head.weight, HF ties it
        except ImportError:
            pass
    rows = []
    for batch in batches:
        prompts = torch.randint(0, config.vocab_size, (batch, prompt_len)).tolist()
        run = lambda: qwen3.generate(model, prompts, new_tokens, temperature=1.0, seed=0, compile=CUDA)
        first_call = timed(run, repeats=1, warmup=False)  # with the compilation and the graphs' recording
        seconds = timed(run, repeats=2 if batch <= 16 else 1, warmup=False)
        tokens_per_second = batch * new_tokens / seconds
        # the least a decode step must read: every weight once and the keys/values written so far (the prompt
        # and, on average, half the new tokens)
        bytes_per_step = weight_bytes + batch * (prompt_len + new_tokens / 2) * kv_bytes_per_token(model)
        gb_per_second = bytes_per_step * new_tokens / seconds / 1e9
        hf_tokens_per_second = float("nan")
        if hf is not None and batch in hf_batches:
            ids = torch.tensor(prompts, device=DEVICE)
            hf_run = lambda n: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                           min_new_tokens=n, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                           pad_token_id=0)
            hf_run(8)
            hf_tokens_per_second = batch * hf_new_tokens / timed(lambda: hf_run(hf_new_tokens), repeats=1,
                                                                 warmup=False)
        rows.append([batch, f"{tokens_per_second:,.0f}", f"{1e3 * seconds / new_tokens:.2f}", f"{gb_per_second:,.0f}",
                     fmt(100 * gb_per_second / (tb_per_s * 1e3), ".0f", "%"), fmt(hf_tokens_per_second, ",.0f"),
                     fmt(tokens_per_second / hf_tokens_per_second, ".1f", "x"), f"{first_call:,.1f}"])
        print(f"[bench sampler] batch {batch}: {tokens_per_second:,.0f} tok/s, {rows[-1][4]} of roofline, "
              f"transformers {rows[-1][5]} tok/s", file=sys.stderr, flush=True)
    del hf
    print_table(f"sampler: {'Qwen3-1.7B shape, bf16' if CUDA else 'CPU shape, fp32'} on {device_name()}, "
                f"{prompt_len} prompt + {new_tokens} new tokens (transformers: the first {hf_new_tokens}); "
                f"GB/s of the weights + written KV read per step, against {fmt(tb_per_s, '.2f', ' TB/s')} (datasheet)",
                ["batch", "new tok/s", "ms a step", "GB/s", "of roofline", "transformers tok/s", "speed-up",
                 "first call s"], rows)


def with_lora(model):
    """The model with LoRA r=64 on all seven projections, applied once."""
    if not qwen3.lora_modules(model):
        qwen3.apply_lora(model)
    return model


def bench_sampler():
    sampler_speed(sampler_model())


def naive_token_logprobs(hidden, weight, targets):
    logits = (hidden @ weight.T).float()  # (N, V): the tensor the kernels never hold
    return logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]


def naive_jsd(student_hidden, teacher_hidden, weight, beta=0.5):
    student_logp = (student_hidden @ weight.T).float().log_softmax(-1)
    teacher_logp = (teacher_hidden @ weight.T).float().log_softmax(-1)
    mixture = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log(1 - beta))
    return (beta * (teacher_logp.exp() * (teacher_logp - mixture)).sum(-1)
            + (1 - beta) * (student_logp.exp() * (student_logp - mixture)).sum(-1))


def bench_kernels():
    n, v, d = (16384, 151936, 2048) if CUDA else (2048, 16384, 256)
    dtype = torch.bfloat16 if CUDA else torch.float32
    loss_kernels.compile_kernels = CUDA
    torch.manual_seed(0)
    hidden = torch.randn(n, d, device=DEVICE, dtype=dtype, requires_grad=True)
    teacher_hidden = torch.randn(n, d, device=DEVICE, dtype=dtype)
    weight = torch.randn(v, d, device=DEVICE, dtype=dtype) * d ** -0.5
    targets = torch.randint(0, v, (n,), device=DEVICE)
    cases = {
        "log-probs, chunked": lambda: loss_kernels.token_logprobs(hidden, weight, targets).sum().backward(),
        "log-probs, naive": lambda: naive_token_logprobs(hidden, weight, targets).sum().backward(),
        "JSD, chunked": lambda: loss_kernels.gjs_divergence(hidden, teacher_hidden, weight).sum().backward(),
        "JSD, naive": lambda: naive_jsd(hidden, teacher_hidden, weight).sum().backward(),
    }
    matmuls = {"log-probs": 3, "JSD": 4}  # forward, recomputed forward, input gradient (JSD: two forwards)
    rows = []
    for name, run in cases.items():
        hidden.grad = None
        if CUDA:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base_memory = torch.cuda.memory_allocated() if CUDA else 0
        try:
            seconds = timed(run)
        except torch.OutOfMemoryError:
            rows.append([name, "out of memory", "", ""])
            continue
        peak = (torch.cuda.max_memory_allocated() - base_memory) / 2**30 if CUDA else float("nan")
        flops = matmuls[name.split(",")[0]] * 2 * n * d * v
        rows.append([name, f"{seconds * 1e3:,.1f}", fmt(peak, ",.2f"), f"{flops / seconds / 1e12:,.2f}"])
    print_table(f"kernels: forward + backward, N={n} V={v} D={d} {str(dtype)[6:]} on {device_name()}",
                ["kernel", "ms", "peak extra GiB", "TFLOP/s"], rows)


def pbsd_step():
    """
    A PBSD step on prompts of random tokens, as functions: generation(prompts_per_call) samples both roles of
    prompts_per_call prompts per sampler call and returns the new tokens; training(gradient_checkpointing) scores
    the rollouts with both roles micro_batch prompts at a time, as the loop does, backpropagates and steps.
    """
    import pbsd
    shape = QWEN3_1_7B if CUDA else CPU_SHAPE
    dtype = torch.bfloat16 if CUDA else torch.float32
    prompts_per_step, prompt_len, new_tokens = (16, 256, 1024) if CUDA else (4, 32, 32)
    micro_batch = 4 if CUDA else 1  # prompts: the loop's default, and its CPU stand-in
    loss_kernels.compile_kernels = CUDA
    model = random_model(shape, dtype)
    lora = qwen3.apply_lora(model)
    optimizer = torch.optim.AdamW(lora, lr=1e-5)
    student_prompts = torch.randint(0, shape["vocab_size"], (prompts_per_step, prompt_len)).tolist()
    teacher_prompts = torch.randint(0, shape["vocab_size"], (prompts_per_step, 2 * prompt_len)).tolist()
    student_responses, teacher_responses = [], []

    def generation(prompts_per_call=prompts_per_step):
        student_responses.clear()
        teacher_responses.clear()
        for first in range(0, prompts_per_step, prompts_per_call):
            part = slice(first, first + prompts_per_call)
            rollouts = qwen3.generate(model, student_prompts[part] + teacher_prompts[part], new_tokens, seed=0,
                                      compile=CUDA, adapters=[True] * prompts_per_call + [False] * prompts_per_call)
            student_responses.extend(r.tokens for r in rollouts[:prompts_per_call])
            teacher_responses.extend(r.tokens for r in rollouts[prompts_per_call:])
        return sum(map(len, student_responses + teacher_responses))

    def training(gradient_checkpointing=CUDA):
        model.gradient_checkpointing = gradient_checkpointing
        optimizer.zero_grad(set_to_none=True)  # what a run stopped by running out of memory left
        weight = model.lm_head_weight
        for first in range(0, prompts_per_step, micro_batch):
            part = slice(first, first + micro_batch)
            responses = student_responses[part] + teacher_responses[part]  # y- then y+ of each prompt
            hidden, targets, rows = pbsd.response_hidden(model, student_prompts[part] * 2, responses)
            student = loss_kernels.token_logprobs(hidden, weight, targets)
            with torch.no_grad(), qwen3.adapters_off(model):
                teacher_hidden, _, _ = pbsd.response_hidden(model, teacher_prompts[part] * 2, responses)
                teacher = loss_kernels.token_logprobs(teacher_hidden, weight, targets)
            sums = torch.zeros(len(responses), device=DEVICE).index_add_(0, rows, student)  # (R,) log pi_theta(y)
            teacher_sums = torch.zeros(len(responses), device=DEVICE).index_add_(0, rows, teacher)
            rewards = torch.zeros(micro_batch, device=DEVICE)
            loss, _, _ = loss_kernels.pbsd_loss(sums[micro_batch:], teacher_sums[micro_batch:], sums[:micro_batch],
                                           teacher_sums[:micro_batch], rewards, rewards, beta=0.1)
            (loss.sum() / prompts_per_step).backward()
        optimizer.step()

    generation()
    return dict(model=model, generation=generation, training=training, student_prompts=student_prompts,
                teacher_prompts=teacher_prompts, student_responses=student_responses,
                teacher_responses=teacher_responses, new_tokens=new_tokens, micro_batch=micro_batch)


def bench_train():
    """
    One PBSD step: the generation and the scoring/backward, timed apart; the training part with and without
    gradient checkpointing, whose recomputation is work the model FLOPs do not count. Returns the step (pbsd_step).
    """
    step = pbsd_step()
    model = step["model"]
    per_micro_batch = lambda: step["generation"](step["micro_batch"])
    new_per_micro_batch = per_micro_batch()  # also the warm-up: its call shape is new
    per_micro_batch_seconds = timed(per_micro_batch, repeats=1, warmup=False)
    # pbsd_step's own call was this shape's warm-up; timed last, as training() scores the one call's rollouts
    generation_seconds = timed(step["generation"], repeats=1, warmup=False)
    new = sum(map(len, step["student_responses"] + step["teacher_responses"]))
    student_tokens = 2 * sum(map(len, step["student_prompts"])) + new  # each prompt precedes y- and y+
    teacher_tokens = 2 * sum(map(len, step["teacher_prompts"])) + new
    body = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "layers." in name)
    head = model.lm_head_weight.numel()
    # model FLOPs, the matmuls with the frozen weights (attention and LoRA left out): the student's forward 2 and
    # backward to the activations 2 per weight and token (the frozen weights need no gradient), the teacher's
    # forward 2; the head only where a response token is predicted. Recomputation is not model work.
    model_flops = (4 * student_tokens + 2 * teacher_tokens) * body + 6 * new * head
    mfu = lambda s: model_flops / s / (datasheet()[1] * 1e12)
    seconds, peak = {}, {}

    def time_training(checkpointing):
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        try:
            seconds[checkpointing] = timed(lambda: step["training"](checkpointing), repeats=2)
            peak[checkpointing] = torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan")
        except torch.OutOfMemoryError:
            seconds[checkpointing] = peak[checkpointing] = float("nan")

    time_training(True)  # the loop's default
    training_seconds = seconds[True]
    rows = [["rollout tokens/s (the step in one call)", f"{new / generation_seconds:,.0f}"],
            [f"rollout tokens/s (a call per micro-batch of {step['micro_batch']})",
             f"{new_per_micro_batch / per_micro_batch_seconds:,.0f}"],
            ["trained tokens/s", f"{student_tokens / training_seconds:,.0f}"],
            [f"training MFU (of {fmt(datasheet()[1], ',.0f')} bf16 TFLOP/s, datasheet)",
             fmt(100 * mfu(training_seconds), ".1f", "%")],
            ["time in generation", f"{100 * generation_seconds / (generation_seconds + training_seconds):.0f}%"],
            ["step seconds (generation + training)", f"{generation_seconds + training_seconds:.2f}"]]
    print_table(f"train: one PBSD step, {len(step['student_prompts'])} prompts x (1 student + 1 teacher rollout), "
                f"{step['new_tokens']} new tokens, micro-batches of {step['micro_batch']} prompts, "
                f"{'Qwen3-1.7B shape' if CUDA else 'CPU shape'} on {device_name()}", ["measure", "value"], rows)
    time_training(False)
    print_table("train: the training part with and without gradient checkpointing (out of memory: n/a)",
                ["gradient checkpointing", "seconds", "trained tokens/s", "MFU", "peak GiB allocated"],
                [["on" if c else "off", fmt(seconds[c], ".2f"), fmt(student_tokens / seconds[c], ",.0f"),
                  fmt(100 * mfu(seconds[c]), ".1f", "%"), fmt(peak[c], ".1f")] for c in (True, False)])
    return step


def bench_memory(prompt_tokens=256, teacher_prompt_tokens=2048, ranks=8):
    """
    What one rank holds at its peak in a PBSD run at pbsd.Config's defaults on `ranks` GPUs, computed from the
    shapes (no GPU measured it): the weights, the LoRA with its gradient and AdamW's two moments, the rollouts' KV
    cache (kept between steps, where the sampler's CUDA graphs recorded it), the evaluation's (released when the
    evaluation ends), and a micro-batch's training activations with gradient checkpointing: each block's input,
    one block's intermediates recomputed in backward, and the loss kernel's chunk of fp32 logits.
    """
    import pbsd
    config, gib = pbsd.Config(), 2**30
    rows = []
    for name, shape in (("Qwen3-1.7B", QWEN3_1_7B), ("Qwen3-8B", QWEN3_8B)):
        with torch.device("meta"):
            model = qwen3.Qwen3(qwen3.Qwen3Config(**shape)).to(torch.bfloat16)
            lora = sum(p.numel() for p in qwen3.apply_lora(model, config.lora_rank, config.lora_alpha))  # fp32
        weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
        per_token = kv_bytes_per_token(model)
        slots = lambda prompt, new: qwen3.round_up(prompt + new, qwen3.WINDOW) + 1
        prompts = config.batch_size // ranks  # the rank's share, sampled in one call, both roles
        rollout_kv = prompts * (config.n_student + config.n_teacher) * slots(teacher_prompt_tokens,
                                                                          config.max_new_tokens) * per_token
        eval_kv = config.micro_batch_size * config.eval_k * slots(prompt_tokens, config.max_new_tokens) * per_token
        # a micro-batch scores its prompts' responses (y- and y+) after the student prompt, with gradient
        sequences = config.micro_batch_size * (config.n_student + config.n_teacher)
        tokens = sequences * (prompt_tokens + config.max_new_tokens)
        D, I, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_key_value_heads"] * shape["head_dim"]
        heads = shape["num_attention_heads"] * shape["head_dim"]
        block = (5 * D + 2 * heads + 2 * kv + 3 * I) * 2  # bytes a token's block keeps for backward, bf16
        chunk = 3 * 1024 * shape["vocab_size"] * 4  # the loss kernel's (1024, V) fp32 logits, probabilities, gradient
        activations = tokens * (shape["num_hidden_layers"] * D * 2 + block) + chunk
        training = rollout_kv + activations
        peak = weights + 16 * lora + max(training, eval_kv)
        rows.append([name, f"{weights / gib:.1f}", f"{16 * lora / gib:.1f}", f"{rollout_kv / gib:.1f}",
                     f"{eval_kv / gib:.1f}", f"{activations / gib:.1f}", f"{peak / gib:.1f}",
                     "training" if training > eval_kv else "evaluation"])
    print_table(f"memory: one rank of {ranks} at the defaults (batch {config.batch_size}, micro-batch "
                f"{config.micro_batch_size}, {config.max_new_tokens} new tokens, LoRA r {config.lora_rank}, "
                f"Avg@{config.eval_k}), student prompts of {prompt_tokens} tokens, teacher prompts of "
                f"{teacher_prompt_tokens}; GiB computed from the shapes",
                ["model", "weights", "LoRA + AdamW", "rollouts' KV", "evaluation's KV", "activations", "peak",
                 "peak while"], rows)


# A lent GPU has 15 minutes in all, its start-up and every call included: `bench.py gpu` is one call that fits
GPU_SECONDS = 540


def cuda_tests(seconds):
    """test_pbsd.py's tests of the compiled and CUDA-graph paths (-k cuda), printed inline, cut off after seconds."""
    tests = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_pbsd.py")
    command = [sys.executable, "-m", "pytest", tests, "-q", "-k", "cuda", "-p", "no:cacheprovider"]
    print(f"\ntests: {' '.join(command[1:])}", flush=True)
    try:
        exit_code = subprocess.run(command, timeout=seconds).returncode
    except subprocess.TimeoutExpired:
        print(f"tests: cut off after {seconds:.0f} s", flush=True)
        return
    if exit_code:
        raise RuntimeError(f"the CUDA tests failed (pytest exit code {exit_code})")


def bench_ceilings():
    """What this device moves and multiplies, measured, beside its datasheet: a copy and a square matmul."""
    n, dtype = (2**30, torch.bfloat16) if CUDA else (2**25, torch.float32)  # 2 GiB on a GPU, 128 MiB on a CPU
    source = torch.empty(n, device=DEVICE, dtype=dtype)
    copy_seconds = timed(lambda: torch.empty_like(source).copy_(source), repeats=5)
    del source
    side = 8192 if CUDA else 1024
    a, b = (torch.randn(side, side, device=DEVICE, dtype=dtype) for _ in range(2))
    matmul_seconds = timed(lambda: a @ b, repeats=5)
    tb_per_s, tflops = datasheet()
    print_table(f"ceilings of {device_name()}, measured (best of 5) and by datasheet",
                ["measure", "measured", "datasheet"],
                [[f"copy of {n * dtype.itemsize / 2**30:.2f} GiB, GB/s read + written",
                  f"{2 * n * dtype.itemsize / copy_seconds / 1e9:,.0f}", fmt(1e3 * tb_per_s, ",.0f")],
                 [f"{side}^3 matmul, {str(dtype)[6:]} TFLOP/s", f"{2 * side ** 3 / matmul_seconds / 1e12:,.1f}",
                  fmt(tflops, ",.0f")]])


def bench_gpu():
    """
    The one call a GPU session makes: the device's ceilings, the sampler at batch 1, the training step, the
    sampler at larger batches, the kernels, then the CUDA tests. A part starts only while GPU_SECONDS last; each
    prints its table as it ends, so a run cut off keeps what came before, and a part that fails prints its
    traceback and leaves the rest to run.
    """
    start = time.time()
    model = sampler_model()
    failed = []
    parts = [("ceilings", bench_ceilings),
             ("sampler, batch 1", lambda: sampler_speed(model, (1,), hf_batches=())),
             ("train", bench_train),
             ("sampler, larger batches", lambda: sampler_speed(model, (16, 64, 128) if CUDA else (8,),
                                                               hf_batches=(64,) if CUDA else (8,), hf_new_tokens=128)),
             ("kernels", bench_kernels),
             ("CUDA tests", lambda: cuda_tests(GPU_SECONDS - (time.time() - start) - 10))]
    for name, run in parts:
        left = GPU_SECONDS - (time.time() - start)
        if left < 30:
            print(f"[bench gpu] {name}: not run, {left:.0f} s of {GPU_SECONDS} left", file=sys.stderr, flush=True)
            continue
        print(f"[bench gpu] {name} ({left:.0f} s of {GPU_SECONDS} left)", file=sys.stderr, flush=True)
        try:
            run()
        except Exception:
            traceback.print_exc()
            failed.append(name)
    print(f"[bench gpu] done in {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    if failed:
        sys.exit(f"[bench gpu] failed: {', '.join(failed)}")


# The toy protocol: every objective from its world's one warm start, with the same budget, the same learning-rate
# sweep and the same seeds. Nothing is tuned outside it.
TOY_OBJECTIVES = [("PBSD, label reward", ["--loss=pbsd", "--pbsd_label=reward"]),
                  ("PBSD, label teacher (the paper's)", ["--loss=pbsd", "--pbsd_label=teacher"]),
                  ("OPSD (JSD, beta_jsd 0.5)", ["--loss=opsd"]),
                  ("GRPO (2 rollouts a prompt)", ["--loss=grpo", "--n_student=2"]),
                  ("SFT on the reference", ["--loss=sft"])]
TOY_LRS = (3e-4, 1e-3, 3e-3)  # a factor of 3 apart, the toy preset's rate among them
TOY_SEEDS = (0, 1, 2)  # the sweep runs seed 0; the best rate then runs the others
# where the reward-reweighted target lies above the teacher (candidates, and mistakes: the same question with the
# problem's own decoy), the objectives the claim compares also run a longer budget
TOY_LONG = dict(worlds=("candidates", "mistakes"), steps=1000, objectives=TOY_OBJECTIVES[:3])


def bench_toy_protocol(out_dir="out/bench_toy"):
    """python bench.py toy: the whole protocol, every world (BENCHMARKS.md has what it gave)."""
    bench_toy(worlds=("worked", "candidates"), out_dir=out_dir)
    bench_toy(worlds=("mistakes",), out_dir=out_dir, objectives=TOY_OBJECTIVES[:3])


def toy_run(world, base, args, lr, seed, steps, out_dir):
    """A run's folder and command: the toy preset on the world's shared warm start, the objective's arguments last."""
    import pbsd
    name = "_".join(a.split("=")[1] for a in args if not a.startswith("--eval"))  # pbsd_reward, opsd, ...
    run_dir = os.path.join(out_dir, world, f"{name}_lr{lr:g}_seed{seed}_steps{steps}")
    command = [sys.executable, "pbsd.py", f"--out_dir={run_dir}", f"--model={base}",
               f"--data={os.path.join(base, 'train.jsonl')}", f"--eval_data={os.path.join(base, 'held_out.jsonl')}",
               *[f"--{k}={v}" for k, v in pbsd.TOY_WORLD.items() if k != "out_dir"], f"--toy_world={world}",
               f"--lr={lr}", f"--seed={seed}", f"--steps={steps}", f"--eval_every={max(50, steps // 10)}", *args]
    return run_dir, command


def toy_history(run_dir, steps):
    """A finished run's evaluations (None if it has not finished)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    history = [json.loads(line) for line in open(path) if '"eval_avg_at_k"' in line] if os.path.exists(path) else []
    return history if history and history[-1]["step"] == steps else None


def run_all(runs, workers):
    """Runs the (run_dir, command, steps) not yet finished, `workers` at a time, each on one thread."""
    waiting = [(run_dir, command) for run_dir, command, steps in runs if toy_history(run_dir, steps) is None]
    running, start, done = [], time.time(), 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while waiting or running:
        while waiting and len(running) < workers:
            run_dir, command = waiting.pop(0)
            shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts again
            os.makedirs(run_dir)
            running.append((run_dir, subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                                      stderr=open(os.path.join(run_dir, "stderr.log"), "w"), env=env)))
        time.sleep(2)
        for run_dir, process in [r for r in running if r[1].poll() is not None]:
            running.remove((run_dir, process))
            if process.returncode:
                sys.exit(f"[bench toy] {run_dir} failed; see its stderr.log")
            done += 1
            left = (time.time() - start) / done * (len(waiting) + len(running)) / 60
            print(f"[bench toy] {done} runs done, {len(waiting) + len(running)} to go, about {left:.0f} min left: "
                  f"{run_dir}", file=sys.stderr, flush=True)


def bench_toy(worlds=("worked", "candidates", "mistakes"), out_dir="out/bench_toy", workers=2,
              objectives=TOY_OBJECTIVES, lrs=TOY_LRS, seeds=TOY_SEEDS, steps=300, long=TOY_LONG, world_args=()):
    """
    The protocol in each world: the world measured before any objective runs (student and teacher Avg@4 and greedy
    accuracy, the reward-reweighted teacher's accuracy), then for every objective a learning-rate sweep on seed 0
    whose best final Avg@4 picks its rate, the other seeds at that rate, and where the target lies above the teacher,
    the longer budget at the same rates. A stopped protocol continues where it was. Adds its worlds to
    out_dir/results.json, and draws a plot per world (<world>.png) and the sweep's (sweep.png).
    """
    import pbsd
    path = os.path.join(out_dir, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    for world in worlds:
        config = pbsd.parse_args([f"--out_dir={out_dir}", f"--toy_world={world}", *world_args])
        pbsd.build_toy_world(config)
        trainer = pbsd.Trainer(config)
        trainer.evaluate()
        target, teacher_p = pbsd.toy_target_accuracy(trainer)
        measured = {**trainer.history[0], "target_accuracy": target, "teacher_p_right": teacher_p}
        sweep = {(name, lr): toy_run(world, config.model, args, lr, seeds[0], steps, out_dir)
                 for name, args in objectives for lr in lrs}
        run_all([(*sweep[key], steps) for key in sweep], workers)
        final = lambda run: toy_history(run[0], steps)[-1]["eval_avg_at_k"]
        chosen = {name: max(lrs, key=lambda lr: final(sweep[name, lr])) for name, _ in objectives}
        budgets = [steps] + [long["steps"]] * (world in long["worlds"])
        runs = {(name, budget, seed): toy_run(world, config.model, args, chosen[name], seed, budget, out_dir)
                for budget in budgets for name, args in objectives
                if budget == steps or name in dict(long["objectives"]) for seed in seeds}
        run_all([(*run, budget) for (_, budget, _), run in runs.items()], workers)
        results[world] = {"world": measured, "chosen_lr": chosen,
                          "sweep": {f"{name} lr {lr:g}": toy_history(run[0], steps)
                                    for (name, lr), run in sweep.items()},
                          "runs": {f"{name}, {budget} steps": [toy_history(runs[name, budget, seed][0], budget)
                                                               for seed in seeds]
                                   for name, budget in dict.fromkeys((name, budget) for name, budget, _ in runs)}}
        report_toy_world(world, results[world], lrs, out_dir)
        json.dump(results, open(path, "w"), indent=1)
    report_sweep(results, lrs, out_dir)


def spread(values):
    """The standard deviation over seeds; 0 for a single seed."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def report_toy_world(world, result, lrs, out_dir):
    """The world's measurement, its sweep and its runs at the chosen rates, as tables, and their curves as a plot."""
    m = result["world"]
    k = m["eval_k"]
    print(f"\n[{world}] before any objective: student Avg@{k} {m['eval_avg_at_k']:.3f}, greedy "
          f"{m['eval_greedy_accuracy']:.3f}; frozen teacher Avg@{k} {m['teacher_avg_at_k']:.3f}, greedy "
          f"{m['teacher_greedy_accuracy']:.3f}, p(right) {m['teacher_p_right']:.3f}; reward-reweighted teacher "
          f"{m['target_accuracy']:.3f}")
    names = list(result["chosen_lr"])
    print_table(f"{world}: the sweep, final held-out Avg@{k} on seed 0", ["objective", *[f"lr {lr:g}" for lr in lrs]],
                [[name, *[f"{result['sweep'][f'{name} lr {lr:g}'][-1]['eval_avg_at_k']:.3f}" for lr in lrs]]
                 for name in names])
    rows = []
    for label, runs in result["runs"].items():
        name = label.rsplit(",", 1)[0]
        last = lambda key: [run[-1][key] for run in runs]
        gains = [run[-1]["eval_avg_at_k"] - run[0]["eval_avg_at_k"] for run in runs]
        rows.append([label, f"{result['chosen_lr'][name]:g}", f"{statistics.mean(last('eval_avg_at_k')):.3f} ± "
                     f"{spread(last('eval_avg_at_k')):.3f}", f"{statistics.mean(gains):+.3f} ± {spread(gains):.3f}",
                     f"{statistics.mean(last('eval_greedy_accuracy')):.3f} ± "
                     f"{spread(last('eval_greedy_accuracy')):.3f}",
                     f"{statistics.mean(last('eval_mean_length')):.1f}"])
    print_table(f"{world}: at each objective's rate, mean ± std over {len(runs)} seeds",
                ["run", "lr", f"Avg@{k} after", "gain", "greedy after", "length after"], rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for i, (label, runs) in enumerate(result["runs"].items()):
        steps = [h["step"] for h in runs[0]]
        values = [[run[j]["eval_avg_at_k"] for run in runs] for j in range(len(steps))]
        mean, spreads = [statistics.mean(v) for v in values], [spread(v) for v in values]
        style = "o-" if steps[-1] <= 300 else "s--"
        ax.plot(steps, mean, style, color=f"C{names.index(label.rsplit(',', 1)[0])}", label=label, ms=3)
        ax.fill_between(steps, [a - s for a, s in zip(mean, spreads)], [a + s for a, s in zip(mean, spreads)],
                        color=f"C{names.index(label.rsplit(',', 1)[0])}", alpha=0.12)
    ax.axhline(m["teacher_avg_at_k"], color="gray", ls="--", label="frozen teacher (reads the reference)")
    ax.axhline(m["target_accuracy"], color="black", ls=":", label="reward-reweighted teacher pi* (beta 0.5)")
    ax.set(xlabel="step", ylabel=f"held-out student Avg@{k}", ylim=(0, 1), title=f"toy world '{world}': each objective "
           f"at its rate, mean ± std over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{world}.png"), dpi=110)
    plt.close(fig)


def report_sweep(results, lrs, out_dir):
    """Final Avg@k against the learning rate, an objective a line, a world a panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.8), squeeze=False)
    for ax, (world, result) in zip(axes[0], results.items()):
        for name in result["chosen_lr"]:
            ax.plot(lrs, [result["sweep"][f"{name} lr {lr:g}"][-1]["eval_avg_at_k"] for lr in lrs], "o-", label=name)
        ax.axhline(result["world"]["eval_avg_at_k"], color="gray", ls="--", label="student before")
        ax.set(xscale="log", xlabel="learning rate", ylabel=f"final Avg@{result['world']['eval_k']} (seed 0)",
               title=world, ylim=(0, 1))
        ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
        ax.minorticks_off()
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "sweep.png"), dpi=110)
    plt.close(fig)


def device_name():
    return torch.cuda.get_device_name() if CUDA else f"CPU ({torch.get_num_threads()} threads)"


def datasheet():
    """(TB/s, bf16 TFLOP/s) of this GPU by its datasheet; NaN on a CPU or a GPU DATASHEETS does not name."""
    return DATASHEETS.get(device_name(), (float("nan"), float("nan")))


if __name__ == "__main__":
    benches = {"gpu": bench_gpu, "sampler": bench_sampler, "kernels": bench_kernels, "train": bench_train,
               "memory": bench_memory, "toy": bench_toy_protocol}
    names = sys.argv[1:] or ["sampler", "kernels", "train"]
    unknown = [n for n in names if n not in benches]
    if unknown:
        sys.exit(f"error: unknown benchmark {unknown[0]!r}; choose from {', '.join(benches)}")
    for name in names:
        benches[name]()

"""
Qwen3 by hand (transformers' architecture exactly: the tests compare logits), its HF checkpoint loader, in-place
LoRA and a batched KV-cache sampler. The student is the model with its LoRA on, the teacher the same weights with
it off (`adapters_off`); the sampler draws both roles' rows in one batch (`generate(..., adapters=...)`).
"""

import functools
import itertools
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


class CheckpointError(ValueError):
    """A checkpoint folder, adapter or config that cannot be used; the message names the file."""


@dataclass
class Qwen3Config:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128  # not hidden_size // heads in general (0.6B: 1024 hidden, 16 heads, 128)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = True

    @classmethod
    def from_json(cls, path):
        """Reads an HF config.json, in the rope_theta layout and in transformers v5's rope_parameters."""
        try:
            raw = json.load(open(path))
        except (FileNotFoundError, json.JSONDecodeError) as e:
            missing = isinstance(e, FileNotFoundError)
            raise CheckpointError(f"{path}: " + ("no config.json in the checkpoint folder" if missing else
                                                 f"not valid JSON ({e})")) from None
        if raw.get("model_type") != "qwen3":
            raise CheckpointError(f"{path}: model_type is {raw.get('model_type')!r}, expected 'qwen3'")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise CheckpointError(f"{path}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported")
        raw["rope_theta"] = rope.get("rope_theta", raw.get("rope_theta"))
        for key in ("attention_bias", "use_sliding_window"):
            if raw.get(key):
                raise CheckpointError(f"{path}: {key}=true is not part of the Qwen3 this project implements")
        known = {f.name for f in fields(cls)}
        missing = known - {"head_dim", "tie_word_embeddings", "rope_theta", "max_position_embeddings",
                           "rms_norm_eps"} - raw.keys()
        if missing:
            raise CheckpointError(f"{path}: missing config fields {sorted(missing)}")
        config = cls(**{k: v for k, v in raw.items() if k in known and v is not None})
        if raw.get("head_dim") is None:
            config.head_dim = config.hidden_size // config.num_attention_heads
        return config

    def to_hf_dict(self):
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
                "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False,
                "torch_dtype": "bfloat16", **{f.name: getattr(self, f.name) for f in fields(self)}}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # the statistics in fp32 whatever the activation dtype, then the scale in the activation dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(position, head_dim, theta, dtype):
    """position (B, T) int -> cos, sin (B, 1, T, head_dim), computed in fp32 then cast."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position.device, dtype=torch.float) / head_dim))
    freqs = position[..., None].float() * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    # rotate-half: pairs dimension i with i + head_dim/2 (not interleaved pairs as in the RoPE paper)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Projection(nn.Linear):
    # the checkpoint's projections of one input stacked along the outputs (q, k, v; gate, up): one matmul for all
    def __init__(self, in_features, sizes, device=None):  # sizes: {HF name: output size}, in row order
        super().__init__(in_features, sum(sizes.values()), bias=False, device=device)
        starts = itertools.accumulate(sizes.values(), initial=0)
        # (HF name, the slice of output features that is its weight's rows)
        self.parts = [(name, slice(start, start + size)) for (name, size), start in zip(sizes.items(), starts)]


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                      config.head_dim)
        self.sizes = [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim]
        self.qkv_proj = Projection(config.hidden_size, dict(zip(("q_proj", "k_proj", "v_proj"), self.sizes)))
        self.o_proj = Projection(self.n_head * self.head_dim, {"o_proj": config.hidden_size})
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, position, cache=None, mask=None):
        """Training and scoring pass no cache; the sampler's prefill passes the cache that x's keys and values go to,
        and a decode step also the mask of the cache slots that its one token a row attends."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = self.q_norm(q.view(B, T, self.n_head, self.head_dim)).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_norm(k.view(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # the sampler: each token's keys and values go to the cache slot of its position
            k_cache, v_cache = cache  # (B, Hkv, S, hd) each
            rows = torch.arange(B, device=x.device)[:, None]  # (B, 1), against position (B, T)
            k_cache[rows, :, position] = k.transpose(1, 2)  # an indexed write, which compiles in place
            v_cache[rows, :, position] = v.transpose(1, 2)
        if mask is not None:  # a decode step attends the first W cache slots; mask (B, 1, 1, W) hides the later ones
            # the H/Hkv query heads that share a KV head become its queries, so each slot is read once
            q = q.reshape(B, self.n_kv_head, self.n_head // self.n_kv_head, self.head_dim)  # (B, Hkv, H/Hkv, hd)
            y = F.scaled_dot_product_attention(q, k_cache[:, :, :mask.shape[-1]], v_cache[:, :, :mask.shape[-1]],
                                               attn_mask=mask)
            return self.o_proj(y.reshape(B, 1, self.n_head * self.head_dim))
        # causal, so a right-padded batch needs no mask: padding comes after every real token of its row
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_head != self.n_kv_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_up_proj = Projection(config.hidden_size, {"gate_proj": config.intermediate_size,
                                                            "up_proj": config.intermediate_size})
        self.down_proj = Projection(config.intermediate_size, {"down_proj": config.hidden_size})

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, position, cache=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, position, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3(nn.Module):
    """Module names follow the HF checkpoint keys (minus the leading 'model.'), but for the stacked projections."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                          bias=False)
        self.gradient_checkpointing = False  # recompute each block in backward: activations of one block, not all

    @property
    def lm_head_weight(self):  # (V, D): the embedding when tied
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden):
        return hidden @ self.lm_head_weight.T  # (..., V)

    def forward(self, input_ids, position=None, caches=None, mask=None):
        """input_ids (B, T) -> final-norm hidden states (B, T, D), causal; rows may be right-padded. The sampler
        passes each token's position (B, T), one (k, v) cache per layer and, decoding, the slots' mask."""
        B, T = input_ids.shape
        position = torch.arange(T, device=input_ids.device).expand(B, T) if position is None else position
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, position, use_reentrant=False)
            else:
                x = layer(x, cos, sin, position, None if caches is None else caches[i], mask)
        return self.norm(x)


# Loading and saving HF checkpoint folders.


def hf_key(name):
    return name if name.startswith("lm_head.") else "model." + name


def hf_tensors(model):
    """HF checkpoint key -> the tensor of ours that holds it: a parameter, or a part of a stacked projection."""
    tensors = {}
    for name, p in model.named_parameters():
        if "lora_" in name:  # an adapter, which save_lora writes in PEFT's layout
            continue
        owner_name = name.rsplit(".", 1)[0]
        parts = getattr(model.get_submodule(owner_name), "parts", None)
        if parts:  # a stacked projection: each part's outputs under its own HF name
            parent = owner_name.rsplit(".", 1)[0]
            tensors.update({hf_key(f"{parent}.{part}.weight"): p[outputs] for part, outputs in parts})
        else:
            tensors[hf_key(name)] = p
    return tensors


def safetensors_files(path):
    index_path, single = (os.path.join(path, name) for name in ("model.safetensors.index.json", "model.safetensors"))
    if not os.path.exists(index_path):
        if not os.path.exists(single):
            raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
        return [single]
    try:
        shards = sorted(set(json.load(open(index_path))["weight_map"].values()))
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index_path}: not a safetensors index ({e!r})") from None
    absent = [shard for shard in shards if not os.path.exists(os.path.join(path, shard))]
    if absent:
        raise CheckpointError(f"{index_path}: names shard {absent[0]!r}, which is not in {path}")
    return [os.path.join(path, s) for s in shards]


@torch.no_grad()
def load_qwen3(path, device="cpu", dtype=torch.bfloat16):
    """Builds Qwen3 from an HF checkpoint folder, streaming one tensor at a time into preallocated weights."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint folder does not exist")
    config = Qwen3Config.from_json(os.path.join(path, "config.json"))
    with torch.device("meta"):
        model = Qwen3(config).to(dtype)
    model = model.to_empty(device=device)  # allocates one copy of the weights, in dtype, uninitialised
    expected = hf_tensors(model)
    seen = set()
    for file in safetensors_files(path):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key == "lm_head.weight" and config.tie_word_embeddings:
                        continue  # some tied checkpoints carry a copy of the embedding; ours is the embedding
                    if key not in expected:
                        raise CheckpointError(f"{file}: unexpected tensor {key!r}")
                    tensor = f.get_tensor(key)
                    if tensor.shape != expected[key].shape:
                        raise CheckpointError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                              f"config.json implies {tuple(expected[key].shape)}")
                    expected[key].copy_(tensor)
                    seen.add(key)
        except SafetensorError as e:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    missing = sorted(expected.keys() - seen)
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return model.requires_grad_(False).eval()


def save_qwen3(model, path):
    """Writes an HF checkpoint folder (config.json + model.safetensors) that transformers loads. An adapter is saved
    folded into its base weight, W + (alpha / r) B A; the model itself keeps its LoRA."""
    os.makedirs(path, exist_ok=True)
    tensors = {key: t.detach().to("cpu", copy=True) for key, t in hf_tensors(model).items()}
    for name, m in lora_modules(model):
        for (part, _), lora_A, lora_B in zip(m.adapted, m.lora_A.split(m.rank), m.lora_B):
            key = hf_key(f"{name.rsplit('.', 1)[0]}.{part}.weight")
            tensors[key] = (tensors[key].float() + m.scaling * (lora_B @ lora_A).detach().cpu()).to(m.weight.dtype)
    atomic_write(os.path.join(path, "model.safetensors"), lambda tmp: save_file(tensors, tmp,
                                                                               metadata={"format": "pt"}))
    atomic_write(os.path.join(path, "config.json"),
                 lambda tmp: json.dump(model.config.to_hf_dict(), open(tmp, "w"), indent=2))


def atomic_write(path, write):
    """write(tmp_path) then rename: a crash leaves the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


# LoRA: W x + (alpha / r) B A x, with B = 0 at the start so the model is unchanged.

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen Projection with an adapter on each targeted part, as PEFT has one on each HF projection: the
    parts' A stacked (x A^T is one matmul), their B laid out block-diagonally (one matmul more)."""

    def __init__(self, base, targets, rank, alpha):
        super().__init__()
        self.parts = base.parts
        self.adapted = [(name, outputs) for name, outputs in base.parts if name in targets]
        self.rank, self.scaling, self.enabled = rank, alpha / rank, True
        self.adapter_rows = None  # (B, 1, 1): 1 on the rows that use the adapter, 0 on the rest; None: every row
        self.weight = base.weight  # (out, D), frozen
        # fp32 adapters on bf16 weights: AdamW updates of a small B would round away if stored in bf16
        self.lora_A = nn.Parameter(torch.empty(len(self.adapted) * rank, base.in_features,
                                               device=base.weight.device))  # (P r, D)
        self.lora_B = nn.ParameterList(torch.zeros(outputs.stop - outputs.start, rank, device=base.weight.device)
                                       for _, outputs in self.adapted)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init of each A: fan-in D all the same

    def forward(self, x):
        y = F.linear(x, self.weight)  # (B, T, out)
        if not self.enabled:
            return y
        # scaling * B, block-diagonal (out, P r): part p's B in p's outputs and p's r columns, zero elsewhere
        up = torch.zeros(self.weight.shape[0], self.lora_A.shape[0], dtype=x.dtype, device=x.device)
        for i, ((_, outputs), lora_B) in enumerate(zip(self.adapted, self.lora_B)):
            up[outputs, i * self.rank:(i + 1) * self.rank] = self.scaling * lora_B
        # in the activation dtype, as autocast would: fp32 matmuls run at a fraction of the bf16 rate
        down = F.linear(x, self.lora_A.to(x.dtype))  # (B, T, P r)
        if self.adapter_rows is not None:
            down = down * self.adapter_rows  # 0 on a teacher's row, whose output is then the base projection's
        return y + down @ up.T  # (B, T, out)


def lora_modules(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply_lora(model, rank=64, alpha=128, targets=LORA_TARGETS):
    """Swaps the targeted linears for LoRALinear in place; freezes everything else; returns the LoRA parameters."""
    unknown = set(targets) - set(LORA_TARGETS)
    if unknown:
        raise ValueError(f"LoRA targets {sorted(unknown)} are not projections of Qwen3 (those are {LORA_TARGETS})")
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child_name, child in module.named_children():
            if isinstance(child, Projection) and any(part in targets for part, _ in child.parts):
                setattr(module, child_name, LoRALinear(child, targets, rank, alpha))
    model.lora_config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(set(targets))}
    return [p for _, m in lora_modules(model) for p in (m.lora_A, *m.lora_B)]


@contextmanager
def lora_setting(model, name, value):
    """Sets attribute `name` of every LoRALinear to value for the duration, then back to what it was."""
    modules = [m for _, m in lora_modules(model)]
    found = [getattr(m, name) for m in modules]
    for m in modules:
        setattr(m, name, value)
    try:
        yield model
    finally:
        for m, old in zip(modules, found):
            setattr(m, name, old)


def adapters_off(model):  # the teacher: the frozen base model, through the same weights
    return lora_setting(model, "enabled", False)


def peft_tensors(model):
    """PEFT adapter key -> the tensor of ours that holds it: a B, or a part's r rows of a stacked A."""
    tensors = {}
    for name, m in lora_modules(model):
        for (part, _), lora_A, lora_B in zip(m.adapted, m.lora_A.split(m.rank), m.lora_B):
            # PEFT wraps the HF model twice: base_model (LoraModel) . model (Qwen3ForCausalLM) . model (Qwen3Model)
            key = "base_model.model." + hf_key(f"{name.rsplit('.', 1)[0]}.{part}")
            tensors.update({f"{key}.lora_A.weight": lora_A, f"{key}.lora_B.weight": lora_B})
    return tensors


def save_lora(model, path, base_model_name_or_path=""):
    """Writes a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) atomically."""
    os.makedirs(path, exist_ok=True)
    tensors = {key: t.detach().to("cpu", copy=True) for key, t in peft_tensors(model).items()}
    adapter_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path":
                      base_model_name_or_path, **model.lora_config, "lora_dropout": 0.0, "bias": "none",
                      "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False, "use_dora": False,
                      "init_lora_weights": True, "modules_to_save": None}
    atomic_write(os.path.join(path, "adapter_model.safetensors"),
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(os.path.join(path, "adapter_config.json"),
                 lambda tmp: json.dump(adapter_config, open(tmp, "w"), indent=2))


@torch.no_grad()
def load_lora(model, path):
    """Reads a PEFT adapter into the model, applying LoRA first if the model has none."""
    config_path = os.path.join(path, "adapter_config.json")
    try:
        adapter_config = json.load(open(config_path))
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: cannot read the adapter config ({e})") from None
    if not lora_modules(model):
        apply_lora(model, adapter_config["r"], adapter_config["lora_alpha"], adapter_config["target_modules"])
    weights_path = os.path.join(path, "adapter_model.safetensors")
    try:
        with safe_open(weights_path, framework="pt", device="cpu") as f:
            stored = set(f.keys())
            for key, tensor in peft_tensors(model).items():
                if key not in stored:
                    raise CheckpointError(f"{weights_path}: missing tensor {key!r}")
                tensor.copy_(f.get_tensor(key))
    except (SafetensorError, FileNotFoundError) as e:
        raise CheckpointError(f"{weights_path}: cannot read the adapter ({e})") from None
    return model


# The sampler: a prefill, a decode step, and the loop over it. The KV cache is preallocated, and a token's keys
# and values sit at the slot of its position, so each row is laid out as if it ran alone. A decode step attends
# the first W slots, W rounded up to WINDOW: it skips the cache's unwritten tail and has one of a few shapes.
WINDOW = 256


def round_up(n, multiple):
    return -(-n // multiple) * multiple


# Sampling noise is counter-based, so a row draws the same noise whatever shares its batch: the Exp(1) draw for
# token v at position t is splitmix64 output number t * V + v + 1 from the row's key. Torch's int64 arithmetic
# wraps around as splitmix64's unsigned one does; its >> is arithmetic, so shift_right masks the sign bits away.
GOLDEN = 0x9E3779B97F4A7C15 - 2**64  # the 64-bit constants as int64
MIX_1 = 0xBF58476D1CE4E5B9 - 2**64
MIX_2 = 0x94D049BB133111EB - 2**64


def shift_right(z, bits):  # a logical shift
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix64(z):
    """splitmix64's finaliser, on int64 tensors."""
    z = (z ^ shift_right(z, 30)) * MIX_1
    z = (z ^ shift_right(z, 27)) * MIX_2
    return z ^ shift_right(z, 31)


def sub_seed(seed, index):  # the key of seed's index-th child: splitmix64 output number index + 1 from seed
    return mix64(torch.tensor((seed + (index + 1) * GOLDEN + 2**63) % 2**64 - 2**63)).item()


def child_seeds(seed, count):  # what one seed gives the prompts (or problems) 0 .. count-1
    return [sub_seed(seed, index) for index in range(count)]


def exponential_noise(row_key, position, vocab_size):
    """row_key (B,) int64, position (B, 1) int64 -> (B, V) fp32 Exp(1) draws, the row's stream at t * V + v + 1."""
    counter = position * vocab_size + torch.arange(1, vocab_size + 1, device=row_key.device)  # (B, V)
    bits = mix64(row_key[:, None] + counter * GOLDEN)  # (B, V)
    uniform = (shift_right(bits, 11).double() + 0.5) * 2.0**-53  # the top 53 bits, in (0, 1)
    return (-uniform.log()).float()


def sample_token(logits, row_key, position, temperature, top_k, top_p):
    """logits (B, V) fp32 -> (B,) the token each row draws for its position (B, 1); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already cover top_p; the top token always stays
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)  # (B, V)
    # the exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) is a draw from p, with no host sync
    return (probs / exponential_noise(row_key, position, logits.shape[-1])).argmax(-1)


def decode_step(model, caches, token, position, row_key, window, temperature, top_k, top_p):
    """Feeds each row's last token (B, 1) at its position (B, 1), attending the first `window` cache slots;
    returns the next token (B,), drawn for position + 1."""
    mask = (torch.arange(window, device=position.device) <= position)[:, None, None, :]  # (B, 1, 1, W)
    hidden = model(token, position, caches, mask)  # (B, 1, D)
    logits = model.logits(hidden[:, -1]).float()  # (B, V)
    return sample_token(logits, row_key, position + 1, temperature, top_k, top_p)


@functools.cache
def compiled_decode_step(device_type):
    """decode_step compiled as gpt-fast does, on a GPU replayed as CUDA graphs ("reduce-overhead"); dynamic: one
    compilation for every window and batch (one row apart), and for each variant (adapters on/off/per row, greedy)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=True)


# (device, dtype) -> one flat buffer that every call's caches are views of: a CUDA graph replays on the addresses
# it recorded (a cache that moved makes it record again), so a call of a shape seen before finds its caches there
_kv_storage = {}


def release_kv_cache():
    """Frees the sampler's cache storage: after an evaluation, whose calls sample more rows than a training step's."""
    _kv_storage.clear()


def kv_caches(config, n_rows, n_slots, dtype, device):
    """One zeroed (k, v) pair per layer, each (n_rows, Hkv, n_slots, hd), marked as never moving for compile."""
    shape = (config.num_hidden_layers, 2, n_rows, config.num_key_value_heads, n_slots, config.head_dim)
    numel, storage = math.prod(shape), _kv_storage.pop((device, dtype), None)
    if storage is None or storage.numel() < numel:
        del storage  # freed before the larger one is allocated
        storage = torch.empty(numel, dtype=dtype, device=device)
    _kv_storage[(device, dtype)] = storage
    per_layer = storage[:numel].view(shape).zero_()  # a masked slot enters attention as 0 * value: 0 * NaN is NaN
    caches = [(layer[0], layer[1]) for layer in per_layer]
    for tensor in itertools.chain(*caches):
        torch._dynamo.mark_static_address(tensor, guard=False)
    return caches


class Rollout(NamedTuple):  # the new token ids, to the EOS that stopped the row (if one did: finished)
    tokens: list
    finished: bool


@torch.no_grad()
def generate(model, prompts, max_new_tokens, *, temperature=1.0, top_p=1.0, top_k=0, eos_ids=(), seed=None,
             num_samples=1, adapters=None, compile=False):
    """
    Samples continuations of each prompt (lists of token ids). num_samples: per prompt, one number or a list.
    adapters: None, or a bool per prompt: its rows with the LoRA on (student) or off (teacher), in one batch.
    seed: one per prompt (its samples then depend on it alone, not on the prompts beside it), or one number (prompt
    p gets its p-th child seed), or None (drawn from torch's generator). compile: use compiled_decode_step.
    Returns one Rollout per sample, the samples of a prompt next to each other, in prompt order.
    """
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    n_prompts = len(prompts)
    samples = [num_samples] * n_prompts if isinstance(num_samples, int) else list(num_samples)
    if len(samples) != n_prompts or min(samples) < 1:
        raise ValueError(f"generate: num_samples must be a positive count, or one per prompt; got {num_samples}")
    if adapters is not None and len(adapters) != n_prompts:
        raise ValueError(f"generate: adapters needs one bool per prompt ({n_prompts}), got {len(adapters)}")
    if min(len(p) for p in prompts) == 0:
        raise ValueError("generate: every prompt needs at least one token")
    seed = int(torch.randint(2**62, ())) if seed is None else seed
    prompt_seeds = child_seeds(seed, n_prompts) if isinstance(seed, int) else list(seed)
    if len(prompt_seeds) != n_prompts:
        raise ValueError(f"generate: seed must be one number, or one per prompt ({n_prompts}); got {len(prompt_seeds)}")
    # sample j of prompt p draws its noise from the j-th child of the prompt's seed
    row_key = torch.tensor([key for p in range(n_prompts) for key in child_seeds(prompt_seeds[p], samples[p])],
                           device=device)  # (B,)
    row_prompt = torch.repeat_interleave(torch.arange(n_prompts), torch.tensor(samples)).to(device)  # (B,)
    lengths, longest = torch.tensor([len(p) for p in prompts], device=device), max(len(p) for p in prompts)
    n_rows, n_slots = sum(samples), round_up(longest + max_new_tokens, WINDOW)
    # both roles in one batch, the LoRA on the student's rows only: a small batch's forward costs what reading the
    # weights costs, so two roles sampled together cost about one alone
    adapter_rows = None if adapters is None else torch.tensor(adapters, dtype=dtype, device=device)[:, None, None]

    # the prefill: each prompt once, right-padded, into the first rows; then copied to the rows of its samples
    input_ids = torch.zeros(n_prompts, longest, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, :len(prompt)] = torch.tensor(prompt)
    caches = kv_caches(model.config, n_rows, n_slots + 1, dtype, device)  # + 1: no window spans the whole cache
    position = torch.arange(longest, device=device).expand(n_prompts, longest)
    with lora_setting(model, "adapter_rows", adapter_rows):
        hidden = model(input_ids.to(device), position, [(k[:n_prompts], v[:n_prompts]) for k, v in caches])
    logits = model.logits(hidden[torch.arange(n_prompts, device=device), lengths - 1]).float()  # (prompts, V)
    for tensor in (t for cache in caches for t in cache):
        tensor.copy_(tensor[:n_prompts][row_prompt])  # the indexed right-hand side is a copy, so rows may overlap

    # the decode loop: the first token comes from the prefill's logits, each later one from a decode step
    position = lengths[row_prompt, None]  # (B, 1): the position of the token being sampled
    token = sample_token(logits[row_prompt], row_key, position, temperature, top_k, top_p)  # (B,)
    new_tokens = torch.full((n_rows, max_new_tokens), -1, dtype=torch.long, device=device)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    done = torch.zeros(n_rows, dtype=torch.bool, device=device)
    step = compiled_decode_step(device.type) if compile else decode_step
    with lora_setting(model, "adapter_rows", None if adapter_rows is None else adapter_rows[row_prompt]):
        for t in range(max_new_tokens):
            new_tokens[:, t] = token.masked_fill(done, -1)  # -1 after a row's EOS
            done |= torch.isin(token, eos)
            if t + 1 == max_new_tokens or (t % 32 == 31 and bool(done.all())):  # a host sync only every 32 steps
                break
            window = round_up(longest + t + 1, WINDOW)  # covers every slot written so far, at most n_slots
            # a clone: on a GPU the step's output lives in the CUDA graph's memory, which its next replay reuses
            token = step(model, caches, token[:, None], position, row_key, window, temperature, top_k, top_p).clone()
            position = position + 1

    rows = [row[:row.index(-1)] if -1 in row else row for row in new_tokens.tolist()]
    return [Rollout(tokens, bool(tokens) and tokens[-1] in eos_ids) for tokens in rows]

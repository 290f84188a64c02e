"""
Qwen3, written by hand: the model, its loader for HF checkpoint folders, in-place LoRA,
and a batched KV-cache sampler. One set of weights plays both roles of self-distillation:
the student is the model with its LoRA adapters on, the teacher is the same model with
them off (`adapters_off`), so the teacher never costs a second copy of the weights, and the sampler can
draw both roles' rollouts in one batch, switching the adapters per row (`adapters_on_rows`).

The architecture follows transformers' Qwen3 exactly (the tests compare logits):
pre-norm blocks, RMSNorm computed in fp32, per-head RMSNorm on q and k before
rotate-half RoPE, grouped-query attention, SwiGLU MLP, no biases.
"""

import functools
import itertools
import json
import math
import os
import weakref
from contextlib import ExitStack, contextmanager
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
            with open(path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no config.json in the checkpoint folder") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if raw.get("model_type") != "qwen3":
            raise CheckpointError(f"{path}: model_type is {raw.get('model_type')!r}, expected 'qwen3'")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise CheckpointError(f"{path}: rope type {rope_type!r} is not supported (only 'default')")
        if "rope_theta" in rope:
            raw["rope_theta"] = rope["rope_theta"]
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


def rope_cos_sin(positions, head_dim, theta, dtype):
    """positions (B, T) int -> cos, sin (B, 1, T, head_dim), computed in fp32 then cast."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim))
    freqs = positions[..., None].float() * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    # rotate-half: pairs dimension i with i + head_dim/2 (not interleaved pairs as in the RoPE paper)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def part_rows(parts):
    """[(name, size), ...] -> [(name, the slice of rows it holds), ...], stacked in order."""
    starts = [0, *itertools.accumulate(size for _, size in parts)]
    return [(name, slice(start, start + size)) for (name, size), start in zip(parts, starts)]


class Projection(nn.Linear):
    """
    A bias-free linear that holds one or more of the checkpoint's projections of the same input, stacked by rows
    (q, k, v; gate, up), so that they cost one matmul: at batch 1 a decode step is a chain of matrix-vector
    products whose speed is the memory bandwidth, and one big one streams closer to it than three small ones.
    parts: the HF names and output sizes, in row order; the loader and the adapters go by them.
    """

    def __init__(self, in_features, parts, device=None):
        super().__init__(in_features, sum(size for _, size in parts), bias=False, device=device)
        self.parts = parts


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                      config.head_dim)
        self.sizes = [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim]
        self.qkv_proj = Projection(config.hidden_size, list(zip(("q_proj", "k_proj", "v_proj"), self.sizes)))
        self.o_proj = Projection(self.n_head * self.head_dim, [("o_proj", config.hidden_size)])
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, position=None):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        q = self.q_norm(q.view(B, T, self.n_head, self.head_dim)).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_norm(k.view(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if position is not None:
            # a decode step: row b writes its keys and values at the slot of its own position (B, 1), and the rows
            # of each segment attend the segment's window, the first W cache slots (W = the width of its mask, which
            # hides the slots past a row's position). The H/Hkv query heads that share a KV head become that head's
            # queries, so each KV slot is read once: (B, H, 1, hd) -> (B, Hkv, H/Hkv, hd), head h = kv_head * H/Hkv
            # + g as in repeat_kv.
            k_cache, v_cache = cache  # (B, Hkv, S, hd) each, written in place
            # an indexed assignment, not scatter_: compiled, scatter_ copies the whole cache and back to write one
            # slot (Inductor writes index_put_ in place, not scatter_)
            rows, slot = torch.arange(B, device=x.device), position[:, 0]
            k_cache[rows, :, slot] = k[:, :, 0]  # (B, Hkv, hd) into row b's slot position[b]
            v_cache[rows, :, slot] = v[:, :, 0]
            grouped = q.reshape(B, self.n_kv_head, self.n_head // self.n_kv_head, self.head_dim)
            ys, start = [], 0
            for segment_mask in mask:  # (rows, 1, 1, W) each, the segments' rows in order
                rows, window = slice(start, start + segment_mask.shape[0]), segment_mask.shape[-1]
                ys.append(F.scaled_dot_product_attention(grouped[rows], k_cache[rows, :, :window],
                                                         v_cache[rows, :, :window], attn_mask=segment_mask))
                start = rows.stop
            return self.o_proj(torch.cat(ys).reshape(B, 1, self.n_head * self.head_dim))
        if cache is not None:  # a prefill writes its keys and values at the slots of their positions, 0 to T-1
            k_cache, v_cache = cache
            k_cache[:, :, :T] = k
            v_cache[:, :, :T] = v
        # causal, so a right-padded batch needs no mask: padding comes after every real token of its row
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_head != self.n_kv_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_up_proj = Projection(config.hidden_size, [("gate_proj", config.intermediate_size),
                                                            ("up_proj", config.intermediate_size)])
        self.down_proj = Projection(config.intermediate_size, [("down_proj", config.hidden_size)])

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

    def forward(self, x, cos, sin, mask, cache=None, position=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, position)
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
        self.run_block = run_block  # how the passes over whole sequences run a block; see compile_blocks

    @property
    def lm_head_weight(self):
        """(V, D): the output matrix, which is the embedding when tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden):
        return hidden @ self.lm_head_weight.T  # (..., V)

    def forward(self, input_ids, caches=None):
        """
        input_ids (B, T) -> final-norm hidden states (B, T, D), causal; rows may be right-padded. caches: the
        sampler's prefill, one (k, v) cache per layer, whose slots 0 to T-1 get the tokens' keys and values (the
        decode steps run the blocks themselves, see decode_step).
        """
        B, T = input_ids.shape
        position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            if caches is not None:
                x = layer(x, cos, sin, None, caches[i])
            else:
                x = self.run_block(layer, x, cos, sin, self.gradient_checkpointing and torch.is_grad_enabled())
        return self.norm(x)


def run_block(layer, x, cos, sin, recompute):
    """
    A block of the passes over whole sequences. recompute (gradient checkpointing): keep only the block's inputs for
    backward, and run its forward again there. compile_blocks compiles this function, the checkpoint with the block,
    so the forward graph writes the block's output alone and the recomputation is part of the backward graph. A
    checkpoint around the compiled block would run a forward graph that writes all that backward reads, to drop it
    (at Qwen3-1.7B with LoRA, 73 KB a token a block against the 4.6 KB of the inputs).
    """
    if recompute:
        return torch.utils.checkpoint.checkpoint(layer, x, cos, sin, None, use_reentrant=False)
    return layer(x, cos, sin, None)


def compile_blocks(model):
    """
    torch.compiles the blocks of the passes over whole sequences (scoring and training). Eager, a block's
    elementwise work (the fp32 RMSNorms, RoPE, SwiGLU, residuals; in forward, recomputation and backward) moves
    2.1 MB per token through memory at the Qwen3-1.7B shape with LoRA, against 330 MFLOP of matmuls (counted op
    by op): at an H100's datasheet rates, 0.63 us of memory traffic against 0.34 us of matmul. Compiled, it fuses
    into a few passes. One compilation serves every layer and sequence length; grad mode, checkpointing and the
    adapters' switch are a few variants more.
    """
    model.run_block = torch.compile(run_block, dynamic=True)
    return model


def hf_key(name):
    return name if name.startswith("lm_head.") else "model." + name


def hf_tensors(model):
    """HF checkpoint key -> the tensor of ours that holds it: a parameter, or rows of a stacked projection."""
    tensors = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        owner_name = name.rsplit(".", 1)[0]
        owner = model.get_submodule(owner_name)
        if isinstance(owner, (Projection, LoRALinear)):
            parent = owner_name.rsplit(".", 1)[0]
            for part, rows in part_rows(owner.parts):
                tensors[hf_key(f"{parent}.{part}.weight")] = p[rows]
        else:
            tensors[hf_key(name)] = p
    return tensors


def _safetensors_files(path):
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index_path}: not a safetensors index ({e!r})") from None
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not os.path.exists(os.path.join(path, shard)):
                raise CheckpointError(f"{index_path}: names shard {shard!r}, which is not in {path}")
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
    return [single]


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
    for file in _safetensors_files(path):
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
                    with torch.no_grad():
                        expected[key].copy_(tensor)
                    seen.add(key)
        except SafetensorError as e:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    missing = sorted(expected.keys() - seen)
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return model.requires_grad_(False).eval()


def save_qwen3(model, path):
    """Writes an HF checkpoint folder (config.json + model.safetensors) that transformers loads."""
    if lora_modules(model):
        raise ValueError("save_qwen3 writes base weights only: merge_lora(model) first, or save_lora the adapter")
    os.makedirs(path, exist_ok=True)
    tensors = {key: t.detach().to("cpu", copy=True) for key, t in hf_tensors(model).items()}
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
    """
    A frozen Projection with an adapter of its own on each targeted part (as PEFT puts one on each HF projection).
    The parts' A matrices read the same input, so they are stacked: x A^T is one matmul for all of them (in the
    sampler, the base projection's own, see weight_and_A); their B matrices are laid out block-diagonally, so the
    adapters' outputs are one more matmul, added to the base projection's output inside that matmul (eager) or in
    the kernel that reads it (compiled). At batch 1 a decode step is a chain of small launches, each a few
    microseconds, about what a projection's matrix-vector product takes: an adapter with launches per part would
    cost as much again.
    """

    def __init__(self, base, targets, rank, alpha):
        super().__init__()
        self.parts = base.parts
        self.adapted = [(name, rows) for name, rows in part_rows(base.parts) if name in targets]
        self.rank, self.scaling, self.enabled = rank, alpha / rank, True
        self.adapter_rows = None  # (B, 1, 1): 1 on the rows that use the adapter, 0 on the rest; None: every row
        (n_out, n_in), n_adapter, device = base.weight.shape, len(self.adapted) * rank, base.weight.device
        # the frozen base weight (out, D) and under its rows the sampler's copy of A in the weights' dtype (P r, D),
        # refreshed by each generate call (sampling_adapters): a decode step gets x W^T and x A^T from one matmul,
        # a launch fewer at each adapted projection, where the launches are most of a small batch's step
        self.register_buffer("weight_and_A", torch.empty(n_out + n_adapter, n_in, dtype=base.weight.dtype,
                                                         device=device), persistent=False)
        with torch.no_grad():
            self.weight_and_A[:n_out] = base.weight
        self.weight = nn.Parameter(self.weight_and_A[:n_out], requires_grad=False)
        self.out_and_adapter = [n_out, n_adapter]  # how x [W; A]^T splits
        # fp32 adapters on bf16 weights: AdamW updates of a small B would round away if stored in bf16
        self.lora_A = nn.Parameter(torch.empty(n_adapter, n_in, device=device))  # (P r, D)
        self.lora_B = nn.ParameterList(torch.zeros(rows.stop - rows.start, rank, device=device)
                                       for _, rows in self.adapted)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init of each A: fan-in D all the same
        self.sampling = False  # in a generate call: A from weight_and_A, scaling * B from sampling_B
        self.register_buffer("sampling_B", None, persistent=False)

    def _apply(self, fn, recurse=True):
        # .to() and its kin convert the parameter and the buffer apart, into two copies: the weight is made a view
        # of the buffer's rows again, so the model holds its base weights once
        super()._apply(fn, recurse)
        self.weight.data = self.weight_and_A[:self.out_and_adapter[0]]
        return self

    def adapter_weights(self, dtype):
        """
        A (P r, in) and scaling * B (out, P r) in dtype, differentiable: B block-diagonal, part p's B in p's rows
        and p's r columns, zero rows for the parts without an adapter.
        """
        up = torch.zeros(self.weight.shape[0], len(self.adapted) * self.rank, dtype=dtype, device=self.weight.device)
        for i, ((_, rows), lora_B) in enumerate(zip(self.adapted, self.lora_B)):
            up[rows, i * self.rank:(i + 1) * self.rank] = self.scaling * lora_B
        # in the activation dtype, as autocast would: fp32 matmuls run at a fraction of the bf16 rate
        return self.lora_A.to(dtype), up

    def forward(self, x):
        if not self.enabled:
            return F.linear(x, self.weight)  # (B, T, out)
        if self.sampling:  # [y, down] = x [W; A]^T, (B, T, out + P r)
            y, down = F.linear(x, self.weight_and_A).split(self.out_and_adapter, dim=-1)
            up = self.sampling_B
        else:
            A, up = self.adapter_weights(x.dtype)
            y, down = F.linear(x, self.weight), F.linear(x, A)  # (B, T, out), (B, T, P r)
        # y + adapter_rows * down up^T (B, T, out); adapter_rows (B, 1, 1), where set, is 0 on a teacher row, whose
        # output is then the base projection's, exactly. The zero blocks of up cost FLOPs, not launches: at r=64
        # they add 2.5% to a Qwen3-1.7B training pass's matmul FLOPs (1.2% to Qwen3-8B's)
        if torch.compiler.is_compiling():
            # compiled, the product is a matmul of its own and the add (and the rows' zero) fuse into the kernel
            # that reads y (a norm, RoPE, SwiGLU, the residual). Inductor would run addmm_ out of place, into a new
            # buffer, and aten first copies y into it: a launch and a read and write of y more. down as a matrix:
            # the sampler's is a slice of [y, down], and linear would run a batch of products, reading up once a row
            product = (down.flatten(0, -2) @ up.T).view(y.shape)
            return y + (product if self.adapter_rows is None else product * self.adapter_rows)
        if self.adapter_rows is not None:
            down = down * self.adapter_rows  # (B, T, P r): smaller than the input or the output
        y.flatten(0, -2).addmm_(down.flatten(0, -2), up.T)  # eager, in place inside the matmul (beta = 1)
        return y


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
def lora_setting(model, name, value, restored):
    """Sets attribute `name` of every LoRALinear to value for the duration, then to restored."""
    modules = [m for _, m in lora_modules(model)]
    for m in modules:
        setattr(m, name, value)
    try:
        yield model
    finally:
        for m in modules:
            setattr(m, name, restored)


def adapters_off(model):
    """The teacher: the frozen base model, through the same weights, with no copy."""
    return lora_setting(model, "enabled", False, True)


@contextmanager
def sampling_adapters(model):
    """
    For generate: every adapter's weights cast and laid out once for the call instead of once a decode step (for
    Qwen3-1.7B at r=64 the fp32 adapters are 279 MB a step to read and cast, 8% of the bf16 weights, and a few
    launches per projection). The copies stay allocated from call to call, so that a recorded CUDA graph finds them
    where it read them; each call refreshes them from the parameters the optimizer has updated since.
    """
    dtype = model.embed_tokens.weight.dtype
    with torch.no_grad():
        for _, m in lora_modules(model):
            A, up = m.adapter_weights(dtype)
            if m.sampling_B is None:
                m.sampling_B = torch.empty_like(up)
            m.weight_and_A[m.out_and_adapter[0]:].copy_(A)
            m.sampling_B.copy_(up)
    with lora_setting(model, "sampling", True, False):
        yield model


def adapters_on_rows(model, adapter_rows):
    """
    Both roles in one batch: adapter_rows (B, 1, 1) is 1 on the student's rows (adapters on) and 0 on the
    teacher's (off). At small batches a forward costs what reading the weights costs, so the two roles
    sampled together cost about one of them sampled alone.
    """
    return lora_setting(model, "adapter_rows", adapter_rows, None)


@torch.no_grad()
def merge_lora(model):
    """Folds W += (alpha / r) B A into the base weights and turns each LoRALinear back into a Projection."""
    for name, m in lora_modules(model):
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        weight = m.weight.float()
        for (_, rows), lora_A, lora_B in zip(m.adapted, m.lora_A.split(m.rank), m.lora_B):
            weight[rows] += m.scaling * (lora_B @ lora_A)
        projection = Projection(m.weight.shape[1], m.parts, device="meta")
        projection.weight = nn.Parameter(weight.to(m.weight.dtype), requires_grad=False)
        setattr(parent, name.rsplit(".", 1)[1], projection)
    return model


def peft_key(name, part):
    # PEFT wraps the HF model twice: base_model (LoraModel) . model (Qwen3ForCausalLM) . model (Qwen3Model)
    return f"base_model.model.{hf_key(name)}.{part}.weight"


def peft_tensors(model):
    """PEFT adapter key -> the tensor of ours that holds it: a B, or the rows of a stacked A."""
    tensors = {}
    for name, m in lora_modules(model):
        parent = name.rsplit(".", 1)[0]
        for (part, _), lora_A, lora_B in zip(m.adapted, m.lora_A.split(m.rank), m.lora_B):
            tensors[peft_key(f"{parent}.{part}", "lora_A")] = lora_A
            tensors[peft_key(f"{parent}.{part}", "lora_B")] = lora_B
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


def load_lora(model, path):
    """Reads a PEFT adapter into the model, applying LoRA first if the model has none."""
    config_path = os.path.join(path, "adapter_config.json")
    try:
        with open(config_path) as f:
            adapter_config = json.load(f)
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
                with torch.no_grad():
                    tensor.copy_(f.get_tensor(key))
    except (SafetensorError, FileNotFoundError) as e:
        raise CheckpointError(f"{weights_path}: cannot read the adapter ({e})") from None
    return model


# The sampler. The KV cache is preallocated for prompt + new tokens, and a token's keys and values sit at the slot
# of its position, so each row is laid out as if it ran alone and a prompt gives the same tokens in a batch as
# alone. Prompts are right-padded: the prefill is causal with no mask (padding comes after a row's real tokens, so
# attention runs its fused kernel, in memory linear in the prompt length) and every row then writes its own next
# slot. A decode step reads every weight and the cache slots it attends; to not read the unwritten tail of the
# cache, it attends a window of the first W slots, W rounded up to WINDOW, masking the slots past each row's
# position, so a step has one of a few shapes (each compiled graph and CUDA graph serves many steps).
#
# The loop's calls put short prompts before long ones: the student's, then the teacher's, which carry a reference
# solution. In one window sized for the teacher's prompts, a student row would read as many slots of padding from
# the cache at every step; at batch 64 with 2K-token windows the cache, not the weights, is most of what a step
# reads. So a call is cut into at most two segments of consecutive prompts, each padded to its own longest prompt
# and attending its own window. A second segment costs every layer a second attention launch, about 10 us on an
# H100 (the 753cb6d profile: 14 us a layer at batch 1), what reading one layer's keys and values costs at 8K slots
# (4 KB a slot at Qwen3's 8 KV heads of 128 in bf16, at 3.35 TB/s): hence the cut only where it saves that many
# row-slots.

WINDOW = 256
SEGMENT_MIN_SAVING = 8192

# Rows stop at different lengths (one after 300 tokens, another cut at 2K), and a finished row would still be fed,
# attend its window and read its slots at every step. So every 32 steps (when the sampler looks at which rows are
# done anyway) the rows still sampling move to the front of their segment, and the steps after run only those:
# each segment keeps a multiple of COMPACT_ROWS rows (finished rows fill the rounding), so a call sees few batch
# shapes, each recorded once as a CUDA graph. A row's noise follows its key, not its place: moving rows changes no
# token.
COMPACT_ROWS = 8

# Sampling noise is counter-based: the Exp(1) draw for token id v at step t of a row is splitmix64 output number
# t * V + v + 1 of the stream that the row's key seeds. A row draws the same noise whatever else shares its batch
# (a rollout depends on its key only, not on its company or the batch size), and the draw is computed inside the
# compiled decode step. Torch's int64 arithmetic wraps around, as splitmix64's unsigned arithmetic does; its >> is
# arithmetic, so the logical shifts mask the sign bits away.
GOLDEN = 0x9E3779B97F4A7C15 - 2**64  # the 64-bit constants as int64
MIX_1 = 0xBF58476D1CE4E5B9 - 2**64
MIX_2 = 0x94D049BB133111EB - 2**64


def shift_right(z, bits):
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix64(z):
    """splitmix64's finaliser, on int64 tensors."""
    z = (z ^ shift_right(z, 30)) * MIX_1
    z = (z ^ shift_right(z, 27)) * MIX_2
    return z ^ shift_right(z, 31)


def as_int64(n):
    return (n + 2**63) % 2**64 - 2**63


def sub_seed(seed, index):
    """Output number index + 1 of the splitmix64 stream seeded with seed: a key for the index-th child of seed."""
    return mix64(torch.tensor(as_int64(seed + (index + 1) * GOLDEN))).item()


def child_seeds(seed, count):
    """The keys of seed's first count children: what an int seed gives the prompts (or problems) 0..count-1."""
    return [sub_seed(seed, index) for index in range(count)]


def exponential_noise(row_key, step, vocab_size):
    """row_key (B,) int64, step (1,) int64 -> (B, V) fp32 Exp(1) draws, the row's stream at step * V + id + 1."""
    counter = step * vocab_size + torch.arange(1, vocab_size + 1, device=row_key.device)  # (V,)
    bits = mix64(row_key[:, None] + counter * GOLDEN)  # (B, V)
    uniform = (shift_right(bits, 11).double() + 0.5) * 2.0**-53  # the top 53 bits, in (0, 1)
    return (-uniform.log()).float()


def sample_token(logits, noise, temperature, top_k, top_p):
    """logits (B, V) fp32, noise (B, V) ~ Exp(1) (None when greedy) -> (B,) token ids; temperature 0 is greedy."""
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
    probs = logits.softmax(-1)
    # the exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) is a draw from p, with no host sync
    return (probs / noise).argmax(-1)


class DecodeState(NamedTuple):
    """
    Everything a decode step reads and writes besides the weights and the KV cache. With CUDA graphs it is
    allocated once per call shape and reused by every call of that shape: a graph replays on the addresses it
    recorded.
    """
    token: torch.Tensor  # (B, 1) the last sampled token, fed to the next step
    position: torch.Tensor  # (B, 1) its position, the tokens before it; also the cache slot its keys and values take
    column: torch.Tensor  # (1,) the column of new_tokens the next sampled token goes to
    row_key: torch.Tensor  # (B,) int64, each row's sampling noise key
    eos: torch.Tensor  # (E,) the ids that stop a row
    new_tokens: torch.Tensor  # (B, N) the sampled tokens, -1 after a row's EOS
    done: torch.Tensor  # (B,) whether a row has emitted an EOS
    adapter_rows: torch.Tensor  # (B, 1, 1) 1 on the rows sampled with the LoRA adapters on, 0 with them off


CALL_WIDE = ("column", "eos")  # the DecodeState fields that are not per row


def sample_and_record(state, logits, temperature, top_k, top_p):
    """
    logits (B, V) fp32 -> every row's next token, drawn with the row's own noise for this column, written into
    new_tokens (as -1 for finished rows) and fed to the next step.
    """
    noise = None if temperature == 0 else exponential_noise(state.row_key, state.column, logits.shape[-1])
    token = sample_token(logits, noise, temperature, top_k, top_p)  # (B,)
    state.new_tokens.index_copy_(1, state.column, token.masked_fill(state.done, -1)[:, None])
    state.done.logical_or_(torch.isin(token, state.eos))
    state.token.copy_(token[:, None])
    state.column.add_(1)


def step_inputs(model, state, windows):
    """
    A decode step's inputs: every row's last token embedded (B, 1, D), the RoPE angles of its position, and per
    segment (windows: its number of rows and how many cache slots they attend) the mask of the slots its rows
    attend, those up to each row's position: its prompt, then each token fed (rows, 1, 1, W).
    """
    masks, start = [], 0
    for rows, window in windows:
        slots = torch.arange(window, device=state.position.device)
        masks.append((slots <= state.position[start:start + rows])[:, None, None, :])
        start += rows
    x = model.embed_tokens(state.token)
    cos, sin = rope_cos_sin(state.position, model.config.head_dim, model.config.rope_theta, x.dtype)
    return x, torch.zeros_like(x), cos, sin, masks  # zeros: no block before the first has an MLP output to add


def cached_block(layer, x, mlp_out, cos, sin, masks, cache, position):
    """
    One block of a decode step, Block.forward but for its last residual add, which the next block makes: x plus the
    previous block's MLP output is summed in the kernel of this block's first norm, not in a kernel of its own at
    the end of the previous block (the blocks compile apart, so nothing fuses across them): one launch a layer
    fewer. Each row writes its keys and values at the slot of its position, then attends. A function of its own,
    not Block.__call__, so that its compilation and compile_blocks' are counted apart (Dynamo keeps its compiled
    variants per function, and stops compiling past a limit). Returns the block's x and MLP output, (B, 1, D) each.
    """
    x = x + mlp_out
    x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, masks, cache, position)
    return x, layer.mlp(layer.post_attention_layernorm(x))


def sample_next(model, x, mlp_out, state, temperature, top_k, top_p):
    logits = model.logits(model.norm(x + mlp_out)[:, -1]).float()  # (B, V); the last block's residual add
    sample_and_record(state, logits, temperature, top_k, top_p)
    state.position.add_(1)


EAGER_STEP = (step_inputs, cached_block, sample_next)


# The variants of the decode block a process can meet, each compiled once: the adapters on, off or per row, times
# one segment of 1 row or more, or two segments of 1 row or more each (Dynamo specializes a size of 1). Past its
# limit a function runs eager, 8 variants by default, which a run that evaluates both roles and trains can reach.
DECODE_BLOCK_VARIANTS = 3 * (2 + 4)


@functools.cache
def compiled_step(one_row=False):
    """
    EAGER_STEP compiled, each part once for every call, dynamic: one compilation serves every batch size, cache
    length and window. The blocks share theirs: compiled whole, a step is 28 to 36 copies of the same block to trace
    and lower, and took minutes to compile (on the CPU, a 28-layer step 194 s, against 32 s in parts), again for
    each variant.

    one_row: the step of a call that samples one row, where every projection and the output head is a
    matrix-vector product, compiled with coordinate descent tuning as gpt-fast decodes: under it Inductor writes a
    product of one row as a Triton reduction (its decomposition of mm) and tunes each kernel's block sizes. cuBLAS's
    matrix-vector kernels read the weights well below the memory bandwidth (the 753cb6d profile at batch 1: the
    products 1.6 ms of a 2.65 ms step, 7.5 us each for 4 to 25 MB). Tuning builds each kernel in several
    configurations, so the steps of more rows, matrix products that cuBLAS runs either way, compile without it.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, DECODE_BLOCK_VARIANTS)
    options = {"coordinate_descent_tuning": True} if one_row else None
    return tuple(torch.compile(part, fullgraph=True, dynamic=True, options=options) for part in EAGER_STEP)


def decode_step(model, caches, state, windows, temperature, top_k, top_p, parts=EAGER_STEP):
    """
    Feeds every row's last token, samples the next and records it, all in place: the step reads and writes only
    the caches and the state, so it can be recorded once as a CUDA graph and replayed. parts: the step's inputs,
    its blocks and its sampling, as functions (EAGER_STEP, or those compiled).
    """
    inputs, block, outputs = parts
    x, mlp_out, cos, sin, masks = inputs(model, state, windows)
    for layer, cache in zip(model.layers, caches):
        x, mlp_out = block(layer, x, mlp_out, cos, sin, masks, cache, state.position)
    outputs(model, x, mlp_out, state, temperature, top_k, top_p)


class Rollout(tuple):
    """(tokens, finished): the new token ids up to and including the EOS that stopped the row; whether it did."""
    __slots__ = ()

    def __new__(cls, tokens, finished):
        return super().__new__(cls, (tokens, finished))

    tokens = property(lambda self: self[0])
    finished = property(lambda self: self[1])


# (device, dtype, layers, KV heads, head dim) -> one flat buffer that every call's caches are views of
_kv_storage = {}
# (that key, rows) -> the slots each row of a call of that many rows is laid out with: the most such a call needed
_kv_row_slots = {}
# model -> {(weights, rows, new tokens, stop ids): (DecodeState, {step kind: CUDA graph})}; dropped with the model
_decoders = weakref.WeakKeyDictionary()


def kv_caches(config, n_rows, n_slots, dtype, device):
    """
    One (k, v) pair per layer, each (n_rows, Hkv, S, hd), carved from one buffer that outlives the call. S is the
    most slots a call of n_rows rows has needed so far, so every call of that many rows finds each layer's cache at
    the same address with the same strides, whatever its prompts' lengths (in a training run they change at every
    step), and the CUDA graphs recorded for n_rows rows still apply. The buffer holds the largest such layout, no
    more. When S grows, the graphs of n_rows rows read another layout and are dropped; when the buffer grows, every
    graph points at freed memory and all are dropped.
    """
    layers, kv_heads, head_dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    key = (device, dtype, layers, kv_heads, head_dim)
    if n_slots > _kv_row_slots.get((key, n_rows), 0):
        _kv_row_slots[(key, n_rows)] = n_slots
        for per_model in _decoders.values():
            for shape in [shape for shape in per_model if shape[1] == n_rows]:
                del per_model[shape]
    shape = (layers, 2, n_rows, kv_heads, _kv_row_slots[(key, n_rows)], head_dim)
    numel = math.prod(shape)
    storage = _kv_storage.pop(key, None)
    if storage is None or storage.numel() < numel:
        _decoders.clear()
        del storage  # freed before the larger one is allocated
        storage = torch.empty(numel, dtype=dtype, device=device)
    _kv_storage[key] = storage
    per_layer = storage[:numel].view(shape)
    return [(per_layer[i, 0], per_layer[i, 1]) for i in range(layers)]


def decode_state(model, n_rows, max_new_tokens, eos_ids, device):
    return DecodeState(
        token=torch.zeros(n_rows, 1, dtype=torch.long, device=device),
        position=torch.zeros(n_rows, 1, dtype=torch.long, device=device),
        column=torch.zeros(1, dtype=torch.long, device=device),
        row_key=torch.zeros(n_rows, dtype=torch.long, device=device),
        eos=torch.tensor(list(eos_ids), dtype=torch.long, device=device),
        new_tokens=torch.empty(n_rows, max_new_tokens, dtype=torch.long, device=device),
        done=torch.empty(n_rows, dtype=torch.bool, device=device),
        adapter_rows=torch.ones(n_rows, 1, 1, dtype=model.embed_tokens.weight.dtype, device=device))


def recorded_decoder(model, n_rows, max_new_tokens, eos_ids, device):
    """
    The DecodeState and the CUDA graphs recorded on it, for this model, these weights and this call shape: rows,
    new tokens and stop ids (the caches of a number of rows do not move, see kv_caches).
    """
    # apply_lora and merge_lora change the weights; the adapters' sampling copies are buffers
    weights = tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))
    per_model = _decoders.setdefault(model, {})
    key = (weights, n_rows, max_new_tokens, tuple(eos_ids))
    if key not in per_model:
        per_model[key] = (decode_state(model, n_rows, max_new_tokens, eos_ids, device), {})
    return per_model[key]


def prompt_segments(lengths, rows):
    """
    Cuts the prompts, in order, into at most two segments, each padded to its longest prompt: the cut that pads
    the fewest row-slots, where it saves SEGMENT_MIN_SAVING or more. lengths and rows: per prompt, its tokens and
    its sample rows. Returns (slice of prompts, padded length) per segment.
    """
    padded = lambda run: max(lengths[run])
    row_slots = lambda runs: sum(sum(rows[run]) * padded(run) for run in runs)  # what the prompts take in the cache
    n = len(lengths)
    whole = [slice(0, n)]
    cut = min(([slice(0, k), slice(k, n)] for k in range(1, n)), key=row_slots, default=whole)
    runs = cut if row_slots(whole) - row_slots(cut) >= SEGMENT_MIN_SAVING else whole
    return [(run, padded(run)) for run in runs]


def compact(state, caches, segment_rows, row_at, done, filled):
    """
    Moves each segment's rows still sampling to the front of the rows in use (the first sum(segment_rows)), the
    segments in order, followed by the rows that stop running; permutes row_at (the call's row at each place) the
    same way. done: per place, whether its row has finished. filled: how many cache slots hold keys and values
    (the later ones are zero in every row). Returns the segments' new row counts.
    """
    kept, dropped, new_rows, start = [], [], [], 0
    for rows in segment_rows:
        running = [row for row in range(start, start + rows) if not done[row]]
        finished = [row for row in range(start, start + rows) if done[row]]
        keep = min(rows, -(-len(running) // COMPACT_ROWS) * COMPACT_ROWS)
        kept += running + finished[:keep - len(running)]
        dropped += finished[keep - len(running):]
        new_rows.append(keep)
        start += rows
    if new_rows == segment_rows:
        return segment_rows
    order = kept + dropped + list(range(start, len(row_at)))
    row_at[:] = [row_at[row] for row in order]
    order = torch.tensor(order, device=state.done.device)
    for name, tensor in state._asdict().items():
        if name not in CALL_WIDE:  # the per-row state, all of it: the dropped rows keep their tokens
            tensor.copy_(tensor[order])
    for tensor in (t for cache in caches for t in cache):  # only the kept rows' slots: no later step reads the rest
        tensor[:len(kept), :, :filled] = tensor[order[:len(kept)], :, :filled]
    return new_rows


def running_rows(state, caches, n_rows):
    """The state and the caches of the first n_rows rows, the ones the decode steps run (views, no copies)."""
    state = DecodeState(**{name: tensor if name in CALL_WIDE else tensor[:n_rows]
                           for name, tensor in state._asdict().items()})
    return state, [(k[:n_rows], v[:n_rows]) for k, v in caches]


def replay_or_record(graphs, kind, step):
    """Runs step() as the CUDA graph recorded for this kind of step, recording it the first time."""
    if kind in graphs:
        graphs[kind].replay()
        return
    # the first step of a kind runs for real (compiling it) on a side stream, as capture wants warmed-up code;
    # recording it then launches nothing
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    # the graphs of one call shape share a memory pool: they never run at once and keep nothing between runs
    pool = next(iter(graphs.values())).pool() if graphs else None
    graphs[kind] = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graphs[kind], pool=pool):
        step()


def prefill(model, prompts, samples, segments, caches, n_slots, prompt_adapters):
    """
    Runs each segment's prompts once, right-padded to its longest, writing their keys and values into the first rows
    of the segment, then gives the rows of each prompt's samples a copy of them. samples: per prompt, its rows.
    prompt_adapters: None, or per prompt 1 (adapters on) or 0 (off), (prompts, 1, 1). Returns the logits of each
    prompt's first new token (prompts, V) fp32.
    """
    device = caches[0][0].device
    first_row = list(itertools.accumulate(samples, initial=0))  # prompt p's samples: rows first_row[p] to p + 1's
    logits = []
    for run, prompt_len in segments:
        n_run = run.stop - run.start
        input_ids = torch.zeros(n_run, prompt_len, dtype=torch.long)
        for i, prompt in enumerate(prompts[run]):
            input_ids[i, :len(prompt)] = torch.tensor(prompt)
        rows = slice(first_row[run.start], first_row[run.stop])
        prompt_rows = [(k[rows.start:rows.start + n_run, :, :prompt_len],
                        v[rows.start:rows.start + n_run, :, :prompt_len]) for k, v in caches]
        with adapters_on_rows(model, None if prompt_adapters is None else prompt_adapters[run]):
            hidden = model(input_ids.to(device), caches=prompt_rows)  # (prompts, P, D)
        last = torch.tensor([len(p) - 1 for p in prompts[run]], device=device)
        logits.append(model.logits(hidden[torch.arange(n_run, device=device), last]).float())  # (prompts, V)
        row_prompt = torch.repeat_interleave(torch.arange(n_run), torch.tensor(samples[run])).to(device)
        for tensor in (t for cache in caches for t in cache):
            # the indexed right-hand side is a copy, so a prompt's rows may overlap the rows it was prefilled in
            tensor[rows, :, :prompt_len] = tensor[rows.start:rows.start + n_run, :, :prompt_len][row_prompt]
            # the slots after the padded prompts start at zero, so what an earlier call left there cannot reach this
            # one (they are masked, but 0 * NaN is NaN); a short prompt's padding slots hold the finite keys and
            # values of padding tokens until its own tokens overwrite them
            tensor[rows, :, prompt_len:n_slots].zero_()
    return torch.cat(logits)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, *, temperature=1.0, top_p=1.0, top_k=0, eos_ids=(), seed=None,
             num_samples=1, adapters=None, compile=False):
    """
    Samples continuations of each prompt (lists of token ids, any lengths), prefilling each prompt once.
    num_samples: how many per prompt, one number or one per prompt. adapters: None samples every prompt with the
    model as it is; a bool per prompt samples it with the LoRA adapters on (the student) or off (the teacher),
    both roles in one batch. seed: one per prompt, so that a prompt's samples depend on its own seed and not on
    the prompts beside it; or one number for the call, which gives prompt p its p-th child seed; or None, a
    number drawn from torch's global generator. Returns one Rollout per sample, the samples of a prompt next to
    each other, in prompt order. compile: torch.compile the decode step, and on CUDA record it as CUDA graphs, so
    a step costs one graph launch.
    """
    device = model.embed_tokens.weight.device
    config = model.config
    n_prompts = len(prompts)
    samples = [num_samples] * n_prompts if isinstance(num_samples, int) else list(num_samples)
    if len(samples) != n_prompts or min(samples) < 1:
        raise ValueError(f"generate: num_samples must be a positive count, or one per prompt; got {num_samples}")
    if adapters is not None and len(adapters) != n_prompts:
        raise ValueError(f"generate: adapters needs one bool per prompt ({n_prompts}), got {len(adapters)}")
    if min(len(p) for p in prompts) == 0:
        raise ValueError("generate: every prompt needs at least one token")
    segments = prompt_segments([len(p) for p in prompts], samples)
    n_rows = sum(samples)
    # the slots a row can write, rounded up to a whole window: every window a step attends is a multiple of WINDOW,
    # so the CUDA graphs of a number of rows serve calls of any prompt lengths
    longest = max(padded for _, padded in segments)
    n_slots = -(-(longest + max_new_tokens) // WINDOW) * WINDOW
    row_prompt = torch.repeat_interleave(torch.arange(n_prompts), torch.tensor(samples)).to(device)  # (B,)
    if seed is None:
        seed = int(torch.randint(2**62, ()))
    prompt_seeds = child_seeds(seed, n_prompts) if isinstance(seed, int) else list(seed)
    if len(prompt_seeds) != n_prompts:
        raise ValueError(f"generate: seed must be one number, or one per prompt ({n_prompts}); got {len(prompt_seeds)}")
    # sample j of prompt p draws its noise from the j-th child of the prompt's seed
    row_keys = [key for p in range(n_prompts) for key in child_seeds(prompt_seeds[p], samples[p])]
    dtype = model.embed_tokens.weight.dtype
    prompt_adapters = None if adapters is None else torch.tensor(adapters, dtype=dtype, device=device)[:, None, None]

    # what a call keeps for the next (the KV storage, the adapters' copies, the CUDA graphs' state) is made outside
    # inference mode, so that a call outside it can still write to it (leaving inference mode turns grad mode
    # back on: hence no_grad again); the copies come before the graphs' key
    with torch.inference_mode(False), torch.no_grad(), sampling_adapters(model):
        # one slot more than any window attends: a window as long as the cache would be a contiguous slice of it,
        # one more case for the compiled block to compile
        caches = kv_caches(config, n_rows, n_slots + 1, dtype, device)
        use_graphs = compile and device.type == "cuda"
        if use_graphs:
            state, graphs = recorded_decoder(model, n_rows, max_new_tokens, eos_ids, device)
        else:  # nothing replays on its addresses, so nothing is kept: the eager path sees a new shape every call
            state = decode_state(model, n_rows, max_new_tokens, eos_ids, device)
        logits = prefill(model, prompts, samples, segments, caches, n_slots, prompt_adapters)[row_prompt]  # (B, V)
        state.position.copy_(torch.tensor([len(p) for p in prompts], device=device)[row_prompt, None])
        state.column.zero_()
        state.new_tokens.fill_(-1)
        state.done.zero_()
        state.row_key.copy_(torch.tensor(row_keys))
        if adapters is not None:
            state.adapter_rows.copy_(prompt_adapters[row_prompt])

        parts = compiled_step(n_rows == 1) if compile else EAGER_STEP
        lora_on = any(m.enabled for _, m in lora_modules(model))
        sample_and_record(state, logits, temperature, top_k, top_p)
        segment_rows = [sum(samples[run]) for run, _ in segments]  # the rows each runs
        row_at = list(range(n_rows))  # the call's row at each place of the state and the caches
        running, running_caches = state, caches
        with ExitStack() as rows_in_use:
            rows_in_use.enter_context(adapters_on_rows(model, None if adapters is None else state.adapter_rows))
            for step in range(1, max_new_tokens):
                if step % 32 == 0:
                    done = state.done.tolist()
                    if all(done):
                        break
                    fewer = compact(state, caches, segment_rows, row_at, done, longest + step)
                    if fewer != segment_rows:
                        segment_rows = fewer
                        running, running_caches = running_rows(state, caches, sum(segment_rows))
                        rows_in_use.enter_context(adapters_on_rows(model, None if adapters is None else
                                                                   running.adapter_rows))
                # in a segment padded to P, the step feeds token step-1 at slot len(prompt)+step-1 <= P+step-1 and
                # attends the slots up to it: the window is P+step rounded up, at most n_slots
                windows = tuple((rows, -(-(prompt_len + step) // WINDOW) * WINDOW)
                                for (_, prompt_len), rows in zip(segments, segment_rows) if rows)
                step_call = lambda: decode_step(model, running_caches, running, windows, temperature, top_k, top_p,
                                                parts)
                if use_graphs:
                    replay_or_record(graphs, (windows, temperature, top_k, top_p, lora_on, adapters is not None),
                                     step_call)
                else:
                    step_call()

    rollouts = [None] * n_rows
    eos_set = set(eos_ids)
    for row, new_tokens in zip(row_at, state.new_tokens.tolist()):
        tokens = new_tokens[:new_tokens.index(-1)] if -1 in new_tokens else new_tokens
        rollouts[row] = Rollout(tokens, bool(tokens) and tokens[-1] in eos_set)
    return rollouts

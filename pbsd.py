"""
Preference-Based Self-Distillation (PBSD) for Qwen3, with its baselines (OPSD, OPSD-sampled, SFT, GRPO) in one loop.

    python pbsd.py                                    # the toy world: runs end to end on a laptop CPU
    python pbsd.py --model=DIR --data=train.jsonl     # a real checkpoint, one process
    torchrun --nproc_per_node 8 pbsd.py --model=/path/Qwen3-8B --data=train.jsonl --eval_data=aime24.jsonl

One model, two roles. The student pi_theta(y | x) is the base weights plus LoRA and sees the problem x; the
teacher pi_T(y | x, c) is the same weights with the LoRA off (frozen at the start) and also sees a reference
solution c. PBSD maximises J(pi) = E_x[E_{y~pi} r(x, y) - beta KL(pi || pi_T)], whose maximiser is the teacher
reweighted by its reward, pi*(y|x) = pi_T(y|x,c) exp(r(x,y) / beta) / Z(x), which scores beta E log Z >= E_{pi_T} r
(Jensen). Writing r = beta log pi*/pi_T + beta log Z turns J into a preference problem between a teacher sample
y+ and an on-policy student sample y-, solved with the logistic loss of loss_kernels.pbsd_loss.

The file reads top to bottom: the config, the objectives (one function each), scoring, the Trainer (rollouts,
the step, evaluation, checkpoints), the command line, and the toy world. `python pbsd.py --help` lists the config.
"""

import hashlib
import inspect
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.distributed as dist

import data
import eval as evaluation
import loss_kernels
import model as qwen3


@dataclass
class Config:
    # model and data; no --model means the built-in toy world (TOY_WORLD below)
    model: str = ""  # HF Qwen3 checkpoint: a folder (config.json, safetensors, tokenizer.json) or a Hub name
    data: str = ""  # training set: a JSONL, JSON or Parquet file, a folder of them, a glob, or a Hub data set
    eval_data: str = ""  # held-out sets for periodic Avg@k, the same kinds, comma-separated; empty: none
    task: str = "math"  # math | tool (ToolAlpaca-style rows)
    problem_key: str = ""  # the column names; empty: the first present of data.FIELD_NAMES (problem, question, ...)
    solution_key: str = ""
    answer_key: str = ""
    out_dir: str = "out"
    # the objective
    loss: str = "pbsd"  # pbsd | opsd | opsd_sampled | sft | grpo
    pbsd_label: str = "teacher"  # a pair's z: teacher, 1 (the paper's); reward, sigmoid(r+ - r-) (this project's)
    beta: float = 0.1  # PBSD KL weight: the target is pi_T exp(r / beta)
    n_teacher: int = 1  # teacher samples per prompt (PBSD); pairs = n_teacher x n_student
    n_student: int = 1  # student rollouts per prompt (GRPO: the group, at least 2)
    length_norm: bool = False  # PBSD: divide each sequence's log-ratio by its token count
    beta_jsd: float = 0.5  # OPSD: 0 forward KL(teacher || student), 1 reverse KL(student || teacher)
    jsd_token_clip: float = 0.0  # OPSD: clip each token's divergence, its sum over the vocabulary (0: off)
    jsd_term_clip: float = 0.0  # OPSD: clip each (token, entry) term before that sum, as OPSD's own jsd_token_clip
    # sampling the rollouts; every log-prob uses the same temperature
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 2048
    thinking: bool = False  # Qwen3 thinking mode of the student
    teacher_thinking: bool = False  # of the teacher; set apart from the student's, they differ from the first token
    student_template: str = ""  # replaces the task's default (data.TEMPLATES); must contain {problem}
    teacher_template: str = ""  # must contain {problem} and {solution}
    # LoRA (the published OPSD protocol: r 64, alpha 128, all seven projections)
    lora_rank: int = 64
    lora_alpha: int = 128
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    # optimisation: AdamW, warm-up then cosine decay, gradient clipping
    steps: int = 200
    batch_size: int = 32  # prompts per optimizer step, over all ranks
    micro_batch_size: int = 4  # prompts per forward + backward pass on one rank; the rest is gradient accumulation
    rollout_batch_size: int = 0  # prompts per sampler call on one rank (0: all of its step's); bounds the KV cache
    lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # the global gradient norm's ceiling (0: no clipping)
    dtype: str = "bfloat16"  # base weights; the LoRA parameters are always fp32
    gradient_checkpointing: bool = True
    compile: bool = True  # torch.compile the sampler's decode step, and on CUDA the loss kernels
    # evaluation (as published: Avg@12 at temperature 1.0, no top-p or top-k), logging, checkpoints
    eval_every: int = 50  # 0: no evaluation in the run (eval.py evaluates its checkpoints)
    eval_k: int = 12
    eval_problems: int = 0  # evaluate on the first N problems of each held-out set (0: all)
    eval_max_new_tokens: int = 0  # 0: max_new_tokens
    eval_temperature: float = 1.0
    eval_thinking: bool = False  # Qwen3 thinking mode of the student's evaluation
    save_every: int = 50
    keep_last: int = 3
    resume: bool = False  # continue from the newest checkpoint in out_dir/checkpoints
    export_merged: str = ""  # at the end, write a merged HF checkpoint here
    seed: int = 0
    toy_world: str = "worked"  # the toy world only: what its teacher reads (data.toy_examples)
    toy_warm_start_steps: int = 0  # the toy world only: SFT steps that make its checkpoint (0: its world's own)


class ConfigError(ValueError):
    pass


class TrainingError(RuntimeError):
    pass


def parse_args(argv):
    """Recipe files, then --key=value overrides, type-checked against Config; without a model, the toy world's
    defaults. A recipe (config/*.py, as nanoGPT's) sets Config fields as Python assignments, one a line."""
    types = {f.name: f.type for f in fields(Config)}
    overrides = {}  # key -> (value as text, where it was set)
    for arg in argv:
        if not arg.startswith("--"):  # a recipe's values, read as the command line's are
            overrides.update((key, (str(value), arg)) for key, value in read_recipe(arg, types).items())
            continue
        key, has_value, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in types:
            raise ConfigError(f"unknown config key {arg!r}; valid keys: {', '.join('--' + k for k in types)}")
        if not has_value and types[key] is not bool:
            raise ConfigError(f"--{key} needs a value: --{key}=...")
        overrides[key] = (value if has_value else "true", "the command line")
    config = Config(**({} if "model" in overrides else TOY_WORLD))
    booleans = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    for key, (value, where) in overrides.items():
        try:
            setattr(config, key, booleans[value.lower()] if types[key] is bool else types[key](value))
        except (KeyError, ValueError):
            raise ConfigError(f"{where}: --{key} expects {types[key].__name__}, got {value!r}") from None
    _validate(config)
    return config


def read_recipe(path, types):
    """A recipe's assignments, key -> value; an unreadable file or an unknown key is a ConfigError that names it."""
    values = {}
    try:
        exec(compile(open(path).read(), path, "exec"), {}, values)
    except Exception as e:  # a missing file, a syntax error, a name it does not define
        raise ConfigError(f"{path}: not a readable recipe (Python assignments, one a line; an option is --key=value): "
                          f"{type(e).__name__}: {e}") from None
    unknown = [key for key in values if key not in types]
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]!r} is not a config key; valid keys: {', '.join(types)}")
    return values


def _validate(config):
    choices = {"loss": ("pbsd", "opsd", "opsd_sampled", "sft", "grpo"), "pbsd_label": ("teacher", "reward"),
               "task": ("math", "tool"), "dtype": ("bfloat16", "float32"), "toy_world": tuple(TOY_WORLDS)}
    for key, allowed in choices.items():
        if getattr(config, key) not in allowed:
            raise ConfigError(f"--{key} must be one of {', '.join(allowed)}, got {getattr(config, key)!r}")
    # temperature 0 would make every log-prob (logits / T) infinite; keep_last 0 would keep every checkpoint
    positive = ("beta", "temperature", "n_teacher", "n_student", "max_new_tokens", "lora_rank", "lora_alpha", "steps",
                "batch_size", "micro_batch_size", "eval_k", "keep_last")
    at_least_zero = ("rollout_batch_size", "jsd_token_clip", "jsd_term_clip", "top_k", "lr", "warmup_steps",
                     "weight_decay", "grad_clip", "eval_every", "eval_problems", "eval_max_new_tokens",
                     "eval_temperature", "save_every", "toy_warm_start_steps")
    for key in positive + at_least_zero:
        value = getattr(config, key)
        if not (value > 0 if key in positive else value >= 0):  # NaN fails both
            raise ConfigError(f"--{key} must be {'positive' if key in positive else '0 or more'}, got {value}")
    if not 0 < config.top_p <= 1:
        raise ConfigError(f"--top_p must lie in (0, 1], got {config.top_p}")
    if not 0 <= config.beta_jsd <= 1:
        raise ConfigError(f"--beta_jsd must lie in [0, 1], got {config.beta_jsd}")
    if config.loss == "grpo" and config.n_student < 2:
        raise ConfigError(f"--loss=grpo compares a prompt's rollouts with each other: --n_student must be 2 or more, "
                          f"got {config.n_student}")


# ---- a micro-batch's responses and their scores. Every response is scored twice, on its own tokens:
#
#                                          after the student prompt x    after the teacher prompt (x, c)
#                                          LoRA on, with gradient        LoRA off, no gradient
#   student rollout y- ~ pi_theta(. | x)   log pi_theta(y- | x)          log pi_T(y- | x, c)
#   teacher rollout y+ ~ pi_T(. | x, c)    log pi_theta(y+ | x)          log pi_T(y+ | x, c)
#
# PBSD pairs each teacher rollout of a prompt with each student rollout of the same prompt. OPSD, OPSD-sampled and
# GRPO sample student rollouts only; SFT's response is the reference solution, scored after the student prompt alone.


class Response(NamedTuple):
    position: int  # its prompt's place in the step's global batch, which names the prompt
    example_index: int  # the training example that prompt asks
    role: str  # who wrote it: "student" (y-), "teacher" (y+) or "reference" (SFT's target)
    tokens: list  # its token ids, ending in the EOS that stopped it if one did
    finished: bool  # ended by an EOS, not cut at max_new_tokens
    reward: float = 0.0  # r(x, y) in [0, 1]; a reference is not graded


@dataclass
class Scores:
    """A micro-batch's responses scored as the grid above shows, per token (N,), the responses' tokens in order."""
    responses: list  # (R,) Response
    token_response: torch.Tensor  # (N,) the response each token belongs to
    student_logp: torch.Tensor  # (N,) log pi_theta(y_t | x, y_<t)
    student_entropy: torch.Tensor = None  # (N,) of pi_theta's next-token distribution, without gradient
    student_hidden: torch.Tensor = None  # (N, D) the final hidden states that predict each token after x
    teacher_logp: torch.Tensor = None  # (N,) log pi_T(y_t | x, c, y_<t), without gradient
    teacher_hidden: torch.Tensor = None  # (N, D) the same after (x, c)
    head_weight: torch.Tensor = None  # (V, D) the output head both read through

    def sums(self, token_values):
        """(N,) -> (R,): each response's sum over its tokens."""
        sums = torch.zeros(len(self.responses), dtype=token_values.dtype, device=token_values.device)
        return sums.index_add_(0, self.token_response, token_values)

    def per_response(self, values):
        """R numbers, one a response (rewards, lengths) -> (R,), beside the scores."""
        return torch.tensor(values, dtype=self.student_logp.dtype, device=self.student_logp.device)


# ---- the objectives. Each returns the sum of its terms over a micro-batch (PBSD's pairs, or tokens); the step
# divides by the step's count of terms, so micro-batches and ranks add up to the step's mean.


def pbsd_objective(scores, config, stats):
    """PBSD: the logistic loss on each pair's margin beta (s(y+) - s(y-)), s(y) = log pi_theta(y | x) - log pi_T(y | x,
    c) summed over y's tokens (and divided by their count with length_norm)."""
    responses = scores.responses
    pairs = [(i, j) for i, y_plus in enumerate(responses) if y_plus.role == "teacher" for j, y_minus in
             enumerate(responses) if y_minus.role == "student" and y_minus.position == y_plus.position]
    plus, minus = (list(indices) for indices in zip(*pairs))  # (P,) each: the pairs' y+ and y-
    student, teacher = scores.sums(scores.student_logp), scores.sums(scores.teacher_logp)  # (R,) each
    if config.length_norm:
        lengths = scores.per_response([len(r.tokens) for r in responses])
        student, teacher = student / lengths, teacher / lengths
    rewards = scores.per_response([r.reward for r in responses])
    loss, margin, label = loss_kernels.pbsd_loss(student[plus], teacher[plus], student[minus], teacher[minus],
                                                 rewards[plus], rewards[minus], beta=config.beta,
                                                 label=config.pbsd_label)
    stats.add("margin", margin.tolist())
    stats.add("label", label.tolist())
    # the margin each pair's loss is least at is logit(z): r+ - r- for the reward label, +inf for the teacher's
    stats.add("margin_below_target", (margin < torch.logit(label)).tolist())
    return loss.sum()


def opsd_objective(scores, config, stats):
    """OPSD: per token of the student's rollouts, the generalized JSD of the teacher's and the student's next-token
    distributions over the full vocabulary; its terms clipped at jsd_term_clip, its sum at jsd_token_clip, if set."""
    divergence = loss_kernels.gjs_divergence(scores.student_hidden, scores.teacher_hidden, scores.head_weight,
                                             beta=config.beta_jsd, temperature=config.temperature,
                                             term_clip=config.jsd_term_clip)  # (N,)
    return (divergence.clamp(max=config.jsd_token_clip) if config.jsd_token_clip > 0 else divergence).sum()


def opsd_sampled_objective(scores, config, stats):
    """OPSD on the sampled tokens: a reverse-KL policy gradient, advantage log p_T(y_t) - log p_S(y_t) (detached)."""
    return -((scores.teacher_logp - scores.student_logp).detach() * scores.student_logp).sum()


def sft_objective(scores, config, stats):
    """SFT: the negative log-likelihood of the reference solution's tokens after the student prompt."""
    return -scores.student_logp.sum()


def grpo_objective(scores, config, stats):
    """GRPO, no teacher: a rollout's advantage compares its reward with its group's (the prompt's n_student rollouts,
    which sit together), A = (r - mean) / (std + 1e-4), in the token-level policy gradient -A log pi_theta(y_t). One
    update per batch of rollouts, so the importance ratio pi_theta / pi_old is 1 and needs no clipping."""
    groups = scores.per_response([r.reward for r in scores.responses]).view(-1, config.n_student)  # (P, n)
    advantage = (groups - groups.mean(-1, keepdim=True)) / (groups.std(-1, keepdim=True) + 1e-4)  # (P, n)
    return -(advantage.flatten()[scores.token_response] * scores.student_logp).sum()


OBJECTIVES = {"pbsd": pbsd_objective, "opsd": opsd_objective, "opsd_sampled": opsd_sampled_objective,
              "sft": sft_objective, "grpo": grpo_objective}


def response_hidden(model, prompts, responses):
    """Runs each prompt + response, right-padded into one batch: the final hidden states that predict the responses'
    tokens (N, D) (token j at position len(prompt) - 1 + j), those tokens (N,) and the response of each (N,)."""
    device = model.embed_tokens.weight.device
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    input_ids = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        input_ids[i, :lengths[i]] = torch.tensor(prompt + response)
    hidden = model(input_ids.to(device))  # (B, L, D); causal, so right padding never reaches a real token
    hidden = torch.cat([hidden[i, len(p) - 1:lengths[i] - 1] for i, p in enumerate(prompts)])  # (N, D)
    as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=device)
    token_response = [i for i, response in enumerate(responses) for _ in response]
    return hidden, as_tensor([t for response in responses for t in response]), as_tensor(token_response)


def rollout_seed(seed, step, position, role):
    """The sampling seed of the prompt at this position of the step's global batch, for role 0 (student) or 1
    (teacher): however the step is split (ranks, calls, micro-batches), a prompt's rollouts are the same."""
    return qwen3.sub_seed(qwen3.sub_seed(qwen3.sub_seed(seed, step), position), role)


class Trainer:
    def __init__(self, config):
        self.config = config
        self.rank, self.world, self.device = evaluation.setup_distributed()
        if config.batch_size % self.world:
            raise ConfigError(f"--batch_size={config.batch_size} must be a multiple of the number of ranks "
                              f"({self.world})")
        loss_kernels.compile_kernels = config.compile and self.device.type == "cuda"
        self.model_path = data.local_path(config.model, "model")  # a Hub name resolves into its cache
        self.model = qwen3.load_qwen3(self.model_path, self.device, getattr(torch, config.dtype))
        self.model.gradient_checkpointing = config.gradient_checkpointing
        torch.manual_seed(config.seed)  # the same LoRA initialisation on every rank
        try:
            self.lora_params = qwen3.apply_lora(self.model, config.lora_rank, config.lora_alpha,
                                                tuple(config.lora_targets.split(",")))
        except ValueError as e:
            raise ConfigError(f"--lora_targets={config.lora_targets}: {e}") from None
        self.optimizer = torch.optim.AdamW(self.lora_params, lr=config.lr, weight_decay=config.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_scale)
        self.tokenizer = tokenizer = data.Tokenizer(self.model_path)
        self.train_examples, self.eval_examples = self.load_data()
        prompts = lambda make, thinking, template: [make(e, tokenizer, thinking, template or None)
                                                    for e in self.train_examples]
        self.student_prompts = prompts(data.student_prompt, config.thinking, config.student_template)
        self.teacher_prompts = (prompts(data.teacher_prompt, config.teacher_thinking, config.teacher_template)
                                if config.loss in ("pbsd", "opsd", "opsd_sampled") else [])
        self.references = ([tokenizer.encode(e.solution + data.IM_END) for e in self.train_examples]
                           if config.loss == "sft" else [])  # SFT's targets, each closed by the end of the turn
        self.check_lengths()
        self.step = 0
        self.history = []  # evaluation results, for the learning curve

    def lr_scale(self, step):
        """Linear warm-up to lr, then cosine decay to 0 at the last step."""
        config = self.config
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def load_data(self):
        config = self.config
        if not config.data:
            raise ConfigError("--data is required with --model (a JSONL, JSON or Parquet training set)")
        load = (data.load_tool_examples if config.task == "tool" else
                lambda path: data.load_examples(path, config.problem_key, config.solution_key, config.answer_key))
        train = load(data.local_path(config.data, "dataset"))
        unsolved = [i for i, example in enumerate(train, start=1) if not example.solution]
        if unsolved and config.loss != "grpo":  # GRPO alone reads no reference solution
            raise data.DataError(f"{config.data}: example {unsolved[0]} has no reference solution, which the teacher "
                                 f"(and SFT) need; --solution_key names its column")
        held_out = [e for spec in filter(None, config.eval_data.split(","))  # each set's first eval_problems
                    for e in load(data.local_path(spec, "dataset"))[:config.eval_problems or None]]
        return train, held_out

    def check_lengths(self):
        context, new_tokens = self.model.config.max_position_embeddings, self.config.max_new_tokens
        sequences = [(role, prompt, new_tokens, f"--max_new_tokens={new_tokens}") for role, prompts in
                     (("student", self.student_prompts), ("teacher", self.teacher_prompts)) for prompt in prompts]
        sequences += [("student", p, len(r), f"the {len(r)} tokens of the reference solution")
                      for p, r in zip(self.student_prompts, self.references)]
        for i, (role, prompt, extra, what) in enumerate(sequences):
            if len(prompt) + extra > context:
                raise data.DataError(f"{self.config.data}: row {i % len(self.train_examples) + 1}: the {role} prompt "
                                     f"has {len(prompt)} tokens; with {what} it exceeds the model's context of "
                                     f"{context}")

    # -- data order: a fresh permutation each epoch, a pure function of (seed, step) so resume is exact

    @lru_cache(maxsize=4)
    def epoch_order(self, epoch):
        order = list(range(len(self.train_examples)))
        random.Random(self.config.seed * 7919 + epoch).shuffle(order)
        return order

    def rank_batch(self, step):
        """This rank's share of the step's global batch: (position in the global batch, example index) pairs."""
        config, n = self.config, len(self.train_examples)
        start, per_rank = step * config.batch_size, config.batch_size // self.world
        positions = range(self.rank * per_rank, (self.rank + 1) * per_rank)
        return [(p, self.epoch_order((start + p) // n)[(start + p) % n]) for p in positions]

    # -- the step: rollouts, then scoring, loss and backward micro-batch by micro-batch

    def sample(self, step, batch, stats):
        """The rank's rollouts for the step as graded Responses: the student's (LoRA on, n_student a prompt) and, for
        PBSD, the teacher's (LoRA off, n_teacher a prompt), both in one sampler call per rollout_batch_size prompts."""
        config, timer = self.config, time.time()
        roles = ("student", "teacher") if config.loss == "pbsd" else ("student",)
        counts = {"student": config.n_student, "teacher": config.n_teacher}
        prompts = {"student": self.student_prompts, "teacher": self.teacher_prompts}
        sampled = []  # (position, example index, role, Rollout)
        chunk = config.rollout_batch_size or len(batch)
        for start in range(0, len(batch), chunk):
            requests = [(position, i, role) for role in roles for position, i in batch[start:start + chunk]]
            rollouts = iter(qwen3.generate(
                self.model, [prompts[role][i] for _, i, role in requests], config.max_new_tokens,
                temperature=config.temperature, top_p=config.top_p, top_k=config.top_k, eos_ids=self.tokenizer.eos_ids,
                seed=[rollout_seed(config.seed, step, position, roles.index(role)) for position, _, role in requests],
                num_samples=[counts[role] for *_, role in requests],
                adapters=[role == "student" for *_, role in requests], compile=config.compile))
            sampled += [(*request, next(rollouts)) for request in requests for _ in range(counts[request[2]])]
        stats.add("generation_seconds", [time.time() - timer])
        texts = [self.tokenizer.decode(rollout.tokens) for *_, rollout in sampled]
        responses = [Response(position, i, role, *rollout, data.reward(self.train_examples[i], text))
                     for (position, i, role, rollout), text in zip(sampled, texts)]
        for role in roles:
            mine = [r for r in responses if r.role == role]
            stats.add("rollout_tokens", [len(r.tokens) for r in mine])
            stats.add(f"{role}_reward", [r.reward for r in mine])
            stats.add(f"{role}_length", [len(r.tokens) for r in mine])
            stats.add(f"{role}_truncated", [not r.finished for r in mine])
        student_texts = [text for text, r in zip(texts, responses) if r.role == "student"]
        stats.add_ratio("uncertainty_per_1k", evaluation.uncertainty_count(student_texts),
                        sum(len(r.tokens) for r in responses if r.role == "student") / 1000)
        return responses

    def score(self, responses):
        """The responses scored as the grid at the top of the file shows: after the student prompt with the LoRA on
        and gradient, and (for the objectives that read the teacher) after the teacher prompt with it off."""
        model, temperature, tokens = self.model, self.config.temperature, [r.tokens for r in responses]
        hidden, targets, token_response = response_hidden(
            model, [self.student_prompts[r.example_index] for r in responses], tokens)
        logp, entropy = loss_kernels.token_logprobs(hidden, model.lm_head_weight, targets, temperature=temperature,
                                                    with_entropy=True)
        scores = Scores(responses, token_response, logp, entropy, hidden, head_weight=model.lm_head_weight)
        if self.teacher_prompts:
            with torch.no_grad(), qwen3.adapters_off(model):
                hidden, _, _ = response_hidden(model, [self.teacher_prompts[r.example_index] for r in responses],
                                               tokens)
                scores.teacher_logp = loss_kernels.token_logprobs(hidden, model.lm_head_weight, targets,
                                                                  temperature=temperature)
                scores.teacher_hidden = hidden
        return scores

    def micro_step(self, responses, normalizer, stats):
        """A micro-batch's share of the step's loss (its objective's sum over normalizer), backpropagated."""
        config, timer = self.config, time.time()
        scores = self.score(responses)
        on_student = torch.tensor([r.role == "student" for r in responses],  # (N,): the student's rollouts' tokens
                                  device=scores.token_response.device)[scores.token_response]
        if on_student.any():
            stats.add_ratio("student_entropy", scores.student_entropy[on_student].sum().item(), on_student.sum().item())
        if scores.teacher_logp is not None and on_student.any():
            # the k1 estimate of KL(student || teacher) per token along the student's rollouts
            stats.add_ratio("kl_estimate", (scores.student_logp - scores.teacher_logp)[on_student].sum().item(),
                            on_student.sum().item())
        if config.loss == "sft":
            stats.add("response_length", [len(r.tokens) for r in responses])
        loss = OBJECTIVES[config.loss](scores, config, stats) / normalizer
        loss.backward()
        stats.add("train_seconds", [time.time() - timer])
        return loss.item()

    def accumulate(self, step, stats):
        """Samples this rank's rollouts for the step (SFT: takes its references), then scores and backpropagates them
        micro-batch by micro-batch. Returns the rank's share of the step's loss (the ranks' mean is the step's)."""
        config, batch = self.config, self.rank_batch(step)
        if config.loss == "sft":
            responses = [Response(position, i, "reference", self.references[i], True) for position, i in batch]
        else:
            per_call = min(config.rollout_batch_size or len(batch), len(batch))
            with self.out_of_memory_advice(f"step {step + 1}, sampling", f"sample fewer prompts per call with "
                                           f"--rollout_batch_size (now {per_call} of this rank's {len(batch)}), or "
                                           f"fewer --max_new_tokens"):
                responses = self.sample(step, batch, stats)
        # the terms the step's loss averages: PBSD's pairs, or the tokens of the responses
        terms = (len(batch) * config.n_teacher * config.n_student if config.loss == "pbsd" else
                 sum(len(r.tokens) for r in responses))
        normalizer = self.all_reduce(terms) / self.world  # ranks average their gradients: each divides by the mean
        loss = 0.0
        with self.out_of_memory_advice(f"step {step + 1}, training", f"lower --micro_batch_size (now "
                                       f"{config.micro_batch_size})" + ", or turn --gradient_checkpointing on" *
                                       (not config.gradient_checkpointing)):
            for first in range(0, len(batch), config.micro_batch_size):
                positions = {position for position, _ in batch[first:first + config.micro_batch_size]}
                loss += self.micro_step([r for r in responses if r.position in positions], normalizer, stats)
        return loss

    @contextmanager
    def out_of_memory_advice(self, where, advice):
        """A GPU out-of-memory error inside becomes a TrainingError that says where, what to lower, and what is kept."""
        try:
            yield
        except torch.OutOfMemoryError as e:
            raise TrainingError(f"{where}: out of GPU memory ({str(e).splitlines()[0]}); {advice}. The last good "
                                f"checkpoint is {self.latest_checkpoint()}") from None

    def optimizer_step(self):
        """Averages the gradients over ranks, clips their global norm, and steps."""
        if self.world > 1:
            flat = torch.cat([p.grad.flatten() for p in self.lora_params])
            dist.all_reduce(flat)
            for p, grad in zip(self.lora_params, (flat / self.world).split([p.numel() for p in self.lora_params])):
                p.grad.copy_(grad.view_as(p))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.lora_params, self.config.grad_clip or math.inf).item()
        if not math.isfinite(grad_norm):  # the same on every rank: the gradients were averaged above
            raise TrainingError(f"step {self.step + 1}: the gradient norm is {grad_norm}; stopping before the "
                                f"update. The last good checkpoint is {self.latest_checkpoint()}")
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def train(self, until_step=None):
        """Trains to config.steps (or stops after until_step, as if interrupted)."""
        config = self.config
        if config.resume:
            self.load_checkpoint()
        if self.rank == 0:
            evaluation.start_run_log(config.out_dir, self.step, asdict(config))
        if self.step == 0 and self.eval_examples and config.eval_every:
            self.evaluate()
        last_step, first_step = min(config.steps, until_step or config.steps), self.step
        progress = evaluation.Progress(last_step - first_step, config.loss, enabled=self.rank == 0)
        while self.step < last_step:
            self.model.train()
            stats = evaluation.Stats()
            loss = self.all_reduce(self.accumulate(self.step, stats)) / self.world  # the same on every rank
            if not math.isfinite(loss):
                raise TrainingError(f"step {self.step + 1}: the loss is {loss}; stopping before the update. "
                                    f"The last good checkpoint is {self.latest_checkpoint()}")
            grad_norm = self.optimizer_step()
            self.step += 1
            metrics = {**stats.reduce(self.world, self.device), "loss": loss, "step": self.step,
                       "lr": self.schedule.get_last_lr()[0], "grad_norm": grad_norm}
            if self.device.type == "cuda":  # what sets --rollout_batch_size and --micro_batch_size
                metrics["peak_memory_gb"] = self.all_reduce(torch.cuda.max_memory_allocated(self.device) / 1e9,
                                                             dist.ReduceOp.MAX)
                torch.cuda.reset_peak_memory_stats(self.device)
            if "rollout_tokens" in metrics:
                metrics["rollout_tokens_per_second"] = metrics["rollout_tokens"] / metrics["generation_seconds"]
            self.log(metrics)
            progress.update(self.step - first_step, evaluation.summary_line(metrics))
            evaluated = config.eval_every and self.eval_examples and (self.step % config.eval_every == 0 or
                                                                      self.step == config.steps)
            if evaluated:
                self.evaluate()
            saved = config.save_every and (self.step % config.save_every == 0 or self.step == config.steps)
            if saved:
                self.save_checkpoint()
            if self.rank == 0 and (evaluated or saved or self.step == last_step):
                evaluation.plot_run(os.path.join(config.out_dir, "metrics.jsonl"),
                                    os.path.join(config.out_dir, "learning_curve.png"))
        if self.step == config.steps and config.export_merged and self.rank == 0:
            self.export_merged()
        return self.history

    def all_reduce(self, value, op=dist.ReduceOp.SUM):
        """A number's sum (or op) over the ranks."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return tensor.item()

    # -- evaluation, logging

    def evaluate(self):
        """Held-out Avg@k of the student, and its greedy accuracy (one answer at temperature 0), which beside Avg@k
        says whether it lacks the answer or spreads its mass off it; at the first evaluation, the frozen teacher's."""
        config = self.config
        kwargs = dict(k=config.eval_k, temperature=config.eval_temperature,
                      max_new_tokens=config.eval_max_new_tokens or config.max_new_tokens,
                      batch_size=config.micro_batch_size * config.eval_k, seed=config.seed + 12345,
                      compile=config.compile, show_progress=False)
        greedy = dict(k=1, temperature=0.0)  # one answer a problem, the most likely

        def summary(role, **settings):  # the evaluation's figures, without its per-problem results
            template = (config.teacher_template if role == "teacher" else config.student_template) or None
            settings["thinking"] = config.teacher_thinking if role == "teacher" else config.eval_thinking
            figures = evaluation.evaluate_across_ranks(self.model, self.tokenizer, self.eval_examples, role=role,
                                                       template=template, **{**kwargs, **settings})
            return {k: v for k, v in figures.items() if k != "per_problem"}
        self.model.eval()
        advice = (f"the evaluation's KV cache is what to lower: a call samples --micro_batch_size x --eval_k = "
                  f"{kwargs['batch_size']} rows of up to {kwargs['max_new_tokens']} new tokens; lower either")
        with self.out_of_memory_advice(f"evaluation at step {self.step}", advice):
            result = {"step": self.step, **{f"eval_{k}": v for k, v in summary("student").items()},
                      "eval_greedy_accuracy": summary("student", **greedy)["avg_at_k"]}
            if not self.history and all(e.solution for e in self.eval_examples):  # the frozen teacher, once
                with qwen3.adapters_off(self.model):
                    result.update({f"teacher_{k}": v for k, v in summary("teacher").items()},
                                  teacher_greedy_accuracy=summary("teacher", **greedy)["avg_at_k"])
        qwen3.release_kv_cache()  # an evaluation call samples micro_batch_size x eval_k rows, more than training's
        self.history.append(result)
        self.log(result)
        if self.rank == 0:
            print(f"[eval] step {self.step}: student Avg@{config.eval_k} {result['eval_avg_at_k']:.3f}, "
                  f"pass@{config.eval_k} {result['eval_pass_at_k']:.3f}, greedy "
                  f"{result['eval_greedy_accuracy']:.3f}, length {result['eval_mean_length']:.1f}", file=sys.stderr)

    def log(self, record):
        if self.rank == 0:
            with open(os.path.join(self.config.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- checkpoints: the adapter in PEFT format plus everything needed to continue exactly

    def checkpoints(self):
        """Paths of the finished checkpoints, oldest first (a .tmp folder is one a crash interrupted)."""
        folder = os.path.join(self.config.out_dir, "checkpoints")
        names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        return [os.path.join(folder, n) for n in names if n.startswith("step_") and not n.endswith(".tmp")]

    def latest_checkpoint(self):
        return (self.checkpoints() or [None])[-1]

    def save_checkpoint(self):
        if self.rank != 0:
            return
        final = os.path.join(self.config.out_dir, "checkpoints", f"step_{self.step:06d}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        base = self.config.model if self.model_path != self.config.model else os.path.abspath(self.model_path)
        qwen3.save_lora(self.model, tmp, base_model_name_or_path=base)  # a Hub name as it is, a folder in full
        torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                    "torch_rng": torch.get_rng_state(), "history": self.history, "config": asdict(self.config)},
                   os.path.join(tmp, "trainer_state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # a crash before this line leaves only a .tmp folder, which resume ignores
        for path in self.checkpoints()[:-self.config.keep_last]:
            shutil.rmtree(path)

    def load_checkpoint(self):
        path = self.latest_checkpoint()
        if path is None:
            if self.rank == 0:
                print(f"[resume] no checkpoint in {self.config.out_dir}/checkpoints, starting from step 0",
                      file=sys.stderr)
            return
        qwen3.load_lora(self.model, path)
        # onto the CPU, not the GPU rank 0 saved it from; load_state_dict moves the optimizer's state to its parameters
        state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.history = state["step"], state["history"]
        if self.rank == 0:
            print(f"[resume] continuing from {path} (step {self.step})", file=sys.stderr)
            # a longer run or another evaluation schedule is a choice; another data set or batch is more often a slip
            changed = [f"--{key}: {state['config'][key]!r} -> {value!r}" for key, value in asdict(self.config).items()
                       if key != "resume" and key in state["config"] and state["config"][key] != value]
            if changed:
                print(f"[resume] settings that differ from the checkpoint's run: {'; '.join(changed)}", file=sys.stderr)

    def export_merged(self):
        path = self.config.export_merged
        qwen3.save_qwen3(self.model, path)  # the adapter folded in; the model keeps it, for what runs after
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "vocab.json", "merges.txt"):
            source = os.path.join(self.model_path, name)
            if os.path.exists(source):
                shutil.copy(source, os.path.join(path, name))
        print(f"[export] merged checkpoint written to {path}", file=sys.stderr)


def main(argv):
    if argv and argv[0] in ("-h", "--help"):  # the fields as written, each with its default and comment
        print(__doc__)
        print("\n".join(inspect.getsource(Config).splitlines()[2:]))
        print("\nWithout --model (the toy world) these defaults change:",
              " ".join(f"--{k}={v!r}" for k, v in TOY_WORLD.items()))
        return
    start = time.time()
    config = parse_args(argv)
    toy = not config.model
    if toy:  # under torchrun, rank 0 builds and caches the world while the others wait for it
        if evaluation.setup_distributed()[0] == 0:
            build_toy_world(config)
        if dist.is_initialized():
            dist.barrier()
        build_toy_world(config)  # built now: points config at the world
    trainer = Trainer(config)
    history = trainer.train()
    if toy and trainer.rank == 0:  # the reward-reweighted teacher, beside the frozen teacher on the plot
        target = {"step": 0, "target_accuracy": toy_target_accuracy(trainer)[0], "beta": config.beta}
        trainer.log(target)
        evaluation.plot_run(os.path.join(config.out_dir, "metrics.jsonl"),
                            os.path.join(config.out_dir, "learning_curve.png"))
    if trainer.rank == 0 and len(history) > 1:
        evaluation.print_run_table(trainer, time.time() - start, toy and config.toy_world, toy and target)
    if dist.is_initialized():
        dist.barrier()  # the ranks leave together: one tearing gloo down while another still writes can abort it
        dist.destroy_process_group()


# ---- the toy world: what `python pbsd.py` runs with no --model. A small Qwen3 and a BPE tokenizer trained on
# arithmetic word problems (data.synthetic_math), whose answer alone is the response ("\\boxed{57}"),
# warm-started by SFT on student and teacher prompts; then the objective through the same loop.
TOY_WORLD = dict(out_dir="out/toy", pbsd_label="reward", beta=0.5, max_new_tokens=24, lora_rank=32, lora_alpha=64,
                 steps=300, batch_size=32, micro_batch_size=32, lr=3e-3, warmup_steps=30, dtype="float32",
                 gradient_checkpointing=False, compile=False, eval_every=50, eval_k=4, eval_problems=200,
                 save_every=50, keep_last=2,
                 # short prompts keep a 4-layer model's sequences short; the real templates are data.TEMPLATES
                 student_template="{problem}\nPut the final answer in \\boxed{}.",
                 teacher_template="{problem}\nReference solution:\n{solution}\n"
                                  "Solve it in your own words and put the final answer in \\boxed{}.")
TOY_MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, rope_theta=10000.0, max_position_embeddings=512,
                 tie_word_embeddings=True)
TOY_TRAIN, TOY_HELD_OUT = 4000, 200  # problems (seeds 1 and 2 of data.synthetic_math)
TOY_WARM_START = dict(batch_size=32, lr=3e-3, vocab_size=1024, threads=2)
# What the teacher reads (data.toy_examples), the task (an addition or a subtraction on numbers up to max_value) and
# the warm start that make each world ask its question. worked: a student still learning beside a teacher that copies
# the answer. candidates, mistakes: a teacher right about half the time on every problem, below its target pi*.
TOY_WORLDS = {"worked": dict(max_value=10, warm_start_steps=400),
              "candidates": dict(max_value=40, warm_start_steps=1600),
              "mistakes": dict(max_value=40, warm_start_steps=1500)}


def build_toy_world(config):
    """Writes out_dir/toy_base_<recipe>, an HF checkpoint folder warm-started by SFT, with its training and held-out
    problems (train.jsonl, held_out.jsonl); points config's model and data at them and returns the path. The name
    hashes everything the world follows from but the seed: a run of the same recipe reuses the folder."""
    world = TOY_WORLDS[config.toy_world]
    task = dict(steps=(1, 1), max_value=world["max_value"])
    steps = config.toy_warm_start_steps or world["warm_start_steps"]
    recipe = json.dumps({"world": config.toy_world, "task": task, "problems": [TOY_TRAIN, TOY_HELD_OUT],
                         "decoys": data.DECOYS, "model": TOY_MODEL, "warm_start": {**TOY_WARM_START, "steps": steps},
                         "templates": [config.student_template, config.teacher_template]}, sort_keys=True)
    path = os.path.join(config.out_dir, "toy_base_" + hashlib.sha1(recipe.encode()).hexdigest()[:10])
    config.model = path  # the loop reads the world as it reads any checkpoint and data sets
    config.data, config.eval_data = (config.data or os.path.join(path, "train.jsonl"),
                                     config.eval_data or os.path.join(path, "held_out.jsonl"))
    if os.path.exists(path):
        return path
    print(f"[toy] building the toy world in {path} (cached for the next run)", file=sys.stderr)
    start = time.time()
    held_out = [e for e, _ in data.toy_examples(config.toy_world, TOY_HELD_OUT, seed=2, **task)]
    seen = {e.problem for e in held_out}
    train = [(e, taught) for e, taught in data.toy_examples(config.toy_world, TOY_TRAIN, seed=1, **task)
             if e.problem not in seen]
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    data.write_examples(os.path.join(tmp, "train.jsonl"), [e for e, _ in train])
    data.write_examples(os.path.join(tmp, "held_out.jsonl"), held_out)
    student_template, teacher_template = config.student_template or None, config.teacher_template or None
    texts = [data.teacher_prompt(e, template=teacher_template) + e.solution + data.IM_END for e, _ in train[:1000]]
    tokenizer = data.train_tokenizer(texts, TOY_WARM_START["vocab_size"], tmp)
    torch.manual_seed(config.seed)
    model = qwen3.Qwen3(qwen3.Qwen3Config(vocab_size=tokenizer.tokenizer.get_vocab_size(), **TOY_MODEL))
    for name, p in model.named_parameters():  # GPT-2's initialisation; the norms' scales stay 1
        if "norm" not in name:
            torch.nn.init.normal_(p, 0.0, 0.02)

    # SFT on a 50/50 mix of student and teacher prompts, each followed by its answer: the right one for the
    # student, one its world teaches for the teacher
    optimizer = torch.optim.AdamW(model.parameters(), lr=TOY_WARM_START["lr"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    progress = evaluation.Progress(steps, "toy warm start")
    rng, threads = random.Random(config.seed), torch.get_num_threads()
    torch.set_num_threads(TOY_WARM_START["threads"])  # sums follow the thread count: a fixed one builds one world
    for step in range(steps):
        batch = rng.sample(train, TOY_WARM_START["batch_size"])
        prompts = [data.teacher_prompt(e, tokenizer, template=teacher_template) if i % 2 else
                   data.student_prompt(e, tokenizer, template=student_template) for i, (e, _) in enumerate(batch)]
        answers = [rng.choice(taught) if i % 2 else e.answer for i, (e, taught) in enumerate(batch)]
        responses = [tokenizer.encode(f"\\boxed{{{answer}}}{data.IM_END}") for answer in answers]
        loss = sft_loss(model, prompts, responses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 49 or step == steps - 1:
            progress.update(step + 1, f"sft loss {loss.item():.3f}")
    torch.set_num_threads(threads)
    qwen3.save_qwen3(model, tmp)
    json.dump({"eos_token_id": list(tokenizer.eos_ids)}, open(os.path.join(tmp, "generation_config.json"), "w"))
    json.dump({"recipe": json.loads(recipe), "seed": config.seed, "seconds": round(time.time() - start, 1)},
              open(os.path.join(tmp, "warm_start.json"), "w"))
    os.replace(tmp, path)
    return path


def sft_loss(model, prompts, responses):
    """The mean negative log-likelihood of the responses after their prompts, from plain logits, so that the output
    head (here the tied embedding) trains as well: the loss kernels keep it frozen, as LoRA never trains it."""
    hidden, targets, _ = response_hidden(model, prompts, responses)
    return torch.nn.functional.cross_entropy(model.logits(hidden).float(), targets)  # hidden (N, D) -> (N, V)


@torch.no_grad()
def toy_target_accuracy(trainer):
    """The held-out accuracy of the reward-reweighted teacher pi* = pi_T exp(r / beta) / Z and the teacher's, exact
    where a response is the answer alone: p = pi_T(right | x, c), pi*(right) = p e^(1/beta) / (p e^(1/beta) + 1 - p)."""
    config, model, tokenizer, examples = trainer.config, trainer.model, trainer.tokenizer, trainer.eval_examples
    prompts = [data.teacher_prompt(e, tokenizer, config.teacher_thinking, config.teacher_template or None)
               for e in examples]
    responses = [tokenizer.encode(f"\\boxed{{{e.answer}}}{data.IM_END}") for e in examples]
    with qwen3.adapters_off(model):
        hidden, targets, token_response = response_hidden(model, prompts, responses)
        logp = loss_kernels.token_logprobs(hidden, model.lm_head_weight, targets, temperature=config.temperature)
    p = torch.zeros(len(examples), dtype=torch.float64).index_add_(0, token_response.cpu(), logp.double().cpu()).exp()
    boost = math.exp(1 / config.beta)
    return (p * boost / (p * boost + 1 - p)).mean().item(), p.mean().item()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, TrainingError, qwen3.CheckpointError, data.DataError) as e:
        sys.exit(f"error: {e}")
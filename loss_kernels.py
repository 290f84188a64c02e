"""
Loss kernels that work from hidden states and never hold the full logits.

With a 151,936-token vocabulary 16K rollout tokens would need 10 GB for one fp32 logits tensor. Here the
output head is applied a chunk of rows at a time, inside a custom autograd function that saves only the hidden
states and one number per row and recomputes the chunk's logits in backward: peak extra memory is
O(chunk_size * V). The per-chunk math is compiled at one fixed shape (the last chunk is padded).

The head weight is frozen (LoRA trains the projections, not the head), so gradients flow to the hidden
states only. Logits are the matmul in the input dtype, then everything else in fp32 (float64 stays float64).
"""

import functools

import torch
import torch.nn.functional as F

compile_kernels = True  # False runs the same chunk math eagerly (tests, debugging, CPU)


def _maybe_compiled(fn):
    # compiled at the first compiled call, not at import: loading the compiler costs every process seconds
    compiled = functools.cache(lambda: torch.compile(fn, dynamic=False))

    @functools.wraps(fn)
    def run(*args):
        return (compiled() if compile_kernels else fn)(*args)
    return run


def _chunk_logits(hidden, weight, temperature):
    logits = hidden @ weight.T  # (C, V), in the input dtype
    return logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature


def _chunks(n_rows, chunk_size):
    return [(start, min(start + chunk_size, n_rows)) for start in range(0, n_rows, chunk_size)]


def _padded(x, chunk_size):
    """Pads the first dimension of a short last chunk up to chunk_size, so the compiled math sees one shape."""
    return F.pad(x, (0, 0) * (x.dim() - 1) + (0, chunk_size - x.shape[0])) if x.shape[0] < chunk_size else x


# Per-token log-probabilities: log p(y_t) = z[y_t] - logsumexp(z), with z = h W^T / T.


@_maybe_compiled
def _logprob_forward_chunk(hidden, weight, targets, temperature):
    logits = _chunk_logits(hidden, weight, temperature)  # (C, V)
    lse = logits.logsumexp(-1)  # (C,)
    target_logp = logits.gather(-1, targets[:, None])[:, 0] - lse
    entropy = lse - (torch.exp(logits - lse[:, None]) * logits).sum(-1)  # H = -sum p log p = lse - sum p z
    return target_logp, entropy, lse


@_maybe_compiled
def _logprob_backward_chunk(hidden, weight, targets, lse, grad_logp, temperature):
    logits = _chunk_logits(hidden, weight, temperature)
    probs = torch.exp(logits - lse[:, None])  # (C, V)
    # d log p(y) / d z = onehot(y) - p, and d z / d h = W / T; the one-hot as a comparison, which fuses compiled
    is_target = torch.arange(logits.shape[-1], device=logits.device) == targets[:, None]  # (C, V)
    grad_logits = grad_logp[:, None] * (is_target.to(probs.dtype) - probs)
    return (grad_logits / temperature).to(weight.dtype) @ weight  # (C, D)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size):
        out_dtype = torch.promote_types(hidden.dtype, torch.float32)
        target_logp = torch.empty(hidden.shape[0], dtype=out_dtype, device=hidden.device)
        entropy, lse = torch.empty_like(target_logp), torch.empty_like(target_logp)
        for start, end in _chunks(hidden.shape[0], chunk_size):
            n = end - start
            chunk = _logprob_forward_chunk(_padded(hidden[start:end], chunk_size), weight,
                                           _padded(targets[start:end, None], chunk_size)[:, 0], temperature)
            target_logp[start:end], entropy[start:end], lse[start:end] = (c[:n] for c in chunk)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(entropy)
        return target_logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        chunk_size = ctx.chunk_size
        for start, end in _chunks(hidden.shape[0], chunk_size):
            pad = lambda x: _padded(x, chunk_size)
            grad_hidden[start:end] = _logprob_backward_chunk(
                pad(hidden[start:end]), weight, pad(targets[start:end, None])[:, 0], pad(lse[start:end, None])[:, 0],
                pad(grad_logp[start:end, None])[:, 0], ctx.temperature)[:end - start]
        return grad_hidden, None, None, None, None


def token_logprobs(hidden, weight, targets, *, temperature=1.0, chunk_size=1024, with_entropy=False):
    """hidden (N, D), weight (V, D), targets (N,) -> log p(target) (N,) under softmax(hidden @ weight.T / T),
    differentiable in hidden. with_entropy also returns each row's entropy (N,), a diagnostic without gradient."""
    logp, entropy = _TokenLogprobs.apply(hidden, weight, targets, temperature, chunk_size)
    return (logp, entropy) if with_entropy else logp


# Generalized Jensen-Shannon divergence between the teacher T and student S next-token distributions:
#   JSD_b(T, S) = b KL(T || M) + (1 - b) KL(S || M),   M = b T + (1 - b) S.
# It vanishes at both ends of b, so the ends are its limits after dividing by b or by (1 - b):
#   b = 0: forward KL(T || S) (mass-covering),   b = 1: reverse KL(S || T) (mode-seeking).
# It is a sum over the vocabulary of terms d_v, each a function of S_v alone (T is fixed): with g_v = d d_v / d S_v,
#   g = -T / S for b = 0,   g = (1 - b) log(S / M) for 0 < b < 1,   g = log(S / T) + 1 for b = 1,
# the gradient with respect to the student logits s is S * (g - sum(S g)). A term clip min(d_v, c) keeps the terms
# at or below c and their g, and zeroes the others'.


def _jsd_terms(student_hidden, teacher_hidden, weight, beta, temperature, term_clip):
    student_logp = _chunk_logits(student_hidden, weight, temperature).log_softmax(-1)  # (C, V)
    teacher_logp = _chunk_logits(teacher_hidden, weight, temperature).log_softmax(-1)
    student_p, teacher_p = student_logp.exp(), teacher_logp.exp()
    if beta == 0:
        terms = teacher_p * (teacher_logp - student_logp)  # (C, V)
        g_times_p = -teacher_p  # S * (-T / S)
    elif beta == 1:
        terms = student_p * (student_logp - teacher_logp)
        g_times_p = terms + student_p
    else:
        mixture_logp = torch.logaddexp(teacher_logp + torch.log(torch.tensor(beta, dtype=teacher_logp.dtype)),
                                       student_logp + torch.log(torch.tensor(1 - beta, dtype=student_logp.dtype)))
        terms = (beta * teacher_p * (teacher_logp - mixture_logp)
                 + (1 - beta) * student_p * (student_logp - mixture_logp))
        g_times_p = (1 - beta) * student_p * (student_logp - mixture_logp)
    if term_clip > 0:
        g_times_p = g_times_p * (terms <= term_clip)
        terms = terms.clamp(max=term_clip)
    grad_student_logits = g_times_p - student_p * g_times_p.sum(-1, keepdim=True)  # (C, V) = S * (g - sum S g)
    return terms.sum(-1), grad_student_logits


@_maybe_compiled
def _jsd_forward_chunk(student_hidden, teacher_hidden, weight, beta, temperature, term_clip):
    return _jsd_terms(student_hidden, teacher_hidden, weight, beta, temperature, term_clip)[0]


@_maybe_compiled
def _jsd_backward_chunk(student_hidden, teacher_hidden, weight, grad_divergence, beta, temperature, term_clip):
    grad_logits = _jsd_terms(student_hidden, teacher_hidden, weight, beta, temperature, term_clip)[1]
    return (grad_divergence[:, None] * grad_logits / temperature).to(weight.dtype) @ weight  # (C, D)


class _GJSDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, weight, beta, temperature, term_clip, chunk_size):
        divergence = torch.empty(student_hidden.shape[0], device=student_hidden.device,
                                 dtype=torch.promote_types(student_hidden.dtype, torch.float32))
        for start, end in _chunks(student_hidden.shape[0], chunk_size):
            divergence[start:end] = _jsd_forward_chunk(_padded(student_hidden[start:end], chunk_size),
                                                       _padded(teacher_hidden[start:end], chunk_size),
                                                       weight, beta, temperature, term_clip)[:end - start]
        ctx.save_for_backward(student_hidden, teacher_hidden, weight)
        ctx.settings, ctx.chunk_size = (beta, temperature, term_clip), chunk_size
        return divergence

    @staticmethod
    def backward(ctx, grad_divergence):
        student_hidden, teacher_hidden, weight = ctx.saved_tensors
        grad_student = torch.empty_like(student_hidden)
        chunk_size = ctx.chunk_size
        for start, end in _chunks(student_hidden.shape[0], chunk_size):
            pad = lambda x: _padded(x, chunk_size)
            grad_student[start:end] = _jsd_backward_chunk(
                pad(student_hidden[start:end]), pad(teacher_hidden[start:end]), weight,
                pad(grad_divergence[start:end, None])[:, 0], *ctx.settings)[:end - start]
        return grad_student, None, None, None, None, None, None


def gjs_divergence(student_hidden, teacher_hidden, weight, *, beta=0.5, temperature=1.0, term_clip=0.0,
                   chunk_size=1024):
    """(N, D) student and teacher hidden states at the same response positions, weight (V, D) -> per-token
    JSD_beta(teacher, student) (N,) over the full vocabulary, each vocabulary entry's term clipped at term_clip if it
    is positive; the gradient reaches the student side only."""
    if not 0 <= beta <= 1:
        raise ValueError(f"beta_jsd must lie in [0, 1], got {beta}")
    return _GJSDivergence.apply(student_hidden, teacher_hidden.detach(), weight, float(beta), temperature,
                                float(term_clip), chunk_size)


# The PBSD preference loss. For a response y, s(y) = log pi_theta(y | x) - log pi_T(y | x, c), summed over
# its tokens (teacher term without gradient). A pair is a teacher sample y+ and a student sample y-:
#   m = beta (s(y+) - s(y-)),   L = -[z log sigmoid(m) + (1 - z) log sigmoid(-m)].
# Label "reward": z = sigmoid(r(y+) - r(y-)), whose minimiser is pi* = pi_T exp(r / beta) / Z, because there
# beta s(y) = r(y) - beta log Z, so m = r(y+) - r(y-) and sigmoid(m) = z for every pair.
# Label "teacher": z = 1, the teacher sample always wins; its stationary point is pi_T itself.


def pbsd_loss(student_logp_plus, teacher_logp_plus, student_logp_minus, teacher_logp_minus,
              reward_plus, reward_minus, *, beta, label="reward"):
    """Per-pair tensors (P,) of sequence log-prob sums and rewards -> (per-pair loss (P,), margin (P,), z (P,))."""
    score_plus = student_logp_plus - teacher_logp_plus.detach()
    score_minus = student_logp_minus - teacher_logp_minus.detach()
    margin = beta * (score_plus - score_minus)
    if label == "reward":
        z = torch.sigmoid(reward_plus - reward_minus)
    elif label == "teacher":
        z = torch.ones_like(margin)
    else:
        raise ValueError(f"pbsd label must be 'reward' or 'teacher', got {label!r}")
    loss = -(z * F.logsigmoid(margin) + (1 - z) * F.logsigmoid(-margin))
    return loss, margin.detach(), z

"""Distillation losses against a cached top-k teacher, and the evaluator's dense fidelity metric.

Shapes: N tokens (any leading dims are flattened into N), V vocabulary, K teacher top-k (1 <= K < V),
B = K + 1 buckets. Inputs may be bf16, fp16 or fp32; everything is computed in fp32 (fp64 for fp64
inputs, for gradcheck) on vocabulary slices and gathered values, never on an fp32 copy of (N, V).

The cached target, per response token, at temperature 1 (`topk_with_tail` is its one definition):

    topk_ids       int64 (N, K)  the teacher's K most likely token ids, most likely first
    topk_logprobs  fp32  (N, K)  log p_t(id_k) = z_t[id_k] - logsumexp(z_t)
    tail_logmass   fp32  (N,)    log(1 - sum_k p_t(id_k)): the mass of every other token, as one bucket

so each token's target is a distribution over B = K + 1 buckets.

`sparse_kd_loss`, per token, with student logits z and loss temperature T (not the sampling
temperature the transfer set was generated with). Fold first, then temper, both sides the same way:

    p1(b)  teacher buckets at T = 1: exp(l_b), l = the B stored log masses
    q1(b)  student buckets at T = 1: softmax(z) at the K ids, and its total mass on all other ids
    p, q   the buckets tempered: p(b) = p1(b)^(1/T) / sum_b' p1(b')^(1/T), q likewise from q1
    kl     forward_kl  KL(p || q) = sum_b p(b) (log p(b) - log q(b))   (a true KL, not cross-entropy)
           reverse_kl  KL(q || p)
           jsd         beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
           tv          total variation, 1/2 sum_b |p(b) - q(b)|
           cakld       gamma KL(q || p) + (1 - gamma) KL(p || q)   (BitDistiller's confidence-aware KL;
                       gamma: the teacher's mean probability of the response tokens, set by the trainer)
           dkd         a TCKD + b NCKD   (decoupled KD, Zhao et al. 2022), with t the label's bucket (its
                       top-k bucket, or the tail when the label is not among the top-k):
                       TCKD = KL([p(t), 1 - p(t)] || [q(t), 1 - q(t)]),
                       NCKD = KL(p(.|not t) || q(.|not t)) over the other buckets, renormalised.
                       forward_kl = TCKD + (1 - p(t)) NCKD: dkd frees the non-target weight.
    ce     -log softmax(z)[label], at T = 1 over the full vocabulary
    loss   alpha * ce + (1 - alpha) * T^2 * kl

Tempering is a bijection of bucket distributions, so every divergence is 0 exactly when p1 = q1, at every T. The
tail is one bucket on both sides, never tempered token by token: the cache does not hold its tokens.

`alpha` weights the CE (hard-label) term; 1 - alpha weights the distillation term.

Reduction: loss, ce and kl are each summed over the tokens where `mask` is True and divided by
`num_tokens` (default: this call's mask count, at least 1). For gradient accumulation, and across
ranks, pass the response-token count of the whole accumulated batch, so that the micro-batch losses
add up to the loss of one big batch.

`dense_kd_metrics` is the evaluator's fidelity metric: the exact full-vocabulary KL(teacher || student)
at T = 1 and top-1 agreement. The KL formula (`_kl`) is shared by both paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tv", "cakld", "dkd")

# Floor of the stored tail log mass: log(1e-30) = -69.08. A tail below 1e-30 changes a KL by less
# than 1e-28 nats, so the floor loses nothing, while a finite value keeps fp16 storage, sums and
# means over the cache free of -inf (and of the NaN in 0 * -inf). -69.08 is representable in fp16.
# `sparse_kd_loss` itself accepts -inf buckets (they contribute 0 to a KL taken under them).
TAIL_LOGMASS_FLOOR = math.log(1e-30)

# Vocabulary slice walked at a time by the full-vocab logsumexps.
DEFAULT_CHUNK_SIZE = 32768
# Elements of one fp32 tile (rows x vocabulary slice): 4M elements, 16 MiB. Small tiles keep the
# temporaries small and reused, whatever N is.
_TILE_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class KDTerms:
    """The reduced training loss and its parts, each a scalar tensor reduced the same way.

    `kl` is the divergence at the loss temperature without the T^2 factor; `loss` includes it.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


# --- Full-vocabulary passes in fp32 tiles --------------------------------------------------------


def _upcast(dtype: torch.dtype) -> torch.dtype:
    """The dtype the losses compute in: fp32, or fp64 for fp64 inputs (which gradcheck needs)."""
    return torch.promote_types(dtype, torch.float32)


def _row_blocks(n: int, chunk_size: int) -> list[slice]:
    """Row blocks of an (n, V) tensor such that one (rows, chunk_size) tile holds ~_TILE_ELEMENTS."""
    rows = max(1, _TILE_ELEMENTS // chunk_size)
    return [slice(r0, r0 + rows) for r0 in range(0, n, rows)]


def _col_slices(v: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(c0, min(c0 + chunk_size, v)) for c0 in range(0, v, chunk_size)]


def _upcast_tile(logits: torch.Tensor, rows: slice, c0: int, c1: int) -> torch.Tensor:
    """A fresh fp32 copy of logits[rows, c0:c1] (a copy even if logits is fp32: callers overwrite it)."""
    return logits[rows, c0:c1].to(_upcast(logits.dtype), copy=True)  # (n, C)


def _add_at_(x: torch.Tensor, ids: torch.Tensor, values: torch.Tensor | float, c0: int) -> None:
    """x[i, id - c0] += values[i, j] for every id = ids[i, j] inside the tile x = (n, C) of columns
    [c0, c0 + C); repeated ids add up. Ids outside the tile add 0 at a clamped column: one scatter_add,
    where boolean-mask indexing or index_put is many times slower on CPU for these small index sets."""
    local = ids - c0  # (n, J)
    inside = (local >= 0) & (local < x.shape[1])
    x.scatter_add_(1, local.clamp(0, x.shape[1] - 1), torch.where(inside, values, 0.0).to(x.dtype))


def _exclude_(x: torch.Tensor, ids: torch.Tensor, c0: int) -> None:
    """Set x[i, id - c0] = -inf for the ids of ids (n, J) inside the tile (adding -inf sets -inf)."""
    _add_at_(x, ids, float("-inf"), c0)


def _logsumexp_(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim, overwriting x (saves the temporary torch.logsumexp allocates)."""
    top = x.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)  # an all -inf row gives -inf, not NaN
    return x.sub_(top).exp_().sum(dim=-1).log_().add_(top.squeeze(-1))


def _logsumexp_except(logits: torch.Tensor, exclude_ids: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(N,) logsumexp of logits (N, V) over the ids not in exclude_ids (N, K).

    Computed directly over the remaining ids (not as log(1 - exp(...)) of the full logsumexp), so it
    keeps full relative precision however little mass those ids hold.
    """
    n, v = logits.shape
    out = torch.empty(n, dtype=_upcast(logits.dtype), device=logits.device)
    for rows in _row_blocks(n, chunk_size):
        parts = []  # one (n,) logsumexp per vocabulary slice
        for c0, c1 in _col_slices(v, chunk_size):
            x = _upcast_tile(logits, rows, c0, c1)  # (n, C)
            _exclude_(x, exclude_ids[rows], c0)
            parts.append(_logsumexp_(x))
        out[rows] = torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)
    return out


class _VocabPass(torch.autograd.Function):
    """Differentiable full-vocab statistics of logits (N, V), for any logits dtype:

        lse_all   (N,)    logsumexp over all ids
        lse_rest  (N,)    logsumexp over the ids not in exclude_ids (N, K)
        gathered  (N, G)  logits at gather_ids (N, G), in fp32

    exclude_ids must be distinct within a row. One walk over the vocabulary computes lse_rest; then
    lse_all = logaddexp(lse_rest, logsumexp(logits at exclude_ids)). Plain autograd would keep every
    fp32 tile for the backward (an fp32 copy of all of (N, V)) and give each gather its own zero-filled
    (N, V) gradient; this saves only the logits and the small results, recomputes each tile in the
    backward, and writes one gradient, in the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits, exclude_ids, gather_ids, chunk_size):
        wide = _upcast(logits.dtype)
        lse_rest = _logsumexp_except(logits, exclude_ids, chunk_size)  # (N,)
        z_excluded = logits.gather(1, exclude_ids).to(wide)  # (N, K)
        lse_all = torch.logaddexp(lse_rest, torch.logsumexp(z_excluded, dim=-1))
        gathered = logits.gather(1, gather_ids).to(wide)  # (N, G)
        ctx.save_for_backward(logits, exclude_ids, gather_ids, lse_all, lse_rest)
        ctx.chunk_size = chunk_size
        return lse_all, lse_rest, gathered

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_all, grad_rest, grad_gathered):
        # d lse_all / dz = exp(z - lse_all) at every id, d lse_rest / dz = exp(z - lse_rest) at the kept
        # ids (0 at excluded ones), d gathered / dz = 1 at each gathered id. At a kept id both lse terms
        # share exp(z - lse_rest):
        #     exp(z - lse_rest) * (grad_rest + grad_all * exp(lse_rest - lse_all)),
        # and exp(lse_rest - lse_all) <= 1 cannot overflow. The excluded and gathered ids get their
        # terms from the small (N, K) and (N, G) values, added into the tiles.
        logits, exclude_ids, gather_ids, lse_all, lse_rest = ctx.saved_tensors
        # A row whose kept ids are all -inf has lse_rest = -inf: shift by 0 so exp gives 0, not NaN.
        shift = torch.where(torch.isfinite(lse_rest), lse_rest, 0.0)  # (N,)
        coef = grad_rest + grad_all * torch.exp(lse_rest - lse_all)  # (N,)
        z_excluded = logits.gather(1, exclude_ids).to(lse_all.dtype)  # (N, K)
        ids = torch.cat([exclude_ids, gather_ids], dim=1)  # (N, K + G) sparse gradient terms
        excluded_terms = torch.exp(z_excluded - lse_all[:, None]) * grad_all[:, None]  # (N, K)
        values = torch.cat([excluded_terms, grad_gathered], dim=1)

        n, v = logits.shape
        grad = torch.empty_like(logits)
        for rows in _row_blocks(n, ctx.chunk_size):
            for c0, c1 in _col_slices(v, ctx.chunk_size):
                x = _upcast_tile(logits, rows, c0, c1)  # (n, C)
                _exclude_(x, exclude_ids[rows], c0)
                g = x.sub_(shift[rows, None]).exp_().mul_(coef[rows, None])
                _add_at_(g, ids[rows], values[rows], c0)
                grad[rows, c0:c1] = g
        return grad, None, None, None


# --- The cached target ----------------------------------------------------------------------------


@torch.no_grad()
def topk_with_tail(
    logits: torch.Tensor, k: int, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's cached target from its logits (..., V), at temperature 1.

    Returns topk_ids int64 (..., K), topk_logprobs fp32 (..., K) (most likely first) and
    tail_logmass fp32 (...) = log(1 - sum exp(topk_logprobs)), floored at TAIL_LOGMASS_FLOOR.
    (fp64 instead of fp32 for fp64 logits.) The caller chooses the storage dtype.

    The tail is computed as the logsumexp over the ids outside the top-k minus the full logsumexp,
    not as log(1 - sum): when the top-k hold nearly all the mass, 1 - sum cancels to rounding noise
    in fp32 (a true tail of 1e-9 reads as 0 or 1e-7), while the direct logsumexp keeps full relative
    precision. One walk over the vocabulary in fp32 tiles (no fp32 (N, V) copy) gives the tail's
    logsumexp; the full one adds the top-k values, taken in the input dtype and upcast exactly.
    """
    _check_chunk_size(chunk_size)
    if not logits.is_floating_point() or logits.dim() < 1:
        raise ValueError(
            "topk_with_tail: logits must be a floating tensor (..., V), "
            f"got {logits.dtype} {tuple(logits.shape)}"
        )
    vocab = logits.shape[-1]
    if not 1 <= k < vocab:
        raise ValueError(f"topk_with_tail: k must satisfy 1 <= k < V = {vocab}, got {k}")
    lead = logits.shape[:-1]
    z = logits.reshape(-1, vocab)  # (N, V)
    values, ids = torch.topk(z, k, dim=-1)  # (N, K), (N, K)
    lse_rest = _logsumexp_except(z, ids, chunk_size)  # (N,) over the ids outside the top-k
    values = values.to(lse_rest.dtype)
    lse = torch.logaddexp(lse_rest, torch.logsumexp(values, dim=-1))  # (N,) over all ids
    topk_logprobs = values - lse[:, None]  # (N, K)
    tail_logmass = (lse_rest - lse).clamp_min(TAIL_LOGMASS_FLOOR)  # (N,)
    return ids.reshape(*lead, k), topk_logprobs.reshape(*lead, k), tail_logmass.reshape(lead)


# --- Divergences over buckets (shared by the sparse loss and the dense metric) --------------------


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_b p(b) (log p(b) - log q(b)) over the last dim -> (...).

    Buckets with p(b) = 0 (log_p = -inf) contribute 0, with a zero gradient rather than NaN.
    """
    present = log_p > float("-inf")
    log_p = torch.where(present, log_p, 0.0)
    return torch.where(present, log_p.exp() * (log_p - log_q), 0.0).sum(-1)


@dataclass(frozen=True)
class DivergenceOptions:
    """The parameters of the divergences that have any (see the module docstring)."""

    jsd_beta: float = 0.5
    cakld_gamma: float = 0.5
    dkd_alpha: float = 1.0
    dkd_beta: float = 1.0


def _decoupled(log_p: torch.Tensor, log_q: torch.Tensor, target: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """DKD per token: a * TCKD + b * NCKD, `target` (N,) the label's bucket."""
    onehot = torch.zeros_like(log_p, dtype=torch.bool).scatter_(-1, target[:, None], True)

    def split(log_x):  # (binary [target, rest], non-target buckets renormalised)
        rest = log_x.masked_fill(onehot, float("-inf"))
        log_rest = torch.logsumexp(rest, dim=-1, keepdim=True)  # log(1 - x(t)), without cancellation
        return torch.cat([log_x.gather(-1, target[:, None]), log_rest], dim=-1), rest - log_rest

    (p_bin, p_rest), (q_bin, q_rest) = split(log_p), split(log_q)
    return a * _kl(p_bin, q_bin) + b * _kl(p_rest, q_rest)


def _divergence(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, options: DivergenceOptions,
                target: torch.Tensor) -> torch.Tensor:
    """Per-token divergence between teacher p and student q, given as log-probs (N, B) -> (N,);
    `target` (N,) is the label's bucket (dkd only)."""
    if divergence == "forward_kl":
        return _kl(log_p, log_q)
    if divergence == "reverse_kl":
        return _kl(log_q, log_p)
    if divergence == "tv":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if divergence == "cakld":
        return options.cakld_gamma * _kl(log_q, log_p) + (1.0 - options.cakld_gamma) * _kl(log_p, log_q)
    if divergence == "dkd":
        return _decoupled(log_p, log_q, target, options.dkd_alpha, options.dkd_beta)
    jsd_beta = options.jsd_beta
    # Generalized JSD as in TRL's GKDTrainer.generalized_jsd_loss (Agarwal et al. 2024, "On-Policy
    # Distillation of Language Models", eq. for D_JSD(beta)): m = beta p + (1 - beta) q. It tends to 0
    # at beta -> 0 and beta -> 1 (TRL maps those two to forward and reverse KL), so jsd takes 0 < beta < 1.
    log_m = torch.logaddexp(log_p + math.log(jsd_beta), log_q + math.log1p(-jsd_beta))
    return jsd_beta * _kl(log_p, log_m) + (1.0 - jsd_beta) * _kl(log_q, log_m)


def _temper(log_mass: torch.Tensor, temperature: float) -> torch.Tensor:
    """Buckets at temperature T from log masses (..., B) at T = 1: log_softmax(log_mass / T).

    The same map for teacher and student; it also renormalises, so masses that sum to 1 only up to
    rounding (fp16 storage) come out a distribution.
    """
    return torch.log_softmax(log_mass / temperature, dim=-1)


# --- Training loss --------------------------------------------------------------------------------


def sparse_kd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    mask: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    cakld_gamma: float = 0.5,
    dkd_alpha: float = 1.0,
    dkd_beta: float = 1.0,
    num_tokens: float | torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> KDTerms:
    """loss = alpha * ce + (1 - alpha) * T^2 * kl against the cached top-k + tail target.

    Args:
        student_logits: (N, V) or (..., V), bf16/fp16/fp32; only slices and gathered values are
            upcast to fp32. The gradient comes back in this dtype.
        labels: (N,) int, the next token (CE target). Ignored where mask is False (-100 is fine there).
        topk_ids, topk_logprobs, tail_logmass: (N, K), (N, K), (N,): the teacher target at T = 1, as
            written by `topk_with_tail` (int32 ids and fp16 logprobs from storage are fine; ids
            distinct within a row, as top-k gives). Ignored where mask is False, so padding may hold
            anything.
        mask: (N,) bool, True on response tokens.
        alpha: weight of the CE term, in [0, 1]; the divergence gets 1 - alpha.
        temperature: the loss temperature T > 0 (not the sampling temperature).
        divergence: one of DIVERGENCES (module docstring): "forward_kl" KL(p_t || q_s), "reverse_kl"
            KL(q_s || p_t), "jsd", "tv", "cakld" or "dkd".
        jsd_beta: the generalized JSD's beta, 0 < beta < 1 (see `_divergence`); used only by "jsd".
        cakld_gamma: the reverse-KL weight of "cakld", in [0, 1].
        dkd_alpha, dkd_beta: the TCKD and NCKD weights of "dkd", >= 0.
        num_tokens: the divisor: the response-token count of the whole accumulated batch (across
            ranks). Default: mask.sum() of this call. Clamped to at least 1.
        chunk_size: vocabulary slice for the full-vocab logsumexps.

    Buckets (see the module docstring): the student's at T = 1 are log q1(id_k) = z[id_k] - logsumexp(z)
    and log q1(tail) = logsumexp over the ids outside topk_ids of z, minus logsumexp(z), computed
    directly rather than as log(1 - sum q1(id_k)), which loses the tail to rounding when the top-k ids
    hold nearly all of the student's mass. Both sides are then tempered by the same map over the K + 1
    buckets, log p(b) = l_b / T - logsumexp_b'(l_b' / T). On the teacher's side it is applied at T = 1
    too, where it only absorbs storage rounding (e.g. fp16 logprobs), so the target is always a
    distribution and kl >= 0. The returned kl is the divergence between the tempered buckets, at T,
    without the T^2 factor.

    One walk over the vocabulary, at T = 1, serves the buckets and the CE.
    A call whose mask is all False returns zeros with zero (finite) gradients.
    """
    problems = _option_problems(alpha, temperature, divergence, jsd_beta, num_tokens, chunk_size)
    if not (isinstance(cakld_gamma, (int, float)) and 0.0 <= cakld_gamma <= 1.0):
        problems.append(f"cakld_gamma must be in [0, 1], got {cakld_gamma!r}")
    if not all(isinstance(w, (int, float)) and w >= 0 for w in (dkd_alpha, dkd_beta)):
        problems.append(f"dkd_alpha and dkd_beta must be >= 0, got {dkd_alpha!r}, {dkd_beta!r}")
    problems += _tensor_problems(student_logits, labels, topk_ids, topk_logprobs, tail_logmass, mask)
    if problems:
        raise ValueError("sparse_kd_loss: " + "; ".join(problems))
    vocab, k = student_logits.shape[-1], topk_ids.shape[-1]
    z = student_logits.reshape(-1, vocab)  # (N, V)
    mask = mask.reshape(-1)  # (N,)

    # Padding rows may hold anything (label -100, repeated ids, -inf or NaN logprobs): give them a
    # harmless target, so no inf or NaN reaches the sums or the gradient, then zero them out below.
    dummy_ids = torch.arange(k, device=z.device)
    ids = torch.where(mask[:, None], topk_ids.reshape(-1, k).long(), dummy_ids)  # (N, K)
    labels = torch.where(mask, labels.reshape(-1).long(), 0)  # (N,)
    wide = _upcast(z.dtype)  # fp32 (fp64 for fp64 logits)
    teacher = torch.cat([topk_logprobs.reshape(-1, k), tail_logmass.reshape(-1, 1)], dim=-1)  # (N, B)
    teacher = torch.where(mask[:, None], teacher.to(wide), 0.0)

    # One pass over the vocabulary: logsumexp(z) over all ids (N,) and over the non-top-k ids (N,),
    # and z at the top-k ids and the label (N, K + 1).
    gather_ids = torch.cat([ids, labels[:, None]], dim=1)  # (N, K + 1)
    lse, lse_rest, gathered = _VocabPass.apply(z, ids, gather_ids, chunk_size)
    z_topk, z_label = gathered[:, :k], gathered[:, k]  # (N, K), (N,)
    log_q = torch.cat([z_topk, lse_rest[:, None]], dim=-1) - lse[:, None]  # (N, B) student buckets at T = 1

    log_p = _temper(teacher, temperature)  # (N, B) teacher buckets at T
    if temperature != 1.0:
        # The student's T = 1 buckets are normalised by construction: at T = 1 the map would only
        # re-round them, so it is skipped there.
        log_q = _temper(log_q, temperature)  # (N, B) student buckets at T

    match = ids == labels[:, None]  # the label's bucket: its top-k bucket, else the tail (K)
    target = torch.where(match.any(-1), match.to(torch.int8).argmax(-1), k)  # (N,)
    options = DivergenceOptions(jsd_beta, cakld_gamma, dkd_alpha, dkd_beta)
    kl_tok = _divergence(log_p, log_q, divergence, options, target)  # (N,)
    ce_tok = lse - z_label  # (N,)

    if num_tokens is None:
        denom = mask.sum().clamp_min(1).to(wide)
    elif isinstance(num_tokens, torch.Tensor):
        denom = num_tokens.to(device=z.device, dtype=wide).clamp_min(1)
    else:
        denom = max(float(num_tokens), 1.0)
    ce = torch.where(mask, ce_tok, 0.0).sum() / denom
    kl = torch.where(mask, kl_tok, 0.0).sum() / denom
    loss = alpha * ce + (1.0 - alpha) * temperature**2 * kl
    return KDTerms(loss=loss, ce=ce, kl=kl)


# --- Evaluator's fidelity metric ------------------------------------------------------------------


@torch.no_grad()
def dense_kd_metrics(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    chunk_rows: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact full-vocab KL(teacher || student) at T = 1, and top-1 agreement, over masked tokens.

    Args: teacher_logits and student_logits (N, V) or (..., V), any float dtype; mask (N,) bool.
    Returns (kl_sum fp64 scalar, top1_agree int64 count, num_tokens int64 count), all sums over the
    tokens where mask is True, so the evaluator can add them up across batches and divide at the end
    (mean KL = kl_sum / num_tokens). Walks `chunk_rows` tokens at a time, skipping unmasked ones
    (peak: a few fp32 (chunk_rows, V) buffers, ~128 MiB each at V = 128k); no gradient.
    """
    if teacher_logits.shape != student_logits.shape or teacher_logits.dim() < 2:
        raise ValueError(
            f"dense_kd_metrics: teacher and student logits must have the same shape (..., V), "
            f"got {tuple(teacher_logits.shape)} and {tuple(student_logits.shape)}"
        )
    if mask.dtype != torch.bool or mask.shape != teacher_logits.shape[:-1]:
        raise ValueError(
            f"dense_kd_metrics: mask must be bool {tuple(teacher_logits.shape[:-1])}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    if chunk_rows < 1:
        raise ValueError(f"dense_kd_metrics: chunk_rows must be >= 1, got {chunk_rows}")
    vocab = teacher_logits.shape[-1]
    teacher = teacher_logits.reshape(-1, vocab)  # (N, V)
    student = student_logits.reshape(-1, vocab)  # (N, V)
    mask = mask.reshape(-1)
    kl_sum = torch.zeros((), dtype=torch.float64, device=teacher.device)
    top1_agree = torch.zeros((), dtype=torch.int64, device=teacher.device)
    for start in range(0, teacher.shape[0], chunk_rows):
        keep = mask[start : start + chunk_rows]
        t = teacher[start : start + chunk_rows][keep].to(_upcast(teacher.dtype))  # (n, V), masked rows only
        s = student[start : start + chunk_rows][keep].to(_upcast(student.dtype))  # (n, V)
        kl_tok = _kl(torch.log_softmax(t, -1), torch.log_softmax(s, -1))  # (n,)
        kl_sum += kl_tok.sum().double()
        top1_agree += (t.argmax(-1) == s.argmax(-1)).sum()
    return kl_sum, top1_agree, mask.sum()


# --- Argument checks -----------------------------------------------------------------------------


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")


def _option_problems(alpha, temperature, divergence, jsd_beta, num_tokens, chunk_size) -> list[str]:
    """Every problem with sparse_kd_loss's scalar options."""
    problems = []
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        problems.append(f"alpha (the CE weight) must be in [0, 1], got {alpha!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        problems.append(f"temperature must be a finite number > 0, got {temperature!r}")
    if divergence not in DIVERGENCES:
        problems.append(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    elif divergence == "jsd" and not (isinstance(jsd_beta, (int, float)) and 0.0 < jsd_beta < 1.0):
        problems.append(
            f"jsd_beta must be in (0, 1) for divergence 'jsd', got {jsd_beta!r} "
            "(the generalized JSD vanishes at 0 and 1: use 'forward_kl' or 'reverse_kl' instead)"
        )
    if isinstance(num_tokens, torch.Tensor):
        if num_tokens.numel() != 1:
            problems.append(f"num_tokens must be a scalar, got shape {tuple(num_tokens.shape)}")
    elif num_tokens is not None and not (isinstance(num_tokens, (int, float)) and num_tokens >= 0):
        problems.append(f"num_tokens must be a count >= 0, got {num_tokens!r}")
    try:
        _check_chunk_size(chunk_size)
    except ValueError as e:
        problems.append(str(e))
    return problems


def _tensor_problems(student_logits, labels, topk_ids, topk_logprobs, tail_logmass, mask) -> list[str]:
    """Every problem with sparse_kd_loss's tensors: shapes that disagree, wrong dtypes, K >= V."""
    problems = []
    if student_logits.dim() < 2 or not student_logits.is_floating_point():
        problems.append(
            "student_logits must be a floating tensor (N, V), "
            f"got {student_logits.dtype} {tuple(student_logits.shape)}"
        )
    else:
        lead, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
        k = topk_ids.shape[-1] if topk_ids.dim() >= 1 else 0
        expected = {
            "labels": (labels, lead),
            "topk_ids": (topk_ids, lead + (k,)),
            "topk_logprobs": (topk_logprobs, lead + (k,)),
            "tail_logmass": (tail_logmass, lead),
            "mask": (mask, lead),
        }
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                problems.append(
                    f"{name} must have shape {shape} to match student_logits "
                    f"{tuple(student_logits.shape)}, got {tuple(tensor.shape)}"
                )
        if not 1 <= k < vocab:
            problems.append(f"K (topk_ids' last dim) must satisfy 1 <= K < V = {vocab}, got {k}")
    if mask.dtype != torch.bool:
        problems.append(f"mask must be bool, got {mask.dtype}")
    for name, tensor in (("labels", labels), ("topk_ids", topk_ids)):
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            problems.append(f"{name} must be an integer tensor, got {tensor.dtype}")
    for name, tensor in (("topk_logprobs", topk_logprobs), ("tail_logmass", tail_logmass)):
        if not tensor.is_floating_point():
            problems.append(f"{name} must be a floating tensor, got {tensor.dtype}")
    return problems

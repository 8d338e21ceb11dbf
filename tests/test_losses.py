"""Tests for llmkd.losses: hand-computed values, dense references, edge cases, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmkd import losses
from llmkd.losses import (
    TAIL_LOGMASS_FLOOR,
    KDTerms,
    dense_kd_metrics,
    sparse_kd_loss,
    topk_with_tail,
)

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tv", "cakld", "dkd")
SMOOTH = ("forward_kl", "reverse_kl", "jsd", "cakld", "dkd")  # tv is not differentiable at its minimum
LN2, LN3 = math.log(2.0), math.log(3.0)


# --- Dense references, written independently of the module (float64, plain formulas) -------------


def fold(probs, ids):
    """Dense (N, V) probabilities -> (N, K + 1) buckets: the K ids, then everything else."""
    n, v = probs.shape
    k = ids.shape[1]
    bucket = torch.full((n, v), k).scatter(1, ids, torch.arange(k).expand(n, k))  # (N, V) bucket of each id
    return torch.zeros(n, k + 1, dtype=probs.dtype).scatter_add(1, bucket, probs)


def ref_kl(p, q):
    """KL(p || q) per row, for strictly positive distributions."""
    return (p * (p.log() - q.log())).sum(-1)


def temper(probs, t):
    """Bucket probabilities (N, B) at temperature t: probs^(1/t), renormalised."""
    powered = probs ** (1 / t)
    return powered / powered.sum(-1, keepdim=True)


def ref_divergence(p, q, divergence, beta=0.5, target=None, gamma=0.5, dkd=(1.0, 1.0)):
    """Per-row divergence between teacher p and student q; `target` (N,) the label's bucket (dkd)."""
    if divergence == "forward_kl":
        return ref_kl(p, q)
    if divergence == "reverse_kl":
        return ref_kl(q, p)
    if divergence == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    if divergence == "cakld":
        return gamma * ref_kl(q, p) + (1 - gamma) * ref_kl(p, q)
    if divergence == "dkd":
        pt, qt = p.gather(1, target[:, None]), q.gather(1, target[:, None])  # (N, 1)
        tckd = ref_kl(torch.cat([pt, 1 - pt], 1), torch.cat([qt, 1 - qt], 1))
        others = torch.ones_like(p, dtype=torch.bool).scatter(1, target[:, None], False)
        p_rest = p[others].view(len(p), -1) / (1 - pt)
        q_rest = q[others].view(len(q), -1) / (1 - qt)
        return dkd[0] * tckd + dkd[1] * ref_kl(p_rest, q_rest)
    m = beta * p + (1 - beta) * q
    return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)


def ref_terms(student, teacher, labels, mask, k, *, alpha, temperature, divergence, beta=0.5):
    """The loss computed densely: fold the full teacher and student distributions (at T = 1) onto
    K + 1 buckets, then temper both bucket distributions."""
    t = temperature
    ids = teacher.topk(k, dim=-1).indices
    p = temper(fold(teacher.double().softmax(-1), ids), t)  # teacher buckets at T
    q = temper(fold(student.double().softmax(-1), ids), t)  # student buckets at T
    in_topk = ids == labels.clamp_min(0)[:, None]
    target = torch.where(in_topk.any(1), in_topk.long().argmax(1), k)  # the label's bucket, else the tail
    kl_tok = ref_divergence(p, q, divergence, beta, target)
    ce_tok = F.cross_entropy(student.double(), labels.clamp_min(0), reduction="none")
    n = mask.sum().clamp_min(1)
    ce, kl = ce_tok[mask].sum() / n, kl_tok[mask].sum() / n
    return alpha * ce + (1 - alpha) * t**2 * kl, ce, kl


def all_tokens(n):
    return torch.ones(n, dtype=torch.bool)


# --- Hand-computed tiny case ----------------------------------------------------------------------
#
# V = 4, K = 2. Token 0 (a response token):
#   teacher p_t = [1/2, 1/4, 1/8, 1/8]  -> top-2 ids [0, 1], buckets p = [1/2, 1/4 | tail 1/4]
#   student p_s = [1/8, 1/8, 3/8, 3/8]  -> folded       q = [1/8, 1/8 | other 3/4]
#   forward KL(p||q) = 1/2 ln 4 + 1/4 ln 2 + 1/4 ln(1/3)    = 1.25 ln2 - 0.25 ln3   = 0.591781
#   reverse KL(q||p) = 1/8 ln(1/4) + 1/8 ln(1/2) + 3/4 ln 3  = -0.375 ln2 + 0.75 ln3 = 0.564029
#   jsd (beta 1/2):  m = [5/16, 3/16, 1/2]
#       KL(p||m) = 1/2 ln(8/5) + 1/4 ln(4/3) + 1/4 ln(1/2) = 0.133636
#       KL(q||m) = 1/8 ln(2/5) + 1/8 ln(2/3) + 3/4 ln(3/2) = 0.138879  -> jsd = 0.136257
#   CE with label 2 = -ln(3/8) = 0.980829
# Token 1 is padding (mask False) and holds garbage: label -100, repeated ids, NaN / -inf target.

HAND_KL = {
    "forward_kl": 1.25 * LN2 - 0.25 * LN3,
    "reverse_kl": -0.375 * LN2 + 0.75 * LN3,
    "jsd": 0.5 * (0.5 * math.log(8 / 5) + 0.25 * math.log(4 / 3) + 0.25 * math.log(1 / 2))
    + 0.5 * (0.125 * math.log(2 / 5) + 0.125 * math.log(2 / 3) + 0.75 * math.log(3 / 2)),
}
# tv = 1/2 (3/8 + 1/8 + 1/2) = 1/2; cakld (gamma 1/2) = the mean of forward and reverse KL;
# dkd (a = b = 1), the label 2 is in the tail bucket: p(t) = 1/4, q(t) = 3/4,
#   TCKD = KL([1/4, 3/4] || [3/4, 1/4]) = 1/2 ln3; NCKD = KL([2/3, 1/3] || [1/2, 1/2]) = 2/3 ln(4/3) + 1/3 ln(2/3)
#   and forward KL = TCKD + (1 - p(t)) NCKD, as decoupling says.
HAND_KL["tv"] = 0.5
HAND_KL["cakld"] = 0.5 * (HAND_KL["forward_kl"] + HAND_KL["reverse_kl"])
HAND_TCKD, HAND_NCKD = 0.5 * LN3, 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)
HAND_KL["dkd"] = HAND_TCKD + HAND_NCKD
HAND_CE = -math.log(3 / 8)


def test_decoupled_kd_recombines_into_forward_kl():
    assert HAND_TCKD + 0.75 * HAND_NCKD == pytest.approx(HAND_KL["forward_kl"], abs=1e-12)
    student, labels, target, mask = hand_case()
    terms = sparse_kd_loss(student, labels, *target, mask, alpha=0.0, temperature=1.0, divergence="dkd",
                           dkd_alpha=2.0, dkd_beta=0.5)
    assert terms.kl.item() == pytest.approx(2.0 * HAND_TCKD + 0.5 * HAND_NCKD, abs=1e-6)


def hand_case():
    """(student logits, labels, (ids, logprobs, tail), mask) of the tiny case above."""
    token_0 = torch.tensor([1 / 8, 1 / 8, 3 / 8, 3 / 8]).log()
    student = torch.stack([token_0, torch.tensor([0.3, -1.0, 2.0, 0.5])])
    labels = torch.tensor([2, -100])
    ids = torch.tensor([[0, 1], [0, 0]])
    logprobs = torch.tensor([[math.log(1 / 2), math.log(1 / 4)], [float("nan"), float("-inf")]])
    tail = torch.tensor([math.log(1 / 4), float("-inf")])
    return student, labels, (ids, logprobs, tail), torch.tensor([True, False])


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_hand_computed_values(divergence):
    student, labels, target, mask = hand_case()
    terms = sparse_kd_loss(student, labels, *target, mask, alpha=0.25, temperature=1.0, divergence=divergence)
    assert isinstance(terms, KDTerms)
    assert terms.kl.item() == pytest.approx(HAND_KL[divergence], abs=1e-6)
    assert terms.ce.item() == pytest.approx(HAND_CE, abs=1e-6)
    # loss = alpha * ce + (1 - alpha) * kl; e.g. forward: 0.25 * 0.980829 + 0.75 * 0.591781 = 0.689043
    assert terms.loss.item() == pytest.approx(0.25 * HAND_CE + 0.75 * HAND_KL[divergence], abs=1e-6)


def test_hand_computed_temperature_two():
    # T = 2: fold at T = 1, then temper both bucket distributions (square roots, renormalised).
    #   teacher [1/2, 1/4, 1/4] -> [1/sqrt2, 1/2, 1/2] / (1/sqrt2 + 1) = [sqrt2 - 1, 1 - 1/sqrt2, 1 - 1/sqrt2]
    #                                                               = [0.414214, 0.292893, 0.292893]
    #   student [1/8, 1/8, 3/4] -> [1/sqrt8, 1/sqrt8, sqrt3/2] / (1/sqrt2 + sqrt3/2)
    #                            = [(sqrt6 - 2)/2, (sqrt6 - 2)/2, 3 - sqrt6] = [0.224745, 0.224745, 0.550510]
    # KL = 0.146001; CE stays at T = 1: 0.980829; loss = 0.25 * 0.980829 + 0.75 * 2^2 * 0.146001 = 0.683209
    s2, s6 = math.sqrt(2), math.sqrt(6)
    p = [s2 - 1, 1 - 1 / s2, 1 - 1 / s2]
    q = [(s6 - 2) / 2, (s6 - 2) / 2, 3 - s6]
    kl = sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))
    assert kl == pytest.approx(0.146001, abs=1e-6)
    student, labels, target, mask = hand_case()
    terms = sparse_kd_loss(student, labels, *target, mask, alpha=0.25, temperature=2.0)
    assert terms.kl.item() == pytest.approx(kl, abs=1e-6)
    assert terms.ce.item() == pytest.approx(HAND_CE, abs=1e-6)
    assert terms.loss.item() == pytest.approx(0.25 * HAND_CE + 0.75 * 4 * kl, abs=1e-6)
    assert terms.loss.item() == pytest.approx(0.683209, abs=1e-6)


# --- Zero divergence and agreement with dense computations ---------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_identical_distributions_give_zero_kl(divergence):
    torch.manual_seed(0)
    logits = torch.randn(6, 20) * 3
    target = topk_with_tail(logits, 5)
    labels = target[0][:, 0]
    terms = sparse_kd_loss(
        logits, labels, *target, all_tokens(6), alpha=0.0, temperature=1.0, divergence=divergence
    )
    assert abs(terms.kl.item()) < 1e-6
    assert abs(terms.loss.item()) < 1e-6


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_student_equal_to_teacher_gives_zero_divergence_and_gradient(divergence, temperature):
    # (tv: the value is 0 there, but |x| has no gradient at 0: rounding picks a subgradient.)
    # K << V: the tail bucket holds most of the vocabulary (and real mass). Tempering it as one bucket
    # on the teacher's side but token by token on the student's gave an exact copy a KL of ~1 at T = 2.
    torch.manual_seed(21)
    n, v, k = 8, 2000, 16
    logits = torch.randn(n, v) * 3
    target = topk_with_tail(logits, k)
    assert (target[2].exp() > 0.05).all()  # the tail matters
    student = logits.clone().requires_grad_()
    options = dict(alpha=0.0, temperature=temperature, divergence=divergence)
    terms = sparse_kd_loss(student, target[0][:, 0], *target, all_tokens(n), **options)
    assert abs(terms.kl.item()) < 1e-6
    assert abs(terms.loss.item()) < 1e-6
    if divergence in SMOOTH:
        (grad,) = torch.autograd.grad(terms.loss, student)
        assert grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_zero_divergence_when_only_the_tail_tokens_differ(divergence, temperature):
    # Shuffling the student's logits among the ids outside the teacher's top-k leaves its folded
    # distribution unchanged, so the divergence is 0 at every T, though the full distributions differ.
    torch.manual_seed(22)
    n, v, k = 5, 300, 8
    teacher = torch.randn(n, v) * 2
    target = topk_with_tail(teacher, k)
    student = teacher.clone()
    for row, ids in zip(student, target[0], strict=True):
        rest = torch.ones(v, dtype=torch.bool).scatter(0, ids, False).nonzero().squeeze(1)
        row[rest] = row[rest[torch.randperm(rest.numel())]]
    assert not torch.equal(student, teacher)
    options = dict(alpha=0.0, temperature=temperature, divergence=divergence)
    terms = sparse_kd_loss(student, target[0][:, 0], *target, all_tokens(n), **options)
    assert abs(terms.kl.item()) < 1e-6
    kl_sum, _, _ = dense_kd_metrics(teacher, student, all_tokens(n))
    assert kl_sum.item() > 0.1  # the full-vocabulary distributions do differ


def test_sparse_forward_kl_equals_dense_kl_when_k_is_v_minus_1():
    torch.manual_seed(2)
    teacher, student = torch.randn(9, 7) * 2, torch.randn(9, 7) * 2
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    target = topk_with_tail(teacher, 6)
    terms = sparse_kd_loss(student, target[0][:, 0], *target, mask, alpha=0.0, temperature=1.0)
    dense = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none")
    assert terms.kl.item() == pytest.approx(dense.sum(-1)[mask].mean().item(), abs=1e-5)
    kl_sum, _, n = dense_kd_metrics(teacher, student, mask)
    assert terms.kl.item() == pytest.approx(kl_sum.item() / n.item(), abs=1e-5)


def test_sparse_forward_kl_equals_dense_kl_when_teacher_mass_is_inside_topk():
    # The teacher gives probability 0 to all but 3 of 10 tokens: the tail is empty (floored), the
    # student's "other" bucket gets weight 0, and the sparse KL is the full KL.
    torch.manual_seed(3)
    teacher = torch.full((5, 10), float("-inf"))
    support = torch.rand(5, 10).argsort(-1)[:, :3]
    teacher.scatter_(1, support, torch.randn(5, 3))
    student = torch.randn(5, 10) * 2
    target = topk_with_tail(teacher, 3)
    assert torch.equal(target[2], torch.full((5,), TAIL_LOGMASS_FLOOR))
    terms = sparse_kd_loss(student, target[0][:, 0], *target, all_tokens(5), alpha=0.0, temperature=1.0)
    p = teacher.softmax(-1)
    dense = (torch.special.xlogy(p, p) - p * student.log_softmax(-1)).sum(-1)  # 0 log 0 = 0
    assert terms.kl.item() == pytest.approx(dense.mean().item(), abs=1e-5)
    kl_sum, _, n = dense_kd_metrics(teacher, student, all_tokens(5))
    assert terms.kl.item() == pytest.approx(kl_sum.item() / n.item(), abs=1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.5])
def test_matches_dense_folded_reference(divergence, temperature):
    torch.manual_seed(4)
    n, v, k = 7, 13, 4
    teacher, student = torch.randn(n, v) * 2, torch.randn(n, v) * 2
    labels = torch.randint(0, v, (n,))
    mask = torch.tensor([1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    labels[~mask] = -100
    options = dict(alpha=0.3, temperature=temperature, divergence=divergence)
    terms = sparse_kd_loss(
        student, labels, *topk_with_tail(teacher, k), mask, jsd_beta=0.3, chunk_size=5, **options
    )
    loss, ce, kl = ref_terms(student, teacher, labels, mask, k, beta=0.3, **options)
    assert terms.kl.item() == pytest.approx(kl.item(), abs=1e-5)
    assert terms.ce.item() == pytest.approx(ce.item(), abs=1e-5)
    assert terms.loss.item() == pytest.approx(loss.item(), abs=1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_dense_folded_reference_with_k_much_smaller_than_v(divergence, temperature):
    torch.manual_seed(23)
    n, v, k = 6, 2000, 16
    teacher = torch.randn(n, v) * 3
    student = teacher + torch.randn(n, v)
    labels = torch.randint(0, v, (n,))
    mask = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)
    options = dict(alpha=0.3, temperature=temperature, divergence=divergence)
    ours = student.clone().requires_grad_()
    terms = sparse_kd_loss(ours, labels, *topk_with_tail(teacher, k), mask, chunk_size=512, **options)
    ref = student.double().requires_grad_()
    loss, ce, kl = ref_terms(ref, teacher, labels, mask, k, **options)
    assert kl.item() > 0.01
    assert terms.kl.item() == pytest.approx(kl.item(), rel=1e-5, abs=1e-6)
    assert terms.ce.item() == pytest.approx(ce.item(), rel=1e-5, abs=1e-6)
    assert terms.loss.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
    terms.loss.backward()
    loss.backward()
    torch.testing.assert_close(ours.grad.double(), ref.grad, atol=1e-7, rtol=1e-4)


def test_sparse_kl_is_a_lower_bound_of_the_dense_kl():
    # Folding onto buckets can only lose information (data-processing inequality): at T = 1 the
    # sparse forward KL is <= the full-vocab KL, strictly here since the tail holds real mass.
    torch.manual_seed(5)
    teacher, student = torch.randn(8, 30), torch.randn(8, 30)
    target = topk_with_tail(teacher, 4)
    sparse = sparse_kd_loss(student, target[0][:, 0], *target, all_tokens(8), alpha=0.0, temperature=1.0)
    kl_sum, _, n = dense_kd_metrics(teacher, student, all_tokens(8))
    assert sparse.kl.item() < kl_sum.item() / n.item() - 1e-3


# --- CE, temperature, reduction -------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_ce_matches_torch_cross_entropy_at_any_loss_temperature(temperature):
    torch.manual_seed(6)
    student, teacher = torch.randn(10, 17), torch.randn(10, 17)
    labels = torch.randint(0, 17, (10,))
    mask = torch.rand(10) > 0.3
    labels[~mask] = -100
    target = topk_with_tail(teacher, 3)
    terms = sparse_kd_loss(student, labels, *target, mask, alpha=1.0, temperature=temperature, chunk_size=4)
    expected = F.cross_entropy(student, labels, ignore_index=-100)
    assert terms.ce.item() == pytest.approx(expected.item(), abs=1e-5)
    assert terms.loss.item() == pytest.approx(expected.item(), abs=1e-5)  # alpha = 1: CE only


@pytest.mark.parametrize("temperature", [0.7, 2.0, 4.0])
def test_loss_scales_the_kl_by_t_squared(temperature):
    torch.manual_seed(7)
    student, teacher = torch.randn(6, 12), torch.randn(6, 12) * 2
    target = topk_with_tail(teacher, 3)
    labels = target[0][:, 1]
    terms = sparse_kd_loss(student, labels, *target, all_tokens(6), alpha=0.0, temperature=temperature)
    assert terms.loss.item() == pytest.approx(temperature**2 * terms.kl.item(), rel=1e-6)
    at_one = sparse_kd_loss(student, labels, *target, all_tokens(6), alpha=0.0, temperature=1.0)
    assert terms.kl.item() != pytest.approx(at_one.kl.item(), rel=1e-3)  # the temperature is applied


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_all_masked_gives_zero_and_finite_zero_grads(divergence):
    student = torch.randn(3, 8, requires_grad=True)
    labels = torch.full((3,), -100)
    ids = torch.zeros(3, 2, dtype=torch.long)  # repeated ids, as padding might hold
    logprobs = torch.full((3, 2), float("nan"))
    tail = torch.full((3,), float("-inf"))
    mask = torch.zeros(3, dtype=torch.bool)
    options = dict(alpha=0.5, temperature=2.0, divergence=divergence)
    for num_tokens in (None, 0):
        terms = sparse_kd_loss(student, labels, ids, logprobs, tail, mask, num_tokens=num_tokens, **options)
        for value in (terms.loss, terms.ce, terms.kl):
            assert value.item() == 0.0
        (grad,) = torch.autograd.grad(terms.loss, student)
        assert torch.isfinite(grad).all() and not grad.any()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_padding_rows_change_nothing(divergence):
    torch.manual_seed(8)
    student, teacher = torch.randn(4, 9), torch.randn(4, 9)
    labels = torch.randint(0, 9, (4,))
    ids, logprobs, tail = topk_with_tail(teacher, 3)
    # Two padding rows of garbage appended.
    padded = torch.cat([student, torch.randn(2, 9) * 50]).requires_grad_()
    padded_labels = torch.cat([labels, torch.tensor([-100, -100])])
    padded_target = (
        torch.cat([ids, torch.tensor([[0, 0, 0], [-1, -1, -1]])]),  # repeated, out of range
        torch.cat([logprobs, torch.tensor([[float("nan")] * 3, [float("-inf")] * 3])]),
        torch.cat([tail, torch.tensor([float("nan"), 0.0])]),
    )
    padded_mask = torch.cat([all_tokens(4), torch.tensor([False, False])])
    options = dict(alpha=0.4, temperature=1.5, divergence=divergence)

    plain = student.clone().requires_grad_()
    a = sparse_kd_loss(plain, labels, ids, logprobs, tail, all_tokens(4), **options)
    b = sparse_kd_loss(padded, padded_labels, *padded_target, padded_mask, **options)
    assert b.loss.item() == pytest.approx(a.loss.item(), abs=1e-6)
    (grad_a,) = torch.autograd.grad(a.loss, plain)
    (grad_b,) = torch.autograd.grad(b.loss, padded)
    torch.testing.assert_close(grad_b[:4], grad_a)
    assert not grad_b[4:].any()


@pytest.mark.parametrize("as_tensor", [False, True])
def test_micro_batches_normalised_by_the_total_add_up_to_one_big_batch(as_tensor):
    # Gradient accumulation: each micro-batch divides by the response-token count of the whole
    # accumulated batch, so the micro-batch losses (and grads) sum to the big batch's.
    torch.manual_seed(9)
    n, v = 10, 15
    student, teacher = torch.randn(n, v), torch.randn(n, v)
    labels = torch.randint(0, v, (n,))
    mask = torch.tensor([1, 1, 1, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool)  # 5 + 2 real tokens
    ids, logprobs, tail = topk_with_tail(teacher, 4)
    options = dict(alpha=0.2, temperature=2.0, divergence="forward_kl")

    def loss(z, rows, num_tokens=None):
        part = (labels[rows], ids[rows], logprobs[rows], tail[rows], mask[rows])
        return sparse_kd_loss(z[rows], *part, num_tokens=num_tokens, **options).loss

    micro_batches = (slice(0, 6), slice(6, 10))
    big = student.clone().requires_grad_()
    whole = loss(big, slice(None))
    whole.backward()

    total = mask.sum() if as_tensor else int(mask.sum())
    micro = student.clone().requires_grad_()
    summed = 0.0
    for rows in micro_batches:
        part = loss(micro, rows, num_tokens=total)
        part.backward()
        summed += part.item()
    assert summed == pytest.approx(whole.item(), abs=1e-6)
    torch.testing.assert_close(micro.grad, big.grad)
    # Without num_tokens each micro-batch averages over its own tokens: a different (wrong) total.
    own = sum(loss(student, rows).item() for rows in micro_batches)
    assert own != pytest.approx(whole.item(), abs=1e-3)


# --- Numerics -------------------------------------------------------------------------------------


def test_student_tail_is_accurate_when_topk_ids_hold_nearly_all_its_mass():
    # The student puts 1 - 5.6e-11 on token 0, the teacher's top-1; its "other" bucket is
    # 4 e^0 / (e^25 + 4) = 5.6e-11, log = -23.61. log(1 - sum q(topk)) in fp32 would give log(0) = -inf
    # (an infinite KL); the direct logsumexp over the other ids keeps it.
    student = torch.tensor([[25.0, 0.0, 0.0, 0.0, 0.0]])
    target = (torch.tensor([[0]]), torch.tensor([[math.log(0.9)]]), torch.tensor([math.log(0.1)]))
    terms = sparse_kd_loss(student, torch.tensor([0]), *target, all_tokens(1), alpha=0.0, temperature=1.0)
    log_other = math.log(4.0) - 25.0 - math.log1p(4.0 * math.exp(-25.0))
    log_top = -math.log1p(4.0 * math.exp(-25.0))
    expected = 0.9 * (math.log(0.9) - log_top) + 0.1 * (math.log(0.1) - log_other)  # = 2.132
    assert terms.kl.item() == pytest.approx(expected, rel=1e-5)


def test_student_with_no_mass_outside_the_teacher_ids_gives_finite_reverse_kl_and_grads():
    # The student's logits are -inf outside the teacher's top-3 ids (as with a masked vocabulary):
    # its "other" bucket is empty, log q = -inf. Reverse KL weighs buckets by q, so it stays finite,
    # and so must the gradient (no exp(-inf - -inf) = NaN in the backward).
    torch.manual_seed(20)
    teacher = torch.randn(4, 9)
    target = topk_with_tail(teacher, 3)
    student = torch.full((4, 9), float("-inf")).scatter(1, target[0], torch.randn(4, 3)).requires_grad_()
    terms = sparse_kd_loss(
        student, target[0][:, 0], *target, all_tokens(4), alpha=0.5, temperature=1.0, divergence="reverse_kl"
    )
    p = fold(teacher.double().softmax(-1), target[0])
    q = fold(student.detach().double().softmax(-1), target[0])[:, :3]  # no "other" bucket
    expected = (q * (q.log() - p[:, :3].log())).sum(-1).mean()
    assert terms.kl.item() == pytest.approx(expected.item(), abs=1e-5)
    terms.loss.backward()
    assert torch.isfinite(student.grad).all()


def test_bf16_student_logits_and_fp16_int32_cache():
    torch.manual_seed(10)
    student = (torch.randn(8, 40) * 3).bfloat16()
    teacher = torch.randn(8, 40) * 3
    labels = torch.randint(0, 40, (8,))
    ids, logprobs, tail = topk_with_tail(teacher, 6)
    stored = (ids.int(), logprobs.half(), tail.half())  # as the transfer set stores them
    low = student.clone().requires_grad_()
    high = student.float().requires_grad_()  # the same values in fp32
    options = dict(alpha=0.5, temperature=2.0, chunk_size=7)
    a = sparse_kd_loss(low, labels, *stored, all_tokens(8), **options)
    b = sparse_kd_loss(high, labels, *stored, all_tokens(8), **options)
    assert a.loss.dtype == torch.float32
    assert a.loss.item() == pytest.approx(b.loss.item(), abs=1e-5)
    a.loss.backward()
    b.loss.backward()
    assert low.grad.dtype == torch.bfloat16
    torch.testing.assert_close(low.grad.float(), high.grad, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_gradcheck(divergence, temperature):
    torch.manual_seed(11)
    student = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    target = topk_with_tail(torch.randn(4, 7) * 2, 3)
    labels = torch.tensor([1, 5, -100, 0])
    mask = torch.tensor([True, True, False, True])
    options = dict(alpha=0.3, temperature=temperature, divergence=divergence, chunk_size=3)
    assert torch.autograd.gradcheck(
        lambda z: sparse_kd_loss(z, labels, *target, mask, **options).loss, (student,)
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradient_matches_dense_reference(divergence):
    torch.manual_seed(12)
    student, teacher = torch.randn(6, 11, dtype=torch.float64), torch.randn(6, 11, dtype=torch.float64) * 2
    labels = torch.randint(0, 11, (6,))
    mask = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)
    options = dict(alpha=0.3, temperature=2.0, divergence=divergence)
    ours = student.clone().requires_grad_()
    sparse_kd_loss(ours, labels, *topk_with_tail(teacher, 4), mask, chunk_size=4, **options).loss.backward()
    ref = student.clone().requires_grad_()
    ref_terms(ref, teacher, labels, mask, 4, **options)[0].backward()
    torch.testing.assert_close(ours.grad, ref.grad, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_row_blocks_give_the_same_results(monkeypatch, divergence):
    # Tiles hold at most _TILE_ELEMENTS elements: shrink it so 3-column slices come in 2-row blocks
    # (N = 7 leaves a 1-row block), and compare with one tile covering everything.
    torch.manual_seed(19)
    student, teacher = torch.randn(7, 10), torch.randn(7, 10)
    labels = torch.randint(0, 10, (7,))
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)

    def run():
        target = topk_with_tail(teacher, 3, chunk_size=3)
        z = student.clone().requires_grad_()
        options = dict(alpha=0.4, temperature=1.5, divergence=divergence, chunk_size=3)
        terms = sparse_kd_loss(z, labels, *target, mask, **options)
        terms.loss.backward()
        return (*target, terms.loss, z.grad)

    whole = run()
    monkeypatch.setattr(losses, "_TILE_ELEMENTS", 6)  # 2 rows x 3 columns
    assert max(1, losses._TILE_ELEMENTS // 3) == 2
    for a, b in zip(run(), whole, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_chunk_size_changes_nothing(divergence):
    # Vocabulary slices of any width (1 column, uneven, one slice, wider than V) give the same loss
    # and gradient; bf16 logits with -inf entries (a masked vocabulary) stay finite.
    torch.manual_seed(13)
    student = (torch.randn(5, 50) * 5).bfloat16()
    student[0, 5] = float("-inf")
    student[1, :40] = float("-inf")
    teacher = torch.randn(5, 50) * 3
    teacher[:, 40:] += 20  # the teacher's top-k, and so the labels, among the ids the student keeps
    target = topk_with_tail(teacher, 4)
    labels = target[0][:, 0]
    options = dict(alpha=0.4, temperature=2.0, divergence=divergence)
    results = []
    for chunk_size in (1, 3, 7, 16, 50, 64):
        z = student.clone().requires_grad_()
        terms = sparse_kd_loss(z, labels, *target, all_tokens(5), chunk_size=chunk_size, **options)
        terms.loss.backward()
        assert torch.isfinite(terms.loss) and torch.isfinite(z.grad).all()
        results.append((terms.loss, z.grad.float()))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(grad, results[0][1], atol=1e-3, rtol=1e-2)


# --- topk_with_tail -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_with_tail_is_a_distribution_and_matches_torch_topk(dtype):
    torch.manual_seed(15)
    logits = (torch.randn(2, 3, 37) * 3).to(dtype)
    ids, logprobs, tail = topk_with_tail(logits, 5, chunk_size=10)
    assert ids.shape == (2, 3, 5) and logprobs.shape == (2, 3, 5) and tail.shape == (2, 3)
    assert ids.dtype == torch.int64 and logprobs.dtype == torch.float32 and tail.dtype == torch.float32
    assert torch.equal(ids, torch.topk(logits, 5, dim=-1).indices)
    torch.testing.assert_close(logprobs, logits.float().log_softmax(-1).gather(-1, ids))
    torch.testing.assert_close(logprobs.exp().sum(-1) + tail.exp(), torch.ones(2, 3))
    assert (logprobs[..., :-1] >= logprobs[..., 1:]).all()  # most likely first


def test_topk_with_tail_keeps_a_tiny_tail_accurately():
    # logits [30, 0, 0], k = 1: tail = log(2 / (e^30 + 2)) = ln2 - 30 - log1p(2 e^-30) = -29.306853.
    # log(1 - exp(top logprob)) in fp32 gives log(1 - 1) = -inf here.
    ids, logprobs, tail = topk_with_tail(torch.tensor([[30.0, 0.0, 0.0]]), 1)
    assert ids.tolist() == [[0]]
    expected = LN2 - 30.0 - math.log1p(2 * math.exp(-30.0))
    assert tail.item() == pytest.approx(expected, abs=1e-5)
    naive = torch.log1p(-logprobs.exp().sum(-1))
    assert not torch.isfinite(naive).all()  # why the direct route is needed


def test_topk_with_tail_floors_an_empty_tail():
    logits = torch.tensor([[1.0, 2.0, float("-inf"), float("-inf")]])
    _, logprobs, tail = topk_with_tail(logits, 2)
    assert tail.item() == pytest.approx(TAIL_LOGMASS_FLOOR) and math.isfinite(tail.item())
    assert logprobs.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


# --- dense_kd_metrics -----------------------------------------------------------------------------


def test_dense_kd_metrics_matches_direct_computation():
    torch.manual_seed(16)
    teacher, student = torch.randn(37, 23) * 2, torch.randn(37, 23) * 2
    student[:5] = teacher[:5] + 0.01  # a few certain agreements
    mask = torch.rand(37) > 0.25
    kl_sum, agree, n = dense_kd_metrics(teacher.bfloat16(), student.bfloat16(), mask, chunk_rows=8)
    t, s = teacher.bfloat16().double(), student.bfloat16().double()
    kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert kl_sum.dtype == torch.float64
    assert kl_sum.item() == pytest.approx(kl[mask].sum().item(), rel=1e-5)
    assert agree.item() == int(((t.argmax(-1) == s.argmax(-1)) & mask).sum())
    assert n.item() == int(mask.sum())
    # Leading dims are flattened: (B, T, V) gives the same sums.
    flat = dense_kd_metrics(teacher, student, mask, chunk_rows=5)
    batched = dense_kd_metrics(teacher.view(1, 37, 23), student.view(1, 37, 23), mask.view(1, 37))
    assert batched[0].item() == pytest.approx(flat[0].item(), rel=1e-6)
    assert batched[1:] == flat[1:]


def test_dense_kd_metrics_all_masked():
    kl_sum, agree, n = dense_kd_metrics(
        torch.randn(3, 5), torch.randn(3, 5), torch.zeros(3, dtype=torch.bool)
    )
    assert kl_sum.item() == 0.0 and agree.item() == 0 and n.item() == 0


# --- Shapes and argument checks -------------------------------------------------------------------


def test_leading_dims_are_flattened():
    torch.manual_seed(17)
    student, teacher = torch.randn(2, 5, 12), torch.randn(2, 5, 12)
    labels = torch.randint(0, 12, (2, 5))
    mask = torch.rand(2, 5) > 0.3
    ids, logprobs, tail = topk_with_tail(teacher, 3)
    options = dict(alpha=0.5, temperature=2.0)
    a = sparse_kd_loss(student, labels, ids, logprobs, tail, mask, **options)
    flat = (student.view(10, 12), labels.view(10), ids.view(10, 3), logprobs.view(10, 3), tail.view(10))
    b = sparse_kd_loss(*flat, mask.view(10), **options)
    assert a.loss.item() == pytest.approx(b.loss.item(), abs=1e-7)


def _valid_call():
    torch.manual_seed(18)
    ids, logprobs, tail = topk_with_tail(torch.randn(4, 10), 3)
    tensors = dict(
        student_logits=torch.randn(4, 10),
        labels=torch.randint(0, 10, (4,)),
        topk_ids=ids,
        topk_logprobs=logprobs,
        tail_logmass=tail,
        mask=all_tokens(4),
    )
    return tensors, dict(alpha=0.5, temperature=1.0)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"divergence": "kl"}, "divergence"),
        ({"divergence": "jsd", "jsd_beta": 0.0}, "jsd_beta"),
        ({"divergence": "jsd", "jsd_beta": 1.0}, "jsd_beta"),
        ({"num_tokens": -3}, "num_tokens"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"labels": torch.zeros(5, dtype=torch.long)}, "labels must have shape"),
        ({"mask": torch.ones(4)}, "mask must be bool"),
        ({"topk_logprobs": torch.zeros(4, 2)}, "topk_logprobs must have shape"),
        ({"tail_logmass": torch.zeros(4, 1)}, "tail_logmass must have shape"),
        ({"topk_ids": torch.zeros(4, 3)}, "topk_ids must be an integer"),
        ({"topk_ids": torch.zeros(4, 10, dtype=torch.long), "topk_logprobs": torch.zeros(4, 10)}, "K"),
        ({"student_logits": torch.randn(10)}, "student_logits"),
    ],
)
def test_invalid_arguments_raise_value_error(change, message):
    tensors, options = _valid_call()
    sparse_kd_loss(**tensors, **options)  # the unchanged call is valid
    for key, value in change.items():
        (tensors if key in tensors else options)[key] = value
    with pytest.raises(ValueError, match=message):
        sparse_kd_loss(**tensors, **options)


def test_other_functions_validate_arguments():
    with pytest.raises(ValueError, match="k must satisfy"):
        topk_with_tail(torch.randn(2, 5), 5)
    with pytest.raises(ValueError, match="k must satisfy"):
        topk_with_tail(torch.randn(2, 5), 0)
    with pytest.raises(ValueError, match="chunk_size"):
        topk_with_tail(torch.randn(2, 5), 2, chunk_size=0)
    with pytest.raises(ValueError, match="same shape"):
        dense_kd_metrics(torch.randn(2, 5), torch.randn(2, 6), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        dense_kd_metrics(torch.randn(2, 5), torch.randn(2, 5), torch.ones(2))

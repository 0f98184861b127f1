"""Distillation losses against hand computations on fixed logits and attention maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedkdlora_app.losses import (
    UNLABELLED,
    attention_layer_map,
    attention_mse,
    client_kd_loss,
    kl,
    labelled_cross_entropy,
    mutual_kd_loss,
    original_mutual_kd_loss,
)
from fedkdlora_app.models import ModelError

STUDENT = np.array([[2.0, 0.0], [0.0, 1.0]])
TEACHER = np.array([[1.0, 1.0], [3.0, 0.0]])
LABELS = np.array([0, 1])


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _ce(logits: np.ndarray) -> float:
    return float(-np.mean(np.log(_softmax(logits)[np.arange(len(LABELS)), LABELS])))


def _kl(p_logits: np.ndarray, q_logits: np.ndarray, t: float = 1.0) -> float:
    p, q = _softmax(p_logits / t), _softmax(q_logits / t)
    return float(np.sum(p * (np.log(p) - np.log(q))) / len(p))


def _layered(values: list[float], heads: int = 2) -> tuple[torch.Tensor, ...]:
    """One (batch 2, heads, 3, 3) attention tensor per layer, filled with its value."""
    return tuple(torch.full((2, heads, 3, 3), v, dtype=torch.float64) for v in values)


@pytest.mark.parametrize(
    ("teacher_layers", "student_layers", "expected"),
    [(6, 3, [1, 3, 5]), (12, 6, [1, 3, 5, 7, 9, 11]), (6, 6, [0, 1, 2, 3, 4, 5]), (12, 3, [3, 7, 11])],
)
def test_layer_map_counts_from_the_last_layer(teacher_layers, student_layers, expected) -> None:
    assert attention_layer_map(teacher_layers, student_layers) == expected


def test_a_smaller_teacher_is_refused() -> None:
    with pytest.raises(ModelError, match="teacher must be the larger"):
        attention_layer_map(3, 6)


@pytest.mark.parametrize(("teacher_layers", "student_layers"), [(6, 3), (12, 6)])
def test_attention_mse_compares_the_mapped_layers(teacher_layers: int, student_layers: int) -> None:
    # teacher layer i is filled with i, the student with 0: each pair's MSE is i^2
    teacher = _layered([float(i) for i in range(teacher_layers)])
    student = _layered([0.0] * student_layers)
    mapped = attention_layer_map(teacher_layers, student_layers)
    assert float(attention_mse(student, teacher)) == pytest.approx(np.mean([i**2 for i in mapped]))


def test_attention_mse_averages_heads_when_counts_differ() -> None:
    teacher = tuple(torch.stack([torch.zeros(2, 3, 3), torch.full((2, 3, 3), 4.0)], dim=1) for _ in range(2))
    student = _layered([1.0], heads=3)  # 3 heads vs 2: head means 1.0 vs 2.0
    assert float(attention_mse(student, teacher)) == pytest.approx(1.0)


def test_mutual_kd_loss_matches_hand_computation() -> None:
    s_logits = torch.tensor(STUDENT, requires_grad=True)
    t_logits = torch.tensor(TEACHER, requires_grad=True)
    student_att, teacher_att = _layered([0.5, 0.5, 0.5]), _layered([0.0, 0.1, 0.2, 0.3, 0.4, 0.7])
    terms = mutual_kd_loss(s_logits, t_logits, torch.tensor(LABELS), student_att, teacher_att)

    ce_s, ce_t = _ce(STUDENT), _ce(TEACHER)
    kl_ts, kl_st = _kl(TEACHER, STUDENT), _kl(STUDENT, TEACHER)
    att = np.mean([(0.5 - 0.1) ** 2, (0.5 - 0.3) ** 2, (0.5 - 0.7) ** 2])  # layers 1, 3, 5
    expected = ce_s + ce_t + (kl_ts + kl_st + att) / (ce_s + ce_t + 1)
    assert terms.as_dict() == pytest.approx(
        {
            "loss": expected,
            "ce_student": ce_s,
            "ce_teacher": ce_t,
            "kl_teacher_student": kl_ts,
            "kl_student_teacher": kl_st,
            "attention_mse": att,
        }
    )
    terms.loss.backward()  # mutual: each model gets gradients (from its own terms)
    assert s_logits.grad.abs().sum() > 0 and t_logits.grad.abs().sum() > 0


def _one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(2)[labels]


def test_each_kl_term_moves_only_one_side() -> None:
    """KL(t||s) reaches only the student's logits, KL(s||t) only the teacher's (original routing).

    For KL(p||q) of softmaxed logits, d/dq = (softmax(q) - softmax(p)) / batch and, with p
    detached, d/dp = 0. Cross-entropy gives (softmax - one_hot) / batch to its own side, and
    the normaliser c = CE_s + CE_t + 1 is a constant. No attention gradient: the maps are
    constants here.
    """
    s_logits = torch.tensor(STUDENT, requires_grad=True)
    t_logits = torch.tensor(TEACHER, requires_grad=True)
    att = _layered([0.0])
    terms = mutual_kd_loss(s_logits, t_logits, torch.tensor(LABELS), att, att)
    grad_s, grad_t = torch.autograd.grad(terms.loss, (s_logits, t_logits))

    batch, c = len(LABELS), _ce(STUDENT) + _ce(TEACHER) + 1
    p_s, p_t, y = _softmax(STUDENT), _softmax(TEACHER), _one_hot(LABELS)
    # student: its CE + KL(t||s) / c; KL(s||t) contributes nothing to it
    np.testing.assert_allclose(grad_s.numpy(), ((p_s - y) + (p_s - p_t) / c) / batch, atol=1e-12)
    # teacher: its CE + KL(s||t) / c; KL(t||s) contributes nothing to it
    np.testing.assert_allclose(grad_t.numpy(), ((p_t - y) + (p_t - p_s) / c) / batch, atol=1e-12)


def test_kl_terms_alone_reach_the_expected_side() -> None:
    """With cross-entropy gradients subtracted, what is left on each side is one KL term's."""
    s_logits = torch.tensor(STUDENT, requires_grad=True)
    t_logits = torch.tensor(TEACHER, requires_grad=True)
    att = _layered([0.0])
    labels = torch.tensor(LABELS)
    terms = mutual_kd_loss(s_logits, t_logits, labels, att, att)
    ce = torch.nn.functional.cross_entropy(s_logits, labels) + torch.nn.functional.cross_entropy(
        t_logits, labels
    )
    kd_s, kd_t = (g.numpy() for g in torch.autograd.grad(terms.loss - ce, (s_logits, t_logits)))
    c = _ce(STUDENT) + _ce(TEACHER) + 1
    kl_ts_to_s = (_softmax(STUDENT) - _softmax(TEACHER)) / len(LABELS) / c
    kl_st_to_t = (_softmax(TEACHER) - _softmax(STUDENT)) / len(LABELS) / c
    np.testing.assert_allclose(kd_s, kl_ts_to_s, atol=1e-12)
    np.testing.assert_allclose(kd_t, kl_st_to_t, atol=1e-12)


def test_attention_mse_still_reaches_both_models() -> None:
    s_logits, t_logits = torch.tensor(STUDENT), torch.tensor(TEACHER)
    s_att = tuple(a.requires_grad_() for a in _layered([0.5]))
    t_att = tuple(a.requires_grad_() for a in _layered([0.0, 0.3]))
    terms = mutual_kd_loss(s_logits, t_logits, torch.tensor(LABELS), s_att, t_att)
    grad_s, grad_t = torch.autograd.grad(terms.loss, (s_att[0], t_att[1]))
    assert grad_s.abs().sum() > 0 and grad_t.abs().sum() > 0


def test_mutual_kd_normaliser_is_detached() -> None:
    s_logits = torch.tensor(STUDENT, requires_grad=True)
    t_logits = torch.tensor(TEACHER)
    att = _layered([0.0])
    terms = mutual_kd_loss(s_logits, t_logits, torch.tensor(LABELS), att, att)
    terms.loss.backward()
    # d/ds [CE_s + KL(t||s) / c] with c a constant, by finite differences
    c = _ce(STUDENT) + _ce(TEACHER) + 1
    eps, grad = 1e-6, np.zeros_like(STUDENT)
    for index in np.ndindex(*STUDENT.shape):
        bumped = STUDENT.copy()
        bumped[index] += eps
        f = lambda s: _ce(s) + _kl(TEACHER, s) / c  # noqa: E731
        grad[index] = (f(bumped) - f(STUDENT)) / eps
    np.testing.assert_allclose(s_logits.grad.numpy(), grad, atol=1e-5)


def test_client_kd_loss_matches_hand_computation() -> None:
    alpha, t = 0.5, 2.0
    loss = client_kd_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS), alpha, t)
    assert float(loss) == pytest.approx(_ce(STUDENT) + alpha * t**2 * _kl(TEACHER, STUDENT, t))


# --- what reaches the student in the server step (server-student-signal) ---------------------


def _mutual_inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random logits and (batch 3, heads 2, 4, 4) attention maps: 6 teacher layers, 3 student layers."""
    generator = torch.Generator().manual_seed(seed)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()

    student, teacher = leaf(3, 2), leaf(3, 2)
    student_att = tuple(leaf(3, 2, 4, 4).softmax(-1) for _ in range(3))
    teacher_att = tuple(leaf(3, 2, 4, 4).softmax(-1) for _ in range(6))
    return student, teacher, student_att, teacher_att


def _gradients(signal: str, labels: list[int], loss=mutual_kd_loss, seed: int = 0) -> dict[str, torch.Tensor]:
    student, teacher, student_att, teacher_att = _mutual_inputs(seed)
    step = loss(student, teacher, torch.tensor(labels), student_att, teacher_att, signal=signal)
    leaves = [student, teacher, *student_att, *teacher_att]
    grads = torch.autograd.grad(step.loss, leaves, allow_unused=True, materialize_grads=True)
    return {
        "student": grads[0],
        "teacher": grads[1],
        "student-att": torch.stack(grads[2:5]),
        "teacher-att": torch.stack(grads[5:]),
    }


def test_labels_signal_trains_the_student_on_cross_entropy_alone_and_the_teacher_as_before() -> None:
    labels = [0, 1, 1]
    both, only_labels = _gradients("labels+teacher", labels), _gradients("labels", labels)
    student, *_ = _mutual_inputs()
    expected = torch.autograd.grad(torch.nn.functional.cross_entropy(student, torch.tensor(labels)), student)[
        0
    ]
    torch.testing.assert_close(only_labels["student"], expected)
    assert float(only_labels["student-att"].abs().max()) == 0.0  # nothing of the teacher's maps
    torch.testing.assert_close(only_labels["teacher"], both["teacher"])
    torch.testing.assert_close(only_labels["teacher-att"], both["teacher-att"])


def test_teacher_signal_gives_the_student_no_label_and_trains_the_teacher_as_before() -> None:
    one, flipped = _gradients("teacher", [0, 1, 1]), _gradients("teacher", [1, 0, 0])
    torch.testing.assert_close(one["student"], flipped["student"])
    torch.testing.assert_close(one["student-att"], flipped["student-att"])
    assert not torch.allclose(one["teacher"], flipped["teacher"])  # the teacher does see labels
    both = _gradients("labels+teacher", [0, 1, 1])
    torch.testing.assert_close(one["teacher"], both["teacher"])
    torch.testing.assert_close(one["teacher-att"], both["teacher-att"])
    # the student's part: KL(t||s) + attention MSE, unscaled
    student, teacher, student_att, teacher_att = _mutual_inputs()
    detached = tuple(t.detach() for t in teacher_att)
    expected = kl(teacher.detach(), student) + attention_mse(student_att, detached)
    torch.testing.assert_close(one["student"], torch.autograd.grad(expected, student)[0])


def test_unlabelled_examples_add_no_cross_entropy() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
    masked = labelled_cross_entropy(logits, torch.tensor([0, 1, UNLABELLED]))
    assert float(masked) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits[:2], torch.tensor([0, 1])))
    )
    assert float(labelled_cross_entropy(logits, torch.full((3,), UNLABELLED))) == 0.0


# --- the original code's loss (kd-loss = "original") -------------------------------------------


def _original_by_hand(student, teacher, labels, student_att, teacher_att) -> torch.Tensor:
    """The original FedKDLoRA expressions written out: raw-logit 'KL' terms, summed MSE, normaliser kept."""
    ce_s = -torch.log_softmax(student, -1)[torch.arange(len(labels)), labels].mean()
    ce_t = -torch.log_softmax(teacher, -1)[torch.arange(len(labels)), labels].mean()
    batch = student.shape[0]
    # KLDivLoss(log_target=True)(input, target) = sum(exp(target) * (target - input)) / batch
    student_term = (student.exp() * (student - teacher.detach())).sum() / batch
    teacher_term = (teacher.exp() * (teacher - student.detach())).sum() / batch
    mse = sum(((s - teacher_att[t]) ** 2).mean() for s, t in zip(student_att, (1, 3, 5), strict=True))
    detached = ce_s.detach() + ce_t.detach() + 1
    return ce_s + ce_t + mse / (ce_s + ce_t + 1) + student_term / detached + teacher_term / detached


def test_original_loss_matches_the_original_expressions_in_value_and_gradient() -> None:
    labels = torch.tensor([0, 1, 1])
    student, teacher, student_att, teacher_att = _mutual_inputs(3)
    leaves = [student, teacher, *student_att, *teacher_att]
    ours = original_mutual_kd_loss(student, teacher, labels, student_att, teacher_att)
    by_hand = _original_by_hand(student, teacher, labels, student_att, teacher_att)
    torch.testing.assert_close(ours.loss, by_hand)

    def grads(loss: torch.Tensor, **keep) -> tuple:
        return torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True, **keep)

    for got, expected in zip(grads(ours.loss, retain_graph=True), grads(by_hand), strict=True):
        torch.testing.assert_close(got, expected)
    # it is not the project's loss: the KL terms and the attention scaling differ
    assert (
        abs(ours.loss.item() - mutual_kd_loss(student, teacher, labels, student_att, teacher_att).loss.item())
        > 1e-3
    )


def test_original_student_term_pulls_each_logit_to_the_teachers_minus_one() -> None:
    """Why the original's term is no KL: its gradient vanishes at s = t - 1, not at s = t."""
    teacher = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    raw = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)
    for offset, vanishes in ((-1.0, True), (0.0, False)):
        student = (teacher + offset).requires_grad_()
        (grad,) = torch.autograd.grad(raw(teacher, student), student)
        assert bool(torch.allclose(grad, torch.zeros_like(grad))) is vanishes

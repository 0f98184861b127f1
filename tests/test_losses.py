"""Distillation losses against hand computations on fixed logits and attention maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedkdlora_app.losses import attention_layer_map, attention_mse, client_kd_loss, mutual_kd_loss
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
            "ce-student": ce_s,
            "ce-teacher": ce_t,
            "kl-teacher-student": kl_ts,
            "kl-student-teacher": kl_st,
            "attention-mse": att,
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

"""Distillation losses of FedKDLoRA: server-side mutual KD and client-side KD."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedkdlora_app.errors import ModelError


def attention_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layer for each student layer, counted from the last, stride T/S.

    6 -> 3 gives [1, 3, 5]; 12 -> 6 gives [1, 3, 5, 7, 9, 11]: the students' last layer
    always meets the teacher's last layer.
    """
    if not 0 < student_layers <= teacher_layers:
        raise ModelError(
            f"teacher has {teacher_layers} layers, student {student_layers}: the teacher must be the larger"
        )
    stride = teacher_layers // student_layers
    return [teacher_layers - 1 - (student_layers - 1 - i) * stride for i in range(student_layers)]


@dataclass(frozen=True)
class MutualKDTerms:
    """The loss and its terms for one batch; the floats go into the results JSON."""

    loss: torch.Tensor
    ce_student: float
    ce_teacher: float
    kl_teacher_student: float
    kl_student_teacher: float
    attention_mse: float

    def as_dict(self) -> dict[str, float]:
        return {
            "loss": float(self.loss.detach()),
            "ce_student": self.ce_student,
            "ce_teacher": self.ce_teacher,
            "kl_teacher_student": self.kl_teacher_student,
            "kl_student_teacher": self.kl_student_teacher,
            "attention_mse": self.attention_mse,
        }


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p || q) of the softmaxed logits, mean over the batch."""
    return F.kl_div(
        F.log_softmax(q_logits / temperature, dim=-1),
        F.log_softmax(p_logits / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )


def attention_mse(
    student_attentions: tuple[torch.Tensor, ...], teacher_attentions: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """Mean over student layers of the MSE to the teacher layer each maps to.

    Attention maps are (batch, heads, query, key); with different head counts the maps
    are averaged over heads first.
    """
    layer_map = attention_layer_map(len(teacher_attentions), len(student_attentions))
    errors = []
    for student_attention, teacher_index in zip(student_attentions, layer_map, strict=True):
        teacher_attention = teacher_attentions[teacher_index]
        if student_attention.shape[1] != teacher_attention.shape[1]:
            student_attention, teacher_attention = student_attention.mean(1), teacher_attention.mean(1)
        errors.append(F.mse_loss(student_attention, teacher_attention))
    return torch.stack(errors).mean()


UNLABELLED = -100  # label of a public example whose label the server does not use (torch's ignore_index)


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled examples (label != UNLABELLED); 0 when none is."""
    labelled = labels != UNLABELLED
    if bool(labelled.all()):
        return F.cross_entropy(logits, labels)
    if not bool(labelled.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[labelled], labels[labelled])


def _detached(maps: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(m.detach() for m in maps)


def mutual_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    student_attentions: tuple[torch.Tensor, ...],
    teacher_attentions: tuple[torch.Tensor, ...],
    signal: str = "labels+teacher",
) -> MutualKDTerms:
    """CE_s + CE_t + (KL(t||s) + KL(s||t) + attention MSE) / (CE_s + CE_t + 1), normaliser detached.

    Each KL term trains one side, as in the original FedKDLoRA: KL(t||s) with the
    teacher's logits detached moves only the student, KL(s||t) with the student's logits
    detached moves only the teacher (otherwise each model is also pulled to make the other
    match it, which fights its own term). The attention MSE reaches both models. Scaling
    the distillation terms by the (detached) task losses lets them dominate only once both
    models fit the labels. Cross-entropies count labelled examples only (see UNLABELLED).

    `signal` chooses what reaches the student; the teacher's loss is the same in all three:
    - "labels+teacher": the loss above.
    - "labels": the student's loss is CE_s alone; nothing of the teacher reaches it.
    - "teacher": KL(t||s) + attention MSE, unscaled (the normaliser holds the labels'
      losses); no public label reaches the student.
    """
    ce_student = labelled_cross_entropy(student_logits, labels)
    ce_teacher = labelled_cross_entropy(teacher_logits, labels)
    kl_ts = kl(teacher_logits.detach(), student_logits)
    kl_st = kl(student_logits.detach(), teacher_logits)
    normaliser = (ce_student + ce_teacher + 1).detach()
    if signal == "labels+teacher":
        att = attention_mse(student_attentions, teacher_attentions)
        loss = ce_student + ce_teacher + (kl_ts + kl_st + att) / normaliser
    else:
        att = attention_mse(_detached(student_attentions), teacher_attentions)
        teacher_loss = ce_teacher + (kl_st + att) / normaliser
        if signal == "labels":
            student_loss = ce_student
        else:
            student_loss = kl_ts + attention_mse(student_attentions, _detached(teacher_attentions))
        loss = student_loss + teacher_loss
    return MutualKDTerms(loss, *(t.item() for t in (ce_student, ce_teacher, kl_ts, kl_st, att)))


def original_mutual_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    student_attentions: tuple[torch.Tensor, ...],
    teacher_attentions: tuple[torch.Tensor, ...],
    signal: str = "labels+teacher",
) -> MutualKDTerms:
    """The original FedKDLoRA code's mutual loss, expression for expression (`kd-loss = "original"`).

    `KLDivLoss(reduction="batchmean", log_target=True)` applied to raw logits, input and
    target as the original passes them: the student's term is sum(exp(s) * (s - t)) / batch,
    which is no KL divergence (its gradient pulls each student logit to the teacher's
    minus one and penalises large logits); both such terms are divided by the detached
    CE_s + CE_t + 1. The attention MSE is summed over layers and divided by the same sum
    not detached. Recorded terms: the raw-logit terms before division, the summed MSE.
    Only the combined loss exists (`signal` must be "labels+teacher", checked in config).
    """
    ce_student = labelled_cross_entropy(student_logits, labels)
    ce_teacher = labelled_cross_entropy(teacher_logits, labels)
    raw = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)
    raw_student = raw(teacher_logits.detach(), student_logits)
    raw_teacher = raw(student_logits.detach(), teacher_logits)
    detached_sum = ce_student.detach() + ce_teacher.detach() + 1
    layer_map = attention_layer_map(len(teacher_attentions), len(student_attentions))
    mse_sum = sum(
        F.mse_loss(student_attention, teacher_attentions[teacher_index])
        for student_attention, teacher_index in zip(student_attentions, layer_map, strict=True)
    )
    loss = (
        ce_student
        + ce_teacher
        + mse_sum / (ce_student + ce_teacher + 1)
        + raw_student / detached_sum
        + raw_teacher / detached_sum
    )
    terms = (ce_student, ce_teacher, raw_student, raw_teacher, mse_sum)
    return MutualKDTerms(loss, *(t.item() for t in terms))


MUTUAL_LOSSES = {"kl": mutual_kd_loss, "original": original_mutual_kd_loss}


def client_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """CE + alpha * T^2 * KL(teacher || student) at temperature T (Hinton et al.)."""
    soft = kl(teacher_logits.detach(), student_logits, temperature)
    return F.cross_entropy(student_logits, labels) + alpha * temperature**2 * soft

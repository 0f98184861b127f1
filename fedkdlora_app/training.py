"""Training and evaluation loops shared by clients and server."""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup

from fedkdlora_app.devices import autocast
from fedkdlora_app.losses import MUTUAL_LOSSES, MutualKDTerms, client_kd_loss
from fedkdlora_app.metrics import EvalCounts
from fedkdlora_app.models import attention_kernel
from fedkdlora_app.progress import Progress

# (model, batch on device) -> scalar loss to minimise
Objective = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class TrainResult:
    mean_loss: float
    dataset_size: int  # examples in the loader's dataset (FedAvg's weight), not examples seen
    seconds: float
    examples_seen: int = 0  # dataset size x epochs: the work done, for throughput


def cross_entropy(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def distil_from(teacher: torch.nn.Module, alpha: float, temperature: float) -> Objective:
    """Client-side KD objective against a frozen teacher."""

    def objective(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits
        return client_kd_loss(model(**inputs).logits, teacher_logits, batch["labels"], alpha, temperature)

    return objective


def check_finite(loss: torch.Tensor, what: str) -> float:
    """The loss as a float; a NaN/Inf stops the run with a message instead of poisoning it."""
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"{what}: loss became {value} (learning rate too high?)")
    return value


def _optimizer(
    groups: list[dict], steps: int, linear_decay: bool
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """AdamW over parameter groups `{"params": ..., "lr": ...}`; the schedule scales each group's own lr."""
    optimizer = torch.optim.AdamW(groups)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, steps) if linear_decay else None
    return optimizer, schedule


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def distill_optimizer(
    student: torch.nn.Module, teacher: torch.nn.Module, student_lr: float, teacher_lr: float, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """One AdamW, two groups: the student's LoRA + head and the teacher, each at its rate, each decaying.

    The student's trainable part is a few adapters and a fresh head, which the clients
    train at `lora-client-lr`; the teacher is a fully fine-tuned model that a high rate
    would wreck. One rate for both either freezes the student or breaks the teacher.
    """
    groups = [
        {"params": trainable(student), "lr": student_lr},
        {"params": trainable(teacher), "lr": teacher_lr},
    ]
    optimizer, schedule = _optimizer(groups, steps, linear_decay=True)
    assert schedule is not None
    return optimizer, schedule


def train_epochs(
    model: torch.nn.Module,
    loader: DataLoader,
    lr: float,
    epochs: int,
    device: torch.device,
    objective: Objective = cross_entropy,
    linear_decay: bool = False,
    what: str = "training",
    precision: str = "float32",
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> TrainResult:
    """AdamW on the trainable parameters; constant lr (FL clients) or linear decay.

    `stop`, checked before each batch, ends training early (a closing server's teacher phase).
    """
    model.to(device).train()
    optimizer, schedule = _optimizer(
        [{"params": trainable(model), "lr": lr}], epochs * len(loader), linear_decay
    )
    start, loss_sum, seen = time.perf_counter(), 0.0, 0
    for _ in range(epochs):
        if stop is not None and stop.is_set():
            break
        for batch in loader:
            if stop is not None and stop.is_set():
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device, precision):
                loss = objective(model, batch)
            value = check_finite(loss, what)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            loss_sum += value * len(batch["labels"])
            seen += len(batch["labels"])
            if progress is not None:
                progress.advance(len(batch["labels"]))
    return TrainResult(loss_sum / max(seen, 1), len(loader.dataset), time.perf_counter() - start, seen)


def mutual_distill(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    loader: DataLoader,
    student_lr: float,
    teacher_lr: float,
    epochs: int,
    device: torch.device,
    what: str,
    precision: str = "float32",
    progress: Progress | None = None,
    kd_loss: str = "kl",
    signal: str = "labels+teacher",
) -> dict[str, float]:
    """Train teacher and student together on the mutual KD loss; the last step's terms.

    Only the student's trainable parameters (LoRA + head) move on its side, so what it
    ships afterwards is the same PEFT state as under FedLoRA. `kd_loss` and `signal`
    choose the loss (`losses.MUTUAL_LOSSES`) and what of it reaches the student.
    """
    loss_fn = functools.partial(MUTUAL_LOSSES[kd_loss], signal=signal)
    student.to(device).train()
    teacher.to(device).train()
    optimizer, schedule = distill_optimizer(student, teacher, student_lr, teacher_lr, epochs * len(loader))
    terms: dict[str, float] = {}
    with attention_kernel(student, "eager"), attention_kernel(teacher, "eager"):  # the maps are distilled
        for _ in range(epochs):
            terms = _mutual_epoch(
                student, teacher, loader, optimizer, schedule, device, what, precision, progress, loss_fn
            )
    return terms


def _mutual_epoch(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    what: str,
    precision: str,
    progress: Progress | None,
    loss_fn: Callable[..., MutualKDTerms],
) -> dict[str, float]:
    """One pass of `mutual_distill` over the loader; the last step's terms."""
    terms: dict[str, float] = {}
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with autocast(device, precision):
            student_out = student(**inputs, output_attentions=True)
            teacher_out = teacher(**inputs, output_attentions=True)
            step = loss_fn(
                student_out.logits,
                teacher_out.logits,
                batch["labels"],
                student_out.attentions,
                teacher_out.attentions,
            )
        check_finite(step.loss, what)
        optimizer.zero_grad(set_to_none=True)
        step.loss.backward()
        optimizer.step()
        schedule.step()
        terms = step.as_dict()
        if progress is not None:
            progress.advance(len(batch["labels"]))
    return terms


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    precision: str = "float32",
    progress: Progress | None = None,
) -> EvalCounts:
    """Summed cross-entropy and confusion counts over the loader's examples."""
    model.to(device).eval()
    loss_sum, labels, predictions = 0.0, [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, precision):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
        labels.append(batch["labels"].cpu().numpy())
        predictions.append(logits.argmax(dim=-1).cpu().numpy())
        if progress is not None:
            progress.advance(len(labels[-1]))
    return EvalCounts.from_predictions(loss_sum, np.concatenate(labels), np.concatenate(predictions))

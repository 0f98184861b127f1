"""Local training and evaluation loops shared by clients and server."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from fedkdlora_app.metrics import EvalCounts


def pick_device() -> torch.device:
    """The GPU Ray assigned to this process, if any, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class TrainResult:
    mean_loss: float
    num_examples: int
    seconds: float


def train_epochs(
    model: torch.nn.Module, loader: DataLoader, lr: float, epochs: int, device: torch.device
) -> TrainResult:
    """Cross-entropy fine-tuning of the trainable parameters with AdamW."""
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    start, loss_sum, seen = time.perf_counter(), 0.0, 0
    for _ in range(epochs):
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"training loss became {loss.item()} (learning rate {lr} too high?)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(batch["labels"])
            seen += len(batch["labels"])
    return TrainResult(loss_sum / max(seen, 1), len(loader.dataset), time.perf_counter() - start)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> EvalCounts:
    """Summed cross-entropy and confusion counts over the loader's examples."""
    model.to(device).eval()
    loss_sum, labels, predictions = 0.0, [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        loss_sum += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
        labels.append(batch["labels"].cpu().numpy())
        predictions.append(logits.argmax(dim=-1).cpu().numpy())
    return EvalCounts.from_predictions(loss_sum, np.concatenate(labels), np.concatenate(predictions))

"""Classification metrics, and their honest aggregation across clients.

Every evaluation, server- or client-side, reduces to (summed loss, confusion counts).
Client results are combined by summing those, so the aggregated accuracy and MCC are
exactly what one evaluation over the union of the clients' examples would give; a
weighted mean of per-client MCC values would not be.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the learning code imports this module without Flower (bench/gpu_check.py)
    from flwr.app import MetricRecord, RecordDict

from fedkdlora_app.protocol import NUM_EXAMPLES_KEY

COUNT_KEYS = ("tn", "fp", "fn", "tp")


@dataclass(frozen=True)
class EvalCounts:
    """Sufficient statistics of one evaluation; they add up across clients."""

    loss_sum: float
    tn: int
    fp: int
    fn: int
    tp: int

    @classmethod
    def from_predictions(cls, loss_sum: float, labels: np.ndarray, predictions: np.ndarray) -> EvalCounts:
        # imported here: a ClientApp process (one per message on a SuperNode) that only trains
        # never pays scikit-learn's import
        from sklearn.metrics import confusion_matrix

        tn, fp, fn, tp = confusion_matrix(labels, predictions, labels=[0, 1]).ravel()
        return cls(float(loss_sum), int(tn), int(fp), int(fn), int(tp))

    @property
    def num_examples(self) -> int:
        return self.tn + self.fp + self.fn + self.tp

    def __add__(self, other: EvalCounts) -> EvalCounts:
        return EvalCounts(
            self.loss_sum + other.loss_sum,
            *(getattr(self, k) + getattr(other, k) for k in COUNT_KEYS),
        )

    def metrics(self) -> dict[str, float | int]:
        """Mean per-example loss, accuracy, MCC, example count and the counts themselves."""
        from sklearn.metrics import matthews_corrcoef  # see from_predictions

        n = self.num_examples
        # MCC from the confusion matrix: one example per cell, weighted by its count.
        mcc = matthews_corrcoef(
            [0, 0, 1, 1], [0, 1, 0, 1], sample_weight=[self.tn, self.fp, self.fn, self.tp]
        )
        return {
            "loss": self.loss_sum / n,
            "accuracy": (self.tp + self.tn) / n,
            "mcc": float(mcc),
            NUM_EXAMPLES_KEY: n,
            **{k: getattr(self, k) for k in COUNT_KEYS},
        }

    @classmethod
    def from_metrics(cls, metrics: MetricRecord) -> EvalCounts:
        return cls(
            float(metrics["loss"]) * int(metrics[NUM_EXAMPLES_KEY]),
            *(int(metrics[k]) for k in COUNT_KEYS),
        )


def aggregate_evaluate_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Client evaluations combined by summing their counts (strategy's evaluate aggregator)."""
    from flwr.app import MetricRecord

    parts = [EvalCounts.from_metrics(m) for record in records for m in record.metric_records.values()]
    total = EvalCounts(0.0, 0, 0, 0, 0)
    for part in sorted(parts, key=dataclasses.astuple):  # arrival order must not change the float sum
        total = total + part
    return MetricRecord(total.metrics())


def aggregate_train_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Example-weighted mean training loss, total examples, slowest client's and all clients' seconds,
    and the examples the clients trained on (their progress; with local-epochs > 1, more than the total)."""
    from flwr.app import MetricRecord

    all_metrics = [m for record in records for m in record.metric_records.values()]
    weights = [int(m[weighted_by_key]) for m in all_metrics]
    total = sum(weights)
    return MetricRecord(
        {
            "train_loss": sum(float(m["train_loss"]) * w for m, w in zip(all_metrics, weights, strict=True))
            / total,
            weighted_by_key: total,
            "train_seconds_max": max(float(m["train_seconds"]) for m in all_metrics),
            "train_seconds_sum": sum(float(m["train_seconds"]) for m in all_metrics),
            # the clients' progress: examples trained on, over all epochs
            "train_examples_seen": sum(int(m.get("train_examples_seen", 0)) for m in all_metrics),
        }
    )

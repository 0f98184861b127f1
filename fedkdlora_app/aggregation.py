"""Turning the clients' updates into the next global model: naive or SVD (FlexLoRA) LoRA averaging.

Averaging LoRA's factors separately is not averaging the updates: mean(B)·mean(A) is
not mean(B·A). `svd` averages the products ΔW = B·A·(alpha/r) instead, which is exact, and
re-factorises the mean by truncated SVD into the rank the clients train; by Eckart-Young
that is the best rank-r approximation, and its relative Frobenius error is reported.
Clients of different ranks each fit the global factors to their own rank (`fit_rank`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedkdlora_app.config import RunConfig
from fedkdlora_app.protocol import LORA_A, LORA_B
from fedkdlora_app.wire import from_wire, to_wire


def lora_pairs(keys: list[str] | Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Adapted module -> (its lora_A key, its lora_B key), for PEFT state-dict keys."""
    return {key.split(LORA_A)[0]: (key, key.replace(LORA_A, LORA_B)) for key in keys if LORA_A in key}


def lora_rank(record: ArrayRecord) -> int | None:
    """The rank of the LoRA factors in a shipped state; None if it has none (FedAvg)."""
    for key, array in record.items():
        if LORA_B in key:
            return int(array.shape[1])
    return None


def delta_weight(a: torch.Tensor, b: torch.Tensor, lora_alpha: float) -> torch.Tensor:
    """The weight update a LoRA pair adds: B·A scaled by alpha/r (PEFT's scaling), in float64."""
    return (lora_alpha / a.shape[0]) * (b.double() @ a.double())


@dataclass(frozen=True)
class Factorisation:
    """B, A of a truncated SVD, and the squared Frobenius norms that give its error."""

    b: torch.Tensor
    a: torch.Tensor
    tail_energy: float  # ||ΔW - B·A·alpha/r||_F^2 (the discarded singular values)
    total_energy: float  # ||ΔW||_F^2

    @property
    def relative_error(self) -> float:
        return (self.tail_energy / self.total_energy) ** 0.5 if self.total_energy > 0 else 0.0


def factorise(delta: torch.Tensor, rank: int, lora_alpha: float) -> Factorisation:
    """B, A with B·A·(alpha/rank) the best rank-`rank` approximation of `delta`: B = U·S, A = Vᵀ.

    A keeps orthonormal rows, close to the scale of LoRA's own initialisation of A, so the
    gradient reaching B (which is proportional to A·x) stays healthy however small the
    update is; splitting S evenly (U√S, √S·Vᵀ) shrinks A with the update and slows training.
    """
    u, s, vh = torch.linalg.svd(delta.double() * (rank / lora_alpha), full_matrices=False)
    b, a = u[:, :rank] * s[:rank], vh[:rank]
    if b.shape[1] < rank:  # the matrix is smaller than the rank: pad with zero directions
        b = torch.nn.functional.pad(b, (0, rank - b.shape[1]))
        a = torch.nn.functional.pad(a, (0, 0, 0, rank - a.shape[0]))
    scale_sq = (lora_alpha / rank) ** 2
    tail, total = float((s[rank:] ** 2).sum()) * scale_sq, float((s**2).sum()) * scale_sq
    return Factorisation(b.float(), a.float(), tail, total)


def fit_rank(state: dict[str, torch.Tensor], rank: int, lora_alpha: float) -> dict[str, torch.Tensor]:
    """The global LoRA state re-factorised to a client's own (lower) rank; unchanged where it matches.

    A pair whose B is all zero (LoRA's initialisation) keeps A's first `rank` rows: its
    product is zero either way, and the SVD of a zero matrix has no preferred directions
    (it would hand every client the same axis-aligned A).
    """
    fitted = dict(state)
    for key_a, key_b in lora_pairs(state).values():
        a, b = state[key_a], state[key_b]
        if a.shape[0] == rank:
            continue
        if not b.any():
            fitted[key_a], fitted[key_b] = a[:rank].clone(), b[:, :rank].clone()
        else:
            factors = factorise(delta_weight(a, b, lora_alpha), rank, lora_alpha)
            fitted[key_a], fitted[key_b] = factors.a, factors.b
    return fitted


def update_problem(
    content: RecordDict,
    sent: ArrayRecord | None,
    aggregator: UpdateAggregator,
    arrays_key: str,
    weighted_by_key: str,
    max_examples: int | None,
) -> str | None:
    """Why a client's train reply must not enter `aggregator`'s mean, or None if it may.

    The one definition of a valid update, so that nothing the screen lets through can
    fail inside the aggregation: exactly one ArrayRecord with the arrays that were `sent`
    (names, dtypes; shapes equal, but for the rank of LoRA factors under svd), both
    factors of each LoRA pair of one rank, that rank the sent one (naive) or in
    1..`aggregator.rank` (svd) and the same for every pair, all values finite, and a
    positive example count no larger than `max_examples`.
    """
    record = content.array_records.get(arrays_key)
    if record is None or len(content.array_records) != 1:
        return f"expected exactly one ArrayRecord '{arrays_key}'"
    if sent is not None:
        if set(record) != set(sent):
            missing, unexpected = sorted(set(sent) - set(record)), sorted(set(record) - set(sent))
            return f"array names differ from those sent (missing {missing[:3]}, unexpected {unexpected[:3]})"
        lora_keys = {key for pair in lora_pairs(sent).values() for key in pair}
        for name, array in record.items():
            same_shape = name in lora_keys or tuple(array.shape) == tuple(sent[name].shape)
            if array.dtype != sent[name].dtype or not same_shape:
                return (
                    f"array '{name}' is {array.dtype}{list(array.shape)}, "
                    f"sent as {sent[name].dtype}{list(sent[name].shape)}"
                )
    if problem := lora_rank_problem(record, sent, aggregator):
        return problem
    for name, tensor in from_wire(record, aggregator.wire_dtype).items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"array '{name}' holds NaN or Inf"
    metrics = list(content.metric_records.values())
    count = metrics[0].get(weighted_by_key) if len(metrics) == 1 else None
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        return f"'{weighted_by_key}' must be a positive integer, got {count!r}"
    if max_examples is not None and count > max_examples:
        return f"claims {count} examples, more than the {max_examples} a client partition can hold"
    return None


def lora_rank_problem(
    record: ArrayRecord, sent: ArrayRecord | None, aggregator: UpdateAggregator
) -> str | None:
    """The LoRA part of `update_problem`: A is (r, in) and B is (out, r), with in/out as sent."""
    ranks = set()
    for module, (key_a, key_b) in lora_pairs(record).items():
        if key_b not in record:
            return f"LoRA factor '{key_a}' has no '{key_b}'"
        a, b = record[key_a].shape, record[key_b].shape
        if len(a) != 2 or len(b) != 2:
            return f"LoRA factors of '{module}' must be matrices, got {list(a)} and {list(b)}"
        if sent is not None and (a[1] != sent[key_a].shape[1] or b[0] != sent[key_b].shape[0]):
            return (
                f"LoRA factors of '{module}' are {list(a)} and {list(b)}, "
                f"sent as {list(sent[key_a].shape)} and {list(sent[key_b].shape)}"
            )
        if a[0] != b[1]:
            return f"LoRA factors of '{module}' differ in rank: lora_A {a[0]}, lora_B {b[1]}"
        if aggregator.rank_may_differ:
            if not 1 <= a[0] <= aggregator.rank:
                return f"LoRA rank {a[0]} of '{module}' is outside 1..{aggregator.rank} (lora-r)"
        elif sent is not None and a[0] != sent[key_a].shape[0]:
            return f"LoRA rank {a[0]} of '{module}' differs from the sent rank {sent[key_a].shape[0]}"
        ranks.add(a[0])
    if len(ranks) > 1:
        return f"LoRA factors of one update have several ranks {sorted(ranks)}; a client trains one"
    return None


def example_weights(contents: list[RecordDict], weighted_by_key: str) -> list[float]:
    """Each reply's share of the examples (the FedAvg weights)."""
    counts = [float(next(iter(content.metric_records.values()))[weighted_by_key]) for content in contents]
    return [count / sum(counts) for count in counts]


@dataclass(frozen=True)
class UpdateAggregator:
    """The example-weighted mean of the clients' shipped state, decoded from and re-encoded to the wire.

    `naive` averages every array with Flower's own `aggregate_arrayrecords`; `svd` does so
    for the arrays that are not LoRA factors and averages the LoRA products instead.
    """

    method: str = "naive"
    wire_dtype: str = "float32"
    lora_alpha: float = 16.0
    rank: int = 8  # the global rank the server keeps

    @classmethod
    def from_config(cls, config: RunConfig) -> UpdateAggregator:
        return cls(config.lora_aggregation, config.wire_dtype, float(config.lora_alpha), config.lora_r)

    @property
    def rank_may_differ(self) -> bool:
        return self.method == "svd"

    def for_rank(self, record: ArrayRecord, rank: int) -> ArrayRecord:
        """The global state on the wire, re-factorised to `rank` (what a client of that rank gets)."""
        return to_wire(fit_rank(from_wire(record, self.wire_dtype), rank, self.lora_alpha), self.wire_dtype)

    def __call__(
        self, contents: list[RecordDict], arrays_key: str, weighted_by_key: str
    ) -> tuple[ArrayRecord, dict[str, Any] | None]:
        """(next global arrays on the wire, the aggregation report for the results JSON or None)."""
        states = [from_wire(content.array_records[arrays_key], self.wire_dtype) for content in contents]
        pairs = lora_pairs(states[0]) if self.method == "svd" else {}
        lora_keys = {key for pair in pairs.values() for key in pair}
        records = [
            RecordDict(
                {
                    arrays_key: ArrayRecord({k: v for k, v in state.items() if k not in lora_keys}),
                    **content.metric_records,
                }
            )
            for state, content in zip(states, contents, strict=True)
        ]
        mean = aggregate_arrayrecords(records, weighted_by_key).to_torch_state_dict()
        report = None
        if pairs:
            weights = example_weights(contents, weighted_by_key)
            mean, report = self._svd_mean(states, weights, pairs, mean)
        ordered = {key: mean[key] for key in states[0]}  # keep the shipped key order
        return to_wire(ordered, self.wire_dtype), report

    def _svd_mean(
        self,
        states: list[dict[str, torch.Tensor]],
        weights: list[float],
        pairs: dict[str, tuple[str, str]],
        mean: dict[str, torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tail = total = 0.0
        worst = 0.0
        for key_a, key_b in pairs.values():
            delta = sum(
                w * delta_weight(state[key_a], state[key_b], self.lora_alpha)
                for state, w in zip(states, weights, strict=True)
            )
            factors = factorise(delta, self.rank, self.lora_alpha)
            mean[key_a], mean[key_b] = factors.a, factors.b
            tail, total = tail + factors.tail_energy, total + factors.total_energy
            worst = max(worst, factors.relative_error)
        report = {
            "method": "svd",
            "rank": self.rank,
            "client_ranks": sorted({state[next(iter(pairs.values()))[0]].shape[0] for state in states}),
            "truncation_error": (tail / total) ** 0.5 if total > 0 else 0.0,
            "max_module_truncation_error": worst,
        }
        return mean, report

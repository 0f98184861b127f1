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
from fedkdlora_app.wire import from_wire, to_wire

LORA_A, LORA_B = ".lora_A.", ".lora_B."


def lora_pairs(keys: list[str] | Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Adapted module -> (its lora_A key, its lora_B key), for PEFT state-dict keys."""
    return {key.split(LORA_A)[0]: (key, key.replace(LORA_A, LORA_B)) for key in keys if LORA_A in key}


def rank_axis(key: str) -> int | None:
    """The rank dimension of a LoRA factor (A is r x in, B is out x r); None for other arrays."""
    if LORA_A in key:
        return 0
    if LORA_B in key:
        return 1
    return None


def shapes_compatible(key: str, got: tuple[int, ...], sent: tuple[int, ...], rank_may_differ: bool) -> bool:
    """Same shape, or (svd with heterogeneous ranks) the same up to a LoRA factor's rank dimension."""
    if tuple(got) == tuple(sent):
        return True
    axis = rank_axis(key) if rank_may_differ else None
    if axis is None or len(got) != 2 or len(sent) != 2:
        return False
    return got[1 - axis] == sent[1 - axis]


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

    def fit(self, record: ArrayRecord, rank: int) -> ArrayRecord:
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

"""Turning the clients' updates into the next global model: naive, SVD (FlexLoRA), alternating
or exact LoRA averaging, and how far the result lies from the exact mean of the clients' models.

Averaging LoRA's factors separately is not averaging the updates: mean(B)·mean(A) is
not mean(B·A). `svd` averages the products ΔW = B·A·(alpha/r) instead, which is exact, and
re-factorises the mean by truncated SVD (lora.py) into the rank the clients train; its
relative Frobenius error is reported. `alternating` trains one factor per round, so the
shared other factor makes the plain mean exact. `exact` averages naively and ships the
residual mean(B·A) - mean(B)·mean(A), folded into the frozen weights. Every LoRA round
reports `error`: the relative Frobenius distance of the new global update from the exact
mean of the clients' updates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedkdlora_app.config import RunConfig
from fedkdlora_app.lora import (
    adapted_weights,
    delta_weight,
    factorise,
    fit_rank,
    frozen_factor,
    lora_pairs,
    reply_keys,
    residual_state,
)
from fedkdlora_app.protocol import LORA_B
from fedkdlora_app.wire import from_wire, to_wire


def lora_rank(record: ArrayRecord) -> int | None:
    """The rank of the LoRA factors in a shipped state; None if it has none (FedAvg)."""
    for key, array in record.items():
        if LORA_B in key:
            return int(array.shape[1])
    return None


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
        if sent is not None and key_b not in sent:  # alternating: only A trains this round
            got, expected = list(record[key_a].shape), list(sent[key_a].shape)
            if got != expected:
                return f"LoRA factor '{key_a}' is {got}, sent as {expected}"
            continue
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

    The arrays that are not LoRA factors, and the factors under `naive`, `alternating` and
    `exact`, are averaged by Flower's own `aggregate_arrayrecords`; `svd` averages the LoRA
    products instead, `exact` adds the residual. What a reply lacks (a frozen factor, the
    residual) is the global state's.
    """

    method: str = "naive"
    wire_dtype: str = "float32"
    lora_alpha: float = 16.0
    rank: int = 8  # the global rank the server keeps
    residual_rank: int = 0  # exact: 0 = dense residual, else its rank-k factors
    # Under DP every update counts the same: one client then moves the mean by at most
    # clipping norm / clients, the sensitivity the noise is calibrated to (`privacy.py`).
    uniform_weights: bool = False

    @classmethod
    def from_config(cls, config: RunConfig) -> UpdateAggregator:
        return cls(
            method=config.lora_aggregation,
            wire_dtype=config.wire_dtype,
            lora_alpha=float(config.lora_alpha),
            rank=config.lora_r,
            residual_rank=config.lora_residual_rank,
            uniform_weights=config.uses_dp,
        )

    @property
    def rank_may_differ(self) -> bool:
        return self.method == "svd"

    def for_rank(self, record: ArrayRecord, rank: int) -> ArrayRecord:
        """The global state on the wire, re-factorised to `rank` (what a client of that rank gets)."""
        return to_wire(fit_rank(from_wire(record, self.wire_dtype), rank, self.lora_alpha), self.wire_dtype)

    def reply_template(self, sent: ArrayRecord, server_round: int) -> ArrayRecord:
        """The arrays of `sent` that a client's train reply to it holds (`lora.reply_keys`)."""
        frozen = frozen_factor(self.method, False, server_round)  # FFA-LoRA's A is never sent at all
        return ArrayRecord({key: sent[key] for key in reply_keys(sent, frozen)})

    def __call__(
        self,
        contents: list[RecordDict],
        arrays_key: str,
        weighted_by_key: str,
        sent: ArrayRecord | None = None,
    ) -> tuple[ArrayRecord, dict[str, Any] | None]:
        """(next global arrays on the wire, the aggregation report for the results JSON or None).

        `sent`: the global arrays the clients trained from, which fill in what a reply lacks.
        """
        previous = from_wire(sent, self.wire_dtype) if sent is not None else {}
        states = [from_wire(content.array_records[arrays_key], self.wire_dtype) for content in contents]
        pairs = lora_pairs(states[0]) if self.method == "svd" else {}
        lora_keys = {key for pair in pairs.values() for key in pair}
        equal_weight = {"metrics": MetricRecord({weighted_by_key: 1})}
        records = [
            RecordDict(
                {
                    arrays_key: ArrayRecord({k: v for k, v in state.items() if k not in lora_keys}),
                    **(equal_weight if self.uniform_weights else content.metric_records),
                }
            )
            for state, content in zip(states, contents, strict=True)
        ]
        mean = aggregate_arrayrecords(records, weighted_by_key).to_torch_state_dict()
        equal = [1.0 / len(states)] * len(states)
        weights = equal if self.uniform_weights else example_weights(contents, weighted_by_key)
        report: dict[str, Any] = {"method": self.method}
        if pairs:
            mean, svd_report = self._svd_mean(states, weights, pairs, mean)
            report.update(svd_report)
        clients = [{**previous, **state} for state in states]  # each client's whole model
        # the exact mean of the clients' models, per adapted matrix (empty for FedAvg)
        target = weighted_sum([adapted_weights(client, self.lora_alpha) for client in clients], weights)
        if self.method == "exact":
            residual, residual_report = self._residual(target, {**previous, **mean})
            mean.update(residual)
            report.update(residual_report)
        order = previous or states[0]  # keep the shipped key order
        ordered = {key: mean[key] if key in mean else previous[key] for key in order}
        if not lora_pairs(ordered):
            return to_wire(ordered, self.wire_dtype), None  # FedAvg; FFA-LoRA (A never travels): exact
        report["error"] = self._error(target, previous, ordered)
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
            "rank": self.rank,
            "client_ranks": sorted({state[next(iter(pairs.values()))[0]].shape[0] for state in states}),
            "truncation_error": (tail / total) ** 0.5 if total > 0 else 0.0,
            "max_module_truncation_error": worst,
        }
        return mean, report

    def _residual(
        self, target: dict[str, torch.Tensor], averaged: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The residual that makes `averaged` (naive factors) the exact mean `target` (the clients'
        adapted weights, their residual included): `target` less the averaged factors' B·A·alpha/r."""
        residuals = {
            module: target[module] - delta_weight(averaged[key_a], averaged[key_b], self.lora_alpha)
            for module, (key_a, key_b) in lora_pairs(averaged).items()
        }
        state, tail, total = residual_state(residuals, self.residual_rank)
        report = {
            "residual_rank": self.residual_rank,
            "residual_elements": sum(tensor.numel() for tensor in state.values()),
            "residual_truncation_error": (tail / total) ** 0.5 if total > 0 else 0.0,
        }
        return state, report

    def _error(
        self, exact: dict[str, torch.Tensor], previous: dict[str, torch.Tensor], new: dict[str, torch.Tensor]
    ) -> float:
        """||new global update - exact mean update||_F / ||exact mean update||_F, over all adapted matrices
        (`exact`: the clients' mean adapted weights).

        Updates are taken from the global model the clients trained from (`previous`; without it,
        from the pre-trained weights). 0 when the new global model is the clients' exact mean.
        """
        got = adapted_weights(new, self.lora_alpha)
        start = adapted_weights(previous, self.lora_alpha) if previous else {}
        off = sum(float((got[m] - exact[m]).pow(2).sum()) for m in exact)
        moved = sum(float((exact[m] - start.get(m, 0.0)).pow(2).sum()) for m in exact)
        return (off / moved) ** 0.5 if moved > 0 else 0.0


def weighted_sum(per_client: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ_i w_i · x_i, key by key."""
    return {key: sum(w * x[key] for x, w in zip(per_client, weights, strict=True)) for key in per_client[0]}

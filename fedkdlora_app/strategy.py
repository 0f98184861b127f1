"""The server's strategy: Flower's FedAvg, thinly extended, with small helpers for the bookkeeping.

How the pieces stack, inside out: `TrackedFedAvg` (FedAvg + update screen + the run's
`UpdateAggregator`, naive or SVD) -> optionally Flower's fixed-clipping DP wrapper
(`private_strategy`) -> optionally `ServerStep` (FedKDLoRA's distillation on the
aggregate). Bookkeeping lives in `RoundLedger` (bytes, failures, placements),
`UpdateScreen`, `NodeRanks` (per-node LoRA ranks under svd) and `OncePerNode`
(the client-KD teacher).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.supercore.differential_privacy import compute_stdv

from fedkdlora_app.aggregation import UpdateAggregator, lora_rank, update_problem
from fedkdlora_app.config import RunConfig
from fedkdlora_app.metrics import aggregate_evaluate_metrics, aggregate_train_metrics
from fedkdlora_app.protocol import ARRAYS_KEY, CONFIG_KEY, NO_TEACHER, NUM_EXAMPLES_KEY, PLACEMENT_KEY
from fedkdlora_app.results import RunRecorder

AfterAggregate = Callable[[int, ArrayRecord], ArrayRecord]


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialised arrays a message carries."""
    return sum(len(array.data) for array in record.values())


def payload_params(record: ArrayRecord) -> int:
    """Parameters (array elements) a message carries."""
    return sum(int(np.prod(array.shape)) for array in record.values())


class RoundLedger:
    """Per-round bookkeeping of messages: bytes each way per node, placements, and failures.

    It remembers the last stage's messages, so that a reply with an error is charged to
    the node the message went to, and a message without a reply becomes a failure too.
    """

    def __init__(self, recorder: RunRecorder, arrays_key: str, round_timeout: float | None = None) -> None:
        self.recorder = recorder
        self.arrays_key = arrays_key
        self.round_timeout = round_timeout  # what `Strategy.start(timeout=...)` was given
        self._in_flight: list[Message] = []

    def sent(self, server_round: int, stage: str, messages: list[Message]) -> None:
        """Messages about to go out: their bytes down, and they now await replies."""
        self._in_flight = messages
        for message in messages:
            record = message.content.array_records[self.arrays_key]
            self.recorder.add_bytes(
                server_round, message.metadata.dst_node_id, "down", stage, payload_bytes(record)
            )
        if messages:
            record = messages[0].content.array_records[self.arrays_key]
            self.recorder.set_params_per_message(server_round, stage, payload_params(record))

    def sent_extra(self, server_round: int, node_id: int, stage: str, record: ArrayRecord) -> None:
        """Arrays added to one node's message (the client-KD teacher), counted under their own stage."""
        self.recorder.add_bytes(server_round, node_id, "down", stage, payload_bytes(record))

    def settle(self, server_round: int, stage: str, replies: list[Message]) -> tuple[list[Message], dict]:
        """(replies without error, {node id: error reason}); records every failure of the stage once.

        A node that went away cannot reply: the SuperLink answers for it (source node 1),
        so the failure names the node the message was sent to. A node that stays
        connected but hangs sends nothing: Flower's grid stops waiting after the round
        timeout and returns the replies it has, so the missing ones are recorded here.
        """
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self._in_flight}
        answered = {reply.metadata.reply_to_message_id for reply in replies}
        ok, errors = [], {}
        for reply in replies:
            if reply.has_error():
                node_id = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
                self.recorder.add_failure(server_round, stage, node_id, reply.error.reason)
                errors[node_id] = reply.error.reason
            else:
                ok.append(reply)
                self._record_placement(server_round, stage, reply)
        for message_id, node_id in sent_to.items():
            if message_id and message_id not in answered:
                self.recorder.add_failure(
                    server_round, stage, node_id, f"no reply within round-timeout = {self.round_timeout} s"
                )
        self._in_flight = []  # each message's outcome is recorded once
        return ok, errors

    def received_update(self, server_round: int, reply: Message) -> None:
        records = reply.content.array_records
        if self.arrays_key in records:
            self.recorder.add_bytes(
                server_round,
                reply.metadata.src_node_id,
                "up",
                "train",
                payload_bytes(records[self.arrays_key]),
            )

    def _record_placement(self, server_round: int, stage: str, reply: Message) -> None:
        """Where the client computed (device, Ray's GPU ids, peak memory), as its reply says."""
        record = reply.content.config_records.get(PLACEMENT_KEY)
        if record is not None:
            self.recorder.set_placement(server_round, stage, reply.metadata.src_node_id, dict(record))


@dataclass
class UpdateScreen:
    """Whether a client's train reply may enter the average (`aggregation.update_problem`)."""

    aggregator: UpdateAggregator
    arrays_key: str
    weighted_by_key: str
    max_examples: int | None = None
    sent: ArrayRecord | None = None  # this round's global arrays, as sent

    def problem(self, content: RecordDict) -> str | None:
        return update_problem(
            content, self.sent, self.aggregator, self.arrays_key, self.weighted_by_key, self.max_examples
        )


@dataclass
class NodeRanks:
    """Under svd, each node's LoRA rank (from its last update), so it gets the global factors at it."""

    aggregator: UpdateAggregator
    arrays_key: str
    ranks: dict[int, int] = field(default_factory=dict)

    def remember(self, node_id: int, content: RecordDict) -> None:
        rank = lora_rank(content.array_records[self.arrays_key])
        if rank is not None:
            self.ranks[node_id] = rank

    def fit(self, messages: list[Message]) -> None:
        """A node seen for the first time gets the global rank and fits it on arrival."""
        if not self.aggregator.rank_may_differ:
            return
        fitted: dict[int, ArrayRecord] = {}
        for message in messages:
            rank = self.ranks.get(message.metadata.dst_node_id, self.aggregator.rank)
            if rank == self.aggregator.rank:
                continue
            if rank not in fitted:
                fitted[rank] = self.aggregator.for_rank(message.content.array_records[self.arrays_key], rank)
            message.content = RecordDict({**message.content, self.arrays_key: fitted[rank]})


@dataclass
class OncePerNode:
    """Records a node needs once (the client-KD teacher), until it has replied to a message carrying them."""

    records: dict[str, ArrayRecord | ConfigRecord]
    served: set[int] = field(default_factory=set)

    def attach(self, messages: list[Message]) -> list[tuple[int, ArrayRecord]]:
        """Add the records to the messages of nodes not yet served; (node, arrays) added, for the ledger.

        FedAvg gives every message the same RecordDict: the records go into a copy for
        this node's message only.
        """
        added = []
        for message in messages if self.records else []:
            node_id = message.metadata.dst_node_id
            if node_id in self.served:
                continue
            message.content = RecordDict({**message.content, **self.records})
            added += [(node_id, r) for r in self.records.values() if isinstance(r, ArrayRecord)]
        return added

    def settle(self, replied: list[int], errors: dict[int, str]) -> None:
        """Nodes that replied got the records; one that lost them (NO_TEACHER) gets them again."""
        self.served.update(replied)
        self.served.difference_update(node for node, reason in errors.items() if NO_TEACHER in reason)


def _in_run_rounds(method: Callable) -> Callable:
    """Flower's `Strategy.start` counts rounds from 1; a resumed run's rounds continue after the offset."""

    @functools.wraps(method)
    def shifted(self: TrackedFedAvg, server_round: int, *args: Any) -> Any:
        return method(self, server_round + self.round_offset, *args)

    return shifted


class TrackedFedAvg(FedAvg):
    """Flower's FedAvg, with the run's update screen and aggregator, reporting each round.

    Sampling, messaging and metric averaging are FedAvg's; the bookkeeping is delegated
    to `RoundLedger`, `UpdateScreen`, `NodeRanks` and `OncePerNode`.
    """

    def __init__(
        self,
        recorder: RunRecorder,
        once_per_node: Mapping[str, ArrayRecord | ConfigRecord] | None = None,
        max_examples_per_update: int | None = None,
        round_offset: int = 0,
        aggregator: UpdateAggregator | None = None,
        round_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("arrayrecord_key", ARRAYS_KEY)
        kwargs.setdefault("configrecord_key", CONFIG_KEY)
        kwargs.setdefault("weighted_by_key", NUM_EXAMPLES_KEY)
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_train_metrics)
        kwargs.setdefault("evaluate_metrics_aggr_fn", aggregate_evaluate_metrics)
        super().__init__(**kwargs)
        self.recorder = recorder
        self.round_offset = round_offset
        self.aggregator = aggregator or UpdateAggregator()
        self.ledger = RoundLedger(recorder, self.arrayrecord_key, round_timeout)
        self.screen = UpdateScreen(
            self.aggregator, self.arrayrecord_key, self.weighted_by_key, max_examples_per_update
        )
        self.node_ranks = NodeRanks(self.aggregator, self.arrayrecord_key)
        self.once_per_node = OncePerNode(dict(once_per_node or {}))

    @_in_run_rounds
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.recorder.start_round(server_round)
        self.recorder.set_aggregated_updates(server_round, 0)  # until aggregate_train says otherwise
        self.screen.sent = arrays
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.node_ranks.fit(messages)
        self.ledger.sent(server_round, "train", messages)
        for node_id, record in self.once_per_node.attach(messages):
            self.ledger.sent_extra(server_round, node_id, "teacher", record)
        return messages

    @_in_run_rounds
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ok, errors = self.ledger.settle(server_round, "train", list(replies))
        self.once_per_node.settle([reply.metadata.src_node_id for reply in ok], errors)
        accepted = []
        for reply in ok:
            node_id = reply.metadata.src_node_id
            self.ledger.received_update(server_round, reply)
            problem = self.screen.problem(reply.content)
            if problem is None:
                accepted.append(reply)
                self.node_ranks.remember(node_id, reply.content)
            else:
                log(WARNING, "round %d: update of node %d dropped: %s", server_round, node_id, problem)
                self.recorder.add_failure(server_round, "train", node_id, f"rejected update: {problem}")
        self.recorder.set_aggregated_updates(server_round, len(accepted))
        if not accepted:
            return None, None
        # Float sums depend on their order; arrival order varies from run to run.
        accepted.sort(key=self._content_digest)
        contents = [reply.content for reply in accepted]
        arrays, report = self.aggregator(contents, self.arrayrecord_key, self.weighted_by_key)
        if report is not None:
            self.recorder.set_aggregation(server_round, report)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        self.recorder.set_client_metrics(server_round, "train", dict(metrics))
        return arrays, metrics

    @_in_run_rounds
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.node_ranks.fit(messages)
        self.ledger.sent(server_round, "evaluate", messages)
        return messages

    @_in_run_rounds
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self.ledger.settle(server_round, "evaluate", replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.recorder.set_client_metrics(server_round, "evaluate", dict(metrics))
        return metrics

    def _content_digest(self, reply: Message) -> str:
        digest = hashlib.sha1()
        for array in reply.content.array_records[self.arrayrecord_key].values():
            digest.update(array.data)
        return digest.hexdigest()


class ServerStep(Strategy):
    """The scheme's step between aggregation and the next global model (FedKDLoRA's distillation).

    It wraps the outermost strategy, so it sees what would otherwise become the next
    global model: under DP, the noised aggregate (distillation on public data is then
    post-processing and keeps the privacy guarantee). In Flower 1.42 the aggregate
    becomes the global model only through `aggregate_train`'s return value.
    `before_train` runs as the train messages go out (work that can overlap the
    clients' training); `without_aggregate` when a round aggregated nothing.
    """

    def __init__(
        self,
        strategy: Strategy,
        step: AfterAggregate,
        round_offset: int = 0,
        before_train: Callable[[int], None] | None = None,
        without_aggregate: Callable[[int], None] | None = None,
    ) -> None:
        self.strategy = strategy
        self.step = step
        self.round_offset = round_offset
        self.before_train = before_train
        self.without_aggregate = without_aggregate

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if messages and self.before_train is not None:
            self.before_train(server_round + self.round_offset)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            arrays = self.step(server_round + self.round_offset, arrays)
        elif self.without_aggregate is not None:
            self.without_aggregate(server_round + self.round_offset)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


class _TrackedPrivacy:
    """What this project adds to Flower's DP wrappers, as a mixin before them in the MRO.

    Flower's wrappers skip a round's aggregation when any reply failed, without calling
    the inner strategy; the failures are then recorded here.
    """

    strategy: TrackedFedAvg

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if any(reply.has_error() for reply in replies):
            round_in_run = server_round + self.strategy.round_offset
            self.strategy.ledger.settle(round_in_run, "train", replies)
            log(WARNING, "round %d: DP aggregation skipped: a sampled client failed", round_in_run)
        return super().aggregate_train(server_round, replies)


class TrackedServerSideClippingDP(_TrackedPrivacy, DifferentialPrivacyServerSideFixedClipping):
    """Flower's central DP, clipping each update on the server."""


class TrackedClientSideClippingDP(_TrackedPrivacy, DifferentialPrivacyClientSideFixedClipping):
    """Flower's central DP, updates clipped by the clients' `fixedclipping_mod`."""


DP_WRAPPERS = {"server": TrackedServerSideClippingDP, "client": TrackedClientSideClippingDP}


def private_strategy(strategy: TrackedFedAvg, config: RunConfig) -> Strategy:
    """`strategy` inside Flower's fixed-clipping DP wrapper the run config asks for.

    The noise's standard deviation is multiplier x clipping norm / sampled clients; the
    sampled clients are taken as `min-available-nodes` x `fraction-train`.
    """
    return DP_WRAPPERS[config.dp_clipping](
        strategy,
        config.dp_noise_multiplier,
        config.dp_clipping_norm,
        dp_sampled_clients(config),
    )


def dp_sampled_clients(config: RunConfig) -> int:
    """The cohort size the DP noise is calibrated for (FedAvg samples this many of the nodes)."""
    return max(1, int(config.min_available_nodes * config.fraction_train))


def privacy_info(config: RunConfig) -> dict[str, Any]:
    """The DP settings for the results JSON: the Flower wrapper and the noise it adds."""
    sampled = dp_sampled_clients(config)
    flower_wrapper = DP_WRAPPERS[config.dp_clipping].__bases__[1]
    return {
        "mechanism": flower_wrapper.__name__,
        "noise_multiplier": config.dp_noise_multiplier,
        "clipping_norm": config.dp_clipping_norm,
        "sampled_clients": sampled,
        "noise_std": compute_stdv(config.dp_noise_multiplier, config.dp_clipping_norm, sampled),
    }

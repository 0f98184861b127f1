"""FedAvg with the bookkeeping this project reports, a choice of LoRA aggregation, a hook after it.

Flower's FedAvg does the node sampling and messaging; this subclass observes the
messages (bytes each way, per node; failed replies), screens updates, aggregates them
with the run's `UpdateAggregator` (naive or SVD, decoded from the wire dtype), and lets
a scheme transform the aggregate before it becomes the next global model, which in
Flower 1.42 happens only through `aggregate_train`'s return value. Central DP wraps it
in Flower's own fixed-clipping wrappers (`private_strategy`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
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
from fedkdlora_app.protocol import NO_TEACHER, PLACEMENT_KEY
from fedkdlora_app.results import RunRecorder

AfterAggregate = Callable[[int, ArrayRecord], ArrayRecord]


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialised arrays a message carries."""
    return sum(len(array.data) for array in record.values())


def payload_params(record: ArrayRecord) -> int:
    """Parameters (array elements) a message carries."""
    return sum(int(np.prod(array.shape)) for array in record.values())


class TrackedFedAvg(FedAvg):
    """FedAvg that records communication, failures and client metrics per round."""

    def __init__(
        self,
        recorder: RunRecorder,
        after_aggregate: AfterAggregate | None = None,
        once_per_node: Mapping[str, ArrayRecord | ConfigRecord] | None = None,
        max_examples_per_update: int | None = None,
        round_offset: int = 0,
        aggregator: UpdateAggregator | None = None,
        round_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_train_metrics)
        kwargs.setdefault("evaluate_metrics_aggr_fn", aggregate_evaluate_metrics)
        super().__init__(**kwargs)
        self.recorder = recorder
        self.after_aggregate = after_aggregate
        self.once_per_node = dict(once_per_node or {})
        self._nodes_served_once: set[int] = set()
        self.max_examples_per_update = max_examples_per_update
        self.aggregator = aggregator or UpdateAggregator()
        self._node_ranks: dict[int, int] = {}  # LoRA rank of each node's last update (svd)
        self._sent_arrays: ArrayRecord | None = None
        # The last stage's messages: the grid sets their ids when it pushes them.
        self._in_flight: list[Message] = []
        # `Strategy.start` counts from 1; a resumed run's rounds continue after the offset.
        self.round_offset = round_offset
        # What `Strategy.start(timeout=...)` was given: a message without a reply by then failed.
        self.round_timeout = round_timeout

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        self.recorder.start_round(server_round)
        self.recorder.set_aggregated_updates(server_round, 0)  # until aggregate_train says otherwise
        self._sent_arrays = arrays
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._fit_to_node_ranks(messages)
        self._count_down(server_round, "train", messages)
        self._attach_once_per_node(server_round, messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        accepted = []
        for reply in self.successful_replies(server_round, "train", list(replies)):
            node_id = reply.metadata.src_node_id
            self._record_placement(server_round, "train", reply)
            self._nodes_served_once.add(node_id)  # it replied, so it got what it needed once
            records = reply.content.array_records
            if self.arrayrecord_key in records:
                self.recorder.add_bytes(
                    server_round, node_id, "up", "train", payload_bytes(records[self.arrayrecord_key])
                )
            problem = self.update_problem(reply.content)
            if problem is None:
                accepted.append(reply)
                rank = lora_rank(records[self.arrayrecord_key])
                if rank is not None:
                    self._node_ranks[node_id] = rank
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
        if self.after_aggregate is not None:
            arrays = self.after_aggregate(server_round, arrays)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        self.recorder.set_client_metrics(server_round, "train", dict(metrics))
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._fit_to_node_ranks(messages)
        self._count_down(server_round, "evaluate", messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        replies = list(replies)
        for reply in self.successful_replies(server_round, "evaluate", replies):
            self._record_placement(server_round, "evaluate", reply)
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.recorder.set_client_metrics(server_round, "evaluate", dict(metrics))
        return metrics

    def _record_placement(self, server_round: int, stage: str, reply: Message) -> None:
        """Where the client computed (device, Ray's GPU ids, peak memory), as its reply says."""
        record = reply.content.config_records.get(PLACEMENT_KEY)
        if record is not None:
            self.recorder.set_placement(server_round, stage, reply.metadata.src_node_id, dict(record))

    def _fit_to_node_ranks(self, messages: list[Message]) -> None:
        """Under svd, a node whose rank is known (from its last update) gets the global factors at it.

        A node seen for the first time gets the global rank and fits it on arrival.
        """
        if not self.aggregator.rank_may_differ:
            return
        fitted: dict[int, ArrayRecord] = {}
        for message in messages:
            rank = self._node_ranks.get(message.metadata.dst_node_id, self.aggregator.rank)
            if rank == self.aggregator.rank:
                continue
            if rank not in fitted:
                fitted[rank] = self.aggregator.for_rank(
                    message.content.array_records[self.arrayrecord_key], rank
                )
            message.content = RecordDict({**message.content, self.arrayrecord_key: fitted[rank]})

    def _count_down(self, server_round: int, stage: str, messages: list[Message]) -> None:
        self._in_flight = messages
        for message in messages:
            record = message.content.array_records[self.arrayrecord_key]
            self.recorder.add_bytes(
                server_round, message.metadata.dst_node_id, "down", stage, payload_bytes(record)
            )
        if messages:
            self.recorder.set_params_per_message(
                server_round, stage, payload_params(messages[0].content.array_records[self.arrayrecord_key])
            )

    def _content_digest(self, reply: Message) -> str:
        digest = hashlib.sha1()
        for array in reply.content.array_records[self.arrayrecord_key].values():
            digest.update(array.data)
        return digest.hexdigest()

    def update_problem(self, content: RecordDict) -> str | None:
        """Why a client's train reply must not enter the average (`aggregation.update_problem`), or None."""
        return update_problem(
            content,
            self._sent_arrays,
            self.aggregator,
            self.arrayrecord_key,
            self.weighted_by_key,
            self.max_examples_per_update,
        )

    def _attach_once_per_node(self, server_round: int, messages: list[Message]) -> None:
        """Records a node needs once (the client-KD teacher), until it has replied to a message carrying them.

        FedAvg gives every message the same RecordDict: the records go into a copy for
        this node's message only.
        """
        if not self.once_per_node:
            return
        for message in messages:
            node_id = message.metadata.dst_node_id
            if node_id in self._nodes_served_once:
                continue
            message.content = RecordDict({**message.content, **self.once_per_node})
            for record in self.once_per_node.values():
                if isinstance(record, ArrayRecord):
                    self.recorder.add_bytes(server_round, node_id, "down", "teacher", payload_bytes(record))

    def successful_replies(self, server_round: int, stage: str, replies: list[Message]) -> list[Message]:
        """Replies without error; the others, and messages left without a reply, are failures of the round.

        A node that went away cannot reply: the SuperLink answers for it (source node 1),
        so the failure names the node the message was sent to. A node that stays
        connected but hangs sends nothing: Flower's grid stops waiting after the round
        timeout and returns the replies it has, so the missing ones are recorded here.
        """
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self._in_flight}
        answered = {reply.metadata.reply_to_message_id for reply in replies}
        ok = []
        for reply in replies:
            if reply.has_error():
                node_id = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
                self.recorder.add_failure(server_round, stage, node_id, reply.error.reason)
                if NO_TEACHER in reply.error.reason:  # it lost the one-time records: send them again
                    self._nodes_served_once.discard(node_id)
            else:
                ok.append(reply)
        for message_id, node_id in sent_to.items():
            if message_id and message_id not in answered:
                self.recorder.add_failure(
                    server_round, stage, node_id, f"no reply within round-timeout = {self.round_timeout} s"
                )
        self._in_flight = []  # each message's outcome is recorded once
        return ok


class _TrackedPrivacy:
    """What this project adds to Flower's DP wrappers, as a mixin before them in the MRO.

    Flower's wrappers skip a round's aggregation when any reply failed, without calling
    the inner strategy, so the failures are recorded here. The scheme's after-aggregation
    step (FedKDLoRA's distillation) runs here, on the noised aggregate: distillation on
    public data is then post-processing, which keeps the privacy guarantee; run inside
    the inner strategy it would see the aggregate before the noise.
    """

    strategy: TrackedFedAvg

    def __init__(
        self,
        strategy: TrackedFedAvg,
        *args: Any,
        after_aggregate: AfterAggregate | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(strategy, *args, **kwargs)
        self.after_aggregate = after_aggregate

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        round_in_run = server_round + self.strategy.round_offset
        if any(reply.has_error() for reply in replies):
            self.strategy.successful_replies(round_in_run, "train", replies)
            log(WARNING, "round %d: DP aggregation skipped: a sampled client failed", round_in_run)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self.after_aggregate is not None:
            arrays = self.after_aggregate(round_in_run, arrays)
        return arrays, metrics


class TrackedServerSideClippingDP(_TrackedPrivacy, DifferentialPrivacyServerSideFixedClipping):
    """Flower's central DP, clipping each update on the server."""


class TrackedClientSideClippingDP(_TrackedPrivacy, DifferentialPrivacyClientSideFixedClipping):
    """Flower's central DP, updates clipped by the clients' `fixedclipping_mod`."""


DP_WRAPPERS = {"server": TrackedServerSideClippingDP, "client": TrackedClientSideClippingDP}


def private_strategy(
    strategy: TrackedFedAvg, config: RunConfig, after_aggregate: AfterAggregate | None
) -> Strategy:
    """`strategy` inside Flower's fixed-clipping DP wrapper the run config asks for.

    The noise's standard deviation is multiplier x clipping norm / sampled clients; the
    sampled clients are taken as `min-available-nodes` x `fraction-train`.
    """
    return DP_WRAPPERS[config.dp_clipping](
        strategy,
        config.dp_noise_multiplier,
        config.dp_clipping_norm,
        dp_sampled_clients(config),
        after_aggregate=after_aggregate,
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

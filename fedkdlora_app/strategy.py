"""FedAvg with the bookkeeping this project reports, and a hook after aggregation.

Flower's FedAvg already does the example-weighted mean and node sampling; this subclass
only observes the messages (bytes each way, per node; failed replies) and lets a scheme
transform the aggregated model before it becomes the next global model, which in
Flower 1.42 happens only through `aggregate_train`'s return value.
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
from flwr.serverapp.strategy import FedAvg

from fedkdlora_app.metrics import aggregate_evaluate_metrics, aggregate_train_metrics
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
        self._sent_arrays: ArrayRecord | None = None
        # `Strategy.start` counts from 1; a resumed run's rounds continue after the offset.
        self.round_offset = round_offset

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        self.recorder.start_round(server_round)
        self._sent_arrays = arrays
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._count_down(server_round, "train", messages)
        self._attach_once_per_node(server_round, messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        accepted = []
        for reply in self._successful(server_round, "train", list(replies)):
            node_id = reply.metadata.src_node_id
            self._nodes_served_once.add(node_id)  # it replied, so it got what it needed once
            records = reply.content.array_records
            if self.arrayrecord_key in records:
                self.recorder.add_bytes(
                    server_round, node_id, "up", "train", payload_bytes(records[self.arrayrecord_key])
                )
            problem = self.update_problem(reply.content)
            if problem is None:
                accepted.append(reply)
            else:
                log(WARNING, "round %d: update of node %d dropped: %s", server_round, node_id, problem)
                self.recorder.add_failure(server_round, "train", node_id, f"rejected update: {problem}")
        # Float sums depend on their order; arrival order varies from run to run.
        accepted.sort(key=self._content_digest)
        arrays, metrics = super().aggregate_train(server_round, accepted)
        if arrays is not None and self.after_aggregate is not None:
            arrays = self.after_aggregate(server_round, arrays)
        if metrics is not None:
            self.recorder.set_client_metrics(server_round, "train", dict(metrics))
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._count_down(server_round, "evaluate", messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        replies = list(replies)
        self._successful(server_round, "evaluate", replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.recorder.set_client_metrics(server_round, "evaluate", dict(metrics))
        return metrics

    def _count_down(self, server_round: int, stage: str, messages: list[Message]) -> None:
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
        """Why a client's train reply must not enter the average, or None if it may.

        It must carry the arrays that were sent (same names, shapes, dtypes), all finite,
        and a positive example count no larger than a partition can hold.
        """
        record = content.array_records.get(self.arrayrecord_key)
        if record is None or len(content.array_records) != 1:
            return f"expected exactly one ArrayRecord '{self.arrayrecord_key}'"
        sent = self._sent_arrays
        if sent is not None and set(record) != set(sent):
            missing, unexpected = sorted(set(sent) - set(record)), sorted(set(record) - set(sent))
            return f"array names differ from those sent (missing {missing[:3]}, unexpected {unexpected[:3]})"
        for name, array in record.items():
            if sent is not None and (array.shape, array.dtype) != (sent[name].shape, sent[name].dtype):
                return (
                    f"array '{name}' is {array.dtype}{list(array.shape)}, "
                    f"sent as {sent[name].dtype}{list(sent[name].shape)}"
                )
            if not np.isfinite(array.numpy()).all():
                return f"array '{name}' holds NaN or Inf"
        metrics = list(content.metric_records.values())
        count = metrics[0].get(self.weighted_by_key) if len(metrics) == 1 else None
        if not isinstance(count, int) or count < 1:
            return f"'{self.weighted_by_key}' must be a positive integer, got {count!r}"
        if self.max_examples_per_update is not None and count > self.max_examples_per_update:
            return (
                f"claims {count} examples, more than the {self.max_examples_per_update} "
                "a client partition can hold"
            )
        return None

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

    def _successful(self, server_round: int, stage: str, replies: list[Message]) -> list[Message]:
        """Replies without error; the others are recorded as failures of the round."""
        ok = []
        for reply in replies:
            if reply.has_error():
                self.recorder.add_failure(server_round, stage, reply.metadata.src_node_id, reply.error.reason)
            else:
                ok.append(reply)
        return ok

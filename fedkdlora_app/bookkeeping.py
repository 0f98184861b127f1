"""The strategy's bookkeeping, apart from Flower's FedAvg logic: what was sent and answered, per round.

`RoundLedger` (bytes each way per node, placements, failures), `UpdateScreen` (whether a
reply may enter the average), `NodeRanks` (per-node LoRA ranks under svd) and
`OncePerNode` (records a node needs once: the client-KD teacher).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, RecordDict

from fedkdlora_app.aggregation import UpdateAggregator, lora_rank, update_problem
from fedkdlora_app.protocol import NO_TEACHER_ERROR_CODE, PLACEMENT_KEY
from fedkdlora_app.results import RunRecorder


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

    def settle(
        self, server_round: int, stage: str, replies: list[Message]
    ) -> tuple[list[Message], dict[int, Error]]:
        """(replies without error, {node id: its error}); records every failure of the stage once.

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
                errors[node_id] = reply.error
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

    def settle(self, replied: list[int], errors: dict[int, Error]) -> None:
        """Nodes that replied got the records; one that lost them (its error's code) gets them again."""
        self.served.update(replied)
        lost = [node for node, error in errors.items() if error.code == NO_TEACHER_ERROR_CODE]
        self.served.difference_update(lost)

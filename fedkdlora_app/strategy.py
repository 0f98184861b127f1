"""The server's strategy: Flower's FedAvg, thinly extended, with small helpers for the bookkeeping.

How the pieces stack, inside out: `TrackedFedAvg` (FedAvg + update screen + the run's
`UpdateAggregator`, naive or SVD) -> optionally Flower's fixed-clipping DP wrapper
(`privacy.private_strategy`) -> optionally `ServerStep` (FedKDLoRA's distillation on the
aggregate). The bookkeeping lives in `bookkeeping.py`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedkdlora_app.aggregation import UpdateAggregator
from fedkdlora_app.bookkeeping import NodeRanks, OncePerNode, RoundLedger, UpdateScreen
from fedkdlora_app.metrics import aggregate_evaluate_metrics, aggregate_train_metrics
from fedkdlora_app.protocol import ARRAYS_KEY, CONFIG_KEY, NUM_EXAMPLES_KEY
from fedkdlora_app.results import RunRecorder
from fedkdlora_app.sampling import PartitionRoster

AfterAggregate = Callable[[int, ArrayRecord], ArrayRecord]


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
        aggregator: UpdateAggregator | None = None,
        round_timeout: float | None = None,
        roster: PartitionRoster | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("arrayrecord_key", ARRAYS_KEY)
        kwargs.setdefault("configrecord_key", CONFIG_KEY)
        kwargs.setdefault("weighted_by_key", NUM_EXAMPLES_KEY)
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_train_metrics)
        kwargs.setdefault("evaluate_metrics_aggr_fn", aggregate_evaluate_metrics)
        super().__init__(**kwargs)
        self.recorder = recorder
        self.aggregator = aggregator or UpdateAggregator()
        self.ledger = RoundLedger(recorder, self.arrayrecord_key, round_timeout)
        self.screen = UpdateScreen(
            self.aggregator, self.arrayrecord_key, self.weighted_by_key, max_examples_per_update
        )
        self.node_ranks = NodeRanks(self.aggregator, self.arrayrecord_key)
        self.sent: ArrayRecord | None = None  # this round's global arrays, as sent
        self.once_per_node = OncePerNode(dict(once_per_node or {}))
        self.roster = roster  # partial participation: sample by partition, seeded per round

    def _sampling_grid(self, grid: Grid, server_round: int, stage: str) -> Grid:
        """The grid FedAvg samples `stage` from, once `min_available_nodes` are online.

        FedAvg sizes its sample from the nodes online before it waits for them, so a node
        still rejoining would leave the stage a node short: the wait (Flower's own) comes
        first. Under a roster, the nodes are listed by partition and the sample seeded.
        """
        sample_nodes(grid, self.min_available_nodes, 0)  # waits; samples none
        return self.roster.grid_for(grid, server_round, stage) if self.roster else grid

    def _record_sample(self, server_round: int, stage: str, messages: list[Message]) -> None:
        if self.roster is not None:
            partitions = self.roster.partitions_of(m.metadata.dst_node_id for m in messages)
            self.recorder.set_sampled_partitions(server_round, stage, partitions)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.recorder.start_round(server_round)
        self.recorder.set_aggregated_updates(server_round, 0)  # until aggregate_train says otherwise
        self.sent = arrays
        self.screen.sent = self.aggregator.reply_template(arrays, server_round)
        sampling_grid = self._sampling_grid(grid, server_round, "train")
        messages = list(super().configure_train(server_round, arrays, config, sampling_grid))
        self._record_sample(server_round, "train", messages)
        self.node_ranks.fit(messages)
        self.ledger.sent(server_round, "train", messages)
        for node_id, record in self.once_per_node.attach(messages):
            self.ledger.sent_extra(server_round, node_id, "teacher", record)
        return messages

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
        arrays, report = self.aggregator(contents, self.arrayrecord_key, self.weighted_by_key, self.sent)
        if report is not None:
            self.recorder.set_aggregation(server_round, report)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        self.recorder.set_client_metrics(server_round, "train", dict(metrics))
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        sampling_grid = self._sampling_grid(grid, server_round, "evaluate")
        messages = list(super().configure_evaluate(server_round, arrays, config, sampling_grid))
        self._record_sample(server_round, "evaluate", messages)
        self.node_ranks.fit(messages)
        self.ledger.sent(server_round, "evaluate", messages)
        return messages

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
        before_train: Callable[[int], None] | None = None,
        without_aggregate: Callable[[int], None] | None = None,
    ) -> None:
        self.strategy = strategy
        self.step = step
        self.before_train = before_train
        self.without_aggregate = without_aggregate

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if messages and self.before_train is not None:
            self.before_train(server_round)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            arrays = self.step(server_round, arrays)
        elif self.without_aggregate is not None:
            self.without_aggregate(server_round)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


class ContinuedRounds(Strategy):
    """The outermost strategy: Flower's `Strategy.start` counts rounds from 1; a run resumed after
    `completed_rounds` continues from there. The one place that offset is applied: every strategy
    inside, and the evaluate function, see the run's own round numbers."""

    def __init__(self, strategy: Strategy, completed_rounds: int = 0) -> None:
        self.strategy = strategy
        self.completed_rounds = completed_rounds

    def start(self, *, evaluate_fn: Callable[[int, ArrayRecord], Any] | None = None, **kwargs: Any) -> Any:
        def in_run_rounds(server_round: int, arrays: ArrayRecord) -> Any:
            return evaluate_fn(server_round + self.completed_rounds, arrays)

        return super().start(evaluate_fn=in_run_rounds if evaluate_fn else None, **kwargs)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.completed_rounds, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.completed_rounds, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.completed_rounds, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.completed_rounds, replies)

    def summary(self) -> None:
        self.strategy.summary()

"""Which clients a round samples: a function of the run's seed and the round, not of node ids.

FedAvg samples `random.sample(list(grid.get_node_ids()), k)`. Node ids are random (per
simulation run, per SuperNode start), so under partial participation one seed would draw
different clients in each run: two schemes compared on a seed would train on different
clients, and a resumed run would not continue the interrupted one. `PartitionRoster` asks
each node once for its partition id (a `query` message) and hands FedAvg a grid that lists
the nodes by partition and seeds `random` from (seed, round, stage) each time it lists them,
so after any roll call too: Flower's grid draws from `random` while it waits for replies
(jittered retries), as often as the timing makes it. FedAvg samples right after listing.
Under full participation every node is sampled and none of this is needed.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedkdlora_app.protocol import PARTITION_ID_KEY, ROLL_CALL_KEY
from fedkdlora_app.seeding import sampling_seed


class PartitionRoster:
    """Nodes' partition ids, asked once per node; nodes that did not answer sort last, by id."""

    def __init__(self, seed: int, timeout: float | None) -> None:
        self.seed = seed
        self.timeout = timeout
        self.partitions: dict[int, int] = {}
        self.asked: set[int] = set()

    def grid_for(self, grid: Grid, server_round: int, stage: str) -> Grid:
        """`grid` as FedAvg should sample from it for `stage` of `server_round`."""
        return PartitionOrderedGrid(grid, self, sampling_seed(self.seed, server_round, stage))

    def partitions_of(self, node_ids: Iterable[int]) -> list[int]:
        """The partitions of sampled nodes (-1: a node that never answered the roll call)."""
        return sorted(self.partitions.get(node_id, -1) for node_id in node_ids)

    def order(self, grid: Grid, node_ids: Iterable[int]) -> list[int]:
        """`node_ids` by partition, asking the nodes not asked yet."""
        node_ids = list(node_ids)
        self._roll_call(grid, [node_id for node_id in node_ids if node_id not in self.asked])
        return sorted(node_ids, key=lambda n: (n not in self.partitions, self.partitions.get(n, 0), n))

    def _roll_call(self, grid: Grid, node_ids: list[int]) -> None:
        if not node_ids:
            return
        self.asked.update(node_ids)
        messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            if reply.has_content() and ROLL_CALL_KEY in reply.content.metric_records:
                partition = reply.content.metric_records[ROLL_CALL_KEY][PARTITION_ID_KEY]
                self.partitions[reply.metadata.src_node_id] = int(partition)
        missing = [n for n in node_ids if n not in self.partitions]
        if missing:
            log(WARNING, "roll call: node(s) %s gave no partition id; sampled after the others", missing)
        log(INFO, "roll call: %d node(s) answered with their partition id", len(node_ids) - len(missing))


class PartitionOrderedGrid(Grid):
    """`grid`, listing node ids by partition with `random` freshly seeded; the rest as is."""

    def __init__(self, grid: Grid, roster: PartitionRoster, seed: int) -> None:
        self.grid = grid
        self.roster = roster
        self.seed = seed

    def get_node_ids(self) -> list[int]:
        node_ids = self.roster.order(self.grid, self.grid.get_node_ids())
        random.seed(self.seed)  # after the roll call's draws: FedAvg's sample follows the seed alone
        return node_ids

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:  # Flower's signature, passed on
        return self.grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)

"""Partial participation: a seed fixes which clients each round samples, in every run of it.

Flower's simulated SuperNodes get random node ids in each run; the clients a round samples
must follow from the run's seed and the round, or two schemes compared on one seed train on
different clients. End to end: two real `flwr run` simulations (4 SuperNodes, the tiny BERT);
in process: Flower's FedAvg sampling through the roster, with nodes that answer or stay silent.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedkdlora_app.protocol import PARTITION_ID_KEY, ROLL_CALL_KEY
from fedkdlora_app.results import RunRecorder
from fedkdlora_app.sampling import PartitionRoster
from fedkdlora_app.strategy import TrackedFedAvg
from tests.helpers import comparable_round, make_config, simulate, tiny_models

NODES = 4
PARTIAL = {
    "scheme": "fedlora",
    "num-server-rounds": 2,
    "fraction-train": 0.5,
    "fraction-evaluate": 0.5,
    "min-available-nodes": NODES,
    **tiny_models(),
}


def test_half_the_clients_sampled_are_the_same_partitions_in_two_runs_of_one_seed(tmp_path) -> None:
    runs = []
    for name in ("first", "second"):
        code, results = simulate(tmp_path / name, f"num-supernodes={NODES}", **PARTIAL)
        assert code == 0, results and results["run"]["error"]
        runs.append(results)
    first, second = runs
    for a, b in zip(first["rounds"][1:], second["rounds"][1:], strict=True):
        for stage in ("train", "evaluate"):
            sampled = a["sampled_partitions"][stage]
            assert len(sampled) == NODES // 2 and set(sampled) <= set(range(NODES)), (a["round"], stage)
            assert sampled == b["sampled_partitions"][stage], (a["round"], stage)
        # what the sampled clients computed on their own data: the same clients, the same numbers
        assert comparable_round(a)["clients"] == comparable_round(b)["clients"], a["round"]
        assert a["server"] == b["server"], a["round"]


class RollCallGrid:
    """A Flower grid whose nodes answer the roll call with their partition (None: never answers).

    Flower's own grid draws from Python's `random` while it waits for replies (jittered retry
    sleeps), as often as the timing makes it: `jitter_draws` stands for that.
    """

    def __init__(self, partitions: dict[int, int | None], jitter_draws: int = 0) -> None:
        self.partitions = partitions
        self.jitter_draws = jitter_draws
        self.asked: list[int] = []

    def get_node_ids(self) -> list[int]:
        return list(self.partitions)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        replies = []
        for _ in range(self.jitter_draws):
            random.random()
        for message in messages:
            node = message.metadata.dst_node_id
            self.asked.append(node)
            message.metadata.__dict__["_message_id"] = f"query-{node}"
            TaskIdentity.node_id = node
            if self.partitions[node] is not None:
                answer = MetricRecord({PARTITION_ID_KEY: self.partitions[node]})
                replies.append(Message(RecordDict({ROLL_CALL_KEY: answer}), reply_to=message))
        TaskIdentity.node_id = 0
        return replies


def _train_sample(
    tmp_path, partitions: dict[int, int | None], rounds: int, jitter_draws: int
) -> tuple[list[list[int]], RollCallGrid]:
    """FedAvg's train sample (half of the nodes) of rounds 1..`rounds`, as partitions, through the roster."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    recorder = RunRecorder(make_config(**{"results-dir": str(tmp_path)}))
    grid = RollCallGrid(partitions, jitter_draws)
    strategy = TrackedFedAvg(
        recorder, roster=PartitionRoster(seed=42, timeout=5.0), fraction_train=0.5, min_available_nodes=6
    )
    arrays = ArrayRecord([np.zeros(2, dtype=np.float32)])
    for server_round in range(1, rounds + 1):
        strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
    return [recorder.round(r)["sampled_partitions"]["train"] for r in range(1, rounds + 1)], grid


def test_the_sample_follows_partitions_not_node_ids_and_a_silent_node_sorts_last(tmp_path) -> None:
    """Two federations whose nodes list in different orders under different ids, whose roll calls
    took different times: the same partitions each round; each node asked once; the node that
    never answers comes last, as partition -1."""
    first = {901: 3, 17: 0, 5003: 4, 42: 1, 77: 2, 640: None}
    second = {8080: 2, 5: None, 61: 4, 3: 0, 999: 1, 12: 3}
    samples, grid = _train_sample(tmp_path / "first", first, rounds=4, jitter_draws=1)
    assert samples == _train_sample(tmp_path / "second", second, rounds=4, jitter_draws=7)[0]
    assert all(len(sample) == 3 for sample in samples) and len(set(map(tuple, samples))) > 1
    assert sorted(grid.asked) == sorted(first)  # the roll call reached each node once in four rounds
    roster = PartitionRoster(seed=42, timeout=5.0)
    assert roster.order(RollCallGrid(second), list(second)) == [3, 999, 8080, 12, 61, 5]
    assert roster.partitions_of([5, 61]) == [-1, 4]


class RejoiningGrid:
    """Node 2 is away (restarting) the first time the grid is asked, and back from then on."""

    def __init__(self) -> None:
        self.calls = 0

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        return [1] if self.calls == 1 else [1, 2]


@pytest.mark.parametrize("stage", ["train", "evaluate"])
def test_a_stage_waits_for_min_available_nodes_before_sizing_its_sample(tmp_path, stage: str) -> None:
    """Flower's FedAvg sizes the sample from the nodes online before it waits for
    `min-available-nodes`: a node still rejoining would leave the stage one node short."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    recorder = RunRecorder(make_config(**{"results-dir": str(tmp_path)}))
    # as `server_app.build_strategy` sets it: a stage may go on with one node
    strategy = TrackedFedAvg(recorder, min_available_nodes=2, min_train_nodes=1, min_evaluate_nodes=1)
    configure = strategy.configure_train if stage == "train" else strategy.configure_evaluate
    messages = configure(1, ArrayRecord([np.zeros(2, dtype=np.float32)]), ConfigRecord(), RejoiningGrid())
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2]

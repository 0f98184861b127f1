"""Server-side aggregation and metric combination against hand computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from sklearn.metrics import matthews_corrcoef

from fedkdlora_app.bookkeeping import payload_bytes
from fedkdlora_app.metrics import EvalCounts, aggregate_evaluate_metrics
from fedkdlora_app.results import RunRecorder
from fedkdlora_app.strategy import ContinuedRounds, ServerStep, TrackedFedAvg
from tests.helpers import make_config, train_reply


@pytest.fixture()
def recorder(tmp_path) -> RunRecorder:
    return RunRecorder(make_config(**{"results-dir": str(tmp_path)}))


def test_weighted_average_matches_hand_computation(recorder: RunRecorder) -> None:
    a = [np.array([1.0, 2.0], dtype=np.float32), np.array([[3.0]], dtype=np.float32)]
    b = [np.array([5.0, 10.0], dtype=np.float32), np.array([[-1.0]], dtype=np.float32)]
    strategy = TrackedFedAvg(recorder)
    arrays, metrics = strategy.aggregate_train(1, [train_reply(11, a, 30), train_reply(22, b, 10)])
    result = [array.numpy() for array in arrays.values()]
    # by hand: (30 * a + 10 * b) / 40
    np.testing.assert_allclose(result[0], [(30 * 1 + 10 * 5) / 40, (30 * 2 + 10 * 10) / 40])
    np.testing.assert_allclose(result[1], [[(30 * 3 - 10 * 1) / 40]])
    assert result[0].dtype == np.float32
    assert metrics["num_examples"] == 40
    comm = recorder.round(1)["communication"]
    assert comm["up_bytes"] == payload_bytes(ArrayRecord(a)) + payload_bytes(ArrayRecord(b))
    assert comm["per_node"]["11"]["up_bytes"] == payload_bytes(ArrayRecord(a))


class EchoGrid:
    """A Flower grid whose node `n` answers a train message with the arrays it got plus `n`.

    What each node received is kept, so a test can see what became the next global model.
    """

    def __init__(self, nodes: list[int], nan_train_rounds: tuple[int, ...] = ()) -> None:
        """`nan_train_rounds`: the train rounds (1, 2, ...) in which every node answers NaN arrays."""
        self.nodes = nodes
        self.received: list[tuple[str, int, list[np.ndarray]]] = []
        self.train_server_rounds: list[int] = []  # the "server-round" each train message carried
        self.nan_train_rounds = nan_train_rounds
        self.train_rounds = 0

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        replies = []
        messages = list(messages)
        self.train_server_rounds += [
            int(m.content.config_records["config"]["server-round"])
            for m in messages
            if m.metadata.message_type == "train"
        ]
        if messages and messages[0].metadata.message_type == "train":
            self.train_rounds += 1
        for index, message in enumerate(messages):
            node = message.metadata.dst_node_id
            message.metadata.__dict__["_message_id"] = f"{message.metadata.message_type}-{node}-{index}"
            arrays = [array.numpy() for array in message.content.array_records["arrays"].values()]
            self.received.append((message.metadata.message_type, node, arrays))
            TaskIdentity.node_id = node
            if message.metadata.message_type == "train":
                update = [
                    a * np.nan if self.train_rounds in self.nan_train_rounds else a + node for a in arrays
                ]
                content = RecordDict(
                    {
                        "arrays": ArrayRecord(update),
                        "metrics": MetricRecord(
                            {"num_examples": 10, "train_loss": 0.5, "train_seconds": 1.0}
                        ),
                    }
                )
            else:
                counts = EvalCounts(loss_sum=1.0, tn=1, fp=0, fn=0, tp=1)
                content = RecordDict({"metrics": MetricRecord(counts.metrics())})
            replies.append(Message(content, reply_to=message))
        TaskIdentity.node_id = 0
        return replies


def test_the_server_step_output_is_the_next_rounds_global_model(recorder: RunRecorder) -> None:
    """Through Flower's own `Strategy.start`: what the aggregate + step return is what nodes train next."""
    seen_rounds = []

    def plus_ten(server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        seen_rounds.append(server_round)
        return ArrayRecord([array.numpy() + 10 for array in arrays.values()])

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    evaluated = []
    strategy = ContinuedRounds(ServerStep(TrackedFedAvg(recorder, min_available_nodes=2), plus_ten), 2)
    grid = EchoGrid([1, 2])
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([np.zeros(2, dtype=np.float32)]),
        num_rounds=2,
        evaluate_fn=lambda server_round, arrays: evaluated.append(server_round),
    )
    train = [(node, arrays[0]) for kind, node, arrays in grid.received if kind == "train"]
    # round 1: both get 0 and return 1 and 2: mean 1.5, then the step: 11.5, which round 2 trains from
    assert sorted(node for node, _ in train[:2]) == sorted(node for node, _ in train[2:]) == [1, 2]
    np.testing.assert_array_equal(
        np.stack([a for _, a in train]), [[0, 0], [0, 0], [11.5, 11.5], [11.5, 11.5]]
    )
    np.testing.assert_array_equal(result.arrays["0"].numpy(), [23.0, 23.0])  # mean(12.5, 13.5) + 10
    assert seen_rounds == [3, 4]  # rounds of the resumed run, not Flower's 1 and 2
    assert evaluated == [2, 3, 4]  # its starting point, then each round
    assert grid.train_server_rounds == [3, 3, 4, 4]  # what client seeds derive from
    assert recorder.round(3)["aggregated_updates"] == recorder.round(4)["aggregated_updates"] == 2


def test_client_mcc_comes_from_summed_confusion_counts() -> None:
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 2, n) for n in (40, 25)]
    predictions = [np.where(rng.random(len(y)) < 0.7, y, 1 - y) for y in labels]
    per_client = [
        EvalCounts.from_predictions(float(len(y)), y, p) for y, p in zip(labels, predictions, strict=True)
    ]
    replies = [RecordDict({"metrics": MetricRecord(c.metrics())}) for c in per_client]
    combined = aggregate_evaluate_metrics(replies, "num_examples")
    all_labels, all_predictions = np.concatenate(labels), np.concatenate(predictions)
    assert combined["mcc"] == pytest.approx(matthews_corrcoef(all_labels, all_predictions), abs=1e-12)
    assert combined["accuracy"] == pytest.approx(np.mean(all_labels == all_predictions))
    assert combined["num_examples"] == 65 and combined["loss"] == pytest.approx(1.0)
    weighted_mean_mcc = sum(c.metrics()["mcc"] * c.num_examples for c in per_client) / 65
    assert combined["mcc"] != pytest.approx(weighted_mean_mcc, abs=1e-6)


def test_failed_replies_are_recorded_not_aggregated(recorder: RunRecorder) -> None:
    from flwr.app import Error

    good = train_reply(1, [np.ones(2, dtype=np.float32)], 5)
    TaskIdentity.node_id = 0
    instruction = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=2, message_type="train")
    TaskIdentity.node_id = 2
    bad = Message(Error(code=0, reason="client crashed"), reply_to=instruction)
    arrays, _ = TrackedFedAvg(recorder).aggregate_train(1, [good, bad])
    np.testing.assert_array_equal(next(iter(arrays.values())).numpy(), [1.0, 1.0])
    assert recorder.round(1)["failures"] == [{"stage": "train", "node_id": 2, "reason": "client crashed"}]


def _sent(strategy: TrackedFedAvg, arrays: list[np.ndarray]) -> None:
    """What configure_train would have remembered as the arrays sent this round."""
    strategy.screen.sent = ArrayRecord(arrays)


GLOBAL = [np.zeros(2, dtype=np.float32), np.zeros((1, 1), dtype=np.float32)]


@pytest.mark.parametrize(
    ("bad_arrays", "num_examples", "problem"),
    [
        ([np.ones(2, dtype=np.float32)], 5, "array names differ from those sent"),
        (
            [np.ones(3, dtype=np.float32), np.ones((1, 1), dtype=np.float32)],
            5,
            "is float32[3], sent as float32[2]",
        ),
        (
            [np.ones(2, dtype=np.float64), np.ones((1, 1), dtype=np.float32)],
            5,
            "is float64[2], sent as float32[2]",
        ),
        (
            [np.array([1.0, np.nan], dtype=np.float32), np.ones((1, 1), dtype=np.float32)],
            5,
            "holds NaN or Inf",
        ),
        (
            [np.array([1.0, np.inf], dtype=np.float32), np.ones((1, 1), dtype=np.float32)],
            5,
            "holds NaN or Inf",
        ),
        (
            [np.ones(2, dtype=np.float32), np.ones((1, 1), dtype=np.float32)],
            10**9,
            "claims 1000000000 examples",
        ),
        ([np.ones(2, dtype=np.float32), np.ones((1, 1), dtype=np.float32)], 0, "must be a positive integer"),
    ],
)
def test_bad_updates_are_dropped_and_recorded(recorder, bad_arrays, num_examples, problem) -> None:
    strategy = TrackedFedAvg(recorder, max_examples_per_update=100)
    _sent(strategy, GLOBAL)
    good = [np.full(2, 3.0, dtype=np.float32), np.full((1, 1), 3.0, dtype=np.float32)]
    arrays, metrics = strategy.aggregate_train(
        1, [train_reply(1, good, 5), train_reply(2, bad_arrays, num_examples)]
    )
    result = [array.numpy() for array in arrays.values()]
    np.testing.assert_array_equal(result[0], [3.0, 3.0])  # the good update alone
    assert metrics["num_examples"] == 5
    [failure] = recorder.round(1)["failures"]
    assert failure["node_id"] == 2 and failure["stage"] == "train"
    assert failure["reason"].startswith("rejected update: ") and problem in failure["reason"]
    recorder.finish_round(1, {"student": {"accuracy": 0.5, "loss": 0.7}})
    saved = json.loads(recorder.path.read_text())  # on disk as soon as the round closes
    assert problem in saved["rounds"][0]["failures"][0]["reason"]


def test_a_round_with_only_bad_updates_keeps_the_global_model(recorder) -> None:
    """Through Flower's `Strategy.start`: round 1's NaN updates are dropped; round 2 trains from the start."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    strategy = TrackedFedAvg(recorder, max_examples_per_update=100, min_available_nodes=2)
    grid = EchoGrid([1, 2], nan_train_rounds=(1,))
    start = np.array([3.0, 4.0], dtype=np.float32)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord([start]), num_rounds=2)
    train = [arrays[0] for kind, _, arrays in grid.received if kind == "train"]
    np.testing.assert_array_equal(np.stack(train), [start] * 4)  # round 2 got round 1's global model
    np.testing.assert_array_equal(result.arrays["0"].numpy(), start + 1.5)  # mean(+1, +2) in round 2
    assert recorder.round(1)["aggregated_updates"] == 0
    assert [f["reason"].startswith("rejected update: ") for f in recorder.round(1)["failures"]] == [
        True,
        True,
    ]


def test_one_time_records_go_to_new_nodes_only(recorder: RunRecorder) -> None:
    teacher = ArrayRecord([np.ones(1000, dtype=np.float32)])
    strategy = TrackedFedAvg(recorder, once_per_node={"teacher": teacher})
    shared = RecordDict({"arrays": ArrayRecord(GLOBAL), "config": ConfigRecord({"server-round": 1})})
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    messages = [Message(shared, dst_node_id=node, message_type="train") for node in (1, 2)]
    strategy.ledger.sent(1, "train", messages)
    for node_id, record in strategy.once_per_node.attach(messages):
        strategy.ledger.sent_extra(1, node_id, "teacher", record)
    assert all("teacher" in m.content for m in messages) and "teacher" not in shared
    strategy.aggregate_train(1, [train_reply(1, GLOBAL, 5)])  # node 1 replied; node 2 did not
    again = [Message(shared, dst_node_id=node, message_type="train") for node in (1, 2)]
    strategy.ledger.sent(2, "train", again)
    for node_id, record in strategy.once_per_node.attach(again):
        strategy.ledger.sent_extra(2, node_id, "teacher", record)
    assert "teacher" not in again[0].content and "teacher" in again[1].content
    teacher_bytes = [recorder.round(r)["communication"]["down_bytes_teacher"] for r in (1, 2)]
    assert teacher_bytes == [2 * payload_bytes(teacher), payload_bytes(teacher)]


def _sent_messages(strategy: TrackedFedAvg, nodes: list[int]) -> list[Message]:
    """Train messages as the grid leaves them after pushing: each with its message id."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    content = RecordDict({"arrays": ArrayRecord(GLOBAL), "config": ConfigRecord({"server-round": 1})})
    messages = [Message(content, dst_node_id=node, message_type="train") for node in nodes]
    for index, message in enumerate(messages):
        message.metadata.__dict__["_message_id"] = f"message-{index}"
    strategy.ledger.sent(1, "train", messages)
    return messages


def test_a_node_silent_past_the_round_timeout_is_a_recorded_failure(recorder: RunRecorder) -> None:
    """Flower's grid returns only the replies it got in time; the silent node must not vanish unrecorded."""
    strategy = TrackedFedAvg(recorder, round_timeout=30.0)
    sent = _sent_messages(strategy, [1, 2])
    reply = train_reply(1, GLOBAL, 5)
    reply.metadata.__dict__["_reply_to_message_id"] = sent[0].metadata.message_id
    arrays, metrics = strategy.aggregate_train(1, [reply])
    assert arrays is not None and metrics["num_examples"] == 5
    assert recorder.round(1)["failures"] == [
        {"stage": "train", "node_id": 2, "reason": "no reply within round-timeout = 30.0 s"}
    ]


def test_a_node_that_lost_the_client_kd_teacher_is_sent_it_again(recorder: RunRecorder) -> None:
    from flwr.app import Error

    from fedkdlora_app.protocol import NO_TEACHER, NO_TEACHER_ERROR_CODE

    teacher = ArrayRecord([np.ones(10, dtype=np.float32)])
    strategy = TrackedFedAvg(recorder, once_per_node={"teacher": teacher})
    strategy.once_per_node.served = {1, 2, 3}  # all replied in an earlier round
    sent = _sent_messages(strategy, [1, 2, 3])
    TaskIdentity.node_id = 2
    lost = Message(
        Error(code=NO_TEACHER_ERROR_CODE, reason=f"this node {NO_TEACHER} 'run'"), reply_to=sent[1]
    )
    # the words alone decide nothing: an error of another kind that quotes them is no lost teacher
    TaskIdentity.node_id = 3
    other = Message(
        Error(code=2, reason=f"ValueError: a message mentioning '{NO_TEACHER}'"), reply_to=sent[2]
    )
    good = train_reply(1, GLOBAL, 5)
    good.metadata.__dict__["_reply_to_message_id"] = sent[0].metadata.message_id
    strategy.aggregate_train(1, [good, lost, other])
    again = _sent_messages(strategy, [1, 2, 3])
    strategy.once_per_node.attach(again)
    assert ["teacher" in m.content for m in again] == [False, True, False]


def test_a_run_that_aggregated_nothing_is_an_error_naming_the_failures(recorder: RunRecorder) -> None:
    from fedkdlora_app.server_app import NothingAggregatedError, check_something_aggregated

    for server_round in (1, 2):  # as configure_train opens each round
        recorder.set_aggregated_updates(server_round, 0)
        recorder.add_failure(server_round, "train", 7, "ConfigError: node config 'data-dir' = '/x': no file")
    with pytest.raises(
        NothingAggregatedError,
        match=r"no round aggregated a client update \(2 round\(s\)\): "
        r"2 failure\(s\) recorded, e.g. round 1 train node 7: ConfigError",
    ):
        check_something_aggregated(recorder, 0)
    recorder.set_aggregated_updates(2, 1)
    check_something_aggregated(recorder, 0)  # one round that trained is a (partly failed) run
    assert recorder.health() == {"rounds": 2, "rounds_without_update": [1], "failures": 2}

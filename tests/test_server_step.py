"""The FedKDLoRA server step off the critical path, and progress lines of long server phases."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from fedkdlora_app import progress as progress_module
from fedkdlora_app.distillation import ServerDistillation
from fedkdlora_app.losses import UNLABELLED
from fedkdlora_app.models import build_student, shipped_state
from fedkdlora_app.progress import Progress
from fedkdlora_app.results import RunRecorder
from fedkdlora_app.seeding import seed_everything
from fedkdlora_app.server_app import run_federation
from fedkdlora_app.wire import from_wire, to_wire
from tests.helpers import make_config, tiny_models

TINY = {"max-public-examples": 16, "batch-size": 8, "max-eval-examples": 16, "teacher-pretrain-epochs": 1}


def _server_step(tmp_path, overlap: bool, rounds: list[bool], **overrides) -> tuple[list, dict, dict]:
    """Rounds of the server step as the strategy drives it; each entry of `rounds`: aggregated or not."""
    config = make_config(
        scheme="fedkdlora",
        task="sst2",
        **TINY,
        **{"server-step-overlap": overlap, "results-dir": str(tmp_path)},
        **overrides,
    )
    seed_everything(config.seed)
    student = build_student(config, attn_implementation="eager")
    recorder = RunRecorder(config)
    distillation = ServerDistillation(config, student, torch.device("cpu"), recorder)
    arrays = to_wire(shipped_state(student, config), config.wire_dtype)
    for server_round, aggregated in enumerate(rounds, start=1):
        distillation.start_teacher_phase(server_round)  # as the train messages go out
        if aggregated:
            arrays = distillation.after_aggregate(server_round, arrays)
        else:
            distillation.skip_round(server_round)
    teacher = {k: v.clone() for k, v in distillation.teacher.state_dict().items()}
    terms = {r: recorder.round(r).get("distillation") for r in range(1, len(rounds) + 1)}
    return list(from_wire(arrays, config.wire_dtype).values()), teacher, terms


# A server whose public slice is half unlabelled, the student taught by the teacher alone: the
# teacher trains alone on the labelled half, from its own loader, which the undo must restore too.
HALF_LABELLED = {"public-labelled-pct": 50.0, "server-student-signal": "teacher"}


@pytest.mark.parametrize("overrides", [{}, HALF_LABELLED], ids=["all-labelled", "half-labelled"])
def test_overlapping_the_teacher_phase_gives_the_sequential_result_bit_for_bit(tmp_path, overrides) -> None:
    """Round 1 aggregates nothing: the overlapped teacher phase must be undone, as if never run."""
    rounds = [False, True]
    seq_student, seq_teacher, seq_terms = _server_step(tmp_path / "seq", False, rounds, **overrides)
    ovl_student, ovl_teacher, ovl_terms = _server_step(tmp_path / "ovl", True, rounds, **overrides)
    assert all(torch.equal(a, b) for a, b in zip(seq_student, ovl_student, strict=True))
    assert all(torch.equal(seq_teacher[k], ovl_teacher[k]) for k in seq_teacher)
    assert seq_terms[1] is None and ovl_terms[1] is None  # no server step without an aggregate
    assert seq_terms[2]["last_step"] == ovl_terms[2]["last_step"]
    assert seq_terms[2]["teacher_train_loss"] == ovl_terms[2]["teacher_train_loss"]
    assert (seq_terms[2]["overlapped"], ovl_terms[2]["overlapped"]) == (False, True)


def test_a_half_labelled_public_slice_trains_the_teacher_on_the_labelled_half(tmp_path) -> None:
    config = make_config(
        scheme="fedkdlora", task="sst2", **TINY, **HALF_LABELLED, **{"results-dir": str(tmp_path)}
    )
    recorder = RunRecorder(config)
    distillation = ServerDistillation(config, build_student(config), torch.device("cpu"), recorder)
    assert recorder.data["teacher"]["public_examples"] == 8
    assert recorder.data["teacher"]["public_labelled_pct"] == 50.0
    assert len(distillation.teacher_loader.dataset) == 8
    labels = [distillation.public_loader.dataset[i]["labels"] for i in range(16)]
    assert labels[:8] == [distillation.teacher_loader.dataset[i]["labels"] for i in range(8)]
    assert labels[8:] == [UNLABELLED] * 8
    assert set(distillation.generators) == {"public", "labelled-public"}


def test_progress_lines_say_examples_rate_and_time_left(caplog, monkeypatch) -> None:
    progress = Progress("teacher alone", total=100, interval=5.0)
    progress.started = progress.last = 0.0
    with caplog.at_level(logging.INFO, logger="flwr"):
        for now, examples in ((0.0, 10), (5.0, 10), (6.0, 30), (12.0, 25)):
            monkeypatch.setattr(progress_module.time, "perf_counter", lambda now=now: now)
            progress.advance(examples)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher alone")]
    # t=0: not yet; t=5: 20/100, 4.0/s, 20 s left; t=6: within 5 s of the last line; t=12: 75/100
    assert lines == [
        "teacher alone: 20/100 examples (20 %), 4.0 examples/s, about 20 s left",
        "teacher alone: 75/100 examples (75 %), 6.2 examples/s, about 4 s left",
    ]
    silent = Progress("x", total=10, interval=0.0)
    silent.advance(5)
    assert silent.lines == 0


class LostLinkGrid:
    """A Flower grid with two nodes whose link fails as the first messages go out."""

    def get_node_ids(self) -> list[int]:
        return [1, 2]

    def send_and_receive(self, messages, timeout=None):
        raise ConnectionError("the SuperLink went away")


def test_a_run_failing_during_the_overlapped_teacher_phase_stops_it_and_leaves_no_worker(tmp_path) -> None:
    """The teacher phase (thousands of epochs) starts as the train messages go out; the grid then
    fails: the run raises at once and its worker is shut down, so the process can exit."""
    config = make_config(
        scheme="fedkdlora",
        task="sst2",
        **TINY,
        **{"server-step-overlap": True, "teacher-epochs": 100_000, "min-available-nodes": 2},
        **{"results-dir": str(tmp_path)},
        **tiny_models(),
    )
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # as a ServerApp has them
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="went away"):
        run_federation(LostLinkGrid(), config, RunRecorder(config))
    assert time.monotonic() - started < 60
    assert not [t for t in threading.enumerate() if t.name.startswith("fedkdlora-teacher-phase")]

"""Kill a run after round 1, resume it, and get what an uninterrupted run gets."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedkdlora_app.checkpoint import Checkpoint
from fedkdlora_app.config import ConfigError
from fedkdlora_app.results import RunRecorder
from fedkdlora_tools.launcher import format_overrides
from tests.helpers import (
    GLUE_DIR,
    REPO,
    client_kd_overrides,
    comparable_round,
    make_config,
    simulate,
    teacher_message_bytes,
)

# FedKDLoRA with client KD on the tiny BERT (the run `client_kd_run` shares): the test is about
# resuming, server step and shipped teacher included, not about the default model.
KD = client_kd_overrides()


def _rounds(results: dict, up_to: int | None = None) -> list[dict]:
    return [comparable_round(r) for r in results["rounds"] if up_to is None or r["round"] <= up_to]


def _with_teacher_shipped_again(rounds: list[dict], round_: int, per_node: int) -> list[dict]:
    """`rounds` as a resumed run records them: its new server process has served no node yet, so
    round `round_` ships the client-KD teacher to each node once more (and no later round does)."""
    rounds = copy.deepcopy(rounds)
    for entry in rounds:
        comm = entry["communication"]
        if entry["round"] >= round_:
            comm["cumulative_down_bytes"] += len(comm["per_node_bytes"]) * per_node
        if entry["round"] == round_:
            for key in ("down_bytes", "down_bytes_teacher"):
                comm[key] += len(comm["per_node_bytes"]) * per_node
            comm["per_node_bytes"] = sorted(
                tuple(sorted({**dict(node), "down_bytes": dict(node)["down_bytes"] + per_node}.items()))
                for node in comm["per_node_bytes"]
            )
    return rounds


def _assert_same_rounds(a: list[dict], b: list[dict]) -> None:
    """Server and client metrics, distillation terms, bytes each way: equal, bit for bit on CPU."""
    assert [r["round"] for r in a] == [r["round"] for r in b]
    for round_a, round_b in zip(a, b, strict=True):
        assert round_a == round_b, round_a["round"]


def _kill_after_round(results_dir: Path, round_: int, timeout: float = 300) -> Path:
    """Start a run in another process; SIGTERM it once round `round_` is checkpointed."""
    values = {**KD, "data-dir": str(GLUE_DIR), "results-dir": str(results_dir)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedkdlora_tools.launcher",
            str(REPO),
            "--run-config",
            format_overrides(values),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline, seen = time.monotonic() + timeout, None
    try:
        while time.monotonic() < deadline and process.poll() is None:
            checkpoint = next(results_dir.glob("*/checkpoint.pt"), None)
            stamp = checkpoint and checkpoint.stat().st_mtime_ns
            if stamp and stamp != seen:  # load only a checkpoint that changed since the last look
                seen = stamp
                if Checkpoint.load(checkpoint.parent).round >= round_:
                    break
            time.sleep(0.2)
        assert process.poll() is None, "the run ended before it could be interrupted"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    return next(results_dir.glob("*.json"))


@pytest.fixture(scope="module")
def uninterrupted(client_kd_run) -> dict:
    return client_kd_run


def test_same_seed_same_metrics_and_resume_matches(uninterrupted, tmp_path) -> None:
    results_path = _kill_after_round(tmp_path, 1)
    interrupted = json.loads(results_path.read_text())
    assert interrupted["run"]["status"] == "running"  # killed: never closed
    completed = Checkpoint.load(results_path.with_suffix("")).round
    assert 1 <= completed < 3
    # determinism: the same seed and config gave the same rounds so far
    _assert_same_rounds(_rounds(interrupted, completed), _rounds(uninterrupted, completed))

    code, resumed = simulate(tmp_path, **{**KD, "resume-from": str(results_path)})
    assert code == 0, resumed["run"]["error"]
    assert sorted(tmp_path.glob("*.json")) == [results_path]  # the same run, continued
    assert resumed["run"]["status"] == "completed"
    [resume] = resumed["run"]["resumes"]
    assert resume["after_round"] == completed and resume["previous_status"] == "running"
    expected = _with_teacher_shipped_again(_rounds(uninterrupted), completed + 1, teacher_message_bytes(**KD))
    _assert_same_rounds(_rounds(resumed), expected)
    assert resumed["rounds"][-1]["distillation"]["last_step"]  # the comparison covered the server step
    assert Path(resumed["artifacts"]["teacher"], "config.json").is_file()

    # resuming a finished run with no rounds left just saves its models again
    code, again = simulate(tmp_path, **{**KD, "resume-from": str(results_path)})
    assert code == 0, again["run"]["error"]
    assert [r["round"] for r in again["rounds"]] == [0, 1, 2, 3] and len(again["run"]["resumes"]) == 2
    _assert_same_rounds(_rounds(again), expected)


def test_resume_refuses_a_changed_config(uninterrupted) -> None:
    path = Path(uninterrupted["artifacts"]["student"]).parents[1] / f"{uninterrupted['run']['name']}.json"
    before = path.read_bytes()
    config = make_config(**{**KD, "lora-r": 4, "resume-from": str(path), "results-dir": str(path.parent)})
    with pytest.raises(ConfigError, match="'lora-r' = 4: the run being resumed used 8"):
        RunRecorder(config, resume=(path, 3))
    assert path.read_bytes() == before  # nothing written


def test_resume_from_needs_a_checkpoint(tmp_path) -> None:
    lonely = tmp_path / "run.json"
    lonely.write_text("{}")
    with pytest.raises(ConfigError, match=r"'resume-from' = .*checkpoint"):
        make_config(**{"resume-from": str(lonely)})

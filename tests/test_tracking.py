"""Experiment tracking: what a run writes to MLflow and TensorBoard, read back with their own readers."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedkdlora_app import tracking
from fedkdlora_app.config import ConfigError
from fedkdlora_app.results_format import load
from fedkdlora_app.tracking import Tracker, check_tracking, round_metrics
from fedkdlora_tools import compare, launcher
from tests.helpers import GLUE_DIR, REPO, make_config, simulate, tiny_models

KEPT = REPO / "docs" / "evidence" / "sst2-quick" / "runs" / "fedkdlora_sst2_r8_20261202T005026Z.json"


def test_a_run_tracked_in_mlflow_reads_back_per_round_with_its_files(tmp_path: Path, capsys) -> None:
    """FedLoRA, 2 rounds, `tracking = "mlflow"` into results-dir; then `fedkdlora-run --report`'s summary."""
    code, results = simulate(tmp_path, scheme="fedlora", tracking="mlflow", **tiny_models())
    assert code == 0, results and results["run"]["error"]
    info = results["run"]["tracking"]
    assert info["uri"] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}" and info["errors"] == []
    results_path = tmp_path / f"{results['run']['name']}.json"
    launcher.print_run_summary(results_path)  # draws the plots and attaches them to the tracked run
    assert f"tracked:      mlflow run {info['run_id']}" in capsys.readouterr().out

    client = MlflowClient(info["uri"])
    experiment = client.get_experiment_by_name(f"fedkdlora-{results['config']['task']}")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == info["run_id"] and run.info.run_name == results["run"]["name"]
    assert run.info.status == "FINISHED"
    assert run.data.params["scheme"] == "fedlora" and run.data.params["lora-r"] == "8"
    for key in ("server/student/accuracy", "server/student/loss", "communication/up_bytes", "wall_seconds"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        expected = [(entry["round"], round_metrics(entry)[key]) for entry in results["rounds"]]
        assert history == expected, key
    train_loss = client.get_metric_history(run.info.run_id, "clients/train/train_loss")
    assert [m.step for m in train_loss] == [1, 2]
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {results_path.name, "student", "plots"} <= files
    assert "adapter_config.json" in {
        Path(f.path).name for f in client.list_artifacts(run.info.run_id, "student")
    }
    assert "accuracy_per_round.png" in {
        Path(f.path).name for f in client.list_artifacts(run.info.run_id, "plots")
    }


def test_tensorboard_gets_the_same_scalars_per_round(tmp_path: Path) -> None:
    """The rounds of a kept FedKDLoRA run, fed to the tracker, read back by TensorBoard's reader."""
    rounds = load(KEPT)["rounds"]
    config = make_config(**{"tracking": "tensorboard", "results-dir": str(tmp_path)})
    info = {}
    tracker = Tracker(config, "a-run", info)
    for entry in rounds:
        tracker.log_round(entry)
    tracker.finish("completed", [])
    assert info["uri"] == str(tmp_path.resolve() / "tensorboard") and info["errors"] == []
    events = EventAccumulator(str(Path(info["uri"]) / "fedkdlora-sst2" / "a-run"))
    events.Reload()
    for key in (
        "server/teacher/accuracy",
        "distillation/last_step/kl_teacher_student",
        "clients/train/num_examples",
    ):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        expected = [(e["round"], round_metrics(e)[key]) for e in rounds if key in round_metrics(e)]
        assert [step for step, _ in logged] == [step for step, _ in expected], key
        assert [value for _, value in logged] == pytest.approx([value for _, value in expected]), key


def test_a_failing_tracker_is_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    config = make_config(**{"tracking": "mlflow", "tracking-uri": f"sqlite:///{blocked}/mlflow.db"})
    info = {}
    tracker = Tracker(config, "a-run", info)  # cannot open its database: recorded, not raised
    tracker.log_round(load(KEPT)["rounds"][1])
    tracker.finish("completed", [KEPT])
    assert len(info["errors"]) == 1 and info["errors"][0].startswith("mlflow start: ")


def test_a_missing_tracking_package_is_a_bad_setting(monkeypatch) -> None:
    monkeypatch.setitem(tracking.BACKENDS, "mlflow", "no_such_tracking_package")
    with pytest.raises(
        ConfigError, match=r"^run-config key 'tracking' = 'mlflow': the no_such_tracking_package"
    ):
        check_tracking(make_config(tracking="mlflow"))


def test_a_comparison_is_one_experiment_and_tracking_does_not_change_what_matches(tmp_path: Path) -> None:
    args = argparse.Namespace(
        task="sst2", rounds=1, quick=False, medium=False, clients=2, data_dir=str(GLUE_DIR), per_client=None
    )
    common = compare.common_overrides(args, tmp_path / "runs", "cmp")
    assert common["tracking-experiment"] == "cmp"
    settings = compare.run_settings(common, {"scheme": "fedlora"}, "tracking='mlflow'")
    assert not set(settings) & set(tracking.KEYS)  # a run tracked elsewhere is the same run

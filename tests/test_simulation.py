"""End to end: real `flwr run` simulations (Ray, 2 SuperNodes) through `fedkdlora-run`."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import pytest

from fedkdlora_app.data import eval_split, loader_for
from fedkdlora_app.models import load_saved_student
from fedkdlora_app.training import evaluate
from fedkdlora_tools import launcher
from tests.helpers import (
    GLUE_DIR,
    QUICK,
    ROUNDS,
    client_kd_overrides,
    make_config,
    model_message_bytes,
    simulate,
    teacher_message_bytes,
    tiny_models,
)

# FedAvg runs on the tiny BERT (its code path ships whatever state_dict the model has); FedLoRA on
# the default student, whose adapter a user loads over the embedded base.
MODELS = {"fedavg": tiny_models, "fedlora": dict}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, dict[str, Any], dict[str, Any]]]:
    """One FedAvg and one FedLoRA run, same data, seed and rounds: (folder, results, overrides)."""
    out = {}
    for scheme in ("fedavg", "fedlora"):
        results_dir = tmp_path_factory.mktemp(scheme)
        overrides = {**QUICK, "scheme": scheme, **MODELS[scheme]()}
        code, results = simulate(results_dir, **overrides)
        assert code == 0, results and results["run"]["error"]
        out[scheme] = (results_dir, results, overrides)
    return out


@pytest.mark.parametrize("scheme", ["fedavg", "fedlora"])
def test_every_round_is_reported_with_finite_metrics(runs, scheme: str) -> None:
    _, results, overrides = runs[scheme]
    assert results["run"]["status"] == "completed"
    assert [r["round"] for r in results["rounds"]] == list(range(ROUNDS + 1))
    for entry in results["rounds"]:
        server = entry["server"]["student"]
        assert server["num_examples"] == 64
        for key in ("loss", "accuracy", "mcc"):
            assert math.isfinite(server[key]), (entry["round"], key)
        assert entry["wall_seconds"] > 0 and entry["failures"] == []
    for entry in results["rounds"][1:]:
        clients = entry["clients"]
        # the two clients' eval shards tile the server's eval subset
        assert clients["evaluate"]["num_examples"] == 64
        assert clients["train"]["num_examples"] == 2 * 32
        comm = entry["communication"]
        assert len(comm["per_node"]) == 2
        assert comm["up_bytes"] == 2 * model_message_bytes(**overrides)  # one update per node, sized apart
        assert comm["down_bytes"] == 2 * comm["up_bytes"]  # train + evaluate downlink
    last = results["rounds"][-1]["communication"]
    assert last["cumulative_up_bytes"] == ROUNDS * last["up_bytes"]
    assert results["versions"]["flwr"] == "1.42.0"


def test_fedlora_ships_under_a_hundredth_of_fedavg(runs) -> None:
    """The FedLoRA run's uplink against what FedAvg ships of the same default student (sized apart)."""
    fedlora_up = runs["fedlora"][1]["rounds"][1]["communication"]["up_bytes"]
    fedavg_up = 2 * model_message_bytes(**{**QUICK, "scheme": "fedavg"})
    assert fedlora_up * 100 < fedavg_up, (fedlora_up, fedavg_up)


@pytest.mark.parametrize("scheme", ["fedavg", "fedlora"])
def test_saved_student_reproduces_the_final_server_metrics(runs, scheme: str) -> None:
    results_dir, results, overrides = runs[scheme]
    config = make_config(**{**overrides, "results-dir": str(results_dir)})
    model = load_saved_student(Path(results["artifacts"]["student"]))
    metrics = evaluate(model, loader_for(eval_split(config), config), model.device).metrics()
    reported = results["rounds"][-1]["server"]["student"]
    assert metrics["accuracy"] == reported["accuracy"]
    assert metrics["mcc"] == pytest.approx(reported["mcc"], abs=1e-12)
    assert metrics["loss"] == pytest.approx(reported["loss"], rel=1e-5)


@pytest.mark.parametrize("scheme", ["fedavg", "fedlora"])
def test_the_run_summary_draws_plots_and_its_printed_lines_load_the_model(runs, scheme: str, capsys) -> None:
    """What `fedkdlora-run --report` (and `make demo`) prints: paths, and code that loads the saved model."""
    results_dir, results, overrides = runs[scheme]
    launcher.print_run_summary(results_dir / f"{results['run']['name']}.json")
    printed = capsys.readouterr().out
    plots = [Path(line.split()[-1]) for line in printed.splitlines() if line.strip().endswith(".png")]
    assert {p.name for p in plots} == {"accuracy_per_round.png", "accuracy_vs_mb.png"}
    assert all(p.stat().st_size > 10_000 for p in plots)
    code = printed.split("load it:\n", 1)[1]
    assert len(code.splitlines()) == (3 if scheme == "fedlora" else 2)
    namespace: dict = {}
    exec(textwrap.dedent(code), namespace)  # the printed lines, as a user would paste them
    model = namespace["model"]
    config = make_config(**overrides)
    metrics = evaluate(model, loader_for(eval_split(config), config), model.device).metrics()
    assert metrics["accuracy"] == results["rounds"][-1]["server"]["student"]["accuracy"]


def test_a_failing_run_exits_non_zero_and_keeps_its_record(tmp_path) -> None:
    data_dir = tmp_path / "glue"
    (data_dir / "sst2").mkdir(parents=True)
    (data_dir / "sst2" / "train.tsv").write_bytes((GLUE_DIR / "sst2" / "train.tsv").read_bytes())
    (data_dir / "sst2" / "dev.tsv").write_text("sentence\tlabel\ngood \t1\nbad \tnegative\n")
    code, results = simulate(tmp_path / "results", task="sst2", **{"data-dir": str(data_dir)})
    assert code == 1
    assert results["run"]["status"] == "failed"
    assert "dev.tsv, line 3: label is not 0 or 1" in results["run"]["error"]


def test_bad_run_config_fails_before_any_run(tmp_path, capsys) -> None:
    code, results = simulate(tmp_path, **{"lora-r": 0})
    assert code == 2 and results is None
    assert "'lora-r' = 0: must be >= 1" in capsys.readouterr().err


def test_fedkdlora_with_client_kd_reports_teacher_and_student_every_round(client_kd_run, test_home) -> None:
    """The shared client-KD run (tiny BERT, 3 rounds): the teacher shipped once per node; without
    client KD no teacher bytes travel (tests/test_resume.py checks a run without it too)."""
    results, overrides = client_kd_run, client_kd_overrides()
    rounds = overrides["num-server-rounds"]
    assert [r["round"] for r in results["rounds"]] == list(range(rounds + 1))
    for entry in results["rounds"]:
        for role in ("student", "teacher"):
            metrics = entry["server"][role]
            assert all(math.isfinite(metrics[k]) for k in ("loss", "accuracy", "mcc")), (entry["round"], role)
    # the student ships what a FedLoRA student ships: its LoRA state and head, nothing of the teacher
    fedlora_bytes = model_message_bytes(**{**overrides, "scheme": "fedlora", "client-kd": False})
    assert results["model"]["shipped_bytes_per_message"] == fedlora_bytes
    for entry in results["rounds"][1:]:
        terms = entry["distillation"]["last_step"]
        assert set(terms) >= {"ce_student", "ce_teacher", "kl_teacher_student", "attention_mse"}
        assert all(math.isfinite(v) for v in terms.values())
        assert entry["clients"]["train"]["num_examples"] == 2 * 32
        comm = entry["communication"]  # two nodes: one update up, a train and an evaluate message down
        assert comm["up_bytes"] == 2 * fedlora_bytes
        assert comm["down_bytes_train"] == comm["down_bytes_evaluate"] == 2 * fedlora_bytes
    teacher_bytes = [r["communication"]["down_bytes_teacher"] for r in results["rounds"][1:]]
    # the teacher: shipped once per node, in round 1, counted in the downlink (sized apart from the run)
    assert teacher_bytes == [2 * teacher_message_bytes(**overrides)] + [0] * (rounds - 1)
    # kept in the node's user cache: the tests' temporary home, never the user's
    cached = test_home / ".cache" / "fedkdlora" / "client-kd-teachers" / results["run"]["name"]
    assert (cached / "config.json").is_file()

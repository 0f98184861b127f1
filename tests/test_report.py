"""`fedkdlora-compare` and `fedkdlora-plot` on real (tiny) simulation runs."""

from __future__ import annotations

import json
from pathlib import Path

from fedkdlora_app import compare, report
from tests.conftest import GLUE_DIR, REPO, default_run_config


def test_sweeps_are_options_not_copies() -> None:
    args = compare.parse_args(["--task", "sst2", "--lora-r", "8", "16", "--teacher-data-pct", "20", "40"])
    plan = compare.planned_runs(args)
    # per public share: fedavg once, fedlora and fedkdlora at each rank
    assert len(plan) == 2 * (1 + 2 + 2)
    assert {(r["scheme"], r["lora-r"]) for r in plan if r["teacher-data-pct"] == 40.0} == {
        ("fedavg", 8),
        ("fedlora", 8),
        ("fedlora", 16),
        ("fedkdlora", 8),
        ("fedkdlora", 16),
    }
    full = compare.planned_runs(compare.parse_args(["--task", "cola", "--schemes", "fedlora"]))
    assert [r["lora-r"] for r in full] == [8, 16, 32]


def test_lora_variants_are_planned_for_lora_schemes_and_labelled() -> None:
    args = compare.parse_args(
        [
            "--task",
            "sst2",
            "--lora-r",
            "8",
            "--schemes",
            "fedavg",
            "fedlora",
            "--lora-variants",
            "naive",
            "svd-hetero",
            "fp16",
        ]
    )
    plan = compare.planned_runs(args)
    assert [r["scheme"] for r in plan] == ["fedavg", "fedlora", "fedlora", "fedlora"]  # fedavg has no LoRA
    assert plan[2]["lora-aggregation"] == "svd" and plan[2]["lora-r-by-partition"] == "4,8"
    runs = [
        report.RunResult(Path(f"{i}.json"), {"config": default_run_config() | r}) for i, r in enumerate(plan)
    ]
    varying = report.varying_keys(runs)
    labels = [run.label(varying) for run in runs]
    assert labels == ["fedavg", "fedlora", "fedlora agg=svd ranks=4,8", "fedlora wire=float16"]


def test_compare_runs_the_sweep_and_reports_it(tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    code = compare.main(
        [
            "--app",
            str(REPO),
            "--task",
            "cola",
            "--schemes",
            "fedlora",
            "--lora-r",
            "4",
            "8",
            "--rounds",
            "1",
            "--clients",
            "2",
            "--data-dir",
            str(GLUE_DIR),
            "--out",
            str(out),
            "--run-config",
            "max-train-examples-per-client=16 max-eval-examples=32 batch-size=16",
        ]
    )
    assert code == 0
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    assert sorted(r["config"]["lora-r"] for r in runs) == [4, 8]
    assert all(r["config"]["num-server-rounds"] == 1 and r["run"]["status"] == "completed" for r in runs)
    table = (out / "comparison.md").read_text()
    assert "| fedlora r=4 | 1 |" in table and "| fedlora r=8 | 1 |" in table and "final MCC" in table
    for run in runs:  # the table's MB up is the run's cumulative uplink
        up = run["rounds"][-1]["communication"]["cumulative_up_bytes"] / 1e6
        assert f"{up:,.2f}" in table
    r4, r8 = sorted(runs, key=lambda r: r["config"]["lora-r"])
    assert r4["model"]["shipped_bytes_per_message"] < r8["model"]["shipped_bytes_per_message"]
    for name in ("accuracy_per_round.png", "accuracy_vs_mb.png"):
        assert (out / name).stat().st_size > 10_000
    assert not (out / "teacher_vs_student.png").exists()  # no FedKDLoRA run

    # redraw after the fact from the JSON files, into another folder
    redrawn = tmp_path / "redrawn"
    assert report.main([str(out / "runs"), "--out", str(redrawn)]) == 0
    assert (redrawn / "comparison.md").read_text() == table


def test_plot_refuses_a_file_that_is_not_a_results_json(tmp_path, capsys) -> None:
    bogus = tmp_path / "other.json"
    bogus.write_text('{"hello": 1}')
    assert report.main([str(bogus), "--out", str(tmp_path / "o")]) == 2
    assert f"{bogus}: not a fedkdlora results JSON" in capsys.readouterr().err

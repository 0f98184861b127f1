"""`fedkdlora-compare` and `fedkdlora-plot` on real (tiny) simulation runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fedkdlora_app.results_format import SCHEMA_VERSION
from fedkdlora_tools import compare, launcher, report
from tests.helpers import GLUE_DIR, REPO, default_run_config, tiny_models


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


def quick_compare(out: Path, *options: str) -> int:
    """`fedkdlora-compare` for FedLoRA: 2 clients, 1 round, tiny caps, the tiny BERT, the GLUE fixture."""
    caps = "max-train-examples-per-client=16 max-eval-examples=32 batch-size=16 max-public-examples=24"
    return compare.main(
        [
            "--app", str(REPO), "--schemes", "fedlora", "--rounds", "1", "--clients", "2",
            "--data-dir", str(GLUE_DIR), "--out", str(out),
            "--run-config", f"{caps} {launcher.format_overrides(tiny_models())}",
            *options,
        ]
    )  # fmt: skip


def test_compare_runs_fedlora_and_both_ceilings_reports_them_and_continues_where_it_stopped(
    tmp_path, capsys
) -> None:
    """The one short comparison: FedLoRA on 2 nodes, then the pool and pool + public on one."""
    out = tmp_path / "cmp"
    options = ("--task", "cola", "--lora-r", "8", "--centralized", "--target", "0.5")
    assert quick_compare(out, *options) == 0
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    assert all(r["config"]["num-server-rounds"] == 1 and r["run"]["status"] == "completed" for r in runs)
    central = {r["config"]["centralized-public"]: r for r in runs if r["config"]["min-available-nodes"] == 1}
    federated = {r["config"]["scheme"]: r for r in runs if r["config"]["min-available-nodes"] == 2}
    assert len(runs) == 3 and set(federated) == {"fedlora"} and set(central) == {False, True}
    assert all(r["config"]["scheme"] == "fedlora" for r in central.values())
    for run in central.values():
        assert run["config"]["max-train-examples-per-client"] == 32  # 2 clients x 16
        assert len(run["rounds"][1]["communication"]["per_node"]) == 1
    assert central[False]["rounds"][1]["clients"]["train"]["num_examples"] == 32
    assert central[True]["rounds"][1]["clients"]["train"]["num_examples"] == 32 + 24  # + the public slice
    for run in federated.values():  # 2 x 16: the same pool size
        assert run["rounds"][1]["clients"]["train"]["num_examples"] == 32

    table = (out / "comparison.md").read_text()
    for label in ("centralized (fedlora)", "centralized + public (fedlora)", "fedlora"):
        assert f"| {label} | 1 |" in table, label
    assert "final MCC" in table and "rounds to MCC 0.5" in table
    for run in runs:  # the table's MB up is the run's cumulative uplink
        up = run["rounds"][-1]["communication"]["cumulative_up_bytes"] / 1e6
        assert f"{up:,.2f}" in table
    for name in ("accuracy_per_round.png", "accuracy_vs_mb.png"):
        assert (out / name).stat().st_size > 10_000
    assert not (out / "teacher_vs_student.png").exists()  # no FedKDLoRA run

    # redraw after the fact from the JSON files, into another folder
    redrawn = tmp_path / "redrawn"
    assert report.main([str(out / "runs"), "--out", str(redrawn), "--target", "0.5"]) == 0
    assert (redrawn / "comparison.md").read_text() == table

    # the same command again: every run is already there, none runs again
    capsys.readouterr()
    assert quick_compare(out, *options) == 0
    assert capsys.readouterr().out.count("already completed") == 3
    assert len(list((out / "runs").glob("*.json"))) == 3


def test_plot_refuses_a_file_that_is_not_a_results_json(tmp_path, capsys) -> None:
    bogus = tmp_path / "other.json"
    bogus.write_text('{"hello": 1}')
    assert report.main([str(bogus), "--out", str(tmp_path / "o")]) == 2
    assert f"{bogus}: not a fedkdlora results JSON" in capsys.readouterr().err


# --- hand-built results JSONs: seeds, targets, the centralized ceiling, reference lines ---------


def _results(scheme: str, scores: list[float], seed: int = 42, nodes: int = 4, **config) -> dict:
    """A finished run: `scores` per round 0..n; 1 MB up and 2 MB down per round after round 0.

    400 evaluation examples, 211 of them positive (SST-2's quick dev subset: majority 0.5275).
    """
    rounds = []
    for index, score in enumerate(scores):
        correct = round(score * 400)
        student = {"accuracy": score, "mcc": score - 0.5, "loss": 1 - score, "num_examples": 400}
        student |= {"tp": min(correct, 211), "fn": 211 - min(correct, 211)}
        rounds.append(
            {
                "round": index,
                "wall_seconds": 10.0,
                "server": {"student": student},
                "communication": {
                    "per_node": {str(n): {} for n in range(nodes)} if index else {},
                    "cumulative_up_bytes": index * 1_000_000,
                    "cumulative_down_bytes": index * 2_000_000,
                },
            }
        )
    cfg = default_run_config() | {"scheme": scheme, "task": "sst2", "seed": seed} | config
    run = {"status": "completed", "wall_seconds_total": 100.0 + seed, "started_at": f"2026-01-01T00:{seed}"}
    return {"schema_version": SCHEMA_VERSION, "config": cfg, "run": run, "rounds": rounds}


def _load(tmp_path: Path, runs: list[dict]) -> list[report.RunResult]:
    results = []
    for index, data in enumerate(runs):
        path = tmp_path / f"run{index}.json"
        path.write_text(json.dumps(data))
        results.append(report.RunResult.load(path))
    return results


def _row(table: str, label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_target_gives_the_first_round_reaching_it_and_the_mb_by_then(tmp_path) -> None:
    runs = _load(
        tmp_path,
        [
            _results("fedavg", [0.5275, 0.5275, 0.60]),
            _results("fedlora", [0.5275, 0.65, 0.71, 0.69]),
            _results("fedkdlora", [0.5275, 0.70, 0.72, 0.74]),
        ],
    )
    table = report.markdown_table(runs, target=0.70)
    header = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    assert header[-2:] == ["rounds to acc 0.7", "MB to acc 0.7"]
    assert _row(table, "fedavg")[-2:] == ["never", "never"]
    assert _row(table, "fedlora")[-2:] == ["2", "6.00"]  # round 2: 2 MB up + 4 MB down
    assert _row(table, "fedkdlora")[-2:] == ["1", "3.00"]
    assert "rounds to" not in report.markdown_table(runs)  # no target, no columns


def test_seeds_are_grouped_into_mean_and_std_and_spread_is_labelled(tmp_path) -> None:
    fedlora = [
        _results("fedlora", [0.5, 0.6, final], seed=s)
        for s, final in zip((1, 2, 3), (0.70, 0.72, 0.74), strict=True)
    ]
    close = [
        _results("fedkdlora", [0.5, 0.6, f], seed=s)
        for s, f in zip((1, 2, 3), (0.71, 0.73, 0.75), strict=True)
    ]
    table = report.markdown_table(_load(tmp_path, fedlora + close), target=0.6)
    row = _row(table, "fedlora")
    assert row[1:5] == ["2", "3", "0.7200 ± 0.0200", "0.7200 ± 0.0200"]  # rounds, seeds, final, best
    assert _row(table, "fedkdlora")[-2:] == ["+0.0100 (within seed spread)", "+0.0 (within seed spread)"]
    assert row[-2:] == ["-", "-"]  # the reference itself

    far = [
        _results("fedkdlora", [0.5, 0.7, f], seed=s)
        for s, f in zip((1, 2, 3), (0.80, 0.81, 0.82), strict=True)
    ]
    table = report.markdown_table(_load(tmp_path, fedlora + far), target=0.65)
    assert _row(table, "fedkdlora")[-2:] == ["+0.0900 (exceeds seed spread)", "-1.0 (exceeds seed spread)"]
    assert _row(table, "fedlora")[-4:-2] == ["2.0 ± 0.0", "6.00 ± 0.00"]


def test_partly_reached_targets_say_how_many_seeds_reached(tmp_path) -> None:
    runs = [_results("fedlora", [0.5, 0.7, 0.8], seed=1), _results("fedlora", [0.5, 0.6, 0.6], seed=2)]
    table = report.markdown_table(_load(tmp_path, runs), target=0.7)
    assert _row(table, "fedlora")[-4:-2] == ["1 (1/2; never in 1)", "3.00 (1/2; never in 1)"]


def test_a_one_node_run_is_labelled_centralized_and_listed_first(tmp_path) -> None:
    runs = _load(
        tmp_path,
        [
            _results("fedlora", [0.5275, 0.6, 0.7]),
            _results("fedlora", [0.5275, 0.8, 0.82], nodes=1, **{"min-available-nodes": 1}),
        ],
    )
    assert [run.centralized for run in runs] == [False, True]
    out = tmp_path / "report"
    report.write_report(runs, out, target=0.75)
    text = (out / "comparison.md").read_text()
    lines = text.splitlines()
    assert lines[4].startswith("| centralized (fedlora) | 2 |") and lines[5].startswith("| fedlora | 2 |")
    assert "Majority class (always the evaluation set's commoner label): accuracy 0.5275, MCC 0." in text


def test_majority_baseline_comes_from_the_confusion_counts(tmp_path) -> None:
    (run,) = _load(tmp_path, [_results("fedlora", [0.5, 0.6])])
    assert run.majority_baseline("accuracy") == 211 / 400
    assert run.majority_baseline("mcc") == 0.0


def test_each_seeds_evaluation_subset_has_its_own_majority_line(tmp_path) -> None:
    runs = [_results("fedlora", [0.5, 0.6], seed=1), _results("fedlora", [0.5, 0.6], seed=2)]
    runs[1]["rounds"][0]["server"]["student"] |= {"tp": 190, "fn": 11}  # 201 positives of 400
    loaded = _load(tmp_path, runs)
    assert report.majority_baselines(loaded, "accuracy") == [0.5025, 0.5275]
    report.write_report(loaded, tmp_path / "out", target=0.55)
    assert (
        "accuracy 0.5025, 0.5275 (the seeded evaluation subsets differ by seed)"
        in (tmp_path / "out" / "comparison.md").read_text()
    )


def test_y_axis_is_not_zoomed_onto_a_wiggle() -> None:
    ax = Figure().subplots()
    ax.plot([0, 1, 2], [0.720, 0.7225, 0.726])
    report.open_y_axis(ax, "accuracy")
    low, high = ax.get_ylim()
    assert high - low >= report.MIN_Y_SPAN and low <= 0.72 and high >= 0.726
    ax = Figure().subplots()
    ax.plot([0, 1], [0.95, 0.99])
    report.open_y_axis(ax, "accuracy")
    assert ax.get_ylim() == (0.7, 1.0)  # accuracy never drawn above 1


def test_plot_with_seeds_target_and_ceiling_draws_bands_stars_and_lines(tmp_path, monkeypatch) -> None:
    runs = _load(
        tmp_path,
        [_results("fedlora", [0.5275, 0.6, f], seed=s) for s, f in ((1, 0.7), (2, 0.75))]
        + [_results("fedlora", [0.5275, 0.8, 0.82], nodes=1, **{"min-available-nodes": 1})],
    )
    drawn: dict[str, list] = {"fill": [], "hline": [], "star": []}
    real_fill, real_hline, real_plot = (
        Axes.fill_between,
        Axes.axhline,
        Axes.plot,
    )

    def plot(ax, *args, **kwargs):
        if kwargs.get("marker") == "*":
            drawn["star"].append(tuple(args[:2]))
        return real_plot(ax, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", plot)
    monkeypatch.setattr(
        Axes, "fill_between", lambda ax, *a, **k: drawn["fill"].append(a) or real_fill(ax, *a, **k)
    )
    monkeypatch.setattr(
        Axes, "axhline", lambda ax, y, **k: drawn["hline"].append(y) or real_hline(ax, y, **k)
    )
    path = report.plot_accuracy_per_round(runs, tmp_path, target=0.72)
    assert path.stat().st_size > 10_000
    assert len(drawn["fill"]) == 1  # one band: the two-seed fedlora group; the ceiling is a line
    assert sorted(drawn["hline"]) == pytest.approx([211 / 400, 0.72, 0.82])  # majority, target, ceiling
    assert drawn["star"] == [(2, 0.75)]  # seed 2 reaches 0.72 in round 2; seed 1 (0.70) never does


def test_compare_plans_seeds_and_one_centralized_run_per_lora_setting() -> None:
    args = compare.parse_args(
        [
            "--task",
            "sst2",
            "--quick",
            "--centralized",
            "--seeds",
            "42",
            "43",
            "--lora-variants",
            "naive",
            "fp16",
        ]
    )
    plan = compare.planned_runs(args)
    central = [r for r in plan if report.is_centralized(r)]
    # per seed: fedavg, fedlora x 2 variants, fedkdlora x 2 variants, 4 centralized (two per variant)
    assert len(plan) == 2 * 9 and len(central) == 2 * 4
    assert sorted(r["centralized-public"] for r in central) == [False] * 4 + [True] * 4
    assert {r["seed"] for r in plan} == {42, 43}
    assert all(r["scheme"] == "fedlora" and r["max-train-examples-per-client"] == 4 * 300 for r in central)
    assert {r.get("wire-dtype", "float32") for r in central} == {"float32", "float16"}
    capped = compare.parse_args(
        [
            "--task",
            "sst2",
            "--centralized",
            "--clients",
            "3",
            "--run-config",
            "max-train-examples-per-client=10",
        ]
    )
    assert [
        r["max-train-examples-per-client"] for r in compare.planned_runs(capped) if report.is_centralized(r)
    ] == [30] * 6
    only_fedavg = compare.parse_args(["--task", "sst2", "--centralized", "--schemes", "fedavg"])
    assert not any(report.is_centralized(r) for r in compare.planned_runs(only_fedavg))


def test_medium_keeps_the_whole_public_slice_and_caps_clients(tmp_path) -> None:
    args = compare.parse_args(["--task", "cola", "--medium"])
    common = compare.common_overrides(args, tmp_path)
    assert common["max-public-examples"] == 0 and common["max-train-examples-per-client"] == 500
    assert common["num-server-rounds"] == compare.MEDIUM_ROUNDS
    with pytest.raises(SystemExit):
        compare.parse_args(["--task", "cola", "--medium", "--quick"])


def test_compare_plans_each_server_step_signal_and_the_original_loss_for_fedkdlora_only() -> None:
    args = compare.parse_args(
        ["--task", "sst2", "--quick", "--signals", "labels", "teacher", "labels+teacher",
         "--kd-losses", "kl", "original"]
    )  # fmt: skip
    plan = compare.planned_runs(args)
    kd = [(r["server-student-signal"], r["kd-loss"]) for r in plan if r["scheme"] == "fedkdlora"]
    assert kd == [
        ("labels", "kl"),
        ("teacher", "kl"),
        ("labels+teacher", "kl"),
        ("labels+teacher", "original"),
    ]
    assert all("server-student-signal" not in r for r in plan if r["scheme"] != "fedkdlora")


def test_the_teachers_contribution_is_measured_against_the_labels_control(tmp_path) -> None:
    """Δ vs labels: FedKDLoRA against the same settings where only the public labels reach the student."""
    fedlora = [_results("fedlora", [0.5, 0.6, 0.70 + s / 100], seed=s) for s in (1, 2, 3)]
    labels = [
        _results("fedkdlora", [0.5, 0.7, 0.75 + s / 100], seed=s, **{"server-student-signal": "labels"})
        for s in (1, 2, 3)
    ]
    both = [_results("fedkdlora", [0.5, 0.7, 0.755 + s / 100], seed=s) for s in (1, 2, 3)]
    runs = _load(tmp_path, fedlora + labels + both)
    table = report.markdown_table(runs, target=0.7)
    header = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    assert header[-4:] == [
        "Δ final acc vs fedlora",
        "Δ rounds to target vs fedlora",
        "Δ final acc vs labels",
        "Δ rounds to target vs labels",
    ]
    assert _row(table, "fedkdlora signal=labels")[-4:] == [
        "+0.0500 (exceeds seed spread)",
        "-1.0 (exceeds seed spread)",
        "-",
        "-",
    ]
    assert _row(table, "fedkdlora signal=labels+teacher")[-2:] == [
        "+0.0050 (within seed spread)",
        "+0.0 (within seed spread)",
    ]
    assert _row(table, "fedlora")[-2:] == ["-", "-"]  # FedLoRA has no server step to compare
    assert [run.label(report.varying_keys(runs)) for run in runs[:1]] == ["fedlora"]


def test_the_aggregation_error_table_says_how_many_seeds_reported_a_round(tmp_path) -> None:
    """Runs of older code record no aggregation error: a round's cell says how many seeds it averages."""
    reported = _results("fedlora", [0.5, 0.6, 0.7], seed=44)
    for entry, error in zip(reported["rounds"][1:], (0.25, 0.125), strict=True):
        entry["aggregation"] = {"error": error}
    both = [_results("fedlora", [0.5, 0.6, 0.7], seed=42), reported]
    assert _row(report.aggregation_error_table(_load(tmp_path, both)), "fedlora") == [
        "fedlora",
        "0.250 (1/2 seeds)",
        "0.125 (1/2 seeds)",
    ]
    reported_twice = [reported, {**reported, "config": {**reported["config"], "seed": 45}}]
    table = report.aggregation_error_table(_load(tmp_path, reported_twice))
    assert _row(table, "fedlora")[1].startswith("0.250 ± 0")

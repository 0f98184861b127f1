"""Tables and figures from results JSON files; `fedkdlora-plot` redraws them after the fact."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fedkdlora_app import results_format
from fedkdlora_app.config import SCHEMES, with_current_names
from fedkdlora_app.results import ADDED_KEY_DEFAULTS, MB
from fedkdlora_app.results_format import ResultsDocument

# Run-config keys a comparison may vary, and how a run's label shows them.
SWEEP_LABELS = {
    "lora-r": "r",
    "teacher-data-pct": "public",
    "lora-aggregation": "agg",
    "lora-residual-rank": "residual-r",
    "lora-r-by-partition": "ranks",
    "lora-freeze-a": "freeze-A",
    "wire-dtype": "wire",
    "dp-noise-multiplier": "dp-noise",
    "lora-client-lr": "lr",
    "server-student-signal": "signal",
    "kd-loss": "loss",
    "public-labelled-pct": "labelled",
}
# Keys only FedKDLoRA's server step reads: not part of another scheme's label or identity.
SERVER_STEP_KEYS = ("server-student-signal", "kd-loss")


def is_centralized(config: Mapping[str, Any]) -> bool:
    """A run on one SuperNode holding the whole client pool (`fedkdlora-compare --centralized`):
    the ceiling of federated runs. The one definition the planner and the report share.
    """
    return config.get("min-available-nodes") == 1


@dataclass(frozen=True)
class RunResult:
    """One results JSON, with the series the report needs."""

    path: Path
    data: ResultsDocument

    @classmethod
    def load(cls, path: Path) -> RunResult:
        data = results_format.load(path)  # an older layout is read in the current one
        if not any("student" in r["server"] for r in data["rounds"]):
            raise ValueError(f"{path}: the run has no evaluated round yet")
        return cls(path, data)

    @property
    def config(self) -> dict[str, Any]:
        """The run-config, keys under their current names (older files may use renamed ones)."""
        return with_current_names(self.data["config"])

    @property
    def task(self) -> str:
        return self.config["task"]

    @property
    def metric(self) -> str:
        """The score `--target` refers to: MCC for CoLA (GLUE's metric), else accuracy."""
        return target_metric(self.task)

    @property
    def centralized(self) -> bool:
        return is_centralized(self.config)

    def setting(self, key: str) -> Any:
        """A run-config value; files written before the key existed get the behaviour they had."""
        return self.config.get(key, ADDED_KEY_DEFAULTS.get(key))

    def sweep_settings(self) -> dict[str, Any]:
        """The sweep keys that apply to this run's scheme: what a reference run must share."""
        scheme = self.config["scheme"]
        return {
            key: self.setting(key)
            for key in SWEEP_LABELS
            if not (scheme == "fedavg" and key.startswith("lora-"))
            and not (scheme != "fedkdlora" and key in SERVER_STEP_KEYS)
        }

    def label_parts(self, varying: set[str]) -> list[str]:
        """The scheme (or 'centralized (scheme)'), plus whichever sweep keys differ across runs."""
        scheme = self.config["scheme"]
        ceiling = "centralized + public" if self.setting("centralized-public") else "centralized"
        parts = [f"{ceiling} ({scheme})" if self.centralized else scheme]
        applies = self.sweep_settings()
        for key, short in SWEEP_LABELS.items():
            value = self.setting(key)
            if key not in varying or key not in applies:
                continue
            if key in ("teacher-data-pct", "public-labelled-pct"):
                parts.append(f"{short}={value:g}%")
            elif isinstance(value, bool):
                parts.append(short if value else "")
            elif value not in ("", "naive", "float32", 0):
                parts.append(f"{short}={value}")
        return [part for part in parts if part]

    def label(self, varying: set[str]) -> str:
        return " ".join(self.label_parts(varying))

    @property
    def finished_rounds(self) -> list[dict[str, Any]]:
        """Rounds that closed with server-side metrics (a failed run's last round may not have)."""
        return [r for r in self.data["rounds"] if "student" in r["server"]]

    def series(self, role: str, metric: str) -> tuple[list[int], list[float]]:
        rounds = [r for r in self.finished_rounds if role in r["server"]]
        return [r["round"] for r in rounds], [r["server"][role][metric] for r in rounds]

    def cumulative_mb(self) -> list[float]:
        """Bytes both ways so far, after each finished round (round 0: nothing sent yet)."""
        return [
            (r["communication"]["cumulative_up_bytes"] + r["communication"]["cumulative_down_bytes"]) / MB
            for r in self.finished_rounds
        ]

    def reached(self, target: float) -> tuple[int, float, float] | None:
        """First round whose student score is >= `target`: (round, score, MB up + down by then)."""
        rounds, scores = self.series("student", self.metric)
        for index, (server_round, score) in enumerate(zip(rounds, scores, strict=True)):
            if score >= target:
                return server_round, score, self.cumulative_mb()[index]
        return None

    def majority_baseline(self, metric: str) -> float | None:
        """Score of always predicting the evaluation set's majority label: accuracy from the counts; MCC 0."""
        if metric == "mcc":
            return 0.0
        first = self.finished_rounds[0]["server"]["student"]
        if not all(k in first for k in ("tp", "fn", "num_examples")):
            return None
        positives = first["tp"] + first["fn"]
        return max(positives, first["num_examples"] - positives) / first["num_examples"]

    def aggregation_errors(self) -> dict[int, float]:
        """Round -> how far the aggregate lay from the exact mean of the clients' updates
        (`rounds[].aggregation.error`); empty where the run did not report it."""
        return {
            r["round"]: r["aggregation"]["error"]
            for r in self.finished_rounds
            if "error" in r.get("aggregation", {})
        }

    def summary(self) -> dict[str, Any]:
        _, acc = self.series("student", "accuracy")
        _, mcc = self.series("student", "mcc")
        _, loss = self.series("student", "loss")
        last = self.finished_rounds[-1]["communication"]
        # a run killed before it closed has no total: its finished rounds' seconds instead
        seconds = self.data["run"]["wall_seconds_total"] or sum(
            r["wall_seconds"] for r in self.finished_rounds
        )
        row = {
            "final acc": acc[-1],
            "best acc": max(acc),
            "final loss": loss[-1],
            "MB up": last["cumulative_up_bytes"] / MB,
            "MB down": last["cumulative_down_bytes"] / MB,
            "seconds": seconds,
        }
        if self.task == "cola":
            row |= {"final MCC": mcc[-1], "best MCC": max(mcc)}
        errors = list(self.aggregation_errors().values())
        row["agg error"] = float(np.mean(errors)) if errors else None
        return row


def target_metric(task: str) -> str:
    return "mcc" if task == "cola" else "accuracy"


@dataclass(frozen=True)
class RunGroup:
    """Runs that differ only in seed (or repeat one): one row of the table, one band in the plots."""

    label: str
    runs: list[RunResult]

    @property
    def scheme(self) -> str:
        return self.runs[0].config["scheme"]

    @property
    def centralized(self) -> bool:
        return self.runs[0].centralized

    @property
    def settings(self) -> dict[str, Any]:
        return self.runs[0].sweep_settings()

    def values(self, column: str) -> list[float]:
        return [run.summary()[column] for run in self.runs]

    def band(self, metric: str) -> tuple[list[int], np.ndarray, np.ndarray]:
        """Per round: mean and sample std of the student's score, over the rounds all runs finished."""
        series = [run.series("student", metric) for run in self.runs]
        length = min(len(rounds) for rounds, _ in series)
        scores = np.array([values[:length] for _, values in series])
        return series[0][0][:length], scores.mean(0), _std(scores)

    def mean_mb(self) -> np.ndarray:
        length = min(len(run.finished_rounds) for run in self.runs)
        return np.mean([run.cumulative_mb()[:length] for run in self.runs], axis=0)

    def rounds_to_target(self, target: float) -> list[int | None]:
        return [hit[0] if (hit := run.reached(target)) else None for run in self.runs]


def _std(values: np.ndarray) -> np.ndarray:
    """Sample std over runs (axis 0; ddof 1); 0 for a single run."""
    return values.std(0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1:])


def group_runs(runs: list[RunResult]) -> list[RunGroup]:
    """Runs with the same label (same scheme and sweep settings; seeds may differ), in run order."""
    varying = varying_keys(runs)
    groups: dict[str, list[RunResult]] = {}
    for run in runs:
        groups.setdefault(run.label(varying), []).append(run)
    return [RunGroup(label, members) for label, members in groups.items()]


def varying_keys(runs: list[RunResult]) -> set[str]:
    return {
        k for k in SWEEP_LABELS if len({str(r.config.get(k, ADDED_KEY_DEFAULTS.get(k))) for r in runs}) > 1
    }


def markdown_table(runs: list[RunResult], target: float | None = None, seconds: bool = True) -> str:
    """One row per configuration: a value, or mean ± std over its seeds.

    Rounds are counted so runs of different length are not mistaken as equal. With
    `target`, the first round whose score reaches it and the MB up + down by then. With
    several seeds, each scheme's difference to FedLoRA at the same settings, labelled
    "within seed spread" when |Δ mean| <= the larger of the two standard deviations.
    `seconds=False` leaves wall time out (runs that shared their cores measure no cost).
    """
    groups = group_runs(runs)
    columns = list(groups[0].runs[0].summary()) if groups else []
    task = runs[0].task if runs else ""
    if task == "cola":
        columns = [
            "final acc",
            "best acc",
            "final MCC",
            "best MCC",
            "final loss",
            "MB up",
            "MB down",
            "seconds",
        ]
    if not seconds:
        columns = [c for c in columns if c != "seconds"]
    if not any(run.aggregation_errors() for run in runs):
        columns = [c for c in columns if c != "agg error"]
    elif "agg error" not in columns:
        columns.append("agg error")
    seeded = any(len(g.runs) > 1 for g in groups)
    metric_name = "MCC" if target_metric(task) == "mcc" else "acc"
    header = ["run", "rounds"] + (["seeds"] if seeded else []) + columns
    if target is not None:
        header += [f"rounds to {metric_name} {target:g}", f"MB to {metric_name} {target:g}"]
    # the references: FedLoRA, and FedKDLoRA's labels-only control (what the teacher adds beyond labels)
    references = [("fedlora", "fedlora", None)]
    if any(g.scheme == "fedkdlora" and g.settings["server-student-signal"] == "labels" for g in groups):
        references.append(("labels", "fedkdlora", "labels"))
    if seeded:
        for name, _, _ in references:
            header += [f"Δ final {metric_name} vs {name}"] + (
                [f"Δ rounds to target vs {name}"] if target else []
            )
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for group in groups:
        cells = [group.label, _rounds_cell(group)]
        cells += [str(len(group.runs))] if seeded else []
        cells += [_cell(c, group.values(c)) for c in columns]
        if target is not None:
            cells += _target_cells(group, target)
        if seeded:
            for _, scheme, signal in references:
                # the labels control is a reference for FedKDLoRA's other server steps only
                applies = signal is None or group.scheme == "fedkdlora"
                reference = _reference(group, groups, scheme, signal) if applies else None
                cells += _versus(group, reference, target)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def aggregation_error_table(runs: list[RunResult]) -> str:
    """Per configuration and round, the aggregate's relative distance from the exact mean of the
    clients' updates (mean ± std over seeds; "(k/n seeds)" where only k of a row's n runs reported
    it, e.g. runs of older code); "" when no run reported it."""
    groups = [g for g in group_runs(runs) if any(run.aggregation_errors() for run in g.runs)]
    if not groups:
        return ""
    rounds = sorted({n for g in groups for run in g.runs for n in run.aggregation_errors()})
    lines = ["| run | " + " | ".join(f"round {n}" for n in rounds) + " |", "|---|" + "---:|" * len(rounds)]
    for group in groups:
        cells = []
        for n in rounds:
            values = [errors[n] for run in group.runs if n in (errors := run.aggregation_errors())]
            share = f" ({len(values)}/{len(group.runs)} seeds)" if len(values) < len(group.runs) else ""
            cells.append(_cell("agg error", values) + share if values else "-")
        lines.append(f"| {group.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _rounds_cell(group: RunGroup) -> str:
    counts = sorted({len(run.finished_rounds) - 1 for run in group.runs})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def _cell(column: str, values: list[float | None]) -> str:
    if None in values:  # a run without the figure (FedAvg or FFA-LoRA: no aggregation error)
        return _fmt(column, None)
    if len(values) == 1:
        return _fmt(column, values[0])
    return f"{_fmt(column, float(np.mean(values)))} ± {_fmt(column, float(np.std(values, ddof=1)))}"


def _target_cells(group: RunGroup, target: float) -> list[str]:
    hits = [hit for run in group.runs if (hit := run.reached(target))]
    if not hits:
        return ["never", "never"]
    missed = len(group.runs) - len(hits)
    note = f" ({len(hits)}/{len(group.runs)}; never in {missed})" if missed else ""
    rounds = _cell("rounds", [float(h[0]) for h in hits]) if len(hits) > 1 else str(hits[0][0])
    return [rounds + note, _cell("MB", [h[2] for h in hits]) + note]


def _reference(group: RunGroup, groups: list[RunGroup], scheme: str, signal: str | None) -> RunGroup | None:
    """The federated group of `scheme` (and server-step `signal`) with the same other settings."""
    for candidate in groups:
        if candidate.centralized or candidate.scheme != scheme:
            continue
        if signal is not None and (
            candidate.settings["server-student-signal"] != signal or candidate.settings["kd-loss"] != "kl"
        ):
            continue
        shared = (set(group.settings) & set(candidate.settings)) - set(SERVER_STEP_KEYS)
        if all(group.settings[key] == candidate.settings[key] for key in shared):
            return candidate
    return None


def _versus(group: RunGroup, reference: RunGroup | None, target: float | None) -> list[str]:
    """Δ mean to `reference` (final score; with `target`, rounds to it), against the seed spread."""
    width = 2 if target is not None else 1
    if reference is None or reference is group:
        return ["-"] * width
    column = "final MCC" if group.runs[0].task == "cola" else "final acc"
    cells = [_spread_note(group.values(column), reference.values(column), "{:+.4f}")]
    if target is not None:
        # a run that never reaches the target counts as rounds + 1 (a lower bound)
        def censored(g: RunGroup) -> list[float]:
            return [
                float(r if r is not None else len(run.finished_rounds))
                for r, run in zip(g.rounds_to_target(target), g.runs, strict=True)
            ]

        cells.append(_spread_note(censored(group), censored(reference), "{:+.1f}"))
    return cells


def _spread_note(values: list[float], reference: list[float], fmt: str) -> str:
    delta = float(np.mean(values) - np.mean(reference))
    if min(len(values), len(reference)) < 2:
        return f"{fmt.format(delta)} (one seed: no spread)"
    spread = max(float(np.std(values, ddof=1)), float(np.std(reference, ddof=1)))
    verdict = "within seed spread" if abs(delta) <= spread else "exceeds seed spread"
    return f"{fmt.format(delta)} ({verdict})"


def _fmt(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column.startswith("MB"):
        return f"{value:,.2f}"
    if column == "rounds":
        return f"{value:.1f}"
    if column == "agg error":
        return f"{value:.2e}" if value < 1e-3 else f"{value:.3f}"
    return f"{value:,.0f}" if column == "seconds" else f"{value:.4f}"


def _metrics(task: str) -> list[str]:
    return ["accuracy", "mcc"] if task == "cola" else ["accuracy"]


MIN_Y_SPAN = 0.3  # a 0.006 wiggle must look like one


def open_y_axis(ax: Axes, metric: str) -> None:
    """Widen the y range to at least MIN_Y_SPAN (clipped to the metric's range), not auto-zoomed."""
    low, high = ax.get_ylim()
    if high - low < MIN_Y_SPAN:
        middle = (low + high) / 2
        low, high = middle - MIN_Y_SPAN / 2, middle + MIN_Y_SPAN / 2
    floor = 0.0 if metric == "accuracy" else -1.0
    if low < floor:
        low, high = floor, max(high, floor + MIN_Y_SPAN)
    if high > 1.0:
        low, high = min(low, 1.0 - MIN_Y_SPAN), 1.0
    ax.set_ylim(low, high)


def majority_baselines(runs: list[RunResult], metric: str) -> list[float]:
    """The distinct majority-class scores: seeded evaluation subsets (max-eval-examples) differ by seed."""
    return sorted({b for run in runs if (b := run.majority_baseline(metric)) is not None})


def _references(ax: Axes, groups: list[RunGroup], metric: str, target: float | None) -> None:
    """Majority class (one line per distinct evaluation set), the centralized ceiling(s) and the target."""
    baselines = majority_baselines([run for group in groups for run in group.runs], metric)
    for index, baseline in enumerate(baselines):
        label = f"majority class ({', '.join(f'{b:.4f}' for b in baselines)})" if index == 0 else None
        ax.axhline(baseline, color="grey", linestyle=":", label=label)
    for group in (g for g in groups if g.centralized):
        _, mean, _ = group.band(metric)
        ax.axhline(mean[-1], color="black", linestyle="-.", label=f"{group.label} ceiling ({mean[-1]:.4f})")
    if target is not None and metric == target_metric(groups[0].runs[0].task):
        ax.axhline(target, color="red", linestyle="--", alpha=0.6, label=f"target {target:g}")


def _draw_group(ax: Axes, x: Any, mean: np.ndarray, std: np.ndarray, group: RunGroup) -> str:
    label = group.label if len(group.runs) == 1 else f"{group.label} (mean ± std, {len(group.runs)} seeds)"
    (line,) = ax.plot(x, mean, marker="o", label=label)
    if len(group.runs) > 1:
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    return line.get_color()


def plot_accuracy_per_round(runs: list[RunResult], out: Path, target: float | None = None) -> Path:
    """Federated runs as lines (seed bands), centralized runs as ceilings, stars: runs reaching the target."""
    metrics = _metrics(runs[0].task)
    groups = group_runs(runs)
    fig = Figure(figsize=(6 * len(metrics), 4))  # no pyplot: no backend, no global figure state
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for group in (g for g in groups if not g.centralized):
            color = _draw_group(ax, *group.band(metric), group)
            if target is not None and metric == target_metric(runs[0].task):
                for hit in filter(None, (run.reached(target) for run in group.runs)):
                    ax.plot(hit[0], hit[1], marker="*", markersize=14, color=color, linestyle="none")
        _references(ax, groups, metric, target)
        ax.set(xlabel="round", ylabel=f"student dev {metric}", title=f"{runs[0].task}: {metric} per round")
        open_y_axis(ax, metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, out / "accuracy_per_round.png")


def plot_accuracy_vs_mb(runs: list[RunResult], out: Path, target: float | None = None) -> Path:
    """Round 0 (nothing sent) is left out: the x axis is logarithmic. Stars: MB at the target."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    groups = group_runs(runs)
    metric = target_metric(runs[0].task)
    for group in (g for g in groups if not g.centralized):
        _, mean, std = group.band(metric)
        color = _draw_group(ax, group.mean_mb()[1:], mean[1:], std[1:], group)
        if target is not None:
            for hit in filter(None, (run.reached(target) for run in group.runs)):
                if hit[2] > 0:
                    ax.plot(hit[2], hit[1], marker="*", markersize=14, color=color, linestyle="none")
    _references(ax, groups, metric, target)
    ax.set_xscale("log")
    ax.set(
        xlabel="cumulative MB communicated (up + down)",
        ylabel=f"student dev {metric}",
        title=f"{runs[0].task}: {metric} vs communication",
    )
    open_y_axis(ax, metric)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return _save(fig, out / "accuracy_vs_mb.png")


def plot_teacher_vs_student(runs: list[RunResult], out: Path) -> Path | None:
    kd_runs = [run for run in runs if run.config["scheme"] == "fedkdlora"]
    if not kd_runs:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    varying = varying_keys(runs)
    for run in kd_runs:
        (line,) = ax.plot(
            *run.series("student", "accuracy"), marker="o", label=f"{run.label(varying)} student"
        )
        ax.plot(
            *run.series("teacher", "accuracy"),
            marker="s",
            linestyle="--",
            color=line.get_color(),
            label=f"{run.label(varying)} teacher",
        )
    ax.set(xlabel="round", ylabel="dev accuracy", title=f"{runs[0].task}: FedKDLoRA teacher vs student")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out / "teacher_vs_student.png")


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def run_order(run: RunResult) -> tuple:
    """Table and legend order: ceilings first, then by scheme, public share, rank, start time."""
    scheme = run.config["scheme"]
    return (
        not run.centralized,
        SCHEMES.index(scheme) if scheme in SCHEMES else len(SCHEMES),
        run.config["teacher-data-pct"],
        run.config["lora-r"],
        run.data["run"]["started_at"],
    )


def write_report(runs: list[RunResult], out: Path, target: float | None = None) -> list[Path]:
    """`comparison.md` and the figures, per task when runs of several tasks are given."""
    out.mkdir(parents=True, exist_ok=True)
    runs = sorted(runs, key=run_order)
    written = []
    for task in sorted({run.task for run in runs}):
        task_runs = [run for run in runs if run.task == task]
        task_out = out if len({run.task for run in runs}) == 1 else out / task
        task_out.mkdir(parents=True, exist_ok=True)
        table = task_out / "comparison.md"
        table.write_text(f"# {task}\n\n" + markdown_table(task_runs, target) + _notes(task_runs, target))
        written += [
            table,
            plot_accuracy_per_round(task_runs, task_out, target),
            plot_accuracy_vs_mb(task_runs, task_out, target),
        ]
        teacher_plot = plot_teacher_vs_student(task_runs, task_out)
        written += [teacher_plot] if teacher_plot else []
    return written


def _notes(runs: list[RunResult], target: float | None) -> str:
    """What the table's reference points are, under it; nothing for a plain one-seed table."""
    notes = []
    baselines = majority_baselines(runs, "accuracy")
    if target is not None or any(run.centralized for run in runs):
        if baselines:
            subsets = " (the seeded evaluation subsets differ by seed)" if len(baselines) > 1 else ""
            notes.append(
                "Majority class (always the evaluation set's commoner label): accuracy "
                f"{', '.join(f'{b:.4f}' for b in baselines)}{subsets}, MCC 0."
            )
        notes.append(
            "centralized: the student on one SuperNode holding the whole client pool; "
            "the ceiling of both LoRA schemes (FedKDLoRA ships and is scored on the student alone)."
        )
    if any(len(g.runs) > 1 for g in group_runs(runs)):
        notes.append(
            "a ± b: mean and sample standard deviation over seeds. Δ vs fedlora: difference of means; "
            "'within seed spread' when |Δ| <= the larger of the two standard deviations. "
            "In Δ rounds, a run that never reaches the target counts as rounds + 1."
        )
    return "".join(f"\n{note}\n" for note in notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedkdlora-plot", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results JSON files (or folders of them)")
    parser.add_argument("--out", type=Path, required=True, help="folder for comparison.md and the PNGs")
    parser.add_argument(
        "--target", type=float, help="score to reach (accuracy; MCC for CoLA): rounds and MB to it"
    )
    args = parser.parse_args(argv)
    files = [f for p in args.results for f in (sorted(p.glob("*.json")) if p.is_dir() else [p])]
    try:
        runs = [RunResult.load(f) for f in files]
    except (OSError, ValueError) as error:
        print(f"fedkdlora-plot: {error}", file=sys.stderr)
        return 2
    if not runs:
        print("fedkdlora-plot: no results JSON files given", file=sys.stderr)
        return 2
    for path in write_report(runs, args.out, args.target):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

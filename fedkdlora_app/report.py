"""Tables and figures from results JSON files; `fedkdlora-plot` redraws them after the fact."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt

from fedkdlora_app.config import SCHEMES
from fedkdlora_app.results import ADDED_KEY_DEFAULTS, MB

# Run-config keys a comparison may vary, and how a run's label shows them.
SWEEP_LABELS = {
    "lora-r": "r",
    "teacher-data-pct": "public",
    "lora-aggregation": "agg",
    "lora-r-by-partition": "ranks",
    "lora-freeze-a": "freeze-A",
    "wire-dtype": "wire",
    "dp-noise-multiplier": "dp-noise",
    "lora-client-lr": "lr",
}


@dataclass(frozen=True)
class RunResult:
    """One results JSON, with the series the report needs."""

    path: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, path: Path) -> RunResult:
        data = json.loads(path.read_text())
        if "rounds" not in data or "config" not in data:
            raise ValueError(f"{path}: not a fedkdlora results JSON (no 'rounds'/'config')")
        if not any("student" in r["server"] for r in data["rounds"]):
            raise ValueError(f"{path}: the run has no evaluated round yet")
        return cls(path, data)

    @property
    def config(self) -> dict[str, Any]:
        return self.data["config"]

    @property
    def task(self) -> str:
        return self.config["task"]

    def label(self, varying: set[str]) -> str:
        """The scheme, plus whichever sweep keys differ across the compared runs."""
        parts = [self.config["scheme"]]
        for key, short in SWEEP_LABELS.items():
            value = self.config.get(key, ADDED_KEY_DEFAULTS.get(key))
            if key not in varying or (self.config["scheme"] == "fedavg" and key.startswith("lora-")):
                continue
            if key == "teacher-data-pct":
                parts.append(f"public={value:g}%")
            elif isinstance(value, bool):
                parts.append(short if value else "")
            elif value not in ("", "naive", "float32", 0):
                parts.append(f"{short}={value}")
        return " ".join(part for part in parts if part)

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
        return row


def varying_keys(runs: list[RunResult]) -> set[str]:
    return {
        k for k in SWEEP_LABELS if len({str(r.config.get(k, ADDED_KEY_DEFAULTS.get(k))) for r in runs}) > 1
    }


def markdown_table(runs: list[RunResult]) -> str:
    """One row per run; rounds counted so runs of different length are not mistaken as equal."""
    varying = varying_keys(runs)
    rows = [(run.label(varying), len(run.finished_rounds) - 1, run.summary()) for run in runs]
    columns = list(rows[0][2]) if rows else []
    if any("final MCC" in row for _, _, row in rows):
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
    lines = [
        "| run | rounds | " + " | ".join(columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for label, num_rounds, row in rows:
        cells = [_fmt(c, row.get(c)) for c in columns]
        lines.append(f"| {label} | {num_rounds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column.startswith("MB"):
        return f"{value:,.2f}"
    return f"{value:,.0f}" if column == "seconds" else f"{value:.4f}"


def _metrics(task: str) -> list[str]:
    return ["accuracy", "mcc"] if task == "cola" else ["accuracy"]


def plot_accuracy_per_round(runs: list[RunResult], out: Path) -> Path:
    metrics = _metrics(runs[0].task)
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
    varying = varying_keys(runs)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for run in runs:
            ax.plot(*run.series("student", metric), marker="o", label=run.label(varying))
        ax.set(xlabel="round", ylabel=f"student dev {metric}", title=f"{runs[0].task}: {metric} per round")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    return _save(fig, out / "accuracy_per_round.png")


def plot_accuracy_vs_mb(runs: list[RunResult], out: Path) -> Path:
    """Round 0 (nothing sent) is left out: the x axis is logarithmic."""
    fig, ax = plt.subplots(figsize=(6, 4))
    varying = varying_keys(runs)
    for run in runs:
        _, accuracy = run.series("student", "accuracy")
        ax.plot(run.cumulative_mb()[1:], accuracy[1:], marker="o", label=run.label(varying))
    ax.set_xscale("log")
    ax.set(
        xlabel="cumulative MB communicated (up + down)",
        ylabel="student dev accuracy",
        title=f"{runs[0].task}: accuracy vs communication",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, out / "accuracy_vs_mb.png")


def plot_teacher_vs_student(runs: list[RunResult], out: Path) -> Path | None:
    kd_runs = [run for run in runs if run.config["scheme"] == "fedkdlora"]
    if not kd_runs:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
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


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _order(run: RunResult) -> tuple:
    scheme = run.config["scheme"]
    return (
        SCHEMES.index(scheme) if scheme in SCHEMES else len(SCHEMES),
        run.config["teacher-data-pct"],
        run.config["lora-r"],
        run.data["run"]["started_at"],
    )


def write_report(runs: list[RunResult], out: Path) -> list[Path]:
    """`comparison.md` and the figures, per task when runs of several tasks are given."""
    out.mkdir(parents=True, exist_ok=True)
    runs = sorted(runs, key=_order)
    written = []
    for task in sorted({run.task for run in runs}):
        task_runs = [run for run in runs if run.task == task]
        task_out = out if len({run.task for run in runs}) == 1 else out / task
        task_out.mkdir(parents=True, exist_ok=True)
        table = task_out / "comparison.md"
        table.write_text(f"# {task}\n\n" + markdown_table(task_runs))
        written += [
            table,
            plot_accuracy_per_round(task_runs, task_out),
            plot_accuracy_vs_mb(task_runs, task_out),
        ]
        teacher_plot = plot_teacher_vs_student(task_runs, task_out)
        written += [teacher_plot] if teacher_plot else []
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedkdlora-plot", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results JSON files (or folders of them)")
    parser.add_argument("--out", type=Path, required=True, help="folder for comparison.md and the PNGs")
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
    for path in write_report(runs, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

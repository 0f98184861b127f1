"""The results JSON of a run (its layout: `results_format`), and the one-line summary logged per round.

The file is rewritten atomically after every round, so an interrupted run keeps every
round it completed and the file never holds half a JSON document.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.common.logger import log

from fedkdlora_app.atomic import atomic_file
from fedkdlora_app.config import ConfigError, RunConfig, run_dir_of, with_current_names
from fedkdlora_app.results_format import (
    SCHEMA_VERSION,
    Aggregation,
    Distillation,
    EvalMetrics,
    Health,
    Placement,
    ResultsDocument,
    Round,
    TeacherInfo,
    TrackingInfo,
    TrainMetrics,
    load,
)
from fedkdlora_app.tracking import KEYS as TRACKING_KEYS

_PACKAGES = ("flwr", "flwr-datasets", "torch", "transformers", "peft", "datasets", "scikit-learn")
MB = 1e6
# Keys a resumed run may change: where to resume from, and how many rounds in all.
RESUMABLE_CHANGES = (
    "resume-from",
    "num-server-rounds",
    "progress-interval",
    "server-step-overlap",
    *TRACKING_KEYS,
)
# Run-config keys added after the first results were written, with the behaviour runs had before.
ADDED_KEY_DEFAULTS = {
    "lora-aggregation": "naive",
    "lora-residual-rank": 0,
    "lora-freeze-a": False,
    "lora-r-by-partition": "",
    "wire-dtype": "float32",
    "dp-noise-multiplier": 0.0,
    "dp-clipping-norm": 1.0,
    "dp-clipping": "server",
    "round-timeout": 3600.0,
    "precision": "float32",
    "distill-student-lr": 2e-5,  # the student trained at distill-lr, whose default was 2e-5
    "progress-interval": 0.0,
    "server-step-overlap": False,
    "length-grouped-batches": False,
    "server-student-signal": "labels+teacher",
    "kd-loss": "kl",
    "public-labelled-pct": 100.0,
    "centralized-public": False,
    "dp-delta": 1e-5,
    "dp-target-epsilon": 0.0,
    "tracking": "",
    "tracking-uri": "",
    "tracking-experiment": "",
}


def package_versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def run_name(config: RunConfig, started: datetime) -> str:
    """`<scheme>_<task>_<r8|full>_<UTC timestamp>`: sortable and self-describing."""
    rank = f"r{config.lora_r}" if config.uses_lora else "full"
    return f"{config.scheme}_{config.task}_{rank}_{started.strftime('%Y%m%dT%H%M%SZ')}"


def placement_summary(entry: Round) -> str:
    """`cpu x2`, or `cuda x4 (GPU ids 0,1)`: where the round's training ran, for the log line."""
    trained = [node["train"] for node in entry.get("placement", {}).values() if "train" in node]
    devices = sorted({p["device"] for p in trained})
    parts = [f"{device} x{sum(p['device'] == device for p in trained)}" for device in devices]
    gpu_ids = sorted({gpu for p in trained for gpu in str(p["ray_gpu_ids"]).split(",") if gpu})
    return ", ".join(parts) + (f" (GPU ids {','.join(gpu_ids)})" if gpu_ids else "")


class RunRecorder:
    """Collects per-round metrics, bytes and timings; owns the results JSON."""

    def __init__(self, config: RunConfig, resume: tuple[Path, int] | None = None) -> None:
        """A new run's record, or with `resume=(results JSON, last complete round)` the old one continued."""
        self._t0 = time.perf_counter()
        self._elapsed_before = 0.0
        self.num_rounds = config.num_server_rounds
        self._round_started: dict[int, float] = {}
        self.round_listeners: list[Callable[[Round], None]] = []  # told of each closed round (tracking)
        self._cumulative = {"down_bytes": 0, "up_bytes": 0}
        if resume is None:
            self._create(config)
        else:
            self._resume(config, *resume)
        self.write()

    def _create(self, config: RunConfig) -> None:
        started = datetime.now(timezone.utc)
        results_dir = Path(config.results_dir)
        results_dir.mkdir(parents=True, exist_ok=True)
        name = run_name(config, started)
        suffix = 1
        while (results_dir / f"{name}.json").exists() or (results_dir / name).exists():
            suffix += 1
            name = f"{run_name(config, started)}-{suffix}"
        self._set_paths(results_dir / f"{name}.json")
        self.data: ResultsDocument = {
            "schema_version": SCHEMA_VERSION,
            "run": {
                "name": name,
                "status": "running",
                "error": None,
                "started_at": started.isoformat(),
                "finished_at": None,
                "wall_seconds_total": None,
                "resumes": [],
            },
            "config": config.to_dict(),
            "versions": package_versions(),
            "model": {},
            "teacher": None,
            "rounds": [],
            "artifacts": {},
        }

    def _resume(self, config: RunConfig, path: Path, completed_round: int) -> None:
        """Keep rounds 0..completed_round; a later, unfinished round is started again."""
        self._set_paths(path)
        self.data = load(path)  # an older layout is upgraded: the file is rewritten in this one
        old, new = with_current_names(self.data["config"]), config.to_dict()
        for key in sorted(set(old) | set(new)):
            before = old.get(key, ADDED_KEY_DEFAULTS.get(key))
            if key not in RESUMABLE_CHANGES and before != new.get(key):
                raise ConfigError(
                    f"run-config key '{key}' = {new.get(key)!r}: the run being resumed used {before!r}"
                )
        if config.num_server_rounds < completed_round:
            raise ConfigError(
                f"run-config key 'num-server-rounds' = {config.num_server_rounds}: "
                f"the run being resumed already completed {completed_round} rounds"
            )
        run, rounds = self.data["run"], self.data["rounds"]
        kept = [entry for entry in rounds if entry["round"] <= completed_round]
        self._elapsed_before = sum(entry["wall_seconds"] or 0.0 for entry in kept)
        last = kept[-1]["communication"]
        for direction in ("down", "up"):
            self._cumulative[f"{direction}_bytes"] = last[f"cumulative_{direction}_bytes"]
        run.setdefault("resumes", []).append(
            {
                "at": datetime.now(timezone.utc).isoformat(),
                "after_round": completed_round,
                "previous_status": run["status"],
                "previous_error": run["error"],
                "discarded_unfinished_rounds": [e["round"] for e in rounds if e["round"] > completed_round],
            }
        )
        run.update(status="running", error=None, finished_at=None, wall_seconds_total=None)
        self.data["rounds"] = kept
        self.data["config"] = new

    def _set_paths(self, path: Path) -> None:
        self.path = path
        self.name = path.stem
        self.run_dir = run_dir_of(path)

    # --- per-round bookkeeping -------------------------------------------------------
    def round(self, server_round: int) -> Round:
        """The entry of `server_round`, created on first use."""
        for entry in self.data["rounds"]:
            if entry["round"] == server_round:
                return entry
        entry: Round = {
            "round": server_round,
            "wall_seconds": None,
            "server": {},
            "clients": {},
            "communication": {
                "down_bytes": 0,
                "up_bytes": 0,
                "down_bytes_train": 0,
                "down_bytes_evaluate": 0,
                "down_bytes_teacher": 0,
                "params_per_message": {},
                "per_node": {},
            },
            "failures": [],
        }
        self.data["rounds"].append(entry)
        return entry

    def start_round(self, server_round: int) -> None:
        self._round_started[server_round] = time.perf_counter()

    def add_bytes(self, server_round: int, node_id: int, direction: str, stage: str, num_bytes: int) -> None:
        """Count one array payload; `direction` is `down` (to a client) or `up`."""
        comm = self.round(server_round)["communication"]
        comm[f"{direction}_bytes"] += num_bytes
        if direction == "down":
            comm[f"down_bytes_{stage}"] += num_bytes
        node = comm["per_node"].setdefault(str(node_id), {"down_bytes": 0, "up_bytes": 0})
        node[f"{direction}_bytes"] += num_bytes

    def set_params_per_message(self, server_round: int, stage: str, num_params: int) -> None:
        self.round(server_round)["communication"]["params_per_message"][stage] = num_params

    def add_failure(self, server_round: int, stage: str, node_id: int, reason: str) -> None:
        self.round(server_round)["failures"].append({"stage": stage, "node_id": node_id, "reason": reason})

    def set_placement(self, server_round: int, stage: str, node_id: int, placement: Placement) -> None:
        """Where node `node_id` computed this round's `stage` (`devices.placement`)."""
        self.round(server_round).setdefault("placement", {}).setdefault(str(node_id), {})[stage] = placement

    def set_sampled_partitions(self, server_round: int, stage: str, partitions: list[int]) -> None:
        """Which partitions `stage` sampled (partial participation; -1: a node of unknown partition)."""
        self.round(server_round).setdefault("sampled_partitions", {})[stage] = partitions

    def set_aggregated_updates(self, server_round: int, count: int) -> None:
        """How many client updates went into the round's aggregate (0: the global model stayed)."""
        self.round(server_round)["aggregated_updates"] = count

    def rounds_without_update(self, after_round: int = 0) -> list[int]:
        """Rounds after `after_round` whose aggregate took no client update (all failed or were dropped)."""
        return [
            entry["round"]
            for entry in self.data["rounds"]
            if entry["round"] > after_round and entry.get("aggregated_updates", 0) == 0
        ]

    def failure_summary(self, after_round: int = 0, examples: int = 2) -> str:
        """`N failure(s) recorded`, with the first distinct reasons, for logs and errors."""
        failures = [
            f"round {entry['round']} {f['stage']} node {f['node_id']}: {f['reason']}"
            for entry in self.data["rounds"]
            if entry["round"] > after_round
            for f in entry["failures"]
        ]
        shown = "; ".join(" ".join(f.split())[:300] for f in failures[:examples])
        return f"{len(failures)} failure(s) recorded" + (f", e.g. {shown}" if shown else "")

    def set_distillation(self, server_round: int, distillation: Distillation) -> None:
        self.round(server_round)["distillation"] = distillation

    def set_epsilon(self, server_round: int, epsilon: float) -> None:
        """The run's ε after this round under DP (at `dp-delta`; it grows with each noised aggregate)."""
        self.round(server_round)["epsilon"] = epsilon

    def tracking_record(self) -> TrackingInfo:
        """`run.tracking`, which the run's tracker fills in. A resumed run is tracked afresh; where the
        run was tracked before stays in its `resumes` entry."""
        run = self.data["run"]
        if run.get("tracking") and run["resumes"]:
            run["resumes"][-1]["tracking"] = run["tracking"]
        run["tracking"] = {}
        return run["tracking"]

    def stop_early(self, reason: str) -> None:
        """The run ends before `num-server-rounds`, for `reason` (e.g. its privacy budget)."""
        self.data["run"]["stop_reason"] = reason
        self.write()

    def set_aggregation(self, server_round: int, report: Aggregation) -> None:
        """How the round's updates were combined (svd: rank and truncation error)."""
        self.round(server_round)["aggregation"] = report

    def set_client_metrics(self, server_round: int, stage: str, metrics: TrainMetrics | EvalMetrics) -> None:
        self.round(server_round)["clients"][stage] = metrics

    def finish_round(self, server_round: int, server_metrics: dict[str, EvalMetrics]) -> None:
        """Close a round with the server-side metrics (last step of a round), log, write."""
        entry = self.round(server_round)
        entry["server"] = server_metrics
        started = self._round_started.get(server_round, self._t0)  # round 0: since start-up
        entry["wall_seconds"] = time.perf_counter() - started
        comm = entry["communication"]
        for direction in ("down", "up"):
            self._cumulative[f"{direction}_bytes"] += comm[f"{direction}_bytes"]
            comm[f"cumulative_{direction}_bytes"] = self._cumulative[f"{direction}_bytes"]
        log(INFO, "%s", self.summary_line(entry))
        for listener in self.round_listeners:
            listener(entry)
        self.write()

    def summary_line(self, entry: Round) -> str:
        parts = [f"[round {entry['round']}/{self.num_rounds}]"]
        for role, metrics in entry["server"].items():
            mcc = f" mcc {metrics['mcc']:.4f}" if self.data["config"]["task"] == "cola" else ""
            parts.append(f"{role} acc {metrics['accuracy']:.4f} loss {metrics['loss']:.4f}{mcc}")
        comm = entry["communication"]
        parts.append(f"up {comm['up_bytes'] / MB:.2f} MB down {comm['down_bytes'] / MB:.2f} MB")
        if "epsilon" in entry:
            parts.append(f"ε {entry['epsilon']:.3f} (δ {self.data['config']['dp-delta']:g})")
        if devices := placement_summary(entry):
            parts.append(f"clients on {devices}")
        if entry["failures"]:
            parts.append(f"{len(entry['failures'])} failure(s)")
        parts.append(f"{entry['wall_seconds']:.1f} s")
        return " | ".join(parts)

    # --- run-level ---------------------------------------------------------------------
    def set_model_info(self, **info: Any) -> None:
        self.data["model"].update(info)
        self.write()

    def set_teacher_info(self, info: TeacherInfo) -> None:
        """What the teacher was pre-trained on, and its dev metrics then."""
        self.data["teacher"] = info
        self.write()

    def finish(self, artifacts: dict[str, str]) -> None:
        self.data["artifacts"].update(artifacts)
        self._close("completed", None)

    def health(self) -> Health:
        """For `run.health` and the last log line: rounds that aggregated nothing, failures recorded."""
        rounds = [entry for entry in self.data["rounds"] if entry["round"] > 0]
        return {
            "rounds": len(rounds),
            "rounds_without_update": self.rounds_without_update(),
            "failures": sum(len(entry["failures"]) for entry in rounds),
        }

    def fail(self, error: BaseException) -> None:
        """Keep every completed round and say why the run stopped."""
        self._close("failed", f"{type(error).__name__}: {error}")

    def _close(self, status: str, error: str | None) -> None:
        run = self.data["run"]
        run.update(status=status, error=error, finished_at=datetime.now(timezone.utc).isoformat())
        run["health"] = self.health()
        run["wall_seconds_total"] = self._elapsed_before + time.perf_counter() - self._t0
        self.write()

    def write(self) -> None:
        """Replace the file atomically: readers never see half a JSON document."""
        atomic_file(self.path, lambda tmp: tmp.write_text(json.dumps(self.data, indent=2, allow_nan=True)))

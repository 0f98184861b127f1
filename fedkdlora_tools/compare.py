"""`fedkdlora-compare`: the schemes on the same data, seed, clients and rounds, then a report.

Each run is a real Flower simulation through `fedkdlora-run`; sweeps over LoRA ranks,
public-data shares and LoRA variants (aggregation, FFA-LoRA, wire dtype) are options of
this one command. `--quick` caps the data so that all
three schemes finish in minutes on a laptop CPU; `--medium` keeps the whole public slice
and caps the clients: one FedKDLoRA CoLA run (r 8) took 9 min 39 s on 2 idle CPU cores
(docs/benchmarks.md);
without either the settings are those of the original study (full data, 4 clients,
10 rounds, r = 8/16/32) and are meant for a GPU. `--seeds` repeats every run per seed,
`--centralized` adds the single-node ceiling and `--target` the rounds and bytes to reach
a score (see `report.py`).
"""

from __future__ import annotations

import argparse
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flwr.common.config import parse_config_args

from fedkdlora_app.config import (
    KD_LOSSES,
    SCHEMES,
    SERVER_STUDENT_SIGNALS,
    TASKS,
    ConfigError,
    with_current_names,
)
from fedkdlora_app.results import ADDED_KEY_DEFAULTS
from fedkdlora_app.results_format import load
from fedkdlora_app.tracking import KEYS as TRACKING_KEYS
from fedkdlora_tools import launcher
from fedkdlora_tools.processes import exit_on_sigterm
from fedkdlora_tools.report import RunResult, is_centralized, write_report

QUICK_CAPS = {
    "max-train-examples-per-client": 300,
    "max-eval-examples": 400,
    "max-public-examples": 500,
    "teacher-pretrain-epochs": 3,
}
# The whole public slice (CoLA: 1,710 examples, the teacher's cost), capped clients and dev;
# with 6 rounds one FedKDLoRA CoLA run took 9 min 39 s on 2 idle CPU cores (docs/benchmarks.md).
MEDIUM_CAPS = {
    "max-train-examples-per-client": 500,
    "max-eval-examples": 500,
    "max-public-examples": 0,
    "teacher-pretrain-epochs": 3,
}
QUICK_ROUNDS, MEDIUM_ROUNDS, FULL_ROUNDS = 5, 6, 10
QUICK_RANKS, FULL_RANKS = [8], [8, 16, 32]
LOCAL_GLUE = Path("../shared/data/glue")
# Variants of the LoRA schemes (run-config overrides); `svd-hetero` gives half the clients rank r/2.
LORA_VARIANTS = {
    "naive": {},
    "svd": {"lora-aggregation": "svd"},
    "svd-hetero": {"lora-aggregation": "svd"},
    "freeze-a": {"lora-freeze-a": True},
    "alternating": {"lora-aggregation": "alternating"},
    "exact": {"lora-aggregation": "exact"},
    "fp16": {"wire-dtype": "float16"},
    "bf16": {"wire-dtype": "bfloat16"},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedkdlora-compare", description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, required=True)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="capped data: minutes on 2 CPU cores")
    size.add_argument(
        "--medium",
        action="store_true",
        help="whole public slice, 500 examples per client, 500 dev, 6 rounds (one FedKDLoRA CoLA run: "
        "about 10 min on 2 CPU cores)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help=f"default {QUICK_ROUNDS} quick, {MEDIUM_ROUNDS} medium, {FULL_ROUNDS} full",
    )
    parser.add_argument("--clients", type=int, default=4, help="simulated SuperNodes (default 4)")
    parser.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    parser.add_argument(
        "--lora-r", nargs="+", type=int, help="LoRA ranks to sweep (default 8 quick, 8 16 32 full)"
    )
    parser.add_argument(
        "--lora-variants",
        nargs="+",
        choices=list(LORA_VARIANTS),
        default=["naive"],
        help="LoRA variants to compare for the LoRA schemes (default naive)",
    )
    parser.add_argument(
        "--signals",
        nargs="+",
        choices=SERVER_STUDENT_SIGNALS,
        default=["labels+teacher"],
        help="FedKDLoRA: what trains the student in the server step, one run each; 'labels' and 'teacher' "
        "are the controls for the public labels and the teacher (default labels+teacher)",
    )
    parser.add_argument(
        "--kd-losses",
        nargs="+",
        choices=KD_LOSSES,
        default=["kl"],
        help="FedKDLoRA labels+teacher: mutual-distillation losses, one run each (default kl)",
    )
    parser.add_argument(
        "--teacher-data-pct",
        nargs="+",
        type=float,
        default=[20.0],
        help="public-slice shares to sweep, e.g. 20 30 40 50",
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, help="run every configuration once per seed (default: the app's seed)"
    )
    parser.add_argument(
        "--centralized",
        action="store_true",
        help="add, per LoRA setting, the two ceilings: the student on one SuperNode holding the whole client "
        "pool, and holding the pool plus the labelled public slice",
    )
    parser.add_argument(
        "--target", type=float, help="score to reach (accuracy; MCC for CoLA): rounds and MB to it"
    )
    parser.add_argument("--data-dir", help=f"GLUE folder (default {LOCAL_GLUE} when present, else the hub)")
    parser.add_argument(
        "--run-config", default="", help="extra run-config overrides for every run ('k=v ...')"
    )
    parser.add_argument(
        "--federation-config",
        default="",
        help="extra simulation settings, e.g. 'client-resources-num-gpus=0.25'",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="output folder (default results/compare-<task>-<UTC time>); runs already completed there "
        "with the same settings are kept, not run again",
    )
    parser.add_argument("--app", default=".", help="app directory (default .)")
    return parser.parse_args(argv)


def size_caps(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        return QUICK_CAPS
    return MEDIUM_CAPS if args.medium else {}


def planned_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run-config overrides of every run: schemes x ranks x public shares x LoRA variants x seeds.

    FedAvg has no rank and no LoRA variant: it runs once per public share. FedKDLoRA runs
    once per `--signals` entry, and its labels+teacher once per `--kd-losses` entry. With
    `--centralized`, each LoRA setting also gets its two ceilings (see `centralized`).
    """
    ranks = args.lora_r or (QUICK_RANKS if args.quick else FULL_RANKS)
    runs = []
    for pct in args.teacher_data_pct:
        lora_settings = []
        for scheme in args.schemes:
            lora = scheme != "fedavg"
            for rank in ranks if lora else ranks[:1]:
                for variant in args.lora_variants if lora else ["naive"]:
                    run = {"scheme": scheme, "lora-r": rank, "teacher-data-pct": pct}
                    run |= LORA_VARIANTS[variant] if lora else {}
                    if variant == "svd-hetero":
                        run["lora-r-by-partition"] = f"{max(1, rank // 2)},{rank}"
                    runs += server_step_variants(args, run) if scheme == "fedkdlora" else [run]
                    if lora and (rank, variant) not in lora_settings:
                        lora_settings.append((rank, variant))
        if args.centralized:
            runs += [
                centralized(args, pct, rank, variant, with_public)
                for rank, variant in lora_settings
                for with_public in (False, True)
            ]
    if args.seeds:
        runs = [run | {"seed": seed} for seed in args.seeds for run in runs]
    return runs


def server_step_variants(args: argparse.Namespace, run: dict[str, Any]) -> list[dict[str, Any]]:
    """A FedKDLoRA run once per `--signals` entry; labels+teacher once per `--kd-losses` entry."""
    variants = []
    for student_signal in args.signals:
        losses = args.kd_losses if student_signal == "labels+teacher" else ["kl"]
        variants += [run | {"server-student-signal": student_signal, "kd-loss": loss} for loss in losses]
    return variants


def centralized(
    args: argparse.Namespace, pct: float, rank: int, variant: str, with_public: bool = False
) -> dict[str, Any]:
    """A ceiling of a LoRA setting: FedLoRA's student on ONE SuperNode holding the whole client pool.

    Same student, rank, rates, local epochs, rounds, public share and evaluation; with one
    partition the node's partition is the whole pool. Under a per-client cap the node may
    hold clients x cap examples: the first of the pool, not the union of each client's
    first (same count and pool). `with_public`: the node also holds the labelled public
    slice, every label FedKDLoRA's server step trains its student on; the ceiling for a
    scheme that sees those labels. With one node there is nothing to give a second rank,
    so `svd-hetero` runs plain svd.
    """
    cap = per_client_cap(args)
    run = {"scheme": "fedlora", "lora-r": rank, "teacher-data-pct": pct} | LORA_VARIANTS[variant]
    return run | {
        "min-available-nodes": 1,
        "max-train-examples-per-client": cap * args.clients if cap > 0 else 0,
        "centralized-public": with_public,
    }


def per_client_cap(args: argparse.Namespace) -> int:
    """`max-train-examples-per-client` as every federated run gets it (--run-config wins)."""
    extra = parse_config_args([args.run_config]) if args.run_config else {}
    return int(
        extra.get("max-train-examples-per-client", size_caps(args).get("max-train-examples-per-client", 0))
    )


def common_overrides(args: argparse.Namespace, results_dir: Path, out_name: str = "") -> dict[str, Any]:
    data_dir = (
        args.data_dir if args.data_dir is not None else (str(LOCAL_GLUE) if LOCAL_GLUE.is_dir() else "")
    )
    values = {
        "task": args.task,
        "num-server-rounds": args.rounds
        or (QUICK_ROUNDS if args.quick else MEDIUM_ROUNDS if args.medium else FULL_ROUNDS),
        "data-dir": data_dir,
        "results-dir": str(results_dir),
        "min-available-nodes": args.clients,
        "tracking-experiment": out_name,  # one tracked experiment per comparison (with `tracking` on)
    }
    return values | size_caps(args)


def completed_run(runs_dir: Path, settings: dict[str, Any]) -> Path | None:
    """A completed results JSON in `runs_dir` whose config has every one of `settings`."""
    for path in sorted(runs_dir.glob("*.json")):
        try:
            data = load(path)
        except (OSError, ValueError):
            continue
        config = with_current_names(data.get("config", {}))
        if data.get("run", {}).get("status") == "completed" and all(
            config.get(key, ADDED_KEY_DEFAULTS.get(key)) == value for key, value in settings.items()
        ):
            return path
    return None


CENTRALIZED_KEYS = ("min-available-nodes", "max-train-examples-per-client", "centralized-public")


def run_settings(common: dict[str, Any], run: dict[str, Any], extra: str) -> dict[str, Any]:
    """A run's overrides in the order `main` applies them (a centralized run's keys win); paths and
    tracking left out (they say where a run writes, not what it computes)."""
    values = common | run | with_current_names(parse_config_args([extra]) if extra else {})
    if is_centralized(run):
        values |= {key: run[key] for key in CENTRALIZED_KEYS}
    return {k: v for k, v in values.items() if k not in launcher.PATH_KEYS and k not in TRACKING_KEYS}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)  # stop the running simulation's SuperLink too
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or Path("results") / f"compare-{args.task}-{stamp}"
    runs_dir = out / "runs"
    common = common_overrides(args, runs_dir, out.name)
    plan = planned_runs(args)
    failed = []
    for index, run in enumerate(plan, start=1):
        print(f"fedkdlora-compare: run {index}/{len(plan)}: {launcher.format_overrides(run)}", flush=True)
        if done := completed_run(runs_dir, run_settings(common, run, args.run_config)):
            print(f"fedkdlora-compare: already completed in {done}, kept", flush=True)
            continue
        overrides = [launcher.format_overrides(common | run)] + ([args.run_config] if args.run_config else [])
        nodes = args.clients
        if is_centralized(run):  # its node count and cap win over --run-config
            nodes = 1
            overrides.append(launcher.format_overrides({k: run[k] for k in CENTRALIZED_KEYS}))
        federation = f"num-supernodes={nodes} {args.federation_config}".strip()
        try:
            launcher.simulate(Path(args.app).resolve(), overrides, [federation])
        except ConfigError as error:  # bad settings: every other run would fail the same way
            print(f"fedkdlora-compare: {error}", file=sys.stderr)
            return 2
        except launcher.RunFailed as error:
            print(f"fedkdlora-compare: {error}", file=sys.stderr)
            failed.append(run)
    results = [RunResult.load(path) for path in sorted(runs_dir.glob("*.json"))]
    completed = [r for r in results if r.data["run"]["status"] == "completed"]
    if completed:
        for path in write_report(completed, out, args.target):
            print(path)
        print((out / "comparison.md").read_text() if (out / "comparison.md").is_file() else "")
    if failed:
        print(f"fedkdlora-compare: {len(failed)} run(s) failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

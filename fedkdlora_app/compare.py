"""`fedkdlora-compare`: the schemes on the same data, seed, clients and rounds, then a report.

Each run is a real Flower simulation through `fedkdlora-run`; sweeps over LoRA ranks,
public-data shares and LoRA variants (aggregation, FFA-LoRA, wire dtype) are options of
this one command. `--quick` caps the data so that all
three schemes finish in minutes on a laptop CPU; without it the settings are those of the
original study (full data, 4 clients, 10 rounds, r = 8/16/32) and are meant for a GPU.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedkdlora_app import launcher
from fedkdlora_app.config import SCHEMES, TASKS
from fedkdlora_app.report import RunResult, write_report

QUICK_CAPS = {
    "max-train-examples-per-client": 300,
    "max-eval-examples": 400,
    "max-public-examples": 500,
    "teacher-pretrain-epochs": 3,
}
QUICK_ROUNDS, FULL_ROUNDS = 5, 10
QUICK_RANKS, FULL_RANKS = [8], [8, 16, 32]
LOCAL_GLUE = Path("../shared/data/glue")
# Variants of the LoRA schemes (run-config overrides); `svd-hetero` gives half the clients rank r/2.
LORA_VARIANTS = {
    "naive": {},
    "svd": {"lora-aggregation": "svd"},
    "svd-hetero": {"lora-aggregation": "svd"},
    "freeze-a": {"lora-freeze-a": True},
    "fp16": {"wire-dtype": "float16"},
    "bf16": {"wire-dtype": "bfloat16"},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedkdlora-compare", description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--quick", action="store_true", help="capped data: minutes on 2 CPU cores")
    parser.add_argument("--rounds", type=int, help=f"default {QUICK_ROUNDS} quick, {FULL_ROUNDS} full")
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
        "--teacher-data-pct",
        nargs="+",
        type=float,
        default=[20.0],
        help="public-slice shares to sweep, e.g. 20 30 40 50",
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
    parser.add_argument("--out", type=Path, help="output folder (default results/compare-<task>-<UTC time>)")
    parser.add_argument("--app", default=".", help="app directory (default .)")
    return parser.parse_args(argv)


def planned_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run-config overrides of every run: schemes x ranks x public shares x LoRA variants.

    FedAvg has no rank and no LoRA variant: it runs once per public share.
    """
    ranks = args.lora_r or (QUICK_RANKS if args.quick else FULL_RANKS)
    runs = []
    for pct in args.teacher_data_pct:
        for scheme in args.schemes:
            lora = scheme != "fedavg"
            for rank in ranks if lora else ranks[:1]:
                for variant in args.lora_variants if lora else ["naive"]:
                    run = {"scheme": scheme, "lora-r": rank, "teacher-data-pct": pct}
                    run |= LORA_VARIANTS[variant] if lora else {}
                    if variant == "svd-hetero":
                        run["lora-r-by-partition"] = f"{max(1, rank // 2)},{rank}"
                    runs.append(run)
    return runs


def common_overrides(args: argparse.Namespace, results_dir: Path) -> dict[str, Any]:
    data_dir = (
        args.data_dir if args.data_dir is not None else (str(LOCAL_GLUE) if LOCAL_GLUE.is_dir() else "")
    )
    values = {
        "task": args.task,
        "num-server-rounds": args.rounds or (QUICK_ROUNDS if args.quick else FULL_ROUNDS),
        "data-dir": data_dir,
        "results-dir": str(results_dir),
        "min-available-nodes": args.clients,
    }
    return values | (QUICK_CAPS if args.quick else {})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or Path("results") / f"compare-{args.task}-{stamp}"
    runs_dir = out / "runs"
    common = common_overrides(args, runs_dir)
    plan = planned_runs(args)
    federation = f"num-supernodes={args.clients} {args.federation_config}".strip()
    failed = []
    for index, run in enumerate(plan, start=1):
        print(f"fedkdlora-compare: run {index}/{len(plan)}: {launcher.format_overrides(run)}", flush=True)
        overrides = [launcher.format_overrides(common | run)] + ([args.run_config] if args.run_config else [])
        argv_run = [args.app, "--federation-config", federation]
        for override in overrides:
            argv_run += ["--run-config", override]
        code = launcher.main(argv_run)
        if code == 2:  # bad settings: every other run would fail the same way
            return 2
        if code != 0:
            failed.append(run)
    results = [RunResult.load(path) for path in sorted(runs_dir.glob("*.json"))]
    completed = [r for r in results if r.data["run"]["status"] == "completed"]
    if completed:
        for path in write_report(completed, out):
            print(path)
        print((out / "comparison.md").read_text() if (out / "comparison.md").is_file() else "")
    if failed:
        print(f"fedkdlora-compare: {len(failed)} run(s) failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

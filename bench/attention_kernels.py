"""Eager vs SDPA attention for the server's phases that need no attention maps (issue 14).

The mutual phase needs eager attention (SDPA returns no maps); the teacher-alone phase,
evaluation and teacher pre-training do not. This times the project's `train_epochs` and
`evaluate` on the real public slice with the embedded 6-layer MiniLM teacher, the two
kernels interleaved (A B A B ...) so that a machine's drift hits both alike:

    python bench/attention_kernels.py --examples 256 --repeats 3 --out attention.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpu_check import run_config  # noqa: E402  (bench/ is the script's folder: sys.path[0])

from fedkdlora_app.data import eval_split, loader_for, public_slice  # noqa: E402
from fedkdlora_app.models import load_classifier  # noqa: E402
from fedkdlora_app.training import evaluate, train_epochs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    config = replace(
        run_config(),
        task="sst2",
        data_dir=args.data_dir,
        max_public_examples=args.examples,
        max_eval_examples=args.examples,
    )
    device = torch.device("cpu")
    train_loader = loader_for(public_slice(config), config, shuffle_seed=config.seed)
    eval_loader = loader_for(eval_split(config), config)
    times: dict[str, dict[str, list[float]]] = {k: {"train": [], "evaluate": []} for k in ("eager", "sdpa")}
    for _ in range(args.repeats):
        for kernel in ("eager", "sdpa"):
            torch.manual_seed(0)
            model = load_classifier("", 2, attn_implementation=kernel)
            started = time.perf_counter()
            train_epochs(model, train_loader, config.distill_lr, 1, device, linear_decay=True)
            times[kernel]["train"].append(time.perf_counter() - started)
            started = time.perf_counter()
            evaluate(model, eval_loader, device)
            times[kernel]["evaluate"].append(time.perf_counter() - started)
            print(kernel, {k: round(v[-1], 2) for k, v in times[kernel].items()}, flush=True)
    report = {
        "machine": f"torch threads {torch.get_num_threads()}",
        "examples": args.examples,
        "median_seconds": {k: {p: statistics.median(v) for p, v in d.items()} for k, d in times.items()},
        "all_seconds": times,
    }
    for phase in ("train", "evaluate"):
        eager, sdpa = (report["median_seconds"][k][phase] for k in ("eager", "sdpa"))
        report[f"{phase}_sdpa_speedup"] = eager / sdpa
    print(json.dumps({k: v for k, v in report.items() if k != "all_seconds"}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

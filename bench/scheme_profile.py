"""Per-scheme training throughput and the server distillation's share of a round.

Reads results JSON files (e.g. a `fedkdlora-compare` folder's `runs/`) and prints, per run:
client training throughput over rounds 2..R (examples trained divided by the clients'
summed training seconds: examples per second of client training), mean round seconds,
and for FedKDLoRA the server distillation's seconds and share of the round.

    python bench/scheme_profile.py results/compare-sst2-*/runs
"""

from __future__ import annotations

import sys
from pathlib import Path
from statistics import mean

from fedkdlora_app.results_format import load


def profile(path: Path) -> dict:
    data = load(path)
    # round 0 is set-up, round 1 includes model loading in every worker; skip rounds with no update
    rounds = [r for r in data["rounds"][2:] if "train" in r["clients"]]
    train = [r["clients"]["train"] for r in rounds]
    row = {
        "run": data["run"]["name"],
        "client examples/s": mean(t["num_examples"] / t["train_seconds_sum"] for t in train),
        "round s": mean(r["wall_seconds"] for r in rounds),
    }
    if data["config"]["scheme"] == "fedkdlora":
        rounds = [r for r in rounds if "distillation" in r]
        distill = [r["distillation"]["seconds"] for r in rounds]
        row["distillation s"] = mean(distill)
        row["distillation share"] = mean(d / r["wall_seconds"] for d, r in zip(distill, rounds, strict=True))
    return row


def main(paths: list[str]) -> None:
    files = [f for p in map(Path, paths) for f in (sorted(p.glob("*.json")) if p.is_dir() else [p])]
    for row in map(profile, files):
        print("  ".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in row.items()))


if __name__ == "__main__":
    main(sys.argv[1:])

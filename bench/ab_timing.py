"""Interleaved A/B timing for the bench scripts: one variant after the other, repeatedly.

Running A B A B ... instead of A A A B B B makes a machine's drift (thermal, caches,
another process) hit every variant alike; the report keeps every value, not only medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]

# variant name -> a function that runs the variant's passes once: {pass: seconds}
Variants = dict[str, Callable[[], dict[str, float]]]


def arguments(doc: str, examples: int) -> argparse.ArgumentParser:
    """The options every A/B script takes: public examples, repeats, data folder, output file."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--examples", type=int, default=examples, help="public examples, 0 = all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue"))
    parser.add_argument("--out", type=Path)
    return parser


def interleaved(variants: Variants, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Seconds of every pass of every variant, `repeats` rounds of A B ..., printed as they come."""
    times: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            for phase, seconds in run().items():
                times[name].setdefault(phase, []).append(seconds)
            print(name, {p: round(v[-1], 2) for p, v in times[name].items()}, flush=True)
    return times


def report(times: dict[str, dict[str, list[float]]], baseline: str, candidate: str, **about: Any) -> dict:
    """Medians per pass, baseline / candidate per pass (> 1: the candidate is faster), all values."""
    medians = {k: {p: statistics.median(v) for p, v in d.items()} for k, d in times.items()}
    return {
        "machine": f"torch threads {torch.get_num_threads()}",
        **about,
        "median_seconds": medians,
        f"{candidate}_speedup": {p: medians[baseline][p] / medians[candidate][p] for p in medians[baseline]},
        "all_seconds": times,
    }


def publish(result: dict, out: Path | None) -> None:
    """Print the summary (all but the raw values); write everything to `out` if given."""
    print(json.dumps({k: v for k, v in result.items() if k != "all_seconds"}, indent=2))
    if out:
        out.write_text(json.dumps(result, indent=2))

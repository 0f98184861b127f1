"""Server cost of LoRA aggregation: naive vs svd, per wire dtype, on the real student's LoRA state.

Aggregates N clients' updates (the real 3-layer MiniLM student's adapter + head, with B
perturbed so the products are non-zero) through `UpdateAggregator`, as `aggregate_train`
does, and prints the median seconds per round and the bytes of one update.

    python bench/lora_aggregation.py --clients 4 16 --ranks 8 32 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from flwr.app import MetricRecord, RecordDict

from fedkdlora_app.aggregation import UpdateAggregator
from fedkdlora_app.bookkeeping import payload_bytes
from fedkdlora_app.config import RunConfig, app_defaults
from fedkdlora_app.models import build_student, shipped_state
from fedkdlora_app.protocol import NUM_EXAMPLES_KEY
from fedkdlora_app.wire import to_wire

REPO = Path(__file__).resolve().parents[1]


def client_states(rank: int, clients: int) -> list[dict[str, torch.Tensor]]:
    config = RunConfig.from_mapping(app_defaults(REPO) | {"scheme": "fedlora", "lora-r": rank})
    base = shipped_state(build_student(config), config)
    generator = torch.Generator().manual_seed(0)
    return [
        {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
        for _ in range(clients)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("| clients | rank | method | wire | bytes per update | seconds per aggregation (median) |")
    print("|---:|---:|---|---|---:|---:|")
    for rank in args.ranks:
        for clients in args.clients:
            states = client_states(rank, clients)
            for method in ("naive", "svd"):
                for wire in ("float32", "float16"):
                    aggregator = UpdateAggregator(method, wire, 16.0, rank)
                    contents = [
                        RecordDict(
                            {"arrays": to_wire(s, wire), "metrics": MetricRecord({NUM_EXAMPLES_KEY: 100})}
                        )
                        for s in states
                    ]
                    seconds = []
                    for _ in range(args.repeats):
                        started = time.perf_counter()
                        aggregator(contents, "arrays", NUM_EXAMPLES_KEY)
                        seconds.append(time.perf_counter() - started)
                    size = payload_bytes(contents[0]["arrays"])
                    median = statistics.median(seconds)
                    print(f"| {clients} | {rank} | {method} | {wire} | {size:,} | {median:.4f} |")


if __name__ == "__main__":
    main()

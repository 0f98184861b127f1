"""Cost vs scale (issue 14): seconds per round, server step seconds and peak memory against clients and data.

Each configuration is a real `fedkdlora-run` simulation of FedKDLoRA on SST-2. Two sweeps:
the same total client data split over 4, 16 and 64 simulated clients, and 4 clients with
1, 2 and 4 times the data. While a run goes, a sampler reads every 0.5 s the resident
memory of its processes (found by their FLWR_HOME): the ServerApp's (`flwr-simulation`
holds it in 1.42) and the largest client worker's (`ray::ClientAppActor`).

    python bench/scale.py --out bench/results/scale.json                  # about 11 min on 2 cores
    python bench/scale.py --clients 4 16 --data-scales 1 --rounds 2 ...   # a subset

Per round it reports the median over rounds 2..R (round 1 also starts the workers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedkdlora_app.results_format import load  # noqa: E402
from fedkdlora_tools import launcher  # noqa: E402

ROLES = {"server": "flwr-simulation", "client": "ClientAppActor"}


class PeakMemory(threading.Thread):
    """Peak RSS per role among the processes whose FLWR_HOME is `home`."""

    def __init__(self, home: Path) -> None:
        super().__init__(daemon=True)
        self.home, self.peak = str(home), dict.fromkeys(ROLES, 0)
        self.processes: dict[str, int] = dict.fromkeys(ROLES, 0)  # most processes of a role at once
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            seen = dict.fromkeys(ROLES, 0)
            for proc in psutil.process_iter(["cmdline"]):
                with suppress(psutil.Error):
                    cmdline = " ".join(proc.info["cmdline"] or [])
                    role = next((r for r, pattern in ROLES.items() if pattern in cmdline), None)
                    if role and proc.environ().get("FLWR_HOME") == self.home:
                        seen[role] += 1
                        self.peak[role] = max(self.peak[role], proc.memory_info().rss)
            for role, count in seen.items():
                self.processes[role] = max(self.processes[role], count)


def measure(clients: int, per_client: int, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    results_dir = out_dir / f"c{clients}-e{per_client}"
    values = {
        "scheme": "fedkdlora",
        "task": "sst2",
        "data-dir": args.data_dir,
        "num-server-rounds": args.rounds,
        "max-train-examples-per-client": per_client,
        "max-eval-examples": args.eval_examples,
        "max-public-examples": args.public_examples,
        "teacher-pretrain-epochs": 1,
        "min-available-nodes": clients,
        "progress-interval": 0.0,
        # sequential: on one 2-core machine the overlapped teacher phase would compete with the
        # clients and blur both costs (--overlap measures that order)
        "server-step-overlap": args.overlap,
        "results-dir": str(results_dir),
    }
    home = Path(tempfile.mkdtemp(prefix="fedkdlora-scale-"))
    sampler = PeakMemory(home)
    sampler.start()
    started = time.perf_counter()
    code = launcher.main(
        [str(REPO), "--flwr-home", str(home), "--run-config", launcher.format_overrides(values),
         "--federation-config", f"num-supernodes={clients}"]
    )  # fmt: skip
    seconds = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    [path] = sorted(results_dir.glob("*.json"))
    rounds = load(path)["rounds"][1:]
    steady = rounds[1:] or rounds
    return {
        "clients": clients,
        "examples_per_client": per_client,
        "client_examples": clients * per_client,
        "exit_code": code,
        "run_seconds": round(seconds, 1),
        "round_seconds": [round(r["wall_seconds"], 1) for r in rounds],
        "median_round_seconds": round(statistics.median(r["wall_seconds"] for r in steady), 1),
        "median_server_step_seconds": _median(steady, "distillation", "seconds"),
        "median_teacher_alone_seconds": _median(steady, "distillation", "teacher_seconds"),
        "median_mutual_seconds": _median(steady, "distillation", "mutual_seconds"),
        "median_client_train_seconds_sum": _median(steady, "clients", "train", "train_seconds_sum"),
        "median_client_train_seconds_max": _median(steady, "clients", "train", "train_seconds_max"),
        "peak_rss_mib": {role: round(v / 2**20) for role, v in sampler.peak.items()},
        "processes": sampler.processes,
        "results": str(path),
    }


def _median(rounds: list[dict[str, Any]], *path: str) -> float:
    values = []
    for entry in rounds:
        for key in path:
            entry = entry[key]
        values.append(entry)
    return round(statistics.median(values), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", nargs="+", type=int, default=[4, 16, 64])
    parser.add_argument("--data-scales", nargs="+", type=int, default=[1, 2, 4], help="x the data, 4 clients")
    parser.add_argument("--total-examples", type=int, default=1024, help="client examples in all, at scale 1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--public-examples", type=int, default=256)
    parser.add_argument("--eval-examples", type=int, default=256)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue"))
    parser.add_argument("--overlap", action="store_true", help="server-step-overlap=true (default: false)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    plan = [(n, args.total_examples // n) for n in args.clients]
    plan += [(4, args.total_examples // 4 * k) for k in args.data_scales if k != 1 or 4 not in args.clients]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for clients, per_client in plan:
            rows.append(measure(clients, per_client, args, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
            args.out.write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

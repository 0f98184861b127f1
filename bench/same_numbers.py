"""Behaviour check for refactors: re-run kept evidence runs at the current code and compare every round.

Takes the seed-42 FedLoRA and FedKDLoRA (labels+teacher, kl) runs kept in
docs/evidence/sst2-quick/runs/, re-runs each with its recorded config through `fedkdlora-run`, and
prints whether every round's record (server and client metrics, distillation terms, bytes) is
identical, seconds, placements and per-node ids left out. Usage (a few minutes on 2 cores):

    python bench/same_numbers.py --data-dir ../shared/data/glue --out /tmp/same-numbers
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from fedkdlora_app.results_format import load

REPO = Path(__file__).resolve().parents[1]
KEPT = REPO / "docs" / "evidence" / "sst2-quick" / "runs"


def comparable(entry: dict) -> dict:
    """A round's record less what differs between two runs of one config: seconds, placement, node ids."""
    if isinstance(entry, dict):
        skipped = ("placement", "per_node")
        return {k: comparable(v) for k, v in entry.items() if "seconds" not in k and k not in skipped}
    return entry


def kept_runs() -> dict[str, tuple[Path, dict]]:
    picked = {}
    for path in sorted(KEPT.glob("*.json")):
        run = load(path)
        config = run["config"]
        if config["seed"] != 42 or config["min-available-nodes"] == 1:
            continue
        default_kd = config.get("server-student-signal") == "labels+teacher" and config.get("kd-loss") == "kl"
        if config["scheme"] == "fedlora" or (config["scheme"] == "fedkdlora" and default_kd):
            picked[config["scheme"]] = (path, run)
    return picked


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    same_everywhere = True
    for scheme, (path, before) in kept_runs().items():
        out = args.out / scheme
        config = {k: v for k, v in before["config"].items() if k not in ("results-dir", "data-dir")}
        config |= {"results-dir": str(out), "data-dir": str(args.data_dir.resolve())}
        overrides = " ".join(f"{key}={json.dumps(value)}" for key, value in config.items())
        nodes = f"num-supernodes={config['min-available-nodes']}"
        command = [sys.executable, "-m", "fedkdlora_tools.launcher", str(REPO), "--run-config", overrides]
        subprocess.run([*command, "--federation-config", nodes], cwd=REPO, check=True, capture_output=True)
        after = load(sorted(out.glob("*.json"))[-1])
        pairs = zip(before["rounds"], after["rounds"], strict=True)
        same = [comparable(a) == comparable(b) for a, b in pairs]
        same_everywhere &= all(same)
        final = after["rounds"][-1]["server"]["student"]["accuracy"]
        print(f"{scheme}: kept {path.name}; every round identical: {all(same)} {same}; final acc {final}")
    return 0 if same_everywhere else 1


if __name__ == "__main__":
    sys.exit(main())

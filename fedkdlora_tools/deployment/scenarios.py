"""Scenarios: what docs/deployment.md measures and the tests assert, one deployment each."""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.common.config import parse_config_args

from fedkdlora_tools.deployment.local import LocalDeployment
from fedkdlora_tools.deployment.partitions import config_with, export_partition
from fedkdlora_tools.processes import ManagedProcess, ProcessError, wait_until

# What the scenario report keeps of each round's server step (rounds[].distillation).
SERVER_STEP_KEYS = ("seconds", "critical_path_seconds", "teacher_seconds", "mutual_seconds", "overlapped")


def wait_for_train_messages(process: ManagedProcess, count: int, timeout: float) -> None:
    """Until `process` (a SuperNode) has received its `count`-th train message.

    Flower 1.42's SuperNode log does not name the round; with fraction-train = 1 a node
    that joined before the run gets one train message per round, so `count` is the round.
    """

    def received() -> bool:
        if not process.alive:
            raise ProcessError(f"{process.name} exited:\n{process.tail()}")
        return process.log().count("Receiving: train message") >= count

    wait_until(f"{process.name}'s train message #{count}", received, timeout)


def lose_and_restore(
    deployment: LocalDeployment,
    victim: int,
    in_round: int,
    restore_in_round: int | None,
    sig: int = signal.SIGTERM,
    timeout: float = 300,
) -> Callable[[int, Path], None]:
    """A `during` for LocalDeployment.run: stop SuperNode `victim` while it trains round
    `in_round`; if `restore_in_round`, start it again once the others train that round."""

    def during(_run_id: int, _results_dir: Path) -> None:
        process = deployment.processes[f"supernode-{victim}"]
        wait_for_train_messages(process, in_round, timeout)
        time.sleep(1.0)  # its ClientApp is starting or training now
        deployment.stop_supernode(victim, sig)
        if restore_in_round is None:
            return
        witness = deployment.processes[f"supernode-{(victim + 1) % deployment.num_supernodes}"]
        wait_for_train_messages(witness, restore_in_round, timeout)
        deployment.rejoin_supernode(victim)

    return during


def run_scenario(args: argparse.Namespace) -> dict[str, Any]:
    """Start a deployment, optionally refuse an unregistered SuperNode and lose one, run, stop."""
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="fedkdlora-deploy-"))
    run_config: dict[str, Any] = {
        "scheme": "fedlora",
        "task": "cola",
        "num-server-rounds": 2,
        "max-train-examples-per-client": 32,
        "max-eval-examples": 64,
        "batch-size": 16,
        "data-dir": str(Path(args.data_dir).resolve()),
        "results-dir": str(work_dir / "results"),
        "min-available-nodes": args.supernodes,
    }
    if args.run_config:
        run_config.update(parse_config_args(args.run_config))
    if args.lose_node_in_round:
        run_config["min-available-nodes"] = args.supernodes - 1
    report: dict[str, Any] = {"netns": args.netns, "insecure": args.insecure, "supernodes": args.supernodes}
    started = time.monotonic()
    deployment = LocalDeployment(
        work_dir,
        args.supernodes,
        insecure=args.insecure,
        netns=args.netns,
        app_dir=args.app,
        server_cpus=args.server_cpus,
        node_cpus=args.node_cpus,
    )
    if args.own_partitions:  # each SuperNode gets a folder with only its own examples
        config = config_with(run_config, args.app)
        for index in range(args.supernodes):
            out = work_dir / "node-data" / f"node-{index}"
            deployment.node_data_dirs[index] = export_partition(config, index, args.supernodes, out)
        report["own_partitions"] = {i: str(d) for i, d in deployment.node_data_dirs.items()}
    if args.private_filesystems:  # SuperNodes see neither the server's data nor its results
        results_dir = Path(run_config["results-dir"])
        results_dir.mkdir(parents=True, exist_ok=True)
        deployment.hidden_from_nodes = [Path(run_config["data-dir"]), results_dir]
        report["hidden_from_nodes"] = [str(path) for path in deployment.hidden_from_nodes]
    with deployment:
        try:
            report["superlink"] = deployment.superlink_address
            for index in range(args.supernodes):
                deployment.start_supernode(index)
            if args.unregistered_node:
                intruder = deployment.start_supernode(
                    args.supernodes,  # the spare host; its key was generated but never registered
                    partition_id=0,
                    key=deployment.node_key(args.supernodes),
                    register=False,
                    name="supernode-unregistered",
                )
                with contextlib.suppress(subprocess.TimeoutExpired):
                    intruder.popen.wait(timeout=30)
                report["unregistered_node"] = {
                    "exit_code": intruder.popen.returncode,
                    "refused": intruder.popen.returncode not in (None, 0)
                    and deployment.supernode_id(intruder) is None,
                    "log": [line for line in intruder.log().splitlines() if "SuperLink" in line][-2:],
                }
            report["node_ids"] = dict(deployment.node_ids)
            during = None
            if args.lose_node_in_round:
                victim = args.supernodes - 1
                report["lost_node"] = {"index": victim, "node_id": deployment.node_ids.get(victim)}
                sig = signal.SIGKILL if args.kill else signal.SIGTERM
                during = lose_and_restore(
                    deployment, victim, args.lose_node_in_round, args.restore_in_round, sig
                )
            outcome = deployment.run(run_config, timeout=args.timeout, during=during)
            report["run"] = outcome.summary()
            if outcome.results:
                report["nodes_per_round"] = {
                    entry["round"]: sorted(int(n) for n in entry["communication"]["per_node"])
                    for entry in outcome.results["rounds"][1:]
                }
                report["round_seconds"] = {
                    entry["round"]: round(entry["wall_seconds"], 1)
                    for entry in outcome.results["rounds"][1:]
                    if entry["wall_seconds"] is not None
                }
                report["server_step"] = {
                    entry["round"]: {k: entry["distillation"].get(k) for k in SERVER_STEP_KEYS}
                    for entry in outcome.results["rounds"][1:]
                    if entry.get("distillation")
                }
                report["student_accuracy"] = {
                    entry["round"]: entry["server"]["student"]["accuracy"]
                    for entry in outcome.results["rounds"]
                    if entry.get("server")
                }
        except BaseException:
            print(deployment.log_tails(), file=sys.stderr)
            raise
    report["seconds_total"] = round(time.monotonic() - started, 1)
    report["work_dir"] = str(work_dir)
    return report

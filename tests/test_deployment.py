"""Deployment engine end to end: real `flower-superlink` / `flower-supernode` processes.

Every process is started through the deploy/ scripts (as on real hosts), each SuperNode
holds only its own exported partition, and every wait is bounded. The lost-client test
runs its SuperLink and SuperNodes in separate network namespaces where this machine
allows it (root, `ip netns`, veth), else on loopback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import socket
from pathlib import Path
from typing import Any

import psutil
import pytest

from fedkdlora_app.data import DataError, client_eval_shard, client_train_partition
from fedkdlora_app.deployment import (
    MARKER_ENV,
    LocalDeployment,
    ManagedProcess,
    RunOutcome,
    config_with,
    export_partition,
    lose_and_restore,
    netns_available,
)
from tests.conftest import GLUE_DIR

QUICK = {
    "scheme": "fedlora",
    "task": "cola",
    "num-server-rounds": 1,
    "max-train-examples-per-client": 32,
    "max-eval-examples": 64,
    "batch-size": 16,
    "data-dir": str(GLUE_DIR),
}
NETNS = netns_available()


def marked_processes(marker: str) -> list[psutil.Process]:
    """Processes (and orphaned children) a deployment started that are still alive."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(MARKER_ENV) == marker:
                found.append(proc)
    return found


def give_own_partitions(deployment: LocalDeployment, run_config: dict[str, Any]) -> None:
    """Export each SuperNode's partition to its own folder: the only data its host sees."""
    config = config_with(run_config)
    for index in range(deployment.num_supernodes):
        out = deployment.work_dir / "node-data" / f"node-{index}"
        deployment.node_data_dirs[index] = export_partition(config, index, deployment.num_supernodes, out)


@dataclasses.dataclass
class SecureRun:
    deployment: LocalDeployment
    intruder: ManagedProcess
    outcome: RunOutcome


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory) -> SecureRun:
    """TLS + SuperNode authentication on loopback: 2 registered SuperNodes, 1 unregistered, 1 round."""
    work_dir = tmp_path_factory.mktemp("secure")
    run_config = {**QUICK, "results-dir": str(work_dir / "results"), "min-available-nodes": 2}
    deployment = LocalDeployment(work_dir, num_supernodes=2)
    give_own_partitions(deployment, run_config)
    with deployment:
        try:
            for index in range(2):
                deployment.start_supernode(index)
            # key node-2 exists (generate-certs.sh) but was never registered with the SuperLink
            intruder = deployment.start_supernode(
                2, partition_id=0, key=deployment.node_key(2), register=False, name="supernode-unregistered"
            )
            intruder.popen.wait(timeout=60)
            outcome = deployment.run(run_config, timeout=400)
        except BaseException:
            print(deployment.log_tails())
            raise
    return SecureRun(deployment, intruder, outcome)


def test_fedlora_completes_on_a_secure_deployment(secure_run: SecureRun) -> None:
    outcome, deployment = secure_run.outcome, secure_run.deployment
    assert outcome.status == "finished:completed", (outcome.details, deployment.log_tails())
    results = outcome.results
    assert results["run"]["status"] == "completed"
    assert [entry["round"] for entry in results["rounds"]] == [0, 1]
    registered = {str(deployment.node_ids[0]), str(deployment.node_ids[1])}
    last = results["rounds"][-1]
    assert last["failures"] == []
    assert set(last["communication"]["per_node"]) == registered
    assert last["clients"]["train"]["num-examples"] == 2 * 32
    assert last["clients"]["evaluate"]["num-examples"] == 64  # the two exported eval shards tile it
    assert last["communication"]["up_bytes"] == 2 * results["model"]["shipped_bytes_per_message"]
    for key in ("loss", "accuracy", "mcc"):
        assert math.isfinite(last["server"]["student"][key])
    assert results["config"]["results-dir"] == str(outcome.results_path.parent)


def test_an_unregistered_supernode_is_refused(secure_run: SecureRun) -> None:
    intruder = secure_run.intruder
    assert intruder.popen.returncode not in (None, 0)
    assert "Failed to activate SuperNode" in intruder.log()
    assert secure_run.deployment.supernode_id(intruder) is None
    # ... and the run went on with the registered ones only (checked above: per_node)
    assert secure_run.outcome.status == "finished:completed"


def test_every_process_of_the_deployment_is_gone(secure_run: SecureRun) -> None:
    deployment = secure_run.deployment
    assert marked_processes(deployment.marker) == []
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", deployment.superlink_port), 2):
        pass


def test_cleanup_on_failure_and_the_insecure_flag(tmp_path: Path) -> None:
    """An exception inside the deployment still stops SuperLink, SuperNode and their children."""
    with pytest.raises(RuntimeError, match="boom"), LocalDeployment(tmp_path, 1, insecure=True) as deployment:
        supernode = deployment.start_supernode(0)
        assert deployment.supernode_id(supernode) is not None
        assert "no TLS and no SuperNode authentication" in deployment.processes["superlink"].log()
        pids = [proc.pid for process in deployment.processes.values() for proc in process.tree()]
        assert len(pids) >= 4  # SuperLink + SuperExec, SuperNode + SuperExec
        raise RuntimeError("boom")
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert marked_processes(deployment.marker) == []
    assert not (tmp_path / "certs").exists()  # insecure: no certificates were made


def test_an_exported_partition_is_exactly_the_nodes_examples(tmp_path: Path) -> None:
    config = config_with(QUICK)
    node = dataclasses.replace(config, data_dir=str(export_partition(config, 1, 2, tmp_path / "node-1")))
    for read in (client_train_partition, client_eval_shard):
        mine, reference = read(node, 1, 2), read(config, 1, 2)
        assert mine["sentence"] == reference["sentence"] and mine["label"] == reference["label"]
    with pytest.raises(DataError, match="partition-id"):
        client_train_partition(node, 0, 2)  # another node's folder is refused, not silently used


@pytest.mark.parametrize("netns", [pytest.param(NETNS, id="netns" if NETNS else "loopback")])
def test_a_lost_supernode_does_not_stop_the_run(tmp_path: Path, netns: bool) -> None:
    """4 SuperNodes; one is stopped while it trains round 1. Round 1 completes with the 3 other
    replies and records the failure under its node id; round 2 trains on the 3 live nodes; the
    node comes back during round 2 (same node id) and is sampled again for round 2's evaluation."""
    run_config = {
        **QUICK,
        "num-server-rounds": 2,
        "results-dir": str(tmp_path / "results"),
        "min-available-nodes": 3,  # the strategy may go on with 3 of 4
    }
    victim = 3
    deployment = LocalDeployment(tmp_path, num_supernodes=4, netns=netns)
    give_own_partitions(deployment, run_config)
    with deployment:
        try:
            for index in range(4):
                deployment.start_supernode(index)
            lost_id = deployment.node_ids[victim]
            during = lose_and_restore(deployment, victim, in_round=1, restore_in_round=2, sig=signal.SIGTERM)
            outcome = deployment.run(run_config, timeout=500, during=during)
            stopped = next(p for name, p in deployment.processes.items() if name.startswith("supernode-3-"))
            back = deployment.processes["supernode-3"]
        except BaseException:
            print(deployment.log_tails())
            raise
    assert outcome.status == "finished:completed", outcome.details
    rounds = outcome.results["rounds"]
    assert outcome.results["run"]["status"] == "completed" and outcome.rounds_completed == 2
    # stopped mid-round: it had received its round-1 train message and sent no reply
    assert stopped.log().count("Receiving: train message") == 1 and "Sent successfully" not in stopped.log()
    assert [(f["stage"], f["node_id"]) for f in rounds[1]["failures"]] == [("train", lost_id)]
    assert "Node Unavailable" in rounds[1]["failures"][0]["reason"]
    assert rounds[1]["clients"]["train"]["num-examples"] == 3 * 32  # the round completed with 3 replies
    assert math.isfinite(rounds[1]["server"]["student"]["loss"])
    # round 2 trained on the live nodes only, without failures
    assert rounds[2]["failures"] == []
    assert rounds[2]["clients"]["train"]["num-examples"] == 3 * 32
    assert rounds[2]["communication"]["up_bytes"] == 3 * outcome.results["model"]["shipped_bytes_per_message"]
    # with authentication the node comes back under the same id, and is sampled again
    assert deployment.supernode_id(back) == lost_id
    assert "Receiving: evaluate message" in back.log()
    assert rounds[2]["clients"]["evaluate"]["num-examples"] == 64  # all four eval shards
    assert marked_processes(deployment.marker) == []

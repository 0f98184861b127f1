"""Deployment engine end to end: real `flower-superlink` / `flower-supernode` processes.

Every process is started through the deploy/ scripts (as on real hosts), each SuperNode
holds only its own exported partition, and every wait is bounded. Where this machine
allows it (root), each SuperNode runs in a mount namespace of its own in which the
server's data, results and teacher folders and the other nodes' folders are empty: it
sees only what its own host would hold. The lost-client and hung-client tests also run
SuperLink and SuperNodes in separate network namespaces (else loopback).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import signal
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import psutil
import pytest

from fedkdlora_app.bookkeeping import payload_bytes
from fedkdlora_app.config import NODE_CONFIG_KEYS
from fedkdlora_app.data import DataError, client_eval_shard, client_train_partition
from fedkdlora_app.models import build_student, shipped_state
from fedkdlora_app.wire import to_wire
from fedkdlora_tools.deployment.hosts import mount_namespaces_available, netns_available
from fedkdlora_tools.deployment.local import LocalDeployment, RunOutcome, results_record_an_end
from fedkdlora_tools.deployment.partitions import config_with, export_partition
from fedkdlora_tools.deployment.scenarios import lose_and_restore
from fedkdlora_tools.flower_cli import flwr_json, run_traffic, wait_for_run
from fedkdlora_tools.processes import MARKER_ENV, ManagedProcess, wait_until
from tests.helpers import GLUE_DIR, REPO, make_config, model_message_bytes
from tests.hub_fixtures import write_bert_pair

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
PRIVATE_FS = mount_namespaces_available()


# Deployments run one after another in one pytest-xdist worker: each starts a SuperLink and up
# to three SuperNodes, and two at once on 2 cores can outlast a round timeout.
pytestmark = pytest.mark.xdist_group("deployments")


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
    config = config_with(run_config, REPO)
    for index in range(deployment.num_supernodes):
        out = deployment.work_dir / "node-data" / f"node-{index}"
        deployment.node_data_dirs[index] = export_partition(config, index, deployment.num_supernodes, out)


def hide_the_servers_files(deployment: LocalDeployment, run_config: dict[str, Any]) -> None:
    """On a SuperNode's host the run-config's data and results folders do not exist."""
    if not PRIVATE_FS:
        warnings.warn(
            "mount namespaces unavailable (needs root and unshare): the SuperNodes share the server's "
            "filesystem view, so the private-filesystem checks are skipped",
            stacklevel=2,
        )
    else:
        # resolved: `mount` follows symbolic links, and so must the check (../shared may be one)
        deployment.hidden_from_nodes = [GLUE_DIR.resolve(), Path(run_config["results-dir"])]
        Path(run_config["results-dir"]).mkdir(parents=True, exist_ok=True)


@dataclasses.dataclass
class SecureRun:
    deployment: LocalDeployment
    intruder: ManagedProcess
    outcome: RunOutcome
    lacking: RunOutcome  # a second run, of a task the nodes hold no data for, after a SuperLink restart
    runs_after_restart: list[int]  # the run ids the restarted SuperLink lists
    flower_traffic: tuple[int, int]  # (inbound, outbound) bytes Flower counted for the first run
    node_views: list[bool]  # per SuperNode: was the GLUE copy hidden from it (an empty folder)?


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory) -> SecureRun:
    """TLS + SuperNode authentication on loopback: 2 registered SuperNodes, 1 unregistered, 1 round;
    then the SuperLink is restarted on its database and a second run is submitted.

    Each SuperNode has its own filesystem view: its exported partition, but neither the
    GLUE copy the run-config's `data-dir` names nor the results folder, as on separate
    hosts (where a ClientApp reading the run-config's `data-dir` would fail).
    """
    work_dir = tmp_path_factory.mktemp("secure")
    run_config = {**QUICK, "results-dir": str(work_dir / "results"), "min-available-nodes": 2}
    deployment = LocalDeployment(work_dir, num_supernodes=2, app_dir=REPO)
    give_own_partitions(deployment, run_config)
    hide_the_servers_files(deployment, run_config)
    with deployment:
        try:
            for index in range(2):
                deployment.start_supernode(index)
            # key node-2 exists (generate-certs.sh) but was never registered with the SuperLink
            intruder = deployment.start_supernode(
                2, partition_id=0, key=deployment.node_key(2), register=False, name="supernode-unregistered"
            )
            intruder.popen.wait(timeout=60)
            node_views = [sees_no_glue(deployment.processes[f"supernode-{i}"]) for i in range(2)]
            outcome = deployment.run(run_config, timeout=400)
            traffic = run_traffic(deployment.cli_env, deployment.connection, outcome.run_id)
            deployment.restart_superlink()
            listed = flwr_json(["list", deployment.connection], deployment.cli_env)["runs"]
            runs_after_restart = [int(run["run-id"]) for run in listed]
            lacking = deployment.run({**run_config, "task": "sst2"}, timeout=400)
        except BaseException:
            print(deployment.log_tails())
            raise
    return SecureRun(deployment, intruder, outcome, lacking, runs_after_restart, traffic, node_views)


def sees_no_glue(process: ManagedProcess) -> bool:
    """Whether the GLUE copy's folder is empty in the filesystem view of `process`'s SuperNode."""
    supernode = next(p for p in process.tree() if any("flower-supernode" in part for part in p.cmdline()))
    return not any(Path(f"/proc/{supernode.pid}/root{GLUE_DIR.resolve()}").iterdir())


@pytest.mark.slow
def test_nodes_on_private_filesystems_train_on_their_own_data(secure_run: SecureRun) -> None:
    """The run-config's data-dir exists only on the server; each node reads its own partition."""
    if not PRIVATE_FS:
        pytest.skip("mount namespaces unavailable here (needs root and unshare)")
    outcome, deployment = secure_run.outcome, secure_run.deployment
    assert secure_run.node_views == [True, True]  # the server's GLUE folder was empty for both nodes
    assert any(GLUE_DIR.iterdir())  # ... and is not for the server
    last = outcome.results["rounds"][-1]
    assert outcome.status == "finished:completed", (outcome.details, deployment.log_tails())
    assert last["failures"] == [] and last["aggregated_updates"] == 2
    assert outcome.results["run"]["health"] == {"rounds": 1, "rounds_without_update": [], "failures": 0}


@pytest.mark.slow
def test_a_run_no_node_can_train_fails_naming_the_missing_file(secure_run: SecureRun) -> None:
    """Every ClientApp lacks sst2 data: the run aggregated nothing, so it failed, and says why."""
    lacking, node_dirs = secure_run.lacking, secure_run.deployment.node_data_dirs
    assert lacking.status == "finished:failed", lacking.details
    error = lacking.results["run"]["error"]
    assert lacking.results["run"]["status"] == "failed"
    assert error.startswith("NothingAggregatedError: no round aggregated a client update (1 round(s)): ")
    assert f"node config 'data-dir' = '{node_dirs[0]}': no file" in error or (
        f"node config 'data-dir' = '{node_dirs[1]}': no file" in error
    )
    [entry] = lacking.results["rounds"][1:]
    node_ids = secure_run.deployment.node_ids
    assert entry["aggregated_updates"] == 0
    assert {("train", node_ids[0]), ("train", node_ids[1])} <= {
        (f["stage"], f["node_id"]) for f in entry["failures"]
    }


@pytest.mark.slow
def test_a_restarted_superlink_keeps_its_runs_and_its_nodes_come_back(secure_run: SecureRun) -> None:
    """The SuperLink's state is on disk: after a restart it lists the first run, and the second run
    reaches both registered SuperNodes under their ids (each answers it, with a failure to train)."""
    assert secure_run.outcome.run_id in secure_run.runs_after_restart
    [entry] = secure_run.lacking.results["rounds"][1:]
    answered = {f["node_id"] for f in entry["failures"] if f["stage"] == "train"}
    assert answered == {secure_run.deployment.node_ids[0], secure_run.deployment.node_ids[1]}
    assert all("Node Unavailable" not in f["reason"] for f in entry["failures"])


@pytest.mark.slow
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
    assert last["clients"]["train"]["num_examples"] == 2 * 32
    assert last["clients"]["evaluate"]["num_examples"] == 64  # the two exported eval shards tile it
    assert last["communication"]["up_bytes"] == 2 * model_message_bytes(**QUICK)  # sized apart from the run
    for key in ("loss", "accuracy", "mcc"):
        assert math.isfinite(last["server"]["student"][key])
    assert results["config"]["results-dir"] == str(outcome.results_path.parent)


@pytest.mark.slow
def test_flowers_traffic_figures_are_the_apps_bytes_less_repeated_arrays_plus_framing(
    secure_run: SecureRun,
) -> None:
    """Flower counts whole Fleet API requests and responses, and stores arrays as content-addressed
    objects: an array whose content repeats within a message (round 1's train message holds the
    all-zero LoRA B factors, six identical arrays) travels once. The app counts every array it puts
    in a message. So, for the 1-round run (2 nodes: a train and an evaluate message each way down,
    a train reply up): Flower's outbound = 2 x distinct bytes of the initial model + 2 x the trained
    model (all distinct) + framing; inbound = the app's uplink + framing."""
    inbound, outbound = secure_run.flower_traffic
    [first] = secure_run.outcome.results["rounds"][1:]
    comm = first["communication"]
    config = make_config(**QUICK)
    initial = to_wire(shipped_state(build_student(config), config), config.wire_dtype)
    distinct = {(a.data, tuple(a.shape), a.dtype): len(a.data) for a in initial.values()}
    expected_down = 2 * sum(distinct.values()) + comm["down_bytes_evaluate"]
    assert sum(distinct.values()) < payload_bytes(initial) == comm["down_bytes_train"] // 2
    print(
        f"flower inbound {inbound} outbound {outbound}; app up {comm['up_bytes']} down {comm['down_bytes']}, "
        f"distinct down {expected_down}"
    )
    assert comm["up_bytes"] < inbound < 1.1 * comm["up_bytes"] + 100_000
    assert expected_down < outbound < 1.1 * expected_down + 100_000


@pytest.mark.slow
def test_an_unregistered_supernode_is_refused(secure_run: SecureRun) -> None:
    intruder = secure_run.intruder
    assert intruder.popen.returncode not in (None, 0)
    assert "Failed to activate SuperNode" in intruder.log()
    assert secure_run.deployment.supernode_id(intruder) is None
    # ... and the run went on with the registered ones only (checked above: per_node)
    assert secure_run.outcome.status == "finished:completed"


@pytest.mark.slow
def test_every_process_of_the_deployment_is_gone(secure_run: SecureRun) -> None:
    deployment = secure_run.deployment
    assert marked_processes(deployment.marker) == []
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", deployment.superlink_port), 2):
        pass


@pytest.mark.slow
def test_cleanup_on_failure_and_the_insecure_flag(tmp_path: Path) -> None:
    """An exception inside the deployment still stops SuperLink, SuperNode and their children."""
    with (
        pytest.raises(RuntimeError, match="boom"),
        LocalDeployment(tmp_path, 1, insecure=True, app_dir=REPO) as deployment,
    ):
        supernode = deployment.start_supernode(0)
        assert deployment.supernode_id(supernode) is not None
        assert "no TLS and no SuperNode authentication" in deployment.processes["superlink"].log()
        pids = [proc.pid for process in deployment.processes.values() for proc in process.tree()]
        assert len(pids) >= 4  # SuperLink + SuperExec, SuperNode + SuperExec
        raise RuntimeError("boom")
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert marked_processes(deployment.marker) == []
    assert not (tmp_path / "certs").exists()  # insecure: no certificates were made


def test_start_supernode_passes_every_node_config_key_the_app_reads() -> None:
    script = (REPO / "deploy" / "start-supernode.sh").read_text()
    for key in NODE_CONFIG_KEYS:  # an option, and the key written into --node-config
        option = {"partition-id": "--partition-id", "num-partitions": "--num-partitions"}.get(key, f"--{key}")
        assert f"{option})" in script and f"{key}=" in script, key


def test_an_exported_partition_is_exactly_the_nodes_examples(tmp_path: Path) -> None:
    config = config_with(QUICK, REPO)
    node = dataclasses.replace(config, data_dir=str(export_partition(config, 1, 2, tmp_path / "node-1")))
    for read in (client_train_partition, client_eval_shard):
        mine, reference = read(node, 1, 2), read(config, 1, 2)
        assert mine["sentence"] == reference["sentence"] and mine["label"] == reference["label"]
    with pytest.raises(DataError, match="partition-id"):
        client_train_partition(node, 0, 2)  # another node's folder is refused, not silently used


FAKE_FLWR = """#!/bin/sh
echo call >> "$CALLS"
status=running; [ -e "$ENDED" ] && status=finished:completed
echo '{"success": true, "runs": [{"run-id": "7", "status": "'$status'", "status-details": ""}]}'
"""


def test_waiting_for_a_run_asks_flower_seldom_until_its_results_record_an_end(tmp_path: Path) -> None:
    """Each `flwr list` costs a deployment host about 1.5 s CPU: while the results file says the run
    goes on, Flower is asked every `idle_poll` s; once it records an end, at once."""
    bin_dir, results = tmp_path / "bin", tmp_path / "results"
    bin_dir.mkdir(), results.mkdir()
    (bin_dir / "flwr").write_text(FAKE_FLWR)
    (bin_dir / "flwr").chmod(0o755)
    calls, ended_flag = tmp_path / "calls", tmp_path / "ended"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CALLS": str(calls), "ENDED": str(ended_flag)}
    before = set(results.glob("*.json"))
    record = results / "run.json"
    record.write_text(json.dumps({"run": {"status": "running"}}))

    def end_after(seconds: float) -> None:
        time.sleep(seconds)
        record.write_text(json.dumps({"run": {"status": "completed"}}))
        ended_flag.touch()

    threading.Thread(target=end_after, args=(3.0,), daemon=True).start()
    started = time.monotonic()
    status, _ = wait_for_run(
        env, "conn", 7, timeout=30, poll=0.2, idle_poll=20.0,
        ended=functools.partial(results_record_an_end, results, before),
    )  # fmt: skip
    assert status == "finished:completed"
    assert 3.0 <= time.monotonic() - started < 6.0  # the end is seen within a poll, not an idle poll
    assert calls.read_text().count("call") == 2  # once at the start, once when the file recorded the end
    assert not results_record_an_end(results, {record})  # only files written since `before` count


@pytest.mark.slow
@pytest.mark.parametrize("netns", [pytest.param(NETNS, id="netns" if NETNS else "loopback")])
def test_a_hung_client_costs_one_timeout_and_a_restarted_client_keeps_its_teacher(
    tmp_path: Path, netns: bool
) -> None:
    """FedKDLoRA with client KD on 2 SuperNodes with private filesystems, 2 rounds.

    SuperNode 1 freezes (SIGSTOP of the SuperNode and its ClientApp) as it gets round 1's
    train message: the server stops waiting after `round-timeout` (shorter than the minute
    the SuperLink's heartbeat takes to declare the node gone), records the failure under
    node 1 and aggregates the other update; the node is then thawed and restarted. SuperNode 0 restarts
    while the server waits (its `context.state` is gone) and trains round 2 with the
    teacher from its own cache: the server ships it again only to node 1, which never
    replied to a train message.
    """
    timeout = 34.0
    teacher_base, _ = write_bert_pair(tmp_path / "models")  # a small 12-layer BERT: a light teacher to ship
    run_config = {
        **QUICK,
        "scheme": "fedkdlora",
        "client-kd": True,
        "num-server-rounds": 2,
        "max-public-examples": 16,
        "teacher-base-model": str(teacher_base),
        "teacher-pretrain-epochs": 0,
        "round-timeout": timeout,
        "results-dir": str(tmp_path / "results"),
        "min-available-nodes": 2,  # each stage waits for restarted nodes
    }
    hung, restarted = 1, 0
    deployment = LocalDeployment(tmp_path, num_supernodes=2, netns=netns, app_dir=REPO)
    give_own_partitions(deployment, run_config)
    hide_the_servers_files(deployment, run_config)
    if deployment.hidden_from_nodes is not None:  # the teacher too lives on the server only
        deployment.hidden_from_nodes.append(teacher_base.parent)
    problems: list[BaseException] = []

    def hang_and_restart() -> None:
        """Watch processes, not logs (a SuperNode's log can lag): no ClientApp runs before round 1's."""
        try:
            wait_until(f"SuperNode {hung}'s ClientApp", lambda: deployment.clientapps(hung), 300)
            # Frozen 4 s into its ClientApp's start-up (still importing, far from a reply): the node's
            # last heartbeat (every 21-27 s) then keeps it online on the SuperLink (for 60 s) until
            # after `round-timeout` has passed, so the timeout, not the heartbeat, ends the wait.
            started = deployment.clientapps(hung)[0].create_time()
            time.sleep(max(0.0, started + 4 - time.time()))
            frozen = deployment.processes[f"supernode-{hung}"].tree() + deployment.clientapps(hung)
            stopped = time.monotonic()
            for proc in frozen:  # the whole host freezes: no heartbeat, no relaunch of the ClientApp
                proc.suspend()
            # Restart SuperNode 0 as soon as its round-1 update is in and pulled (the server pulls every
            # 3 s; a node that leaves before is answered for with `Node Unavailable`), while the server
            # still waits for the hung node; if it is not back when that wait ends, the evaluate stage
            # waits for it (`min-available-nodes`).
            replied = f"Push replies from node_id={deployment.node_ids[restarted]}"
            superlink = deployment.processes["superlink"]
            wait_until("SuperNode 0's update", lambda: replied in superlink.log(), 300)
            time.sleep(4)
            deployment.stop_supernode(restarted)
            deployment.rejoin_supernode(restarted)
            time.sleep(max(0.0, stopped + timeout + 5 - time.monotonic()))  # the server gave up on it
            for proc in frozen:  # thawed, it signs off on SIGTERM, so it may sign on again at once
                with contextlib.suppress(psutil.Error):
                    proc.resume()
            deployment.stop_supernode(hung)
            deployment.rejoin_supernode(hung)
        except BaseException as error:  # surfaced by the test below
            problems.append(error)

    with deployment:
        try:
            for index in range(2):
                deployment.start_supernode(index)
            watcher = threading.Thread(target=hang_and_restart, daemon=True)
            watcher.start()  # before submitting: the first train messages come within seconds
            outcome = deployment.run(run_config, timeout=600)
            watcher.join(timeout=60)
            back = deployment.processes[f"supernode-{restarted}"]
        except BaseException:
            print(deployment.log_tails())
            raise
    assert problems == []
    ids = deployment.node_ids
    assert outcome.status == "finished:completed", outcome.details
    round1, round2 = outcome.results["rounds"][1:]
    # the hung node: its train message timed out, and the round completed with the other update
    # (its evaluate message, sent while it was frozen, fails with `Node Unavailable` when it restarts)
    failures = [(f["stage"], f["node_id"], f["reason"]) for f in round1["failures"]]
    assert [f for f in failures if f[0] == "train"] == [
        ("train", ids[hung], f"no reply within round-timeout = {timeout} s")
    ]
    assert {node for _, node, _ in failures} == {ids[hung]}
    assert round1["aggregated_updates"] == 1 and round1["clients"]["train"]["num_examples"] == 32
    assert timeout < round1["wall_seconds"] < timeout + 180  # one timeout, plus the round's own work
    # the restarted node: same id, trained round 2 with its cached teacher; only the hung node,
    # which never replied to a train message, is shipped the teacher again
    assert deployment.supernode_id(back) == ids[restarted]
    assert round2["failures"] == [] and round2["aggregated_updates"] == 2, (round2, deployment.log_tails())
    per_node_teacher = round1["communication"]["down_bytes_teacher"] // 2
    assert round2["communication"]["down_bytes_teacher"] == per_node_teacher
    assert marked_processes(deployment.marker) == []


@pytest.mark.slow
@pytest.mark.parametrize("netns", [pytest.param(NETNS, id="netns" if NETNS else "loopback")])
def test_a_lost_supernode_does_not_stop_the_run(tmp_path: Path, netns: bool) -> None:
    """3 SuperNodes; one is stopped while it trains round 1. Round 1 completes with the 2 other
    replies and records the failure under its node id; round 2 trains on the 2 live nodes; the
    node comes back during round 2 (same node id) and is sampled again for round 2's evaluation."""
    run_config = {
        **QUICK,
        "num-server-rounds": 2,
        "results-dir": str(tmp_path / "results"),
        "min-available-nodes": 2,  # the strategy may go on with 2 of 3
    }
    victim = 2
    deployment = LocalDeployment(tmp_path, num_supernodes=3, netns=netns, app_dir=REPO)
    give_own_partitions(deployment, run_config)
    with deployment:
        try:
            for index in range(3):
                deployment.start_supernode(index)
            lost_id = deployment.node_ids[victim]
            during = lose_and_restore(deployment, victim, in_round=1, restore_in_round=2, sig=signal.SIGTERM)
            outcome = deployment.run(run_config, timeout=500, during=during)
            stopped = next(p for name, p in deployment.processes.items() if name.startswith("supernode-2-"))
            back = deployment.processes["supernode-2"]
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
    assert rounds[1]["clients"]["train"]["num_examples"] == 2 * 32  # the round completed with 2 replies
    assert math.isfinite(rounds[1]["server"]["student"]["loss"])
    # round 2 trained on the live nodes only, without failures
    assert rounds[2]["failures"] == []
    assert rounds[2]["clients"]["train"]["num_examples"] == 2 * 32
    assert rounds[2]["communication"]["up_bytes"] == 2 * model_message_bytes(**QUICK)
    # with authentication the node comes back under the same id, and is sampled again
    assert deployment.supernode_id(back) == lost_id
    assert "Receiving: evaluate message" in back.log()
    assert rounds[2]["clients"]["evaluate"]["num_examples"] == 64  # all three eval shards
    assert marked_processes(deployment.marker) == []

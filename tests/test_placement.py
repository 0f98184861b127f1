"""Where clients compute: Ray's GPU assignment honoured, recorded per node, fractional GPUs packed right,
and a simulation attached to a Ray cluster of two nodes."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import types
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedkdlora_app.config import ConfigError
from fedkdlora_app.devices import check_precision, pick_device, ray_gpu_ids
from fedkdlora_tools.processes import MARKER_ENV, kill_marked, wait_until
from tests.helpers import REPO, simulate

# A run that is about where clients compute, not what they learn.
ONE_SMALL_ROUND = {
    "num-server-rounds": 1,
    "max-train-examples-per-client": 8,
    "max-eval-examples": 16,
    "batch-size": 8,
}


def fake_ray(gpu_ids: list[int], worker: bool = True) -> types.ModuleType:
    """What a Ray actor (a simulated ClientApp) sees of Ray: its mode and its assigned GPUs."""
    ray = types.ModuleType("ray")
    ray.WORKER_MODE, ray.SCRIPT_MODE = 1, 0
    ray.is_initialized = lambda: True
    mode = ray.WORKER_MODE if worker else ray.SCRIPT_MODE
    ray.get_runtime_context = lambda: types.SimpleNamespace(worker=types.SimpleNamespace(mode=mode))
    ray.get_gpu_ids = lambda: gpu_ids
    return ray


def test_a_client_ray_gave_no_gpu_computes_on_the_cpu_even_where_gpus_exist(monkeypatch) -> None:
    """Before: every client saw all GPUs (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0) and took GPU 0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "ray", fake_ray([]))
    assert ray_gpu_ids() == [] and pick_device() == torch.device("cpu")
    monkeypatch.setitem(sys.modules, "ray", fake_ray([2]))
    assert ray_gpu_ids() == ["2"] and pick_device() == torch.device("cuda")  # Ray's CUDA_VISIBLE_DEVICES
    monkeypatch.setitem(sys.modules, "ray", fake_ray([], worker=False))  # the simulation's ServerApp
    assert ray_gpu_ids() is None and pick_device() == torch.device("cuda")


def test_the_launcher_leaves_ray_hiding_gpus_from_clients_given_none(tmp_path: Path) -> None:
    from fedkdlora_tools.flower_cli import flower_env

    assert "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO" not in flower_env(tmp_path, local_superlink_ports=True)


def test_the_launcher_starts_its_own_ray_unless_told_to_attach(tmp_path: Path, monkeypatch) -> None:
    """Ray's `ray.init()` attaches to the last cluster `ray start` wrote down, even a dead one: a
    simulation started then joins (or fails on) a cluster nobody meant it for. The launcher's
    Flower commands resolve to a Ray of their own, unless RAY_ADDRESS names a cluster."""
    from ray._private.services import canonicalize_bootstrap_address

    from fedkdlora_tools.flower_cli import flower_env

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # left by a stopped cluster
    assert canonicalize_bootstrap_address(None).endswith(":9")  # what plain Ray would join
    monkeypatch.setattr(os, "environ", flower_env(tmp_path / "flwr", local_superlink_ports=True))
    assert canonicalize_bootstrap_address(None) is None  # a Ray of its own
    monkeypatch.setattr(os, "environ", {**os.environ, "RAY_ADDRESS": "127.0.0.1:6379"})
    monkeypatch.setattr(os, "environ", flower_env(tmp_path / "flwr"))
    assert canonicalize_bootstrap_address(None).endswith(":6379")  # the cluster the user named


def test_bfloat16_where_the_device_lacks_it_is_one_line_naming_the_key() -> None:
    check_precision("float32", torch.device("cpu"))
    with pytest.raises(ConfigError) as error:
        check_precision("bfloat16", torch.device("cpu"))
    assert str(error.value) == (
        "run-config key 'precision' = 'bfloat16': needs a CUDA device with bfloat16 support; "
        "this process computes on cpu"
    )


@pytest.mark.slow
def test_eight_clients_at_half_a_gpu_over_four_logical_gpus_two_at_a_time(tmp_path: Path) -> None:
    """The fractional-GPU profile, on CPU: Ray is told of 4 GPUs it does not have.

    8 SuperNodes at 0.5 GPU: Ray packs 8 actors two per GPU id, every client computes
    with exactly one id (as CUDA_VISIBLE_DEVICES), and no id ever serves more clients
    at once than 1 / 0.5 = 2. Flower 1.42's simulation feeds its actors from a thread
    pool of os.cpu_count() + 4 workers, and reuses the most recently freed actor first:
    at most that many actors ever work, so on 2 cores (6 workers) the two actors of one
    GPU id stay idle. The ids used are therefore all 4 from 4 cores on, 3 here.
    """
    federation = (
        "num-supernodes=8 init-args-num-cpus=8 init-args-num-gpus=4 "
        "client-resources-num-cpus=1 client-resources-num-gpus=0.5"
    )
    code, results = simulate(
        tmp_path,
        federation,
        scheme="fedlora",
        **{**ONE_SMALL_ROUND, "min-available-nodes": 8},
    )
    assert code == 0, results and results["run"]["error"]
    placement = results["rounds"][1]["placement"]
    assert len(placement) == 8 and all(set(stages) == {"train", "evaluate"} for stages in placement.values())
    spans, actors = defaultdict(list), defaultdict(set)
    for stages in placement.values():
        for where in stages.values():
            assert where["device"] == "cpu"  # no CUDA here: Ray's logical GPUs are ids only
            assert where["ray_gpu_ids"] in {"0", "1", "2", "3"}
            assert where["cuda_visible_devices"] == where["ray_gpu_ids"]  # as the process sees it
            spans[where["ray_gpu_ids"]].append((where["started"], where["finished"]))
            actors[where["ray_gpu_ids"]].add(where["pid"])
    working_actors = min(8, (os.cpu_count() or 1) + 4)
    assert len(spans) >= min(4, math.ceil(working_actors / 2)), dict(actors)
    for gpu, intervals in spans.items():
        assert len(actors[gpu]) <= 2, (gpu, actors[gpu])  # at most two actors hold half of it
        events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
        running = peak = 0
        for _, change in events:
            running += change
            peak = max(peak, running)
        assert peak <= 2, (gpu, intervals)
    assert results["model"]["server_device"] == "cpu"


def test_the_learning_code_imports_without_flower_or_ray() -> None:
    """bench/gpu_check.py runs it on a GPU machine that has torch, transformers and peft only."""
    blocked = "import sys; sys.modules.update(flwr=None, ray=None); "
    modules = (
        "import fedkdlora_app.training, fedkdlora_app.models, fedkdlora_app.losses, fedkdlora_app.devices"
    )
    done = subprocess.run([sys.executable, "-c", blocked + modules], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture()
def two_node_ray_cluster(tmp_path: Path) -> Iterator[str]:
    """A Ray head and a worker node on this machine (two raylets, 1 CPU each); yields its address.

    Every process of the cluster carries a marker in its environment, so all of them (workers
    of other sessions' Ray untouched) are stopped afterwards.
    """
    marker = f"ray-cluster-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, MARKER_ENV: marker}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray = str(Path(sys.executable).parent / "ray")
    common = ["--num-cpus=1", "--num-gpus=0", "--block", "--disable-usage-stats"]
    starts = {
        "head": [ray, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
        "worker": [ray, "start", f"--address=127.0.0.1:{port}", *common],
    }
    try:
        for name, command in starts.items():
            log = tmp_path / f"ray-{name}.log"
            with log.open("w") as out:
                subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
            wait_until(f"Ray {name} node", lambda log=log: "Ray runtime started" in log.read_text(), 120)
        yield f"127.0.0.1:{port}"
    finally:
        kill_marked(marker)


@pytest.mark.slow
def test_a_simulation_attached_to_a_two_node_ray_cluster_uses_both_nodes(
    tmp_path: Path, two_node_ray_cluster: str, monkeypatch
) -> None:
    """With RAY_ADDRESS set, Flower's simulation joins the cluster instead of starting its own Ray:
    2 clients at 1 CPU each, on two nodes of 1 CPU each, so each node hosts one client's actor."""
    monkeypatch.setenv("RAY_ADDRESS", two_node_ray_cluster)
    code, results = simulate(
        tmp_path / "results",
        "num-supernodes=2 client-resources-num-cpus=1",
        scheme="fedlora",
        **ONE_SMALL_ROUND,
    )
    assert code == 0, results and results["run"]["error"]
    placement = results["rounds"][1]["placement"]
    nodes = {where["ray_node_id"] for stages in placement.values() for where in stages.values()}
    assert len(placement) == 2 and "" not in nodes and len(nodes) == 2, placement

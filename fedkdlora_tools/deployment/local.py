"""`LocalDeployment`: one SuperLink and its SuperNodes on this machine, and what a run came to."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from fedkdlora_app.results_format import load
from fedkdlora_tools.deployment.hosts import (
    NETNS_MAX_SUPERNODES,
    NETNS_SUPERLINK,
    SUPERLINK_PORT,
    deploy_dir,
    netns_node,
    with_hidden_paths,
)
from fedkdlora_tools.flower_cli import (
    flower_env,
    free_port,
    register_supernode,
    submit_run,
    wait_for_run,
    write_connection,
)
from fedkdlora_tools.launcher import format_overrides, resolved_run_config
from fedkdlora_tools.processes import (
    MARKER_ENV,
    ManagedProcess,
    ProcessError,
    kill_marked,
    signals_deferred,
    wait_until,
)


def process_env(flwr_home: Path, marker: str = "") -> dict[str, str]:
    """Flower's environment (`flower_cli.flower_env`), marked so cleanup can find every process."""
    env = flower_env(flwr_home)
    if marker:
        env[MARKER_ENV] = marker
    return env


def results_record_an_end(results_dir: Path, before: set[Path]) -> bool:
    """Whether a results JSON written since `before` already records the run's end (any status
    but "running"): a local check, far cheaper than asking Flower."""
    for path in set(results_dir.glob("*.json")) - before:
        with contextlib.suppress(OSError, ValueError):  # ValueError: a file still being written
            if json.loads(path.read_text()).get("run", {}).get("status", "running") != "running":
                return True
    return False


@dataclass
class RunOutcome:
    """What one submitted run came to, from the SuperLink and from the results JSON."""

    run_id: int
    status: str
    details: str
    seconds: float
    results_path: Path | None
    results: dict[str, Any] | None

    @property
    def rounds_completed(self) -> int:
        rounds = (self.results or {}).get("rounds", [])
        return sum(1 for entry in rounds if entry["round"] > 0 and entry.get("wall_seconds") is not None)

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [
            {"round": entry["round"], **failure}
            for entry in (self.results or {}).get("rounds", [])
            for failure in entry.get("failures", [])
        ]

    def summary(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "results_status": (self.results or {}).get("run", {}).get("status"),
            "rounds_completed": self.rounds_completed,
            "failures": self.failures,
            "seconds": round(self.seconds, 1),
            "results": str(self.results_path) if self.results_path else None,
        }


@dataclass
class LocalDeployment:
    """A SuperLink and SuperNodes on this machine, in network namespaces or on loopback.

    Secure unless `insecure`: TLS everywhere (certificates from deploy/generate-certs.sh)
    and SuperNode authentication, each SuperNode registered with `flwr supernode register`
    before it starts. Use as a context manager: leaving it stops every process it started.
    """

    work_dir: Path
    num_supernodes: int
    insecure: bool = False
    netns: bool = False
    connection: str = "fedkdlora"
    app_dir: Path = Path(".")  # the app `flwr run` submits (this repository)
    node_data_dirs: dict[int, Path] = field(default_factory=dict)  # node-config data-dir per SuperNode
    # Private filesystems: each SuperNode sees none of these (the server's data, results, teacher)
    # nor the other SuperNodes' data folders; None = every process sees the whole filesystem.
    hidden_from_nodes: list[Path] | None = None
    # CPU cores (taskset lists, e.g. "0" and "1") for the SuperLink with its ServerApp and for
    # the SuperNodes with their ClientApps: a server with compute of its own, as on separate hosts.
    server_cpus: str | None = None
    node_cpus: str | None = None
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    node_ids: dict[int, int] = field(default_factory=dict)
    _netns_up: bool = False
    _closed: bool = False

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir).resolve()
        self.app_dir = Path(self.app_dir).resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.certs_dir = self.work_dir / "certs"
        self.logs_dir = self.work_dir / "logs"
        self.logs_dir.mkdir(exist_ok=True)
        # netns: one spare SuperNode host, for a node that must be refused
        if self.netns and self.num_supernodes + 1 > NETNS_MAX_SUPERNODES:
            raise ValueError(
                f"netns-hosts.sh holds at most {NETNS_MAX_SUPERNODES - 1} SuperNodes and a spare"
            )
        self.superlink_host = NETNS_SUPERLINK[1] if self.netns else "127.0.0.1"
        self.superlink_port = SUPERLINK_PORT if self.netns else free_port()
        self.cli_env = process_env(self.work_dir / "cli-home", self.marker)

    # context manager: cleanup happens even when a test fails or the interpreter exits
    def __enter__(self) -> LocalDeployment:
        atexit.register(self.close)
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
        atexit.unregister(self.close)

    @property
    def superlink_address(self) -> str:
        return f"{self.superlink_host}:{self.superlink_port}"

    def start(self) -> None:
        """Hosts (if netns), certificates (unless insecure), SuperLink, CLI connection."""
        if self.netns:
            self._script(["netns-hosts.sh", "up", str(self.num_supernodes + 1)], timeout=60)
            self._netns_up = True
        if not self.insecure:
            self._script(
                ["generate-certs.sh", "--out", str(self.certs_dir), "--nodes", str(self.num_supernodes + 1)],
                timeout=120,
            )
        self.start_superlink()
        root = None if self.insecure else self.certs_dir / "ca.crt"
        write_connection(
            Path(self.cli_env["FLWR_HOME"]), self.connection, self.superlink_address, root, self.insecure
        )

    def _script(self, args: list[str], timeout: float) -> None:
        done = subprocess.run(
            [str(deploy_dir() / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise ProcessError(f"deploy/{args[0]} failed: {done.stdout[-500:]}{done.stderr[-500:]}")

    def _spawn(
        self,
        name: str,
        command: list[str],
        namespace: str | None,
        hidden: list[Path] | None = None,
        cpus: str | None = None,
    ) -> ManagedProcess:
        if cpus:  # children (SuperExec, ServerApp, ClientApps) inherit the affinity
            command = ["taskset", "-c", cpus, *command]
        if hidden:
            command = with_hidden_paths(command, hidden)
        if namespace is not None:
            command = ["ip", "netns", "exec", namespace, *command]
        log_path = self.logs_dir / f"{name}.log"
        home = self.work_dir / "homes" / name
        home.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log_file:
            offset = log_file.tell()
            popen = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=process_env(home, self.marker),
                cwd=home,
            )
        process = ManagedProcess(name, popen, log_path, offset)
        self.processes[name] = process
        return process

    def start_superlink(self, timeout: float = 60) -> ManagedProcess:
        """Start it and wait until its port accepts connections."""
        command = [str(deploy_dir() / "start-superlink.sh"), "--port", str(self.superlink_port)]
        command += ["--insecure"] if self.insecure else ["--certs", str(self.certs_dir)]
        command += ["--host", self.superlink_host, "--database", str(self.work_dir / "superlink.db")]
        process = self._spawn(
            "superlink", command, NETNS_SUPERLINK[0] if self.netns else None, cpus=self.server_cpus
        )

        def listening() -> bool:
            if not process.alive:
                raise ProcessError(f"SuperLink exited ({process.popen.returncode}):\n{process.tail()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.superlink_host, self.superlink_port), 1),
            ):
                return True
            return False

        wait_until(f"the SuperLink on {self.superlink_address}", listening, timeout)
        return process

    def restart_superlink(self) -> ManagedProcess:
        """Stop the SuperLink and start it again on its database: its nodes and runs survive."""
        old = self.processes.pop("superlink")
        old.stop()
        self.processes[f"superlink-stopped-{int(time.time())}"] = old  # its log stays with the deployment
        return self.start_superlink()

    def node_key(self, index: int) -> Path:
        return self.certs_dir / f"node-{index}"

    def register(self, index: int, key: Path | None = None) -> int:
        """Register SuperNode `index`'s public key (the SuperLink assigns its node id now)."""
        key = key or self.node_key(index)
        node_id = register_supernode(self.cli_env, self.connection, key.with_name(key.name + ".pub"))
        self.node_ids[index] = node_id
        return node_id

    def start_supernode(
        self,
        index: int,
        *,
        partition_id: int | None = None,
        key: Path | None = None,
        register: bool = True,
        name: str | None = None,
        timeout: float = 60,
    ) -> ManagedProcess:
        """Start SuperNode `index` (partition `index` of `num_supernodes` unless given) and wait until it
        has joined (its log names its node id) or has exited (e.g. refused).

        With authentication, `register=False` leaves its key unregistered: the SuperLink must refuse it.
        """
        key = key or self.node_key(index)
        if not self.insecure and register and index not in self.node_ids:
            self.register(index, key)
        partition_id = index if partition_id is None else partition_id
        namespace, _ = netns_node(index)
        command = [
            str(deploy_dir() / "start-supernode.sh"),
            "--superlink", self.superlink_address,
            "--partition-id", str(partition_id),
            "--num-partitions", str(self.num_supernodes),
            "--port", str(9094 if self.netns else free_port()),
        ]  # fmt: skip
        command += ["--insecure"] if self.insecure else ["--certs", str(self.certs_dir), "--key", str(key)]
        if partition_id in self.node_data_dirs:
            command += ["--data-dir", str(self.node_data_dirs[partition_id])]
        command += ["--cache-dir", str(self.node_cache_dir(index))]
        process = self._spawn(
            name or f"supernode-{index}",
            command,
            namespace if self.netns else None,
            self.hidden_for(index),
            cpus=self.node_cpus,
        )

        def joined_or_exited() -> bool:
            return bool(re.search(r"SuperNode ID: \d+", process.log())) or not process.alive

        wait_until(f"{process.name} to join or exit", joined_or_exited, timeout)
        if match := re.search(r"SuperNode ID: (\d+)", process.log()):
            self.node_ids.setdefault(index, int(match.group(1)))
        return process

    def rejoin_supernode(self, index: int, timeout: float = 120) -> ManagedProcess:
        """Start SuperNode `index` again until it joins, as a service manager restarting on failure would.

        The SuperLink refuses to activate a node it still counts online (`ApiError 2004`, the
        SuperNode exits): a host that froze and then stopped may not have signed off, and
        stays online until its last heartbeat is 60 s old (2 heartbeat intervals).
        """
        deadline = time.monotonic() + timeout
        while not (process := self.start_supernode(index)).alive:
            if time.monotonic() > deadline:
                raise ProcessError(f"{process.name} did not rejoin within {timeout:.0f} s:\n{process.tail()}")
            time.sleep(5)
        return process

    def node_cache_dir(self, index: int) -> Path:
        """SuperNode `index`'s own cache (the shipped client-KD teacher), kept across its restarts."""
        return self.work_dir / "node-cache" / f"node-{index}"

    def hidden_for(self, index: int) -> list[Path] | None:
        """What SuperNode `index` must not see: the server's files and the other nodes' data and caches."""
        if self.hidden_from_nodes is None:
            return None
        others = [path for i, path in self.node_data_dirs.items() if i != index]
        others += [self.node_cache_dir(i) for i in range(self.num_supernodes + 1) if i != index]
        for path in others:
            path.mkdir(parents=True, exist_ok=True)  # a mount point must exist
        return [*self.hidden_from_nodes, *others]

    def clientapps(self, index: int) -> list[psutil.Process]:
        """SuperNode `index`'s running ClientApp processes (one per message in Flower 1.42).

        Found by their FLWR_HOME (each process started here has its own, inherited by its
        children), not by parentage: a process may be re-parented on its way.
        """
        home = str(self.work_dir / "homes" / f"supernode-{index}")
        procs = []
        for proc in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any("flwr-clientapp" in part for part in proc.info["cmdline"] or []) and (
                    proc.environ().get("FLWR_HOME") == home
                ):
                    procs.append(proc)
        return procs

    def supernode_id(self, process: ManagedProcess) -> int | None:
        """The node id a SuperNode's log reports (the last one, after restarts)."""
        ids = re.findall(r"SuperNode ID: (\d+)", process.log())
        return int(ids[-1]) if ids else None

    def stop_supernode(self, index: int, sig: int = signal.SIGTERM) -> ManagedProcess:
        """Stop SuperNode `index` and its ClientApp, as a host that goes away would."""
        process = self.processes[f"supernode-{index}"]
        process.stop(sig)
        self.processes[f"supernode-{index}-stopped-{int(time.time())}"] = self.processes.pop(
            f"supernode-{index}"
        )
        return process

    def check_superlink(self) -> None:
        superlink = self.processes["superlink"]
        if not superlink.alive:
            raise ProcessError(f"SuperLink exited ({superlink.popen.returncode}):\n{superlink.tail()}")

    def submit(self, run_config: dict[str, Any]) -> int:
        """Validate the run-config (paths made absolute, as fedkdlora-run does) and submit it.

        As from a workstation: the server's files are checked on the server, not here.
        """
        overrides = resolved_run_config(
            self.app_dir, [format_overrides(run_config)], Path.cwd(), check_files=False
        )
        return submit_run(self.cli_env, self.connection, self.app_dir, overrides)

    def wait(self, run_id: int, timeout: float, ended: Callable[[], bool] | None = None) -> tuple[str, str]:
        return wait_for_run(
            self.cli_env, self.connection, run_id, timeout, check=self.check_superlink, ended=ended
        )

    def run(
        self,
        run_config: dict[str, Any],
        timeout: float = 600,
        during: Callable[[int, Path], None] | None = None,
    ) -> RunOutcome:
        """Submit, optionally act while it runs (`during(run_id, results_dir)`), wait, read the results."""
        results_dir = Path(run_config["results-dir"]).resolve()
        before = set(results_dir.glob("*.json"))
        started = time.monotonic()
        run_id = self.submit(run_config)
        if during is not None:
            during(run_id, results_dir)
        ended = functools.partial(results_record_an_end, results_dir, before)
        status, details = self.wait(run_id, timeout - (time.monotonic() - started), ended)
        seconds = time.monotonic() - started
        new = sorted(set(results_dir.glob("*.json")) - before)
        results = load(new[-1]) if new else None
        return RunOutcome(run_id, status, details, seconds, new[-1] if new else None, results)

    def log_tails(self, lines: int = 25) -> str:
        """Every process's last lines, for a failing test's report."""
        return "\n".join(
            f"----- {name} ({process.log_path}) -----\n{process.tail(lines)}"
            for name, process in self.processes.items()
        )

    def close(self) -> None:
        """Stop SuperNodes, then the SuperLink, then anything left with our marker; remove namespaces."""
        if self._closed:
            return
        self._closed = True
        with signals_deferred():  # a second Ctrl-C must not leave processes or namespaces behind
            for name in sorted(self.processes, key=lambda n: n == "superlink"):
                with contextlib.suppress(Exception):
                    self.processes[name].stop(signal.SIGTERM, grace=5)
            kill_marked(self.marker)
            if self._netns_up:
                with contextlib.suppress(Exception):
                    self._script(["netns-hosts.sh", "down"], timeout=60)

"""The app on Flower's deployment engine: a SuperLink and one SuperNode per client as real processes.

Each process is started through the `deploy/` script a person would run on that host
(`start-superlink.sh`, `start-supernode.sh`), so the tests and the measurements in
docs/deployment.md exercise exactly the documented recipe. This module adds what a
script cannot do well: bounded waits on readiness, SuperNode registration, submitting a
run and polling its real outcome with `flwr list`, stopping a SuperNode mid-round, and
killing every process it started (and their ServerApp/ClientApp children), even on failure.

    python -m fedkdlora_app.deployment scenario --supernodes 2 --run-config "num-server-rounds=2"
    python -m fedkdlora_app.deployment scenario --supernodes 4 --netns --lose-node-in-round 2
    python -m fedkdlora_app.deployment submit CONNECTION --run-config "..."   # deploy/run.sh
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import tomli
import tomli_w
from flwr.common.config import parse_config_args

from fedkdlora_app import launcher
from fedkdlora_app.config import ConfigError, RunConfig, app_defaults
from fedkdlora_app.data import (
    PARTITION_FILE,
    client_eval_shard,
    client_train_partition,
    partition_record,
)

REPO = Path(__file__).resolve().parents[1]
DEPLOY_DIR = REPO / "deploy"
# deploy/netns-hosts.sh: the SuperLink's namespace and address, SuperNode i's, and the CLI's side.
NETNS_SUPERLINK = ("fkl-link", "10.77.0.1")
NETNS_CLI_ADDRESS = "10.77.0.254"
NETNS_MAX_SUPERNODES = 9
SUPERLINK_PORT = 9093
# Every process started here (and all its children) carries this variable, so cleanup can
# find a ClientApp whose SuperNode was killed and which init adopted.
MARKER_ENV = "FEDKDLORA_DEPLOYMENT"
FINISHED = "finished:"


class DeploymentError(RuntimeError):
    """A process did not start, a wait ran out, or a CLI call failed; carries log tails."""


def netns_node(index: int) -> tuple[str, str]:
    """(namespace, address) of SuperNode `index` in deploy/netns-hosts.sh."""
    return f"fkl-node{index}", f"10.77.0.1{index}"


def netns_available() -> bool:
    """True where namespaces and veth pairs can be created (root with CAP_NET_ADMIN, `ip` present)."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        return False
    check = subprocess.run([str(DEPLOY_DIR / "netns-hosts.sh"), "check"], capture_output=True, timeout=30)
    return check.returncode == 0


def mount_namespaces_available() -> bool:
    """True where a process can get a private view of the filesystem (`unshare --mount`, root)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    with tempfile.TemporaryDirectory() as probe:
        check = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "probe", probe],
            capture_output=True,
            timeout=30,
        )
    return check.returncode == 0


def with_hidden_paths(command: list[str], hidden: list[Path]) -> list[str]:
    """`command` in a mount namespace of its own where each of `hidden` is an empty tmpfs.

    That is how a host without the server's files looks: the paths exist, the files do
    not. Mounts made there are private: nothing changes for any other process.
    """
    mounts = "".join(f"mount -t tmpfs -o size=1m fkl-hidden {shlex.quote(str(path))} && " for path in hidden)
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'{mounts}exec "$@"',
        "sh",
        *command,
    ]


def process_env(flwr_home: Path, marker: str = "") -> dict[str, str]:
    """Flower's environment (`launcher.flower_env`), marked so cleanup can find every process."""
    env = launcher.flower_env(flwr_home)
    if marker:
        env[MARKER_ENV] = marker
    return env


# --- a node's own data ----------------------------------------------------------------------
def export_partition(config: RunConfig, partition_id: int, num_partitions: int, out_dir: Path) -> Path:
    """Write client `partition_id`'s train examples and eval shard to `out_dir/<task>/`.

    That folder is all its SuperNode's host needs (`start-supernode.sh --data-dir`); the
    ClientApp checks it holds the partition the run assigns, and reads it whole.
    """
    task_dir = Path(out_dir) / config.task
    task_dir.mkdir(parents=True, exist_ok=True)
    for split, dataset in (
        ("train", client_train_partition(config, partition_id, num_partitions)),
        ("dev", client_eval_shard(config, partition_id, num_partitions)),
    ):
        rows = zip(dataset["sentence"], dataset["label"], strict=True)
        if config.task == "cola":  # GLUE CoLA layout: no header; source, label, original label, sentence
            lines = [f"export\t{label}\t\t{sentence}" for sentence, label in rows]
        else:
            lines = ["sentence\tlabel", *(f"{sentence}\t{label}" for sentence, label in rows)]
        (task_dir / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    record = partition_record(config, partition_id, num_partitions)
    (task_dir / PARTITION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return Path(out_dir)


def config_with(overrides: dict[str, Any], app_dir: Path = REPO) -> RunConfig:
    """The app's run-config with `overrides`, validated as the ServerApp would."""
    return RunConfig.from_mapping({**app_defaults(app_dir), **overrides})


# --- the Flower CLI ----------------------------------------------------------------------
def write_connection(
    flwr_home: Path, name: str, address: str, root_certificates: Path | None = None, insecure: bool = False
) -> Path:
    """Add `[superlink.<name>]` to FLWR_HOME/config.toml, the file `flwr run . <name>` reads in 1.42."""
    if insecure == (root_certificates is not None):
        raise ValueError("give exactly one of root_certificates (TLS) and insecure=True")
    path = flwr_home / "config.toml"
    config: dict[str, Any] = tomli.loads(path.read_text()) if path.exists() else {}
    connection: dict[str, Any] = {"address": address}
    if insecure:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(Path(root_certificates).resolve())  # must be absolute
    config.setdefault("superlink", {})[name] = connection
    config["superlink"].setdefault("default", name)
    flwr_home.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


def flwr_json(args: list[str], env: dict[str, str], timeout: float = 60) -> dict[str, Any]:
    """Run `flwr <args> --format json`; its JSON answer, or DeploymentError with the output."""
    try:
        done = subprocess.run(
            ["flwr", *args, "--format", "json"], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as error:
        raise DeploymentError(f"`flwr {' '.join(args)}` did not answer within {timeout:.0f} s") from error
    start = done.stdout.find("{")
    try:
        answer = json.loads(done.stdout[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        answer = None
    if done.returncode != 0 or not isinstance(answer, dict) or answer.get("success") is False:
        raise DeploymentError(
            f"`flwr {' '.join(args)}` failed (exit {done.returncode}): "
            f"{done.stdout[-800:]}{done.stderr[-800:]}"
        )
    return answer


def register_supernode(env: dict[str, str], connection: str, public_key: Path) -> int:
    """`flwr supernode register`: after this, the SuperNode holding the private key may join."""
    return int(flwr_json(["supernode", "register", str(public_key), connection], env)["node-id"])


def submit_run(env: dict[str, str], connection: str, app_dir: Path, run_config: dict[str, Any]) -> int:
    """`flwr run <app> <connection>` with the overrides in a TOML file; the new run's id."""
    overrides = Path(env["FLWR_HOME"]) / f"run-config-{uuid.uuid4().hex[:8]}.toml"
    overrides.write_text(tomli_w.dumps(run_config))
    answer = flwr_json(["run", str(app_dir), connection, "--run-config", str(overrides)], env, timeout=120)
    return int(answer["run-id"])


def run_status(env: dict[str, str], connection: str, run_id: int) -> tuple[str, str]:
    """(status, status-details) of one run, as the SuperLink reports it."""
    runs = flwr_json(["list", connection, "--run-id", str(run_id)], env)["runs"]
    return runs[0].get("status", "unknown"), runs[0].get("status-details", "")


def wait_for_run(
    env: dict[str, str],
    connection: str,
    run_id: int,
    timeout: float,
    check: Callable[[], None] | None = None,
    poll: float = 2.0,
) -> tuple[str, str]:
    """Poll until the run is finished (`finished:completed|failed|stopped`) or `timeout` passes.

    `check` runs every poll (e.g. "the SuperLink is still alive") and may raise.
    """
    deadline = time.monotonic() + timeout
    status, details = "unknown", ""
    while time.monotonic() < deadline:
        with contextlib.suppress(DeploymentError):  # a busy SuperLink may miss one poll
            status, details = run_status(env, connection, run_id)
            if status.startswith(FINISHED):
                return status, details
        if check is not None:
            check()
        time.sleep(poll)
    raise DeploymentError(f"run {run_id} not finished after {timeout:.0f} s (last status {status!r})")


# --- processes ---------------------------------------------------------------------------
@dataclass
class ManagedProcess:
    """One started process with its own log file."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    log_offset: int = 0  # a restarted process appends to its predecessor's log ...
    log_end: int | None = None  # ... after the point where this one stopped

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        """This process's part of its log file."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as file:
            file.seek(self.log_offset)
            size = -1 if self.log_end is None else self.log_end - self.log_offset
            return file.read(size).decode(errors="replace")

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def tree(self) -> list[psutil.Process]:
        """The process and all its descendants (SuperExec, ServerApp / ClientApp)."""
        try:
            root = psutil.Process(self.popen.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        """Send `sig` to the whole tree; whatever is left after `grace` seconds is killed."""
        procs = self.tree()
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        if self.log_end is None and self.log_path.exists():
            self.log_end = self.log_path.stat().st_size


def wait_until(what: str, condition: Callable[[], Any], timeout: float, poll: float = 0.5) -> Any:
    """The first truthy value of `condition()` within `timeout` s, else DeploymentError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(poll)
    raise DeploymentError(f"timed out after {timeout:.0f} s waiting for {what}")


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM ignored for the duration (main thread only), then restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def kill_marked(marker: str) -> int:
    """Kill every process carrying MARKER_ENV=marker (orphans included); return how many."""
    victims = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and proc.environ().get(MARKER_ENV) == marker:
                victims.append(proc)
    for proc in victims:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(victims, timeout=10)
    return len(victims)


# --- a whole deployment on this machine ---------------------------------------------------
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
    node_data_dirs: dict[int, Path] = field(default_factory=dict)  # node-config data-dir per SuperNode
    # Private filesystems: each SuperNode sees none of these (the server's data, results, teacher)
    # nor the other SuperNodes' data folders; None = every process sees the whole filesystem.
    hidden_from_nodes: list[Path] | None = None
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    node_ids: dict[int, int] = field(default_factory=dict)
    _netns_up: bool = False
    _closed: bool = False

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir).resolve()
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
        self.superlink_port = SUPERLINK_PORT if self.netns else launcher.free_port()
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
            [str(DEPLOY_DIR / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise DeploymentError(f"deploy/{args[0]} failed: {done.stdout[-500:]}{done.stderr[-500:]}")

    def _spawn(
        self, name: str, command: list[str], namespace: str | None, hidden: list[Path] | None = None
    ) -> ManagedProcess:
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
        command = [str(DEPLOY_DIR / "start-superlink.sh"), "--port", str(self.superlink_port)]
        command += ["--insecure"] if self.insecure else ["--certs", str(self.certs_dir)]
        command += ["--host", self.superlink_host]
        process = self._spawn("superlink", command, NETNS_SUPERLINK[0] if self.netns else None)

        def listening() -> bool:
            if not process.alive:
                raise DeploymentError(f"SuperLink exited ({process.popen.returncode}):\n{process.tail()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.superlink_host, self.superlink_port), 1),
            ):
                return True
            return False

        wait_until(f"the SuperLink on {self.superlink_address}", listening, timeout)
        return process

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
            str(DEPLOY_DIR / "start-supernode.sh"),
            "--superlink", self.superlink_address,
            "--partition-id", str(partition_id),
            "--num-partitions", str(self.num_supernodes),
            "--port", str(9094 if self.netns else launcher.free_port()),
        ]  # fmt: skip
        command += ["--insecure"] if self.insecure else ["--certs", str(self.certs_dir), "--key", str(key)]
        if partition_id in self.node_data_dirs:
            command += ["--data-dir", str(self.node_data_dirs[partition_id])]
        command += ["--cache-dir", str(self.node_cache_dir(index))]
        process = self._spawn(
            name or f"supernode-{index}", command, namespace if self.netns else None, self.hidden_for(index)
        )

        def joined_or_exited() -> bool:
            return bool(re.search(r"SuperNode ID: \d+", process.log())) or not process.alive

        wait_until(f"{process.name} to join or exit", joined_or_exited, timeout)
        if match := re.search(r"SuperNode ID: (\d+)", process.log()):
            self.node_ids.setdefault(index, int(match.group(1)))
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
            raise DeploymentError(f"SuperLink exited ({superlink.popen.returncode}):\n{superlink.tail()}")

    def submit(self, run_config: dict[str, Any], app_dir: Path = REPO) -> int:
        """Validate the run-config (paths made absolute, as fedkdlora-run does) and submit it.

        As from a workstation: the server's files are checked on the server, not here.
        """
        overrides = launcher.resolved_run_config(
            app_dir, [launcher.format_overrides(run_config)], Path.cwd(), check_files=False
        )
        return submit_run(self.cli_env, self.connection, app_dir, overrides)

    def wait(self, run_id: int, timeout: float) -> tuple[str, str]:
        return wait_for_run(self.cli_env, self.connection, run_id, timeout, check=self.check_superlink)

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
        status, details = self.wait(run_id, timeout - (time.monotonic() - started))
        seconds = time.monotonic() - started
        new = sorted(set(results_dir.glob("*.json")) - before)
        results = json.loads(new[-1].read_text()) if new else None
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
        with _signals_deferred():  # a second Ctrl-C must not leave processes or namespaces behind
            for name in sorted(self.processes, key=lambda n: n == "superlink"):
                with contextlib.suppress(Exception):
                    self.processes[name].stop(signal.SIGTERM, grace=5)
            kill_marked(self.marker)
            if self._netns_up:
                with contextlib.suppress(Exception):
                    self._script(["netns-hosts.sh", "down"], timeout=60)


# --- scenarios: what docs/deployment.md measures and the tests assert ----------------------
def wait_for_train_messages(process: ManagedProcess, count: int, timeout: float) -> None:
    """Until `process` (a SuperNode) has received its `count`-th train message.

    Flower 1.42's SuperNode log does not name the round; with fraction-train = 1 a node
    that joined before the run gets one train message per round, so `count` is the round.
    """

    def received() -> bool:
        if not process.alive:
            raise DeploymentError(f"{process.name} exited:\n{process.tail()}")
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
        deployment.start_supernode(victim)

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
        "data-dir": str(REPO.parent / "shared" / "data" / "glue"),
        "results-dir": str(work_dir / "results"),
        "min-available-nodes": args.supernodes,
    }
    if args.run_config:
        run_config.update(parse_config_args(args.run_config))
    if args.lose_node_in_round:
        run_config["min-available-nodes"] = args.supernodes - 1
    report: dict[str, Any] = {"netns": args.netns, "insecure": args.insecure, "supernodes": args.supernodes}
    started = time.monotonic()
    deployment = LocalDeployment(work_dir, args.supernodes, insecure=args.insecure, netns=args.netns)
    if args.own_partitions:  # each SuperNode gets a folder with only its own examples
        config = config_with({**run_config, "results-dir": run_config["results-dir"]})
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
        except BaseException:
            print(deployment.log_tails(), file=sys.stderr)
            raise
    report["seconds_total"] = round(time.monotonic() - started, 1)
    report["work_dir"] = str(work_dir)
    return report


# --- command line ------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedkdlora_app.deployment", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)

    connect = commands.add_parser("connect", help="add a SuperLink connection to $FLWR_HOME/config.toml")
    connect.add_argument("name")
    connect.add_argument("address", help="HOST:PORT of the SuperLink")
    tls = connect.add_mutually_exclusive_group(required=True)
    tls.add_argument("--root-certificates", type=Path, help="CA certificate that signed the SuperLink's")
    tls.add_argument("--insecure", action="store_true", help="plain HTTP (loopback experiments only)")

    submit = commands.add_parser("submit", help="flwr run . CONNECTION, then wait for the real outcome")
    submit.add_argument("connection")
    submit.add_argument("--app", type=Path, default=Path("."))
    submit.add_argument("--run-config", "-c", action="append", default=[])
    submit.add_argument("--timeout", type=float, default=24 * 3600)

    scenario = commands.add_parser("scenario", help="a whole deployment on this machine, measured")
    scenario.add_argument("--supernodes", type=int, default=2)
    scenario.add_argument(
        "--netns", action="store_true", help="SuperLink and SuperNodes in network namespaces"
    )
    scenario.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode authentication")
    scenario.add_argument(
        "--unregistered-node", action="store_true", help="also start an unregistered SuperNode"
    )
    scenario.add_argument(
        "--lose-node-in-round", type=int, default=0, help="stop the last SuperNode in round R"
    )
    scenario.add_argument("--restore-in-round", type=int, default=None, help="start it again in round R")
    scenario.add_argument("--kill", action="store_true", help="SIGKILL (a crash) instead of SIGTERM")
    scenario.add_argument(
        "--own-partitions", action="store_true", help="give each SuperNode a folder with only its partition"
    )
    scenario.add_argument(
        "--private-filesystems",
        action="store_true",
        help="each SuperNode in a mount namespace where the server's data and results are empty (root)",
    )
    scenario.add_argument("--run-config", "-c", action="append", default=[])
    scenario.add_argument("--work-dir", type=Path, default=None)
    scenario.add_argument("--timeout", type=float, default=900)

    export = commands.add_parser("export-partition", help="write one SuperNode's own data folder")
    export.add_argument("--partition-id", type=int, required=True)
    export.add_argument("--num-partitions", type=int, required=True)
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--app", type=Path, default=Path("."))
    export.add_argument("--run-config", "-c", action="append", default=[], help="the run's overrides")

    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, launcher.exit_on_sigterm)
    if args.command == "export-partition":
        try:
            app_dir = args.app.resolve()
            overrides = launcher.resolved_run_config(app_dir, args.run_config, Path.cwd())
            config = config_with(overrides, app_dir)
        except ConfigError as error:
            print(f"deployment: {error}", file=sys.stderr)
            return 2
        out = export_partition(config, args.partition_id, args.num_partitions, args.out)
        print(f"partition {args.partition_id}/{args.num_partitions} of {config.task} -> {out / config.task}")
        return 0
    if args.command == "connect":
        home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
        path = write_connection(home, args.name, args.address, args.root_certificates, args.insecure)
        print(f"connection '{args.name}' -> {args.address} written to {path}")
        return 0
    if args.command == "submit":
        env = process_env(Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")))
        app_dir = args.app.resolve()
        try:  # types, ranges and choices here; the server's paths are checked on its host
            overrides = launcher.resolved_run_config(app_dir, args.run_config, Path.cwd(), check_files=False)
        except ConfigError as error:
            print(f"deployment: {error}", file=sys.stderr)
            return 2
        started = time.monotonic()
        run_id = submit_run(env, args.connection, app_dir, overrides)
        print(f"deployment: run {run_id} submitted to '{args.connection}'", flush=True)
        status, details = wait_for_run(env, args.connection, run_id, args.timeout)
        print(
            f"deployment: run {run_id} {status} after {time.monotonic() - started:.0f} s {details}".rstrip()
        )
        return 0 if status == "finished:completed" else 1
    report = run_scenario(args)
    print(json.dumps(report, indent=2))
    return 0 if report["run"]["status"] == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())

"""The Flower 1.42 command line as the tools use it: environment, JSON answers, run status.

`flwr run` exits 0 even when the ServerApp raised, so every tool reads a run's real
outcome from `flwr list --format json` (`run_status`, the one reader of it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import tomli
import tomli_w
from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

from fedkdlora_tools.processes import ProcessError, stop_processes

FINISHED = "finished:"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flower_env(flwr_home: Path, local_superlink_ports: bool = False) -> dict[str, str]:
    """For Flower's commands: this venv first on PATH, a private FLWR_HOME, no `uv sync` per run,
    and a simulation Ray of its own unless RAY_ADDRESS names a cluster to attach to.

    `local_superlink_ports`: free ports for the local SuperLink that `flwr run` starts in
    simulation, so several runs on one machine do not collide.
    """
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    # Without an address `ray.init()` joins the cluster the last `ray start` on this machine
    # wrote down, even one that is gone; "local" starts a new one.
    env["RAY_ADDRESS"] = env.get("RAY_ADDRESS") or "local"
    if local_superlink_ports:
        env.update(
            FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
            FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        )
    return env


def flwr_json(args: list[str], env: dict[str, str], timeout: float = 60) -> dict[str, Any]:
    """Run `flwr <args> --format json`; its JSON answer, or ProcessError with the output."""
    try:
        done = subprocess.run(
            ["flwr", *args, "--format", "json"], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as error:
        raise ProcessError(f"`flwr {' '.join(args)}` did not answer within {timeout:.0f} s") from error
    start = done.stdout.find("{")
    try:
        answer = json.loads(done.stdout[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        answer = None
    if done.returncode != 0 or not isinstance(answer, dict) or answer.get("success") is False:
        raise ProcessError(
            f"`flwr {' '.join(args)}` failed (exit {done.returncode}): "
            f"{done.stdout[-800:]}{done.stderr[-800:]}"
        )
    return answer


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


def install_federations(flwr_home: Path, source: Path, names: list[str] | None = None) -> list[str]:
    """Copy the saved federations of `source` (the app's federations.toml), or only `names`, into
    FLWR_HOME/config.toml as `[superlink.<name>]`; every other entry and the default stay as they are."""
    saved = tomli.loads(source.read_text()).get("superlink", {})
    unknown = sorted(set(names or []) - set(saved))
    if unknown:
        raise ValueError(f"no federation {', '.join(unknown)} in {source} (it has {', '.join(saved)})")
    path = flwr_home / "config.toml"
    # a new home starts from the file Flower itself would write (its `local` connection the default)
    config: dict[str, Any] = tomli.loads(path.read_text() if path.exists() else DEFAULT_FLOWER_CONFIG_TOML)
    chosen = names or list(saved)
    config.setdefault("superlink", {}).update({name: saved[name] for name in chosen})
    flwr_home.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return chosen


def stage_app(app_dir: Path, dest: Path) -> Path:
    """Copy the files the FAB takes (pyproject.toml, .gitignore, `fab-include`) to `dest`; return it.

    `flwr run <dir>` walks every file under <dir> before filtering (a .venv and a results
    folder beside the app: seconds per run); from `dest` it builds the same FAB. Without
    `fab-include` the FAB's files are not known here, and `app_dir` itself is returned.
    """
    pyproject = app_dir / "pyproject.toml"
    app_table = tomli.loads(pyproject.read_text()).get("tool", {}).get("flwr", {}).get("app", {})
    patterns = app_table.get("fab-include")
    if not patterns:
        return app_dir
    files = [pyproject] + [path for path in [app_dir / ".gitignore"] if path.is_file()]
    files += [path for pattern in patterns for path in app_dir.glob(pattern) if path.is_file()]
    shutil.rmtree(dest, ignore_errors=True)  # nothing left over from an earlier staging
    for path in files:
        target = dest / path.relative_to(app_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return dest


def register_supernode(env: dict[str, str], connection: str, public_key: Path) -> int:
    """`flwr supernode register`: after this, the SuperNode holding the private key may join."""
    return int(flwr_json(["supernode", "register", str(public_key), connection], env)["node-id"])


def submit_run(env: dict[str, str], connection: str, app_dir: Path, run_config: dict[str, Any]) -> int:
    """`flwr run <app> <connection>` with the overrides in a TOML file; the new run's id."""
    submission = Path(env["FLWR_HOME"]) / f"run-{uuid.uuid4().hex[:8]}"
    overrides = submission / "run-config.toml"
    staged = stage_app(app_dir, submission / "app")
    submission.mkdir(parents=True, exist_ok=True)
    overrides.write_text(tomli_w.dumps(run_config))
    answer = flwr_json(["run", str(staged), connection, "--run-config", str(overrides)], env, timeout=120)
    return int(answer["run-id"])


def run_status(
    env: dict[str, str], connection: str | None = None, run_id: int | None = None
) -> tuple[str, str]:
    """(status, status-details) of run `run_id`, or of the newest run, as the SuperLink reports it.

    No `connection`: the local SuperLink of this FLWR_HOME (simulation).
    """
    args = ["list", *([connection] if connection else []), *(["--run-id", str(run_id)] if run_id else [])]
    runs = flwr_json(args, env)["runs"]
    if not runs:
        return "unknown", "no run was submitted"
    newest = max(runs, key=lambda run: int(run["run-id"]))
    return newest.get("status", "unknown"), newest.get("status-details", "")


def run_traffic(env: dict[str, str], connection: str | None, run_id: int) -> tuple[int, int]:
    """(inbound, outbound) bytes that Flower's SuperLink counted for run `run_id` (`flwr list`):
    its Fleet API traffic with the SuperNodes, whole requests and responses."""
    args = ["list", *([connection] if connection else []), "--run-id", str(run_id)]
    [run] = flwr_json(args, env)["runs"]
    traffic = run["network-traffic"]
    return int(traffic["inbound-bytes"]), int(traffic["outbound-bytes"])


def wait_for_run(
    env: dict[str, str],
    connection: str,
    run_id: int,
    timeout: float,
    check: Callable[[], None] | None = None,
    poll: float = 2.0,
    ended: Callable[[], bool] | None = None,
    idle_poll: float = 15.0,
) -> tuple[str, str]:
    """Poll until the run is finished (`finished:completed|failed|stopped`) or `timeout` passes.

    `check` runs every poll (e.g. "the SuperLink is still alive") and may raise. Each
    `flwr list` is a process of about 1.5 s CPU, which a small deployment host would
    spend beside its ClientApps: given `ended`, a cheap local sign that the run is over
    (its results file says so), Flower is asked every `poll` s once `ended()` holds and
    every `idle_poll` s before (a run may fail before writing anything).
    """
    deadline = time.monotonic() + timeout
    status, details = "unknown", ""
    asked = -math.inf
    while time.monotonic() < deadline:
        wait = poll if ended is None or ended() else idle_poll
        if time.monotonic() - asked >= wait:
            asked = time.monotonic()
            with contextlib.suppress(ProcessError):  # a busy SuperLink may miss one poll
                status, details = run_status(env, connection, run_id)
                if status.startswith(FINISHED):
                    return status, details
        if check is not None:
            check()
        time.sleep(min(poll, 0.5) if ended is not None else poll)
    raise ProcessError(f"run {run_id} not finished after {timeout:.0f} s (last status {status!r})")


def stop_local_superlink(flwr_home: Path) -> int:
    """Stop the SuperLink `flwr run` started under `flwr_home`, and its children; return count."""
    marker = str(flwr_home / "local-superlink")
    targets = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any("flower-superlink" in part for part in cmdline) and any(marker in part for part in cmdline):
            with contextlib.suppress(psutil.NoSuchProcess):
                targets += [proc, *proc.children(recursive=True)]
    stop_processes(targets)
    return len(targets)

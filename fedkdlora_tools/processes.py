"""Process supervision for the tools: stop a process tree, wait for a condition, clean up orphans."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

# Every process the deployment harness starts (and all its children) carries this variable,
# so cleanup can find a ClientApp whose SuperNode was killed and which init adopted.
MARKER_ENV = "FEDKDLORA_DEPLOYMENT"


class ProcessError(RuntimeError):
    """A process did not start, a wait ran out, or a CLI call failed; carries log tails."""


def stop_processes(procs: Iterable[psutil.Process], sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """Send `sig` to each; whatever is still alive after `grace` seconds is killed."""
    procs = list(procs)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):  # it may end on its own meanwhile
            proc.send_signal(sig)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants; empty if it is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


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
        return process_tree(self.popen.pid)

    def stop(self, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        """Send `sig` to the whole tree; whatever is left after `grace` seconds is killed."""
        stop_processes(self.tree(), sig, grace)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        if self.log_end is None and self.log_path.exists():
            self.log_end = self.log_path.stat().st_size


def wait_until(what: str, condition: Callable[[], Any], timeout: float, poll: float = 0.5) -> Any:
    """The first truthy value of `condition()` within `timeout` s, else ProcessError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(poll)
    raise ProcessError(f"timed out after {timeout:.0f} s waiting for {what}")


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
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
    stop_processes(victims, signal.SIGKILL, grace=10)
    return len(victims)


def exit_on_sigterm(signum: int, _frame: object) -> None:
    """`kill <pid>` then unwinds like Ctrl-C, so what a tool started is stopped."""
    raise SystemExit(128 + signum)

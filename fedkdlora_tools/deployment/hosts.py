"""Hosts on one machine: the `deploy/` scripts, network namespaces, private filesystems."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path


@cache
def deploy_dir() -> Path:
    """The `deploy/` scripts: packed into the wheel as fedkdlora_tools/deploy, else the checkout's.

    Looked up on first use, not at import: the tools import without them.
    """
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "deploy", package.parent / "deploy"):
        if (candidate / "start-supernode.sh").is_file():
            return candidate
    raise FileNotFoundError(f"no deploy/ scripts in {package} or beside it")


# deploy/netns-hosts.sh: the SuperLink's namespace and address, SuperNode i's, and the CLI's side.
NETNS_SUPERLINK = ("fkl-link", "10.77.0.1")
NETNS_CLI_ADDRESS = "10.77.0.254"
NETNS_MAX_SUPERNODES = 9
SUPERLINK_PORT = 9093


def netns_node(index: int) -> tuple[str, str]:
    """(namespace, address) of SuperNode `index` in deploy/netns-hosts.sh."""
    return f"fkl-node{index}", f"10.77.0.1{index}"


def netns_available() -> bool:
    """True where namespaces and veth pairs can be created (root with CAP_NET_ADMIN, `ip` present)."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        return False
    check = subprocess.run([str(deploy_dir() / "netns-hosts.sh"), "check"], capture_output=True, timeout=30)
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

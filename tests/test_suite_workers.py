"""The test tiers' own machinery: `-n 2 --dist loadgroup` must keep a group of tests in one worker.

The tiers' times rest on it: a shared simulation (`client_kd_run`, the FedAvg/FedLoRA `runs`)
is built once only when its users run in one worker. pytest 9.2 with pytest-xdist 3.8 silently
ignores `xdist_group` (xdist renames a test's `_nodeid`, which pytest 9.2 no longer reads), so
every worker builds every shared run again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import REPO

CONFTEST = """
import os
import pytest

@pytest.fixture(scope="session")
def shared():
    with open(os.environ["BUILDS_LOG"], "a") as log:
        log.write(f"{os.getpid()}\\n")
"""

TESTS = """
import time
import pytest

@pytest.mark.xdist_group("shared")
@pytest.mark.parametrize("index", range(4))
def test_uses_shared(shared, index):
    time.sleep(0.2)

@pytest.mark.parametrize("index", range(4))
def test_other(index):
    time.sleep(0.2)
"""


def test_tests_in_one_xdist_group_share_one_worker_and_one_fixture_build(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "test_toy.py").write_text(textwrap.dedent(TESTS))
    builds = tmp_path / "builds.log"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider", "."],
        cwd=tmp_path,
        env={**os.environ, "BUILDS_LOG": str(builds)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    workers = len(set(builds.read_text().split()))
    assert workers == 1, (
        f"a group's session fixture was built in {workers} workers: this pytest ({pytest.__version__}) and "
        "pytest-xdist ignore xdist_group; install the dev extra's pins"
    )


ORDER_PLUGIN = """
def pytest_collection_finish(session):
    with open(__import__("os").environ["ORDER_LOG"], "w") as log:
        for item in session.items:
            group = item.get_closest_marker("xdist_group")
            slow = item.get_closest_marker("slow") is not None
            log.write(f"{group.args[0] if group else '-'} {int(slow)} {item.nodeid}\\n")
"""


def test_the_full_tier_starts_with_the_deployments_then_the_other_slow_tests(tmp_path: Path) -> None:
    """`make test-full` keeps the suite's order: the deployments group (its longest path) must start at
    once, and the other slow tests before the fast ones, or one worker is left with them at the end."""
    (tmp_path / "order_plugin.py").write_text(textwrap.dedent(ORDER_PLUGIN))
    log = tmp_path / "order.log"
    env = {**os.environ, "ORDER_LOG": str(log), "PYTHONPATH": str(tmp_path)}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "--collect-only",
        "-q",
        "-p",
        "order_plugin",
        "-p",
        "no:cacheprovider",
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [line.split(" ", 2) for line in log.read_text().splitlines()]
    kinds = [0 if group == "deployments" else 1 if slow == "1" else 2 for group, slow, _ in rows]
    assert kinds == sorted(kinds), [row[2] for row in rows[: kinds.index(2) + 1]]
    assert kinds[0] == 0 and kinds.count(1) >= 5 and 2 in kinds

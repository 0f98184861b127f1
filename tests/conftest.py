"""Shared fixtures; the helpers tests import by name are in tests/helpers.py."""

from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# The user's home is never read or written: every cache, Hugging Face and Flower folder of this
# process and of every process it starts (Flower, Ray, SuperNodes) lies in a temporary home.
_HOME = Path(tempfile.mkdtemp(prefix="fedkdlora-test-home-"))
for _name, _path in {
    "HOME": _HOME,
    "XDG_CACHE_HOME": _HOME / ".cache",
    "HF_HOME": _HOME / ".cache" / "huggingface",
    "FLWR_HOME": _HOME / ".flwr",
    "MPLCONFIGDIR": _HOME / ".config" / "matplotlib",
}.items():
    os.environ[_name] = str(_path)
# Ray's sessions and its note of the last `ray start` cluster, apart from the machine's /tmp/ray
# (short: Ray's socket paths must fit in 107 characters).
os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="fkray-")
os.environ.pop("HF_DATASETS_CACHE", None)
os.environ.pop("HUGGINGFACE_HUB_CACHE", None)
os.environ.pop("HF_HUB_CACHE", None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slow: deployments and multi-node runs; `make test` leaves them out, `make test-full` runs them",
    )


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `pytest -n 2 --dist loadgroup` (the Makefile's), tests sharing an expensive fixture of
    this suite run in one worker, so it is built once: the users of a session fixture form one
    group, those of a module fixture one group per module. A group a test module names wins."""
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        info = getattr(item, "_fixtureinfo", None)
        scopes = {
            name: defs[-1].scope
            for name, defs in (info.name2fixturedefs.items() if info else [])
            if Path(inspect.getfile(defs[-1].func)).parent == TESTS and name != "test_home"
        }
        session = sorted(name for name, scope in scopes.items() if scope == "session")
        if session:
            item.add_marker(pytest.mark.xdist_group(session[0]))
        elif "module" in scopes.values():
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    items.sort(key=run_order)


def run_order(item: pytest.Item) -> tuple[bool, bool]:
    """Longest first, so that no worker is left with them at the end: the deployments (one group,
    run one after another: the full tier's longest path), then the other `slow` tests, then the
    rest. `make test-full` keeps this order (`--no-loadscope-reorder`); by default pytest-xdist
    reorders groups by their number of tests."""
    group = item.get_closest_marker("xdist_group")
    return (not (group and group.args[0] == "deployments"), item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def test_home() -> Path:
    """The temporary home every test process uses (see above)."""
    return _HOME


@pytest.fixture(scope="session")
def client_kd_run(tmp_path_factory) -> dict:
    """One FedKDLoRA run with client KD (tests/helpers.py `client_kd_overrides`), shared by the
    simulation tests (what a run reports) and the resume tests (what a resumed run must equal)."""
    from tests.helpers import client_kd_overrides, simulate

    code, results = simulate(tmp_path_factory.mktemp("client-kd"), **client_kd_overrides())
    assert code == 0, results and results["run"]["error"]
    return results


@pytest.fixture(autouse=True)
def restore_task_identity():
    """Tests that build Messages by hand set Flower's process-wide task identity; undo it."""
    from flwr.supercore.task_identity import TaskIdentity

    keys = ("_run_id", "_task_id", "_node_id")
    saved = {key: getattr(TaskIdentity, key) for key in keys}
    yield
    for key, value in saved.items():
        setattr(TaskIdentity, key, value)

"""Shared fixtures; the helpers tests import by name are in tests/helpers.py."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

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
os.environ.pop("HF_DATASETS_CACHE", None)
os.environ.pop("HUGGINGFACE_HUB_CACHE", None)
os.environ.pop("HF_HUB_CACHE", None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slow: deployments and multi-node runs; `make test` leaves them out, `make test-full` runs them",
    )


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

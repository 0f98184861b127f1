"""Shared fixtures; the helpers tests import by name are in tests/helpers.py."""

from __future__ import annotations

import pytest

from tests.helpers import GLUE_DIR


@pytest.fixture(scope="session", autouse=True)
def glue_copy_present() -> None:
    if not (GLUE_DIR / "cola" / "train.tsv").is_file():
        pytest.fail(f"tests need the GLUE copy at {GLUE_DIR} (see README)", pytrace=False)


@pytest.fixture(autouse=True)
def restore_task_identity():
    """Tests that build Messages by hand set Flower's process-wide task identity; undo it."""
    from flwr.supercore.task_identity import TaskIdentity

    keys = ("_run_id", "_task_id", "_node_id")
    saved = {key: getattr(TaskIdentity, key) for key in keys}
    yield
    for key, value in saved.items():
        setattr(TaskIdentity, key, value)

"""Shared fixtures: the real GLUE copy beside the repo and the app's default config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedkdlora_app.config import RunConfig, app_defaults

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = REPO.parent / "shared" / "data" / "glue"


def default_run_config() -> dict[str, Any]:
    """`[tool.flwr.app.config]` exactly as pyproject.toml ships it."""
    return app_defaults(REPO)


def make_config(**overrides: Any) -> RunConfig:
    """Defaults with kebab-case overrides, reading the real GLUE copy."""
    values = {**default_run_config(), "data-dir": str(GLUE_DIR), **overrides}
    return RunConfig.from_mapping(values)


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


def train_reply(node_id: int, arrays: ArrayRecord | list[np.ndarray], num_examples: int) -> Message:
    """A client's train reply, built as Flower's simulation builds one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    instruction = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id, message_type="train")
    TaskIdentity.node_id = node_id
    metrics = MetricRecord({"num-examples": num_examples, "train-loss": 0.5, "train-seconds": 1.0})
    record = arrays if isinstance(arrays, ArrayRecord) else ArrayRecord(arrays)
    return Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=instruction)

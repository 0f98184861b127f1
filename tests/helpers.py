"""Helpers the test files share: the GLUE fixture and full copy, configs, hand-built replies, simulations.

Fixtures live in conftest.py; everything a test imports by name lives here, so that no
test file imports from another.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedkdlora_app.config import RunConfig, app_defaults
from fedkdlora_app.results_format import load

REPO = Path(__file__).resolve().parents[1]
# The fixture every test reads unless it is about the full files (tests/data/glue/SOURCES.md).
GLUE_DIR = REPO / "tests" / "data" / "glue"
# The full GLUE copy: $FEDKDLORA_GLUE_DIR, else ../shared/data/glue beside the repository.
FULL_GLUE_DIR = Path(os.environ.get("FEDKDLORA_GLUE_DIR") or REPO.parent / "shared" / "data" / "glue")
needs_full_glue = pytest.mark.skipif(
    not (FULL_GLUE_DIR / "cola" / "train.tsv").is_file(),
    reason=f"needs the full GLUE copy: none at {FULL_GLUE_DIR} (set FEDKDLORA_GLUE_DIR)",
)

ROUNDS = 2
# A short run: the settings the simulation tests share.
QUICK = {
    "task": "cola",
    "num-server-rounds": ROUNDS,
    "max-train-examples-per-client": 32,
    "max-eval-examples": 64,
    "batch-size": 16,
    "progress-interval": 0.0,  # quiet in tests
}


def tiny_model() -> Path:
    """A randomly initialised 6-layer BERT, 32 wide, with the embedded MiniLM's tokenizer, saved once.

    For runs whose test is about the federation (resume, LoRA variants, comparisons), not
    the default model: `student-model` and `teacher-base-model` both take it (the student
    keeps 3 of its layers, as it does of MiniLM), and a run is mostly Flower's own cost.
    """
    folder = Path(os.environ["HOME"]) / "tiny-bert"  # the tests' temporary home (conftest.py)
    if not (folder / "config.json").is_file():
        import torch
        from transformers import BertConfig, BertForSequenceClassification

        from fedkdlora_app.models import load_tokenizer

        tokenizer = load_tokenizer("")
        config = BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=6,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=2,
        )
        torch.manual_seed(0)
        BertForSequenceClassification(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def tiny_models() -> dict[str, str]:
    """Run-config overrides that put the tiny BERT in place of the student's and the teacher's base."""
    return {"student-model": str(tiny_model()), "teacher-base-model": str(tiny_model())}


def client_kd_overrides() -> dict[str, Any]:
    """FedKDLoRA with client KD on the tiny BERT, 3 rounds: the run the simulation and resume tests
    share (`client_kd_run` in conftest.py)."""
    return {
        **QUICK,
        "scheme": "fedkdlora",
        "client-kd": True,
        "num-server-rounds": 3,
        "max-public-examples": 32,
        "teacher-pretrain-epochs": 1,
        **tiny_models(),
    }


def default_run_config() -> dict[str, Any]:
    """`[tool.flwr.app.config]` exactly as pyproject.toml ships it."""
    return app_defaults(REPO)


def make_config(**overrides: Any) -> RunConfig:
    """Defaults with kebab-case overrides, reading the GLUE fixture."""
    values = {**default_run_config(), "data-dir": str(GLUE_DIR), "progress-interval": 0.0, **overrides}
    return RunConfig.from_mapping(values)


def model_message_bytes(**overrides: Any) -> int:
    """Bytes of one model message (train reply or instruction) under `overrides`, from a student built
    here: the figure a run's byte counts must match, computed apart from the run's own record."""
    from fedkdlora_app.bookkeeping import payload_bytes
    from fedkdlora_app.models import build_student, shipped_state
    from fedkdlora_app.wire import to_wire

    config = make_config(**overrides)
    return payload_bytes(to_wire(shipped_state(build_student(config), config), config.wire_dtype))


def teacher_message_bytes(**overrides: Any) -> int:
    """Bytes of the client-KD teacher's weights under `overrides`, from a teacher built here."""
    from fedkdlora_app.bookkeeping import payload_bytes
    from fedkdlora_app.models import load_classifier

    config = make_config(**overrides)
    teacher = load_classifier(config.teacher_base_model, config.num_labels)
    return payload_bytes(ArrayRecord(teacher.state_dict()))


def train_reply(node_id: int, arrays: ArrayRecord | list[np.ndarray], num_examples: int) -> Message:
    """A client's train reply, built as Flower's simulation builds one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    instruction = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id, message_type="train")
    TaskIdentity.node_id = node_id
    metrics = MetricRecord({"num_examples": num_examples, "train_loss": 0.5, "train_seconds": 1.0})
    record = arrays if isinstance(arrays, ArrayRecord) else ArrayRecord(arrays)
    return Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=instruction)


def simulate(results_dir: Path, federation: str = "", **overrides: Any) -> tuple[int, dict[str, Any] | None]:
    """Run the app through `fedkdlora-run` (`federation`: --federation-config), QUICK unless overridden.

    Returns the exit code and the results JSON (None if the run wrote none).
    """
    from fedkdlora_tools import launcher

    values = {**QUICK, "data-dir": str(GLUE_DIR), "results-dir": str(results_dir), **overrides}
    argv = [str(REPO), "--run-config", launcher.format_overrides(values)]
    code = launcher.main(argv + (["--federation-config", federation] if federation else []))
    files = sorted(results_dir.glob("*.json"))
    return code, (load(files[-1]) if files else None)


def comparable_round(entry: dict) -> dict:
    """A round's record less what may differ between two runs of the same config on CPU: seconds,
    where clients ran, and the random node ids (their per-node bytes are kept, as a sorted list)."""

    def keep(value):
        if isinstance(value, dict):
            return {k: keep(v) for k, v in value.items() if "seconds" not in k and k not in ("placement",)}
        return value

    record = keep(entry)
    per_node = record.get("communication", {}).pop("per_node", {})
    record.get("communication", {})["per_node_bytes"] = sorted(
        tuple(sorted(v.items())) for v in per_node.values()
    )
    return record

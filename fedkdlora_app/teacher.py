"""The FedKDLoRA teacher: pre-training on the public slice, saving, loading.

A teacher directory is a `save_pretrained` model + tokenizer plus `fedkdlora_teacher.json`,
which records what it was trained on, so that a run can refuse a teacher that saw other
data than its own public slice (e.g. another task, or the clients' examples).
"""

from __future__ import annotations

import json
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.common.logger import log
from transformers import PreTrainedModel

from fedkdlora_app.atomic import atomic_dir
from fedkdlora_app.config import ConfigError, RunConfig
from fedkdlora_app.data import eval_split, labelled_public, loader_for
from fedkdlora_app.models import (
    EMBEDDED_MODEL_NAME,
    check_same_tokenizer,
    load_classifier,
    load_tokenizer,
)
from fedkdlora_app.progress import phase_progress
from fedkdlora_app.results_format import snake_keys
from fedkdlora_app.training import evaluate, train_epochs

TEACHER_INFO = "fedkdlora_teacher.json"


def pretrain_teacher(config: RunConfig, device: torch.device) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Fully fine-tune `teacher-base-model` on the public slice's labelled share; (teacher, its record)."""
    check_same_tokenizer(config.student_model, config.teacher_base_model, "teacher-base-model")
    teacher = load_classifier(config.teacher_base_model, config.num_labels, attn_implementation="eager")
    public = labelled_public(config)
    loader = loader_for(public, config, shuffle_seed=config.seed)
    epochs = config.teacher_pretrain_epochs
    result = train_epochs(
        teacher,
        loader,
        config.teacher_pretrain_lr,
        epochs,
        device,
        linear_decay=True,
        what="teacher pre-training",
        precision=config.precision,
        progress=phase_progress("teacher pre-training", loader, epochs, config.progress_interval),
    )
    info = {
        "task": config.task,
        "base_model": config.teacher_base_model or EMBEDDED_MODEL_NAME,
        "teacher_data_pct": config.teacher_data_pct,
        "public_labelled_pct": config.public_labelled_pct,
        "public_examples": len(public),
        "epochs": config.teacher_pretrain_epochs,
        "lr": config.teacher_pretrain_lr,
        "seed": config.seed,
        "train_loss": result.mean_loss,
        "train_seconds": result.seconds,
        "dev": evaluate(teacher, loader_for(eval_split(config), config), device, config.precision).metrics(),
    }
    return teacher, info


def load_teacher(config: RunConfig) -> tuple[PreTrainedModel, dict[str, Any]]:
    """A teacher saved by `save_teacher`, checked against this run's task and public slice."""
    check_same_tokenizer(config.student_model, config.teacher_model, "teacher-model")
    info_path = Path(config.teacher_model) / TEACHER_INFO
    # a record written before the results layout became snake_case has kebab-case keys
    info = snake_keys(json.loads(info_path.read_text())) if info_path.is_file() else {}
    for key, expected in (
        ("task", config.task),
        ("teacher-data-pct", config.teacher_data_pct),
        ("public-labelled-pct", config.public_labelled_pct),
    ):
        recorded = info.get(key.replace("-", "_"), expected)
        if recorded != expected:
            raise ConfigError(
                f"run-config key 'teacher-model' = '{config.teacher_model}': pre-trained with {key} "
                f"{recorded!r}, this run has {expected!r}"
            )
    teacher = load_classifier(config.teacher_model, config.num_labels, attn_implementation="eager")
    return teacher, info


def build_teacher(config: RunConfig, device: torch.device) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The run's teacher: `teacher-model` if given, else pre-trained now (and said so)."""
    if config.teacher_model:
        log(INFO, "FedKDLoRA: teacher loaded from %s", config.teacher_model)
        return load_teacher(config)
    log(
        INFO,
        "FedKDLoRA: no teacher-model given, pre-training %s on the public slice for %d epoch(s)",
        config.teacher_base_model or EMBEDDED_MODEL_NAME,
        config.teacher_pretrain_epochs,
    )
    return pretrain_teacher(config, device)


def save_teacher(teacher: PreTrainedModel, info: dict[str, Any], config: RunConfig, out_dir: Path) -> Path:
    tokenizer = load_tokenizer(config.teacher_model or config.teacher_base_model)

    def write(tmp: Path) -> None:
        teacher.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / TEACHER_INFO).write_text(json.dumps(info, indent=2))

    atomic_dir(out_dir, write)
    return out_dir

"""The FedKDLoRA teacher: pre-training on the public slice, saving, loading.

A teacher directory is a `save_pretrained` model + tokenizer plus `fedkdlora_teacher.json`,
which records what it was trained on, so that a run can refuse a teacher that saw other
data than its own public slice (e.g. another task, or the clients' examples).
"""

from __future__ import annotations

import argparse
import json
import sys
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.common.logger import log
from transformers import PreTrainedModel

from fedkdlora_app.atomic import atomic_dir
from fedkdlora_app.config import ConfigError, RunConfig, app_defaults
from fedkdlora_app.data import eval_split, loader_for, public_split
from fedkdlora_app.devices import pick_device
from fedkdlora_app.models import (
    EMBEDDED_MODEL_NAME,
    ModelError,
    check_same_tokenizer,
    load_classifier,
    load_tokenizer,
)
from fedkdlora_app.seeding import seed_everything
from fedkdlora_app.training import evaluate, train_epochs

TEACHER_INFO = "fedkdlora_teacher.json"


def pretrain_teacher(config: RunConfig, device: torch.device) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Fully fine-tune `teacher-base-model` on the public slice; (teacher, what it was trained on)."""
    check_same_tokenizer(config.student_model, config.teacher_base_model, "teacher-base-model")
    teacher = load_classifier(config.teacher_base_model, config.num_labels, attn_implementation="eager")
    public = public_split(config)
    result = train_epochs(
        teacher,
        loader_for(public, config, shuffle_seed=config.seed),
        config.teacher_lr,
        config.teacher_pretrain_epochs,
        device,
        linear_decay=True,
        what="teacher pre-training",
        precision=config.precision,
    )
    info = {
        "task": config.task,
        "base-model": config.teacher_base_model or EMBEDDED_MODEL_NAME,
        "teacher-data-pct": config.teacher_data_pct,
        "public-examples": len(public),
        "epochs": config.teacher_pretrain_epochs,
        "lr": config.teacher_lr,
        "seed": config.seed,
        "train-loss": result.mean_loss,
        "train-seconds": result.seconds,
        "dev": evaluate(teacher, loader_for(eval_split(config), config), device, config.precision).metrics(),
    }
    return teacher, info


def load_teacher(config: RunConfig) -> tuple[PreTrainedModel, dict[str, Any]]:
    """A teacher saved by `save_teacher`, checked against this run's task and public slice."""
    check_same_tokenizer(config.student_model, config.teacher_model, "teacher-model")
    info_path = Path(config.teacher_model) / TEACHER_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    for key, expected in (("task", config.task), ("teacher-data-pct", config.teacher_data_pct)):
        if key in info and info[key] != expected:
            raise ConfigError(
                f"run-config key 'teacher-model' = '{config.teacher_model}': pre-trained with {key} "
                f"{info[key]!r}, this run has {expected!r}"
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fedkdlora-pretrain-teacher",
        description="Fine-tune a FedKDLoRA teacher on the public slice and save it for 'teacher-model'.",
    )
    parser.add_argument("--out", required=True, type=Path, help="directory to write the teacher to")
    parser.add_argument("--app", default=".", type=Path, help="app directory whose run-config gives defaults")
    parser.add_argument("--task")
    parser.add_argument("--data-dir")
    parser.add_argument("--teacher-data-pct", type=float)
    parser.add_argument("--epochs", type=int, dest="teacher_pretrain_epochs")
    parser.add_argument("--lr", type=float, dest="teacher_lr")
    parser.add_argument("--base-model", dest="teacher_base_model")
    parser.add_argument("--max-public-examples", type=int)
    parser.add_argument("--max-eval-examples", type=int)
    parser.add_argument("--seed", type=int)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        values = app_defaults(args.app)
        for name, value in vars(args).items():
            if name not in ("out", "app") and value is not None:
                # `--data-dir ''` is the hub, as in the run-config; a folder is taken from the cwd
                is_folder = name == "data_dir" and value
                values[name.replace("_", "-")] = str(Path(value).resolve()) if is_folder else value
        config = RunConfig.from_mapping({**values, "scheme": "fedkdlora", "teacher-model": ""})
        seed_everything(config.seed)
        teacher, info = pretrain_teacher(config, pick_device())
    except (ConfigError, ModelError, ValueError) as error:
        print(f"fedkdlora-pretrain-teacher: {error}", file=sys.stderr)
        return 2
    save_teacher(teacher, info, config, args.out)
    dev = info["dev"]
    print(
        f"teacher ({info['base-model']}, {info['public-examples']} public {config.task} examples, "
        f"{config.teacher_pretrain_epochs} epoch(s), {info['train-seconds']:.0f} s): dev accuracy "
        f"{dev['accuracy']:.4f}, MCC {dev['mcc']:.4f}, loss {dev['loss']:.4f} -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

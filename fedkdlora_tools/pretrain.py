"""`fedkdlora-pretrain-teacher`: pre-train a FedKDLoRA teacher once, for many runs' `teacher-model`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedkdlora_app.config import RunConfig, app_defaults
from fedkdlora_app.devices import pick_device
from fedkdlora_app.errors import ConfigError, DataError, ModelError
from fedkdlora_app.seeding import seed_everything
from fedkdlora_app.teacher import pretrain_teacher, save_teacher


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
    parser.add_argument("--lr", type=float, dest="teacher_pretrain_lr")
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
    except (ConfigError, DataError, ModelError) as error:  # bad input; anything else is a bug
        print(f"fedkdlora-pretrain-teacher: {error}", file=sys.stderr)
        return 2
    save_teacher(teacher, info, config, args.out)
    dev = info["dev"]
    print(
        f"teacher ({info['base_model']}, {info['public_examples']} public {config.task} examples, "
        f"{config.teacher_pretrain_epochs} epoch(s), {info['train_seconds']:.0f} s): dev accuracy "
        f"{dev['accuracy']:.4f}, MCC {dev['mcc']:.4f}, loss {dev['loss']:.4f} -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

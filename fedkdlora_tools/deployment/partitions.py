"""One SuperNode's own data: the folder its host holds instead of the whole GLUE copy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedkdlora_app.config import RunConfig, app_defaults
from fedkdlora_app.data import PARTITION_FILE, client_eval_shard, client_train_partition, partition_record


def export_partition(config: RunConfig, partition_id: int, num_partitions: int, out_dir: Path) -> Path:
    """Write client `partition_id`'s train examples and eval shard to `out_dir/<task>/`.

    That folder is all its SuperNode's host needs (`start-supernode.sh --data-dir`); the
    ClientApp checks it holds the partition the run assigns, and reads it whole.
    """
    task_dir = Path(out_dir) / config.task
    task_dir.mkdir(parents=True, exist_ok=True)
    for split, dataset in (
        ("train", client_train_partition(config, partition_id, num_partitions)),
        ("dev", client_eval_shard(config, partition_id, num_partitions)),
    ):
        rows = zip(dataset["sentence"], dataset["label"], strict=True)
        if config.task == "cola":  # GLUE CoLA layout: no header; source, label, original label, sentence
            lines = [f"export\t{label}\t\t{sentence}" for sentence, label in rows]
        else:
            lines = ["sentence\tlabel", *(f"{sentence}\t{label}" for sentence, label in rows)]
        (task_dir / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    record = partition_record(config, partition_id, num_partitions)
    (task_dir / PARTITION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return Path(out_dir)


def config_with(overrides: dict[str, Any], app_dir: Path = Path(".")) -> RunConfig:
    """The app's run-config with `overrides`, validated as the ServerApp would."""
    return RunConfig.from_mapping({**app_defaults(app_dir), **overrides})

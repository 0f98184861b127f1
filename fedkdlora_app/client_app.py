"""ClientApp: local training (optionally distilling from a frozen teacher) and evaluation."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from transformers import AutoConfig, AutoModelForSequenceClassification

from fedkdlora_app.atomic import atomic_dir
from fedkdlora_app.config import NodeRun, RunConfig
from fedkdlora_app.data import cached_client_examples, make_loader
from fedkdlora_app.devices import check_precision, pick_device, placement
from fedkdlora_app.lora import fit_rank, frozen_factor, reply_keys
from fedkdlora_app.metrics import EvalCounts
from fedkdlora_app.models import (
    build_student,
    load_classifier,
    load_shipped_state,
    load_tokenizer,
    shipped_state,
    train_factors,
)
from fedkdlora_app.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NO_TEACHER,
    NO_TEACHER_ERROR_CODE,
    NUM_EXAMPLES_KEY,
    PARTITION_ID_KEY,
    PLACEMENT_KEY,
    ROLL_CALL_KEY,
    SERVER_ROUND_KEY,
    TEACHER_ARRAYS_KEY,
    TEACHER_CONFIG_KEY,
    TEACHER_ID_KEY,
)
from fedkdlora_app.seeding import client_seed
from fedkdlora_app.training import (
    TrainResult,
    cross_entropy,
    distil_from,
    evaluate,
    train_epochs,
)
from fedkdlora_app.wire import from_wire, to_wire


def dp_clipping_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `fixedclipping_mod` where the server's DP wrapper asked for client-side clipping.

    The mod itself refuses messages without a clipping norm, so it is applied only to
    train messages that carry one (`dp-clipping = "client"`).
    """
    configs = message.content.config_records.values()
    if message.metadata.message_type == MessageType.TRAIN and any(KEY_CLIPPING_NORM in c for c in configs):
        return fixedclipping_mod(message, context, call_next)
    return call_next(message, context)


app = ClientApp(mods=[dp_clipping_mod])


@lru_cache(maxsize=2)
def cached_student(config: RunConfig) -> torch.nn.Module:
    """One model per process and LoRA rank: every message overwrites all of its shipped weights.

    Two entries, so a simulation worker serving clients of two ranks does not rebuild per message.
    """
    return build_student(config)


def node_run_of(context: Context) -> NodeRun:
    """The run as this node runs it; its own files checked before any work (one-line errors)."""
    return NodeRun.from_node_config(
        RunConfig.from_mapping(context.run_config, check_files=False), context.node_config
    )


def local_train(
    config: RunConfig,
    partition_id: int,
    num_partitions: int,
    server_round: int,
    global_state: dict[str, torch.Tensor],
    teacher: torch.nn.Module | None = None,
) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """One client's round of work, without Flower: the ClientApp and `bench/` both call it.

    `config.lora_r` is this client's rank; the global state is fitted to it first. The
    returned state is the reply: the shipped state less what this round keeps fixed.
    """
    model = cached_student(config)
    load_shipped_state(model, fit_rank(global_state, config.lora_r, config.lora_alpha), config)
    frozen = frozen_factor(config.lora_aggregation, config.lora_freeze_a, server_round)
    train_factors(model, frozen)
    examples = cached_client_examples(config, partition_id, num_partitions, "train")
    # Seed after the (cached or first-time) model build, so dropout draws the same either way.
    seed = client_seed(config.seed, server_round, partition_id)
    torch.manual_seed(seed)
    loader = make_loader(
        examples,
        load_tokenizer(config.student_model),
        config.batch_size,
        shuffle_seed=seed,
        length_grouped=config.length_grouped_batches,
    )
    device = client_device(config)
    objective = cross_entropy
    if teacher is not None:
        objective = distil_from(teacher.to(device), config.kd_alpha, config.kd_temperature)
    result = train_epochs(
        model,
        loader,
        config.client_learning_rate,
        config.local_epochs,
        device,
        objective,
        what="local training",
        precision=config.precision,
    )
    state = shipped_state(model, config)
    return {key: state[key] for key in reply_keys(state, frozen)}, result


def local_evaluate(
    config: RunConfig, partition_id: int, num_partitions: int, global_state: dict[str, torch.Tensor]
) -> EvalCounts:
    """The global model (fitted to this client's rank) on this client's shard of the evaluation set."""
    model = cached_student(config)
    load_shipped_state(model, fit_rank(global_state, config.lora_r, config.lora_alpha), config)
    examples = cached_client_examples(config, partition_id, num_partitions, "eval")
    loader = make_loader(examples, load_tokenizer(config.student_model), config.batch_size)
    return evaluate(model, loader, client_device(config), config.precision)


def client_device(config: RunConfig) -> torch.device:
    """The device this client was given, checked against the run's `precision`."""
    device = pick_device()
    check_precision(config.precision, device)
    return device


@lru_cache(maxsize=1)
def _teacher_from_path(path: str, num_labels: int) -> torch.nn.Module:
    return load_classifier(path, num_labels).eval().requires_grad_(False)


def teacher_cache(node: NodeRun) -> Path:
    """Where this node keeps shipped client-KD teachers: node config `cache-dir`, else the user's cache."""
    if node.cache_dir:
        return Path(node.cache_dir)
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return user_cache / "fedkdlora" / "client-kd-teachers"


def keep_shipped_teacher(content: RecordDict, folder: Path, keep: int = 2) -> None:
    """Write the teacher a message carries to `folder` (a model directory), once; prune older ones.

    On the node's disk it outlives the ClientApp process and a SuperNode restart, and
    it no longer travels in `context.state` between SuperNode and ClientApp per message.
    """
    if (folder / "config.json").is_file():
        return
    model_config = AutoConfig.for_model(**json.loads(content[TEACHER_CONFIG_KEY]["model-config"]))
    teacher = AutoModelForSequenceClassification.from_config(model_config)
    teacher.load_state_dict(content[TEACHER_ARRAYS_KEY].to_torch_state_dict(), strict=True)
    atomic_dir(folder, teacher.save_pretrained, keep_existing=True)
    kept = sorted(folder.parent.glob("*/config.json"), key=lambda f: f.stat().st_mtime, reverse=True)
    for stale in kept[keep:]:
        shutil.rmtree(stale.parent, ignore_errors=True)


class NoTeacherError(RuntimeError):
    """This node has no client-KD teacher: answered with an error reply the server acts on."""


def frozen_teacher(message: Message, node: NodeRun) -> torch.nn.Module:
    """The node's `teacher-path` if its node config has one, else the copy the server shipped.

    The server ships the teacher with a node's train messages until the node has replied
    to one; the node keeps it in its cache, keyed by the teacher id every train message
    carries. A node that lost it (e.g. a new disk) says so, and the server ships it again.
    """
    if node.teacher_path:
        return _teacher_from_path(node.teacher_path, node.config.num_labels)
    teacher_id = str(message.content.config_records[CONFIG_KEY].get(TEACHER_ID_KEY, ""))
    folder = teacher_cache(node) / re.sub(r"[^A-Za-z0-9._-]+", "-", teacher_id)
    if TEACHER_ARRAYS_KEY in message.content:
        keep_shipped_teacher(message.content, folder)
    if not teacher_id or not (folder / "config.json").is_file():
        raise NoTeacherError(
            f"client-kd = true but this node {NO_TEACHER} '{teacher_id}' (none in this message, none in "
            f"{folder}): the server ships it again with the next train message, or set node config "
            "'teacher-path'"
        )
    return _teacher_from_path(str(folder), node.config.num_labels)


def _global_state(message: Message, config: RunConfig) -> dict[str, torch.Tensor]:
    return from_wire(message.content.array_records[ARRAYS_KEY], config.wire_dtype)


@app.train()
def train(message: Message, context: Context) -> Message:
    started = time.time()
    node = node_run_of(context)
    config = node.config
    server_round = int(message.content.config_records[CONFIG_KEY][SERVER_ROUND_KEY])
    try:
        teacher = frozen_teacher(message, node) if config.client_kd else None
    except NoTeacherError as error:
        return Message(Error(code=NO_TEACHER_ERROR_CODE, reason=f"NoTeacherError: {error}"), reply_to=message)
    state, result = local_train(
        config, node.partition_id, node.num_partitions, server_round, _global_state(message, config), teacher
    )
    metrics = MetricRecord(
        {
            NUM_EXAMPLES_KEY: result.dataset_size,
            "train_loss": result.mean_loss,
            "train_seconds": result.seconds,
            "train_examples_seen": result.examples_seen,
        }
    )
    content = RecordDict(
        {
            ARRAYS_KEY: to_wire(state, config.wire_dtype),
            METRICS_KEY: metrics,
            PLACEMENT_KEY: ConfigRecord(placement(client_device(config), started)),
        }
    )
    return Message(content=content, reply_to=message)


@app.evaluate()
def evaluate_global_model(message: Message, context: Context) -> Message:
    started = time.time()
    node = node_run_of(context)
    global_state = _global_state(message, node.config)
    counts = local_evaluate(node.config, node.partition_id, node.num_partitions, global_state)
    content = RecordDict(
        {
            "metrics": MetricRecord(counts.metrics()),
            PLACEMENT_KEY: ConfigRecord(placement(client_device(node.config), started)),
        }
    )
    return Message(content=content, reply_to=message)


@app.query()
def answer_roll_call(message: Message, context: Context) -> Message:
    """The node's partition id, so the server samples clients by partition (`sampling.py`).

    Its files are checked here too: a node misconfigured for this run says so before round 1.
    """
    partition = MetricRecord({PARTITION_ID_KEY: node_run_of(context).partition_id})
    return Message(RecordDict({ROLL_CALL_KEY: partition}), reply_to=message)

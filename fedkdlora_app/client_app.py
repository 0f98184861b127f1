"""ClientApp: local training (optionally distilling from a frozen teacher) and evaluation."""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache

import torch
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from transformers import AutoConfig, AutoModelForSequenceClassification

from fedkdlora_app.aggregation import fit_rank
from fedkdlora_app.config import RunConfig
from fedkdlora_app.data import cached_client_examples, make_loader
from fedkdlora_app.distillation import TEACHER_ARRAYS_KEY, TEACHER_CONFIG_KEY
from fedkdlora_app.metrics import EvalCounts
from fedkdlora_app.models import (
    build_student,
    load_classifier,
    load_shipped_state,
    load_tokenizer,
    shipped_state,
)
from fedkdlora_app.seeding import client_seed
from fedkdlora_app.training import (
    TrainResult,
    cross_entropy,
    distil_from,
    evaluate,
    pick_device,
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


def partition_of(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config (set by simulation or `--node-config`)."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as error:
        raise KeyError(
            f"node config lacks {error}: start the SuperNode with --node-config "
            "'partition-id=<i> num-partitions=<n>'"
        ) from error


def node_config_of(config: RunConfig, context: Context) -> tuple[RunConfig, int, int]:
    """(the run config as this node runs it: its own data-dir and LoRA rank, partition-id, num-partitions)."""
    partition_id, num_partitions = partition_of(context)
    if "data-dir" in context.node_config:  # this host's data (start-supernode.sh --data-dir) wins
        config = dataclasses.replace(config, data_dir=str(context.node_config["data-dir"]))
    if config.uses_lora:
        config = dataclasses.replace(config, lora_r=config.client_rank(partition_id, context.node_config))
    return config, partition_id, num_partitions


def local_train(
    config: RunConfig,
    partition_id: int,
    num_partitions: int,
    server_round: int,
    global_state: dict[str, torch.Tensor],
    teacher: torch.nn.Module | None = None,
) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """One client's round of work, without Flower: the ClientApp and `bench/` both call it.

    `config.lora_r` is this client's rank; the global state is fitted to it first.
    """
    model = cached_student(config)
    load_shipped_state(model, fit_rank(global_state, config.lora_r, config.lora_alpha), config)
    examples = cached_client_examples(config, partition_id, num_partitions, "train")
    # Seed after the (cached or first-time) model build, so dropout draws the same either way.
    seed = client_seed(config.seed, server_round, partition_id)
    torch.manual_seed(seed)
    loader = make_loader(examples, load_tokenizer(config.student_model), config.batch_size, shuffle_seed=seed)
    device = pick_device()
    objective = cross_entropy
    if teacher is not None:
        objective = distil_from(teacher.to(device), config.kd_alpha, config.kd_temperature)
    result = train_epochs(
        model, loader, config.learning_rate, config.local_epochs, device, objective, what="local training"
    )
    return shipped_state(model, config), result


def local_evaluate(
    config: RunConfig, partition_id: int, num_partitions: int, global_state: dict[str, torch.Tensor]
) -> EvalCounts:
    """The global model (fitted to this client's rank) on this client's shard of the evaluation set."""
    model = cached_student(config)
    load_shipped_state(model, fit_rank(global_state, config.lora_r, config.lora_alpha), config)
    examples = cached_client_examples(config, partition_id, num_partitions, "eval")
    loader = make_loader(examples, load_tokenizer(config.student_model), config.batch_size)
    return evaluate(model, loader, pick_device())


@lru_cache(maxsize=1)
def _teacher_from_path(path: str, num_labels: int) -> torch.nn.Module:
    return load_classifier(path, num_labels).eval().requires_grad_(False)


_shipped_teachers: dict[str, torch.nn.Module] = {}


def _teacher_from_state(state: RecordDict) -> torch.nn.Module:
    """Built once per process and run (keyed on the id the server gave it)."""
    teacher_id = str(state[TEACHER_CONFIG_KEY]["id"])
    if teacher_id not in _shipped_teachers:
        _shipped_teachers.clear()  # one run's teacher at a time
        model_config = AutoConfig.for_model(**json.loads(state[TEACHER_CONFIG_KEY]["model-config"]))
        teacher = AutoModelForSequenceClassification.from_config(model_config)
        teacher.load_state_dict(state[TEACHER_ARRAYS_KEY].to_torch_state_dict(), strict=True)
        _shipped_teachers[teacher_id] = teacher.eval().requires_grad_(False)
    return _shipped_teachers[teacher_id]


def frozen_teacher(message: Message, context: Context, config: RunConfig) -> torch.nn.Module:
    """The node's `teacher-path` if its node config has one, else the copy the server shipped once.

    The shipped copy is kept in `context.state`, which the node keeps across rounds.
    """
    if "teacher-path" in context.node_config:
        return _teacher_from_path(str(context.node_config["teacher-path"]), config.num_labels)
    for key in (TEACHER_ARRAYS_KEY, TEACHER_CONFIG_KEY):
        if key in message.content:
            context.state[key] = message.content[key]
    if TEACHER_CONFIG_KEY not in context.state:
        raise RuntimeError(
            "client-kd = true but this node has no teacher: the server ships it with a node's first "
            "train message, or set 'teacher-path' in the node config"
        )
    return _teacher_from_state(context.state)


def _global_state(message: Message, config: RunConfig) -> dict[str, torch.Tensor]:
    return from_wire(message.content.array_records["arrays"], config.wire_dtype)


@app.train()
def train(message: Message, context: Context) -> Message:
    config, partition_id, num_partitions = node_config_of(
        RunConfig.from_mapping(context.run_config, on_server=False), context
    )
    server_round = int(message.content.config_records["config"]["server-round"])
    teacher = frozen_teacher(message, context, config) if config.client_kd else None
    state, result = local_train(
        config, partition_id, num_partitions, server_round, _global_state(message, config), teacher
    )
    metrics = MetricRecord(
        {"num-examples": result.num_examples, "train-loss": result.mean_loss, "train-seconds": result.seconds}
    )
    content = RecordDict({"arrays": to_wire(state, config.wire_dtype), "metrics": metrics})
    return Message(content=content, reply_to=message)


@app.evaluate()
def evaluate_global_model(message: Message, context: Context) -> Message:
    config, partition_id, num_partitions = node_config_of(
        RunConfig.from_mapping(context.run_config, on_server=False), context
    )
    counts = local_evaluate(config, partition_id, num_partitions, _global_state(message, config))
    return Message(content=RecordDict({"metrics": MetricRecord(counts.metrics())}), reply_to=message)

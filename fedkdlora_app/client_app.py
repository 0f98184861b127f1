"""ClientApp: local training and evaluation on this node's partition."""

from __future__ import annotations

from functools import lru_cache

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedkdlora_app.config import RunConfig
from fedkdlora_app.data import cached_client_examples, make_loader
from fedkdlora_app.models import build_student, load_shipped_state, load_tokenizer, shipped_state
from fedkdlora_app.seeding import client_seed
from fedkdlora_app.training import evaluate, pick_device, train_epochs

app = ClientApp()


@lru_cache(maxsize=1)
def cached_student(config: RunConfig) -> torch.nn.Module:
    """One model per process: every message overwrites all of its shipped weights."""
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


def _received_model(message: Message, config: RunConfig) -> torch.nn.Module:
    model = cached_student(config)
    load_shipped_state(model, message.content.array_records["arrays"].to_torch_state_dict(), config)
    return model


@app.train()
def train(message: Message, context: Context) -> Message:
    config = RunConfig.from_mapping(context.run_config)
    partition_id, num_partitions = partition_of(context)
    server_round = int(message.content.config_records["config"]["server-round"])
    seed = client_seed(config.seed, server_round, partition_id)
    torch.manual_seed(seed)
    model = _received_model(message, config)
    examples = cached_client_examples(config, partition_id, num_partitions, "train")
    loader = make_loader(examples, load_tokenizer(config.student_model), config.batch_size, shuffle_seed=seed)
    result = train_epochs(model, loader, config.learning_rate, config.local_epochs, pick_device())
    metrics = MetricRecord(
        {"num-examples": result.num_examples, "train-loss": result.mean_loss, "train-seconds": result.seconds}
    )
    content = RecordDict({"arrays": ArrayRecord(shipped_state(model, config)), "metrics": metrics})
    return Message(content=content, reply_to=message)


@app.evaluate()
def evaluate_global_model(message: Message, context: Context) -> Message:
    config = RunConfig.from_mapping(context.run_config)
    partition_id, num_partitions = partition_of(context)
    model = _received_model(message, config)
    examples = cached_client_examples(config, partition_id, num_partitions, "eval")
    loader = make_loader(examples, load_tokenizer(config.student_model), config.batch_size)
    counts = evaluate(model, loader, pick_device())
    return Message(content=RecordDict({"metrics": MetricRecord(counts.metrics())}), reply_to=message)

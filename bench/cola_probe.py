"""Prepared GPU probe: can the offline default student learn CoLA, and with which settings?

Issue 12 item 6. A settings sweep on full CoLA is hours on 2 CPU cores and seconds per
setting on one GPU, but the GPU machine has no flwr, ray or datasets. So this probe reuses
the app's own model and training code (`models.load_classifier`, `models.lora_config`,
`training.train_epochs`, `training.evaluate`) and replaces only what needs the missing
packages: the TSV is read with pandas, and a round of FedLoRA / FedAvg is emulated as
"each of 4 contiguous shards trains one local epoch from the global state, then the
example-weighted mean of the shipped state" (the app's `partitioning = "contiguous"` layout and
naive aggregation). Its figures choose settings; the app's own runs on CPU confirm them.

    python bench/cola_probe.py --model DIR --glue DIR --out probe.jsonl [--rounds 10]
    python bench/cola_probe.py --model DIR --glue DIR --out schemes.jsonl --schemes --seeds 42 43 44

DIR of --model: all-MiniLM-L6-v2 (any dtype; loaded as float32). One JSON line per round
per setting, written as it goes, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from peft import get_peft_model
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpu_check import run_config  # noqa: E402  (bench/ is the script's folder: sys.path[0])

from fedkdlora_app.config import RunConfig  # noqa: E402
from fedkdlora_app.models import (  # noqa: E402
    load_classifier,
    load_shipped_state,
    lora_config,
    shipped_state,
)
from fedkdlora_app.training import evaluate, mutual_distill, train_epochs  # noqa: E402

ALL_LINEAR = "query,key,value,attention.output.dense,intermediate.dense,output.dense"
# name -> (run-config overrides, federated clients: 0 = centralized, the whole client pool on one node)
SETTINGS: dict[str, tuple[dict, int]] = {
    "central lora q,v r8 lr2e-3 (default)": ({}, 0),
    "central lora q,v r8 lr5e-3": ({"lora_client_lr": 5e-3}, 0),
    "central lora all-linear r8 lr2e-3": ({"lora_target_modules": ALL_LINEAR}, 0),
    "central lora all-linear r16 lr1e-3": (
        {"lora_target_modules": ALL_LINEAR, "lora_r": 16, "lora_client_lr": 1e-3}, 0),
    "central lora q,v r8 lr2e-3 6 layers": ({"student_layers": 0}, 0),
    "central full lr5e-5 (fedavg)": ({"scheme": "fedavg"}, 0),
    "fed4 lora q,v r8 lr2e-3 (default)": ({}, 4),
    "fed4 lora all-linear r8 lr2e-3": ({"lora_target_modules": ALL_LINEAR}, 4),
    "fed4 full lr5e-5 (fedavg)": ({"scheme": "fedavg"}, 4),
    "teacher 6 layers full lr1e-4 on public": (
        {"scheme": "fedavg", "student_layers": 0, "client_lr": 1e-4}, -1),
}  # fmt: skip
# --schemes: the four rows of a scheme comparison, at the app's defaults (fed4 = 4 clients).
SCHEMES: dict[str, tuple[dict, int]] = {
    "fedavg": ({"scheme": "fedavg"}, 4),
    "fedlora": ({}, 4),
    "fedkdlora": ({"scheme": "fedkdlora"}, 4),
    "centralized (fedlora)": ({}, 0),
}


def read_cola(path: Path) -> tuple[list[str], list[int]]:
    frame = pd.read_csv(path, sep="\t", header=None, names=["source", "label", "orig", "sentence"], quoting=3)
    return frame["sentence"].astype(str).tolist(), frame["label"].astype(int).tolist()


def tensors(tokenizer, sentences: list[str], labels: list[int], max_len: int) -> TensorDataset:
    enc = tokenizer(sentences, truncation=True, max_length=max_len, padding="max_length", return_tensors="pt")
    return TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(labels))


class DictLoader:
    """A DataLoader over a TensorDataset yielding the app's batch dicts."""

    def __init__(self, dataset: TensorDataset, batch: int, shuffle: bool, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.loader = DataLoader(dataset, batch_size=batch, shuffle=shuffle, generator=generator)
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for ids, mask, labels in self.loader:
            yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build(config: RunConfig, model_dir: str) -> torch.nn.Module:
    torch.manual_seed(config.seed)
    model = load_classifier(model_dir, 2, config.student_layers).float()  # weights may be stored in float16
    if config.uses_lora:
        model = get_peft_model(model, lora_config(config, model.config.model_type))
    return model


def pretrained_teacher(
    config: RunConfig, model_dir: str, public: TensorDataset, device: torch.device
) -> torch.nn.Module:
    """All 6 layers, fully fine-tuned on the public slice, as `teacher.pretrain_teacher` does."""
    torch.manual_seed(config.seed)
    teacher = load_classifier(model_dir, 2).float().to(device)
    loader = DictLoader(public, config.batch_size, True, config.seed)
    train_epochs(
        teacher, loader, config.teacher_pretrain_lr, config.teacher_pretrain_epochs, device, linear_decay=True
    )
    return teacher


def server_step(
    config: RunConfig,
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    public: TensorDataset,
    round_: int,
    device: torch.device,
) -> None:
    """Teacher alone, then teacher + student mutually, on the public slice (the app's functions)."""
    loader = DictLoader(public, config.batch_size, True, config.seed + round_)
    train_epochs(teacher, loader, config.distill_teacher_lr, config.teacher_epochs, device, linear_decay=True)
    mutual_distill(
        student,
        teacher,
        loader,
        config.distill_student_lr,
        config.distill_teacher_lr,
        config.kd_epochs,
        device,
        "probe",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--glue", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--only", nargs="*", help="setting names to run (default all)")
    parser.add_argument(
        "--schemes",
        action="store_true",
        help="the scheme comparison (FedAvg, FedLoRA, FedKDLoRA with its server step, centralized) instead",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument(
        "--smoke", action="store_true", help="64 examples per split: checks the script on CPU"
    )
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = replace(run_config(), task="cola", scheme="fedlora")
    sentences, labels = read_cola(args.glue / "cola" / "train.tsv")
    dev_sentences, dev_labels = read_cola(args.glue / "cola" / "dev.tsv")
    if args.smoke:
        sentences, labels, dev_sentences, dev_labels = (
            sentences[:320],
            labels[:320],
            dev_sentences[:64],
            dev_labels[:64],
        )
    public_n = int(len(sentences) * base.teacher_data_pct / 100)
    pool = tensors(tokenizer, sentences[public_n:], labels[public_n:], base.max_seq_length)
    public = tensors(tokenizer, sentences[:public_n], labels[:public_n], base.max_seq_length)
    dev = DictLoader(tensors(tokenizer, dev_sentences, dev_labels, base.max_seq_length), 128, False, 0)
    print(
        f"cola: public {len(public)}, client pool {len(pool)}, dev {len(dev.dataset)}, device {device}",
        flush=True,
    )
    settings = SCHEMES if args.schemes else SETTINGS
    plan = [(seed, name) for seed in args.seeds for name in settings if not args.only or name in args.only]
    with args.out.open("a") as out:
        for seed, name in plan:
            overrides, clients = settings[name]
            config = replace(base, **overrides, seed=seed)
            lr = config.lora_client_lr if config.uses_lora else config.client_lr
            model = build(config, args.model).to(device)
            if clients > 0:
                bounds = [i * len(pool) // clients for i in range(clients + 1)]
                shards = [torch.utils.data.Subset(pool, range(a, b)) for a, b in itertools.pairwise(bounds)]
            else:
                shards = [public if clients < 0 else pool]
            start = time.perf_counter()
            teacher = pretrained_teacher(config, args.model, public, device) if config.uses_teacher else None
            for round_ in range(1, args.rounds + 1):
                global_state = shipped_state(model, config)
                states, sizes = [], []
                for i, shard in enumerate(shards):
                    load_shipped_state(model, global_state, config)
                    loader = DictLoader(shard, config.batch_size, True, config.seed + 1000 * round_ + i)
                    train_epochs(model, loader, lr, config.local_epochs, device)
                    states.append(shipped_state(model, config))
                    sizes.append(len(shard))
                if len(states) > 1:
                    total = sum(sizes)
                    mean = {
                        k: sum(s[k].float() * n for s, n in zip(states, sizes, strict=True)) / total
                        for k in states[0]
                    }
                    load_shipped_state(model, {k: v.to(states[0][k].dtype) for k, v in mean.items()}, config)
                if teacher is not None:  # the server step, as ServerDistillation.after_aggregate runs it
                    server_step(config, model, teacher, public, round_, device)
                counts = evaluate(model, dev, device)
                scores = counts.metrics()
                line = {"setting": name, "seed": seed, "round": round_}
                line |= {key: scores[key] for key in ("accuracy", "mcc", "loss")}
                if teacher is not None:
                    line["teacher_mcc"] = evaluate(teacher, dev, device).metrics()["mcc"]
                line["seconds"] = round(time.perf_counter() - start, 1)
                out.write(json.dumps(line) + "\n")
                out.flush()
                print(
                    f"{name:38s} seed {seed} round {round_:2d}: acc {line['accuracy']:.4f} "
                    f"mcc {line['mcc']:+.4f} {line['seconds']:.0f} s",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

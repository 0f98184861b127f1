"""Prepared GPU check: throughput and peak memory of the project's own training code, on one GPU.

What 0.25-GPU packing and `precision = "bfloat16"` buy, measured with the functions the
ClientApp and the ServerApp run (`training.train_epochs`, `training.mutual_distill`,
`models.lora_config`), on models of the embedded MiniLM's architecture built from its
config with random weights (speed needs no pretrained weights, and the GPU machine has
neither the MiniLM package nor the hub):

- local training, LoRA (FedLoRA/FedKDLoRA client) and full fine-tuning (FedAvg client);
- the FedKDLoRA server step: the teacher alone, then teacher + student mutually;
- each in float32 and bfloat16 (autocast; CUDA only);
- 1 vs 4 client processes training LoRA on the same GPU at once (torch multiprocessing):
  what 4 ClientApps at `client-resources-num-gpus = 0.25` do.

Needs torch, transformers, peft and this repository (no flwr, ray or datasets):

    python bench/gpu_check.py --out gpu_check.json          # one GPU: a few minutes
    python bench/gpu_check.py --cpu --out gpu_check.json    # smoke run on CPU (about a minute)

Prints one line per measurement and writes them all to --out (JSON). The figures and
the machine they came from go into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from peft import get_peft_model
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedkdlora_app.config import RunConfig  # noqa: E402
from fedkdlora_app.models import keep_layers, lora_config, strided_layer_indices  # noqa: E402
from fedkdlora_app.training import mutual_distill, train_epochs  # noqa: E402

# all-MiniLM-L6-v2's architecture (BERT, uncased 30,522 vocab); the student keeps 3 of its 6 layers.
MINILM = {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
          "intermediate_size": 1536, "max_position_embeddings": 512, "num_labels": 2}  # fmt: skip
SIZES = {"gpu": {"examples": 2048, "seq": 128, "batch": 32}, "cpu": {"examples": 32, "seq": 32, "batch": 16}}


def run_config() -> RunConfig:
    """The app's defaults from pyproject.toml, read without Flower."""
    with (REPO / "pyproject.toml").open("rb") as file:
        values = tomllib.load(file)["tool"]["flwr"]["app"]["config"]
    return RunConfig.from_mapping(values, check_files=False)


def classifier(layers: int, eager: bool = False) -> torch.nn.Module:
    """A MiniLM-shaped classifier with random weights, strided to `layers` as the student is."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(**MINILM, attn_implementation="eager" if eager else "sdpa")
    )
    if layers < MINILM["num_hidden_layers"]:
        keep_layers(model, strided_layer_indices(MINILM["num_hidden_layers"], layers))
    return model


def student(config: RunConfig, lora: bool, eager: bool = False) -> torch.nn.Module:
    model = classifier(config.student_layers, eager)
    return get_peft_model(model, lora_config(config, model.config.model_type)) if lora else model


def synthetic_loader(size: dict[str, int], seed: int = 0) -> DataLoader:
    """Random token ids of a fixed length: the same work per example on every device."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, MINILM["vocab_size"], (size["examples"], size["seq"]), generator=generator)
    labels = torch.randint(0, 2, (size["examples"],), generator=generator)
    rows = [
        {"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y}
        for i, y in zip(ids, labels, strict=True)
    ]
    return DataLoader(rows, batch_size=size["batch"], shuffle=False)


def measured(device: torch.device, work: Any) -> tuple[float, int]:
    """(seconds, peak accelerator bytes) of `work()`, after one untimed warm-up call."""
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return time.perf_counter() - started, int(peak)


def local_training(config: RunConfig, device: torch.device, size: dict, precision: str, lora: bool) -> dict:
    model, loader = student(config, lora), synthetic_loader(size)
    lr = config.lora_client_lr if lora else config.client_lr

    def work() -> None:
        train_epochs(model, loader, lr, 1, device, what="gpu check", precision=precision)

    seconds, peak = measured(device, work)
    return {"examples_per_s": size["examples"] / seconds, "peak_bytes": peak, "seconds": seconds}


def server_step(config: RunConfig, device: torch.device, size: dict, precision: str) -> dict:
    """The FedKDLoRA server step as `ServerDistillation.after_aggregate` runs it."""
    teacher, kd_student, loader = (
        classifier(6, eager=True),
        student(config, True, eager=True),
        synthetic_loader(size),
    )

    def work() -> None:
        train_epochs(
            teacher, loader, config.distill_teacher_lr, 1, device, linear_decay=True, precision=precision
        )
        mutual_distill(
            kd_student,
            teacher,
            loader,
            config.distill_student_lr,
            config.distill_teacher_lr,
            1,
            device,
            "gpu check",
            precision,
        )

    seconds, peak = measured(device, work)
    return {"examples_per_s": size["examples"] / seconds, "peak_bytes": peak, "seconds": seconds}


def _client_process(rank: int, barrier: Any, results: Any, device_name: str, size: dict) -> None:
    config, device = run_config(), torch.device(device_name)
    model, loader = student(config, True), synthetic_loader(size, seed=rank)
    train_epochs(model, loader, config.lora_client_lr, 1, device)  # warm-up
    barrier.wait(timeout=600)
    started = time.perf_counter()
    train_epochs(model, loader, config.lora_client_lr, 1, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    results.put((rank, started, time.perf_counter()))


def shared_device(device: torch.device, size: dict, processes: int) -> dict:
    """`processes` LoRA clients training at once on one device: their summed examples/s."""
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(target=_client_process, args=(rank, barrier, results, str(device), size))
        for rank in range(processes)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=900)
    if any(worker.exitcode != 0 for worker in workers):
        raise RuntimeError(f"client processes ended with {[worker.exitcode for worker in workers]}")
    spans = [results.get(timeout=10) for _ in workers]
    wall = max(end for _, _, end in spans) - min(start for _, start, _ in spans)
    return {"processes": processes, "examples_per_s": processes * size["examples"] / wall, "seconds": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="smoke run on the CPU with small sizes")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the measurements")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --cpu for a smoke run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    size = SIZES["cpu" if args.cpu else "gpu"]
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    config = run_config()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "sizes": size,
        "measurements": [],
    }
    for precision in ("float32", "bfloat16") if bf16 else ("float32",):
        for what, measure in (
            ("local training, LoRA", lambda p: local_training(config, device, size, p, lora=True)),
            ("local training, full", lambda p: local_training(config, device, size, p, lora=False)),
            ("server step (teacher + mutual KD)", lambda p: server_step(config, device, size, p)),
        ):
            row = {"what": what, "precision": precision, **measure(precision)}
            report["measurements"].append(row)
            print(
                f"{what:36s} {precision:8s} {row['examples_per_s']:9.1f} ex/s  "
                f"peak {row['peak_bytes'] / 2**20:8.1f} MiB",
                flush=True,
            )
    for processes in (1, 4):
        row = {
            "what": "LoRA clients sharing one device",
            "precision": "float32",
            **shared_device(device, size, processes),
        }
        report["measurements"].append(row)
        print(
            f"{processes} LoRA client process(es) on one {device.type}: "
            f"{row['examples_per_s']:9.1f} ex/s in all",
            flush=True,
        )
    args.out.write_text(json.dumps(report, indent=2))
    print(f"gpu_check: {len(report['measurements'])} measurements -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Eager vs SDPA attention for the server's phases that need no attention maps (issue 14).

The mutual phase needs eager attention (SDPA returns no maps); the teacher-alone phase,
evaluation and teacher pre-training do not. This times the project's `train_epochs` and
`evaluate` on the real public slice with the embedded 6-layer MiniLM teacher, the two
kernels interleaved (A B A B ...) so that a machine's drift hits both alike:

    python bench/attention_kernels.py --examples 256 --repeats 3 --out attention.json
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ab_timing import arguments, interleaved, publish, report  # noqa: E402  (bench/ is the script's folder: sys.path[0])
from gpu_check import run_config  # noqa: E402

from fedkdlora_app.data import eval_split, loader_for, public_slice  # noqa: E402
from fedkdlora_app.models import load_classifier  # noqa: E402
from fedkdlora_app.training import evaluate, train_epochs  # noqa: E402

CPU = torch.device("cpu")


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, examples=256)
    args = parser.parse_args(argv)
    config = replace(
        run_config(),
        task="sst2",
        data_dir=args.data_dir,
        max_public_examples=args.examples,
        max_eval_examples=args.examples,
    )
    train_loader = loader_for(public_slice(config), config, shuffle_seed=config.seed)
    eval_loader = loader_for(eval_split(config), config)

    def passes(kernel: str) -> dict[str, float]:
        torch.manual_seed(0)
        model = load_classifier("", 2, attn_implementation=kernel)
        started = time.perf_counter()
        train_epochs(model, train_loader, config.distill_teacher_lr, 1, CPU, linear_decay=True)
        trained = time.perf_counter()
        evaluate(model, eval_loader, CPU)
        return {"train": trained - started, "evaluate": time.perf_counter() - trained}

    times = interleaved({"eager": lambda: passes("eager"), "sdpa": lambda: passes("sdpa")}, args.repeats)
    publish(report(times, "eager", "sdpa", examples=args.examples), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

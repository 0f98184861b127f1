"""Random vs length-grouped batches, file-order vs length-sorted evaluation (issue 14).

Times the project's own passes on the real public slice, with the embedded MiniLM
teacher (6 layers) and the default student (3 layers + LoRA): the teacher-alone phase
(`train_epochs`), the mutual phase (`mutual_distill`), a LoRA client's local training
and server evaluation on dev. Each pass runs plain then grouped, interleaved (A B A B)
so that a machine's drift hits both alike; the models are rebuilt before every pass:

    python bench/length_grouping.py --task sst2 --examples 500 --repeats 3 --out grouping.json
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ab_timing import arguments, interleaved, publish, report  # noqa: E402  (bench/ is the script's folder: sys.path[0])
from gpu_check import run_config  # noqa: E402

from fedkdlora_app.config import RunConfig  # noqa: E402
from fedkdlora_app.data import eval_split, loader_for, public_slice  # noqa: E402
from fedkdlora_app.models import build_student, load_classifier  # noqa: E402
from fedkdlora_app.training import evaluate, mutual_distill, train_epochs  # noqa: E402

CPU = torch.device("cpu")


def passes(config: RunConfig) -> dict[str, float]:
    """Seconds of each pass under `config` (its `length-grouped-batches` decides the batching)."""
    public = loader_for(public_slice(config), config, shuffle_seed=config.seed)
    seconds = {}
    torch.manual_seed(0)
    teacher = load_classifier("", config.num_labels, attn_implementation="eager")
    started = time.perf_counter()
    train_epochs(teacher, public, config.distill_teacher_lr, 1, CPU, linear_decay=True)
    seconds["teacher alone"] = time.perf_counter() - started
    student = build_student(config)
    started = time.perf_counter()
    mutual_distill(
        student, teacher, public, config.distill_student_lr, config.distill_teacher_lr, 1, CPU, "mutual"
    )
    seconds["mutual"] = time.perf_counter() - started
    started = time.perf_counter()
    train_epochs(student, public, config.client_learning_rate, 1, CPU)
    seconds["LoRA client training"] = time.perf_counter() - started
    dev = loader_for(eval_split(config), config)
    if not config.length_grouped_batches:  # the evaluation order before sorting: file order
        dev = DataLoader(dev.dataset, batch_size=config.batch_size, collate_fn=dev.collate_fn)
    started = time.perf_counter()
    evaluate(student, dev, CPU)
    seconds["evaluation"] = time.perf_counter() - started
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, examples=500)
    parser.add_argument("--task", default="sst2", choices=("sst2", "cola"))
    parser.add_argument("--eval-examples", type=int, default=400)
    args = parser.parse_args(argv)
    base = replace(
        run_config(),
        task=args.task,
        data_dir=args.data_dir,
        max_public_examples=args.examples,
        max_eval_examples=args.eval_examples,
    )
    times = interleaved(
        {
            "plain": lambda: passes(replace(base, length_grouped_batches=False)),
            "grouped": lambda: passes(replace(base, length_grouped_batches=True)),
        },
        args.repeats,
    )
    about = {"task": args.task, "public_examples": args.examples, "eval_examples": args.eval_examples}
    publish(report(times, "plain", "grouped", **about), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the Flower simulation costs on top of the training work itself.

Runs the same FedLoRA job twice in one invocation, same examples, epochs, model and seed:
(a) through the real Flower simulation (`fedkdlora-run`, Ray, N SuperNodes), and (b) as a
plain sequential loop in this process calling the very functions the ClientApp and
ServerApp call (`local_train`, `local_evaluate`, Flower's weighted average, server-side
evaluation). Prints seconds per round for both, their ratio, and the communication
figures: measured bytes per message vs the analytic LoRA payload.

    python bench/simulation_overhead.py --clients 4 --rounds 4 --examples 200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedkdlora_app.bookkeeping import payload_bytes
from fedkdlora_app.client_app import local_evaluate, local_train
from fedkdlora_app.config import RunConfig, app_defaults
from fedkdlora_app.data import eval_split, loader_for
from fedkdlora_app.models import build_student, load_shipped_state, shipped_state
from fedkdlora_app.results_format import load
from fedkdlora_app.seeding import seed_everything
from fedkdlora_app.training import evaluate
from fedkdlora_app.wire import to_wire
from fedkdlora_tools import launcher

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--examples", type=int, default=200, help="training examples per client")
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared/data/glue"))
    parser.add_argument("--federation-config", default="", help="e.g. 'client-resources-num-gpus=0.25'")
    parser.add_argument("--out", type=Path, help="also write the report JSON here (stdout has Flower's log)")
    return parser.parse_args()


def run_config(args: argparse.Namespace, results_dir: Path) -> dict:
    return {
        **app_defaults(REPO),
        "scheme": "fedlora",
        "task": args.task,
        "data-dir": args.data_dir,
        "num-server-rounds": args.rounds,
        "max-train-examples-per-client": args.examples,
        "max-eval-examples": args.eval_examples,
        "min-available-nodes": args.clients,
        "results-dir": str(results_dir),
    }


def simulated(args: argparse.Namespace, values: dict) -> tuple[list[float], float, dict]:
    """(per-round wall seconds, end-to-end seconds, results JSON) of the Flower simulation."""
    overrides = launcher.format_overrides(values)
    federation = f"num-supernodes={args.clients} {args.federation_config}".strip()
    start = time.perf_counter()
    code = launcher.main([str(REPO), "--run-config", overrides, "--federation-config", federation])
    total = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"simulation failed (exit {code})")
    results = load(next(Path(values["results-dir"]).glob("*.json")))
    return [r["wall_seconds"] for r in results["rounds"][1:]], total, results


def analytic_lora_parameters(model: torch.nn.Module, r: int) -> int:
    """r * (d_in + d_out) per adapted matrix, plus the classifier head."""
    adapters = sum(
        r * (module.in_features + module.out_features)
        for module in model.modules()
        if hasattr(module, "lora_A")
        and isinstance(module, torch.nn.Module)
        and hasattr(module, "in_features")
    )
    head = sum(p.numel() for n, p in model.named_parameters() if "classifier" in n and "modules_to_save" in n)
    return adapters + head


def plain_loop(args: argparse.Namespace, config: RunConfig) -> tuple[list[float], float, torch.nn.Module]:
    """The same rounds, sequentially in one process, with the app's own functions."""
    start = time.perf_counter()
    seed_everything(config.seed)
    server_student = build_student(config)
    eval_loader = loader_for(eval_split(config), config)
    global_state = shipped_state(server_student, config)
    evaluate(server_student, eval_loader, torch.device("cpu"))  # round 0, as the ServerApp does
    per_round = []
    for server_round in range(1, args.rounds + 1):
        round_start = time.perf_counter()
        replies = []
        for partition_id in range(args.clients):
            state, result = local_train(config, partition_id, args.clients, server_round, global_state)
            replies.append(
                RecordDict(
                    {"arrays": ArrayRecord(state), "metrics": MetricRecord({"n": result.dataset_size})}
                )
            )
        global_state = aggregate_arrayrecords(replies, "n").to_torch_state_dict()
        for partition_id in range(args.clients):
            local_evaluate(config, partition_id, args.clients, global_state)
        load_shipped_state(server_student, global_state, config)
        evaluate(server_student, eval_loader, torch.device("cpu"))
        per_round.append(time.perf_counter() - round_start)
    return per_round, time.perf_counter() - start, server_student


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        values = run_config(args, Path(tmp))
        sim_rounds, sim_total, results = simulated(args, values)
        config = RunConfig.from_mapping(values)
        plain_rounds, plain_total, student = plain_loop(args, config)
    steady_sim, steady_plain = sum(sim_rounds[1:]), sum(plain_rounds[1:])
    model = results["model"]
    analytic_params = analytic_lora_parameters(student, config.lora_r)
    # What FedAvg ships: the plain student's whole state on the wire (not the PEFT model's count).
    fedavg = dataclasses.replace(config, scheme="fedavg")
    fedavg_bytes = payload_bytes(to_wire(shipped_state(build_student(fedavg), fedavg), "float32"))
    report = {
        "machine": f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}",
        "clients": args.clients,
        "rounds": args.rounds,
        "examples_per_client": args.examples,
        "simulation_seconds_per_round": [round(s, 2) for s in sim_rounds],
        "plain_seconds_per_round": [round(s, 2) for s in plain_rounds],
        "steady_state_ratio (rounds 2..R)": round(steady_sim / steady_plain, 3),
        "all_rounds_ratio": round(sum(sim_rounds) / sum(plain_rounds), 3),
        "end_to_end_seconds": {"simulation": round(sim_total, 1), "plain": round(plain_total, 1)},
        "end_to_end_ratio": round(sim_total / plain_total, 3),
        "shipped_parameters": model["shipped_parameters"],
        "analytic_lora_parameters": analytic_params,
        "measured_bytes_per_message": model["shipped_bytes_per_message"],
        "analytic_float32_bytes": analytic_params * 4,
        "fedavg_bytes_per_message_float32": fedavg_bytes,
        "reduction_vs_fedavg": round(fedavg_bytes / model["shipped_bytes_per_message"], 1),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

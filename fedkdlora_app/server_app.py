"""ServerApp: global model, strategy, server-side evaluation, results."""

from __future__ import annotations

from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedkdlora_app.config import RunConfig
from fedkdlora_app.data import TokenizedDataset, eval_split, load_split, make_loader, split_public
from fedkdlora_app.models import (
    base_model_dir,
    build_student,
    load_shipped_state,
    load_tokenizer,
    save_student,
    shipped_state,
)
from fedkdlora_app.results import RunRecorder
from fedkdlora_app.seeding import seed_everything
from fedkdlora_app.strategy import TrackedFedAvg, payload_bytes
from fedkdlora_app.training import evaluate, pick_device

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the config, then run; a failure is recorded in the results JSON and re-raised."""
    config = RunConfig.from_mapping(context.run_config)
    recorder = RunRecorder(config)
    log(INFO, "FedKDLoRA: %s on %s, results -> %s", config.scheme, config.task, recorder.path)
    try:
        run_federation(grid, config, recorder)
    except BaseException as error:
        recorder.fail(error)
        raise


def run_federation(grid: Grid, config: RunConfig, recorder: RunRecorder) -> None:
    seed_everything(config.seed)
    # Read train here too: a malformed file must stop the run before any client trains.
    public, client_pool = split_public(load_split(config, "train"), config.teacher_data_pct)
    device = pick_device()
    student = build_student(config)
    tokenizer = load_tokenizer(config.student_model)
    eval_loader = make_loader(
        TokenizedDataset(eval_split(config), tokenizer, config.max_seq_length), tokenizer, config.batch_size
    )
    initial_arrays = ArrayRecord(shipped_state(student, config))
    recorder.set_model_info(
        student_parameters=sum(p.numel() for p in student.parameters()),
        student_layers=student.config.num_hidden_layers,
        shipped_parameters=sum(t.numel() for t in initial_arrays.to_torch_state_dict().values()),
        shipped_bytes_per_message=payload_bytes(initial_arrays),
        eval_examples=len(eval_loader.dataset),
        public_examples=len(public),
        client_pool_examples=len(client_pool),
    )

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_shipped_state(student, arrays.to_torch_state_dict(), config)
        metrics = evaluate(student, eval_loader, device).metrics()
        recorder.finish_round(server_round, {"student": metrics})
        return MetricRecord(metrics)

    strategy = TrackedFedAvg(
        recorder,
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=config.min_available_nodes,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=initial_arrays,
        num_rounds=config.num_server_rounds,
        evaluate_fn=evaluate_global,
    )
    final_arrays = result.arrays if result.arrays is not None else initial_arrays
    load_shipped_state(student, final_arrays.to_torch_state_dict(), config)
    student_dir = save_student(student, config, recorder.run_dir / "student")
    artifacts = {"student": str(student_dir.resolve())}
    if config.uses_lora:
        artifacts["student_base"] = str(base_model_dir(config, Path(config.results_dir)).resolve())
    recorder.finish(artifacts)
    log(INFO, "Results: %s; student saved to %s", recorder.path, student_dir)

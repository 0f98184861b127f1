"""ServerApp: global model, strategy, server-side evaluation and distillation, results."""

from __future__ import annotations

from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from torch.utils.data import DataLoader

from fedkdlora_app.aggregation import UpdateAggregator
from fedkdlora_app.bookkeeping import payload_bytes, payload_params
from fedkdlora_app.checkpoint import Checkpoint, capture_rng, restore_rng
from fedkdlora_app.config import RunConfig, run_dir_of
from fedkdlora_app.data import (
    eval_split,
    labelled_count,
    largest_partition,
    load_split,
    loader_for,
    public_and_pool,
    public_slice,
)
from fedkdlora_app.devices import check_precision, pick_device
from fedkdlora_app.distillation import ServerDistillation
from fedkdlora_app.models import (
    base_model_dir,
    build_student,
    load_shipped_state,
    save_student,
    shipped_state,
)
from fedkdlora_app.privacy import (
    PrivacyBudgetReached,
    check_privacy_budget,
    privacy_info,
    private_strategy,
)
from fedkdlora_app.progress import phase_progress
from fedkdlora_app.protocol import TEACHER_ID_KEY
from fedkdlora_app.results import RunRecorder
from fedkdlora_app.sampling import PartitionRoster
from fedkdlora_app.seeding import seed_everything
from fedkdlora_app.strategy import ContinuedRounds, ServerStep, TrackedFedAvg
from fedkdlora_app.teacher import save_teacher
from fedkdlora_app.tracking import Tracker
from fedkdlora_app.training import evaluate
from fedkdlora_app.wire import from_wire, to_wire

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the config, then run; a failure is recorded in the results JSON and re-raised."""
    config = RunConfig.from_mapping(context.run_config)
    check_privacy_budget(config)
    checkpoint = None
    if config.resume_from:
        checkpoint = Checkpoint.load(run_dir_of(Path(config.resume_from)))
        recorder = RunRecorder(config, resume=(Path(config.resume_from), checkpoint.round))
        log(INFO, "FedKDLoRA: resuming %s after round %d", recorder.path, checkpoint.round)
    else:
        recorder = RunRecorder(config)
    log(INFO, "FedKDLoRA: %s on %s, results -> %s", config.scheme, config.task, recorder.path)
    tracker = Tracker(config, recorder.name, recorder.tracking_record() if config.tracking else {})
    recorder.round_listeners.append(tracker.log_round)
    try:
        run_federation(grid, config, recorder, checkpoint)
    except BaseException as error:
        recorder.fail(error)
        tracker.finish("failed", [recorder.path])
        recorder.write()  # with what tracking may have recorded
        raise
    tracker.finish("completed", [recorder.path, Path(recorder.data["artifacts"]["student"])])
    recorder.write()


def run_federation(
    grid: Grid, config: RunConfig, recorder: RunRecorder, checkpoint: Checkpoint | None = None
) -> None:
    """Build (or restore) the global student and teacher, run the rounds, save the models.

    The server step's worker is closed on every exit path: a failing run stops its
    overlapped teacher phase at the next batch instead of waiting for it.
    """
    seed_everything(config.seed)
    # Read train here too: a malformed file must stop the run before any client trains.
    _, client_pool = public_and_pool(load_split(config, "train"), config.teacher_data_pct)
    public_examples = len(public_slice(config))  # as used, after max-public-examples
    device = pick_device()
    check_precision(config.precision, device)
    # Distillation compares attention maps, which only the eager kernels return.
    student = build_student(config, attn_implementation="eager" if config.uses_teacher else None)
    eval_loader = loader_for(eval_split(config), config)
    initial_state = checkpoint.global_state if checkpoint else shipped_state(student, config)
    initial_arrays = to_wire(initial_state, config.wire_dtype)
    sizes = (len(eval_loader.dataset), public_examples, len(client_pool))
    record_model_info(config, recorder, student, initial_arrays, *sizes, device)
    distillation = None
    if config.uses_teacher:
        teacher_state = checkpoint.teacher_state if checkpoint else None
        distillation = ServerDistillation(config, student, device, recorder, teacher_state)
    try:
        completed_rounds = 0
        if checkpoint is not None:
            completed_rounds = checkpoint.round
            restore_rng(checkpoint.rng, distillation.generators if distillation else {})
        strategy = build_strategy(config, recorder, distillation, len(client_pool))
        # With client KD every train message names the teacher, so a node can find its cached copy.
        train_config = ConfigRecord({TEACHER_ID_KEY: distillation.teacher_id} if config.client_kd else {})
        closer = RoundCloser(config, recorder, student, eval_loader, device, distillation, checkpoint)
        try:
            result = ContinuedRounds(strategy, completed_rounds).start(
                grid=grid,
                initial_arrays=initial_arrays,
                num_rounds=config.num_server_rounds - completed_rounds,
                timeout=config.round_timeout,
                train_config=train_config,
                evaluate_fn=closer,
            )
            # Result.arrays is an empty record when no round produced an aggregate.
            final_arrays = result.arrays if len(result.arrays) else initial_arrays
            load_shipped_state(student, from_wire(final_arrays, config.wire_dtype), config)
        except PrivacyBudgetReached as stop:  # the student holds the last round's global model (RoundCloser)
            log(INFO, "FedKDLoRA: %s", stop)
            recorder.stop_early(str(stop))
        check_something_aggregated(recorder, completed_rounds)
        recorder.finish(save_models(config, recorder, student, distillation))
    finally:
        if distillation is not None:
            distillation.close()
    health = recorder.health()
    log(
        INFO,
        "Results: %s; models saved in %s; %d of %d round(s) aggregated no client update, %d failure(s) "
        "recorded (rounds[].failures)",
        recorder.path,
        recorder.run_dir,
        len(health["rounds_without_update"]),
        health["rounds"],
        health["failures"],
    )


def build_strategy(
    config: RunConfig,
    recorder: RunRecorder,
    distillation: ServerDistillation | None,
    client_pool_examples: int,
) -> Strategy:
    """Each scheme's strategy, inside out (`run_federation` wraps it in `ContinuedRounds`):

    - FedAvg and FedLoRA: `TrackedFedAvg`; they differ only in the state they ship;
    - with DP: Flower's DP wrapper around it, with the run's privacy ledger (`private_strategy`);
    - FedKDLoRA: `ServerStep` around that, so under DP it distils the noised aggregate.
    """
    strategy: Strategy = TrackedFedAvg(
        recorder,
        aggregator=UpdateAggregator.from_config(config),
        once_per_node=distillation.client_teacher_records if distillation else None,
        # No partition holds more than this: larger claims are dropped.
        max_examples_per_update=largest_partition(config, client_pool_examples),
        round_timeout=config.round_timeout,
        roster=PartitionRoster(config.seed, config.round_timeout) if config.partial_participation else None,
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=config.min_available_nodes,
    )
    if config.uses_dp:
        kept = recorder.health()  # a resumed run's releases: its kept rounds that aggregated an update
        strategy = private_strategy(strategy, config, kept["rounds"] - len(kept["rounds_without_update"]))
    if distillation is not None:
        strategy = ServerStep(
            strategy,
            distillation.after_aggregate,
            before_train=distillation.start_teacher_phase,
            without_aggregate=distillation.skip_round,
        )
    return strategy


class RoundCloser:
    """Flower's `evaluate_fn`: server-side evaluation closes a round; it is recorded, then checkpointed."""

    def __init__(
        self,
        config: RunConfig,
        recorder: RunRecorder,
        student: torch.nn.Module,
        eval_loader: DataLoader,
        device: torch.device,
        distillation: ServerDistillation | None,
        resumed_from: Checkpoint | None,
    ) -> None:
        self.config, self.recorder, self.student = config, recorder, student
        self.eval_loader, self.device, self.distillation = eval_loader, device, distillation
        self.resumed_after = resumed_from.round if resumed_from else None

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == self.resumed_after:
            return None  # a resumed run's starting point was evaluated before the interruption
        config, distillation = self.config, self.distillation
        global_state = from_wire(arrays, config.wire_dtype)
        load_shipped_state(self.student, global_state, config)
        metrics = {"student": self._evaluate(self.student, server_round, "student")}
        if distillation is not None:
            metrics["teacher"] = self._evaluate(distillation.teacher, server_round, "teacher")
        self.recorder.finish_round(server_round, metrics)
        teacher_state = distillation.teacher_state() if distillation else None
        generators = distillation.generators if distillation else {}
        Checkpoint(server_round, global_state, teacher_state, capture_rng(generators)).save(
            self.recorder.run_dir
        )
        return MetricRecord(metrics["student"])

    def _evaluate(self, model: torch.nn.Module, server_round: int, role: str) -> dict[str, float]:
        what = f"round {server_round}: {role} evaluation"
        progress = phase_progress(what, self.eval_loader, 1, self.config.progress_interval)
        return evaluate(model, self.eval_loader, self.device, self.config.precision, progress).metrics()


def record_model_info(
    config: RunConfig,
    recorder: RunRecorder,
    student: torch.nn.Module,
    initial_arrays: ArrayRecord,
    eval_examples: int,
    public_examples: int,
    client_pool_examples: int,
    device: torch.device,
) -> None:
    """What the results JSON says about the models and data before round 1."""
    recorder.set_model_info(
        student_parameters=sum(p.numel() for p in student.parameters()),
        student_layers=student.config.num_hidden_layers,
        shipped_parameters=payload_params(initial_arrays),
        shipped_bytes_per_message=payload_bytes(initial_arrays),
        eval_examples=eval_examples,
        public_examples=public_examples,
        public_labelled_examples=labelled_count(config, public_examples),
        client_pool_examples=client_pool_examples,
        server_device=str(device),
    )
    if config.uses_dp:
        recorder.set_model_info(privacy=privacy_info(config))


def save_models(
    config: RunConfig,
    recorder: RunRecorder,
    student: torch.nn.Module,
    distillation: ServerDistillation | None,
) -> dict[str, str]:
    """Save the final student (and teacher); the artifacts' paths for the results JSON."""
    student_dir = save_student(student, config, recorder.run_dir / "student")
    artifacts = {"student": str(student_dir.resolve())}
    if config.uses_lora:
        artifacts["student_base"] = str(base_model_dir(config, Path(config.results_dir)).resolve())
    if distillation is not None:
        teacher_dir = save_teacher(
            distillation.teacher, recorder.data["teacher"], config, recorder.run_dir / "teacher"
        )
        artifacts["teacher"] = str(teacher_dir.resolve())
        artifacts["pretrained_teacher"] = str(distillation.pretrained_dir.resolve())
    return artifacts


class NothingAggregatedError(RuntimeError):
    """Every round of the run ended without a single client update: nothing was trained."""


def check_something_aggregated(recorder: RunRecorder, after_round: int) -> None:
    """A run whose rounds all kept the initial model is a failure, whatever Flower thinks of it."""
    entries = [entry for entry in recorder.data["rounds"] if entry["round"] > after_round]
    if entries and len(recorder.rounds_without_update(after_round)) == len(entries):
        raise NothingAggregatedError(
            f"no round aggregated a client update ({len(entries)} round(s)): "
            + recorder.failure_summary(after_round)
        )

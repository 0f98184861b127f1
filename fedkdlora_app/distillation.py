"""FedKDLoRA's server side: teacher, public data, and the distillation after each aggregation."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.logger import log
from torch.utils.data import DataLoader

from fedkdlora_app.config import RunConfig
from fedkdlora_app.data import labelled_count, labelled_public, loader_for, public_slice
from fedkdlora_app.models import load_classifier, load_shipped_state, shipped_state
from fedkdlora_app.progress import Progress, phase_progress
from fedkdlora_app.protocol import TEACHER_ARRAYS_KEY, TEACHER_CONFIG_KEY
from fedkdlora_app.results import RunRecorder
from fedkdlora_app.teacher import build_teacher, save_teacher
from fedkdlora_app.training import TrainResult, mutual_distill, train_epochs
from fedkdlora_app.wire import from_wire, to_wire


class ServerDistillation:
    """Holds the teacher; turns the aggregated student into the distilled next global model."""

    def __init__(
        self,
        config: RunConfig,
        student: torch.nn.Module,
        device: torch.device,
        recorder: RunRecorder,
        teacher_state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """`teacher_state`: a resumed run's teacher, as checkpointed; else build (pre-train) one.

        A teacher pre-trained here is also saved as `<run>/pretrained-teacher`, a folder
        `teacher-model` accepts: reusable by later runs, and the frozen copy clients
        distil from when this run is resumed.
        """
        self.config, self.student, self.device, self.recorder = config, student, device, recorder
        pretrained_dir = (
            Path(config.teacher_model) if config.teacher_model else recorder.run_dir / "pretrained-teacher"
        )
        if teacher_state is None:
            self.teacher, info = build_teacher(config, device)
            recorder.set_teacher_info(info)
            if not config.teacher_model:
                save_teacher(self.teacher, info, config, pretrained_dir)
            pretrained = self.teacher
        else:
            self.teacher = load_classifier(
                config.teacher_model or config.teacher_base_model,
                config.num_labels,
                attn_implementation="eager",
            )
            self.teacher.load_state_dict(teacher_state, strict=True)
            pretrained = load_classifier(str(pretrained_dir), config.num_labels) if config.client_kd else None
        self.pretrained_dir = pretrained_dir
        # The run's name: unique, and kept by a resumed run, whose pre-trained teacher is the same.
        self.teacher_id = recorder.name
        # Mutual distillation runs on the whole slice, labels beyond the labelled share hidden;
        # the teacher alone trains on the labelled share (the same loader when it is all of it).
        public = public_slice(config)
        labelled = labelled_count(config, len(public))
        all_labelled = labelled == len(public)
        self.public_loader = loader_for(
            public, config, shuffle_seed=config.seed, labelled=None if all_labelled else labelled
        )
        self.teacher_loader = (
            self.public_loader
            if all_labelled
            else loader_for(labelled_public(config), config, shuffle_seed=config.seed)
        )
        # Clients distil from the pre-trained teacher, as it was before any round changed it.
        self.client_teacher_records = teacher_records(pretrained, self.teacher_id) if config.client_kd else {}
        # One worker: the teacher-alone phase runs there while the clients train. Torch
        # releases the GIL in its kernels, so it computes while the main thread waits.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedkdlora-teacher-phase")
        self._stop = threading.Event()
        self._teacher_phase: Future[TrainResult] | None = None
        self._undo: tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor] | None = None

    def close(self) -> None:
        """Stop an overlapped teacher phase at its next batch and shut the worker down.

        Without this, a run failing while the phase runs would wait for the whole phase
        before its process could exit (Python joins executor threads at exit).
        """
        self._stop.set()
        self._worker.shutdown(wait=True, cancel_futures=True)

    def start_teacher_phase(self, server_round: int) -> None:
        """With `server-step-overlap`: train the teacher alone now, while the clients train.

        That phase needs only the previous round's teacher, not the clients' aggregate. The
        server's other work until `after_aggregate` (sampling, messaging, averaging) draws no
        torch random numbers, so the result is the sequential order's, bit for bit.
        """
        if not self.config.server_step_overlap:
            return
        self._undo = (
            {k: v.detach().clone() for k, v in self.teacher.state_dict().items()},
            torch.get_rng_state(),
            self.teacher_loader.generator.get_state(),
        )
        self._teacher_phase = self._worker.submit(self._train_teacher_alone, server_round)

    def skip_round(self, server_round: int) -> None:
        """No aggregate this round, so no server step: undo an overlapped teacher phase."""
        if self._teacher_phase is None:
            return
        self._teacher_phase.result()
        self._teacher_phase = None
        teacher_state, torch_rng, public_rng = self._undo
        self.teacher.load_state_dict(teacher_state)
        torch.set_rng_state(torch_rng)
        self.teacher_loader.generator.set_state(public_rng)
        log(INFO, "round %d: nothing aggregated, the overlapped teacher phase is undone", server_round)

    def after_aggregate(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """Teacher alone (unless it ran during the clients' training), then teacher + student mutually."""
        config = self.config
        started = time.perf_counter()
        overlapped = self._teacher_phase is not None
        if overlapped:
            teacher_result = self._teacher_phase.result()
            self._teacher_phase = None
        else:
            teacher_result = self._train_teacher_alone(server_round)
        waited = time.perf_counter() - started
        load_shipped_state(self.student, from_wire(arrays, config.wire_dtype), config)
        mutual_started = time.perf_counter()
        terms = mutual_distill(
            self.student,
            self.teacher,
            self.public_loader,
            config.distill_student_lr,
            config.distill_teacher_lr,
            config.kd_epochs,
            self.device,
            what=f"round {server_round}: mutual distillation",
            precision=config.precision,
            progress=self._progress(f"round {server_round}: mutual distillation", config.kd_epochs),
            kd_loss=config.kd_loss,
            signal=config.server_student_signal,
        )
        mutual_seconds = time.perf_counter() - mutual_started
        on_critical_path = time.perf_counter() - started
        self.recorder.set_distillation(
            server_round,
            {
                "teacher_train_loss": teacher_result.mean_loss,
                "last_step": terms,
                "seconds": teacher_result.seconds + mutual_seconds,
                "teacher_seconds": teacher_result.seconds,
                "mutual_seconds": mutual_seconds,
                "overlapped": overlapped,
                # what the round waited for after aggregation: the rest ran during client training
                "critical_path_seconds": on_critical_path,
                "teacher_wait_seconds": waited if overlapped else 0.0,
            },
        )
        log(
            INFO,
            "round %d: server step %.1f s after aggregation (teacher alone %.1f s%s, mutual %.1f s), "
            "last step %s",
            server_round,
            on_critical_path,
            teacher_result.seconds,
            ", during client training" if overlapped else "",
            mutual_seconds,
            _fmt(terms),
        )
        return to_wire(shipped_state(self.student, config), config.wire_dtype)

    def _train_teacher_alone(self, server_round: int) -> TrainResult:
        config = self.config
        return train_epochs(
            self.teacher,
            self.teacher_loader,
            config.distill_teacher_lr,
            config.teacher_epochs,
            self.device,
            linear_decay=True,
            what=f"round {server_round}: teacher training",
            precision=config.precision,
            progress=self._progress(
                f"round {server_round}: teacher alone", config.teacher_epochs, self.teacher_loader
            ),
            stop=self._stop,
        )

    def teacher_state(self) -> dict[str, torch.Tensor]:
        """The teacher's weights on the CPU, for a checkpoint."""
        return {k: v.cpu() for k, v in self.teacher.state_dict().items()}

    @property
    def generators(self) -> dict[str, torch.Generator]:
        """The server step's data-order generators, for checkpoints."""
        generators = {"public": self.public_loader.generator}
        if self.teacher_loader is not self.public_loader:
            generators["labelled-public"] = self.teacher_loader.generator
        return generators

    def _progress(self, what: str, epochs: int, loader: DataLoader | None = None) -> Progress | None:
        return phase_progress(what, loader or self.public_loader, epochs, self.config.progress_interval)


def teacher_records(teacher: torch.nn.Module, teacher_id: str) -> dict[str, ArrayRecord | ConfigRecord]:
    """The one-time records that carry a frozen teacher to a node: weights, architecture, id."""
    return {
        TEACHER_ARRAYS_KEY: ArrayRecord(teacher.state_dict()),
        TEACHER_CONFIG_KEY: ConfigRecord(
            {"model-config": json.dumps(teacher.config.to_dict()), "id": teacher_id}
        ),
    }


def _fmt(terms: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in terms.items()) or "(no step)"

"""FedKDLoRA's server side: teacher, public data, and the distillation after each aggregation."""

from __future__ import annotations

import json
import time
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.logger import log

from fedkdlora_app.config import RunConfig
from fedkdlora_app.data import loader_for, public_slice
from fedkdlora_app.models import load_classifier, load_shipped_state, shipped_state
from fedkdlora_app.protocol import TEACHER_ARRAYS_KEY, TEACHER_CONFIG_KEY
from fedkdlora_app.results import RunRecorder
from fedkdlora_app.teacher import build_teacher, save_teacher
from fedkdlora_app.training import mutual_distill, train_epochs
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
        self.public_loader = loader_for(public_slice(config), config, shuffle_seed=config.seed)
        # Clients distil from the pre-trained teacher, as it was before any round changed it.
        self.client_teacher_records = teacher_records(pretrained, self.teacher_id) if config.client_kd else {}

    def after_aggregate(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """Teacher alone, then teacher + student mutually, on the public slice."""
        config = self.config
        started = time.perf_counter()
        load_shipped_state(self.student, from_wire(arrays, config.wire_dtype), config)
        teacher_result = train_epochs(
            self.teacher,
            self.public_loader,
            config.distill_lr,
            config.teacher_epochs,
            self.device,
            linear_decay=True,
            what=f"round {server_round}: teacher training",
            precision=config.precision,
        )
        terms = mutual_distill(
            self.student,
            self.teacher,
            self.public_loader,
            config.distill_student_lr,
            config.distill_lr,
            config.kd_epochs,
            self.device,
            what=f"round {server_round}: mutual distillation",
            precision=config.precision,
        )
        seconds = time.perf_counter() - started
        self.recorder.set_distillation(
            server_round,
            {"teacher-train-loss": teacher_result.mean_loss, "last-step": terms, "seconds": seconds},
        )
        log(INFO, "round %d: server distillation %.1f s, last step %s", server_round, seconds, _fmt(terms))
        return to_wire(shipped_state(self.student, config), config.wire_dtype)


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

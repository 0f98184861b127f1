"""Server checkpoints: what a run needs to continue after its last complete round.

Written after every round's server-side evaluation into the run's folder, atomically
(a temporary file, then a rename), so a crash never leaves half a checkpoint. The
results so far live in the results JSON beside it, written the same way.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedkdlora_app.atomic import atomic_file
from fedkdlora_app.config import CHECKPOINT_FILE


def capture_rng(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Python's (node sampling), NumPy's, torch's, and the server's data-loader generators."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    for name, generator in generators.items():
        generator.set_state(state["generators"][name])


@dataclass
class Checkpoint:
    """The global model after `round`, the teacher (FedKDLoRA) and every RNG's state."""

    round: int
    global_state: dict[str, torch.Tensor]
    teacher_state: dict[str, torch.Tensor] | None
    rng: dict[str, Any]

    def save(self, run_dir: Path) -> Path:
        target = run_dir / CHECKPOINT_FILE
        atomic_file(target, lambda tmp: torch.save(vars(self), tmp))
        return target

    @classmethod
    def load(cls, run_dir: Path) -> Checkpoint:
        # Our own file, but it holds NumPy RNG state, which weights_only refuses.
        return cls(**torch.load(run_dir / CHECKPOINT_FILE, weights_only=False))

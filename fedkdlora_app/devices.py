"""Where a process computes: the accelerator it was given, its placement record, mixed precision.

In Flower's Ray simulation each ClientApp runs in a Ray actor that was given a fraction
of a GPU (`client-resources-num-gpus`); Ray lists the GPU it assigned in the actor's
CUDA_VISIBLE_DEVICES. A client must compute on exactly that GPU, or on the CPU when it
was given none, never on whatever GPU 0 the process happens to see: that would put
every client on one GPU outside Ray's accounting.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import AbstractContextManager
from types import ModuleType

import torch

from fedkdlora_app.config import ConfigError


def ray_worker() -> ModuleType | None:
    """Ray, if this process is a Ray worker (a simulated ClientApp), else None."""
    ray = sys.modules.get("ray")  # never imported here: a SuperNode needs no Ray
    # (another thread may be importing it right now: a half-imported module is no Ray worker)
    if ray is None or not callable(getattr(ray, "is_initialized", None)) or not ray.is_initialized():
        return None
    if ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None  # the driver (the simulation's ServerApp) is given no GPU ids
    return ray


def ray_gpu_ids() -> list[str] | None:
    """The GPU ids Ray assigned to this process if it is a Ray worker (a simulated ClientApp), else None."""
    ray = ray_worker()
    return None if ray is None else [str(gpu) for gpu in ray.get_gpu_ids()]


def ray_node_id() -> str:
    """The Ray node (raylet) this process runs on if it is a Ray worker, else "": with the simulation
    attached to a cluster of several machines (`RAY_ADDRESS`), which machine computed."""
    ray = ray_worker()
    return "" if ray is None else str(ray.get_runtime_context().get_node_id())


def pick_device() -> torch.device:
    """The GPU this process was given (Ray's assignment under simulation), else the CPU."""
    if ray_gpu_ids() == []:
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_precision(precision: str, device: torch.device) -> None:
    """bfloat16 autocast where the device has it; a one-line error naming the key where not."""
    if precision != "bfloat16":
        return
    if device.type != "cuda" or not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"run-config key 'precision' = 'bfloat16': needs a CUDA device with bfloat16 support; "
            f"this process computes on {device}"
        )


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """Forward passes (and their losses) in bfloat16 under `precision = "bfloat16"`, else unchanged."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")


def placement(device: torch.device, started: float) -> dict[str, str | int | float]:
    """Where one ClientApp message was computed, for the results JSON (a ConfigRecord's values)."""
    ids = ray_gpu_ids()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {
        "device": str(device),
        "ray_gpu_ids": ",".join(ids) if ids is not None else "",
        "ray_node_id": ray_node_id(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "pid": os.getpid(),
        "peak_accelerator_memory_bytes": int(peak),
        "started": started,
        "finished": time.time(),
    }

"""What travels: model state as an ArrayRecord in the run's `wire-dtype`, and back.

Models train in float32 everywhere; only messages use the wire dtype, so halving the
bytes costs one rounding per message and nothing else. numpy (and so `ArrayRecord`)
has no bfloat16: its bits travel as int16 and are reinterpreted on arrival, which both
ends can do because both read `wire-dtype` from the same run config.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord

WIRE_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def to_wire(state: Mapping[str, torch.Tensor], wire_dtype: str) -> ArrayRecord:
    """Floating-point tensors cast to the wire dtype; others (integer buffers) unchanged."""
    dtype = WIRE_TORCH_DTYPES[wire_dtype]
    shipped = {}
    for key, tensor in state.items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
            if dtype == torch.bfloat16:
                tensor = tensor.view(torch.int16)
        shipped[key] = tensor.contiguous()
    return ArrayRecord(shipped)


def from_wire(record: ArrayRecord, wire_dtype: str) -> dict[str, torch.Tensor]:
    """Inverse of `to_wire`, back in float32."""
    state = record.to_torch_state_dict()
    for key, tensor in state.items():
        if wire_dtype == "bfloat16" and tensor.dtype == torch.int16:
            tensor = tensor.view(torch.bfloat16)
        state[key] = tensor.float() if tensor.is_floating_point() else tensor
    return state

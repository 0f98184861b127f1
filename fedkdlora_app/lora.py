"""LoRA maths both sides use: pairs of factors, their update ΔW, its best low-rank factors,
which factor a client trains, and the residual that `exact` folds into the frozen weights.

By Eckart-Young the truncated SVD gives the best rank-r approximation of a ΔW: the server
uses it to re-factorise an averaged update (aggregation.py), a client of a lower rank to
fit the global factors to its own (`fit_rank`). No Flower here: the ClientApp imports it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedkdlora_app.protocol import LORA_A, LORA_B, RESIDUAL, RESIDUAL_A, RESIDUAL_B


def lora_pairs(keys: list[str] | Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Adapted module -> (its lora_A key, its lora_B key), for PEFT state-dict keys."""
    return {key.split(LORA_A)[0]: (key, key.replace(LORA_A, LORA_B)) for key in keys if LORA_A in key}


def delta_weight(a: torch.Tensor, b: torch.Tensor, lora_alpha: float) -> torch.Tensor:
    """The weight update a LoRA pair adds: B·A scaled by alpha/r (PEFT's scaling), in float64."""
    return (lora_alpha / a.shape[0]) * (b.double() @ a.double())


@dataclass(frozen=True)
class Factorisation:
    """B, A of a truncated SVD, and the squared Frobenius norms that give its error."""

    b: torch.Tensor
    a: torch.Tensor
    tail_energy: float  # ||ΔW - B·A·alpha/r||_F^2 (the discarded singular values)
    total_energy: float  # ||ΔW||_F^2

    @property
    def relative_error(self) -> float:
        return (self.tail_energy / self.total_energy) ** 0.5 if self.total_energy > 0 else 0.0


def factorise(delta: torch.Tensor, rank: int, lora_alpha: float) -> Factorisation:
    """B, A with B·A·(alpha/rank) the best rank-`rank` approximation of `delta`: B = U·S, A = Vᵀ.

    A keeps orthonormal rows, close to the scale of LoRA's own initialisation of A, so the
    gradient reaching B (which is proportional to A·x) stays healthy however small the
    update is; splitting S evenly (U√S, √S·Vᵀ) shrinks A with the update and slows training.
    """
    u, s, vh = torch.linalg.svd(delta.double() * (rank / lora_alpha), full_matrices=False)
    b, a = u[:, :rank] * s[:rank], vh[:rank]
    if b.shape[1] < rank:  # the matrix is smaller than the rank: pad with zero directions
        b = torch.nn.functional.pad(b, (0, rank - b.shape[1]))
        a = torch.nn.functional.pad(a, (0, 0, 0, rank - a.shape[0]))
    scale_sq = (lora_alpha / rank) ** 2
    tail, total = float((s[rank:] ** 2).sum()) * scale_sq, float((s**2).sum()) * scale_sq
    return Factorisation(b.float(), a.float(), tail, total)


def fit_rank(state: dict[str, torch.Tensor], rank: int, lora_alpha: float) -> dict[str, torch.Tensor]:
    """The global LoRA state re-factorised to a client's own (lower) rank; unchanged where it matches.

    A pair whose B is all zero (LoRA's initialisation) keeps A's first `rank` rows: its
    product is zero either way, and the SVD of a zero matrix has no preferred directions
    (it would hand every client the same axis-aligned A).
    """
    fitted = dict(state)
    for key_a, key_b in lora_pairs(state).values():
        a, b = state[key_a], state[key_b]
        if a.shape[0] == rank:
            continue
        if not b.any():
            fitted[key_a], fitted[key_b] = a[:rank].clone(), b[:, :rank].clone()
        else:
            factors = factorise(delta_weight(a, b, lora_alpha), rank, lora_alpha)
            fitted[key_a], fitted[key_b] = factors.a, factors.b
    return fitted


def frozen_factor(aggregation: str, freeze_a: bool, server_round: int) -> str | None:
    """The LoRA factor (`LORA_A`, `LORA_B`) a client keeps fixed this round and does not ship back.

    FFA-LoRA (`freeze_a`) fixes A always. `alternating` fixes A in odd rounds (B trains from
    its zero start, as in LoRA) and B in even ones: with the other factor the same for every
    client, the mean of the trained one is the exact mean of the clients' B·A.
    """
    if freeze_a:
        return LORA_A
    if aggregation == "alternating":
        return LORA_A if server_round % 2 == 1 else LORA_B
    return None


def is_residual(key: str) -> bool:
    return any(part in key for part in (RESIDUAL, RESIDUAL_A, RESIDUAL_B))


def reply_keys(keys: Iterable[str], frozen: str | None) -> list[str]:
    """The keys of a client's train reply: the global state's, less the residual and the frozen factor."""
    return [key for key in keys if not is_residual(key) and not (frozen and frozen in key)]


def residual_matrices(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapted module -> its residual as a dense float64 matrix, from either shipped form."""
    residuals = {}
    for key, tensor in state.items():
        if RESIDUAL in key:
            residuals[key.split(RESIDUAL)[0]] = tensor.double()
        elif RESIDUAL_A in key:
            factor_b = state[key.replace(RESIDUAL_A, RESIDUAL_B)]
            residuals[key.split(RESIDUAL_A)[0]] = factor_b.double() @ tensor.double()
    return residuals


def residual_state(
    residuals: Mapping[str, torch.Tensor], rank: int
) -> tuple[dict[str, torch.Tensor], float, float]:
    """The residuals as shipped, dense (`rank` 0) or as their best rank-`rank` factors B·A; and the
    squared Frobenius norms (discarded, total) that give the truncation's relative error."""
    state: dict[str, torch.Tensor] = {}
    tail = total = 0.0
    for module, matrix in residuals.items():
        if rank == 0:
            state[f"{module}{RESIDUAL}weight"] = matrix.float()
            continue
        factors = factorise(matrix, rank, lora_alpha=rank)  # scale alpha/rank = 1: B·A is the matrix
        state[f"{module}{RESIDUAL_A}weight"], state[f"{module}{RESIDUAL_B}weight"] = factors.a, factors.b
        tail, total = tail + factors.tail_energy, total + factors.total_energy
    return state, tail, total


def zero_residual(state: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The residual of a fresh adapter (all zero) for each LoRA pair in `state`, as shipped."""
    zeros = {}
    for module, (key_a, key_b) in lora_pairs(state).items():
        out, inp = state[key_b].shape[0], state[key_a].shape[1]
        if rank == 0:
            zeros[f"{module}{RESIDUAL}weight"] = torch.zeros(out, inp)
        else:
            zeros[f"{module}{RESIDUAL_A}weight"] = torch.zeros(rank, inp)
            zeros[f"{module}{RESIDUAL_B}weight"] = torch.zeros(out, rank)
    return zeros


def adapted_weights(state: Mapping[str, torch.Tensor], lora_alpha: float) -> dict[str, torch.Tensor]:
    """Per adapted module, what a shipped state adds to the pre-trained weight: B·A·alpha/r plus
    its residual. Two states define the same model exactly when these are equal."""
    residuals = residual_matrices(state)
    return {
        module: delta_weight(state[key_a], state[key_b], lora_alpha) + residuals.get(module, 0.0)
        for module, (key_a, key_b) in lora_pairs(state).items()
    }

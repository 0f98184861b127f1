"""Seeds, so that the same config gives the same partitions, weights and metrics."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Python's `random` included: Flower samples nodes with it."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Distinct, reproducible per client and round (dropout, shuffling)."""
    return seed * 1_000_003 + server_round * 1_009 + partition_id


def sampling_seed(seed: int, server_round: int, stage: str) -> int:
    """The seed of `random` when FedAvg samples `stage` ("train", "evaluate") of `server_round`."""
    return seed * 1_000_003 + server_round * 2 + (stage == "evaluate")

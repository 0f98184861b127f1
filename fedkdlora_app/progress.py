"""Progress of the server's long phases, as periodic log lines a person at a terminal can follow.

Teacher pre-training, the server step and server-side evaluation can each take minutes
on a CPU, between two round lines. Every `progress-interval` seconds (0 = never) they log
examples done, rate and time left.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

# Flower's logger, by name: the learning code imports without flwr (GPU machines, bench/).
LOGGER = logging.getLogger("flwr")


class Progress:
    """Counts examples through one phase; logs a line at most every `interval` seconds."""

    def __init__(self, what: str, total: int, interval: float) -> None:
        self.what, self.total, self.interval = what, total, interval
        self.done = 0
        self.started = self.last = time.perf_counter()
        self.lines = 0

    def advance(self, examples: int) -> None:
        self.done += examples
        now = time.perf_counter()
        if self.interval <= 0 or now - self.last < self.interval or self.done >= self.total:
            return
        self.last = now
        rate = self.done / (now - self.started)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        LOGGER.info(
            "%s: %d/%d examples (%.0f %%), %.1f examples/s, about %.0f s left",
            self.what,
            self.done,
            self.total,
            100 * self.done / self.total,
            rate,
            left,
        )
        self.lines += 1


def phase_progress(what: str, loader: DataLoader, epochs: int, interval: float) -> Progress | None:
    """A `Progress` for `epochs` passes over a loader's dataset, or None when progress lines are off."""
    return Progress(what, len(loader.dataset) * epochs, interval) if interval > 0 else None

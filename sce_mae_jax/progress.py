"""The progress and ETA lines of every job that works through a known number of units (test batches, pairs,
regressors), from one place. Host time, so a line includes waits for input and devices."""
from __future__ import annotations

import time
from typing import Callable

from absl import logging


class Progress:
    """`WHAT: i/N (NAME), T s elapsed, [R UNIT/s, ]ETA E s`, logged after every `every`-th unit and the last.

    `sync` runs before a line is logged (e.g. `jax.block_until_ready` on the running totals), so that the rate
    is the devices' and not the dispatcher's; `per_unit` counts what one unit holds (pairs per batch) for the rate.
    """

    def __init__(self, what: str, total: int, *, every: int = 1, per_unit: float = 0.0, unit: str = '',
                 sync: Callable[[], object] | None = None):
        self.what, self.total, self.every = what, total, max(1, every)
        self.per_unit, self.unit, self.sync = per_unit, unit, sync
        self.done, self.t0 = 0, time.time()

    def step(self, name: str = '') -> None:
        self.done += 1
        if self.done % self.every and self.done != self.total:
            return
        if self.sync is not None:
            self.sync()
        dt = time.time() - self.t0
        rate = f'{self.done * self.per_unit / max(dt, 1e-9):.1f} {self.unit}/s, ' if self.per_unit else ''
        logging.info('%s: %d/%d%s, %.0f s elapsed, %sETA %.0f s', self.what, self.done, self.total,
                     f' ({name})' if name else '', dt, rate, dt / self.done * (self.total - self.done))

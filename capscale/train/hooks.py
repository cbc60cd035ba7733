"""The ground floor of training: loop hooks, step records and timed phases.

Nothing here knows a run, a config or a model. :class:`LoopHook` is what every part
that joins the loop implements (pruning controllers, snapshot and evaluation schedules,
the checkpoint hook, trackers); :class:`Phases` is how a step times its sections, and
benchmarks and the report listen to it instead of copying the step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

Record = dict[str, Any]
PHASES = ("mask_update", "forward", "teacher", "contrastive", "backward", "optimizer")


class Phases:
    """Named, timed sections of a step: ``with phases("forward"): ...``.

    Listeners get ``(name, seconds)`` after each section; with none the cost is one
    ``perf_counter`` pair. ``sync`` (e.g. ``torch.cuda.synchronize``) is called around
    timed sections when someone listens, so GPU work is counted where it is issued.
    """

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.listeners: list[Callable[[str, float], None]] = []
        self.sync = sync

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.listeners:
            yield
            return
        if self.sync is not None:
            self.sync()
        t0 = time.perf_counter()
        yield
        if self.sync is not None:
            self.sync()
        dt = time.perf_counter() - t0
        for fn in self.listeners:
            fn(name, dt)


class PhaseTotals:
    """A :class:`Phases` listener: seconds and count of each phase over a run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def __call__(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1

    def mean_ms(self) -> dict[str, float]:
        """Mean milliseconds per occurrence, by phase, in ``PHASES`` order."""
        order = [p for p in PHASES if p in self.seconds] + sorted(
            p for p in self.seconds if p not in PHASES)
        return {p: 1000 * self.seconds[p] / self.counts[p] for p in order}


class LoopHook:
    """Called by :class:`TrainLoop` at fixed points; every method is optional."""

    def on_epoch_start(self, epoch: int) -> None:
        """A fresh epoch begins (not called for an epoch resumed mid-way)."""

    def before_step(self, step: int) -> None:
        """Before the step that takes the run from ``step`` to ``step + 1``."""

    def after_step(self, record: Record) -> None:
        """After a completed step (not after a skipped one), with its record."""

    def on_epoch_end(self, epoch: int) -> None:
        """An epoch ended (or the run reached its last step inside it)."""

    def on_end(self) -> None:
        """The loop finished."""


class RecordHook(LoopHook):
    """Hands every step's record to a callable (live trackers such as TensorBoard)."""

    def __init__(self, fn: Callable[[Record], None]) -> None:
        self.fn = fn

    def after_step(self, record: Record) -> None:
        self.fn(record)

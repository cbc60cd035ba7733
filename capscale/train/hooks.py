"""Loop hooks of a pruning run: snapshot schedule, evaluation schedule, trackers."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from capscale.train.loop import LoopHook, Record

if TYPE_CHECKING:
    from capscale.config import Config


class SnapshotSchedule(LoopHook):
    """When the unstructured methods append an SnC snapshot (Xu et al. 2022, section 3.3).

    ``cap.snapshot_schedule``: ``epoch`` takes one at the start of every epoch but the
    first, as the reference does (its epoch-0 encoding of the still dense student is the
    PrC bank, which capscale encodes at setup), so epoch e has R = e views;
    ``cap.snapshot_first_epoch`` adds one at epoch 0 (R = e + 1). ``milestones`` takes
    one as soon as the scheduled sparsity reaches each fraction of
    ``cap.snapshot_milestones`` of the final sparsity. Snapshots are encoded in
    ``cap.snapshot_train_mode`` (the reference: dropout on). The milestones still due
    are checkpoint state.

    Args:
        cfg: the run config.
        sparsity: the current scheduled sparsity.
        snapshot: ``(train_mode, what)`` -> appends the current student.
    """

    def __init__(self, cfg: Config, sparsity: Callable[[], float],
                 snapshot: Callable[[bool, str], None]) -> None:
        self.cfg, self.sparsity, self.snapshot = cfg, sparsity, snapshot
        self.pending = sorted(cfg.cap.snapshot_milestones)

    def planned(self, epochs: int) -> int:
        """How many snapshots the schedule takes in a run of ``epochs`` epochs."""
        cap = self.cfg.cap
        if cap.snapshot_schedule == "milestones":
            return len(cap.snapshot_milestones)
        return epochs if cap.snapshot_first_epoch else max(epochs - 1, 0)

    def on_epoch_start(self, epoch: int) -> None:
        cap = self.cfg.cap
        if cap.snapshot_schedule == "epoch" and (epoch > 0 or cap.snapshot_first_epoch):
            self.snapshot(cap.snapshot_train_mode, f"snapshot, epoch {epoch}")

    def after_step(self, record: Record) -> None:
        if self.cfg.cap.snapshot_schedule != "milestones":
            return
        final = self.cfg.pruning.final_sparsity
        while self.pending and self.sparsity() >= self.pending[0] * final:
            m = self.pending.pop(0)
            self.snapshot(self.cfg.cap.snapshot_train_mode,
                          f"snapshot at {m:.0%} of final sparsity")

    def state_dict(self) -> dict[str, Any]:
        return {"pending": self.pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = list(state["pending"])


class EvalSchedule(LoopHook):
    """Evaluate every ``train.eval_every`` steps and at the end of every epoch, once per
    step (an epoch that ends on an ``eval_every`` step is evaluated once).

    Args:
        every: steps between evaluations (0: epoch ends only).
        evaluate: ``(epoch)`` -> evaluates and records.
        step: the run's current step.
        last_evaluated: the step of the run's last evaluation (None: none yet).
    """

    def __init__(self, every: int, evaluate: Callable[[int], None],
                 step: Callable[[], int], last_evaluated: Callable[[], int | None]) -> None:
        self.every, self.evaluate = every, evaluate
        self.step, self.last_evaluated = step, last_evaluated

    def _evaluate(self, epoch: int) -> None:
        if self.last_evaluated() != self.step():  # read from the run: survives a resume
            self.evaluate(epoch)

    def after_step(self, record: Record) -> None:
        if self.every and record["step"] % self.every == 0:
            self._evaluate(record["epoch"])

    def on_epoch_end(self, epoch: int) -> None:
        self._evaluate(epoch)


class RecordHook(LoopHook):
    """Hands every step's record to a callable (live trackers such as TensorBoard)."""

    def __init__(self, fn: Callable[[Record], None]) -> None:
        self.fn = fn

    def after_step(self, record: Record) -> None:
        self.fn(record)

"""The schedules of a pruning run that join the loop as hooks: SnC snapshots and
evaluation."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from capscale.train.hooks import LoopHook, Record

if TYPE_CHECKING:
    from capscale.config import CAPConfig
    from capscale.train.state import RunState


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
        cap: the run's ``cap`` section.
        final_sparsity: ``pruning.final_sparsity`` (milestones are fractions of it).
        sparsity: the current scheduled sparsity.
        snapshot: ``(train_mode, what)`` -> appends the current student.
    """

    def __init__(self, cap: CAPConfig, final_sparsity: float, sparsity: Callable[[], float],
                 snapshot: Callable[[bool, str], None]) -> None:
        self.cap, self.final = cap, final_sparsity
        self.sparsity, self.snapshot = sparsity, snapshot
        self.pending = sorted(cap.snapshot_milestones)

    @staticmethod
    def planned(cap: CAPConfig, epochs: int) -> int:
        """How many snapshots the schedule takes in a run of ``epochs`` epochs."""
        if cap.snapshot_schedule == "milestones":
            return len(cap.snapshot_milestones)
        return epochs if cap.snapshot_first_epoch else max(epochs - 1, 0)

    def on_epoch_start(self, epoch: int) -> None:
        cap = self.cap
        if cap.snapshot_schedule == "epoch" and (epoch > 0 or cap.snapshot_first_epoch):
            self.snapshot(cap.snapshot_train_mode, f"snapshot, epoch {epoch}")

    def after_step(self, record: Record) -> None:
        if self.cap.snapshot_schedule != "milestones":
            return
        while self.pending and self.sparsity() >= self.pending[0] * self.final:
            m = self.pending.pop(0)
            self.snapshot(self.cap.snapshot_train_mode,
                          f"snapshot at {m:.0%} of final sparsity")

    def state_dict(self) -> dict[str, Any]:
        return {"pending": self.pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = list(state["pending"])


class EvalSchedule(LoopHook):
    """Evaluate every ``train.eval_every`` steps and at the end of every epoch, once per
    step (an epoch that ends on an ``eval_every`` step is evaluated once), and record
    each evaluation in the run's state.

    Args:
        every: steps between evaluations (0: epoch ends only).
        evaluate: task metrics of the student (collective).
        sparsity: the current scheduled sparsity; sync: called first (masks brought up
            to date with the steps done).
        state: the run's progress (evaluations are appended to ``state.evals``).
        main_metric: the metric logged; log: where the line goes.
    """

    def __init__(self, every: int, evaluate: Callable[[], dict[str, float]],
                 sparsity: Callable[[], float], sync: Callable[[], None], state: RunState,
                 main_metric: str, log: Callable[[str], None]) -> None:
        self.every, self.evaluate, self.sparsity, self.sync = every, evaluate, sparsity, sync
        self.state, self.main_metric, self.log = state, main_metric, log

    def _evaluate(self, epoch: int) -> None:
        st = self.state
        if st.evals and st.evals[-1]["step"] == st.step:  # once per step, across resumes
            return
        self.sync()
        metrics, sp = self.evaluate(), self.sparsity()
        st.evals.append({"step": st.step, "epoch": epoch, "sparsity": sp, "metrics": metrics})
        key = self.main_metric
        self.log(f"step {st.step}: {key} {metrics[key]:.4f} at target sparsity {sp:.3f}")

    def after_step(self, record: Record) -> None:
        if self.every and record["step"] % self.every == 0:
            self._evaluate(record["epoch"])

    def on_epoch_end(self, epoch: int) -> None:
        self._evaluate(epoch)


def snapshot_views(cap: CAPConfig, planned_by_method: int | None, epochs: int) -> int:
    """R_max, the SnC views kept per example: ``cap.max_snapshots``, or when it is null
    every snapshot the run takes (the reference keeps them all): the method's own count
    (``planned_by_method``), else the snapshot schedule's over ``epochs`` epochs."""
    if cap.max_snapshots is not None:
        return cap.max_snapshots
    planned = planned_by_method
    if planned is None:
        planned = SnapshotSchedule.planned(cap, epochs)
    return max(planned, 1)

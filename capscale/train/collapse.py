"""A training collapse, detected while it happens and reported with its remedy.

Movement pruning on a short schedule can collapse silently: the first masks, ranked by a
few steps of score noise, remove weights the model needs, the distillation loss jumps by
an order of magnitude and never comes back, and the student ends at the majority class.
:class:`CollapseDetector` joins the loop as a hook and reads the run's own records
(``state.history``, ``state.evals``), so a resumed run sees what happened before it:

* a **loss jump**: for each of the ``kd`` and ``ce`` components a run logs, the median of
  the ``after`` steps that start at a mask update (a step whose sparsity is above the
  previous one) against the median of the ``before`` steps that precede it (fewer when
  the run has fewer, down to ``min_before``: a run pruned from its first steps has no
  level to compare with). A rise of ``factor`` (10x) or more that does not come back
  below ``sqrt(factor)`` times the earlier level (a trailing ``after``-step median)
  within ``patience`` steps, or by the end of the run, is a collapse. Medians, so a
  single noisy batch neither raises nor clears it; one report per component.
* an **evaluation at the majority-class rate** (classification): dev accuracy at or below
  the share of the most frequent dev label (plus ``tolerance``), when the dense teacher
  (or, without one, an earlier evaluation of the run) was at least ``margin`` above it:
  the student does no better than always answering one class. One report, the first.

Each finding is logged as a warning naming the remedies when it is made, and
:meth:`CollapseDetector.summary` is what ``results.json`` (``collapse``), the summary
table and the report show.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from capscale.train.hooks import LoopHook, Record

if TYPE_CHECKING:
    from capscale.config import PruningConfig
    from capscale.data import TaskData
    from capscale.tasks.base import Task
    from capscale.train.state import RunState

LOSSES = ("kd", "ce")
SCORED = ("movement", "soft_movement", "hybrid")


def majority_rate(labels: Sequence[Any]) -> float | None:
    """The share of the most frequent label (None for no labels)."""
    counts: dict[Any, int] = {}
    for y in labels:
        counts[y] = counts.get(y, 0) + 1
    return max(counts.values()) / len(labels) if counts else None


def remedies(pruning: PruningConfig) -> str:
    """What to change, for this run's pruning settings."""
    out = []
    if pruning.method in SCORED and pruning.score_warm_start == "none":
        out.append("pruning.score_warm_start=magnitude (scores start from |W| instead of 0)")
    if pruning.method == "structured":
        out.append("smaller steps between structured.levels or more retraining per level "
                   "(structured.retrain_steps, retrain_epochs)")
    out.append("a longer schedule or a later pruning.initial_warmup (more dense steps "
               "before the first mask update)")
    if pruning.method in SCORED:
        out.append(f"a lower pruning.score_lr (now {pruning.score_lr:g})")
    return "; ".join(out)


class CollapseDetector(LoopHook):
    """Flags a collapse from the run's step records and evaluations (see module doc).

    Args:
        history: the run's step records (``state.history``, appended to by the loop).
        evals: the run's evaluations (``state.evals``).
        majority: the majority-class rate of the dev set, or None (not classification).
        reference: the dense teacher's dev accuracy, or None.
        remedy: what the warnings advise (:func:`remedies`).
        warn: where a finding is written when it is made (the console's warnings).
        factor, before, min_before, after, patience, tolerance, margin: the thresholds
            above.
    """

    def __init__(self, history: list[Record], evals: list[dict[str, Any]],
                 majority: float | None, reference: float | None, remedy: str,
                 warn: Callable[[str], None], factor: float = 10.0, before: int = 10,
                 min_before: int = 5, after: int = 5, patience: int = 20,
                 tolerance: float = 0.005, margin: float = 0.02) -> None:
        self.history, self.evals = history, evals
        self.majority, self.reference, self.remedy, self.warn = majority, reference, remedy, warn
        self.factor, self.before, self.after, self.patience = factor, before, after, patience
        self.min_before = min_before
        self.tolerance, self.margin = tolerance, margin
        self.events: list[dict[str, Any]] = []
        self._seen = self._evals_seen = 0
        self._open: dict[str, dict[str, Any]] = {}  # loss -> a jump not yet resolved
        self._reported: set[str] = set()
        self._best_eval: float | None = None

    @classmethod
    def for_run(cls, pruning: PruningConfig, state: RunState, data: TaskData, task: Task,
                teacher_metrics: dict[str, float] | None, warn: Callable[[str], None]
                ) -> CollapseDetector:
        """The detector of a pruning run: its records, its dev set's majority-class rate
        (classification), its teacher's accuracy and the remedies for its settings."""
        labelled = "labels" in (data.validation.column_names or [])
        majority = (majority_rate(data.validation["labels"])
                    if task.class_labels and data.label_names and labelled else None)
        return cls(state.history, state.evals, majority,
                   (teacher_metrics or {}).get("accuracy"), remedies(pruning), warn)

    # -- hook points ---------------------------------------------------------------------
    def after_step(self, record: Record) -> None:
        self.scan()

    def on_epoch_end(self, epoch: int) -> None:
        self.scan()

    def on_end(self) -> None:
        self.scan(final=True)

    # -- detection -----------------------------------------------------------------------
    def scan(self, final: bool = False) -> None:
        """Read the records and evaluations added since the last call; ``final``: the run
        ended, so a jump still up is reported."""
        while self._seen < len(self.history):
            self._seen += 1
            for name in LOSSES:
                if name not in self._reported:
                    self._loss_at(name, self._seen - 1)
        while self._evals_seen < len(self.evals):
            self._evaluation(self.evals[self._evals_seen])
            self._evals_seen += 1
        if final:
            for name, jump in list(self._open.items()):
                self._report_jump(name, jump, "by the end of the run")

    def _values(self, name: str, start: int, stop: int) -> list[float] | None:
        """The ``name`` component of records ``start:stop``; None when one lacks it."""
        if start < 0:
            return None
        values = [self.history[i].get(name) for i in range(start, stop)]
        if any(v is None or not math.isfinite(v) for v in values):
            return None
        return [float(v) for v in values if v is not None]

    def _loss_at(self, name: str, i: int) -> None:
        """Record ``i`` has arrived: resolve an open jump, or test the mask update whose
        ``after`` window it completes."""
        jump = self._open.get(name)
        if jump is not None:
            trailing = self._values(name, i - self.after + 1, i + 1)
            if trailing is not None and statistics.median(trailing) <= \
                    math.sqrt(self.factor) * jump["before"]:
                del self._open[name]  # it came back: a transient, not a collapse
            elif i >= jump["index"] + self.after - 1 + self.patience:
                self._report_jump(name, jump, f"within {self.patience} steps")
            return
        j = i - self.after + 1  # the mask update this record completes the window of
        if j < max(self.min_before, 1):
            return
        sp_now, sp_prev = self.history[j].get("sparsity"), self.history[j - 1].get("sparsity")
        if sp_now is None or sp_prev is None or sp_now <= sp_prev:
            return
        n = min(self.before, j)
        before = self._values(name, j - n, j)
        after = self._values(name, j, i + 1)
        if before is None or after is None:
            return
        level, peak = statistics.median(before), statistics.median(after)
        if level > 0 and peak >= self.factor * level:
            self._open[name] = {"step": self.history[j].get("step", j + 1), "index": j,
                                "sparsity": sp_now, "before": level, "after": peak,
                                "before_steps": n}

    def _report_jump(self, name: str, jump: dict[str, Any], when: str) -> None:
        del self._open[name]
        self._reported.add(name)
        ratio = jump["after"] / jump["before"]
        message = (
            f"training collapse: the {name} loss jumped {ratio:.0f}x at the mask update of "
            f"step {jump['step']} (sparsity {jump['sparsity']:.1%}): median "
            f"{jump['before']:.4g} over the {jump['before_steps']} steps before, "
            f"{jump['after']:.4g} over the {self.after} after, and it did not come back "
            f"{when}. Remedies: "
            f"{self.remedy}")
        self._add({"kind": "loss_jump", "loss": name, "step": jump["step"],
                   "sparsity": jump["sparsity"], "before": jump["before"],
                   "after": jump["after"], "ratio": ratio, "message": message})

    def _evaluation(self, ev: dict[str, Any]) -> None:
        acc = (ev.get("metrics") or {}).get("accuracy")
        if acc is None or self.majority is None:
            return
        reference = self.reference if self.reference is not None else self._best_eval
        self._best_eval = acc if self._best_eval is None else max(self._best_eval, acc)
        if "majority" in self._reported or reference is None:
            return
        if acc <= self.majority + self.tolerance and reference >= self.majority + self.margin:
            self._reported.add("majority")
            whose = "the dense teacher" if self.reference is not None else "this run, earlier,"
            message = (
                f"training collapse: dev accuracy {acc:.4f} at step {ev.get('step')} "
                f"(sparsity {ev.get('sparsity') or 0.0:.1%}) is no better than always "
                f"answering the most frequent dev label (the majority-class rate "
                f"{self.majority:.4f}; {whose} had {reference:.4f}). Remedies: {self.remedy}")
            self._add({"kind": "majority_class", "step": ev.get("step"),
                       "sparsity": ev.get("sparsity"), "accuracy": acc,
                       "majority_rate": self.majority, "reference": reference,
                       "message": message})

    def _add(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.warn(event["message"])

    def summary(self) -> dict[str, Any]:
        """``results.json``'s ``collapse``: whether one was found, each finding, and the
        thresholds used."""
        return {"detected": bool(self.events), "events": list(self.events),
                "checks": {"loss_factor": self.factor, "before_steps": self.before,
                           "min_before_steps": self.min_before,
                           "after_steps": self.after, "patience_steps": self.patience,
                           "majority_rate": self.majority, "reference_accuracy":
                           self.reference}}

"""What a pruning method is, and what it is handed: the base classes of the method table.

* :class:`PruningMethod`: an entry of the table (capscale.pruning.methods) that
  ``pruning.method`` names. It says what the method learns and exports, plans the run's
  length and SnC snapshots from the config alone, puts its masks on a bare model (the
  student, a plain copy, ``capscale export``'s skeleton) and builds the run's controller.
* :class:`PruningController`: one run's pruning, a :class:`~capscale.train.hooks.LoopHook`
  that moves the masks along the method's schedule. Every optional capability has a
  default here (no scores, no regulariser, no curve, no latency target, a masked dense
  export), so the recipe calls each one without asking whether it exists.
* :class:`PruningContext`: everything a controller may use of the run, as values and
  bound callables, built by the recipe once the student is loaded. A controller keeps
  no handle on the recipe.
* :class:`ExportPlan`: what the controller wants written: the masked model with its
  masks baked in, or a physically smaller one with the listed heads and FFN neurons.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from capscale.train.hooks import LoopHook

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from capscale.config import PruningConfig, StructuredConfig
    from capscale.console import Console
    from capscale.distributed import DistContext, Strategy
    from capscale.models.adapters import EncoderAdapter
    from capscale.pruning.masked import MaskedLinear
    from capscale.train.hooks import Phases
    from capscale.train.state import RunState

Batch = dict[str, Tensor]


@dataclass(frozen=True)
class PruningContext:
    """What a controller receives from the run.

    Values:
        pruning, structured: the config sections of the method.
        seed: ``train.seed`` (seeded draws that a resume repeats).
        ctx: ranks, device, collectives.
        strategy: how the student is wrapped / sharded.
        adapter: where the student's heads, FFN and prunable linears are.
        state: the run's progress (step, epoch, evaluations).
        total_steps: optimiser steps of the whole run.
        steps_per_epoch: optimiser steps per epoch (this rank's training batches //
            ``train.gradient_accumulation_steps``).
        phases: the step's timed sections (``mask_update``).
        console: log lines and progress bars.
        main_metric: the task's main metric (log lines, the curve).
        importance_loader: training batches of this rank for importance scores.

    Callables (bound to the run; the student ones are valid once it is prepared):
        student: the student as the strategy prepared it (wrapped).
        full_student: an unsharded copy with masks attached on the main rank, None on
            the others (collective).
        evaluate: task metrics of the student on the evaluation set (collective).
        snapshot: ``(train_mode, what)`` appends the student as a new SnC view.
        loss_fn: ``(bare model, batch)`` -> the full objective of the batch.
        fresh_optimizer: ``(first_step, length)`` starts a new AdamW and LR schedule.
        pause_references: a context in which the contrastive objective's banks and
            queues are not updated (importance passes).
    """

    pruning: PruningConfig
    structured: StructuredConfig
    seed: int
    ctx: DistContext
    strategy: Strategy
    adapter: EncoderAdapter
    state: RunState
    total_steps: int
    steps_per_epoch: int
    phases: Phases
    console: Console
    main_metric: str
    importance_loader: DataLoader
    student: Callable[[], nn.Module]
    full_student: Callable[[], nn.Module | None]
    evaluate: Callable[[], dict[str, float]]
    snapshot: Callable[[bool, str], None]
    loss_fn: Callable[[nn.Module, Batch], Tensor]
    fresh_optimizer: Callable[[int, int], None]
    pause_references: Callable[[], contextlib.AbstractContextManager[None]]


@dataclass(frozen=True)
class ExportPlan:
    """What to write at the end of a run (capscale.export.write_export).

    ``heads`` / ``ffn`` None: the masked model, masks baked into a dense checkpoint;
    else per layer bool keep masks (H,) and (I_l,): a physically smaller model.
    """

    heads: list[Tensor] | None = None
    ffn: list[Tensor] | None = None
    hidden: Tensor | None = None  # (H,) keep mask of the hidden dimensions, or None

    @property
    def physical(self) -> bool:
        return self.heads is not None


class PruningController(LoopHook):
    """One run's pruning: the loop hooks plus the calls below, each with a default."""

    def __init__(self, run: PruningContext) -> None:
        self.run = run

    def setup(self, model: nn.Module) -> None:
        """Attach to the bare student before the strategy wraps it."""

    def score_parameters(self) -> list[nn.Parameter]:
        """Parameters trained in their own optimiser group (``pruning.score_lr``)."""
        return []

    def lr_segment(self, step: int) -> tuple[int, int]:
        """(first step, length) of the LR schedule that ``step`` falls in."""
        return 0, self.run.total_steps

    def current_sparsity(self) -> float:
        """The sparsity the schedule is at now."""
        return 0.0

    def regularization(self) -> Tensor | None:
        """A term added to the loss (soft movement's L1 on the scores), or None."""
        return None

    def sync_masks(self) -> None:
        """Re-derive the masks for the steps done (before an evaluation)."""

    def report(self) -> dict[str, Any]:
        """Sparsity of the student in the keys of ``sparsity_report`` (collective)."""
        raise NotImplementedError

    def export_plan(self, model: nn.Module) -> ExportPlan:
        """What to export of ``model``, the unsharded student with masks attached (main
        rank); it may edit ``model`` (e.g. remove its own masked layers)."""
        return ExportPlan()

    def curve(self) -> list[dict[str, Any]] | None:
        """The accuracy-vs-sparsity curve, when the method measures one."""
        return None

    def latency_summary(self) -> dict[str, Any] | None:
        """The latency target's measurements (``pruning.target_latency_ms``), if any."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class PruningMethod:
    """An entry of the method table; subclasses set the flags and override what differs.

    Attributes:
        name: the ``pruning.method`` value.
        learns_scores: it trains a score per weight (or unit) next to the weights.
        physical_export: its export removes what it prunes (smaller, faster model).
        evaluates_itself: the controller evaluates and snapshots at its own milestones
            instead of the run's evaluation and snapshot schedules.
    """

    name: str = ""
    learns_scores: bool = False
    physical_export: bool = False
    evaluates_itself: bool = False

    def refuses(self, objective: str) -> str | None:
        """Why this method cannot run with objective ``objective`` (None: it can)."""
        return None

    def refuses_strategy(self, strategy: str) -> str | None:
        """Why this method cannot run under ``strategy`` (None: it can)."""
        return None

    def attach(self, model: nn.Module, adapter: EncoderAdapter, pruning: PruningConfig
               ) -> dict[str, MaskedLinear]:
        """Put the method's masks on a bare model; returns its masked layers by
        ``layer.role`` (none for methods whose masks live outside the model)."""
        return {}

    def planned_steps(self, default: int, structured: StructuredConfig,
                      steps_per_epoch: int) -> int:
        """Optimiser steps of the run; ``default`` is what the train section asks for."""
        return default

    def planned_snapshots(self, pruning: PruningConfig, structured: StructuredConfig
                          ) -> int | None:
        """SnC snapshots the method takes itself (``evaluates_itself``); None: the run's
        snapshot schedule decides."""
        return None

    def controller(self, run: PruningContext) -> PruningController:
        raise NotImplementedError


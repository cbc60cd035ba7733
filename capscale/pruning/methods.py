"""The pruning method table: what each ``pruning.method`` prunes, and how.

An entry (:class:`PruningMethod`) says what scores the method learns, whether its
export removes what it prunes (a physically smaller model) or bakes masks into a dense
checkpoint, which objectives it refuses, and builds the run's
:class:`PruningController`: a :class:`~capscale.train.loop.LoopHook` that attaches masks to
the student, moves them along its schedule, adds its regulariser to the loss, reports
sparsity and exports. Built-in entries:

* ``movement`` / ``soft_movement`` / ``magnitude``: unstructured weight masks through a
  :mod:`~capscale.pruning.weight_rules` rule and the cubic schedule (:class:`WeightPruning`);
* ``structured``: heads and FFN neurons, CAP-f (:mod:`capscale.pruning.structured_run`);
* ``hybrid``: movement scores on whole heads and FFN neurons, exported physically
  smaller (:mod:`capscale.pruning.hybrid`);
* ``none``: no pruning (distillation and contrastive terms only).

A new unstructured method is one rule and one entry::

    register_pruning_method(WeightPruning(MyRule()))
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from capscale.errors import ConfigError
from capscale.pruning.accounting import sparsity_report
from capscale.pruning.masked import MaskedLinear, Pruner, attach_masks
from capscale.pruning.weight_rules import WEIGHT_RULES, WeightRule, register_weight_rule
from capscale.registry import add_entry
from capscale.train.loop import LoopHook

if TYPE_CHECKING:
    from capscale.config import Config
    from capscale.distributed import DistContext, Strategy
    from capscale.models.adapters import EncoderAdapter
    from capscale.train.loop import Phases
    from capscale.train.state import RunState


class PruningRun(Protocol):
    """What a controller may use of the run (implemented by capscale.recipe)."""

    cfg: Config
    ctx: DistContext
    strategy: Strategy
    adapter: EncoderAdapter
    state: RunState
    total_steps: int
    phases: Phases

    def student_module(self) -> nn.Module:
        """The student as the strategy prepared it (wrapped)."""
        ...

    def evaluate(self) -> dict[str, float]:
        """Task metrics of the student on the evaluation set (collective)."""
        ...

    def snapshot(self, train_mode: bool, what: str) -> None:
        """Append the current student as a new view of every snapshot module."""
        ...

    def full_student(self) -> nn.Module | None:
        """The unsharded student (masks attached) on the main rank; collective."""
        ...

    def export_dense(self, model: nn.Module, out_dir: Path, extra: dict[str, Any] | None
                     ) -> dict[str, Any]:
        """Write ``model`` (masks baked in) as a Hugging Face checkpoint (main rank)."""
        ...


@runtime_checkable
class PruningController(Protocol):
    """One run's pruning: the loop hooks plus the calls below."""

    def attach(self, model: nn.Module) -> None:
        """Put the method's masks on a bare model (the student, or a plain copy)."""
        ...

    def setup(self, model: nn.Module) -> None:
        """Attach to the bare student before the strategy wraps it."""
        ...

    def score_parameters(self) -> list[nn.Parameter]:
        """Parameters trained in their own optimiser group (``pruning.score_lr``)."""
        ...

    def planned_steps(self, default: int) -> int:
        """Optimiser steps of the run; ``default`` is what the train section asks for."""
        ...

    def lr_segment(self, step: int) -> tuple[int, int]:
        """(first step, length) of the LR schedule that ``step`` falls in."""
        ...

    def current_sparsity(self) -> float: ...

    def regularization(self) -> Tensor | None: ...

    def report(self) -> dict[str, Any]:
        """Sparsity of the student in the keys of ``sparsity_report`` (collective)."""
        ...

    def export(self, out_dir: Path, extra: dict[str, Any] | None = None
               ) -> dict[str, Any] | None:
        """Write the pruned model (collective; the main rank writes and gets the
        export's report, other ranks None)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class PruningMethod(Protocol):
    """An entry of :data:`PRUNING_METHODS`."""

    name: str
    learns_scores: bool
    physical_export: bool  # the export removes what is pruned (smaller, faster model)
    evaluates_itself: bool  # the controller evaluates (milestones) instead of each epoch

    def refuses(self, objective: str) -> str | None:
        """Why this method cannot run with objective ``objective`` (None: it can)."""
        ...

    def controller(self, run: PruningRun) -> PruningController: ...


class WeightMaskController(LoopHook):
    """Unstructured masks (:class:`MaskedLinear`) on every prunable encoder linear,
    moved along the cubic schedule before every step."""

    def __init__(self, rule: WeightRule, run: PruningRun) -> None:
        self.rule, self.run = rule, run
        self.pruner: Pruner | None = None

    def attach(self, model: nn.Module) -> dict[str, MaskedLinear]:
        p = self.run.cfg.pruning
        return attach_masks(model, self.run.adapter, self.rule, p.score_init, p.min_keep)

    def setup(self, model: nn.Module) -> None:
        run = self.run
        modules = self.attach(model)
        if run.cfg.pruning.score_warm_start == "magnitude":
            warm_start_from_magnitude(modules.values(), run.cfg.pruning.score_warm_start_scale)
        # Global top-k reads each rank's shard of the scores (exact bisection, no gather);
        # replicated scores (single / ddp) are counted once, without a sum over ranks.
        sharded = run.ctx.distributed and run.strategy.shards_parameters
        self.pruner = Pruner(modules, run.cfg.pruning, run.total_steps,
                             all_reduce=run.ctx.all_reduce_sum if sharded else None,
                             local_importance=run.strategy.local_importance)
        p = run.cfg.pruning
        if modules and p.final_sparsity > p.initial_sparsity \
                and self.pruner.t_i >= run.total_steps:
            raise ConfigError(
                f"pruning.initial_warmup = {p.initial_warmup:g}: {self.pruner.t_i} steps at "
                f"the initial sparsity, but the run has {run.total_steps} steps, so it "
                "would never prune; give fewer steps or a fraction of the run")
        run.strategy.bind_masks(modules.values(), run.cfg.pruning.zero_pruned_weights)

    def score_parameters(self) -> list[nn.Parameter]:
        return self.pruner.score_parameters()

    def planned_steps(self, default: int) -> int:
        return default

    def lr_segment(self, step: int) -> tuple[int, int]:
        return 0, self.run.total_steps

    def before_step(self, step: int) -> None:
        with self.run.phases("mask_update"):
            self.pruner.update(step)

    def current_sparsity(self) -> float:
        return self.pruner.sparsity

    def sync_masks(self) -> None:
        """Re-derive the masks for the steps done: the optimiser step after the last
        update moved the scores (a global threshold would otherwise be stale)."""
        self.pruner.update(self.run.state.step)

    def regularization(self) -> Tensor | None:
        return self.pruner.regularization()

    def report(self) -> dict[str, Any]:
        run = self.run
        with run.strategy.gathered(run.student_module()) as bare:
            masks = {k: v.cpu() for k, v in self.pruner.masks().items()}
            return sparsity_report(bare, run.adapter, masks)

    def export(self, out_dir: Path, extra: dict[str, Any] | None = None
               ) -> dict[str, Any] | None:
        model = self.run.full_student()  # collective: gathers a sharded student
        return None if model is None else self.run.export_dense(model, out_dir, extra)

    def state_dict(self) -> dict[str, Any]:
        return {"sparsity": self.pruner.sparsity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pruner.sparsity = state["sparsity"]


@torch.no_grad()
def warm_start_from_magnitude(modules: Iterable[MaskedLinear], scale: float) -> None:
    """Start learned scores at ``scale * |W| / mean|W|`` (per matrix) instead of a constant.

    Movement scores trained by AdamW move by about ``score_lr`` a step whatever the size
    of their gradient, so after a short dense warm-up they rank weights by how
    consistently their movement kept one sign, not by how much the loss depends on
    them, and many still tie at their initial value: the first weights removed can be
    large and important. Seeding the scores with the weights' magnitude makes the
    first masks magnitude masks; movement then reorders them, a weight needing about
    ``scale / score_lr`` steps of consistent movement to overtake one of mean magnitude.
    Off by default and in the paper recipes (the reference starts every score at 0).
    """
    for m in modules:
        if m.mask_scores is None:
            continue
        w = m.weight.detach().abs().float()
        m.mask_scores.copy_((scale * w / w.mean().clamp_min(1e-12)).to(m.mask_scores.dtype))


class NoPruningController(WeightMaskController):
    """``none``: the student stays dense (sparsity 0)."""

    def __init__(self, run: PruningRun) -> None:
        super().__init__(WEIGHT_RULES["movement"], run)

    def attach(self, model: nn.Module) -> dict[str, MaskedLinear]:
        return {}

    def current_sparsity(self) -> float:
        return 0.0


class WeightPruning:
    """An unstructured entry: ``rule`` computes each matrix's mask."""

    physical_export = False
    evaluates_itself = False

    def __init__(self, rule: WeightRule) -> None:
        self.rule = rule
        self.name = rule.name
        self.learns_scores = rule.has_scores

    def refuses(self, objective: str) -> str | None:
        return None

    def controller(self, run: PruningRun) -> PruningController:
        return WeightMaskController(self.rule, run)


class NoPruning(WeightPruning):
    name = "none"
    learns_scores = False

    def __init__(self) -> None:
        pass

    def controller(self, run: PruningRun) -> PruningController:
        return NoPruningController(run)


class StructuredPruning:
    """``structured`` (CAP-f): see capscale.pruning.structured_run."""

    name = "structured"
    learns_scores = False
    physical_export = True
    evaluates_itself = True

    def refuses(self, objective: str) -> str | None:
        return None

    def controller(self, run: PruningRun) -> PruningController:
        from capscale.pruning.structured_run import StructuredController
        return StructuredController(run)


class HybridPruning(StructuredPruning):
    """``hybrid``: movement scores on whole heads and FFN neurons, exported physically
    smaller (capscale.pruning.hybrid)."""

    name = "hybrid"
    learns_scores = True
    evaluates_itself = False

    def controller(self, run: PruningRun) -> PruningController:
        from capscale.pruning.hybrid import HybridController
        return HybridController(run)


PRUNING_METHODS: dict[str, Any] = {}


def register_pruning_method(method: PruningMethod, overwrite: bool = False) -> PruningMethod:
    """Add ``method`` to the table (``pruning.method`` selects it by name). A
    :class:`WeightPruning` entry also makes its rule known to the masked layers."""
    if method.name in PRUNING_METHODS and not overwrite:  # refused before the rule joins
        add_entry(PRUNING_METHODS, method.name, method, "pruning method")
    if (isinstance(method, WeightPruning) and not isinstance(method, NoPruning)
            and WEIGHT_RULES.get(method.rule.name) is not method.rule):
        register_weight_rule(method.rule, overwrite=overwrite)
    return add_entry(PRUNING_METHODS, method.name, method, "pruning method", overwrite)


for _name in ("movement", "soft_movement", "magnitude"):
    register_pruning_method(WeightPruning(WEIGHT_RULES[_name]))
register_pruning_method(StructuredPruning())
register_pruning_method(HybridPruning())
register_pruning_method(NoPruning())


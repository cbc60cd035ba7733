"""Unstructured pruning: a mask per weight of every prunable encoder linear.

``movement`` / ``soft_movement`` / ``magnitude`` are each a :class:`WeightPruning` entry
around one :mod:`~capscale.pruning.weight_rules` rule: :class:`MaskedLinear` layers
share the original Parameters, and a :class:`~capscale.pruning.masked.Pruner` moves
their masks along the cubic schedule before every step (top-k per matrix, one exact
global threshold, or an N:M pattern). ``none`` keeps the student dense (distillation
and contrastive terms only). The export bakes the masks into a dense checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from capscale.errors import ConfigError
from capscale.pruning.accounting import sparsity_report
from capscale.pruning.controller import PruningContext, PruningController, PruningMethod
from capscale.pruning.masked import MaskedLinear, Pruner, attach_masks
from capscale.pruning.weight_rules import SoftMovementRule, WeightRule

if TYPE_CHECKING:
    from capscale.config import PruningConfig
    from capscale.models.adapters import EncoderAdapter


class WeightMaskController(PruningController):
    """Masks moved along the cubic schedule before every step by one
    :class:`~capscale.pruning.masked.Pruner` per group of masked layers (one group: every
    layer; :meth:`groups` splits them when their scores must be ranked apart)."""

    zero_pruned_weights = True  # a strategy may zero what the masks prune

    def __init__(self, method: PruningMethod, run: PruningContext) -> None:
        super().__init__(run)
        self.method = method
        self.pruners: list[Pruner] = []
        self.modules: dict[str, MaskedLinear] = {}

    @property
    def pruner(self) -> Pruner:
        """The first (for most methods the only) pruner."""
        return self.pruners[0]

    def warm_start(self, modules: dict[str, MaskedLinear], scale: float) -> None:
        """``pruning.score_warm_start: magnitude``: scores seeded from the weights."""
        warm_start_from_magnitude(modules.values(), scale)

    def groups(self, modules: dict[str, MaskedLinear]) -> list[dict[str, MaskedLinear]]:
        """The masked layers ranked together, one Pruner each."""
        return [modules]

    def setup(self, model: nn.Module) -> None:
        run, p = self.run, self.run.pruning
        modules = self.method.attach(model, run.adapter, p)
        if p.score_warm_start == "magnitude":
            self.warm_start(modules, p.score_warm_start_scale)
        # Global top-k reads each rank's shard of the scores (exact bisection, no gather);
        # replicated scores (single / ddp) are counted once, without a sum over ranks.
        sharded = run.ctx.distributed and run.strategy.shards_parameters
        self.pruners = [Pruner(group, p, run.total_steps,
                               all_reduce=run.ctx.all_reduce_sum if sharded else None,
                               local_importance=run.strategy.local_importance)
                        for group in self.groups(modules)]
        if modules and p.final_sparsity > p.initial_sparsity \
                and self.pruner.t_i >= run.total_steps:
            raise ConfigError(
                f"pruning.initial_warmup = {p.initial_warmup:g}: {self.pruner.t_i} steps at "
                f"the initial sparsity, but the run has {run.total_steps} steps, so it "
                "would never prune; give fewer steps or a fraction of the run")
        run.strategy.bind_masks(modules.values(),
                                self.zero_pruned_weights and p.zero_pruned_weights)
        self.modules = modules

    def score_parameters(self) -> list[nn.Parameter]:
        return [s for pr in self.pruners for s in pr.score_parameters()]

    def before_step(self, step: int) -> None:
        with self.run.phases("mask_update"):
            for pr in self.pruners:
                pr.update(step)

    def current_sparsity(self) -> float:
        return self.pruner.sparsity

    def sync_masks(self) -> None:
        """Re-derive the masks for the steps done: the optimiser step after the last
        update moved the scores (a global threshold would otherwise be stale)."""
        for pr in self.pruners:
            pr.update(self.run.state.step)

    def regularization(self) -> Tensor | None:
        terms = [r for r in (pr.regularization() for pr in self.pruners) if r is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def report(self) -> dict[str, Any]:
        run = self.run
        with run.strategy.gathered(run.student()) as bare:
            masks = {k: v.cpu() for k, v in self.pruner.masks().items()}
            return sparsity_report(bare, run.adapter, masks)

    def state_dict(self) -> dict[str, Any]:
        return {"sparsity": self.pruner.sparsity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for pr in self.pruners:
            pr.sparsity = state["sparsity"]


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
    On by default; off in the paper recipes (the reference starts every score at 0).
    """
    for m in modules:
        if m.mask_scores is None:
            continue
        w = m.weight.detach().abs().float()
        m.mask_scores.copy_((scale * w / w.mean().clamp_min(1e-12)).to(m.mask_scores.dtype))


class WeightPruning(PruningMethod):
    """An unstructured entry: ``rule`` computes each matrix's mask."""

    def __init__(self, rule: WeightRule) -> None:
        self.rule = rule
        self.name = rule.name
        self.learns_scores = rule.has_scores

    def attach(self, model: nn.Module, adapter: EncoderAdapter, pruning: PruningConfig
               ) -> dict[str, MaskedLinear]:
        return attach_masks(model, adapter, self.rule, pruning.score_init, pruning.min_keep)

    def controller(self, run: PruningContext) -> PruningController:
        return WeightMaskController(self, run)

    def refuses_strategy(self, strategy: str) -> str | None:
        # Soft movement's L1 term reads every score outside the forward, where zero3 and
        # fsdp2 hold only this rank's shard (zero3: an empty tensor, so a NaN term;
        # fsdp2: a DTensor that the loss cannot mix with plain tensors).
        if isinstance(self.rule, SoftMovementRule) and strategy in ("zero3", "fsdp2"):
            return ("its L1 penalty on the sigmoid scores reads every score outside the "
                    "forward, which this strategy shards; use strategy ddp (or single), or "
                    "pruning.method=movement")
        return None


class NoPruningController(PruningController):
    """``none``: the student stays dense (sparsity 0)."""

    def report(self) -> dict[str, Any]:
        run = self.run
        with run.strategy.gathered(run.student()) as bare:
            return sparsity_report(bare, run.adapter, {})


class NoPruning(PruningMethod):
    """``none``: no masks; distillation and contrastive terms only."""

    name = "none"

    def controller(self, run: PruningContext) -> PruningController:
        return NoPruningController(run)

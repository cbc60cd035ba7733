"""Structured CAP (CAP-f) as a pruning controller: heads and FFN neurons, level by level.

The controller plugs into the one training loop like any pruning method; what differs
is what it prunes (activation masks, :class:`~capscale.pruning.structured.StructuredMasks`)
and its schedule (Xu et al., AAAI 2022, section 4; Michel et al., NeurIPS 2019):

* ``iterative`` (reference): for each level in ``structured.levels`` (default 10% ->
  90% in 10% steps, the same fraction of heads and of FFN neurons), compute Taylor
  importance with the full CAP loss in eval mode, prune the least important units
  (ranked globally after per-layer L2 normalisation, at least ``min_heads_per_layer``
  heads per layer), retrain ``retrain_epochs`` epochs (or ``retrain_steps``) with a
  fresh optimiser and LR schedule, then evaluate and append one SnC snapshot (eval
  mode). One run yields the whole accuracy-vs-sparsity curve.
* ``cubic``: one training run; every ``update_every`` steps the target
  ``cubic_sparsity(step)`` is recomputed and, when it grew, importance and masks too.
  Each level of ``structured.levels`` is evaluated and snapshotted just before the
  first update that prunes past it (and at the end).

Every decision is a function of the step, so a run resumed from any checkpoint (inside
a level or between two) takes the same decisions as an uninterrupted one; the masks,
the current level and the milestones still due are the controller's checkpoint state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from capscale.pruning.controller import (
    ExportPlan,
    PruningContext,
    PruningController,
    PruningMethod,
)
from capscale.pruning.hidden import select_hidden
from capscale.pruning.latency import LatencyTarget
from capscale.pruning.schedule import cubic_sparsity, warmup_steps
from capscale.pruning.structured import (
    Importance,
    StructuredMasks,
    select_structure,
    structured_param_counts,
    taylor_importance,
)
from capscale.train.loop import set_epoch

if TYPE_CHECKING:
    from capscale.config import PruningConfig, StructuredConfig

EPS = 1e-9
LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]  # (bare model, batch) -> loss


class StructuredController(PruningController):
    """CAP-f's schedule on the shared loop (see the module docstring). Importance uses
    the context's ``importance_loader``, ``loss_fn`` and ``pause_references``; each
    iterative level starts a ``fresh_optimizer``."""

    def __init__(self, run: PruningContext) -> None:
        super().__init__(run)
        self.scfg = run.structured
        self._masks: StructuredMasks | None = None
        self.level = 0.0  # fraction of heads and of FFN neurons currently pruned
        self.pending: list[float] = []  # milestones still to evaluate and snapshot
        self.latency = LatencyTarget(run)  # pruning.target_latency_ms

    # -- the controller protocol -----------------------------------------------------
    @property
    def masks(self) -> StructuredMasks:
        """The head and neuron masks, hooked into the student as the strategy prepared
        it (made on first use, after the wrapping)."""
        if self._masks is None:
            self._masks = StructuredMasks(self.run.strategy.unwrap(self.run.student()),
                                          self.run.adapter, self.scfg.hidden_sparsity > 0)
        return self._masks

    def setup(self, model: nn.Module) -> None:
        if self.scfg.schedule == "iterative":
            self.pending = list(self.scfg.levels)
        else:
            final = self.run.pruning.final_sparsity
            self.pending = [v for v in self.scfg.levels if v <= final + EPS]

    @property
    def steps_per_level(self) -> int:
        """Retraining steps after each iterative level."""
        return steps_per_level(self.scfg, self.run.steps_per_epoch)

    def lr_segment(self, step: int) -> tuple[int, int]:
        if self.scfg.schedule != "iterative":
            return 0, self.run.total_steps
        per = self.steps_per_level
        return (step // per) * per, per

    def current_sparsity(self) -> float:
        return self.level

    # -- schedule --------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        if self.scfg.schedule == "iterative":
            per = self.steps_per_level
            if step % per == 0:
                index = step // per
                if index > 0:
                    self._milestone(self.scfg.levels[index - 1])
                if not self.latency.frozen:  # a met latency target stops pruning
                    with self.run.phases("mask_update"):
                        self.prune_to(self.scfg.levels[index])
                    self._check_latency()
                self.run.fresh_optimizer(step, per)
            return
        if step % self.scfg.update_every:
            return
        p = self.run.pruning
        total = self.run.total_steps
        target = cubic_sparsity(step, total, p.initial_sparsity, p.final_sparsity,
                                warmup_steps(p.initial_warmup, total),
                                warmup_steps(p.final_warmup, total))
        if target > self.level + EPS and not self.latency.frozen:
            self._flush(target)
            with self.run.phases("mask_update"):
                self.prune_to(target)
            self._check_latency()

    def _check_latency(self) -> None:
        """With a latency target: measure the export at the current masks (pruning
        stops for good once it is met)."""
        if self.latency.enabled:
            self.latency.check(self.level, lambda copy: self.masks.keep(),
                               self.masks.hidden_keep())

    def on_end(self) -> None:
        if self.scfg.schedule == "iterative":
            if self.pending:
                self._milestone(self.pending[-1])
            self.latency.warn_if_missed(self.level, "structured.levels")
            return
        final = self.run.pruning.final_sparsity
        if self.level < final - EPS and not self.latency.frozen:  # last update between steps
            self.prune_to(final)
            self._check_latency()
        self.latency.warn_if_missed(self.level, "pruning.final_sparsity")
        self._flush(math.inf)
        if not self.run.state.evals:
            self._milestone(self.level)

    def _flush(self, upto: float) -> None:
        while self.pending and self.level >= self.pending[0] - EPS \
                and upto > self.pending[0] + EPS:
            self._milestone(self.pending[0])

    def _milestone(self, level: float) -> None:
        """Evaluate at a sparsity milestone and append an SnC snapshot (eval mode)."""
        if level in self.pending:
            self.pending.remove(level)
        run = self.run
        metrics = run.evaluate()
        sp = self.masks.sparsity()
        counts = structured_param_counts(run.strategy.unwrap(run.student()),
                                         run.adapter, *self.masks.keep(),
                                         self.masks.hidden_keep())
        run.state.evals.append({"step": run.state.step, "level": level,
                                "sparsity": self.level, **sp,
                                "encoder_sparsity": counts["encoder_sparsity"],
                                "metrics": metrics})
        key = run.main_metric
        run.console.log(f"milestone {level:.0%} (step {run.state.step}): {key} "
                        f"{metrics[key]:.4f}, encoder sparsity "
                        f"{counts['encoder_sparsity']:.3f}")
        run.snapshot(False, f"snapshot at {level:.0%}")

    # -- importance and masks --------------------------------------------------------
    def importance(self) -> Importance:
        """Taylor importance over ``importance_fraction`` of the training set, with the
        full CAP loss, in eval mode (identical on every rank).

        It differentiates the masks only, on the bare student: a data-parallel wrapper
        would expect a parameter backward after its forward. Under the sharded
        strategies the bare module keeps its gathering hooks (ZeRO-3 registers them on
        the submodules, FSDP2 is the module itself), and since no parameter gradient
        is produced, no reduce-scatter runs and the optimiser sees nothing.
        """
        run = self.run
        loader = run.importance_loader
        n = max(1, math.ceil(self.scfg.importance_fraction * len(loader)))
        # A fixed, seeded draw per epoch: a pure function of (seed, epoch), so a resumed
        # run draws what the uninterrupted one did (set_epoch alone chains from the
        # generator's last seed, which only the train loader's checkpoint restores).
        if loader.generator is not None:
            loader.generator.manual_seed(run.seed)
        set_epoch(loader, 10_000 + run.state.epoch)
        wrapped = run.student()
        bare = run.strategy.unwrap(wrapped)
        wrapped.eval()
        try:
            with run.console.progress("importance", n) as bar, run.pause_references():
                def batches() -> Iterator[dict[str, Tensor]]:
                    for b in islice(loader, n):
                        yield b
                        bar.advance()
                return taylor_importance(
                    self.masks, lambda batch: run.loss_fn(bare, batch), batches(),
                    run.ctx.all_reduce_sum if run.ctx.distributed else None,
                    run.ctx.world_size)
        finally:
            wrapped.train()

    def prune_to(self, level: float) -> None:
        """Recompute importance and prune to ``level`` (monotone: pruned stays pruned)."""
        imp = self.importance()
        heads, ffn = select_structure(imp, level, self.scfg.min_heads_per_layer,
                                      current=self.masks.keep())
        self.masks.set(heads, ffn)
        if self.masks.hidden is not None and imp.hidden is not None:
            final = (self.scfg.levels[-1] if self.scfg.schedule == "iterative"
                     else self.run.pruning.final_sparsity)
            fraction = self.scfg.hidden_sparsity * min(1.0, level / max(final, EPS))
            self.masks.hidden.set(select_hidden(imp.hidden, fraction,
                                                self.masks.hidden_keep()))
        self.level = level
        sp = self.masks.sparsity()
        self.run.console.log(f"pruned to {level:.0%}: heads {sp['head_sparsity']:.1%}, "
                             f"FFN neurons {sp['ffn_sparsity']:.1%}" + (
                                 f", hidden dimensions {sp['hidden_sparsity']:.1%}"
                                 if "hidden_sparsity" in sp else ""))

    # -- results ---------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """Structured sparsity in the keys of sparsity_report, plus head / FFN fractions."""
        model = self.run.strategy.unwrap(self.run.student())
        counts = structured_param_counts(model, self.run.adapter, *self.masks.keep(),
                                         self.masks.hidden_keep())
        prunable = sum(lin.in_features * lin.out_features
                       for lin in self.run.adapter.prunable_linears(model).values())
        total = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
        return {**counts, **self.masks.sparsity(),
                "linear_sparsity": counts["pruned_parameters"] / prunable,
                "total_sparsity": counts["pruned_parameters"] / total}

    def curve(self) -> list[dict[str, Any]]:
        """The accuracy-vs-sparsity curve, one point per milestone."""
        key = self.run.main_metric
        return [{"level": e["level"], "encoder_sparsity": e["encoder_sparsity"],
                 key: e["metrics"][key]} for e in self.run.state.evals]

    def latency_summary(self) -> dict[str, Any] | None:
        return self.latency.summary()

    def export_plan(self, model: nn.Module) -> ExportPlan:
        """The physically smaller student: heads and FFN neurons sliced away."""
        heads, ffn = self.masks.keep()
        return ExportPlan(heads, ffn, self.masks.hidden_keep())

    def state_dict(self) -> dict[str, Any]:
        heads, ffn = self.masks.keep()
        hidden = self.masks.hidden_keep()
        return {"level": self.level, "pending": self.pending,
                "heads": [h.tolist() for h in heads], "ffn": [f.tolist() for f in ffn],
                "hidden": None if hidden is None else hidden.tolist(),
                "latency": self.latency.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.level, self.pending = state["level"], list(state["pending"])
        self.latency.load_state_dict(state.get("latency", {}))
        self.masks.set([torch.tensor(h) for h in state["heads"]],
                       [torch.tensor(f) for f in state["ffn"]])
        if self.masks.hidden is not None and state.get("hidden") is not None:
            self.masks.hidden.set(torch.tensor(state["hidden"]))


def steps_per_level(scfg: StructuredConfig, steps_per_epoch: int) -> int:
    """Retraining steps after each iterative level."""
    return scfg.retrain_steps or scfg.retrain_epochs * steps_per_epoch


class StructuredPruning(PruningMethod):
    """``structured`` (CAP-f): heads and FFN neurons, level by level (see module doc)."""

    name = "structured"
    physical_export = True
    evaluates_itself = True

    def planned_steps(self, default: int, structured: StructuredConfig,
                      steps_per_epoch: int) -> int:
        """Steps of the whole run: every level's retraining (iterative), else ``default``
        (the train section's epochs / max_steps)."""
        if structured.schedule != "iterative":
            return default
        return steps_per_level(structured, steps_per_epoch) * len(structured.levels)

    def planned_snapshots(self, pruning: PruningConfig, structured: StructuredConfig
                          ) -> int | None:
        """SnC snapshots the run takes: one per milestone (``cubic``: at least one)."""
        if structured.schedule == "iterative":
            return len(structured.levels)
        return max(sum(v <= pruning.final_sparsity + EPS for v in structured.levels), 1)

    def controller(self, run: PruningContext) -> PruningController:
        return StructuredController(run)

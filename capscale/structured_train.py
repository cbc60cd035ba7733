"""Structured CAP (CAP-f): prune attention heads and FFN neurons, retrain, repeat.

The recipe reuses :class:`capscale.train.CAPPruner` whole (banks, references, the full
CAP loss of ``compute_losses``, the optimiser step) and changes only what is pruned and
when (CAP_SPEC.md sections 5 to 7):

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
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from .config import Config
from .console import Console
from .data import TaskData
from .distributed import DistContext
from .export import export_structured
from .metrics import main_metric
from .pruning.schedule import cubic_sparsity, warmup_steps
from .pruning.structured import (
    Importance,
    StructuredMasks,
    select_structure,
    structured_param_counts,
    taylor_importance,
)
from .train import (
    CAPPruner,
    PruneResult,
    ResumePoint,
    evaluate,
    linear_warmup_decay,
    param_groups,
    set_epoch,
)

EPS = 1e-9


class StructuredCAPPruner(CAPPruner):
    """CAP-f on top of the CAP loop: ``StructuredCAPPruner(...).run()``.

    Args: as :class:`capscale.train.CAPPruner`.
    """

    def __init__(self, cfg: Config, ctx: DistContext, data: TaskData,
                 tokenizer: PreTrainedTokenizerBase, teacher_path: str | None,
                 console: Console) -> None:
        super().__init__(cfg, ctx, data, tokenizer, teacher_path, console)
        self.scfg = cfg.structured
        self.masks = StructuredMasks(self.strategy.unwrap(self.student), self.adapter)
        self.level = 0.0  # fraction of heads and of FFN neurons currently pruned
        self._epoch = 0

    # -- importance and masks ------------------------------------------------------
    @contextlib.contextmanager
    def _bare_student(self) -> Iterator[None]:
        """Run compute_losses on the unwrapped student: a data-parallel wrapper would
        expect a parameter backward after its forward, and importance only
        differentiates the masks (its all-reduce is done by taylor_importance).

        Under the sharded strategies the bare module keeps its gathering hooks (ZeRO-3
        registers them on the module's submodules, FSDP2 is the module itself): forward
        and the mask-only backward gather the shards as usual, and since no parameter
        gradient is produced, no reduce-scatter runs and the optimiser sees nothing.
        """
        wrapped = self.student
        self.student = self.strategy.unwrap(wrapped)
        try:
            yield
        finally:
            self.student = wrapped

    def importance(self) -> Importance:
        """Taylor importance over ``importance_fraction`` of the training set, with the
        full CAP loss, in eval mode (identical on every rank)."""
        loader = self.loaders.train
        n = max(1, math.ceil(self.scfg.importance_fraction * len(loader)))
        set_epoch(loader, 10_000 + self._epoch)  # a fixed, seeded draw per call

        def loss_fn(batch: dict[str, Tensor]) -> Tensor:
            return torch.stack(list(self.compute_losses(batch).values())).sum()

        self.student.eval()
        try:
            with self.console.progress("importance", n) as bar, self._bare_student():
                def batches() -> Iterator[dict[str, Tensor]]:
                    for b in islice(loader, n):
                        yield b
                        bar.advance()
                return taylor_importance(
                    self.masks, loss_fn, batches(),
                    self.ctx.all_reduce_sum if self.ctx.distributed else None,
                    self.ctx.world_size)
        finally:
            self.student.train()

    def prune_to(self, level: float) -> None:
        """Recompute importance and prune to ``level`` (monotone: pruned stays pruned)."""
        imp = self.importance()
        heads, ffn = select_structure(imp, level, self.scfg.min_heads_per_layer,
                                      current=self.masks.keep())
        self.masks.set(heads, ffn)
        self.level = level
        sp = self.masks.sparsity()
        self.console.log(f"pruned to {level:.0%}: heads {sp['head_sparsity']:.1%}, "
                         f"FFN neurons {sp['ffn_sparsity']:.1%}")

    # -- training ------------------------------------------------------------------
    def _fresh_optimizer(self, steps: int) -> None:
        """A new AdamW and LR schedule for one retraining phase (reference recipe), under
        every strategy (see Strategy.fresh_optimizer)."""
        cfg = self.cfg.train
        groups = param_groups(self.strategy.unwrap(self.student), cfg.lr, cfg.weight_decay,
                              [], 0.0)
        self.optimizer, self.scheduler = self.strategy.fresh_optimizer(
            self.student, self.optimizer, groups,
            linear_warmup_decay(int(cfg.warmup_ratio * steps), steps))

    def train_step(self, batch: dict[str, Tensor]) -> dict[str, float]:
        rec = super().train_step(batch)
        rec["sparsity"] = self.level
        return rec

    def _train(self, steps: int, on_step: Any = None) -> None:
        """``steps`` optimiser steps over as many epochs as they take."""
        done = 0
        with self.console.progress(f"training at {self.level:.0%}", steps) as bar:
            while done < steps:
                set_epoch(self.loaders.train, self._epoch)
                for batch in self.loaders.train:
                    if done >= steps:
                        break
                    if on_step is not None:
                        on_step()
                    rec = self.train_step(batch)
                    rec.update(step=self.step, epoch=self._epoch,
                               lr=self.scheduler.get_last_lr()[0])
                    self.history.append(rec)
                    done += 1
                    bar.advance(1, f"sp={self.level:.2f} loss={rec['loss']:.3f}")
                self._epoch += 1

    def milestone(self, level: float) -> None:
        """Evaluate at a sparsity milestone and append an SnC snapshot (eval mode)."""
        metrics = evaluate(self.student, self.loaders.eval, self.ctx, self.num_labels)
        sp = self.masks.sparsity()
        counts = structured_param_counts(self.strategy.unwrap(self.student), self.adapter,
                                         *self.masks.keep())
        self.evals.append({"step": self.step, "level": level, "sparsity": self.level,
                           **sp, "encoder_sparsity": counts["encoder_sparsity"],
                           "metrics": metrics})
        key = main_metric(self.num_labels)
        self.console.log(f"milestone {level:.0%} (step {self.step}): {key} "
                         f"{metrics[key]:.4f}, encoder sparsity "
                         f"{counts['encoder_sparsity']:.3f}")
        if "snc" in self.objective.banks:
            self.student.eval()
            self._fill("snc", self.student, self.student_tap, f"snapshot at {level:.0%}")
            self.student.train()

    def run(self, resume: ResumePoint | None = None) -> PruneResult:
        """Prune along the structured schedule (no resume yet: config validation refuses
        ``resume`` and checkpoints for this method)."""
        if resume is not None:
            raise ValueError("structured pruning cannot resume from a checkpoint yet")
        start = time.perf_counter()
        self.student.train()
        if self.scfg.schedule == "iterative":
            self._run_iterative()
        else:
            self._run_cubic()
        metrics = self.evals[-1]["metrics"]
        return PruneResult(metrics, self.sparsity(), self.history, self.evals,
                           time.perf_counter() - start, self.step)

    def _run_iterative(self) -> None:
        steps = self.scfg.retrain_steps or self.scfg.retrain_epochs * len(self.loaders.train)
        for level in self.scfg.levels:
            self.prune_to(level)
            self._fresh_optimizer(steps)
            self._train(steps)
            self.milestone(level)

    def _run_cubic(self) -> None:
        p = self.cfg.pruning
        total = self.total_steps
        t_i, t_f = warmup_steps(p.initial_warmup, total), warmup_steps(p.final_warmup, total)
        pending = [v for v in self.scfg.levels if v <= p.final_sparsity + EPS]

        def flush(upto: float) -> None:
            while pending and self.level >= pending[0] - EPS and upto > pending[0] + EPS:
                self.milestone(pending.pop(0))

        def on_step() -> None:
            if self.step % self.scfg.update_every:
                return
            target = cubic_sparsity(self.step, total, p.initial_sparsity, p.final_sparsity,
                                    t_i, t_f)
            if target > self.level + EPS:
                flush(target)
                self.prune_to(target)

        self._train(total, on_step)
        if self.level < p.final_sparsity - EPS:  # the last update may fall between steps
            self.prune_to(p.final_sparsity)
        flush(math.inf)
        if not self.evals:
            self.milestone(self.level)

    # -- results -------------------------------------------------------------------
    def sparsity(self) -> dict[str, Any]:
        """Structured sparsity in the keys of sparsity_report, plus head / FFN fractions."""
        model = self.strategy.unwrap(self.student)
        counts = structured_param_counts(model, self.adapter, *self.masks.keep())
        prunable = sum(lin.in_features * lin.out_features
                       for lin in self.adapter.prunable_linears(model).values())
        total = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
        return {**counts, **self.masks.sparsity(),
                "linear_sparsity": counts["pruned_parameters"] / prunable,
                "total_sparsity": counts["pruned_parameters"] / total}

    def export(self, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Write the physically smaller student (see export_structured) from the main
        rank; collective (a sharded student is gathered first). None on other ranks."""
        model = self.full_student()
        if model is None:
            return None
        heads, ffn = self.masks.keep()
        return export_structured(model, self.adapter, heads, ffn, out_dir, tokenizer,
                                 inplace=True, extra=extra)

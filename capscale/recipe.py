"""The pruning recipe, the composition root: it builds every part and hands each what it
needs, then runs build -> setup -> train -> finish, read top to bottom.

* :meth:`CAPRecipe.__init__`: checks every input (config rules, data, model configs,
  tokenizer, text lengths, the checkpoint to resume) and picks the parts from their
  tables (task, pruning method). No model is loaded.
* :meth:`CAPRecipe.setup`: fine-tunes the teacher when none is given (cached), loads the
  student (embeddings frozen with ``train.freeze_embeddings``) and the frozen references,
  logs the memory the SnC snapshots will take, encodes the fixed contrastive banks,
  builds the pruning controller from a :class:`~capscale.pruning.controller.PruningContext`,
  lets the strategy wrap the student (its encoder layers checkpointed first with
  ``train.gradient_checkpointing``), registers every stateful part with the
  checkpointer and restores the checkpoint when resuming.
* :meth:`CAPRecipe.train`: the one loop (capscale.train.loop) with the controller, the
  snapshot and evaluation schedules, the trackers and the checkpoint hook.
* :meth:`CAPRecipe.finish`: sparsity report, export (capscale.export.writer), results.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from capscale.checks import check_config, check_run_inputs, wants_teacher
from capscale.config import Config, ConfigError, config_to_dict
from capscale.console import Console
from capscale.contrastive.objectives import build_objective
from capscale.data import build_loaders, loader_options
from capscale.distributed import DistContext, make_strategy
from capscale.export.card import run_facts
from capscale.export.writer import masked_skeleton, write_run_formats, write_verified_export
from capscale.models.loading import (
    adapter_for,
    freeze,
    freeze_embeddings,
    hidden_size,
    load_classifier,
)
from capscale.pruning.controller import PruningContext
from capscale.pruning.methods import PRUNING_METHODS
from capscale.report.results import build_results, save_history
from capscale.tasks import get_task
from capscale.train.checkpoint import (
    Checkpointer,
    CheckpointHook,
    checkpoint_root,
    resolve_resume,
    saved_step,
)
from capscale.train.evaluation import evaluate, whole_set_scorer
from capscale.train.finetune import finetune_teacher
from capscale.train.hooks import LoopHook, Phases, PhaseTotals
from capscale.train.loop import TrainLoop
from capscale.train.references import RunReferences, plan_snapshots
from capscale.train.schedules import EvalSchedule, SnapshotSchedule, snapshot_views
from capscale.train.state import RankPart, RunState
from capscale.train.step import CAPLoss, Optimizers, Update, accumulated_update
from capscale.train.terms import build_terms


def steps_per_epoch(batches: int, train: Any) -> int:
    """Optimiser steps per epoch: ``batches`` training batches (this rank's) in groups of
    ``train.gradient_accumulation_steps``; a ConfigError when not even one group fits."""
    k = train.gradient_accumulation_steps
    if batches < k:
        raise ConfigError(f"train.gradient_accumulation_steps = {k}: more than the {batches} "
                          "training batch(es) of an epoch on each rank; lower it or "
                          "train.batch_size")
    return batches // k


class CAPRecipe:
    """One CAP pruning run: ``r = CAPRecipe(cfg, ctx, console); r.setup(); r.train();
    results = r.finish()`` (capscale.job.prune runs it all). ``cfg``: the run config (its
    cross-section rules run here); ``ctx``: ranks, device, collectives; ``console``: logs
    (silent off the main rank); ``teacher_metrics``: the given teacher's dev metrics."""

    def __init__(self, cfg: Config, ctx: DistContext, console: Console,
                 teacher_metrics: dict[str, float] | None = None) -> None:
        check_config(cfg)
        self.cfg, self.ctx, self.console = cfg, ctx, console
        self.ckpt_root = checkpoint_root(cfg.checkpoint.dir, cfg.output_dir)
        self.resume_from = resolve_resume(cfg.resume, self.ckpt_root, config_to_dict(cfg), ctx)
        self.task = get_task(cfg.data.task_type)
        self.method = PRUNING_METHODS[cfg.pruning.method]
        self.data, self.tokenizer = check_run_inputs(cfg, self.task)
        self.teacher_metrics, self.state = teacher_metrics, RunState()
        self.phases = Phases(torch.cuda.synchronize if ctx.device.type == "cuda" else None)
        self.seconds: dict[str, float] = {}
        self.phase_totals = PhaseTotals()  # the report's time per step, by phase

    # -- setup -------------------------------------------------------------------------
    def setup(self) -> None:
        """Load models, encode the fixed references, wrap, restore (see module doc)."""
        cfg, ctx = self.cfg, self.ctx
        bare = self._load_models()
        views = snapshot_views(cfg.cap, self.method.planned_snapshots(cfg.pruning, cfg.structured),
                               math.ceil(self.total_steps / max(self.steps_per_epoch, 1)))
        hidden = hidden_size(bare, self.adapter)
        self.objective = self._contrastive(bare, views, hidden)
        self.controller = self.method.controller(self._pruning_context())
        self.snapshots = SnapshotSchedule(cfg.cap, cfg.pruning.final_sparsity,
                                          self.controller.current_sparsity, self.snapshot)
        self.controller.setup(bare)
        self.optimizers = Optimizers(self.strategy, cfg.train, cfg.pruning.score_lr)
        _, length = self.controller.lr_segment(  # the LR segment the run resumes in
            saved_step(self.resume_from) if self.resume_from is not None else 0)
        self.student = self.optimizers.prepare(bare, self.controller.score_parameters(),
                                               length, self.adapter)  # tap, checkpointing
        self.refs.bind(self.student, self._skeleton)
        self.loss = CAPLoss(cfg.loss, cfg.cap.representation, self.task, self.strategy,
                            self.teacher, self.objective, self.controller.regularization,
                            self.phases, build_terms(cfg), self.adapter)
        self.update = Update(self.strategy, self.student, ctx, cfg.train.grad_clip,
                             self.phases, cfg.train.debug_nan_batches)
        self.checkpointer = self._register_state()
        if self.resume_from is not None:
            self.checkpointer.load(self.resume_from)
            self.console.log(f"resumed from {self.resume_from} (step {self.state.step}, epoch "
                             f"{self.state.epoch}, {self.state.batches_done} batches into it)")

    def _load_models(self) -> nn.Module:
        """The teacher (fine-tuned here when none is given), the loaders, the strategy,
        the run's length and the bare student; returns the student."""
        cfg, ctx, data, t0, t = self.cfg, self.ctx, self.data, time.perf_counter(), self.cfg.train
        teacher_path = cfg.model.teacher
        if teacher_path is None:
            teacher_path, self.teacher_metrics = finetune_teacher(
                cfg, ctx, data, self.tokenizer, self.task, self.console)
        self.seconds["teacher"] = time.perf_counter() - t0
        self.loaders = build_loaders(data, self.tokenizer, cfg.data, t.batch_size,
                                     t.eval_batch_size, t.seed, ctx.rank, ctx.world_size,
                                     **loader_options(t.dataloader_workers, ctx.device))
        self.strategy = make_strategy(ctx, cfg.distributed, t.precision, cfg.cap.reference_dtype)
        self.steps_per_epoch = per_epoch = steps_per_epoch(len(self.loaders.train), t)
        steps = min(per_epoch * t.epochs, t.max_steps or sys.maxsize)
        self.total_steps = self.method.planned_steps(steps, cfg.structured, per_epoch)
        torch.manual_seed(t.seed)
        m = cfg.model
        self.student_init = teacher_path if m.student_init == "teacher" else m.name_or_path
        bare = self._load(self.student_init).to(ctx.device)
        self.adapter = adapter_for(bare, m.adapter, self.task, cfg.structured.remove_empty_blocks)
        if t.freeze_embeddings:  # before the optimiser and the wrapping
            self.console.log(f"embeddings frozen ({freeze_embeddings(bare):,} parameters)")
        self.teacher = None
        if teacher_path is not None and wants_teacher(cfg):
            self.teacher = self.strategy.prepare_reference(freeze(self._load(teacher_path)))
        if self.teacher_metrics is None and self.teacher is not None:
            self.teacher_metrics = self.evaluate(self.teacher)
        return bare

    def _contrastive(self, bare: nn.Module, views: int, hidden: int) -> Any:
        """The references, the SnC memory plan (logged) and the objective, set up (the
        fixed banks encoded)."""
        cfg, ctx, data = self.cfg, self.ctx, self.data
        self.refs = refs = RunReferences(
            ctx, self.strategy, self.adapter, cfg.cap.representation, self._load,
            cfg.model.name_or_path, cfg.model.student_init == "pretrained", self.teacher, bare,
            self.loaders.bank, self.console, cfg.cap.snapshot_head_dropout)
        labels = (self.task.contrastive_labels(torch.as_tensor(np.asarray(data.train["labels"])))
                  if self.task.class_labels else torch.full((len(data.train),), -1))
        self.snapshot_plan = plan_snapshots(
            cfg.cap, views, len(data.train), hidden, ctx.world_size, bare, self.adapter,
            self.method.learns_scores,
            self.strategy.shards_parameters and cfg.distributed.shard_references,
            "pruning levels" if self.method.evaluates_itself else cfg.cap.snapshot_schedule,
            self.console.log)
        objective = build_objective(dataclasses.replace(cfg.cap, max_snapshots=views),
                                    len(data.train), hidden, labels, cfg.train.seed, ctx)
        objective.setup(refs)
        return objective

    def _pruning_context(self) -> PruningContext:
        cfg = self.cfg
        return PruningContext(
            cfg.pruning, cfg.structured, cfg.train.seed, self.ctx, self.strategy, self.adapter,
            self.state, self.total_steps, self.steps_per_epoch, self.phases, self.console,
            self.task.main_metric, self.loaders.importance, lambda: self.student.model,
            self.full_student, self.evaluate, self.snapshot, self.loss_fn,
            lambda first, length: self.optimizers.fresh(self.student, length),
            self.objective.updates_paused)

    def _load(self, path: str) -> nn.Module:
        return load_classifier(path, self.data.num_labels, self.data.label_names,
                               self.cfg.model.trust_remote_code, self.task)

    def _register_state(self) -> Checkpointer:
        c = self.cfg.checkpoint
        ckpt = Checkpointer(self.ckpt_root, c.every_steps, c.keep_last,
                            config_to_dict(self.cfg), self.ctx)
        s = self.student
        ckpt.register("run", self.state, "json")
        ckpt.register("rng", RankPart(self.state), "rank")
        ckpt.register_files(  # restored: scanned for non-finite values after a resume
            "student", lambda d: self.strategy.save_state(d, s.model, s.optimizer, s.scheduler),
            lambda d: self.strategy.load_state(d, s.model, s.optimizer, s.scheduler),
            lambda: (s.model, s.optimizer))
        ckpt.register("pruning", self.controller, "json")
        ckpt.register("snapshots", self.snapshots, "json")
        ckpt.register("objective", self.objective, self.objective.checkpoint_scope)
        return ckpt

    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        return evaluate(model if model is not None else self.student.model,
                        self.loaders.eval, self.ctx, self.task, self.data.num_labels,
                        self.loaders.eval_reference, self.strategy.autocast)

    def snapshot(self, train_mode: bool, what: str) -> None:
        self.objective.add_snapshot(self.refs, train_mode, what)
        self.student.model.train()

    def loss_fn(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The full objective of ``batch`` on ``model`` (structured importance)."""
        return torch.stack(list(self.loss(model, self.student.tap, batch,
                                          self.state.step).values())).sum()

    def _skeleton(self) -> nn.Module:
        """A bare student of the same structure, masks attached (values not loaded)."""
        return masked_skeleton(self._load(self.student_init), self.adapter, self.method,
                               self.cfg.pruning)

    def full_student(self) -> nn.Module | None:
        return self.strategy.plain_copy(self.student.model, self._skeleton)

    # -- train -------------------------------------------------------------------------
    def train(self, extra_hooks: list[LoopHook] | None = None) -> None:
        """Prune to the end of the schedule (or continue a restored run)."""
        t0, t = time.perf_counter(), self.cfg.train
        hooks: list[LoopHook] = [self.controller]
        if not self.method.evaluates_itself:
            hooks += [self.snapshots, EvalSchedule(
                t.eval_every, self.evaluate, self.controller.current_sparsity,
                self.controller.sync_masks, self.state, self.task.main_metric, self.console.log)]
        hooks += [*(extra_hooks or []), CheckpointHook(self.checkpointer)]
        self.student.model.train()
        self.phases.listeners.append(self.phase_totals)
        TrainLoop(self.state, self.loaders.train, self.total_steps, self._step, self.console,
                  "CAP pruning", hooks, self.student.lr, t.on_nonfinite, t.max_nonfinite_skips,
                  self.ctx.world_size, t.gradient_accumulation_steps).run()
        self.seconds["pruning"] = time.perf_counter() - t0

    def train_step(self, batch: dict[str, Tensor] | list[dict[str, Tensor]]) -> dict[str, Any]:
        """One optimiser step on ``batch`` (or micro-batches) as the loop runs it."""
        self.controller.before_step(self.state.step)
        group = batch if isinstance(batch, list) else [batch]
        try:
            rec = self._step(group)
        finally:
            self.state.batches_drawn += len(group)
        self.state.step += 1
        return rec

    def _step(self, micro_batches: list[dict[str, Tensor]]) -> dict[str, Any]:
        s, step = self.student, self.state.step
        rec = accumulated_update(lambda b: self.loss(s.model, s.tap, b, step), self.update,
                                 micro_batches, step, self.state.batches_drawn)
        rec["sparsity"] = self.controller.current_sparsity()
        return rec

    def export(self, out_dir: Path, extra: dict[str, Any] | None = None
               ) -> dict[str, Any] | None:
        """Write the pruned student as the controller plans it, verify it and score it on
        the dev set (collective: a sharded student is gathered; the main rank writes)."""
        e, ld = self.cfg.export, self.loaders
        return write_verified_export(
            self.student.model, self.full_student, self.controller.export_plan, self.adapter,
            out_dir, self.tokenizer, extra, ld.eval, e.verify_batches, e.verify_atol,
            self.cfg.model.trust_remote_code, self.ctx, whole_set_scorer(
                ld.eval, self.ctx.device, self.task, self.data.num_labels, ld.eval_reference))

    def finish(self, export: bool = True) -> dict[str, Any]:
        """Report sparsity, export the pruned model, build the results (collective)."""
        cfg, out, ctl = self.cfg, Path(self.cfg.output_dir) / "pruned", self.controller
        results = build_results(
            self.task.main_metric, self.teacher_metrics, self.state, ctl.report(),
            len(self.data.train), len(self.data.validation), self.data.notes, self.seconds,
            self.ctx, cfg.pruning.method, self.phase_totals.mean_ms(), self.snapshot_plan,
            ctl.curve(), ctl.latency_summary())
        if self.ctx.is_main:
            save_history(cfg.output_dir, self.state)
        if export:
            t0 = time.perf_counter()
            report = self.export(out, {"results": results, "run": run_facts(cfg)})
            results["export_verified"] = report["verified"] if report is not None else None
            if report is not None and set(cfg.export.formats) - {"pytorch"}:
                results["export_formats"] = write_run_formats(
                    out, cfg.export, self.data, self.tokenizer, cfg.data,
                    cfg.train.eval_batch_size, self.task, cfg.model.trust_remote_code,
                    self.console.log)
            results["seconds"]["export"] = time.perf_counter() - t0
        return results

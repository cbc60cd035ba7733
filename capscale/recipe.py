"""The pruning recipe: build -> setup -> train -> finish, read top to bottom.

* :meth:`CAPRecipe.build` (the constructor): checks every input (config, data, model
  configs, tokenizer, text lengths, the checkpoint to resume) and picks the parts from
  their tables (task, pruning method, contrastive objective). No model is loaded.
* :meth:`CAPRecipe.setup`: fine-tunes the teacher when none is given (cached), loads
  the student (freezing its embeddings when ``train.freeze_embeddings``) and the frozen
  references, logs the memory the SnC snapshots will take (their number known from the
  schedule), encodes what the fixed contrastive modules need (PrC / FiC banks: frozen
  models in eval mode, so they are encoded again on a resume rather than saved),
  attaches the pruning method's masks, lets the strategy wrap the student, registers
  every stateful part with the checkpointer and restores the checkpoint when resuming.
* :meth:`CAPRecipe.train`: the one loop (capscale.train.loop) with the pruning controller,
  the snapshot and evaluation schedules and the trackers as hooks.
* :meth:`CAPRecipe.finish`: sparsity report, export, results, report, summary.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from capscale.config import Config, config_to_dict, save_config
from capscale.console import Console
from capscale.contrastive.modules import CONTRASTIVE_MODULES
from capscale.contrastive.objectives import build_objective, snapshot_memory
from capscale.data import build_loaders, check_lengths, load_task_data
from capscale.distributed import DistContext, make_strategy
from capscale.export.card import run_facts
from capscale.export.huggingface import export_pruned
from capscale.models.loading import (
    RepresentationTap,
    adapter_for,
    check_encoder,
    check_teacher,
    freeze,
    freeze_embeddings,
    hidden_size,
    load_classifier,
    load_tokenizer,
)
from capscale.pruning.masked import MaskedLinear, configure_masks
from capscale.pruning.methods import PRUNING_METHODS
from capscale.report.results import build_results, print_summary, save_history, write_results
from capscale.tasks import get_task
from capscale.train.checkpoint import Checkpointer, resolve_resume, saved_step
from capscale.train.evaluation import evaluate
from capscale.train.finetune import finetune_teacher
from capscale.train.hooks import EvalSchedule, RecordHook, SnapshotSchedule
from capscale.train.loop import Phases, PhaseTotals, TrainLoop
from capscale.train.references import RunReferences
from capscale.train.state import RankPart, RunState
from capscale.train.step import (
    CAPLoss,
    Student,
    Update,
    linear_warmup_decay,
    lr_warmup,
    param_groups,
)


class CAPRecipe:
    """One CAP pruning run: ``r = CAPRecipe(cfg, ctx, console); r.setup(); r.train();
    results = r.finish()``.

    Args:
        cfg: the run config (validated).
        ctx: ranks, device, collectives.
        console: progress and logs (silent on non-main ranks).
        teacher_metrics: the given teacher's dev metrics when already known.
    """

    def __init__(self, cfg: Config, ctx: DistContext, console: Console,
                 teacher_metrics: dict[str, float] | None = None) -> None:
        self.cfg, self.ctx, self.console = cfg, ctx, console
        self.resume_from = resolve_resume(cfg)
        self.task = get_task(cfg.data.task_type)
        self.method = PRUNING_METHODS[cfg.pruning.method]
        self.data = load_task_data(cfg.data)
        m = cfg.model
        check_encoder(m.name_or_path, m.adapter, m.trust_remote_code, self.task)
        if m.teacher is not None:
            check_teacher(m.teacher, self.data.num_labels, m.trust_remote_code, self.task)
        self.tokenizer = load_tokenizer(m.name_or_path, m.trust_remote_code)
        note = check_lengths(self.data, self.tokenizer, cfg.data)
        if note:
            self.data.notes.append(note)
        self.teacher_metrics = teacher_metrics
        self.state = RunState()
        self.phases = Phases(torch.cuda.synchronize if ctx.device.type == "cuda" else None)
        self.seconds: dict[str, float] = {}
        self.phase_totals = PhaseTotals()  # the report's time per step, by phase

    # -- setup -------------------------------------------------------------------------
    def setup(self) -> None:
        """Load models, encode the fixed references, wrap, restore (see module doc)."""
        cfg, ctx, data = self.cfg, self.ctx, self.data
        t0 = time.perf_counter()
        teacher_path = cfg.model.teacher
        if teacher_path is None:
            teacher_path, self.teacher_metrics = finetune_teacher(
                cfg, ctx, data, self.tokenizer, self.task, self.console)
        self.seconds["teacher"] = time.perf_counter() - t0
        self.loaders = build_loaders(data, self.tokenizer, cfg.data, cfg.train.batch_size,
                                     cfg.train.eval_batch_size, cfg.train.seed, ctx.rank,
                                     ctx.world_size)
        self.strategy = make_strategy(ctx, cfg.distributed)
        self.controller = self.method.controller(self)
        steps = len(self.loaders.train) * cfg.train.epochs
        if cfg.train.max_steps:
            steps = min(steps, cfg.train.max_steps)
        self.total_steps = self.controller.planned_steps(steps)
        torch.manual_seed(cfg.train.seed)
        self.student_init = (teacher_path if cfg.model.student_init == "teacher"
                             else cfg.model.name_or_path)
        bare = self._load(self.student_init).to(ctx.device)
        self.adapter = adapter_for(bare, cfg.model.adapter, self.task)
        if cfg.train.freeze_embeddings:  # before the optimiser and the wrapping
            frozen = freeze_embeddings(bare)
            self.console.log(f"embeddings frozen ({frozen:,} parameters)")
        self.teacher = None
        wants_teacher = cfg.loss.w_kd > 0 or any(
            CONTRASTIVE_MODULES[n].source == "teacher" for n in cfg.cap.enabled_modules())
        if teacher_path is not None and wants_teacher:
            self.teacher = self.strategy.prepare_reference(freeze(self._load(teacher_path)))
        if self.teacher_metrics is None and self.teacher is not None:
            self.teacher_metrics = self.evaluate(self.teacher)
        refs = RunReferences(ctx, self.strategy, self.adapter, cfg.cap.representation,
                             self._load, cfg.model.name_or_path,
                             cfg.model.student_init == "pretrained", self.teacher, bare,
                             self.loaders.bank, self.console, cfg.cap.snapshot_head_dropout)
        labels = (self.task.contrastive_labels(torch.as_tensor(np.asarray(data.train["labels"])))
                  if self.task.class_labels else torch.full((len(data.train),), -1))
        self.snapshots = SnapshotSchedule(cfg, self.controller.current_sparsity, self.snapshot)
        views, hidden = self.snapshot_views(), hidden_size(bare, self.adapter)
        self.snapshot_plan = self._plan_snapshots(views, hidden, bare)
        self.objective = build_objective(dataclasses.replace(cfg.cap, max_snapshots=views),
                                         len(data.train), hidden, labels, cfg.train.seed, ctx)
        self.objective.setup(refs)
        self.controller.setup(bare)
        self.student = self._prepare(bare)
        refs.bind(self.student, self._skeleton)
        self.refs = refs
        self.loss = CAPLoss(cfg, self.task, ctx, self.teacher, self.objective,
                            self.controller.regularization, self.phases)
        self.update = Update(self.strategy, self.student, ctx, cfg.train.grad_clip,
                             self.phases, cfg.train.debug_nan_batches)
        self.checkpointer = self._register_state()
        if self.resume_from is not None:
            self.checkpointer.load(self.resume_from)
            self.console.log(f"resumed from {self.resume_from} (step {self.state.step}, "
                             f"epoch {self.state.epoch}, {self.state.batches_done} "
                             "batches into it)")

    def snapshot_views(self) -> int:
        """R_max, the SnC views kept per example: ``cap.max_snapshots``, or when it is
        null every snapshot this run's schedule takes (the reference keeps them all)."""
        cfg = self.cfg
        if cfg.cap.max_snapshots is not None:
            return cfg.cap.max_snapshots
        if self.method.evaluates_itself:  # the controller snapshots at its milestones
            planned = getattr(self.controller, "planned_snapshots", None)
            if planned is None:
                raise ValueError(f"pruning.method {cfg.pruning.method} takes its own "
                                 "snapshots; set cap.max_snapshots to a number")
            return max(planned(), 1)
        epochs = math.ceil(self.total_steps / max(len(self.loaders.train), 1))
        return max(self.snapshots.planned(epochs), 1)

    def _plan_snapshots(self, views: int, hidden: int, bare: nn.Module
                        ) -> dict[str, Any] | None:
        """The memory the SnC snapshots will take, logged before anything is encoded."""
        cfg, ctx = self.cfg, self.ctx
        if not any(CONTRASTIVE_MODULES[n].snapshots for n in cfg.cap.enabled_modules()):
            return None
        copy_bytes = sum(t.numel() * t.element_size()
                         for t in [*bare.parameters(), *bare.buffers()])
        if self.method.learns_scores:  # a copy also holds a score per prunable weight
            copy_bytes += sum(m.weight.numel() * 4
                              for m in self.adapter.prunable_linears(bare).values())
        if self.strategy.shards_parameters and cfg.distributed.shard_references:
            copy_bytes = -(-copy_bytes // ctx.world_size)
        plan = snapshot_memory(cfg.cap, views, len(self.data.train), hidden, ctx.world_size,
                               copy_bytes)
        plan["schedule"] = ("pruning levels" if self.method.evaluates_itself
                            else cfg.cap.snapshot_schedule)
        limit = "all" if cfg.cap.max_snapshots is None else "at most"
        self.console.log(f"SnC ({plan['schedule']} schedule): {limit} {views} snapshot(s) "
                         f"kept, one {plan['per_view']} "
                         f"each: {plan['bytes_per_view'] / 2**30:.3f} GiB per snapshot, "
                         f"{plan['bytes'] / 2**30:.3f} GiB in all, per rank")
        return plan

    def _load(self, path: str) -> nn.Module:
        m = self.cfg.model
        return load_classifier(path, self.data.num_labels, self.data.label_names,
                               m.trust_remote_code, self.task)

    def _prepare(self, bare: nn.Module) -> Student:
        """Wrap the student and build its optimiser for the LR segment it resumes in."""
        cfg = self.cfg
        start = self.resume_step()
        _, length = self.controller.lr_segment(start)
        tap = RepresentationTap(bare, self.adapter)
        groups = param_groups(bare, cfg.train.lr, cfg.train.weight_decay,
                              self.controller.score_parameters(), cfg.pruning.score_lr)
        model, opt, sched = self.strategy.prepare_student(
            bare, groups, self._lr_lambda(length),
            micro_batch_size=cfg.train.batch_size, grad_clip=cfg.train.grad_clip)
        return Student(model, opt, sched, tap)

    def resume_step(self) -> int:
        """The step the run continues from (0 for a fresh start)."""
        return 0 if self.resume_from is None else saved_step(self.resume_from)

    def _register_state(self) -> Checkpointer:
        ckpt = Checkpointer(self.cfg, self.ctx)
        s = self.student
        ckpt.register("run", self.state, "json")
        ckpt.register("rng", RankPart(self.state), "rank")
        ckpt.register_files(
            "student",
            lambda d: self.strategy.save_state(d, s.model, s.optimizer, s.scheduler),
            lambda d: self.strategy.load_state(d, s.model, s.optimizer, s.scheduler))
        ckpt.register("pruning", self.controller, "json")
        ckpt.register("snapshots", self.snapshots, "json")
        ckpt.register("objective", self.objective, self.objective.checkpoint_scope)
        return ckpt

    # -- services the parts use (capscale.pruning.methods.PruningRun) --------------------
    def student_module(self) -> nn.Module:
        return self.student.model

    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        return evaluate(model if model is not None else self.student.model,
                        self.loaders.eval, self.ctx, self.task, self.data.num_labels,
                        self.loaders.eval_reference)

    def snapshot(self, train_mode: bool, what: str) -> None:
        self.objective.add_snapshot(self.refs, train_mode, what)
        self.student.model.train()

    def loss_fn(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The full objective of ``batch`` on ``model`` (structured importance)."""
        return torch.stack(list(self.loss(model, self.student.tap, batch,
                                          self.state.step).values())).sum()

    def fresh_optimizer(self, first_step: int, length: int) -> None:
        """A new AdamW and LR schedule for ``length`` steps (structured levels)."""
        cfg = self.cfg.train
        s = self.student
        groups = param_groups(self.strategy.unwrap(s.model), cfg.lr, cfg.weight_decay, [], 0.0)
        s.optimizer, s.scheduler = self.strategy.fresh_optimizer(
            s.model, s.optimizer, groups, self._lr_lambda(length))

    def _lr_lambda(self, length: int) -> Any:
        """Linear warm-up (``train.warmup_steps`` or ``warmup_ratio``), linear decay."""
        t = self.cfg.train
        return linear_warmup_decay(lr_warmup(t.warmup_steps, t.warmup_ratio, length), length)

    def _skeleton(self) -> nn.Module:
        """A bare student of the same structure, masks attached (values not loaded)."""
        model = self._load(self.student_init)
        self.controller.attach(model)
        configure_masks([m for m in model.modules() if isinstance(m, MaskedLinear)],
                        self.cfg.pruning)
        return model

    def full_student(self) -> nn.Module | None:
        return self.strategy.plain_copy(self.student.model, self._skeleton)

    def export_dense(self, model: nn.Module, out_dir: Path, extra: dict[str, Any] | None
                     ) -> dict[str, Any]:
        return export_pruned(model, self.adapter, out_dir, self.tokenizer, inplace=True,
                             extra=extra)

    # -- train -------------------------------------------------------------------------
    def train(self, extra_hooks: list[Any] | None = None) -> None:
        """Prune to the end of the schedule (or continue a restored run)."""
        t0 = time.perf_counter()
        hooks = [self.controller]
        if not self.method.evaluates_itself:
            hooks += [self.snapshots, EvalSchedule(
                self.cfg.train.eval_every, self._eval, lambda: self.state.step,
                lambda: self.state.evals[-1]["step"] if self.state.evals else None)]
        hooks += list(extra_hooks or [])
        self.student.model.train()
        self.phases.listeners.append(self.phase_totals)
        TrainLoop(self.state, self.loaders.train, self.total_steps, self._step,
                  self.console, "CAP pruning", hooks, self.checkpointer,
                  self.student.lr, self.cfg.train.on_nonfinite,
                  self.cfg.train.max_nonfinite_skips, self.ctx.world_size).run()
        self.seconds["pruning"] = time.perf_counter() - t0

    def train_step(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        """One step outside the loop (tests, benchmarks): the controller's schedule,
        the objective and the update, as the loop runs them."""
        self.controller.before_step(self.state.step)
        try:
            rec = self._step(batch)
        finally:
            self.state.batches_drawn += 1
        self.state.step += 1
        return rec

    def _step(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        losses = self.loss(self.student.model, self.student.tap, batch, self.state.step)
        rec = self.update(losses, self.state.step, self.state.batches_drawn)
        rec["sparsity"] = self.controller.current_sparsity()
        return rec

    def _eval(self, epoch: int) -> None:
        self.controller.sync_masks()
        metrics = self.evaluate()
        sp = self.controller.current_sparsity()
        self.state.evals.append({"step": self.state.step, "epoch": epoch, "sparsity": sp,
                                 "metrics": metrics})
        key = self.task.main_metric
        self.console.log(f"step {self.state.step}: {key} {metrics[key]:.4f} at target "
                         f"sparsity {sp:.3f}")

    # -- finish ------------------------------------------------------------------------
    def finish(self, export: bool = True) -> dict[str, Any]:
        """Report sparsity, export the pruned model, write results (collective)."""
        out = Path(self.cfg.output_dir)
        results = build_results(self, self.controller.report())
        if self.ctx.is_main:
            save_history(out, self.state)
        if export:
            t0 = time.perf_counter()
            report = self.controller.export(out / "pruned", {"results": results,
                                                             "run": run_facts(self.cfg)})
            if report is not None and set(self.cfg.export.formats) - {"pytorch"}:
                results["export_formats"] = self.write_formats(out / "pruned")
            results["seconds"]["export"] = time.perf_counter() - t0
        return results

    def write_formats(self, dest: Path) -> dict[str, Any]:
        """The extra ``export.formats`` of the export in ``dest``, checked on the first dev
        batch and scored on the dev set (main rank; capscale.export.formats)."""
        from capscale.data import Collator, make_loader, tokenize
        from capscale.export.formats import DevSet, write_formats

        e = self.cfg.export
        dev = make_loader(tokenize(self.data.validation, self.tokenizer, self.cfg.data),
                          self.cfg.train.eval_batch_size,
                          Collator(self.tokenizer.pad_token_id or 0))
        found = write_formats(dest, e.formats, next(iter(dev)),
                              DevSet(dev, self.task, self.data.num_labels, e.dev_examples),
                              self.cfg.model.trust_remote_code, e.onnx_atol, e.int8_rtol,
                              self.console.log)
        if not found["ok"]:
            self.console.log(f"WARNING: an export format failed its check; see "
                             f"{dest / 'sparsity_report.json'} (formats)")
        return found


def prune(cfg: Config, ctx: DistContext, console: Console, export: bool = True,
          teacher_metrics: dict[str, float] | None = None) -> dict[str, Any]:
    """The whole job: build -> setup -> train -> finish. Returns the results.

    ``export=False`` skips writing the pruned model (benchmarks that only need metrics).
    ``teacher_metrics``: the given ``model.teacher``'s dev metrics when already known.
    """
    from capscale.report.document import (  # matplotlib: loaded only when reporting
        Trackers,
        write_report,
    )

    start = time.perf_counter()
    recipe = CAPRecipe(cfg, ctx, console, teacher_metrics)
    if ctx.is_main:
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    for note in recipe.data.notes:
        console.log(note)
    recipe.setup()
    trackers = None
    if ctx.is_main and cfg.report.trackers:
        out = Path(cfg.output_dir)
        trackers = Trackers(cfg.report.trackers, out.name, out / "tracking",
                            config_to_dict(cfg))
        for note in trackers.notes:
            console.log(note)
    try:
        recipe.train([RecordHook(trackers)] if trackers is not None else None)
    finally:
        if trackers is not None:
            trackers.finish()
    results = recipe.finish(export)
    results["seconds"]["total"] = time.perf_counter() - start
    if ctx.is_main:
        write_results(cfg, results)
        if cfg.report.enabled:
            console.log(f"report: {write_report(cfg.output_dir, cfg.report.speed_batches)}")
    print_summary(console, cfg, results)
    return results

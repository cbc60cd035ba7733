"""The explicit CAP pruning loop: setup -> banks -> train/prune -> evaluate.

One step (CAP_SPEC.md section 4)::

    L = w_ce * CE + w_kd * T^2 * KL(teacher || student)
        + sum_{PrC, FiC, SnC} (w_u * L_unsup + w_s * L_sup)  [+ lambda_t * L1 (soft)]

Every component is returned and logged by name; the sparsity schedule is advanced
before each forward, so step t trains at the sparsity ``cubic(t)``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .adapters import EncoderAdapter
from .cap import CAPObjective
from .checkpoint import Checkpointer, ResumePoint
from .config import Config
from .console import Console, format_losses
from .data import Collator, TaskData, make_loader, model_inputs, tokenize
from .distributed import DistContext, make_strategy
from .losses import kd_loss, task_loss
from .metrics import compute_metrics, main_metric
from .online import OnlineObjective
from .pruning import MaskedLinear, Pruner, attach_masks, sparsity_report
from .teachers import (
    RepresentationTap,
    adapter_for,
    forward_with_representation,
    freeze,
    hidden_size,
    load_classifier,
    snapshot_copy,
)


@dataclass
class Loaders:
    train: DataLoader
    eval: DataLoader
    bank: DataLoader  # the whole training set in a fixed order, sharded over ranks


def build_loaders(cfg: Config, ctx: DistContext, data: TaskData,
                  tokenizer: PreTrainedTokenizerBase, batch_size: int) -> Loaders:
    """Tokenise and wrap the splits; under several ranks every loader is sharded."""
    train_tok = tokenize(data.train, tokenizer, cfg.data)
    eval_tok = tokenize(data.validation, tokenizer, cfg.data)
    coll = Collator(tokenizer.pad_token_id or 0)
    seed = cfg.train.seed
    if ctx.distributed:
        def sampler(ds: Any, shuffle: bool) -> DistributedSampler:
            return DistributedSampler(ds, ctx.world_size, ctx.rank, shuffle=shuffle, seed=seed)
        return Loaders(
            make_loader(train_tok, batch_size, coll, sampler=sampler(train_tok, True),
                        drop_last=True),
            make_loader(eval_tok, cfg.train.eval_batch_size, coll,
                        sampler=sampler(eval_tok, False)),
            make_loader(train_tok, cfg.train.eval_batch_size, coll,
                        sampler=sampler(train_tok, False)))
    return Loaders(make_loader(train_tok, batch_size, coll, shuffle=True, seed=seed),
                   make_loader(eval_tok, cfg.train.eval_batch_size, coll),
                   make_loader(train_tok, cfg.train.eval_batch_size, coll))


def set_epoch(loader: DataLoader, epoch: int) -> None:
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    elif loader.generator is not None:
        loader.generator.manual_seed(hash((int(loader.generator.initial_seed()), epoch))
                                     % 2**62)


def param_groups(model: nn.Module, lr: float, weight_decay: float,
                 scores: list[nn.Parameter], score_lr: float) -> list[dict[str, Any]]:
    """AdamW groups: matrices (decayed), 1-D params (biases, norms), scores (own lr)."""
    score_ids = {id(p) for p in scores}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in score_ids:
            continue
        (no_decay if len(getattr(p, "ds_shape", p.shape)) <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
    if scores:
        groups.append({"params": scores, "weight_decay": 0.0, "lr": score_lr})
    return [g for g in groups if g["params"]]


def linear_warmup_decay(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor: linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        return max(0.0, (total - step) / max(total - warmup, 1))
    return factor


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, ctx: DistContext, num_labels: int
             ) -> dict[str, float]:
    """Task metrics over the whole evaluation set (gathered over ranks)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in loader:
        logits.append(model(**model_inputs(batch, ctx.device)).logits.float())
        labels.append(batch["labels"].to(ctx.device))
    model.train(was_training)
    all_logits = ctx.gather(torch.cat(logits)).cpu().numpy()
    all_labels = ctx.gather(torch.cat(labels)).cpu().numpy()
    if ctx.distributed:  # DistributedSampler pads with repeats: keep the first N rows
        n = len(loader.dataset)
        per_rank = len(all_labels) // ctx.world_size
        order = np.concatenate([np.arange(r, per_rank * ctx.world_size, ctx.world_size)
                                for r in range(ctx.world_size)])
        keep = np.argsort(order, kind="stable")[:n]
        all_logits, all_labels = all_logits[keep], all_labels[keep]
    return compute_metrics(all_logits, all_labels, num_labels)


@dataclass
class PruneResult:
    metrics: dict[str, float]
    sparsity: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0


class CAPPruner:
    """Sets up one CAP pruning run and runs it: ``CAPPruner(...).run()``.

    Args:
        cfg: the run config.
        ctx: distributed context.
        data: validated task data.
        tokenizer: the encoder's tokenizer.
        teacher_path: the fine-tuned dense teacher (FiC, and KD logits).
        console: where progress and logs go.
    """

    def __init__(self, cfg: Config, ctx: DistContext, data: TaskData,
                 tokenizer: PreTrainedTokenizerBase, teacher_path: str | None,
                 console: Console) -> None:
        self.cfg, self.ctx, self.data, self.console = cfg, ctx, data, console
        self.num_labels = data.num_labels
        self.loaders = build_loaders(cfg, ctx, data, tokenizer, cfg.train.batch_size)
        steps_per_epoch = len(self.loaders.train)
        self.total_steps = steps_per_epoch * cfg.train.epochs
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.strategy = make_strategy(ctx, cfg.distributed)
        torch.manual_seed(cfg.train.seed)
        init = teacher_path if cfg.model.student_init == "teacher" else cfg.model.name_or_path
        if init is None:
            raise ValueError("model.student_init=teacher needs a teacher")
        self._student_init = init
        student = load_classifier(init, self.num_labels, data.label_names,
                                  cfg.model.trust_remote_code).to(ctx.device)
        self.adapter: EncoderAdapter = adapter_for(student, cfg.model.adapter)
        self.teacher: PreTrainedModel | None = None
        if teacher_path is not None and (cfg.loss.w_kd > 0 or cfg.cap.fic.enabled):
            self.teacher = self.strategy.prepare_reference(freeze(load_classifier(
                teacher_path, self.num_labels, data.label_names, cfg.model.trust_remote_code)))
        labels = torch.as_tensor(np.asarray(data.train["labels"]))
        if self.num_labels == 1:
            labels = torch.full_like(labels, -1, dtype=torch.long)
        self.student_tap = RepresentationTap(student, self.adapter)
        self.objective: CAPObjective | OnlineObjective
        if cfg.cap.mode == "online":
            self.objective = OnlineObjective(
                cfg.cap, hidden_size(student, self.adapter), ctx.device,
                snapshot_fn=lambda m: self.strategy.prepare_reference(snapshot_copy(m)))
            self._set_online_references(student, cfg.model.student_init == "pretrained")
        else:
            self.objective = CAPObjective(cfg.cap, len(data.train), hidden_size(
                student, self.adapter), labels, cfg.train.seed, ctx.device, ctx.rank,
                ctx.world_size)
            self._fill_reference_banks(student, cfg.model.student_init == "pretrained")
        masked = self._attach_weight_masks(student)
        # Global top-k reads each rank's shard of the scores (exact bisection, no gather);
        # replicated scores (single / ddp) are counted once, without a sum over ranks.
        sharded = ctx.distributed and self.strategy.shards_parameters
        self.pruner = Pruner(masked, cfg.pruning, self.total_steps,
                             all_reduce=ctx.all_reduce_sum if sharded else None,
                             local_importance=self.strategy.local_importance)
        self.strategy.bind_masks(masked.values(), cfg.pruning.zero_pruned_weights)
        groups = param_groups(student, cfg.train.lr, cfg.train.weight_decay,
                              self.pruner.score_parameters(), cfg.pruning.score_lr)
        self.student, self.optimizer, self.scheduler = self.strategy.prepare_student(
            student, groups, linear_warmup_decay(int(cfg.train.warmup_ratio * self.total_steps),
                                                 self.total_steps),
            micro_batch_size=cfg.train.batch_size, grad_clip=cfg.train.grad_clip)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.milestones = sorted(cfg.cap.snapshot_milestones)
        # Data position and fault counters, all saved in checkpoints (capscale.checkpoint).
        self.epoch, self.batches_done, self.batches_drawn = 0, 0, 0
        self.skipped_steps: list[int] = []
        self.consecutive_skips = 0
        self.loader_state: Tensor | None = None  # train generator state at epoch start
        self.checkpointer = Checkpointer(cfg, ctx)
        # Called with every step's record (live trackers such as TensorBoard).
        self.record_hooks: list[Callable[[dict[str, Any]], None]] = []

    # -- banks ---------------------------------------------------------------------
    def _encoder(self, model: nn.Module, tap: RepresentationTap) -> Any:
        kind = self.cfg.cap.representation

        def encode(batch: dict[str, Tensor]) -> Tensor:
            return forward_with_representation(model, model_inputs(batch, self.ctx.device),
                                               tap, kind)[1]
        return encode

    def _fill(self, name: str, model: nn.Module, tap: RepresentationTap, what: str) -> None:
        with self.console.progress(f"bank {name} ({what})", len(self.loaders.bank)) as bar:
            def batches() -> Any:
                for b in self.loaders.bank:
                    yield b
                    bar.advance()
            self.objective.fill(name, self._encoder(model, tap), batches(), self.ctx)

    def _fill_reference_banks(self, student: PreTrainedModel, student_is_pretrained: bool
                              ) -> None:
        """PrC (pre-trained model) and FiC (fine-tuned teacher) banks, encoded once."""
        banks = self.objective.banks
        if "prc" in banks:
            if student_is_pretrained:  # the student before any pruning is the PrC model
                student.eval()
                self._fill("prc", student, self.student_tap, "pre-trained")
                student.train()
            else:
                prc = self.strategy.prepare_reference(freeze(load_classifier(
                    self.cfg.model.name_or_path, self.num_labels, self.data.label_names,
                    self.cfg.model.trust_remote_code)))
                tap = RepresentationTap(prc, self.adapter)
                self._fill("prc", prc, tap, "pre-trained")
                tap.remove()
                del prc
        if "fic" in banks:
            if self.teacher is None:
                raise ValueError("cap.fic.enabled needs a teacher (model.teacher)")
            tap = RepresentationTap(self.teacher, self.adapter)
            self._fill("fic", self.teacher, tap, "fine-tuned teacher")
            tap.remove()

    def _set_online_references(self, student: PreTrainedModel, student_is_pretrained: bool
                               ) -> None:
        """Online mode: PrC and FiC references run live on every batch."""
        refs = self.objective.references
        if "prc" in refs:
            prc = (self.objective.snapshot_fn(student) if student_is_pretrained  # unmasked
                   else self.strategy.prepare_reference(freeze(load_classifier(
                       self.cfg.model.name_or_path, self.num_labels, self.data.label_names,
                       self.cfg.model.trust_remote_code))))
            self.objective.set_reference("prc", prc, self.adapter)
        if "fic" in refs:
            if self.teacher is None:
                raise ValueError("cap.fic.enabled needs a teacher (model.teacher)")
            self.objective.set_reference("fic", self.teacher, self.adapter)

    def snapshot(self, reason: str) -> None:
        """Append the current student as a new SnC view (CAP_SPEC.md section 5)."""
        if isinstance(self.objective, OnlineObjective):
            self.objective.add_snapshot(self.strategy.unwrap(self.student), self.adapter)
            return
        if "snc" not in self.objective.banks:
            return
        self.student.train(self.cfg.cap.snapshot_train_mode)
        self._fill("snc", self.student, self.student_tap, reason)
        self.student.train()

    # -- training ------------------------------------------------------------------
    def compute_losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every weighted loss component of one batch, by name (ce, kd, prc_unsup, ...)."""
        cfg, ctx = self.cfg, self.ctx
        inputs = model_inputs(batch, ctx.device)
        labels = batch["labels"].to(ctx.device)
        logits, anchors = forward_with_representation(self.student, inputs, self.student_tap,
                                                      cfg.cap.representation)
        losses: dict[str, Tensor] = {}
        if cfg.loss.w_ce > 0:
            losses["ce"] = cfg.loss.w_ce * task_loss(logits, labels)
        if self.teacher is not None and cfg.loss.w_kd > 0:
            with torch.no_grad():
                t_logits = self.teacher(**inputs).logits
            losses["kd"] = cfg.loss.w_kd * kd_loss(logits, t_logits, cfg.loss.kd_temperature)
        class_labels = (labels.long() if self.num_labels > 1
                        else torch.full_like(labels, -1, dtype=torch.long))
        losses.update(self.objective(anchors, batch["example_id"].to(ctx.device),
                                     class_labels, self.step, ctx, inputs=inputs))
        reg = self.pruner.regularization()
        if reg is not None:
            losses["l1"] = reg
        return losses

    def train_step(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """One optimiser step at the scheduled sparsity; returns every loss component."""
        sparsity = self.pruner.update(self.step)
        losses = self.compute_losses(batch)
        if self.batches_drawn in self.cfg.train.debug_nan_batches:  # test hook (config.py)
            first = next(iter(losses))
            losses[first] = losses[first] * float("nan")
        self.batches_drawn += 1
        total = torch.stack(list(losses.values())).sum()
        # Every rank must agree, or one would skip the all-reduce the others wait in.
        bad_ranks = self.ctx.all_reduce_sum(torch.tensor([float(not torch.isfinite(total))]))
        if bad_ranks.item() > 0:
            bad = [k for k, v in losses.items() if not torch.isfinite(v)] or [
                "on another rank"]
            raise FloatingPointError(f"non-finite loss at step {self.step}: {', '.join(bad)}")
        self.strategy.backward_and_step(total, self.student, self.optimizer, self.scheduler,
                                        self.cfg.train.grad_clip)
        self.step += 1
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["loss"] = float(total.detach())
        out["sparsity"] = sparsity
        return out

    def _maybe_milestone_snapshot(self) -> None:
        final = self.cfg.pruning.final_sparsity
        while self.milestones and self.pruner.sparsity >= self.milestones[0] * final:
            m = self.milestones.pop(0)
            self.snapshot(f"snapshot at {m:.0%} of final sparsity")

    def run(self, resume: ResumePoint | None = None) -> PruneResult:
        """Train and prune to the end; ``resume`` continues a restored checkpoint."""
        cfg, ctx = self.cfg, self.ctx
        start = time.perf_counter()
        self.student.train()
        epochs = math.ceil(self.total_steps / len(self.loaders.train))
        with self.console.progress("CAP pruning", self.total_steps) as bar:
            bar.advance(self.step)
            for epoch in range(resume.epoch if resume else 0, epochs):
                resuming = resume is not None and epoch == resume.epoch
                if cfg.cap.snapshot_schedule == "epoch" and not resuming:
                    self.snapshot(f"snapshot, epoch {epoch}")
                batches = self._epoch_batches(epoch, resume if resuming else None)
                t0, seen = time.perf_counter(), 0
                for batch in batches:
                    if self.step >= self.total_steps:
                        break
                    rec = self._guarded_step(batch)
                    self.batches_done += 1
                    if rec is None:
                        continue
                    seen += batch["labels"].shape[0] * ctx.world_size
                    rec.update(step=self.step, epoch=epoch,
                               lr=self.scheduler.get_last_lr()[0],
                               examples_per_s=seen / (time.perf_counter() - t0))
                    self.history.append(rec)
                    if cfg.cap.snapshot_schedule == "milestones":
                        self._maybe_milestone_snapshot()
                    if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                        self._eval(epoch)
                    for hook in self.record_hooks:
                        hook(rec)
                    if self.checkpointer.due(self.step):
                        self.checkpointer.save(self)
                    shown = {k: v for k, v in rec.items() if k not in (
                        "step", "epoch", "lr", "examples_per_s", "sparsity")}
                    bar.advance(1, f"sp={rec['sparsity']:.2f} {format_losses(shown)} "
                                   f"{rec['examples_per_s']:.0f} ex/s")
                self._eval(epoch)
        metrics = self.evals[-1]["metrics"]
        return PruneResult(metrics, self.sparsity(), self.history, self.evals,
                           time.perf_counter() - start, self.step)

    def _epoch_batches(self, epoch: int, resume: ResumePoint | None) -> Any:
        """This epoch's batches: a fresh permutation, or the rest of a resumed one."""
        self.epoch, loader = epoch, self.loaders.train
        if resume is not None:
            self.batches_done = resume.batches_done
            return resume.batches(loader, set_epoch)
        set_epoch(loader, epoch)
        self.batches_done = 0
        self.loader_state = (loader.generator.get_state() if loader.generator is not None
                             else None)
        return iter(loader)

    def _guarded_step(self, batch: dict[str, Tensor]) -> dict[str, float] | None:
        """``train_step``, or None when a non-finite loss is skipped (train.on_nonfinite)."""
        try:
            rec = self.train_step(batch)
        except FloatingPointError as err:
            limit = self.cfg.train.max_nonfinite_skips
            if self.cfg.train.on_nonfinite == "stop":
                raise
            if self.consecutive_skips >= limit:
                raise FloatingPointError(f"{err}; {limit + 1} batches in a row were "
                                         "non-finite (train.max_nonfinite_skips)") from err
            self.consecutive_skips += 1
            self.skipped_steps.append(self.step)
            self.console.log(f"skipped a batch: {err}")
            return None
        self.consecutive_skips = 0
        return rec

    def _eval(self, epoch: int) -> None:
        # The optimiser step after the last update moved the scores: re-derive the masks
        # from them (a global threshold would otherwise be stale and miss the target).
        self.pruner.update(self.step)
        metrics = evaluate(self.student, self.loaders.eval, self.ctx, self.num_labels)
        self.evals.append({"step": self.step, "epoch": epoch,
                           "sparsity": self.pruner.sparsity, "metrics": metrics})
        key = main_metric(self.num_labels)
        self.console.log(f"step {self.step}: {key} {metrics[key]:.4f} at target sparsity "
                         f"{self.pruner.sparsity:.3f}")

    def sparsity(self) -> dict[str, Any]:
        """Sparsity report from masks computed on gathered (full) scores; collective."""
        with self.strategy.gathered(self.student) as bare:
            masks = {k: v.cpu() for k, v in self.pruner.masks().items()}
            return sparsity_report(bare, self.adapter, masks)

    def _attach_weight_masks(self, model: nn.Module) -> dict[str, MaskedLinear]:
        """Swap in the MaskedLinear layers of unstructured pruning (none for ``none``;
        structured pruning masks activations instead, see capscale.structured_train)."""
        p = self.cfg.pruning
        if p.method in ("none", "structured"):
            return {}
        return attach_masks(model, self.adapter, p.method, p.score_init, p.min_keep)

    def full_student(self) -> nn.Module | None:
        """The unsharded student, built like this one, on the main rank (None elsewhere);
        collective. Structured masks stay outside it (``masks.keep()`` says what to slice).
        """
        def build() -> nn.Module:
            model = load_classifier(self._student_init, self.num_labels,
                                    self.data.label_names, self.cfg.model.trust_remote_code)
            self._attach_weight_masks(model)
            return model
        return self.strategy.plain_copy(self.student, build)

    def save_history(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "history.jsonl", "w") as f:
            for rec in self.history:
                f.write(json.dumps(rec) + "\n")
        (out / "evals.json").write_text(json.dumps(self.evals, indent=1))

"""One optimisation step of CAP: the objective's components, then the update.

The full objective of a batch (Xu et al., AAAI 2022, eq. 7)::

    L = w_ce * CE + w_kd * KD(teacher, student)
        + sum over enabled modules m of (w_u^m * L_unsup^m + w_s^m * L_sup^m)
        [+ the pruning method's regulariser, e.g. soft movement's lambda_t * L1]

:class:`CAPLoss` returns every component by name (they are logged separately);
:class:`Update` checks that the total is finite on every rank, then backward, optimiser
step and LR step through the strategy; :func:`accumulated_update` runs one optimiser step
over k micro-batches (``train.gradient_accumulation_steps``). Both time their parts through
:class:`capscale.train.hooks.Phases`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from capscale.data import model_inputs
from capscale.models.loading import RepresentationTap, forward_with_representation, output_logits
from capscale.models.recompute import checkpoint_layers
from capscale.train.hooks import Phases
from capscale.train.loop import finite_or_raise
from capscale.train.terms import LayerTap, ObjectiveTerm, TermBatch

if TYPE_CHECKING:
    from capscale.config import LossConfig, TrainConfig
    from capscale.distributed import DistContext, Strategy
    from capscale.models.adapters import EncoderAdapter
    from capscale.tasks import Task


@dataclass
class Student:
    """The model being trained, as the strategy prepared it, with its optimiser."""

    model: nn.Module  # wrapped (DDP / DeepSpeed engine / FSDP2 module)
    optimizer: Optimizer
    scheduler: LambdaLR
    tap: RepresentationTap | None = None  # reads the contrastive representation

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])


class CAPLoss:
    """Every weighted component of the objective on one batch.

    The student's and the teacher's forward passes run under the strategy's autocast
    (``train.precision``); every loss is computed on fp32 copies of their outputs with
    autocast off (capscale.distributed.precision says why).

    Args:
        loss: the ``loss`` section (weights, KD temperature).
        representation: ``cap.representation`` (where anchors are read).
        task: the task (supervised loss, distillation, contrastive labels).
        strategy: ranks, device and precision.
        teacher: the frozen fine-tuned teacher (KD logits), or None.
        objective: the contrastive objective, or None.
        regularizer: returns the pruning method's loss term (or None) at each call.
        phases: where the parts are timed.
        terms: further objective terms (capscale.train.terms), each under its name.
        adapter: the encoder adapter (where a term's layer outputs are read).
    """

    def __init__(self, loss: LossConfig, representation: str, task: Task, strategy: Strategy,
                 teacher: nn.Module | None, objective: Any,
                 regularizer: Callable[[], Tensor | None], phases: Phases,
                 terms: list[ObjectiveTerm] | None = None,
                 adapter: EncoderAdapter | None = None) -> None:
        self.weights, self.representation = loss, representation
        self.task, self.ctx, self.precision = task, strategy.ctx, strategy.precision
        self.teacher, self.objective = teacher, objective
        self.regularizer, self.phases = regularizer, phases
        self.terms, self.adapter = terms or [], adapter
        self._taps: dict[int, LayerTap] = {}  # by id of the tapped (bare) model

    def _layer_tap(self, model: nn.Module | None) -> LayerTap | None:
        """The layer tap of ``model`` (made on first use) when a term reads layers."""
        if model is None or not any(t.needs_layers for t in self.terms):
            return None
        if self.adapter is None:
            raise ValueError("a term that reads layer outputs needs the encoder adapter")
        key = id(model)
        if key not in self._taps:
            self._taps[key] = LayerTap(model, self.adapter)
        return self._taps[key]

    def __call__(self, model: nn.Module, tap: RepresentationTap | None,
                 batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """Components by name (``ce``, ``kd``, ``prc_unsup``, ..., ``l1``); ``tap``
        reads the anchors (the prepared student always has one)."""
        assert tap is not None, "a CAP student is prepared with its representation tap"
        w, ctx = self.weights, self.ctx
        inputs = model_inputs(batch, ctx.device)
        labels = batch["labels"].to(ctx.device)
        s_tap = self._layer_tap(model)
        if s_tap is not None:
            s_tap.take()  # whatever forwards ran since (evaluation) is dropped
        with self.phases("forward"), self.precision.autocast():
            logits, anchors = forward_with_representation(model, inputs, tap,
                                                          self.representation)
        logits, anchors = logits.float(), anchors.float()
        student_layers = s_tap.take() if s_tap is not None else []
        losses: dict[str, Tensor] = {}
        exact = self.precision.exact
        if w.w_ce > 0:
            with exact():
                losses["ce"] = w.w_ce * self.task.loss(logits, labels)
        t_tap = self._layer_tap(self.teacher)
        if self.teacher is not None and (w.w_kd > 0 or self.terms):
            if t_tap is not None:
                t_tap.take()
            with self.phases("teacher"), torch.no_grad(), self.precision.autocast():
                t_logits = output_logits(self.teacher(**inputs)).float()
        if self.teacher is not None and w.w_kd > 0:
            with exact():
                losses["kd"] = w.w_kd * self.task.distill(logits, t_logits, w.kd_temperature,
                                                          labels=labels)
        if self.terms:
            view = TermBatch(inputs, student_layers, t_tap.take() if t_tap else [])
            with exact():
                for term in self.terms:
                    losses[term.name] = term(view)
        if self.objective is not None:
            with self.phases("contrastive"), exact():
                losses.update(self.objective(
                    anchors, batch["example_id"].to(ctx.device),
                    self.task.contrastive_labels(labels), step, ctx, inputs=inputs))
        reg = self.regularizer()
        if reg is not None:
            losses["l1"] = reg
        return losses


class Update:
    """Finite check, backward, optimiser and LR step of one batch's losses.

    Args:
        strategy: how the student is stepped (masks on shards included).
        student: the model and its optimiser (read at each call: structured pruning
            swaps in a fresh optimiser per level).
        ctx: ranks (the finite check is agreed on by all).
        grad_clip: max gradient norm (0: none).
        phases: where backward and the optimiser step are timed.
        nan_batches: test hook, batches (by count drawn) whose loss is made NaN.
    """

    def __init__(self, strategy: Strategy, student: Student, ctx: DistContext,
                 grad_clip: float, phases: Phases, nan_batches: list[int] | None = None
                 ) -> None:
        self.strategy, self.student, self.ctx = strategy, student, ctx
        self.grad_clip, self.phases = grad_clip, phases
        self.nan_batches = set(nan_batches or [])

    def __call__(self, losses: dict[str, Tensor], step: int, batch_number: int
                 ) -> dict[str, float]:
        """Apply the update; returns the components and their sum as floats."""
        out = self.backward(losses, step, batch_number)
        self.apply()
        return out

    def sync(self, on: bool) -> contextlib.AbstractContextManager:
        """Forward and backward passes inside run with the gradient all-reduce on or off
        (DDP decides at the forward, so the context must hold both)."""
        return self.strategy.grad_sync(self.student.model, on)

    def backward(self, losses: dict[str, Tensor], step: int, batch_number: int,
                 scale: float = 1.0) -> dict[str, float]:
        """Finite check and backward of ``scale`` times the losses' sum; returns the
        scaled components and their sum as floats. Raises FloatingPointError (nothing
        backpropagated) on a non-finite loss."""
        if batch_number in self.nan_batches:
            first = next(iter(losses))
            losses[first] = losses[first] * float("nan")
        total = torch.stack(list(losses.values())).sum()
        finite_or_raise(losses, total, step, self.ctx.all_reduce_sum)
        s = self.student
        if scale != 1.0:
            losses = {k: v * scale for k, v in losses.items()}
            total = total * scale
        with self.phases("backward"):
            self.strategy.backward(total, s.model)
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["loss"] = float(total.detach())
        return out

    def apply(self) -> None:
        """The optimiser and LR step on the gradients accumulated since the last one."""
        s = self.student
        with self.phases("optimizer"):
            self.strategy.step(s.model, s.optimizer, s.scheduler, self.grad_clip)

    def discard(self) -> None:
        """Drop the gradients accumulated since the last optimiser step."""
        self.strategy.discard_grads(self.student.model, self.student.optimizer)


def accumulated_update(losses_of: Callable[[dict[str, Tensor]], dict[str, Tensor]],
                       update: Update, micro_batches: list[dict[str, Tensor]], step: int,
                       first_batch_number: int) -> dict[str, float]:
    """One optimiser step over ``k = len(micro_batches)`` micro-batches.

    Each micro-batch's losses (``losses_of``) are scaled by ``1/k`` and backpropagated at
    once (one micro-batch's activations alive at a time), its forward and backward with
    the gradient all-reduce off but for the last; then one :meth:`Update.apply`. The
    record holds each component's mean over the micro-batches. A non-finite micro-batch
    drops the gradients accumulated so far and re-raises: the whole step is skipped.
    """
    k = len(micro_batches)
    out: dict[str, float] = {}
    for i, batch in enumerate(micro_batches):
        try:
            with update.sync(i == k - 1):
                part = update.backward(losses_of(batch), step, first_batch_number + i, 1.0 / k)
        except FloatingPointError:
            if i > 0:  # the earlier micro-batches' gradients
                update.discard()
            raise
        for name, value in part.items():
            out[name] = out.get(name, 0.0) + value
    update.apply()
    return out


def param_groups(model: nn.Module, lr: float, weight_decay: float,
                 scores: list[nn.Parameter], score_lr: float) -> list[dict[str, Any]]:
    """AdamW groups: matrices (decayed), 1-D params (biases, norms), scores (own lr)."""
    score_ids = {id(p) for p in scores}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad or id(p) in score_ids:
            continue
        (no_decay if len(getattr(p, "ds_shape", p.shape)) <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
    if scores:
        groups.append({"params": scores, "weight_decay": 0.0, "lr": score_lr})
    return [g for g in groups if g["params"]]


def lr_warmup(steps: int | None, ratio: float, length: int) -> int:
    """Warm-up steps of an LR schedule ``length`` steps long: ``steps`` (``train.
    warmup_steps``, the reference's unit: 11,000 on GLUE) capped at ``length``, or else
    ``ceil(ratio * length)`` (``train.warmup_ratio``, rounded up as the Hugging Face
    Trainer of the structured reference does)."""
    return min(steps, length) if steps is not None else math.ceil(ratio * length)


def linear_warmup_decay(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor at optimiser step ``step`` (0-based): ``step / warmup`` during the
    warm-up, then a linear decay to 0 at ``total``; the reference's schedule (Hugging
    Face ``get_linear_schedule_with_warmup``: the first step of a warm-up has LR 0)."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        return max(0.0, (total - step) / max(total - warmup, 1))
    return factor


class Optimizers:
    """The student's AdamW and LR schedule, built through the strategy: ``prepare`` wraps
    the bare student; ``fresh`` restarts both (each structured level retrains from fresh
    AdamW moments and a restarted schedule).

    Args:
        strategy: how the student is wrapped and stepped.
        train: the ``train`` section (lr, weight decay, warm-up, batch size, clipping).
        score_lr: ``pruning.score_lr``, the learning rate of the method's scores.
    """

    def __init__(self, strategy: Strategy, train: TrainConfig, score_lr: float) -> None:
        self.strategy, self.train, self.score_lr = strategy, train, score_lr

    def lr_lambda(self, length: int) -> Callable[[int], float]:
        """Linear warm-up (``train.warmup_steps`` or ``warmup_ratio``), linear decay."""
        t = self.train
        return linear_warmup_decay(lr_warmup(t.warmup_steps, t.warmup_ratio, length), length)

    def prepare(self, bare: nn.Module, scores: list[nn.Parameter], length: int,
                adapter: EncoderAdapter | None = None) -> Student:
        """Wrap ``bare`` with an optimiser and an LR schedule of ``length`` steps. With
        its ``adapter``, the student gets its representation tap and, with
        ``train.gradient_checkpointing``, its encoder layers checkpointed before the
        strategy wraps them (so inside FSDP2's units and under ZeRO-3's hooks)."""
        t = self.train
        tap = RepresentationTap(bare, adapter) if adapter is not None else None
        if adapter is not None and t.gradient_checkpointing:
            checkpoint_layers(bare, adapter)
        groups = param_groups(bare, t.lr, t.weight_decay, scores, self.score_lr)
        model, opt, sched = self.strategy.prepare_student(
            bare, groups, self.lr_lambda(length), micro_batch_size=t.batch_size,
            grad_clip=t.grad_clip)
        return Student(model, opt, sched, tap)

    def fresh(self, student: Student, length: int) -> None:
        """A new AdamW and LR schedule of ``length`` steps for the prepared ``student``."""
        t = self.train
        groups = param_groups(self.strategy.unwrap(student.model), t.lr, t.weight_decay, [],
                              0.0)
        student.optimizer, student.scheduler = self.strategy.fresh_optimizer(
            student.model, student.optimizer, groups, self.lr_lambda(length))

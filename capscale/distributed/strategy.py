"""How the student is wrapped and stepped, and how frozen references are prepared.

:class:`Strategy` implements ``single`` (one process) and ``ddp``; the sharded strategies
(``zero3``: DeepSpeed ZeRO-3, ``fsdp2``: torch ``fully_shard``) subclass it and override
the few methods that touch parameter storage, so the training loop never branches on
the strategy. Masks on shards: when pruned weights are zeroed, every
:class:`MaskedLinear` records this rank's slice of the mask of its training forward
(``mask_slicer``); the strategy multiplies it into the local gradient before the
optimiser step and into the local weights after it, so the full (gathered) weights are
exactly masked after every step, whatever the sharding.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from capscale.distributed.context import DistContext
from capscale.distributed.precision import GradientOverflow, Precision
from capscale.pruning.masked import MaskedLinear

LrLambda = Callable[[int], float]


def adamw(param_groups: list[dict], device: torch.device) -> Optimizer:
    """torch AdamW over ``param_groups`` (each with its own ``lr`` / ``weight_decay``),
    fused on CUDA.

    The fused kernel updates every parameter of a group in a few launches instead of a
    handful per tensor; it needs every parameter to be a floating-point CUDA tensor.
    FSDP2's DTensor shards qualify (torch registers ``_fused_adamw_`` as a DTensor
    pointwise op; their ``device`` is the local shard's), as long as they share one mesh,
    as capscale's do. Elsewhere (CPU runs, a parameter off the GPU) torch's default is
    kept: ``foreach`` where the parameters allow it, else the per-tensor loop.
    """
    params = [p for g in param_groups for p in g["params"]]
    if device.type == "cuda" and params and all(
            p.device.type == "cuda" and torch.is_floating_point(p) for p in params):
        return torch.optim.AdamW(param_groups, fused=True)
    return torch.optim.AdamW(param_groups)



@contextmanager
def switched(set_switch: Callable[[bool], None], on: bool) -> Iterator[None]:
    """Set a backend's boolean switch to ``on`` for the block, then back on."""
    set_switch(on)
    try:
        yield
    finally:
        set_switch(True)

class Strategy:
    """``single`` / ``ddp``: replicated parameters, torch AdamW, optional DDP wrapper.

    Args:
        ctx: ranks, device and collectives.
        options: the config's ``distributed`` section (sharded strategies read it).
        precision: the run's arithmetic (capscale.distributed.precision); fp32 if None.
    """

    name = "single"
    # Whether each rank holds only a shard of the parameters (and of the scores): counts
    # over scores are then summed over ranks; over replicated scores they must not be.
    shards_parameters = False

    def __init__(self, ctx: DistContext, options: Any = None,
                 precision: Precision | None = None) -> None:
        self.ctx = ctx
        self.options = options
        self.precision = precision or Precision(device_type=ctx.device.type)
        self.scaler = self.precision.scaler()  # fp16's loss scaler, else None
        self.masked: list[MaskedLinear] = []
        self.zero_pruned = False

    # -- wrapping ------------------------------------------------------------------
    def prepare_student(self, model: nn.Module, param_groups: list[dict], lr_lambda: LrLambda,
                        micro_batch_size: int = 1, grad_clip: float = 0.0
                        ) -> tuple[nn.Module, Optimizer, LambdaLR]:
        """Wrap the student and build its AdamW optimiser and LR schedule.

        Args:
            model: the bare student (masks attached).
            param_groups: AdamW groups (their own ``lr`` / ``weight_decay``).
            lr_lambda: LR factor per optimiser step.
            micro_batch_size: per-rank batch size (DeepSpeed's config needs it).
            grad_clip: max gradient norm, 0 for none (DeepSpeed clips in its step).
        """
        opt = adamw(param_groups, self.ctx.device)
        sched = LambdaLR(opt, lr_lambda)
        if self.ctx.distributed:
            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model, opt, sched

    def fresh_optimizer(self, model: nn.Module, opt: Optimizer, param_groups: list[dict],
                        lr_lambda: LrLambda) -> tuple[Optimizer, LambdaLR]:
        """A new optimiser and LR schedule for an already prepared student.

        Structured CAP retrains each level from fresh AdamW moments and a restarted
        schedule (docs/algorithm.md section 6). Replicated and FSDP2 students simply get a new
        torch AdamW over their (possibly DTensor) parameters.

        Args:
            model: the student as ``prepare_student`` returned it.
            opt: its current optimiser (dropped here; DeepSpeed resets it in place).
            param_groups: AdamW groups over the bare student's parameters.
            lr_lambda: LR factor per optimiser step of the new schedule.
        """
        new = adamw(param_groups, self.ctx.device)
        return new, LambdaLR(new, lr_lambda)

    def prepare_reference(self, model: nn.Module) -> nn.Module:
        """A frozen reference (already ``freeze``-d) ready for forward passes, its
        weights in ``cap.reference_dtype``."""
        return cast_weights(model.to(self.ctx.device), self.precision.reference_dtype)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Forward passes (student, references, evaluation) run inside this."""
        return self.precision.autocast()

    def bind_masks(self, modules: Iterable[MaskedLinear], zero_pruned: bool) -> None:
        """Register the student's masked layers; ``zero_pruned``: keep pruned weights 0."""
        self.masked = list(modules)
        self.zero_pruned = zero_pruned
        for m in self.masked:
            m.mask_slicer = self.local_mask if zero_pruned else None

    # -- stepping ------------------------------------------------------------------
    def backward(self, loss: Tensor, model: nn.Module) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def grad_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Backward passes inside run with the gradient all-reduce on (``sync``) or off:
        off, DDP accumulates the gradients locally until a backward with it on (the last
        micro-batch of an optimiser step). One process has nothing to sync."""
        if not sync and isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()

    def discard_grads(self, model: nn.Module, opt: Optimizer) -> None:
        """Drop every gradient accumulated since the last optimiser step."""
        opt.zero_grad(set_to_none=True)

    def step(self, model: nn.Module, opt: Optimizer, sched: LambdaLR, grad_clip: float) -> None:
        """Mask grads, clip, optimiser step, mask weights, LR step, zero grads.

        Raises:
            GradientOverflow: fp16's scaled gradients overflowed on some rank; nothing
                was stepped, the gradients are dropped and the loss scale lowered.
        """
        self._mask_grads()
        if self.scaler is not None:
            self._unscale_or_skip(model, opt)
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(unwrap(model).parameters(), grad_clip)
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        self._mask_weights()
        sched.step()
        opt.zero_grad(set_to_none=True)

    def _unscale_or_skip(self, model: nn.Module, opt: Optimizer) -> None:
        """Unscale the gradients; on an overflow on any rank, skip the step everywhere."""
        scaler = cast(torch.amp.GradScaler, self.scaler)
        scaler.unscale_(opt)
        bad = 0.0
        for p in unwrap(model).parameters():
            g = p.grad
            if g is not None:
                local = g.to_local() if hasattr(g, "to_local") else g
                if not bool(torch.isfinite(local).all()):
                    bad = 1.0
                    break
        if float(self.ctx.all_reduce_sum(torch.tensor([bad]))[0]) > 0:
            self.discard_grads(model, opt)
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
            raise GradientOverflow(f"fp16 gradients overflowed; step skipped, loss scale "
                                   f"now {scaler.get_scale():g}")

    def backward_and_step(self, loss: Tensor, model: nn.Module, opt: Optimizer,
                          sched: LambdaLR, grad_clip: float) -> None:
        """One optimiser step on ``loss``."""
        self.backward(loss, model)
        self.step(model, opt, sched, grad_clip)

    @torch.no_grad()
    def _mask_grads(self) -> None:
        for m in self._zeroed():
            assert m.step_mask is not None
            self.mul_local_grad(m.weight, m.step_mask)

    @torch.no_grad()
    def _mask_weights(self) -> None:
        for m in self._zeroed():
            assert m.step_mask is not None
            self.mul_local_weight(m.weight, m.step_mask)
        for m in self.masked:  # scores / weights changed under the no-grad cache's key
            m.invalidate_mask_cache()

    def _zeroed(self) -> list[MaskedLinear]:
        if not self.zero_pruned:
            return []
        return [m for m in self.masked if m.step_mask is not None]

    # -- storage-specific hooks (overridden by sharded strategies) -------------------
    def local_mask(self, full: Tensor) -> Tensor:
        """This rank's part of a full (out, in) mask, laid out like its weight shard."""
        return full

    def local_importance(self, m: MaskedLinear) -> Tensor:
        """This rank's part of ``m``'s importance (scores or ``|W|``), padding excluded."""
        return m.importance()

    def mul_local_grad(self, p: Tensor, mask: Tensor) -> None:
        if p.grad is not None:
            p.grad.mul_(mask.to(p.grad.dtype))

    def mul_local_weight(self, p: Tensor, mask: Tensor) -> None:
        p.data.mul_(mask.to(p.dtype))

    def full_grads(self, model: nn.Module) -> dict[str, Tensor]:
        """Every trainable parameter's full (averaged) gradient, after ``backward``.

        A collective under sharding: call it on every rank.
        """
        return {n: p.grad.detach().clone() for n, p in unwrap(model).named_parameters()
                if p.grad is not None}

    @contextmanager
    def gathered(self, model: nn.Module) -> Iterator[nn.Module]:
        """The bare model with full parameters inside the block (read only; collective)."""
        yield unwrap(model)

    def plain_copy(self, model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module | None:
        """An unsharded model with ``model``'s values on the main rank, None elsewhere.

        Collective. Replicated strategies return the bare model itself (no copy);
        sharded ones load the gathered values into ``build()``, a fresh skeleton.
        """
        if not self.shards_parameters:
            return unwrap(model) if self.ctx.is_main else None
        target = build() if self.ctx.is_main else None
        with self.gathered(model) as bare:
            if target is not None:
                load_full_state(target, bare)
        return target

    def unwrap(self, model: nn.Module) -> nn.Module:
        return unwrap(model)

    # -- checkpoints (capscale.train.checkpoint) --------------------------------------------
    def save_state(self, path: Path, model: nn.Module, opt: Optimizer, sched: LambdaLR
                   ) -> list[Path]:
        """Write the student, optimiser and LR-schedule state under ``path``.

        Replicated strategies write one copy from rank 0; a sharded strategy overrides
        this to write its shards (e.g. one file per rank) and ``load_state`` to read them.

        Returns:
            the files this rank wrote (the caller fsyncs them before the commit).
        """
        if not self.ctx.is_main:
            return []
        files = [path / "model.pt", path / "optimizer.pt"]
        torch.save(unwrap(model).state_dict(), files[0])
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    **self.scaler_state()}, files[1])
        return files

    def scaler_state(self) -> dict[str, Any]:
        """fp16's loss scale and growth tracker (checkpointed: a resumed run continues
        with the same scale)."""
        return {} if self.scaler is None else {"scaler": self.scaler.state_dict()}

    def load_scaler_state(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def load_state(self, path: Path, model: nn.Module, opt: Optimizer, sched: LambdaLR
                   ) -> None:
        """Restore what ``save_state`` wrote (every rank reads the replicated copy)."""
        device = self.ctx.device
        state: dict[str, Any] = torch.load(path / "model.pt", map_location=device,
                                           weights_only=True)
        unwrap(model).load_state_dict(state)
        both = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
        opt.load_state_dict(both["optimizer"])
        sched.load_state_dict(both["scheduler"])
        self.load_scaler_state(both)


@torch.no_grad()
def cast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast ``model``'s floating parameters to ``dtype`` in place, but not its buffers
    (position ids, a MaskedLinear's keep fraction and threshold) nor the learned scores
    of a frozen student copy: its masks must rank the scores the student ranked."""
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype and name != "mask_scores":
                p.data = p.data.to(dtype)
    return model


def full_state(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of ``model`` (non-persistent ones too), as detached
    CPU copies; read inside :meth:`Strategy.gathered` for a sharded model."""
    return {n: t.detach().cpu().clone() for n, t in itertools.chain(
        model.named_parameters(), model.named_buffers())}


@torch.no_grad()
def load_full_state(target: nn.Module, source: nn.Module) -> nn.Module:
    """Copy ``source``'s (gathered, full) parameters and buffers into ``target``.

    Non-persistent buffers and the masks' scope (set by the Pruner, not state) are
    copied too, so ``target``'s masks are ``source``'s.
    """
    missing, _ = target.load_state_dict(full_state(source), strict=False)
    if missing:
        raise RuntimeError(f"gathered state lacks {missing[:5]}...")
    for name, buf in source.named_buffers():
        target.get_buffer(name).copy_(buf)
    for name, mod in source.named_modules():
        if isinstance(mod, MaskedLinear):
            cast(MaskedLinear, target.get_submodule(name)).global_scope = mod.global_scope
    return target


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a data-parallel wrapper or DeepSpeed engine."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def local_param_bytes(model: nn.Module) -> int:
    """Parameter bytes resident on this rank (ZeRO-3 partitions, FSDP2 local shards)."""
    total = 0
    for p in unwrap(model).parameters():
        local = getattr(p, "ds_tensor", None)
        if local is None:
            local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total

"""The one module that touches torch.distributed: process group, gathers, wrapping.

Model math elsewhere takes a :class:`DistContext` (or just its ``rank``, ``world_size``
and ``gather``) and works unchanged with ``world_size == 1`` and no process group.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


@dataclass
class DistContext:
    """Rank, world size, device and the collectives capscale needs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def gather(self, t: Tensor) -> Tensor:
        """Concatenate ``t`` (no gradient) from all ranks along dim 0, in rank order.

        Ranks may hold different numbers of rows (e.g. a short last batch).
        """
        t = t.detach()
        if not self.distributed:
            return t
        sizes = self.gather_sizes(t.shape[0])
        width = max(sizes)
        padded = torch.zeros((width, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    def gather_sizes(self, n: int) -> list[int]:
        """Row counts of every rank."""
        if not self.distributed:
            return [n]
        t = torch.tensor([n], device=self.device)
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t)
        return [int(p) for p in parts]

    def offset(self, n: int) -> int:
        """Index of this rank's first row in the gathered batch."""
        return sum(self.gather_sizes(n)[: self.rank])

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        if not self.distributed:
            return t
        t = t.to(self.device).clone()
        dist.all_reduce(t)
        return t.cpu() if t.device.type != "cpu" else t

    def sum_over_ranks(self, t: Tensor) -> Tensor:
        """Element-wise sum of ``t`` over ranks (no gradient), on ``t``'s own device.

        Used to assemble rows of a sharded bank: each rank fills the rows it owns.
        """
        if not self.distributed:
            return t
        buf = t.detach().to(self.device).contiguous()
        if buf is t:
            buf = buf.clone()
        dist.all_reduce(buf)
        return buf.to(t.device)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_distributed(strategy: str = "single") -> DistContext:
    """Join the process group the launcher (torchrun, accelerate, srun) described.

    Reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; uses NCCL on CUDA, gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and os.environ.get("CAPSCALE_CPU", "0") != "1"
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if world > 1 and strategy == "single":
        strategy = "ddp"
    return DistContext(rank, world, local_rank, device, strategy)


class Strategy:
    """How the student is wrapped and stepped, and how references are frozen.

    ``single`` and ``ddp`` live here; sharded strategies (ZeRO-3, FSDP2) subclass this
    with the same four methods, so the training loop never branches on the strategy.
    """

    name = "single"

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx

    def prepare_student(self, model: nn.Module, param_groups: list[dict],
                        lr_lambda: Callable[[int], float]) -> tuple[nn.Module, Optimizer,
                                                                   LambdaLR]:
        """Wrap the student and build its AdamW optimiser and LR schedule."""
        opt = torch.optim.AdamW(param_groups)
        sched = LambdaLR(opt, lr_lambda)
        if self.ctx.distributed:
            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model, opt, sched

    def prepare_reference(self, model: nn.Module) -> nn.Module:
        """A frozen reference (already ``freeze``-d) ready for forward passes."""
        return model.to(self.ctx.device)

    def backward_and_step(self, loss: Tensor, model: nn.Module, opt: Optimizer,
                          sched: LambdaLR, grad_clip: float) -> None:
        """Backward, clip, optimiser step, LR step, zero grads."""
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(unwrap(model).parameters(), grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return unwrap(model)


STRATEGIES: dict[str, type[Strategy]] = {"single": Strategy, "ddp": Strategy}


def make_strategy(ctx: DistContext) -> Strategy:
    try:
        return STRATEGIES[ctx.strategy](ctx)
    except KeyError:
        raise ValueError(f"unknown strategy {ctx.strategy!r}; known: "
                         f"{', '.join(sorted(STRATEGIES))}") from None


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a data-parallel wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model

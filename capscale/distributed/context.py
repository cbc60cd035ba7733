"""Process group and collectives: :class:`DistContext` and :func:`init_distributed`.

Model math elsewhere takes a :class:`DistContext` (or just its ``rank``, ``world_size``
and ``gather``) and works unchanged with ``world_size == 1`` and no process group.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class DistContext:
    """Rank, world size, device and the collectives capscale needs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "single"
    # Whether init_distributed created the process group (and so should end it).
    owns_group: bool = False

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

    def broadcast_object(self, obj: Any) -> Any:
        """The main rank's ``obj`` on every rank (picklable; small: a decision, a list)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def launcher_strategy(env: Mapping[str, str]) -> str | None:
    """The strategy an ``accelerate launch --config_file ds_configs/<x>.yaml`` asked for.

    accelerate exports ``ACCELERATE_USE_DEEPSPEED`` / ``ACCELERATE_USE_FSDP`` (+
    ``FSDP_VERSION``) for its DeepSpeed / FSDP configs. capscale never builds an
    ``Accelerator`` (its plugins misbehave on CPU, see ds_configs/README.md), so these
    variables only select capscale's own wrapping. ``CAPSCALE_STRATEGY`` wins over both.
    """
    if env.get("CAPSCALE_STRATEGY"):
        return env["CAPSCALE_STRATEGY"]
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "zero3"
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        if env.get("FSDP_VERSION", "1") != "2":
            raise ValueError("capscale shards with FSDP2 only: set fsdp_version: 2 in the "
                             "accelerate config (see ds_configs/fsdp2.yaml)")
        return "fsdp2"
    return None


def resolve_strategy(configured: str, env: Mapping[str, str], world: int) -> str:
    """Config ``strategy`` vs. the launcher's; ``single`` becomes ``ddp`` on several ranks."""
    launched = launcher_strategy(env)
    if launched is not None and configured not in ("single", launched):
        raise ValueError(f"config says strategy={configured!r} but the launcher asked for "
                         f"{launched!r}; make them agree (or drop one)")
    strategy = launched or configured
    if world > 1 and strategy == "single":
        strategy = "ddp"
    return strategy


def init_distributed(strategy: str = "single", timeout_s: float = 600.0) -> DistContext:
    """Join the process group the launcher (torchrun, accelerate, srun) described.

    Reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; uses NCCL on CUDA, gloo otherwise.
    The strategy is the config's unless the launcher chose one (:func:`launcher_strategy`).
    A collective that waits more than ``timeout_s`` (a peer died or hangs) raises, so
    the job exits instead of hanging; the launcher then stops the other ranks.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and os.environ.get("CAPSCALE_CPU", "0") != "1"
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    strategy = resolve_strategy(strategy, os.environ, world)
    # Sharded strategies need a process group even alone (e.g. to measure world 1).
    owns_group = (world > 1 or strategy in ("zero3", "fsdp2")) and not dist.is_initialized()
    if owns_group:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        os.environ.setdefault("LOCAL_RANK", str(local_rank))  # DeepSpeed asserts on it
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank, world, local_rank, device, strategy, owns_group)


def shutdown_distributed(ctx: DistContext, ok: bool) -> None:
    """Leave the process group before the interpreter exits.

    Exiting with a live gloo/NCCL group lets its threads be torn down mid-flight (a rank
    can abort with "terminate called without an active exception" after the run has
    finished). On success the ranks first wait for each other, so none exits while a
    peer still talks to it; after an error no barrier (a peer may be gone). Only a
    group that :func:`init_distributed` created is left; a caller's own group stays.
    """
    if not (ctx.owns_group and dist.is_initialized()):
        return
    if ok:
        dist.barrier()
    dist.destroy_process_group()

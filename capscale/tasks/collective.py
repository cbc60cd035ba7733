"""Collectives a task's loss uses so that W ranks compute the loss of the W-times larger
batch one process would see (the default process group; the identity in one process).

Every rank computes its loss at the same step (training, teacher fine-tuning and
structured importance all run the loss on every rank), so these calls pair up.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> int:
    """Ranks in the default process group (1 outside a multi-rank run)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def gather_with_grad(t: Tensor) -> Tensor:
    """``t`` of every rank concatenated in rank order along dim 0; the backward pass
    hands each rank the gradient of every rank's loss with respect to its own part."""
    if world() == 1:
        return t
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(t.contiguous()))


def rank_offset(n: int) -> int:
    """Where this rank's ``n`` rows start in a gathered batch of equal parts."""
    return dist.get_rank() * n if world() > 1 else 0


def global_mean(total: Tensor, count: int) -> Tensor:
    """This rank's share of a mean over every rank's items: ``total`` (the sum over its
    ``count`` items) times W over the items of all ranks. The ranks' shares average
    (as gradients are averaged over ranks) to the mean one process would take, however
    the items are split."""
    w = world()
    if w == 1:
        return total / max(count, 1)
    n = torch.tensor([float(count)], device=total.device)
    dist.all_reduce(n)
    return total * w / n.clamp(min=1.0).squeeze()

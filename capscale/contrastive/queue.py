"""The online objective's memory: a bounded FIFO queue of reference views.

Online CAP (capscale.contrastive.objectives.OnlineObjective) takes its extra negatives
from the reference views of earlier batches, with their ids and labels (MoCo, He et al.
2020: registered buffers, one ``@torch.no_grad`` enqueue). The queue is replicated:
every rank enqueues the same gathered batch, so every rank holds the same queue.
Memory per rank is ``queue_size * R * H`` per module, independent of the dataset size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ReferenceQueue(nn.Module):
    """A FIFO ring of ``size`` examples, each with R <= ``max_views`` views.

    Args:
        size: K, examples kept.
        max_views: R_max; entries of a different R than the stored ones reset the
            queue (an SnC snapshot was added, so older entries lack a view). Once at
            R_max, a new snapshot replaces the oldest and queued entries keep views of
            the evicted one until pushed out: stale keys, as in MoCo's queue.
        hidden: H.
        dtype, device: storage.
    """

    vectors: Tensor
    ids: Tensor
    labels: Tensor
    ptr: Tensor
    count: Tensor
    views_: Tensor

    def __init__(self, size: int, max_views: int, hidden: int,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.size, self.max_views, self.hidden = size, max_views, hidden
        self.register_buffer("vectors", torch.zeros(size, max_views, hidden, dtype=dtype,
                                                    device=device))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long, device=device))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long,
                                                  device=device))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next write
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("views_", torch.zeros((), dtype=torch.long))  # R stored

    def __len__(self) -> int:
        return int(self.count)

    @torch.no_grad()
    def reset(self) -> None:
        self.ptr.zero_()
        self.count.zero_()
        self.views_.zero_()

    @torch.no_grad()
    def enqueue(self, vectors: Tensor, ids: Tensor, labels: Tensor) -> None:
        """Append ``vectors`` (B, R, H) of examples ``ids`` / ``labels`` (B,), evicting
        the oldest entries beyond ``size``."""
        b, r, _ = vectors.shape
        if r > self.max_views:
            raise ValueError(f"queue holds at most {self.max_views} views, got {r}")
        if r != int(self.views_):
            self.reset()
            self.views_.fill_(r)
        if b > self.size:  # only the newest ``size`` survive
            vectors, ids, labels, b = vectors[-self.size:], ids[-self.size:], \
                labels[-self.size:], self.size
        slots = (int(self.ptr) + torch.arange(b)) % self.size
        slots = slots.to(self.vectors.device)
        self.vectors[slots, :r] = vectors.to(self.vectors)
        self.ids[slots] = ids.to(self.ids)
        self.labels[slots] = labels.to(self.labels)
        self.ptr.fill_((int(self.ptr) + b) % self.size)
        self.count.fill_(min(int(self.count) + b, self.size))

    def entries(self) -> tuple[Tensor, Tensor, Tensor]:
        """(vectors (n, R, H), ids (n,), labels (n,)), oldest first."""
        n = len(self)
        start = (int(self.ptr) - n) % self.size
        order = ((start + torch.arange(n)) % self.size).to(self.vectors.device)
        r = int(self.views_)
        return self.vectors[order, :r], self.ids[order], self.labels[order]

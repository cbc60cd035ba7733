"""Representation banks: [N, R, H] reference views indexed by example id.

A bank is a module whose storage is preallocated buffers, written in place by example
id (``index_copy_``), so building it is linear in N whatever order the loader yields
examples in, and a checkpoint of the module is a checkpoint of the bank. Snapshot banks
are rings of at most ``max_views`` slots: a new snapshot replaces the oldest one.

Under several ranks a bank is either replicated (every rank holds all N rows) or
sharded: rank r owns the rows of the ids with ``id % world == r`` (about N / world rows
per rank), and :meth:`RepresentationBank.views` assembles any requested rows on every
rank through an injected sum-over-ranks function (each rank fills the rows it owns into
zeros; the sum has exactly one non-zero contributor per row, so it is exact and equals
the replicated bank's answer bit for bit). Nothing here calls torch.distributed.

Reference behaviour and its flaws (repeated ``torch.cat``, fp32 only, rows that drift
from ids under a distributed sampler) are described in docs/algorithm.md section 5.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

SumFn = Callable[[Tensor], Tensor]  # element-wise sum over ranks (identity at world 1)


class RepresentationBank(nn.Module):
    """``max_views`` views of ``num_examples`` examples, ``hidden`` wide.

    Args:
        num_examples: N, the training-set size (ids are 0..N-1).
        hidden: H.
        max_views: R_max slots; ``begin_view`` cycles through them.
        dtype: storage dtype (float32 or bfloat16).
        device: storage device.
        shard_rank, shard_world: this rank's share of the rows: it stores the ids with
            ``id % shard_world == shard_rank`` (``shard_world == 1``: all rows).
    """

    vectors: Tensor
    written: Tensor
    slot_order: Tensor
    num_views_: Tensor
    views_made: Tensor

    def __init__(self, num_examples: int, hidden: int, max_views: int = 1,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, shard_rank: int = 0,
                 shard_world: int = 1) -> None:
        super().__init__()
        if not 0 <= shard_rank < shard_world:
            raise ValueError(f"shard_rank must be in [0, {shard_world}), got {shard_rank}")
        self.num_examples, self.hidden, self.max_views = num_examples, hidden, max_views
        self.shard_rank, self.shard_world = shard_rank, shard_world
        # Rows owned here: ids shard_rank, shard_rank + world, ...; local row = id // world.
        self.num_rows = len(range(shard_rank, num_examples, shard_world))
        self.register_buffer("vectors", torch.zeros(self.num_rows, max_views, hidden,
                                                    dtype=dtype, device=device))
        self.register_buffer("written", torch.zeros(self.num_rows, max_views, dtype=torch.bool,
                                                    device=device))
        # Slots in use, in the order they were filled (oldest first).
        self.register_buffer("slot_order", torch.full((max_views,), -1, dtype=torch.long))
        self.register_buffer("num_views_", torch.zeros((), dtype=torch.long))
        self.register_buffer("views_made", torch.zeros((), dtype=torch.long))

    @property
    def num_views(self) -> int:
        return int(self.num_views_)

    @property
    def sharded(self) -> bool:
        return self.shard_world > 1

    def owned(self, ids: Tensor) -> Tensor:
        """(B,) bool: which of ``ids`` this rank stores."""
        return ids % self.shard_world == self.shard_rank

    @torch.no_grad()
    def begin_view(self) -> int:
        """Open a slot for a new view (evicting the oldest when full); return its index."""
        slot = int(self.views_made) % self.max_views
        self.written[:, slot] = False
        order = [int(s) for s in self.slot_order if int(s) >= 0 and int(s) != slot] + [slot]
        self.slot_order.fill_(-1)
        self.slot_order[: len(order)] = torch.tensor(order, dtype=torch.long)
        self.num_views_.fill_(len(order))
        self.views_made += 1
        return slot

    @torch.no_grad()
    def write(self, ids: Tensor, vectors: Tensor, slot: int) -> None:
        """Store ``vectors`` (B, H) as view ``slot`` of examples ``ids`` (B,).

        A sharded bank keeps only the rows it owns and ignores the others, so every rank
        can be handed the same gathered (ids, vectors).
        """
        if vectors.shape[-1] != self.hidden:
            raise ValueError(f"bank is {self.hidden} wide, got vectors of width "
                             f"{vectors.shape[-1]}")
        ids = ids.to(self.vectors.device, torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_examples):
            raise IndexError(f"example ids must be in [0, {self.num_examples}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        vectors = vectors.to(self.vectors)
        if self.sharded:
            mine = self.owned(ids)
            ids, vectors = ids[mine] // self.shard_world, vectors[mine.to(vectors.device)]
        self.vectors[:, slot].index_copy_(0, ids, vectors)
        self.written[:, slot].index_fill_(0, ids, True)

    def missing(self, slot: int) -> int:
        """How many of this rank's rows lack view ``slot``."""
        return int((~self.written[:, slot]).sum())

    def complete(self, slot: int) -> bool:
        """Whether every row stored here has view ``slot`` written."""
        return self.missing(slot) == 0

    def active_slots(self) -> list[int]:
        return [int(s) for s in self.slot_order if int(s) >= 0]

    def views(self, ids: Tensor, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None, sum_fn: SumFn | None = None
              ) -> Tensor:
        """Views of examples ``ids``: (len(ids), R, H), R = slots in use.

        Sharded, this is a collective: every rank must ask for the same ``ids`` and pass
        ``sum_fn``; each contributes the rows it owns (cast to ``dtype`` first, so the
        sum of one value and zeros is exact) and gets all of them back.
        """
        slots = self.active_slots()
        ids = ids.to(self.vectors.device, torch.long)
        if not self.sharded:
            out = self.vectors.index_select(0, ids)[:, slots]
            return out.to(device=device, dtype=dtype or out.dtype, non_blocking=True)
        if sum_fn is None:
            raise ValueError("a sharded bank needs sum_fn (e.g. DistContext.sum_over_ranks) "
                             "to assemble rows owned by other ranks")
        mine = self.owned(ids)
        part = torch.zeros(ids.shape[0], len(slots), self.hidden,
                           dtype=dtype or self.vectors.dtype, device=device)
        rows = self.vectors.index_select(0, ids[mine] // self.shard_world)[:, slots]
        part[mine.to(part.device)] = rows.to(part)
        return sum_fn(part)

    def extra_count(self, num_negatives: int) -> int:
        """E = floor(num_negatives / R): extra examples per step (docs/algorithm.md section 3)."""
        return min(num_negatives // max(self.num_views, 1), self.num_examples)

    def sample_ids(self, count: int, generator: torch.Generator) -> Tensor:
        """``count`` example ids drawn uniformly without replacement.

        The generator, not the rank, decides the draw: seeded the same on every rank it
        gives every rank the same extras, as one process would draw.
        """
        if count >= self.num_examples:
            return torch.arange(self.num_examples)
        return torch.randperm(self.num_examples, generator=generator)[:count]

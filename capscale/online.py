"""Online CAP: live frozen references and a bounded queue instead of banks.

For training sets too large to pre-encode into [N, R, H] banks. Per step and module:

* positives: the batch encoded by the module's live references -- the frozen
  pre-trained model (PrC), the fine-tuned teacher (FiC), and for SnC up to
  ``cap.max_snapshots`` frozen copies of earlier students (R views per example);
* negatives: the gathered global batch (current vectors and reference views) plus a
  bounded FIFO queue of reference views of earlier batches with their ids and labels
  (MoCo, He et al. 2020: registered buffers, one ``@torch.no_grad`` enqueue).

The queue is replicated: every rank enqueues the same gathered batch, so every rank
holds the same queue, and the loss follows the distributed convention of
:func:`capscale.losses.contrastive_loss` (per-rank values average to the global loss).
Memory per rank is ``queue_size * R * H`` per module, independent of the dataset size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .adapters import EncoderAdapter
from .cap import MODULES, gather_batch, module_terms
from .config import CAPConfig
from .distributed import DistContext
from .losses import build_candidates
from .teachers import RepresentationTap, forward_with_representation, set_dropout, snapshot_copy

SnapshotFn = Callable[[nn.Module], nn.Module]  # student -> frozen copy


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


@dataclass
class LiveReference:
    """A frozen model and the tap that reads its representation."""

    model: nn.Module
    tap: RepresentationTap

    def release(self) -> None:
        self.tap.remove()


class OnlineObjective(nn.Module):
    """CAP's contrastive terms from live references and queues; same interface as
    :class:`capscale.cap.CAPObjective`.

    Args:
        cfg: the ``cap`` config section (``queue_size``, ``max_snapshots``, weights).
        hidden: representation width H.
        device: where the queues live (the compute device: they are read every step).
        snapshot_fn: makes a frozen copy of the student for SnC (swap it for sharded
            students, whose weights must be gathered first).
    """

    def __init__(self, cfg: CAPConfig, hidden: int, device: torch.device | str = "cpu",
                 snapshot_fn: SnapshotFn = snapshot_copy) -> None:
        super().__init__()
        self.cfg, self.snapshot_fn = cfg, snapshot_fn
        dtype = torch.bfloat16 if cfg.bank_dtype == "bfloat16" else torch.float32
        self.queues = nn.ModuleDict({
            name: ReferenceQueue(cfg.queue_size, cfg.max_snapshots if name == "snc" else 1,
                                 hidden, dtype, device)
            for name in MODULES if getattr(cfg, name).enabled})
        # Not submodules: references are not trained, moved or saved with the objective.
        self.references: dict[str, list[LiveReference]] = {name: [] for name in self.queues}

    @property
    def enabled(self) -> bool:
        return len(self.queues) > 0

    def set_reference(self, name: str, model: nn.Module, adapter: EncoderAdapter) -> None:
        """Use frozen ``model`` as the single reference of module ``prc`` or ``fic``."""
        for ref in self.references[name]:
            ref.release()
        self.references[name] = [LiveReference(model, RepresentationTap(model, adapter))]

    def add_snapshot(self, student: nn.Module, adapter: EncoderAdapter) -> None:
        """Append a frozen copy of ``student`` (unwrapped) as an SnC reference, dropping
        the oldest beyond ``cap.max_snapshots``."""
        if "snc" not in self.references:
            return
        copy = self.snapshot_fn(student)
        if self.cfg.snapshot_train_mode:  # reference: snapshots encode with dropout on
            set_dropout(copy, True)
        refs = self.references["snc"]
        refs.append(LiveReference(copy, RepresentationTap(copy, adapter)))
        while len(refs) > self.cfg.max_snapshots:
            refs.pop(0).release()

    @torch.no_grad()
    def encode(self, name: str, inputs: dict[str, Tensor]) -> Tensor:
        """The batch's views under module ``name``'s references: (B, R, H), normalised."""
        return torch.stack([forward_with_representation(
            ref.model, inputs, ref.tap, self.cfg.representation)[1]
            for ref in self.references[name]], dim=1)

    def forward(self, anchors: Tensor, ids: Tensor, labels: Tensor, step: int,
                ctx: DistContext, inputs: dict[str, Tensor] | None = None
                ) -> dict[str, Tensor]:
        """Weighted contrastive terms, e.g. ``{"prc_unsup": ..., "fic_sup": ...}``; then
        the gathered batch's reference views join the queues.

        Args:
            anchors: (B, H) local student vectors, L2-normalised, with gradient.
            ids: (B,) local example ids.
            labels: (B,) local labels (-1 for regression).
            step: optimiser step (unused: no random draws in online mode).
            ctx: ranks and gathers.
            inputs: the local batch's model inputs, fed to the references.
        """
        losses: dict[str, Tensor] = {}
        if not self.enabled:
            return losses
        if inputs is None:
            raise ValueError("online mode needs the batch's model inputs (inputs=...)")
        dev, dt = anchors.device, anchors.dtype
        current, g_ids, g_labels, positions = gather_batch(anchors, ids, labels, ctx)
        supervised = bool((g_labels >= 0).all())
        for name, queue in self.queues.items():
            if not self.references[name]:
                continue
            views = ctx.gather(self.encode(name, inputs)).to(dev, dt)  # (Bg, R, H)
            q_vecs, q_ids, q_labels = queue.entries()
            if q_vecs.shape[1] != views.shape[1]:  # queue from another snapshot set
                q_vecs = q_vecs[:0, : views.shape[1]]
                q_ids, q_labels = q_ids[:0], q_labels[:0]
            cands = build_candidates(current, g_ids, g_labels, views, q_vecs.to(dev, dt),
                                     q_ids.to(dev), q_labels.to(dev))
            losses.update(module_terms(name, self.cfg, cands, anchors, ids, labels, g_ids,
                                       g_labels, positions, ctx.world_size, supervised))
            queue.enqueue(views, g_ids, g_labels)
        return losses

    def memory_bytes(self) -> int:
        """Bytes held by the queues (the references are models, counted elsewhere)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

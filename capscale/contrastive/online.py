"""Online CAP: the contrastive terms from live frozen references and bounded queues.

See capscale.contrastive.objectives for the interface it shares with bank mode, and
docs/algorithm.md section 5. Per step and module: positives are the batch encoded by the
module's live references (the frozen pre-trained model, the teacher, up to
``cap.max_snapshots`` frozen copies of earlier students); negatives are the gathered
batch plus a replicated FIFO queue of earlier reference views with their ids and labels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from capscale.contrastive.nce import build_candidates
from capscale.contrastive.objectives import (
    OBJECTIVES,
    Reader,
    ReferenceProvider,
    enabled_modules,
    gather_batch,
    module_terms,
)
from capscale.contrastive.queue import ReferenceQueue

if TYPE_CHECKING:
    from capscale.config import CAPConfig
    from capscale.distributed import DistContext


class OnlineObjective(nn.Module):
    """Online mode (see the module docstring).

    Args:
        cfg: the ``cap`` config section (``queue_size``, ``max_snapshots``, weights).
        hidden: representation width H.
        device: where the queues live (the compute device: they are read every step).
    """

    name = "online"
    online = True  # built from live references (no training-set size, no banks)
    checkpoint_scope = "main"  # the queue is replicated; snapshots are saved in full

    def __init__(self, cfg: CAPConfig, hidden: int, device: torch.device | str = "cpu"
                 ) -> None:
        super().__init__()
        self.cfg = cfg
        self.modules_ = enabled_modules(cfg)
        dtype = torch.bfloat16 if cfg.bank_dtype == "bfloat16" else torch.float32
        self.queues = nn.ModuleDict({
            m.name: ReferenceQueue(cfg.queue_size, m.max_views(cfg.max_snapshots), hidden,
                                   dtype, device) for m in self.modules_})
        # Not submodules: references are not trained, moved or saved with the objective.
        self.references: dict[str, list[tuple[nn.Module, Reader]]] = {
            m.name: [] for m in self.modules_}
        self.snapshot_modes: dict[str, list[bool]] = {}  # train mode of each snapshot
        self.refs: ReferenceProvider | None = None
        self.enqueue = True

    @contextlib.contextmanager
    def updates_paused(self) -> Iterator[None]:
        self.enqueue = False
        try:
            yield
        finally:
            self.enqueue = True

    def setup(self, refs: ReferenceProvider) -> None:
        self.refs = refs
        for m in self.modules_:
            if not m.snapshots:
                model = refs.frozen(m, persistent=True)
                self.references[m.name] = [(model, refs.reader(model))]

    def add_snapshot(self, refs: ReferenceProvider, train_mode: bool, what: str) -> None:
        """Append a frozen copy of the student to every snapshot module, dropping the
        oldest beyond ``cap.max_snapshots``."""
        for m in self.modules_:
            if m.snapshots:
                self._push(m.name, refs.student_copy(train_mode), train_mode)

    def _push(self, name: str, copy: nn.Module, train_mode: bool) -> None:
        assert self.refs is not None
        held, modes = self.references[name], self.snapshot_modes.setdefault(name, [])
        held.append((copy, self.refs.reader(copy)))
        modes.append(train_mode)
        assert self.cfg.max_snapshots is not None, "cap.max_snapshots must be resolved"
        while len(held) > self.cfg.max_snapshots:
            self.refs.release(held.pop(0)[0])
            modes.pop(0)

    @torch.no_grad()
    def encode(self, name: str, inputs: dict[str, Tensor]) -> Tensor:
        """The batch's views under module ``name``'s references: (B, R, H), normalised."""
        return torch.stack([read(inputs) for _, read in self.references[name]], dim=1)

    def forward(self, anchors: Tensor, ids: Tensor, labels: Tensor, step: int,
                ctx: DistContext, inputs: dict[str, Tensor] | None = None
                ) -> dict[str, Tensor]:
        """Weighted contrastive terms; then the gathered batch's reference views join
        the queues. Same arguments as :meth:`BankObjective.forward`; ``inputs`` (the
        local batch's model inputs) feed the references."""
        losses: dict[str, Tensor] = {}
        if not any(self.references.values()):
            return losses
        if inputs is None:
            raise ValueError("online mode needs the batch's model inputs (inputs=...)")
        dev, dt = anchors.device, anchors.dtype
        current, g_ids, g_labels, positions = gather_batch(anchors, ids, labels, ctx)
        supervised = bool((g_labels >= 0).all())
        for name, module in self.queues.items():
            if not self.references[name]:
                continue
            queue = cast(ReferenceQueue, module)
            views = ctx.gather(self.encode(name, inputs)).to(dev, dt)  # (Bg, R, H)
            q_vecs, q_ids, q_labels = queue.entries()
            if q_vecs.shape[1] != views.shape[1]:  # queue from another snapshot set
                q_vecs = q_vecs[:0, : views.shape[1]]
                q_ids, q_labels = q_ids[:0], q_labels[:0]
            cands = build_candidates(current, g_ids, g_labels, views, q_vecs.to(dev, dt),
                                     q_ids.to(dev), q_labels.to(dev))
            losses.update(module_terms(name, self.cfg, cands, anchors, ids, labels, g_ids,
                                       g_labels, positions, ctx.world_size, supervised))
            if self.enqueue:
                queue.enqueue(views, g_ids, g_labels)
        return losses

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """The queues and the snapshot copies' full states (collective under sharding:
        every rank calls it)."""
        assert self.refs is not None
        snaps = {m.name: [{"state": self.refs.model_state(model), "train_mode": mode}
                          for (model, _), mode in zip(self.references[m.name],
                                                      self.snapshot_modes.get(m.name, []))]
                 for m in self.modules_ if m.snapshots}
        return {"queues": {n: q.state_dict() for n, q in self.queues.items()},
                "snapshots": snaps}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> Any:  # type: ignore[override]
        assert self.refs is not None, "setup() first: snapshots are rebuilt through the run"
        for name, q_state in state["queues"].items():
            self.queues[name].load_state_dict(q_state)
        for name, states in state["snapshots"].items():
            for model, _ in self.references[name]:
                self.refs.release(model)
            self.references[name], self.snapshot_modes[name] = [], []
            for s in states:  # each in the mode it was taken in (dropout on or off)
                self._push(name, self.refs.restore_copy(s["state"], s["train_mode"]),
                           s["train_mode"])

    def memory_bytes(self) -> int:
        """Bytes held by the queues (the references are models, counted elsewhere)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


OBJECTIVES["online"] = OnlineObjective

"""The CAP objective: PrC / FiC / SnC banks and their contrastive terms.

Per step and module (CAP_SPEC.md sections 3 and 5): the global batch's current student
vectors (detached) and their bank views, plus ``floor(num_negatives / R)`` extra examples
drawn uniformly from the whole training set with a generator seeded by (seed, step,
module), so every rank draws the same extras as a single process would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .banks import RepresentationBank
from .config import CAPConfig
from .distributed import DistContext
from .losses import build_candidates, contrastive_loss

MODULES = ("prc", "fic", "snc")
Encoder = Callable[[dict[str, Tensor]], Tensor]  # batch -> (B, H) normalised vectors


class CAPObjective(nn.Module):
    """Holds the three banks and computes the weighted contrastive terms.

    Args:
        cfg: the ``cap`` config section.
        num_examples: training-set size N (example ids are 0..N-1).
        hidden: representation width H.
        train_labels: (N,) label of every training example (-1 for regression).
        seed: base seed of the extra-negative draws.
    """

    def __init__(self, cfg: CAPConfig, num_examples: int, hidden: int, train_labels: Tensor,
                 seed: int = 0, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        dtype = torch.bfloat16 if cfg.bank_dtype == "bfloat16" else torch.float32
        bank_device = device if cfg.bank_device == "accelerator" else "cpu"
        self.banks = nn.ModuleDict({
            name: RepresentationBank(num_examples, hidden,
                                     cfg.max_snapshots if name == "snc" else 1, dtype,
                                     bank_device)
            for name in MODULES if getattr(cfg, name).enabled})
        self.register_buffer("train_labels", train_labels.long().clone(), persistent=False)
        self.supervised = bool((train_labels >= 0).all())

    @property
    def enabled(self) -> bool:
        return len(self.banks) > 0

    def _generator(self, step: int, module: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step * 17 + module)

    def forward(self, anchors: Tensor, ids: Tensor, labels: Tensor, step: int,
                ctx: DistContext) -> dict[str, Tensor]:
        """Weighted contrastive terms, e.g. ``{"prc_unsup": ..., "fic_sup": ...}``.

        Args:
            anchors: (B, H) local student vectors, L2-normalised, with gradient.
            ids: (B,) local example ids.
            labels: (B,) local labels.
            step: optimiser step (seeds the extra-negative draws).
            ctx: ranks and gathers.
        """
        losses: dict[str, Tensor] = {}
        if not self.enabled:
            return losses
        current = ctx.gather(anchors)  # (Bg, H), detached
        g_ids, g_labels = ctx.gather(ids), ctx.gather(labels)
        positions = torch.arange(anchors.shape[0], device=ids.device) + ctx.offset(
            anchors.shape[0])
        for m_idx, name in enumerate(MODULES):
            if name not in self.banks or self.banks[name].num_views == 0:
                continue
            bank: RepresentationBank = self.banks[name]
            w = getattr(self.cfg, name)
            dev, dt = anchors.device, anchors.dtype
            views = bank.views(g_ids, dtype=dt, device=dev)
            extra = bank.sample_ids(bank.extra_count(self.cfg.num_negatives),
                                    self._generator(step, m_idx))
            cands = build_candidates(current, g_ids.to(dev), g_labels.to(dev), views,
                                     bank.views(extra, dtype=dt, device=dev), extra.to(dev),
                                     self.train_labels[extra].to(dev))
            self_idx = cands.self_index(positions)
            g_self = cands.self_index(torch.arange(g_ids.shape[0], device=dev))
            common = {"self_index": self_idx, "cands": cands,
                      "temperature": self.cfg.temperature,
                      "normalization": self.cfg.normalization,
                      "global_self_index": g_self, "world_size": ctx.world_size}
            if w.w_unsup > 0:
                losses[f"{name}_unsup"] = w.w_unsup * contrastive_loss(
                    anchors, ids.to(dev), cand_keys=cands.ids, global_keys=g_ids.to(dev),
                    **common)
            if w.w_sup > 0 and self.supervised:
                losses[f"{name}_sup"] = w.w_sup * contrastive_loss(
                    anchors, labels.to(dev), cand_keys=cands.labels,
                    global_keys=g_labels.to(dev), **common)
        return losses

    @torch.no_grad()
    def fill(self, name: str, encode: Encoder, batches: Iterable[dict[str, Tensor]],
             ctx: DistContext) -> int:
        """Encode the training set into a new view of bank ``name``.

        Each rank encodes the batches it is given (e.g. its DistributedSampler shard);
        ids and vectors are gathered and every rank writes every row by example id.

        Returns:
            the slot written.
        """
        bank: RepresentationBank = self.banks[name]
        slot = bank.begin_view()
        for batch in batches:
            vecs = encode(batch)
            bank.write(ctx.gather(batch["example_id"].to(vecs.device)).cpu(),
                       ctx.gather(vecs).to(bank.vectors.device), slot)
        if not bank.complete(slot):
            missing = int((~bank.written[:, slot]).sum())
            raise RuntimeError(f"bank {name}: {missing} examples were not encoded; the bank "
                               "loader must cover the whole training set")
        return slot

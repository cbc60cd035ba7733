"""The CAP objective: PrC / FiC / SnC banks and their contrastive terms.

Per step and module (CAP_SPEC.md sections 3 and 5): the global batch's current student
vectors (detached) and their bank views, plus ``floor(num_negatives / R)`` extra examples
drawn uniformly from the whole training set with a generator seeded by (seed, step,
module), so every rank draws the same extras as a single process would. Because the
global batch ids and the extras are the same on every rank, a sharded bank can serve
both with one collective per module and step (see banks.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .banks import RepresentationBank
from .config import CAPConfig
from .distributed import DistContext
from .losses import Candidates, build_candidates, candidate_log_probs, nce_from_log_probs

MODULES = ("prc", "fic", "snc")
Encoder = Callable[[dict[str, Tensor]], Tensor]  # batch -> (B, H) normalised vectors


def gather_batch(anchors: Tensor, ids: Tensor, labels: Tensor, ctx: DistContext
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The global batch that every rank builds its candidates from (the per-step
    collectives of both objectives).

    Returns:
        current: (Bg, H) all ranks' anchors, detached, in rank order; g_ids, g_labels:
        (Bg,) their ids and labels; positions: (B,) where this rank's anchors sit in it.
        ``g_ids``, ``g_labels`` and ``positions`` are on ``anchors``' device.
    """
    dev = anchors.device
    current = ctx.gather(anchors)
    g_ids, g_labels = ctx.gather(ids).to(dev), ctx.gather(labels).to(dev)
    positions = torch.arange(anchors.shape[0], device=dev) + ctx.offset(anchors.shape[0])
    return current, g_ids, g_labels, positions


def module_terms(name: str, cfg: CAPConfig, cands: Candidates, anchors: Tensor, ids: Tensor,
                 labels: Tensor, g_ids: Tensor, g_labels: Tensor, positions: Tensor,
                 world_size: int, supervised: bool) -> dict[str, Tensor]:
    """The weighted unsupervised / supervised terms of one module (PrC, FiC or SnC).

    Args:
        name: ``prc``, ``fic`` or ``snc`` (its weights are ``cfg.<name>``).
        cands: the global candidate set (batch first, see :func:`build_candidates`).
        anchors: (B, H) local student vectors with gradient.
        ids, labels: (B,) local example ids and labels.
        g_ids, g_labels: (Bg,) the gathered batch's ids and labels.
        positions: (B,) positions of the local anchors in the gathered batch.
        world_size: ranks sharing the global batch (see :func:`contrastive_loss`).
        supervised: whether every label is a class (no supervised term otherwise).
    """
    w = getattr(cfg, name)
    dev = anchors.device
    out: dict[str, Tensor] = {}
    if w.w_unsup <= 0 and not (w.w_sup > 0 and supervised):
        return out
    # One (B, C) score matrix serves both terms (contrastive_loss, split in two).
    logp, is_self = candidate_log_probs(anchors, cands, cands.self_index(positions),
                                        cfg.temperature)
    common = {"normalization": cfg.normalization, "world_size": world_size,
              "global_self_index": cands.self_index(torch.arange(g_ids.shape[0], device=dev))}
    if w.w_unsup > 0:
        out[f"{name}_unsup"] = w.w_unsup * nce_from_log_probs(
            logp, is_self, ids.to(dev), cands.ids, global_keys=g_ids.to(dev), **common)
    if w.w_sup > 0 and supervised:
        out[f"{name}_sup"] = w.w_sup * nce_from_log_probs(
            logp, is_self, labels.to(dev), cands.labels, global_keys=g_labels.to(dev),
            **common)
    return out


class CAPObjective(nn.Module):
    """Holds the three banks and computes the weighted contrastive terms.

    Args:
        cfg: the ``cap`` config section.
        num_examples: training-set size N (example ids are 0..N-1).
        hidden: representation width H.
        train_labels: (N,) label of every training example (-1 for regression).
        seed: base seed of the extra-negative draws.
        device: where the banks live when ``cfg.bank_device == "accelerator"``.
        rank, world_size: this rank's share of the rows when ``cfg.bank_sharding`` is
            ``sharded``; ignored for replicated banks.
    """

    def __init__(self, cfg: CAPConfig, num_examples: int, hidden: int, train_labels: Tensor,
                 seed: int = 0, device: torch.device | str = "cpu", rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        dtype = torch.bfloat16 if cfg.bank_dtype == "bfloat16" else torch.float32
        bank_device = device if cfg.bank_device == "accelerator" else "cpu"
        shard = (rank, world_size) if cfg.bank_sharding == "sharded" else (0, 1)
        self.banks = nn.ModuleDict({
            name: RepresentationBank(num_examples, hidden,
                                     cfg.max_snapshots if name == "snc" else 1, dtype,
                                     bank_device, *shard)
            for name in MODULES if getattr(cfg, name).enabled})
        self.register_buffer("train_labels", train_labels.long().clone(), persistent=False)
        self.supervised = bool((train_labels >= 0).all())

    @property
    def enabled(self) -> bool:
        return len(self.banks) > 0

    def _generator(self, step: int, module: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step * 17 + module)

    def forward(self, anchors: Tensor, ids: Tensor, labels: Tensor, step: int,
                ctx: DistContext, inputs: dict[str, Tensor] | None = None
                ) -> dict[str, Tensor]:
        """Weighted contrastive terms, e.g. ``{"prc_unsup": ..., "fic_sup": ...}``.

        Args:
            anchors: (B, H) local student vectors, L2-normalised, with gradient.
            ids: (B,) local example ids.
            labels: (B,) local labels.
            step: optimiser step (seeds the extra-negative draws).
            ctx: ranks and gathers.
            inputs: the batch's model inputs; unused here (the views come from the
                banks), read by the online objective that shares this interface.
        """
        losses: dict[str, Tensor] = {}
        if not self.enabled:
            return losses
        current, g_ids, g_labels, positions = gather_batch(anchors, ids, labels, ctx)
        for m_idx, name in enumerate(MODULES):
            if name not in self.banks or self.banks[name].num_views == 0:
                continue
            bank: RepresentationBank = self.banks[name]
            dev, dt = anchors.device, anchors.dtype
            extra = bank.sample_ids(bank.extra_count(self.cfg.num_negatives),
                                    self._generator(step, m_idx))
            # One lookup (one collective when sharded) for the batch and the extras.
            both = bank.views(torch.cat([g_ids.cpu(), extra]), dtype=dt, device=dev,
                              sum_fn=ctx.sum_over_ranks)
            views, extra_views = both[: g_ids.shape[0]], both[g_ids.shape[0]:]
            cands = build_candidates(current, g_ids, g_labels, views, extra_views,
                                     extra.to(dev),
                                     self.train_labels[extra].to(dev))
            losses.update(module_terms(name, self.cfg, cands, anchors, ids, labels, g_ids,
                                       g_labels, positions, ctx.world_size,
                                       self.supervised))
        return losses

    @torch.no_grad()
    def fill(self, name: str, encode: Encoder, batches: Iterable[dict[str, Tensor]],
             ctx: DistContext) -> int:
        """Encode the training set into a new view of bank ``name``.

        Each rank encodes the batches it is given (e.g. its DistributedSampler shard);
        ids and vectors are gathered and every rank writes, by example id, every row
        (replicated bank) or the rows it owns (sharded bank).

        Returns:
            the slot written.
        """
        bank: RepresentationBank = self.banks[name]
        slot = bank.begin_view()
        for batch in batches:
            vecs = encode(batch)
            bank.write(ctx.gather(batch["example_id"].to(vecs.device)).cpu(),
                       ctx.gather(vecs).to(bank.vectors.device), slot)
        missing = bank.missing(slot)
        if bank.sharded:  # every rank must agree, or one would raise while others wait
            missing = int(ctx.all_reduce_sum(torch.tensor([missing]))[0])
        if missing:
            raise RuntimeError(f"bank {name}: {missing} examples were not encoded; the bank "
                               "loader must cover the whole training set")
        return slot

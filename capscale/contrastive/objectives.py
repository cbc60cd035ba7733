"""CAP objectives: the contrastive terms of every enabled module, from banks or online.

Both objectives share one interface (:class:`ContrastiveObjective`) and one per-step
core: the global batch is gathered once (:func:`gather_batch`), each module builds its
candidate set (the batch's current vectors and reference views, then its extra
negatives), and :func:`module_terms` scores the local anchors against it.

* ``bank`` (the reference): every fixed module encodes the whole training set once into
  an ``[N, 1, H]`` bank at setup; snapshot modules append a view ``[N, R, H]`` at each
  snapshot. Extra negatives: ``floor(num_negatives / R)`` examples drawn uniformly from
  the training set each step, with a generator seeded by (seed, step, module), so every
  rank draws what one process would.
* ``online``: positives from live frozen references run on each batch; negatives from
  the gathered batch plus a bounded, replicated queue of earlier reference views
  (MoCo, He et al. 2020). Memory independent of N.

Objectives never load models: a :class:`ReferenceProvider` (the run) hands them frozen
models, encodings of the training set and snapshots of the student.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import Tensor, nn

from capscale.contrastive.banks import RepresentationBank
from capscale.contrastive.modules import CONTRASTIVE_MODULES, ContrastiveModule, module_index
from capscale.contrastive.nce import (
    Candidates,
    build_candidates,
    candidate_log_probs,
    nce_from_log_probs,
)
from capscale.registry import add_entry

if TYPE_CHECKING:
    from capscale.config import CAPConfig
    from capscale.distributed import DistContext

Reader = Callable[[dict[str, Tensor]], Tensor]  # model inputs -> (B, H) normalised


class ReferenceProvider(Protocol):
    """What an objective needs from the run (implemented by
    capscale.train.references.RunReferences)."""

    def frozen(self, module: ContrastiveModule, persistent: bool) -> nn.Module:
        """The frozen model of a fixed module, prepared for the strategy; ``persistent``:
        it must outlive the call (online mode) rather than be encoded once."""
        ...

    def release(self, model: nn.Module) -> None:
        """Drop a model obtained from :meth:`frozen` or :meth:`student_copy`."""
        ...

    def encode_training_set(self, model: nn.Module, what: str
                            ) -> Iterator[tuple[Tensor, Tensor]]:
        """(ids, vectors) of the whole training set under ``model``, gathered over ranks
        (every rank sees every pair); shows progress as ``what``."""
        ...

    def student(self, train_mode: bool) -> nn.Module:
        """The live student, switched to train / eval mode (bank snapshots)."""
        ...

    def student_copy(self, train_mode: bool) -> nn.Module:
        """A frozen copy of the student (online snapshots); dropout on if ``train_mode``."""
        ...

    def reader(self, model: nn.Module) -> Reader:
        """The representation of ``model`` on a batch's inputs."""
        ...

    def model_state(self, model: nn.Module) -> dict[str, Tensor]:
        """A frozen copy's full state (collective under sharding)."""
        ...

    def restore_copy(self, state: dict[str, Tensor], train_mode: bool) -> nn.Module:
        """A frozen student copy holding ``state`` (inverse of :meth:`model_state`)."""
        ...


@torch.no_grad()
def gathered_pairs(encode: Reader, batches: Iterable[dict[str, Tensor]], ctx: DistContext
                   ) -> Iterator[tuple[Tensor, Tensor]]:
    """(ids, vectors) of each rank's batches, gathered over ranks: every rank sees every
    pair, whatever sampler split the data. ``encode``: batch -> (B, H) vectors."""
    for batch in batches:
        vecs = encode(batch)
        ids = batch["example_id"].to(vecs.device)
        yield ctx.gather(ids), ctx.gather(vecs)


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
    """The weighted unsupervised / supervised terms of one module.

    Args:
        name: the module (its weights are ``cfg.modules[name]``).
        cands: the global candidate set (batch first, see :func:`build_candidates`).
        anchors: (B, H) local student vectors with gradient.
        ids, labels: (B,) local example ids and labels.
        g_ids, g_labels: (Bg,) the gathered batch's ids and labels.
        positions: (B,) positions of the local anchors in the gathered batch.
        world_size: ranks sharing the global batch (see ``nce.contrastive_loss``).
        supervised: whether every label is a class (no supervised term otherwise).
    """
    w = cfg.modules[name]
    dev = anchors.device
    out: dict[str, Tensor] = {}
    if w.w_unsup <= 0 and not (w.w_sup > 0 and supervised):
        return out
    # One (B, C) score matrix serves both terms (contrastive_loss, split in two).
    logp, is_self = candidate_log_probs(anchors, cands, cands.self_index(positions),
                                        cfg.temperature)
    g_self_index = cands.self_index(torch.arange(g_ids.shape[0], device=dev))
    if w.w_unsup > 0:
        out[f"{name}_unsup"] = w.w_unsup * nce_from_log_probs(
            logp, is_self, ids.to(dev), cands.ids, cfg.normalization,
            global_keys=g_ids.to(dev), global_self_index=g_self_index, world_size=world_size)
    if w.w_sup > 0 and supervised:
        out[f"{name}_sup"] = w.w_sup * nce_from_log_probs(
            logp, is_self, labels.to(dev), cands.labels, cfg.normalization,
            global_keys=g_labels.to(dev), global_self_index=g_self_index,
            world_size=world_size)
    return out


def enabled_modules(cfg: CAPConfig) -> list[ContrastiveModule]:
    """The enabled modules, in table order."""
    return [m for name, m in CONTRASTIVE_MODULES.items()
            if name in cfg.modules and cfg.modules[name].enabled]


class ContrastiveObjective(Protocol):
    """The interface both objectives implement (and the checkpointer saves)."""

    name: str
    # "main": one copy, written by rank 0 and read by all; "rank": a file per rank.
    checkpoint_scope: str
    # Built from live references (no training-set size, no banks): see build_objective.
    online: bool

    def setup(self, refs: ReferenceProvider) -> None:
        """Fill what the fixed modules need (banks, or live references)."""
        ...

    def add_snapshot(self, refs: ReferenceProvider, train_mode: bool, what: str) -> None:
        """Append the current student as a new view of every snapshot module."""
        ...

    def __call__(self, anchors: Tensor, ids: Tensor, labels: Tensor, step: int,
                 ctx: DistContext, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Weighted terms by name (``prc_unsup``, ``snc_sup``, ...)."""
        ...

    def updates_paused(self) -> contextlib.AbstractContextManager:
        """A block whose forwards leave the objective's memory as it was (structured
        importance scores batches without training on them)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class BankObjective(nn.Module):
    """Bank mode (see the module docstring).

    Args:
        cfg: the ``cap`` config section.
        num_examples: training-set size N (example ids are 0..N-1).
        hidden: representation width H.
        train_labels: (N,) contrastive label of every training example (-1: none).
        seed: base seed of the extra-negative draws.
        device: where the banks live when ``cfg.bank_device == "accelerator"``.
        rank, world_size: this rank's share of the rows when ``cfg.bank_sharding`` is
            ``sharded``; ignored for replicated banks.
    """

    name = "bank"
    online = False  # banks over the training set, encoded at setup
    train_labels: Tensor

    def __init__(self, cfg: CAPConfig, num_examples: int, hidden: int, train_labels: Tensor,
                 seed: int = 0, device: torch.device | str = "cpu", rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.modules_ = enabled_modules(cfg)
        dtype = torch.bfloat16 if cfg.bank_dtype == "bfloat16" else torch.float32
        bank_device = device if cfg.bank_device == "accelerator" else "cpu"
        shard = (rank, world_size) if cfg.bank_sharding == "sharded" else (0, 1)
        self.banks = nn.ModuleDict({
            m.name: RepresentationBank(num_examples, hidden, m.max_views(cfg.max_snapshots),
                                       dtype, bank_device, *shard)
            for m in self.modules_})
        self.register_buffer("train_labels", train_labels.long().clone(), persistent=False)
        self.supervised = bool((train_labels >= 0).all())
        self.checkpoint_scope = "rank" if shard[1] > 1 else "main"

    def _generator(self, step: int, module: str) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step * 17
                                             + module_index(module))

    def setup(self, refs: ReferenceProvider) -> None:
        for m in self.modules_:
            if not m.snapshots:
                model = refs.frozen(m, persistent=False)
                self.fill(m.name, refs.encode_training_set(model, f"bank {m.name}"))
                refs.release(model)

    def add_snapshot(self, refs: ReferenceProvider, train_mode: bool, what: str) -> None:
        for m in self.modules_:
            if m.snapshots:
                pairs = refs.encode_training_set(refs.student(train_mode),
                                                 f"bank {m.name} ({what})")
                self.fill(m.name, pairs)

    @torch.no_grad()
    def fill(self, name: str, pairs: Iterator[tuple[Tensor, Tensor]]) -> int:
        """Write a new view of bank ``name`` by example id; every rank is handed the
        same gathered pairs and keeps every row (replicated) or the rows it owns."""
        bank = cast(RepresentationBank, self.banks[name])
        slot = bank.begin_view()
        for ids, vecs in pairs:
            bank.write(ids.cpu(), vecs.to(bank.vectors.device), slot)
        missing = bank.missing(slot)
        if missing:
            raise RuntimeError(f"bank {name}: {missing} examples were not encoded; the bank "
                               "loader must cover the whole training set")
        return slot

    def forward(self, anchors: Tensor, ids: Tensor, labels: Tensor, step: int,
                ctx: DistContext, inputs: dict[str, Tensor] | None = None
                ) -> dict[str, Tensor]:
        """Weighted contrastive terms, e.g. ``{"prc_unsup": ..., "fic_sup": ...}``.

        Args:
            anchors: (B, H) local student vectors, L2-normalised, with gradient.
            ids: (B,) local example ids.
            labels: (B,) local contrastive labels.
            step: optimiser step (seeds the extra-negative draws).
            ctx: ranks and gathers.
            inputs: the batch's model inputs; unused (the views come from the banks).
        """
        losses: dict[str, Tensor] = {}
        live = [n for n, b in self.banks.items() if cast(RepresentationBank, b).num_views > 0]
        if not live:
            return losses
        current, g_ids, g_labels, positions = gather_batch(anchors, ids, labels, ctx)
        dev, dt = anchors.device, anchors.dtype
        for name in live:
            bank = cast(RepresentationBank, self.banks[name])
            extra = bank.sample_ids(bank.extra_count(self.cfg.num_negatives),
                                    self._generator(step, name))
            # One lookup (one collective when sharded) for the batch and the extras.
            both = bank.views(torch.cat([g_ids.cpu(), extra]), dtype=dt, device=dev,
                              sum_fn=ctx.sum_over_ranks)
            views, extra_views = both[: g_ids.shape[0]], both[g_ids.shape[0]:]
            cands = build_candidates(current, g_ids, g_labels, views, extra_views,
                                     extra.to(dev), self.train_labels[extra].to(dev))
            losses.update(module_terms(name, self.cfg, cands, anchors, ids, labels, g_ids,
                                       g_labels, positions, ctx.world_size,
                                       self.supervised))
        return losses

    def updates_paused(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the banks change only at snapshots

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """The snapshot modules' banks (fixed banks are re-encoded at setup, bit-exactly:
        frozen models in eval mode)."""
        return {m.name: self.banks[m.name].state_dict() for m in self.modules_
                if m.snapshots}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> Any:  # type: ignore[override]
        for name, bank_state in state.items():
            self.banks[name].load_state_dict(bank_state)


# ``cap.mode`` -> objective class; capscale.contrastive.online adds ``online``.
OBJECTIVES: dict[str, Any] = {"bank": BankObjective}


def register_objective(name: str, cls: Any, overwrite: bool = False) -> Any:
    """Add an objective class (``cap.mode`` selects it); it is built like
    :class:`BankObjective` or :class:`OnlineObjective` as its ``online`` flag says (see
    ``build_objective``)."""
    return add_entry(OBJECTIVES, name, cls, "objective", overwrite)


def snapshot_memory(cfg: CAPConfig, views: int, num_examples: int, hidden: int,
                    world_size: int, copy_bytes: int) -> dict[str, Any]:
    """What ``views`` SnC snapshots will hold on each rank, known before any is taken.

    Bank mode: one ``[N, H]`` slice of the ``[N, R, H]`` bank per view (``N / world``
    rows when ``cap.bank_sharding`` is sharded) in ``cap.bank_dtype``. Online mode: one
    frozen student copy per view, ``copy_bytes`` each (this rank's share of it).
    """
    if OBJECTIVES[cfg.mode].online:
        per_view, kind = copy_bytes, "student copy"
    else:
        rows = num_examples
        if cfg.bank_sharding == "sharded" and world_size > 1:
            rows = -(-num_examples // world_size)
        width = 2 if cfg.bank_dtype == "bfloat16" else 4
        per_view, kind = rows * hidden * width, f"bank [{rows}, {hidden}] {cfg.bank_dtype}"
    return {"views": views, "per_view": kind, "bytes_per_view": per_view,
            "bytes": views * per_view}


def build_objective(cfg: CAPConfig, num_examples: int, hidden: int, train_labels: Tensor,
                    seed: int, ctx: DistContext) -> Any:
    """The objective ``cfg.mode`` names, for this run's data and ranks (``cfg``'s
    ``max_snapshots`` resolved to a number: see capscale.train.schedules.snapshot_views)."""
    cls = OBJECTIVES[cfg.mode]
    if cls.online:  # live references: no training-set size
        return cls(cfg, hidden, ctx.device)
    return cls(cfg, num_examples, hidden, train_labels, seed, ctx.device, ctx.rank,
               ctx.world_size)

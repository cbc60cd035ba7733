"""Hybrid pruning: movement scores learned on whole heads and FFN neurons.

Block movement pruning (Lagunas et al., "Block Pruning For Faster Transformers", EMNLP
2021) learns one movement score per block of weights instead of one per weight, so
that what it prunes can be cut out of the model. capscale's ``hybrid`` method learns
a score per attention head and per FFN neuron (blocks the size of a head: the head's
``d`` input columns of ``attn_out`` and, through them, its Q / K / V rows; an FFN
neuron's ``ffn_out`` column and, through it, its ``ffn_in`` row), trained with the
weights by the same straight-through top-k as movement pruning and moved along the
same cubic schedule. The export is CAP-f's: a dense, physically smaller model with the
pruned heads and neurons sliced away (a layer left with none keeps one zeroed unit).

How the mask reaches the scores: ``attn_out`` (and ``ffn_out``) become
:class:`UnitMaskedLinear`, which computes ``y = W (m * x) + b`` with ``m`` the unit mask
repeated over each unit's columns. For a head ``h`` with columns ``C_h``::

    dL/dS_h = dL/dm_h = sum_{c in C_h} sum_i W_ic * dL/dW'_ic

the sum of the weight-level movement scores (``dL/dW' * W``) over the block, which is
block movement's score gradient. A pruned head's context is multiplied by 0, so its Q,
K, V rows and the columns stop learning, as if removed; the score keeps its gradient
and the head can come back while the schedule runs.

Sparsity is the fraction of heads and of FFN neurons pruned (the same for both, as in
CAP-f, so the two are compared at the same level). ``pruning.scope: local`` keeps the
top ``1 - s_t`` heads and neurons of every layer; ``global`` ranks heads across layers
and neurons across layers (two thresholds: a head's score sums many more columns than a
neuron's, so the two are never ranked together), which removes more from layers that
need less.

Coarser granularities, as in CAP-f: with ``structured.remove_empty_blocks`` (global
scope) a block whose unit scores all fall below the threshold is skipped
(:func:`attach_block_skips`) and removed from the export; with
``structured.hidden_sparsity`` the hidden dimension is pruned by movement scores
(:class:`capscale.pruning.hidden.HiddenMovement`) in proportion to the unit schedule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capscale.models.adapters import get_submodule
from capscale.models.specs import block_specs
from capscale.pruning.controller import (
    ExportPlan,
    PruningContext,
    PruningController,
    PruningMethod,
)
from capscale.pruning.hidden import HiddenMask, HiddenMovement
from capscale.pruning.latency import LatencyTarget
from capscale.pruning.masked import MaskedLinear, replace_module
from capscale.pruning.structured import (
    block_input,
    mark_mask_hook,
    structured_param_counts,
)
from capscale.pruning.unstructured import WeightMaskController
from capscale.pruning.weight_rules import WEIGHT_RULES

if TYPE_CHECKING:
    from capscale.config import PruningConfig
    from capscale.models.adapters import EncoderAdapter

UNIT_ROLES = ("attn_out", "ffn_out")


class UnitMaskedLinear(MaskedLinear):
    """``y = W (m * x) + b``: a linear map whose input columns come in units (heads of
    ``unit_size`` columns, or single FFN neurons), with one learned score per unit.

    It is a :class:`MaskedLinear` whose ``mask_scores`` has one entry per unit, so the
    :class:`~capscale.pruning.masked.Pruner` (top-k per layer, or one exact global
    threshold over sharded scores) and the checkpoint / export machinery drive it
    unchanged; :meth:`mask` is the (units,) keep mask.
    """

    unit_size: int = 1
    last_mask: Tensor | None = None  # the (units,) mask of the last forward (detached)

    @classmethod
    def wrap(cls, linear: nn.Linear, unit_size: int, score_init: float = 0.0
             ) -> UnitMaskedLinear:
        """Wrap ``linear`` (same Parameters) with ``in_features / unit_size`` scores."""
        if linear.in_features % unit_size:
            raise ValueError(f"{linear.in_features} input columns do not split into units "
                             f"of {unit_size}")
        new = cls.from_linear(linear, WEIGHT_RULES["movement"], score_init, 0.0)
        new.unit_size = unit_size
        new.mask_scores = nn.Parameter(torch.full(
            (linear.in_features // unit_size,), float(score_init),
            device=linear.weight.device))
        return new

    @property
    def num_scores(self) -> int:
        return self.in_features // self.unit_size

    def forward(self, x: Tensor) -> Tensor:
        m = self.mask().to(x.dtype)
        self.last_mask = m.detach()
        if self.unit_size > 1:
            m = m.repeat_interleave(self.unit_size)
        return F.linear(x * m, self.weight, self.bias)

    def weight_mask(self) -> Tensor:
        """(in_features,): the unit mask over each unit's columns (``to_linear`` zeroes
        the pruned units' columns, which gives the same outputs)."""
        return self.mask().repeat_interleave(self.unit_size)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, units={self.num_scores}x{self.unit_size}"


def attach_unit_masks(model: nn.Module, adapter: EncoderAdapter, score_init: float = 0.0
                      ) -> dict[str, UnitMaskedLinear]:
    """Swap every layer's ``attn_out`` and ``ffn_out`` for a :class:`UnitMaskedLinear`;
    return them by ``layer.role``."""
    if getattr(model.config, "talking_head", False):
        raise ValueError("hybrid pruning of heads is not supported with talking_head: true "
                         "(projections mix the heads, so a head cannot be removed alone); "
                         "use an unstructured method")
    head_size = adapter.head_size(model.config)
    out: dict[str, UnitMaskedLinear] = {}
    for key, qname in adapter.qualified_names(model).items():
        role = key.split(".", 1)[1]
        if role not in UNIT_ROLES:
            continue
        lin = model.get_submodule(qname)
        if not isinstance(lin, UnitMaskedLinear):
            size = head_size if role == "attn_out" else 1
            lin = UnitMaskedLinear.wrap(cast(nn.Linear, lin), size, score_init)
            replace_module(model, qname, lin)
        out[key] = lin
    return out


def attach_block_skips(model: nn.Module, adapter: EncoderAdapter,
                       units: dict[str, UnitMaskedLinear]) -> None:
    """``structured.remove_empty_blocks`` under hybrid: a block whose heads (neurons) are
    all pruned returns its input, as the export, which removes it, does. The hook on the
    block's residual module reads the unit mask that the block's ``attn_out`` /
    ``ffn_out`` computed in this very forward (from its own, possibly partitioned,
    scores), and selects with ``torch.where``: no host synchronisation, and the block
    comes back the step its scores bring a unit back."""
    for i, layer in enumerate(adapter.layer_modules(model)):
        for (_, _, residual), role in zip(block_specs(adapter).values(), UNIT_ROLES):
            unit = units[f"{i}.{role}"]

            def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor,
                     unit: UnitMaskedLinear = unit) -> Tensor | None:
                if unit.last_mask is None:
                    return None
                return torch.where(unit.last_mask.any(), output, block_input(module, args))
            get_submodule(layer, residual).register_forward_hook(mark_mask_hook(hook))


def unit_keep(modules: dict[str, UnitMaskedLinear], layers: int
              ) -> tuple[list[Tensor], list[Tensor]]:
    """(heads per layer, neurons per layer) bool keep masks, on CPU."""
    with torch.no_grad():
        heads = [modules[f"{i}.attn_out"].mask().detach().bool().cpu() for i in range(layers)]
        ffn = [modules[f"{i}.ffn_out"].mask().detach().bool().cpu() for i in range(layers)]
    return heads, ffn


def unmask(model: nn.Module) -> None:
    """Replace every UnitMaskedLinear by a plain nn.Linear (pruned columns zeroed)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, UnitMaskedLinear):
            replace_module(model, name, mod.to_linear())


@torch.no_grad()
def warm_start_units(modules: dict[str, UnitMaskedLinear], scale: float) -> None:
    """Scores from the L2 norm of each unit's columns, ``scale * n / mean(n)`` per
    matrix (``pruning.score_warm_start: magnitude``)."""
    for m in modules.values():
        w = m.weight.detach().float()
        norms = w.pow(2).sum(0).reshape(m.num_scores, m.unit_size).sum(1).sqrt()
        assert m.mask_scores is not None
        m.mask_scores.copy_(scale * norms / norms.mean().clamp_min(1e-12))


class HybridController(WeightMaskController):
    """``hybrid``: unit masks moved along the cubic schedule (heads and neurons ranked
    apart), a latency target, a physical export."""

    zero_pruned_weights = False  # mask caches only: pruned units are sliced at export

    def __init__(self, method: PruningMethod, run: PruningContext) -> None:
        super().__init__(method, run)
        self.latency = LatencyTarget(run, prepare=unmask)
        self._hidden: HiddenMovement | None = None
        self._hidden_state: dict[str, Any] = {}  # restored before the mask exists

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        if self.run.adapter.remove_empty_blocks:
            attach_block_skips(model, self.run.adapter, self.unit_modules)

    @property
    def hidden(self) -> HiddenMovement | None:
        """The hidden dimensions' mask and scores (``structured.hidden_sparsity``), hooked
        into the student as the strategy prepared it (made on first use, after the
        wrapping, on the student's device)."""
        if self._hidden is None and self.run.structured.hidden_sparsity > 0:
            bare = self.run.strategy.unwrap(self.run.student())
            self._hidden = HiddenMovement(HiddenMask(bare, self.run.adapter, mark_mask_hook))
            self._hidden.load_state_dict(self._hidden_state)
        return self._hidden

    def hidden_keep(self) -> Tensor | None:
        return None if self.hidden is None else self.hidden.mask.keep()

    def _move_hidden(self) -> None:
        """Prune the hidden dimensions in proportion to the head / neuron schedule."""
        if self.hidden is not None:
            final = max(self.run.pruning.final_sparsity, 1e-12)
            self.hidden.prune_to(self.run.structured.hidden_sparsity
                                 * min(1.0, self.pruner.sparsity / final))

    def warm_start(self, modules: dict[str, MaskedLinear], scale: float) -> None:
        warm_start_units(cast(dict[str, UnitMaskedLinear], modules), scale)

    def groups(self, modules: dict[str, MaskedLinear]) -> list[dict[str, MaskedLinear]]:
        """Heads and neurons are thresholded apart (their scores differ in scale)."""
        return [{k: m for k, m in modules.items() if k.endswith(role)} for role in UNIT_ROLES]

    def _accumulate_hidden(self) -> None:
        """Add the last step's ``dL/dz`` to the hidden scores (collective)."""
        if self.hidden is not None:
            ctx = self.run.ctx
            self.hidden.accumulate(ctx.all_reduce_sum if ctx.distributed else None,
                                   ctx.world_size)

    def before_step(self, step: int) -> None:
        self._accumulate_hidden()
        if self.latency.due(step, self.pruner.sparsity):
            self._check_latency()
        super().before_step(step)
        self._move_hidden()

    def sync_masks(self) -> None:
        super().sync_masks()
        self._move_hidden()

    def _check_latency(self) -> None:
        """Measure the export at the current masks; cap the schedule there if met."""
        def keep(copy: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
            units = attach_unit_masks(copy, self.run.adapter)
            return unit_keep(units, len(self.run.adapter.layer_modules(copy)))
        if self.latency.check(self.pruner.sparsity, keep, self.hidden_keep()):
            for pr in self.pruners:
                pr.ceiling = self.pruner.sparsity

    def on_end(self) -> None:
        self._accumulate_hidden()  # the last step's dL/dz joins the saved scores
        if self.latency.enabled and not self.latency.frozen:
            self.sync_masks()
            m = self.latency.measured
            if not (m and abs(m[-1]["sparsity"] - self.pruner.sparsity) < 1e-9):
                self._check_latency()
            self.latency.warn_if_missed(self.pruner.sparsity, "pruning.final_sparsity")

    def keep(self) -> tuple[list[Tensor], list[Tensor]]:
        """Head and neuron keep masks (collective under sharding: gathers the scores)."""
        run = self.run
        with run.strategy.gathered(run.student()) as bare:
            return unit_keep(self.unit_modules, len(run.adapter.layer_modules(bare)))

    @property
    def unit_modules(self) -> dict[str, UnitMaskedLinear]:
        return cast(dict[str, UnitMaskedLinear], self.modules)

    def report(self) -> dict[str, Any]:
        run = self.run
        with run.strategy.gathered(run.student()) as bare:
            heads, ffn = unit_keep(self.unit_modules, len(run.adapter.layer_modules(bare)))
            return unit_report(bare, run.adapter, heads, ffn, self.hidden_keep())

    def latency_summary(self) -> dict[str, Any] | None:
        return self.latency.summary()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "latency": self.latency.state_dict(),
                "hidden": {} if self.hidden is None else self.hidden.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.latency.load_state_dict(state.get("latency", {}))
        self._hidden_state = state.get("hidden", {})
        if self._hidden is not None:
            self._hidden.load_state_dict(self._hidden_state)
        super().load_state_dict(state)
        for pr in self.pruners:
            pr.ceiling = self.latency.met_at

    def export_plan(self, model: nn.Module) -> ExportPlan:
        """The physically smaller student (pruned heads and neurons sliced away); the
        copy's unit-masked layers become plain linears."""
        modules = attach_unit_masks(model, self.run.adapter)  # the copy's own modules
        heads, ffn = unit_keep(modules, len(self.run.adapter.layer_modules(model)))
        unmask(model)
        return ExportPlan(heads, ffn, self.hidden_keep())


class HybridPruning(PruningMethod):
    """``hybrid``: movement scores on whole heads and FFN neurons, exported physically
    smaller."""

    name = "hybrid"
    learns_scores = True
    physical_export = True

    def attach(self, model: nn.Module, adapter: EncoderAdapter, pruning: PruningConfig
               ) -> dict[str, MaskedLinear]:
        return dict(attach_unit_masks(model, adapter, pruning.score_init))

    def controller(self, run: PruningContext) -> PruningController:
        return HybridController(self, run)


def unit_report(model: nn.Module, adapter: EncoderAdapter, heads: list[Tensor],
                ffn: list[Tensor], hidden: Tensor | None = None) -> dict[str, Any]:
    """Sparsity of a unit-pruned model in the keys of ``sparsity_report`` plus the head
    and FFN fractions (the structured report) and, with ``hidden`` (keep mask), the
    hidden dimensions'."""
    counts = structured_param_counts(model, adapter, heads, ffn, hidden)
    prunable = sum(lin.in_features * lin.out_features
                   for lin in adapter.prunable_linears(model).values())
    total = sum(int(getattr(p, "ds_numel", p.numel())) for n, p in model.named_parameters()
                if not n.endswith("mask_scores"))
    return {**counts,
            "head_sparsity": 1 - sum(int(h.sum()) for h in heads) / sum(h.numel() for h in heads),
            "ffn_sparsity": 1 - sum(int(f.sum()) for f in ffn) / sum(f.numel() for f in ffn),
            "linear_sparsity": counts["pruned_parameters"] / prunable,
            "total_sparsity": counts["pruned_parameters"] / total,
            **({} if hidden is None else {"hidden_sparsity": 1 - int(hidden.sum())
                                          / hidden.numel()})}

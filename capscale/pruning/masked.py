"""Masked linear layers swapped into any encoder, and the pruner that drives them.

``MaskedLinear`` subclasses ``nn.Linear`` and keeps the very same ``weight`` / ``bias``
Parameter objects, so optimisers, ZeRO-3 partitioning and ``state_dict`` keys see the
original model. The mask is applied functionally in forward (``F.linear(x, W * M, b)``):
under ZeRO-3 the gathered weight is released after forward, and an in-place edit of it
would be lost, whereas a functional mask always holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capscale.models.adapters import EncoderAdapter
from capscale.models.recompute import recomputing
from capscale.pruning.schedule import cubic_sparsity, warmup_steps
from capscale.pruning.weight_rules import WeightRule, get_weight_rule

if TYPE_CHECKING:
    from typing_extensions import Self

    from capscale.config import PruningConfig

AllReduceFn = Callable[[Tensor], Tensor]  # sums a tensor over ranks (identity at world 1)


class MaskedLinear(nn.Linear):
    """``y = x (W * M)^T + b`` with ``M`` computed by a weight rule (capscale.pruning.weight_rules)
    from learned scores or from ``|W|``.

    The layer holds the state every rule shares: the scores (when the rule learns
    them), the keep fraction of a per-matrix top-k, the threshold (global scope, or soft
    movement's tau), and the tie fraction of a global threshold.
    """

    keep_frac: Tensor
    threshold: Tensor
    tie_frac: Tensor
    # The no-grad mask and the key it was computed under (see ``mask``).
    _mask_cache: tuple[tuple[object, ...], Tensor] | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 method: str | WeightRule = "movement", score_init: float = 0.0,
                 min_keep: float = 0.005, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(method, score_init, min_keep)

    def _setup(self, method: str | WeightRule, score_init: float, min_keep: float) -> None:
        self.rule = get_weight_rule(method)
        self.method = self.rule.name
        self.min_keep = min_keep
        self.global_scope = False
        # Whether the rule keeps a top fraction (set by the Pruner; soft movement with
        # ``pruning.soft_threshold: schedule`` does not).
        self.steered = True
        # Set by a strategy when pruned weights are zeroed after each step: maps the full
        # (out, in) mask to this rank's part of the weight (its ZeRO-3 / FSDP2 shard).
        self.mask_slicer: Callable[[Tensor], Tensor] | None = None
        # This rank's part of the mask of the last training forward (what the optimiser
        # step must keep zero); None when nobody asked for it.
        self.step_mask: Tensor | None = None
        # The rule's score penalty (soft movement: mean sigmoid of the scores) of the
        # last training forward, taken while a sharded strategy has the whole scores
        # gathered (outside the forward ZeRO-3 leaves an empty tensor); read once by
        # the rule's regularization.
        self.score_penalty: Tensor | None = None
        # Output rows of each logical matrix when this linear map fuses several (Q, K, V
        # of a fused projection; a GLU's input and gate halves): a per-matrix top-k
        # ranks each group on its own. None: one matrix. Set by attach_masks.
        self.row_groups: list[Tensor] | None = None
        # (N, M) of an N:M semi-structured pattern along the input dimension, or None.
        self.nm: tuple[int, int] | None = None
        # Sizes come from in/out_features, never from weight.shape (ZeRO-3 shows (0,)).
        if not self.rule.has_scores:
            self.mask_scores = None
        else:
            self.mask_scores = nn.Parameter(torch.full(
                (self.out_features, self.in_features), float(score_init),
                device=self.bias.device if self.bias is not None else None))
        self.register_buffer("keep_frac", torch.ones((), dtype=torch.float64))
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
        # Global scope: fraction of the scores equal to the threshold that are kept. Set
        # by the Pruner on every update, so it is not part of the state_dict.
        self.register_buffer("tie_frac", torch.ones((), dtype=torch.float64), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str | WeightRule, score_init: float = 0.0,
                    min_keep: float = 0.005) -> Self:
        """Wrap ``linear`` without copying: the new module owns the same Parameters."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new._setup(method, score_init, min_keep)
        if new.mask_scores is not None:
            new.mask_scores.data = new.mask_scores.data.to(linear.weight.device)
        return new

    @property
    def num_scores(self) -> int:
        """Entries the mask ranks (one per weight; fewer in subclasses scoring blocks)."""
        return self.in_features * self.out_features

    def importance(self) -> Tensor:
        """What the mask ranks (learned scores, or ``|W|`` for magnitude pruning)."""
        return self.rule.importance(self)

    def mask(self) -> Tensor:
        """The current {0, 1} mask, (out_features, in_features); carries STE gradient.

        Without autograd (evaluation, bank encoding) the mask cannot change between
        forwards until the scores, weights or schedule do, so it is cached on those.
        """
        if torch.is_grad_enabled():
            return self._compute_mask()
        src = self.mask_scores if self.mask_scores is not None else self.weight
        key = (src._version, src.data_ptr(), float(self.keep_frac), float(self.threshold),
               float(self.tie_frac), self.global_scope, self.steered, self.nm)
        cached = getattr(self, "_mask_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, self._compute_mask().detach())
            self._mask_cache = cached
        return cached[1]

    def _compute_mask(self) -> Tensor:
        return self.rule.mask(self)

    def invalidate_mask_cache(self) -> None:
        """Drop the no-grad mask cache (its key cannot see a sharded parameter update)."""
        self._mask_cache = None

    def forward(self, x: Tensor) -> Tensor:
        mask = self.mask()
        if self.mask_slicer is not None and torch.is_grad_enabled():
            self.step_mask = self.mask_slicer(mask.detach().bool())
        if (getattr(self.rule, "penalizes_scores", False) and torch.is_grad_enabled()
                and self.mask_scores is not None and not recomputing()):
            self.score_penalty = torch.sigmoid(self.mask_scores).mean()
        return F.linear(x, self.weight * mask.to(self.weight.dtype), self.bias)

    def weight_mask(self) -> Tensor:
        """The mask in the weight's layout ((out, in), or what broadcasts to it)."""
        return self.mask()

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear with the mask baked into its weight."""
        with torch.no_grad():
            mask = self.weight_mask().to(self.weight.dtype)
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                            device=self.weight.device, dtype=self.weight.dtype)
            lin.weight.copy_(self.weight * mask)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, method={self.method}"


def configure_masks(modules: Iterable[MaskedLinear], cfg: PruningConfig) -> bool:
    """Set every layer's mask mode from the pruning config: top-k or the schedule's
    threshold (``steered``), one global threshold (``global_scope``), an N:M pattern
    (``nm``). Returns ``global_scope``. A model whose masks are rebuilt from saved
    state (an export's skeleton, ``capscale export``) needs it as the run's did."""
    modules = list(modules)
    rule = modules[0].rule if modules else None
    steered = rule is not None and rule.uses_topk(cfg)
    pattern = cfg.pattern
    nm = cfg.nm()  # (N, M) or None; the config checked the spelling
    global_scope = (cfg.scope == "global" and rule is not None and rule.supports_global
                    and steered and nm is None)
    if nm is not None:
        bad = [m for m in modules if m.in_features % nm[1]]
        if bad:
            raise ValueError(f"pruning.pattern {pattern}: a prunable matrix has "
                             f"{bad[0].in_features} inputs, not a multiple of {nm[1]}")
    for m in modules:
        m.global_scope, m.steered, m.nm = global_scope, steered, nm
    return global_scope


def replace_module(model: nn.Module, qualified: str, new: nn.Module) -> None:
    parent_name, _, child = qualified.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def attach_masks(model: nn.Module, adapter: EncoderAdapter, method: str | WeightRule,
                 score_init: float = 0.0, min_keep: float = 0.005
                 ) -> dict[str, MaskedLinear]:
    """Swap every prunable encoder linear for a MaskedLinear; return them by ``layer.role``
    (physical roles: a fused QKV map is one module, ranked per logical matrix)."""
    out: dict[str, MaskedLinear] = {}
    num_heads = adapter.num_heads(model.config) if adapter.qkv else 0
    for key, qname in adapter.qualified_names(model).items():
        lin = cast(nn.Linear, model.get_submodule(qname))
        new = lin if isinstance(lin, MaskedLinear) else MaskedLinear.from_linear(
            lin, method, score_init, min_keep)
        groups = adapter.row_groups(key.split(".", 1)[1], new.out_features, num_heads)
        new.row_groups = list(groups.values()) if groups else None
        replace_module(model, qname, new)
        out[key] = new
    return out


def bake_masks(model: nn.Module) -> dict[str, Tensor]:
    """Replace every MaskedLinear by a plain nn.Linear with the mask multiplied in.

    Returns:
        the binary masks (bool) by qualified module name.
    """
    masks = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, MaskedLinear):
            with torch.no_grad():
                masks[name] = mod.mask().detach().bool().cpu()
            replace_module(model, name, mod.to_linear())
    return masks


def _sortable(x: Tensor) -> Tensor:
    """Map float32 values to int64 keys with the same order (exact bisection over floats)."""
    i = x.detach().float().contiguous().view(torch.int32).to(torch.int64)
    return torch.where(i < 0, i ^ 0x7FFFFFFF, i)


def _unsortable(key: int) -> float:
    i = key ^ 0x7FFFFFFF if key < 0 else key
    return float(torch.tensor([i], dtype=torch.int64).to(torch.int32).view(torch.float32))


def kth_largest(tensors: list[Tensor], k: int, all_reduce: AllReduceFn | None = None) -> float:
    """The exact k-th largest value over all ``tensors`` (and over all ranks).

    Each rank passes its local shards; only a scalar count is all-reduced per
    iteration (32 bisection steps over the float32 bit order), so no rank ever holds the
    scores of the others. At world 1 it equals ``torch.cat(...).topk(k).values.min()``.
    """
    keys = [_sortable(t.flatten()) for t in tensors]
    lo, hi = -(2**31), 2**31 - 1  # invariant: count(key >= lo) >= k, count(key > hi) < k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        count = torch.tensor(float(sum(int((kk >= mid).sum()) for kk in keys)),
                             dtype=torch.float64)
        if all_reduce is not None:
            count = all_reduce(count)
        if count >= k:
            lo = mid
        else:
            hi = mid - 1
    return _unsortable(lo)


class Pruner:
    """Owns a model's masked layers and moves them along the sparsity schedule.

    Args:
        modules: ``attach_masks`` output (all with the same rule).
        cfg: the pruning section of the config.
        total_steps: optimiser steps of the whole run (for the schedule).
        all_reduce: sums a tensor over ranks; needed for ``scope: global`` when the
            scores are sharded (ZeRO-3 / FSDP2). None at world 1.
        local_importance: returns the rank-local part of a module's importance (its
            shard); defaults to the whole tensor.
    """

    def __init__(self, modules: dict[str, MaskedLinear], cfg: PruningConfig,
                 total_steps: int, all_reduce: AllReduceFn | None = None,
                 local_importance: Callable[[MaskedLinear], Tensor] | None = None) -> None:
        self.modules = modules
        self.cfg = cfg
        self.rule = next(iter(modules.values())).rule if modules else None
        self.total_steps = total_steps
        self.t_i = warmup_steps(cfg.initial_warmup, total_steps)
        self.t_f = warmup_steps(cfg.final_warmup, total_steps)
        self.all_reduce = all_reduce
        self.local_importance = local_importance or (lambda m: m.importance())
        self.sparsity = cfg.initial_sparsity
        # A cap on the schedule (a latency target met at this sparsity), or None.
        self.ceiling: float | None = None
        self.global_scope = configure_masks(modules.values(), cfg)

    def schedule(self, step: int) -> float:
        """Scheduled target sparsity at ``step`` (the cubic schedule)."""
        return cubic_sparsity(step, self.total_steps, self.cfg.initial_sparsity,
                              self.cfg.final_sparsity, self.t_i, self.t_f)

    @torch.no_grad()
    def update(self, step: int) -> float:
        """Move every mask to the schedule's target for ``step`` (at most ``ceiling``);
        return the target."""
        target = self.schedule(step)
        if self.ceiling is not None:
            target = min(target, self.ceiling)
        self.sparsity = target
        if self.rule is not None:
            self.rule.set_target(self, target)
        return target

    @torch.no_grad()
    def set_keep_fraction(self, keep_frac: float) -> None:
        """Keep ``keep_frac`` of every matrix (local scope) or of all of them (global)."""
        for m in self.modules.values():
            m.keep_frac.fill_(keep_frac)
        if self.global_scope:
            thr = self.global_threshold(keep_frac)
            tie_frac = self.tie_fraction(thr, keep_frac)
            for m in self.modules.values():
                m.threshold.fill_(thr)
                m.tie_frac.fill_(tie_frac)

    def global_threshold(self, keep_frac: float) -> float:
        """Threshold keeping ``keep_frac`` of all prunable weights (exact, shard-safe)."""
        numel = sum(m.num_scores for m in self.modules.values())
        k = round(keep_frac * numel)
        if k <= 0:
            return float("inf")
        if k >= numel:
            return float("-inf")
        local = [self.local_importance(m) for m in self.modules.values()]
        return kth_largest(local, k, self.all_reduce)

    def tie_fraction(self, threshold: float, keep_frac: float) -> float:
        """Fraction of the scores equal to ``threshold`` to keep so that exactly
        ``keep_frac`` of all weights are kept (up to one entry per matrix and rank)."""
        if not math.isfinite(threshold):
            return 1.0
        numel = sum(m.num_scores for m in self.modules.values())
        local = [self.local_importance(m).detach() for m in self.modules.values()]
        counts = torch.tensor([float(sum(int((t > threshold).sum()) for t in local)),
                               float(sum(int((t == threshold).sum()) for t in local))],
                              dtype=torch.float64)
        if self.all_reduce is not None:
            counts = self.all_reduce(counts)
        above, ties = float(counts[0]), float(counts[1])
        if ties == 0:
            return 1.0
        return min(1.0, max(0.0, (round(keep_frac * numel) - above) / ties))

    def regularization(self) -> Tensor | None:
        """The rule's loss term (soft movement's ramped L1 penalty), or None."""
        return self.rule.regularization(self) if self.rule is not None else None

    def score_parameters(self) -> list[nn.Parameter]:
        return [m.mask_scores for m in self.modules.values() if m.mask_scores is not None]

    @torch.no_grad()
    def masks(self) -> dict[str, Tensor]:
        """Current binary masks by ``layer.role`` (bool, on each module's device)."""
        return {k: m.mask().bool() for k, m in self.modules.items()}

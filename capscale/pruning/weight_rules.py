"""Weight-mask rules: how an unstructured method turns scores (or weights) into a mask.

A rule is what differs between movement, soft movement and magnitude pruning; the
:class:`~capscale.pruning.masked.MaskedLinear` layer and the
:class:`~capscale.pruning.masked.Pruner` that moves the masks along the schedule are
shared. A rule says

* whether it learns a score per weight (``has_scores``: trained in its own optimiser
  group at ``pruning.score_lr``, initialised to ``pruning.score_init``),
* how a layer's mask is computed (:meth:`WeightRule.mask`, with a straight-through
  gradient to the scores),
* what it ranks for a global threshold (:meth:`WeightRule.importance`),
* how the scheduled target reaches the layers (:meth:`WeightRule.set_target`),
* what regulariser it adds to the loss (:meth:`WeightRule.regularization`).

Formulas (Sanh et al., "Movement Pruning", NeurIPS 2020, eq. 2-4; CAP, Xu et al. 2022):

* movement: ``M = TopK(S, 1 - s_t)`` per matrix (reference; per logical matrix of a
  fused linear map: Q, K and V of a fused QKV projection, the halves of a GLU input),
  or ``S >= thr`` with one exact threshold over every matrix (``pruning.scope:
  global``); ``dL/dS = dL/dW' * W``.
* soft movement: the loss gains ``lambda_t * mean_matrices(mean(sigmoid(S)))`` with
  ``lambda_t = final_lambda * s_t / s_T`` (an L1 penalty on the sigmoid scores, ramped
  with the schedule), and the mask is, by ``pruning.soft_threshold``:

  - ``schedule`` (the reference): ``M = sigmoid(S) > tau_t`` with ``tau_t =
    final_threshold * s_t / s_T``, at least ``min_keep`` of each matrix kept. The
    sparsity is whatever the penalty drives below ``tau_t``: reached indirectly, and not
    at all when the run is too short for the scores to fall (0% after 300 steps at the
    reference's lambda on a small task).
  - ``target``: ``M`` keeps the ``1 - s_t`` highest scores, over all matrices at once
    with ``pruning.scope: global`` (one threshold on ``S``, so on ``sigmoid(S)``: as in
    the reference, matrices are pruned unevenly, by where the penalty pushed their
    scores) or per matrix with ``local``. The threshold is steered each update to the
    exact quantile, so the schedule's sparsity is reached at every step whatever the
    run's length; the penalty still decides which weights fall.
* magnitude: ``M = TopK(|W|, 1 - s_t)`` (no scores; the paper's baseline).
* N:M pattern (``pruning.pattern: "2:4"``, movement or magnitude): in every group of M
  consecutive input weights of a row, the ``round(M * (1 - s_t))`` (at least N) largest
  scores are kept, so the schedule ends at exactly N per group (``1 - N / M`` sparsity),
  the layout GPU sparse tensor cores run (2:4 on Ampere or newer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor

from capscale.pruning.binarizers import (
    NMBinarizer,
    SigmoidThresholdBinarizer,
    ThresholdBinarizer,
    TopKBinarizer,
    grouped,
    nm_mask,
    topk_mask,
)
from capscale.registry import add_entry

if TYPE_CHECKING:
    from capscale.config import PruningConfig
    from capscale.pruning.masked import MaskedLinear, Pruner


@runtime_checkable
class WeightRule(Protocol):
    """The per-method part of unstructured pruning (see the module docstring)."""

    name: str
    has_scores: bool
    supports_global: bool  # whether ``pruning.scope: global`` applies

    def mask(self, m: MaskedLinear) -> Tensor:
        """(out_features, in_features) {0, 1} mask; carries the STE gradient to scores."""
        ...

    def importance(self, m: MaskedLinear) -> Tensor:
        """What a global threshold ranks (full tensor; strategies slice their shard)."""
        ...

    def set_target(self, pruner: Pruner, target: float) -> None:
        """Move every layer of ``pruner`` to the scheduled sparsity ``target``."""
        ...

    def regularization(self, pruner: Pruner) -> Tensor | None:
        """A loss term the method adds (None: nothing)."""
        ...

    def uses_topk(self, cfg: PruningConfig) -> bool:
        """Whether the rule keeps a top fraction under ``cfg`` (so ``pruning.scope``
        and the steered threshold apply)."""
        ...


def nm_keep(m: MaskedLinear) -> int:
    """Entries kept per group of ``M`` under an N:M pattern at the layer's keep fraction:
    ``round(M * keep_frac)``, never under N (the cubic schedule ends at ``1 - N / M``)."""
    assert m.nm is not None, "nm_keep needs an N:M layer"
    n, group = m.nm
    return max(n, min(group, round(group * float(m.keep_frac))))


def _scores(m: MaskedLinear) -> Tensor:
    """The learned scores of a layer whose rule has them (``has_scores``)."""
    assert m.mask_scores is not None, f"{m.method} layer without mask scores"
    return m.mask_scores


def _penalty(m: MaskedLinear) -> Tensor:
    """Mean sigmoid of a layer's scores: as its last training forward recorded it
    (taken once), else computed now (no forward since, or outside training)."""
    recorded, m.score_penalty = m.score_penalty, None
    return recorded if recorded is not None else torch.sigmoid(_scores(m)).mean()


class TopKRule:
    """Base of the rules that keep the top ``1 - s_t`` of an importance per matrix, or
    everything above one exact global threshold."""

    name = "topk"
    has_scores = True
    supports_global = True

    def importance(self, m: MaskedLinear) -> Tensor:
        return _scores(m)

    def mask(self, m: MaskedLinear) -> Tensor:
        if m.nm is not None:
            return NMBinarizer.apply(m.mask_scores, nm_keep(m), m.nm[1])
        if m.global_scope:
            scores = self.importance(m)
            return ThresholdBinarizer.apply(scores, m.threshold.to(scores.dtype),
                                            float(m.tie_frac))
        return TopKBinarizer.apply(m.mask_scores, float(m.keep_frac), m.row_groups)

    def set_target(self, pruner: Pruner, target: float) -> None:
        pruner.set_keep_fraction(1.0 - target)

    def regularization(self, pruner: Pruner) -> Tensor | None:
        return None

    def uses_topk(self, cfg: PruningConfig) -> bool:
        return True


class MovementRule(TopKRule):
    """Movement pruning: learned scores, hard top-k (CAP-m)."""

    name = "movement"


class MagnitudeRule(TopKRule):
    """Magnitude pruning: ``|W|`` ranks the weights (no scores)."""

    name = "magnitude"
    has_scores = False

    def importance(self, m: MaskedLinear) -> Tensor:
        return m.weight.detach().abs()

    def mask(self, m: MaskedLinear) -> Tensor:
        if m.nm is not None:
            return nm_mask(self.importance(m), nm_keep(m), m.nm[1])
        if m.global_scope:
            return super().mask(m)
        return grouped(lambda s: topk_mask(s, float(m.keep_frac)),  # no gradient
                       self.importance(m), m.row_groups)


class SoftMovementRule(TopKRule):
    """Soft movement pruning: an L1 penalty on sigmoid scores and a threshold that
    follows the schedule (reference) or is steered to the target (CAP-soft)."""

    name = "soft_movement"
    penalizes_scores = True  # MaskedLinear records the penalty in its forward

    def uses_topk(self, cfg: PruningConfig) -> bool:
        return cfg.soft_threshold == "target"

    def mask(self, m: MaskedLinear) -> Tensor:
        if m.steered:
            return super().mask(m)
        return SigmoidThresholdBinarizer.apply(m.mask_scores, float(m.threshold), m.min_keep,
                                               m.row_groups)

    def set_target(self, pruner: Pruner, target: float) -> None:
        if self.uses_topk(pruner.cfg):
            super().set_target(pruner, target)
            return
        # tau_t follows the cubic schedule's shape, from 0 to final_threshold.
        final = pruner.cfg.final_sparsity
        tau = pruner.cfg.final_threshold * (target / final if final > 0 else 1.0)
        for m in pruner.modules.values():
            m.threshold.fill_(tau)

    def regularization(self, pruner: Pruner) -> Tensor | None:
        if not pruner.modules:
            return None
        terms = [_penalty(m) for m in pruner.modules.values()]
        final = pruner.cfg.final_sparsity
        lam = pruner.cfg.final_lambda * (pruner.sparsity / final if final > 0 else 1.0)
        return lam * torch.stack(terms).mean()


WEIGHT_RULES: dict[str, WeightRule] = {}


def register_weight_rule(rule: WeightRule, overwrite: bool = False) -> WeightRule:
    """Make ``rule`` known by name to the masked layers (checkpoints and exports rebuild
    masks from the rule's name)."""
    if not isinstance(rule, WeightRule):
        raise TypeError(f"{rule!r} does not implement capscale.pruning.weight_rules.WeightRule")
    return add_entry(WEIGHT_RULES, rule.name, rule, "weight rule", overwrite)


def get_weight_rule(rule: str | WeightRule) -> WeightRule:
    if not isinstance(rule, str):
        return rule
    if rule not in WEIGHT_RULES:
        raise ValueError(f"unknown pruning method {rule!r} for masked layers; known: "
                         f"{', '.join(sorted(WEIGHT_RULES))}")
    return WEIGHT_RULES[rule]


for _rule in (MovementRule(), SoftMovementRule(), MagnitudeRule()):
    register_weight_rule(_rule)

"""Pruning: straight-through binarizers, the cubic schedule, masked layers, accounting."""

from capscale.pruning.accounting import sparsity_report
from capscale.pruning.binarizers import (
    SigmoidThresholdBinarizer,
    ThresholdBinarizer,
    TopKBinarizer,
    topk_mask,
)
from capscale.pruning.masked import MaskedLinear, Pruner, attach_masks, bake_masks, kth_largest
from capscale.pruning.schedule import cubic_sparsity, warmup_steps

__all__ = [
    "MaskedLinear",
    "Pruner",
    "SigmoidThresholdBinarizer",
    "ThresholdBinarizer",
    "TopKBinarizer",
    "attach_masks",
    "bake_masks",
    "cubic_sparsity",
    "kth_largest",
    "sparsity_report",
    "topk_mask",
    "warmup_steps",
]

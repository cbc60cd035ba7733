"""Straight-through binarizers for learned pruning masks.

Each binarizer turns real-valued importance scores ``S`` into a {0, 1} mask ``M`` in
forward and passes the gradient straight through in backward (``dL/dS = dL/dM``), as in
movement pruning (Sanh et al., 2020, eq. 2 and section 3). With ``W' = W * M`` that makes
``dL/dS_ij = dL/dW'_ij * W_ij``: a score grows when its weight moves away from zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def topk_mask(scores: Tensor, keep_frac: float) -> Tensor:
    """Mask keeping the ``ceil``-free count ``round(keep_frac * numel)`` largest scores.

    Args:
        scores: any shape.
        keep_frac: fraction kept, in [0, 1].

    Returns:
        mask of the same shape and dtype, ones on the kept entries.
    """
    n = scores.numel()
    k = round(keep_frac * n)
    mask = torch.zeros_like(scores)
    if k <= 0:
        return mask
    if k >= n:
        return mask.fill_(1.0)
    idx = torch.topk(scores.detach().flatten(), k, sorted=False).indices
    mask.view(-1)[idx] = 1.0
    return mask


def grouped(fn: Callable[[Tensor], Tensor], scores: Tensor,
            groups: Sequence[Tensor] | None) -> Tensor:
    """``fn`` applied to each row group of ``scores`` on its own (a fused linear map's
    logical matrices, e.g. the Q, K and V rows of one QKV projection); ``fn(scores)``
    when there are no groups."""
    if not groups:
        return fn(scores)
    mask = torch.zeros_like(scores)
    for rows in groups:
        rows = rows.to(scores.device)
        mask[rows] = fn(scores.index_select(0, rows))
    return mask


def nm_mask(scores: Tensor, keep: int, m: int) -> Tensor:
    """Keep the ``keep`` largest of every ``m`` consecutive entries along the last
    dimension (N:M semi-structured sparsity at ``keep = N``); ties by lower index.

    Args:
        scores: (out_features, in_features) with ``in_features % m == 0``.
        keep: entries kept per group, in [0, m].
        m: group size.
    """
    out_f, in_f = scores.shape
    groups = scores.detach().reshape(out_f, in_f // m, m)
    mask = torch.zeros_like(groups)
    if keep >= m:
        return mask.fill_(1.0).reshape(out_f, in_f)
    if keep > 0:
        order = torch.sort(-groups, dim=-1, stable=True).indices[..., :keep]
        mask.scatter_(-1, order, 1.0)
    return mask.reshape(out_f, in_f)


class NMBinarizer(torch.autograd.Function):
    """N:M mask of the scores (``nm_mask``); backward: identity to the scores."""

    @staticmethod
    def forward(ctx, scores: Tensor, keep: int, m: int) -> Tensor:  # noqa: ANN001
        return nm_mask(scores, keep, m)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: ANN001
        return grad, None, None


class TopKBinarizer(torch.autograd.Function):
    """``M = 1[S in top keep_frac of S]`` (per matrix, or per row group of a fused
    matrix); backward: identity."""

    @staticmethod
    def forward(ctx, scores: Tensor, keep_frac: float,  # noqa: ANN001
                groups: Sequence[Tensor] | None = None) -> Tensor:
        return grouped(lambda s: topk_mask(s, keep_frac), scores, groups)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: ANN001
        return grad, None, None


class ThresholdBinarizer(torch.autograd.Function):
    """``M = 1[S > threshold]`` plus ``tie_frac`` of the entries equal to it; backward: identity.

    Used with a global threshold. Keeping every tie would overshoot the kept count by
    all of them: scores start equal (``score_init``) and AdamW's first steps move them
    by the same +-lr, so most scores can tie. The first ``round(tie_frac * ties)`` tied
    entries in row-major order are kept.
    """

    @staticmethod
    def forward(ctx, scores: Tensor, threshold: Tensor, tie_frac: float = 1.0  # noqa: ANN001
                ) -> Tensor:
        mask = scores > threshold
        ties = (scores == threshold).flatten().nonzero().squeeze(1)
        keep = ties[: round(tie_frac * ties.numel())]
        mask.view(-1)[keep] = True
        return mask.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: ANN001
        return grad, None, None


class SigmoidThresholdBinarizer(torch.autograd.Function):
    """Soft movement (Sanh et al., 2020, section 3): ``M = 1[sigmoid(S) > tau]``.

    At least ``min_keep`` of the entries are kept (the largest scores), so no matrix is
    ever pruned away entirely. Backward: identity to ``S``.
    """

    @staticmethod
    def forward(ctx, scores: Tensor, tau: float, min_keep: float,  # noqa: ANN001
                groups: Sequence[Tensor] | None = None) -> Tensor:
        def one(s: Tensor) -> Tensor:
            mask = (torch.sigmoid(s) > tau).to(s.dtype)
            # Round the floor up: round() would keep fewer than min_keep, or nothing at
            # all in a small matrix (0.5% of 21 entries rounds to 0).
            n = s.numel()
            k = math.ceil(min_keep * n)
            if mask.sum() < k:
                mask = topk_mask(s, k / n)
            return mask
        return grouped(one, scores, groups)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # noqa: ANN001
        return grad, None, None, None

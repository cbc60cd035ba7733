"""N:M semi-structured sparsity: checking an exported model's pattern and handing its
weights to the GPU's sparse kernels.

A pruned model with ``pruning.pattern: "2:4"`` keeps exactly 2 of every 4 consecutive
input weights of each row of every prunable matrix. Ampere and newer NVIDIA GPUs
multiply such a matrix on sparse tensor cores when its weight is a PyTorch
semi-structured sparse tensor (``torch.sparse.to_sparse_semi_structured``, fp16 / bf16,
CUDA only); on a CPU the masked model runs at dense speed.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn


def check_pattern(masks: dict[str, Tensor], n: int, m: int) -> dict[str, Any]:
    """Whether every mask keeps exactly ``n`` of each ``m`` consecutive input entries.

    Args:
        masks: bool keep masks, (out_features, in_features), by name.
        n, m: the pattern.

    Returns:
        ``{"pattern": "n:m", "matrices", "groups", "groups_off_pattern", "exact"}``.
    """
    groups = off = 0
    for mask in masks.values():
        out_f, in_f = mask.shape
        if in_f % m:
            raise ValueError(f"{in_f} inputs are not a multiple of {m}")
        kept = mask.reshape(out_f, in_f // m, m).sum(-1)
        groups += kept.numel()
        off += int((kept != n).sum())
    return {"pattern": f"{n}:{m}", "matrices": len(masks), "groups": groups,
            "groups_off_pattern": off, "exact": off == 0}


@torch.no_grad()
def to_semi_structured(model: nn.Module, names: list[str], dtype: torch.dtype = torch.float16
                       ) -> nn.Module:
    """Swap the weights of the linear maps ``names`` of ``model`` (on a CUDA device, 2:4
    pattern) for semi-structured sparse tensors, in place; the model is cast to
    ``dtype``. Raises RuntimeError where the kernels are unavailable (no CUDA)."""
    if not torch.cuda.is_available():
        raise RuntimeError("semi-structured sparse kernels need a CUDA GPU (Ampere or newer)")
    from torch.sparse import to_sparse_semi_structured

    model.to(device="cuda", dtype=dtype)
    for name in names:
        lin = cast(nn.Linear, model.get_submodule(name))
        lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight.detach()),
                                  requires_grad=False)
    return model

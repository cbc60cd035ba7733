"""Physically remove pruned heads and FFN neurons, and describe the result for export.

Slicing keeps, per layer, the Q / K / V rows (and those of any other per-head
projection) and the attn_out columns of the kept heads, and the ffn_in rows and
ffn_out columns of the kept neurons. The result computes exactly what the masked model
computes (``capscale.pruning.structured``) with fewer parameters and FLOPs.

A layer whose heads (or neurons) are all pruned keeps one, with its attn_out (ffn_out)
columns zeroed: the block then outputs its output bias alone, as the masked model does,
while every tensor keeps a non-zero width (a zero-width projection breaks the stock
attention reshape ``view(B, T, -1, d)``). It costs one head or neuron per such layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..adapters import EncoderAdapter
from .structured import optional_linear


def _sliced(lin: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None,
            zero_cols: bool = False) -> nn.Linear:
    """A new nn.Linear with the kept output ``rows`` / input ``cols`` of ``lin``."""
    w = lin.weight.detach()
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device,
                    dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if zero_cols:
            new.weight.zero_()
        if lin.bias is not None:
            b = lin.bias.detach()
            new.bias.copy_(b.index_select(0, rows.to(b.device)) if rows is not None else b)
    new.requires_grad_(lin.weight.requires_grad)
    return new


def _set(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


@torch.no_grad()
def prune_structure(model: nn.Module, adapter: EncoderAdapter, heads: list[Tensor],
                    ffn: list[Tensor]) -> dict[str, Any]:
    """Slice ``model``'s encoder in place to the kept heads and neurons.

    Args:
        model: the task model, without structured mask hooks.
        adapter: its encoder adapter.
        heads: per layer, (H,) bool keep mask of the heads.
        ffn: per layer, (I,) bool keep mask of the FFN neurons.

    Returns:
        the ``capscale_structure`` description stored in the exported config.
    """
    config = model.config
    d = adapter.head_size(config)
    head_paths = [adapter.query, adapter.key, adapter.value, *adapter.extra_head_linears]
    heads_per_layer, inter_per_layer = [], []
    for layer, h_keep, f_keep in zip(adapter.layer_modules(model), heads, ffn):
        h_idx = torch.nonzero(h_keep.cpu()).flatten()
        empty_attn = h_idx.numel() == 0
        if empty_attn:
            h_idx = torch.zeros(1, dtype=torch.long)
        rows = (h_idx[:, None] * d + torch.arange(d)[None, :]).flatten()
        for path in head_paths:
            lin = optional_linear(layer, path)
            if lin is not None:
                _set(layer, path, _sliced(lin, rows=rows))
        lins = adapter.layer_linears(layer)
        _set(layer, adapter.attn_out, _sliced(lins["attn_out"], cols=rows, zero_cols=empty_attn))
        f_idx = torch.nonzero(f_keep.cpu()).flatten()
        empty_ffn = f_idx.numel() == 0
        if empty_ffn:
            f_idx = torch.zeros(1, dtype=torch.long)
        _set(layer, adapter.ffn_in, _sliced(lins["ffn_in"], rows=f_idx))
        _set(layer, adapter.ffn_out, _sliced(lins["ffn_out"], cols=f_idx, zero_cols=empty_ffn))
        attention = layer.get_submodule(attention_module(adapter))
        for attr, value in (("num_attention_heads", h_idx.numel()),
                            ("all_head_size", h_idx.numel() * d)):
            if hasattr(attention, attr):
                setattr(attention, attr, value)
        heads_per_layer.append(int(h_idx.numel()))
        inter_per_layer.append(int(f_idx.numel()))
    return {"layers": adapter.layers, "head_size": d,
            "head_linears": head_paths, "attn_out": adapter.attn_out,
            "ffn_in": adapter.ffn_in, "ffn_out": adapter.ffn_out,
            "attention_module": attention_module(adapter),
            "heads_per_layer": heads_per_layer, "intermediate_per_layer": inter_per_layer}


def attention_module(adapter: EncoderAdapter) -> str:
    """Path of the module that owns Q/K/V (it holds the head-count attributes)."""
    return adapter.query.rpartition(".")[0]

"""Physically remove pruned heads and FFN neurons, and describe the result for export.

Slicing keeps, per layer, the Q / K / V rows (and those of any other per-head
projection) and the attn_out columns of the kept heads, and the ffn_in rows and
ffn_out columns of the kept neurons. The result computes exactly what the masked model
computes (``capscale.pruning.structured``) with fewer parameters and FLOPs.

A layer whose heads (or neurons) are all pruned keeps one, with its attn_out (ffn_out)
columns zeroed: the block then outputs its output bias alone, as the masked model does,
while every tensor keeps a non-zero width (a zero-width projection breaks the stock
attention reshape ``view(B, T, -1, d)``). It costs one head or neuron per such layer.
With ``adapter.remove_empty_blocks`` such a block is removed instead: its compute and
residual modules become stubs (hf_pruned_model.py) that hand the block's input on, as
the masked model's skip hooks do; a layer with both blocks removed is the identity.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import Tensor, nn

from capscale.export.hf_pruned_model import skip_block, widen
from capscale.models.adapters import EncoderAdapter, get_submodule, head_param
from capscale.models.deep_check import head_attributes
from capscale.models.specs import block_specs
from capscale.pruning.hidden import model_width
from capscale.pruning.structured import optional_linear, optional_module, optional_param


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


def _set(root: nn.Module, path: str, new: nn.Module | nn.Parameter) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


@torch.no_grad()
def prune_structure(model: nn.Module, adapter: EncoderAdapter, heads: list[Tensor],
                    ffn: list[Tensor], hidden: Tensor | None = None) -> dict[str, Any]:
    """Slice ``model``'s encoder in place to the kept heads and neurons.

    Fused Q/K/V maps lose a pruned head's rows in all three blocks (``adapter.head_rows``),
    a GLU input projection a pruned neuron's two rows (``adapter.neuron_rows``), and
    per-head parameter vectors their slices. Layers the model applies several times are
    sliced once.

    Args:
        model: the task model, without structured mask hooks.
        adapter: its encoder adapter.
        heads: per distinct layer, (H,) bool keep mask of the heads.
        ffn: per distinct layer, (I,) bool keep mask of the FFN neurons.
        hidden: (H,) bool keep mask of the hidden dimensions, or None (all kept).

    Returns:
        the ``capscale_structure`` description stored in the exported config (read by
        the loader in hf_pruned_model.py).
    """
    config = model.config
    d = adapter.head_size(config)
    num_heads = adapter.num_heads(config)
    specs = block_specs(adapter) if adapter.remove_empty_blocks else {}
    width = model_width(model)
    h_keep_idx = (torch.nonzero(hidden.cpu()).flatten()
                  if hidden is not None and not bool(hidden.all()) else None)
    if h_keep_idx is not None:
        _narrow_embeddings(model, adapter, h_keep_idx)
    heads_per_layer, inter_per_layer, kept_heads = [], [], []
    removed: dict[str, list[int]] = {"attention": [], "ffn": []}
    attrs: dict[str, str] = {}
    config_attr = None
    for i, (layer, h_keep, f_keep) in enumerate(zip(adapter.layer_modules(model), heads, ffn)):
        h_idx = torch.nonzero(h_keep.cpu()).flatten()
        f_idx = torch.nonzero(f_keep.cpu()).flatten()
        for kind, idx in (("attention", h_idx), ("ffn", f_idx)):
            if specs and idx.numel() == 0:
                skip_block(layer, specs[kind])
                removed[kind].append(i)
        if i not in removed["attention"]:
            attrs, config_attr = _slice_heads(layer, adapter, h_idx, d, num_heads, h_keep_idx)
        if i not in removed["ffn"]:
            _slice_neurons(layer, adapter, f_idx, h_keep_idx)
        if h_keep_idx is not None:
            for path in adapter.hidden_norms or ():
                norm = optional_module(layer, path)  # None inside a removed block
                if norm is not None:
                    _set(layer, path, _sliced_norm(norm, h_keep_idx))
        heads_per_layer.append(int(max(h_idx.numel(), i not in removed["attention"])))
        inter_per_layer.append(int(max(f_idx.numel(), i not in removed["ffn"])))
        kept_heads.append(h_idx.tolist() if h_idx.numel() or i in removed["attention"]
                          else [0])
    hidden_fields: dict[str, Any] = {}
    if h_keep_idx is not None:
        kept = h_keep_idx.tolist()
        adapter.layer_modules(model)[-1].register_forward_hook(widen(kept, width))
        norm_path = str(adapter.embedding_norm)
        hidden_fields = {"hidden_kept": kept, "hidden_size": width,
                         "embeddings": norm_path.rpartition(".")[0],
                         "embedding_norm": norm_path,
                         "hidden_norms": list(adapter.hidden_norms or ())}
    return {**hidden_fields, "layers": adapter.layers, "layer_paths": adapter.layer_paths(model),
            "head_size": d, "head_linears": [p for p in adapter.head_linear_paths()
                                             if p != adapter.qkv],
            "fused_qkv": adapter.qkv, "head_params": list(adapter.extra_head_params),
            "head_attrs": attrs, "config_heads_attr": config_attr,
            "head_inputs": [list(x) for x in adapter.head_inputs],
            "attn_out": adapter.attn_out, "ffn_in": adapter.ffn_in,
            "ffn_in_rows_per_neuron": 2 if adapter.ffn_gated else 1,
            "ffn_out": adapter.ffn_out, "attention_module": attention_module(adapter),
            "heads_per_layer": heads_per_layer, "intermediate_per_layer": inter_per_layer,
            "kept_heads": kept_heads, "removed_blocks": removed,
            "blocks": {k: list(v) for k, v in specs.items()}}


def _narrow_embeddings(model: nn.Module, adapter: EncoderAdapter, keep: Tensor) -> None:
    """The embedding tables' and the embedding LayerNorm's kept hidden dimensions."""
    base = getattr(model, "base_model", model)
    width = model_width(model)
    norm_path = str(adapter.embedding_norm)
    emb = base.get_submodule(norm_path.rpartition(".")[0])
    for name, mod in list(emb.named_children()):
        if isinstance(mod, nn.Embedding) and mod.embedding_dim == width:
            new = nn.Embedding(mod.num_embeddings, keep.numel(), padding_idx=mod.padding_idx,
                               device=mod.weight.device, dtype=mod.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(mod.weight.detach().index_select(1, keep.to(
                    mod.weight.device)))
            new.requires_grad_(mod.weight.requires_grad)
            setattr(emb, name, new)
    _set(base, norm_path, _sliced_norm(base.get_submodule(norm_path), keep))


def _sliced_norm(norm: nn.Module, keep: Tensor) -> nn.LayerNorm:
    """A LayerNorm over the kept dimensions of ``norm`` (its weight and bias sliced)."""
    old = cast(nn.LayerNorm, norm)
    new = nn.LayerNorm(keep.numel(), eps=old.eps, elementwise_affine=old.weight is not None,
                       device=old.weight.device if old.weight is not None else None)
    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(old, name, None)
            if p is not None:
                getattr(new, name).copy_(p.detach().index_select(0, keep.to(p.device)))
    return new


def _slice_heads(layer: nn.Module, adapter: EncoderAdapter, h_idx: Tensor, d: int,
                 num_heads: int, hidden: Tensor | None = None
                 ) -> tuple[dict[str, str], str | None]:
    """Keep the heads ``h_idx`` of one layer (none kept: one, its output zeroed) and the
    hidden dimensions ``hidden`` (None: all); returns the attention's head attributes
    and the config attribute it reads."""
    empty_attn = h_idx.numel() == 0
    if empty_attn:
        h_idx = torch.zeros(1, dtype=torch.long)
    rows = adapter.head_rows("plain", h_idx, d, num_heads)
    for path in adapter.head_linear_paths():
        lin = optional_linear(layer, path)
        if lin is not None:
            role = "qkv" if path == adapter.qkv else "plain"
            _set(layer, path, _sliced(lin, rows=adapter.head_rows(role, h_idx, d, num_heads),
                                      cols=hidden))
    for entry in adapter.extra_head_params:
        _slice_param(layer, entry, rows, h_idx, num_heads)
    attn_out = get_submodule(layer, adapter.attn_out)
    _set(layer, adapter.attn_out, _sliced(cast(nn.Linear, attn_out), rows=hidden, cols=rows,
                                          zero_cols=empty_attn))
    attention = layer.get_submodule(attention_module(adapter))
    attrs = head_attributes(attention, num_heads, d)
    for attr, kind in attrs.items():
        setattr(attention, attr, h_idx.numel() * (d if kind == "width" else 1))
    config_attr = _own_config_attr(attention, attrs, adapter)
    if config_attr is not None:  # the attention reads its head count from its config
        attention.config = copy.copy(attention.config)
        setattr(attention.config, config_attr, int(h_idx.numel()))
    return attrs, config_attr


def _slice_neurons(layer: nn.Module, adapter: EncoderAdapter, f_idx: Tensor,
                   hidden: Tensor | None = None) -> None:
    """Keep the FFN neurons ``f_idx`` of one layer (none kept: one, its output zeroed)
    and the hidden dimensions ``hidden`` (None: all)."""
    ffn_in = cast(nn.Linear, get_submodule(layer, adapter.ffn_in))
    ffn_out = cast(nn.Linear, get_submodule(layer, adapter.ffn_out))
    empty_ffn = f_idx.numel() == 0
    if empty_ffn:
        f_idx = torch.zeros(1, dtype=torch.long)
    _set(layer, adapter.ffn_in, _sliced(ffn_in, rows=adapter.neuron_rows(
        f_idx, ffn_out.in_features), cols=hidden))
    _set(layer, adapter.ffn_out, _sliced(ffn_out, rows=hidden, cols=f_idx,
                                         zero_cols=empty_ffn))


def _slice_param(layer: nn.Module, entry: str, rows: Tensor, heads: Tensor,
                 num_heads: int) -> None:
    """Keep the kept heads' part of the per-head parameter ``entry`` (``path``: ``rows``
    of a vector; ``path:N``: slices ``heads`` of dimension N). A module with one channel
    group per head (a depthwise convolution) gets its channel counts rewritten."""
    path, dim = head_param(entry)
    param = optional_param(layer, path)
    if param is None:
        return
    idx = rows if dim is None else heads
    _set(layer, path, nn.Parameter(param.detach().index_select(
        dim or 0, idx.to(param.device)).clone(), requires_grad=param.requires_grad))
    owner = layer.get_submodule(path.rpartition(".")[0])
    for attr in ("in_channels", "out_channels", "groups"):
        if dim is not None and getattr(owner, attr, None) == num_heads:
            setattr(owner, attr, int(heads.numel()))


def _own_config_attr(attention: nn.Module, attrs: dict[str, str],
                     adapter: EncoderAdapter) -> str | None:
    """The config attribute the attention module reads its head count from, when it has
    no head-count attribute of its own but keeps the config (Funnel)."""
    if any(kind == "heads" for kind in attrs.values()):
        return None
    own = getattr(attention, "config", None)
    return adapter.num_heads_attr if isinstance(
        getattr(own, adapter.num_heads_attr, None), int) else None


def attention_module(adapter: EncoderAdapter) -> str:
    """Path of the module that owns Q/K/V (it holds the head-count attributes)."""
    return adapter.head_linear_paths()[0].rpartition(".")[0]


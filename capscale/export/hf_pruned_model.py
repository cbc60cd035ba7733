"""Loads a capscale structured-pruned encoder with transformers alone.

capscale copies this file next to an exported model (as ``capscale_pruned.py``, with
``BASE_CLASS`` set to the model's class) and points ``config.auto_map`` at it under
the Auto class of the model's task:

    AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)
    AutoModelForQuestionAnswering.from_pretrained(path, trust_remote_code=True)

Stock transformers builds every layer with ``config.num_attention_heads`` heads and
``config.intermediate_size`` neurons, and transformers 5 has no ``pruned_heads`` any
more, so per-layer head counts and FFN widths cannot be expressed by config fields the
stock classes honour. This subclass builds the stock model, then resizes each layer's
linear maps (a fused Q/K/V map to three blocks of the kept heads, a gated FFN input to
two rows per kept neuron) and per-head parameters to the sizes in
``config.capscale_structure``; the forward is the stock one (the attention reshapes
infer the head count from the projection width, or read the attributes set here, or
the head count of the attention's own copy of the config).
Forward arguments that carry one slice per head for all layers at once (MPNet's
position bias) are narrowed to a layer's kept heads by a pre-hook. A removed attention
or FFN block becomes two parameter-free stubs that hand the block's input on; a pruned
hidden dimension narrows the embedding tables, the LayerNorms and every projection,
and a hook widens the last layer's output back to the config's hidden size (zeros at
the pruned dimensions) for the pooler and the head. It imports nothing but torch and
transformers.
"""

import copy
from typing import Any, cast

import torch
import transformers
from torch import nn

BASE_CLASS = "BertForSequenceClassification"


def _swap(root: nn.Module, path: str, in_features: int | None = None,
          out_features: int | None = None) -> None:
    """Replace the linear map at ``path`` (when it exists) by one of the new size."""
    try:
        old = cast(nn.Linear, root.get_submodule(path))
    except AttributeError:
        return
    new = nn.Linear(in_features or old.in_features, out_features or old.out_features,
                    bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _resize_param(root: nn.Module, entry: str, heads: int, head_size: int) -> None:
    """Give the per-head parameter ``entry`` its kept heads' size: ``path`` is a vector of
    ``heads x head_size``; ``path:N`` has one slice per head in dimension N (a module with
    one channel group per head gets its channel counts too)."""
    path, _, dim = entry.partition(":")
    parent, _, name = path.rpartition(".")
    try:
        mod = root.get_submodule(parent) if parent else root
    except AttributeError:
        return
    old = getattr(mod, name, None)
    if not isinstance(old, nn.Parameter):
        return
    shape = [heads * head_size]
    if dim:
        shape = list(old.shape)
        for attr in ("in_channels", "out_channels", "groups"):
            if getattr(mod, attr, None) == shape[int(dim)]:
                setattr(mod, attr, heads)
        shape[int(dim)] = heads
    setattr(mod, name, nn.Parameter(old.new_zeros(shape), requires_grad=old.requires_grad))


def _head_slicer(index: int, name: str, kept: list[int]) -> Any:
    """A forward pre-hook selecting the kept heads (dimension 1) of one argument."""
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        idx = None
        if name in kwargs and kwargs[name] is not None:
            idx = torch.tensor(kept, device=kwargs[name].device)
            kwargs = {**kwargs, name: kwargs[name].index_select(1, idx)}
        elif len(args) > index and args[index] is not None:
            idx = torch.tensor(kept, device=args[index].device)
            args = (*args[:index], args[index].index_select(1, idx), *args[index + 1:])
        return args, kwargs
    return hook


class SkippedCompute(nn.Module):
    """The computation of a removed attention / FFN block: ``outputs`` placeholders."""

    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.outputs = outputs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return None if self.outputs == 1 else (None,) * self.outputs


class SkippedResidual(nn.Module):
    """The residual module of a removed block, called as ``(value, block_input)``:
    the block's output is its input."""

    def forward(self, value: Any, block_input: torch.Tensor, *args: Any, **kwargs: Any
                ) -> torch.Tensor:
        return block_input


def widen(kept: list[int], width: int) -> Any:
    """A forward hook putting a layer's narrow output (the hidden dimensions ``kept``)
    back at ``width``, zeros elsewhere; a tuple output's first element."""
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        value = output[0] if isinstance(output, tuple) else output
        idx = torch.tensor(kept, device=value.device)
        full = value.new_zeros((*value.shape[:-1], width)).index_copy(-1, idx, value)
        return (full, *output[1:]) if isinstance(output, tuple) else full
    return hook


def _narrow_embeddings(base: nn.Module, structure: dict[str, Any], width: int) -> None:
    """The embedding tables and LayerNorms of a pruned hidden size (``width`` kept)."""
    emb = base.get_submodule(structure["embeddings"])
    for name, mod in list(emb.named_children()):
        if isinstance(mod, nn.Embedding) and mod.embedding_dim == structure["hidden_size"]:
            setattr(emb, name, nn.Embedding(mod.num_embeddings, width,
                                            padding_idx=mod.padding_idx))
    _narrow_norm(base, structure["embedding_norm"], width)


def _narrow_norm(root: nn.Module, path: str, width: int) -> None:
    try:
        old = cast(nn.LayerNorm, root.get_submodule(path))
    except AttributeError:  # inside a removed block
        return
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name,
            nn.LayerNorm(width, eps=old.eps, elementwise_affine=old.weight is not None))


def skip_block(layer: nn.Module, spec: Any) -> None:
    """Replace a block's compute and residual modules (``spec``: ``(compute path,
    outputs, residual path)``, an adapter's ``attn_block`` / ``ffn_block``) by the stubs
    that skip it."""
    compute, outputs, residual = spec
    for path, new in ((compute, SkippedCompute(int(outputs))), (residual, SkippedResidual())):
        parent, _, name = path.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, name, new)


def resize_to_structure(model: nn.Module, structure: dict[str, Any]) -> None:
    """Give every layer its pruned number of heads and FFN neurons; removed blocks
    become stubs that hand their input on."""
    base = getattr(model, "base_model", model)
    if "layer_paths" in structure:
        layers = [base.get_submodule(p) for p in structure["layer_paths"]]
    else:
        layers = list(cast(nn.ModuleList, base.get_submodule(structure["layers"])))
    d = structure["head_size"]
    kept_heads = structure.get("kept_heads") or [None] * len(layers)
    for kind, indices in structure.get("removed_blocks", {}).items():
        for i in indices:
            skip_block(layers[i], structure["blocks"][kind])
    hidden: list[int] = structure.get("hidden_kept") or []
    width = len(hidden) or None
    if hidden:
        _narrow_embeddings(base, structure, len(hidden))
    for layer, heads, inter, kept in zip(layers, structure["heads_per_layer"],
                                         structure["intermediate_per_layer"], kept_heads):
        for path in structure["head_linears"]:
            _swap(layer, path, in_features=width, out_features=heads * d)
        if structure.get("fused_qkv"):
            _swap(layer, structure["fused_qkv"], in_features=width, out_features=3 * heads * d)
        for entry in structure.get("head_params", []):
            _resize_param(layer, entry, heads, d)
        _swap(layer, structure["attn_out"], in_features=heads * d, out_features=width)
        rows = structure.get("ffn_in_rows_per_neuron", 1)
        _swap(layer, structure["ffn_in"], in_features=width, out_features=rows * inter)
        _swap(layer, structure["ffn_out"], in_features=inter, out_features=width)
        for path in structure.get("hidden_norms", []) if hidden else []:
            _narrow_norm(layer, path, len(hidden))
        if not heads:  # a removed attention block
            continue
        attention = layer.get_submodule(structure["attention_module"])
        attrs = structure.get("head_attrs", {"num_attention_heads": "heads",
                                             "all_head_size": "width"})
        for attr, kind in attrs.items():
            if hasattr(attention, attr):
                setattr(attention, attr, heads * d if kind == "width" else heads)
        if structure.get("config_heads_attr"):  # it reads the head count from its config
            attention.config = copy.copy(attention.config)
            setattr(attention.config, structure["config_heads_attr"], heads)
        for path, name, index in structure.get("head_inputs", []):
            layer.get_submodule(path).register_forward_pre_hook(
                _head_slicer(index, name, kept), with_kwargs=True)
    if hidden:  # the pooler and the head read the full width
        layers[-1].register_forward_hook(widen(hidden, structure["hidden_size"]))


_Base: Any = getattr(transformers, BASE_CLASS)  # the model's class, known at export time


class CapscalePrunedModel(_Base):
    """The stock task model with per-layer pruned attention heads and FFN widths."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        resize_to_structure(self, config.capscale_structure)

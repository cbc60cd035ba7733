"""Loads a capscale structured-pruned encoder with transformers alone.

capscale copies this file next to an exported model (as ``capscale_pruned.py``, with
``BASE_CLASS`` set to the model's class) and points ``config.auto_map`` at it:

    AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)

Stock transformers builds every layer with ``config.num_attention_heads`` heads and
``config.intermediate_size`` neurons, and transformers 5 has no ``pruned_heads`` any
more, so per-layer head counts and FFN widths cannot be expressed by config fields the
stock classes honour. This subclass builds the stock model, then resizes each layer's
linear maps to the sizes in ``config.capscale_structure``; the forward is the stock one
(the attention reshapes infer the head count from the projection width). It imports
nothing but torch and transformers.
"""

from typing import Any

import transformers
from torch import nn

BASE_CLASS = "BertForSequenceClassification"


def _swap(root: nn.Module, path: str, in_features: int | None = None,
          out_features: int | None = None) -> None:
    """Replace the linear map at ``path`` (when it exists) by one of the new size."""
    try:
        old = root.get_submodule(path)
    except AttributeError:
        return
    new = nn.Linear(in_features or old.in_features, out_features or old.out_features,
                    bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def resize_to_structure(model: nn.Module, structure: dict[str, Any]) -> None:
    """Give every layer its pruned number of heads and FFN neurons."""
    base = getattr(model, "base_model", model)
    layers = base.get_submodule(structure["layers"])
    d = structure["head_size"]
    for layer, heads, inter in zip(layers, structure["heads_per_layer"],
                                   structure["intermediate_per_layer"]):
        for path in structure["head_linears"]:
            _swap(layer, path, out_features=heads * d)
        _swap(layer, structure["attn_out"], in_features=heads * d)
        _swap(layer, structure["ffn_in"], out_features=inter)
        _swap(layer, structure["ffn_out"], in_features=inter)
        attention = layer.get_submodule(structure["attention_module"])
        for attr, value in (("num_attention_heads", heads), ("all_head_size", heads * d)):
            if hasattr(attention, attr):
                setattr(attention, attr, value)


class CapscalePrunedModel(getattr(transformers, BASE_CLASS)):
    """The stock task model with per-layer pruned attention heads and FFN widths."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        resize_to_structure(self, config.capscale_structure)

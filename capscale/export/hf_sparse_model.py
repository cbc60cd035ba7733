"""Loads a capscale sparse checkpoint (bitmask + values) with transformers alone.

capscale copies this file next to a sparse export (as ``capscale_sparse.py``, with
``BASE_CLASS`` set to the model's class) and points ``config.auto_map`` at it:

    AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)

In ``model.safetensors`` a pruned matrix ``W`` is stored as two tensors: ``W.__bitmask``
(uint8, one bit per weight, rows padded to whole bytes, most significant bit first)
and ``W.__values`` (its non-zero entries in row-major order, original dtype); its shape
is in the file's metadata (``capscale_sparse``). Every other tensor is stored as is.
:meth:`CapscaleSparseModel.from_pretrained` rebuilds the dense state dict (the exact
weights of the dense export) and hands it, with the config, to the stock
``from_pretrained``, so the model is the stock class with the stock forward. It
imports nothing but torch, safetensors and transformers.
"""

import json
from typing import Any

import torch
import transformers
from safetensors import safe_open

BASE_CLASS = "BertForSequenceClassification"
WEIGHTS = "model.safetensors"
BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
HUB_KEYS = ("cache_dir", "force_download", "local_files_only", "token", "revision",
            "subfolder")


def unpack_bits(bits: torch.Tensor, columns: int) -> torch.Tensor:
    """(rows, ceil(columns / 8)) uint8 -> (rows, columns) bool."""
    flat = (bits.unsqueeze(-1) & BITS).ne(0)
    return flat.reshape(bits.shape[0], -1)[:, :columns]


def dense_state_dict(file: str) -> dict[str, torch.Tensor]:
    """Every tensor of a sparse ``model.safetensors``, bitmask-coded ones made dense."""
    out = {}
    with safe_open(file, framework="pt") as f:
        shapes = json.loads((f.metadata() or {}).get("capscale_sparse", "{}"))
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if key.endswith(".__values"):
                continue
            if not key.endswith(".__bitmask"):
                out[key] = f.get_tensor(key)
                continue
            name = key[: -len(".__bitmask")]
            shape = shapes[name]
            values = f.get_tensor(f"{name}.__values")
            dense = values.new_zeros(shape)
            dense[unpack_bits(f.get_tensor(key), shape[-1])] = values
            out[name] = dense
    return out


_Base: Any = getattr(transformers, BASE_CLASS)  # the model's class, known at export time


class CapscaleSparseModel(_Base):
    """The stock task model, read from a bitmask + values checkpoint."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any,
                        **kwargs: Any) -> Any:
        if kwargs.get("state_dict") is not None:  # weights given: nothing to decode
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        hub = {k: kwargs[k] for k in HUB_KEYS if k in kwargs}
        config = kwargs.pop("config", None)
        if not isinstance(config, transformers.PretrainedConfig):
            config = cls.config_class.from_pretrained(config or pretrained_model_name_or_path,
                                                      **hub)
        file = transformers.utils.cached_file(pretrained_model_name_or_path, WEIGHTS, **hub)
        assert file is not None  # cached_file raises when the weights are missing
        # transformers takes a state dict only without a path: the config carries the rest
        return super().from_pretrained(None, *args, config=config,
                                       state_dict=dense_state_dict(file), **kwargs)

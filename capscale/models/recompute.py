"""Activation checkpointing of the encoder layers (``train.gradient_checkpointing``).

:func:`checkpoint_layers` gives every distinct layer the adapter lists (ALBERT's shared
layer once, checkpointed at each application) an instance ``forward`` that runs the
layer's own forward under ``torch.utils.checkpoint`` (non-reentrant) whenever autograd
records: the forward keeps only the layer's inputs, and backward runs the layer again
to rebuild what it needs. Everything inside the layer is recomputed with it: masked
linears compute ``W * M`` from their scores again (so the scores get the gradient they
get without checkpointing), the structured masks' pre-hooks multiply again, and dropout
draws the same values (the RNG state of the forward is restored for the recomputation).

Only ``forward`` is replaced, not ``__call__``: the hooks on the layer module itself
(FSDP2's unit hooks, DeepSpeed ZeRO-3's gathering hooks, Hugging Face's output
recorders) run once, around the checkpointed region, as without checkpointing; the
hooks of the modules inside it run again in the recomputation, where FSDP2's
pre-backward unshard and ZeRO-3's per-module gathering provide the parameters. Apply it
to the bare model before the strategy wraps it. :func:`recomputing` tells a hook that
it is being called by a recomputation (the representation tap keeps the first forward's
value).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from capscale.models.adapters import EncoderAdapter

# Recomputations in progress (a counter, not thread-local: autograd may run a backward,
# and so a recomputation, on a device thread of its own), and begun in all.
_RECOMPUTING = [0]
_RECOMPUTED = [0]


def recomputing() -> bool:
    """Whether a checkpointed layer is being recomputed (in backward) right now."""
    return _RECOMPUTING[0] > 0


def recomputations() -> int:
    """Layer applications recomputed in backward by this process so far."""
    return _RECOMPUTED[0]


def _checkpointed(inner: Any, *args: Any, **kwargs: Any) -> Any:
    """``inner(*args, **kwargs)``, checkpointed when autograd records (else plain)."""
    if not torch.is_grad_enabled():
        return inner(*args, **kwargs)
    calls = [0]

    def run(*a: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:  # the forward
            return inner(*a, **kw)
        _RECOMPUTING[0] += 1
        _RECOMPUTED[0] += 1
        try:
            return inner(*a, **kw)
        finally:  # also when the recomputation stops early, once it has what it needs
            _RECOMPUTING[0] -= 1

    return checkpoint(functools.partial(run, **kwargs), *args, use_reentrant=False)


def _wrapper(layer: nn.Module) -> functools.partial | None:
    fwd = vars(layer).get("forward")
    return fwd if isinstance(fwd, functools.partial) and fwd.func is _checkpointed else None


def checkpoint_layers(model: nn.Module, adapter: EncoderAdapter) -> int:
    """Recompute each of ``model``'s encoder layers in backward (see the module
    docstring); ``model``: the bare task model. Returns how many distinct layers are
    checkpointed; idempotent."""
    layers = adapter.layer_modules(model)
    for layer in layers:
        if _wrapper(layer) is None:
            # the bound forward in use now (the class's, or an instance's own)
            layer.forward = functools.partial(_checkpointed, layer.forward)
    return len(layers)


def uncheckpoint_layers(model: nn.Module, adapter: EncoderAdapter) -> int:
    """Undo :func:`checkpoint_layers` (the layers run their previous forward); returns
    how many layers were checkpointed."""
    undone = 0
    for layer in adapter.layer_modules(model):
        wrapper = _wrapper(layer)
        if wrapper is None:
            continue
        inner = wrapper.args[0]
        if getattr(inner, "__func__", None) is getattr(type(layer), "forward", None):
            del layer.forward  # the class's forward again
        else:
            layer.forward = inner
        undone += 1
    return undone


def checkpointed_layers(model: nn.Module, adapter: EncoderAdapter) -> int:
    """How many of ``model``'s distinct encoder layers are checkpointed."""
    return sum(_wrapper(layer) is not None for layer in adapter.layer_modules(model))

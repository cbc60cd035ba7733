"""Structured pruning of attention heads and FFN neurons through activation masks.

Every encoder family exposes the same two seams (see capscale.models.adapters): the input of
the attention output projection ``attn_out`` is the concatenation of the heads'
contexts (head ``h`` owns columns ``h*d:(h+1)*d``), and the input of the FFN down
projection ``ffn_out`` holds one column per intermediate neuron. A forward pre-hook on
each multiplies that input by a mask, which removes a head's or a neuron's whole
contribution exactly, with no forked modeling code.

Importance is first-order Taylor (Michel et al., "Are Sixteen Heads Really Better than
One?", NeurIPS 2019; Molchanov et al., 2017), as CAP-f uses it (docs/algorithm.md section 6):
``I = sum_batches |dL/dmask|`` with ``L`` the full CAP loss, normalised per layer by its
L2 norm (heads and neurons separately), then ranked globally.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from capscale.models.adapters import EncoderAdapter, get_submodule, head_param
from capscale.models.specs import block_specs
from capscale.pruning.hidden import HiddenMask, hidden_pruned_parameters

AllReduceFn = Callable[[Tensor], Tensor]  # sums a tensor over ranks


def mark_mask_hook(hook: Callable) -> Callable:
    """Tag a mask hook so that :func:`strip_mask_hooks` removes it from copies."""
    hook.capscale_structured_mask = True  # type: ignore[attr-defined]
    return hook


def block_input(module: nn.Module, args: tuple[Tensor, ...]) -> Tensor:
    """The block input a residual module was called with (``residual(value, x)``): what
    a skipped block returns."""
    if len(args) < 2:
        raise TypeError(f"{type(module).__name__} was not called as residual(value, "
                        "block_input): adapter attn_block / ffn_block are wrong")
    return args[1]


def strip_mask_hooks(model: nn.Module) -> None:
    """Remove structured-mask hooks from ``model`` (e.g. from a deep copy of a masked
    model, whose copied hooks would still read the original masks)."""
    for mod in model.modules():
        for hooks in (mod._forward_pre_hooks, mod._forward_hooks):
            for key, fn in list(hooks.items()):
                if getattr(fn, "capscale_structured_mask", False):
                    del hooks[key]


class StructuredMasks(nn.Module):
    """Head and FFN-neuron masks of one encoder, applied by pre-hooks.

    The masks are Parameters (so ``dL/dmask`` is an ordinary gradient) that live
    outside the model: the model's optimiser, ``state_dict`` and data-parallel wrapper
    never see them.

    Args:
        model: the task model (unwrapped).
        adapter: its encoder adapter.
        hidden: also mask the hidden dimension (capscale.pruning.hidden).
    """

    def __init__(self, model: nn.Module, adapter: EncoderAdapter, hidden: bool = False
                 ) -> None:
        super().__init__()
        config = model.config
        if getattr(config, "talking_head", False):
            raise ValueError("structured pruning of heads is not supported with "
                             "talking_head: true (projections mix the heads, so a head "
                             "cannot be removed alone); use an unstructured method")
        self.num_heads = adapter.num_heads(config)
        self.head_size = adapter.head_size(config)
        layers = adapter.layer_modules(model)
        linears = [adapter.layer_linears(layer) for layer in layers]
        self.num_layers = len(layers)
        self.intermediate = [lin["ffn_out"].in_features for lin in linears]
        for i, lin in enumerate(linears):
            if lin["attn_out"].in_features != self.num_heads * self.head_size:
                raise ValueError(f"layer {i}: attn_out takes {lin['attn_out'].in_features} "
                                 f"inputs, expected heads x head size = {self.num_heads} x "
                                 f"{self.head_size}; is the adapter's attn_out right?")
        dev = linears[0]["attn_out"].weight.device
        self.head = nn.ParameterList([nn.Parameter(torch.ones(self.num_heads, device=dev))
                                      for _ in layers])
        self.ffn = nn.ParameterList([nn.Parameter(torch.ones(n, device=dev))
                                     for n in self.intermediate])
        self.requires_grad_(False)
        self._handles = []
        for i, lin in enumerate(linears):
            self._handles.append(lin["attn_out"].register_forward_pre_hook(self._head_hook(i)))
            self._handles.append(lin["ffn_out"].register_forward_pre_hook(self._ffn_hook(i)))
        self.hidden = HiddenMask(model, adapter, mark_mask_hook) if hidden else None
        self._empty: dict[tuple[str, int], tuple[int, bool]] = {}  # (kind, layer) cache
        if adapter.remove_empty_blocks:
            for i, layer in enumerate(layers):
                for kind, (_, _, residual) in block_specs(adapter).items():
                    self._handles.append(get_submodule(layer, residual).register_forward_hook(
                        self._skip_hook(kind, i)))

    def _head_hook(self, i: int) -> Callable:
        @mark_mask_hook
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            x = args[0]  # (B, T, heads * d), head-major
            m = self.head[i].to(x.dtype).repeat_interleave(self.head_size)
            return (x * m, *args[1:])
        return hook

    def _ffn_hook(self, i: int) -> Callable:
        @mark_mask_hook
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            return (args[0] * self.ffn[i].to(args[0].dtype), *args[1:])  # (B, T, I)
        return hook

    def empty(self, kind: str, i: int) -> bool:
        """Whether layer ``i``'s ``attention`` / ``ffn`` mask is all zero (cached until
        the mask changes in place)."""
        mask = (self.head if kind == "attention" else self.ffn)[i]
        version, value = self._empty.get((kind, i), (-1, False))
        if version != mask._version:
            value = not bool((mask != 0).any())
            self._empty[kind, i] = (mask._version, value)
        return value

    def _skip_hook(self, kind: str, i: int) -> Callable:
        """An empty block is skipped: its residual module returns the block's input."""
        @mark_mask_hook
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            return block_input(module, args) if self.empty(kind, i) else None
        return hook

    def remove(self) -> None:
        """Detach the hooks (the model then runs dense)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.hidden is not None:
            self.hidden.remove()

    def parameters_list(self) -> list[nn.Parameter]:
        return [*self.head, *self.ffn, *([self.hidden.mask] if self.hidden else [])]

    def hidden_keep(self) -> Tensor | None:
        """The hidden dimensions' keep mask (bool, CPU), or None when not masked."""
        return self.hidden.keep() if self.hidden is not None else None

    @torch.no_grad()
    def set(self, heads: list[Tensor], ffn: list[Tensor]) -> None:
        """Load binary keep masks: ``heads[l]`` (H,), ``ffn[l]`` (I_l,)."""
        for p, m in zip([*self.head, *self.ffn], [*heads, *ffn]):
            p.copy_(m.to(p))

    @torch.no_grad()
    def keep(self) -> tuple[list[Tensor], list[Tensor]]:
        """Current masks as bool tensors (CPU): (heads per layer, neurons per layer)."""
        return ([m.detach().cpu() > 0.5 for m in self.head],
                [m.detach().cpu() > 0.5 for m in self.ffn])

    def sparsity(self) -> dict[str, float]:
        """Fractions of heads and of FFN neurons pruned."""
        heads, ffn = self.keep()
        h_total = sum(m.numel() for m in heads)
        f_total = sum(m.numel() for m in ffn)
        out = {"head_sparsity": 1 - sum(int(m.sum()) for m in heads) / h_total,
               "ffn_sparsity": 1 - sum(int(m.sum()) for m in ffn) / f_total}
        hidden = self.hidden_keep()
        if hidden is not None:
            out["hidden_sparsity"] = 1 - int(hidden.sum()) / hidden.numel()
        return out


@dataclass
class Importance:
    """Per-layer importance: ``heads[l]`` (H,), ``ffn[l]`` (I_l,), float64 on CPU."""

    heads: list[Tensor]
    ffn: list[Tensor]
    hidden: Tensor | None = None  # (H,) when the hidden dimension is masked

    def normalized(self) -> Importance:
        """Each layer's vector divided by its L2 norm, per kind (Michel et al., 2019)."""
        def norm(v: Tensor) -> Tensor:
            n = v.norm(p=2)
            return v / n if n > 0 else v
        return Importance([norm(v) for v in self.heads], [norm(v) for v in self.ffn],
                          None if self.hidden is None else norm(self.hidden))


def taylor_importance(masks: StructuredMasks, loss_fn: Callable[[dict[str, Tensor]], Tensor],
                      batches: Iterable[dict[str, Tensor]],
                      all_reduce: AllReduceFn | None = None, world_size: int = 1
                      ) -> Importance:
    """``I = sum_batches |dL_b/dmask|`` over the global batches (first-order Taylor).

    Under several ranks each rank's loss follows the distributed convention (its
    gradient averaged over ranks equals the gradient of the global batch), so the
    per-batch gradient is summed over ranks and divided by ``world_size`` *before* the
    absolute value: the result equals one process running the concatenated batches,
    and every rank holds the same tensor. Every rank must yield the same number of
    batches.

    Args:
        masks: the model's structured masks (their current values are the expansion point).
        loss_fn: batch -> scalar loss (the full CAP loss in CAP-f), run by the caller's
            model in the mode it wants (reference: eval mode).
        batches: this rank's batches.
        all_reduce: sums a tensor over ranks; None in one process.
        world_size: number of ranks.
    """
    params = masks.parameters_list()
    sizes = [p.numel() for p in params]
    total = torch.zeros(sum(sizes), dtype=torch.float64)
    masks.requires_grad_(True)
    try:
        for batch in batches:
            loss = loss_fn(batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            flat = torch.cat([(g if g is not None else torch.zeros_like(p)).detach().flatten()
                              for g, p in zip(grads, params)]).to("cpu", torch.float64)
            if all_reduce is not None:
                flat = all_reduce(flat) / world_size
            total += flat.abs()
    finally:
        masks.requires_grad_(False)
    parts = list(total.split(sizes))
    n = masks.num_layers
    return Importance(parts[:n], parts[n:2 * n], parts[2 * n] if len(parts) > 2 * n else None)


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores; ties broken by lower index (deterministic)."""
    order = torch.sort(-scores.double(), stable=True).indices
    return order[:k]


def select_structure(importance: Importance, sparsity: float, min_heads_per_layer: int = 1,
                     current: tuple[list[Tensor], list[Tensor]] | None = None
                     ) -> tuple[list[Tensor], list[Tensor]]:
    """Keep masks at ``sparsity`` from a global ranking of layer-normalised importance.

    ``round((1 - sparsity) * total)`` heads and, separately, FFN neurons are kept: the
    ``min_heads_per_layer`` best heads of every layer first, then the globally best
    rest. Units already pruned in ``current`` stay pruned (pruning is monotone, as in
    the reference, which removes them physically).

    Returns:
        (heads per layer, neurons per layer) as bool keep masks.
    """
    imp = importance.normalized()
    heads = _select(imp.heads, sparsity, min_heads_per_layer,
                    current[0] if current else None, "heads")
    ffn = _select(imp.ffn, sparsity, 0, current[1] if current else None, "FFN neurons")
    return heads, ffn


def _select(scores: list[Tensor], sparsity: float, min_per_layer: int,
            current: list[Tensor] | None, what: str) -> list[Tensor]:
    sizes = [s.numel() for s in scores]
    total = sum(sizes)
    keep_n = round((1.0 - sparsity) * total)
    if min_per_layer > min(sizes):
        raise ValueError(f"min_heads_per_layer={min_per_layer} but a layer has only "
                         f"{min(sizes)} {what}")
    flat = torch.cat(scores).double().clone()
    alive = torch.cat(current) if current is not None else torch.ones(total, dtype=torch.bool)
    flat[~alive] = float("-inf")  # pruned units never come back
    keep = torch.zeros(total, dtype=torch.bool)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    for off, n in zip(offsets, sizes):
        if min_per_layer:
            keep[off + _top(flat[off:off + n], min_per_layer)] = True
    rest = flat.clone()
    rest[keep] = float("-inf")
    extra = max(0, min(keep_n - int(keep.sum()), int(alive.sum()) - int(keep.sum())))
    keep[_top(rest, extra)] = True
    return list(keep.split(sizes))


def structured_param_counts(model: nn.Module, adapter: EncoderAdapter,
                            heads: list[Tensor], ffn: list[Tensor],
                            hidden: Tensor | None = None) -> dict[str, float]:
    """Encoder weights removed by the keep masks (paper convention, docs/algorithm.md section 6).

    A removed block (``adapter.remove_empty_blocks``) removes every parameter of its compute
    and residual modules; pruned hidden dimensions (``hidden``, (H,) keep mask) their
    entries of every kept unit (capscale.pruning.hidden). A pruned head removes its rows of
    Q, K and V (separate or fused; weights and biases), of any other per-head projection and
    per-head vector, and its ``d`` columns of attn_out; a pruned neuron its row(s) of ffn_in
    (two in a GLU) with their biases and its column of ffn_out. Layers applied several times
    (ALBERT) count once, as stored. Encoder parameters are counted through module
    attributes.
    """
    d = adapter.head_size(model.config)
    pruned = 0
    for layer, h, f in zip(adapter.layer_modules(model), heads, ffn):
        lins = adapter.layer_linears(layer)
        rows_per_head = 0
        for path in adapter.head_linear_paths():
            lin = optional_linear(layer, path)
            if lin is not None:
                per = 3 * d if path == adapter.qkv else d
                rows_per_head += per * (lin.in_features + (lin.bias is not None))
        for entry in adapter.extra_head_params:
            path, dim = head_param(entry)
            param = optional_param(layer, path)
            if param is not None:
                rows_per_head += d if dim is None else param.numel() // param.shape[dim]
        ffn_in = lins["ffn_in"]
        per_neuron = (2 if adapter.ffn_gated else 1) * (ffn_in.in_features
                                                         + (ffn_in.bias is not None))
        for kind, keep, per_unit in (("attention", h, rows_per_head + d * lins[
                "attn_out"].out_features), ("ffn", f, per_neuron + lins["ffn_out"].out_features)):
            if adapter.remove_empty_blocks and not bool(keep.any()):  # the whole block
                pruned += sum(int(getattr(p, "ds_numel", p.numel()))
                              for path in block_specs(adapter)[kind][::2]
                              for p in get_submodule(layer, str(path)).parameters())
            else:
                pruned += int((~keep).sum()) * per_unit
        if hidden is not None:
            gone = tuple(adapter.remove_empty_blocks and not bool(k.any()) for k in (h, f))
            pruned += hidden_pruned_parameters(layer, adapter, int(h.sum()), int(f.sum()), d,
                                               int((~hidden).sum()), (gone[0], gone[1]))
    encoder = sum(int(getattr(p, "ds_numel", p.numel()))
                  for n, p in adapter.layer_modules(model).named_parameters()
                  if not n.endswith("mask_scores"))  # learned scores are not weights
    return {"pruned_parameters": pruned, "encoder_parameters": encoder,
            "encoder_sparsity": pruned / max(encoder, 1),
            "layer_applications": adapter.applications(model)}


def optional_param(layer: nn.Module, path: str) -> nn.Parameter | None:
    """An optional parameter of a layer (None where the family instance lacks it)."""
    parent, _, name = path.rpartition(".")
    try:
        mod = get_submodule(layer, parent) if parent else layer
    except AttributeError:
        return None
    p = getattr(mod, name, None)
    return p if isinstance(p, nn.Parameter) else None


def optional_module(layer: nn.Module, path: str) -> nn.Module | None:
    """An optional submodule of a layer (None where the family instance lacks it, or a
    removed block's stub holds none)."""
    try:
        return get_submodule(layer, path)
    except AttributeError:
        return None


def optional_linear(layer: nn.Module, path: str) -> nn.Linear | None:
    """An optional linear map of a layer (None where the family instance lacks it)."""
    mod = optional_module(layer, path)
    return mod if isinstance(mod, nn.Linear) else None

"""Deep checks of an adapter against a model's layout, before any weight loads.

:func:`capscale.models.specs.adapter_problems` checks that every path of an adapter
resolves to the right kind of module. :func:`deep_check` reads further, on the task model
built on the meta device from the config alone:

* what a structured (head and FFN-neuron) export needs: every Q/K/V map (fused or not),
  every extra per-head projection and per-head parameter has one block of ``head size``
  rows (or one slice) per head of the config's head count, and ``attn_out`` takes
  ``heads x head size`` inputs; no other projection or parameter of the attention module
  is laid out per head without the adapter slicing it (Longformer's global Q/K/V,
  Funnel's relative-attention tensors), and no linear map of it mixes heads; the
  attention module's attributes that hold the head count or the heads' total width
  (``num_attention_heads``, ``num_heads``, ``n_head``, ``all_head_size``, ...), or the
  config it reads the head count from, which the export rewrites layer by layer. A
  family whose heads are not independent units is refused for structured pruning here,
  with the reason, never after training;
* the linear maps of the encoder layers that the adapter leaves unpruned (ConvBERT's
  convolution-head maps) and the encoder sparsity an unstructured run can reach.

Nothing here runs the model: the trial export (capscale.export.trial) does, on a tiny
random copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from capscale.models.adapters import EncoderAdapter, head_param

# Attention-module attributes holding the heads' total width (besides the head count).
_WIDTH_WORDS = ("all_head",)


@dataclass
class DeepCheck:
    """What :func:`deep_check` found.

    Attributes:
        adapter: the adapter checked.
        structured_refusal: why structured pruning cannot run on this model ("" when
            it can, as far as the layout tells; the trial export then runs it).
        head_attrs: attribute of the attention module -> ``heads`` (it holds the head
            count) or ``width`` (heads x head size); a structured export rewrites them
            per layer.
        config_heads_attr: the config attribute the attention module reads the head count
            from at run time (its own ``config``); the export gives each layer a copy.
        unpruned: linear maps of the encoder layers the adapter does not prune: path in a
            layer -> ``"in -> out"`` (layer 0's shape), in the order found.
        prunable_weights: weights of the prunable matrices (all distinct layers).
        structured_parameters: encoder parameters that heads and FFN neurons own (what
            structured pruning can remove at most).
        encoder_parameters: parameters of the encoder layers (paper convention).
    """

    adapter: EncoderAdapter
    structured_refusal: str = ""
    head_attrs: dict[str, str] = field(default_factory=dict)
    config_heads_attr: str | None = None
    unpruned: dict[str, str] = field(default_factory=dict)
    prunable_weights: int = 0
    structured_parameters: int = 0
    encoder_parameters: int = 0

    @property
    def reachable(self) -> float:
        """The most encoder sparsity an unstructured run reaches (every prunable weight
        pruned): prunable weights over encoder parameters."""
        return self.prunable_weights / max(self.encoder_parameters, 1)

    def unpruned_text(self) -> str:
        return ", ".join(f"{p} [{s}]" for p, s in self.unpruned.items())

    def sparsity_note(self, final_sparsity: float, structured: bool) -> str | None:
        """One line on what the run can reach, when the adapter leaves linear maps of
        the layers unpruned (None otherwise)."""
        if not self.unpruned:
            return None
        if structured:
            share = self.structured_parameters / max(self.encoder_parameters, 1)
            return (f"NOTE: heads and FFN neurons hold {share:.1%} of the encoder's "
                    f"parameters; not pruned (every layer): {self.unpruned_text()}")
        return (f"NOTE: the prunable matrices hold {self.reachable:.1%} of the encoder's "
                f"parameters, so pruning.final_sparsity {final_sparsity:.0%} reaches "
                f"{final_sparsity * self.reachable:.1%} encoder sparsity at most; not "
                f"pruned (every layer): {self.unpruned_text()}")


def _numel(p: Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def unpruned_linears(adapter: EncoderAdapter, model: nn.Module) -> dict[str, str]:
    """Linear maps inside the encoder layers that ``adapter`` does not prune: path in a
    layer -> ``"in -> out"`` (the first layer that has it)."""
    out: dict[str, str] = {}
    for layer in adapter.layer_modules(model):
        covered = {id(m) for m in adapter.layer_linears(layer).values()}
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear) and id(mod) not in covered and name not in out:
                out[name] = f"{mod.in_features} -> {mod.out_features}"
    return out


def head_attributes(attention: nn.Module, heads: int, head_size: int) -> dict[str, str]:
    """Integer attributes of ``attention`` that hold its head count (a name with
    ``head``, not a size or dimension) or the heads' total width (``all_head_size``)."""
    found: dict[str, str] = {}
    for name, value in vars(attention).items():
        if not isinstance(value, int) or isinstance(value, bool) or name.startswith("_"):
            continue
        low = name.lower()
        if any(w in low for w in _WIDTH_WORDS) and value == heads * head_size:
            found[name] = "width"
        elif ("head" in low and not any(w in low for w in ("size", "dim", "ratio"))
              and value == heads):
            found[name] = "heads"
    return found


def attention_path(adapter: EncoderAdapter) -> str:
    """Path, from one layer, of the module that owns Q/K/V."""
    return adapter.head_linear_paths()[0].rpartition(".")[0]


def _structured_problems(adapter: EncoderAdapter, model: nn.Module, check: DeepCheck
                         ) -> list[str]:
    config = model.config
    if adapter.structured_refusal:
        return [adapter.structured_refusal]
    if getattr(config, "talking_head", False):
        return ["talking_head: true: projections mix the heads, so a head cannot be removed "
                "alone"]
    try:
        h, d = adapter.num_heads(config), adapter.head_size(config)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError) as err:
        return [f"the head count or head size cannot be read from the config ({err})"]
    for i, layer in enumerate(adapter.layer_modules(model)):
        problems = [*_shape_problems(adapter, layer, h, d), *_param_problems(adapter, layer, h, d),
                    *_stray_problems(adapter, layer, h, d)]
        if problems:  # the first layer that does not fit says enough
            return [f"layer {i}: {p}" for p in problems]
    attention = adapter.layer_modules(model)[0].get_submodule(attention_path(adapter))
    check.head_attrs = head_attributes(attention, h, d)
    own = getattr(attention, "config", None)
    if (not any(v == "heads" for v in check.head_attrs.values())
            and isinstance(getattr(own, adapter.num_heads_attr, None), int)):
        check.config_heads_attr = adapter.num_heads_attr
    return []


def _has(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def _shape_problems(adapter: EncoderAdapter, layer: nn.Module, h: int, d: int) -> list[str]:
    """Q/K/V (fused or not) and extra per-head maps: one block of ``d`` rows per head;
    attn_out: ``h x d`` inputs."""
    what = f"{h} heads x {d} ({adapter.num_heads_attr} x head size)"
    wrong: dict[tuple[int, int], list[str]] = {}
    for path in adapter.head_linear_paths():
        lin = layer.get_submodule(path) if _has(layer, path) else None
        per = 3 if path == adapter.qkv else 1
        if isinstance(lin, nn.Linear) and lin.out_features != per * h * d:
            wrong.setdefault((lin.out_features, per), []).append(path)
    out = [f"{', '.join(paths)} {'has' if len(paths) == 1 else 'have'} {rows} outputs, not "
           f"{'3 x ' if per == 3 else ''}{what}: the rows are not one block per head"
           for (rows, per), paths in wrong.items()]
    attn_out = adapter.layer_linears(layer)["attn_out"]
    if attn_out.in_features != h * d:
        out.append(f"attn_out {adapter.attn_out} takes {attn_out.in_features} inputs, not "
                   f"{what}")
    return out


def _param_problems(adapter: EncoderAdapter, layer: nn.Module, h: int, d: int) -> list[str]:
    out = []
    for entry in adapter.extra_head_params:
        path, dim = head_param(entry)
        parent, _, name = path.rpartition(".")
        owner = layer.get_submodule(parent) if _has(layer, parent) else None
        param = getattr(owner, name, None) if owner is not None else None
        if not isinstance(param, nn.Parameter):
            continue
        shape = tuple(param.shape)
        if dim is None and (param.dim() != 1 or shape[0] != h * d):
            out.append(f"extra_head_params {entry} has shape {shape}, not a vector of "
                       f"{h * d} (heads x head size); give path:N for a tensor whose "
                       "dimension N holds the heads")
        elif dim is not None and (dim >= param.dim() or shape[dim] != h):
            out.append(f"extra_head_params {entry} has shape {shape}: dimension {dim} is "
                       f"not the {h} heads")
    return out


def _stray_problems(adapter: EncoderAdapter, layer: nn.Module, h: int, d: int) -> list[str]:
    """Per-head projections and parameters of the attention module that the adapter
    would leave unsliced, and linear maps that mix heads."""
    path = attention_path(adapter)
    attention = layer.get_submodule(path) if path else layer
    prefix = f"{path}." if path else ""
    lins = adapter.layer_linears(layer)
    covered = {id(m) for m in lins.values()}
    covered |= {id(layer.get_submodule(p)) for p in adapter.extra_head_linears if _has(layer, p)}
    listed = {head_param(e)[0] for e in adapter.extra_head_params}
    hidden = lins["attn_out"].out_features
    mixing, linears, params = [], [], []
    for name, mod in attention.named_modules():
        where = f"{prefix}{name}"
        if isinstance(mod, nn.Linear):
            shape = f"{where} [{mod.in_features} -> {mod.out_features}]"
            if id(mod) in covered:
                continue
            if h > 1 and h != h * d and h in (mod.in_features, mod.out_features):
                mixing.append(shape)
            elif mod.out_features == h * d or (mod.in_features == h * d != hidden):
                linears.append(shape)
            continue
        if "norm" in type(mod).__name__.lower():
            continue
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{where}.{pname}" if name else f"{prefix}{pname}"
            if full not in listed and ((p.dim() >= 2 and h in p.shape[:2]) or (
                    p.dim() == 1 and p.numel() == h * d and mod is attention)):
                params.append(f"{full} {tuple(p.shape)}")
    out = []
    if mixing:
        out.append(f"{', '.join(mixing)} mix the {h} heads, so a head cannot be removed alone")
    if linears:
        out.append(f"{', '.join(linears)} are laid out per head like Q/K/V but the adapter "
                   "does not slice them: add them to extra_head_linears")
    if params:
        out.append(f"{', '.join(params)} are laid out per head but the adapter does not "
                   "slice them: add them to extra_head_params (path:N, N the heads' dimension)")
    return out


def deep_check(adapter: EncoderAdapter, model: nn.Module, structured: bool = True
               ) -> DeepCheck:
    """Check ``adapter`` deeply against ``model`` (the task model, on the meta device
    or not; its paths already fit, see :func:`capscale.models.specs.adapter_problems`).

    ``structured``: also read what a structured export needs (the refusal reason and the
    attributes it rewrites); the counts and unpruned maps are read either way.
    """
    check = DeepCheck(adapter)
    layers = adapter.layer_modules(model)
    check.unpruned = unpruned_linears(adapter, model)
    check.prunable_weights = sum(_numel(lin.weight) for lin in
                                 adapter.prunable_linears(model).values())
    check.encoder_parameters = sum(_numel(p) for p in layers.parameters())
    check.structured_parameters = _structured_share(adapter, model)
    if structured:
        check.structured_refusal = "; ".join(_structured_problems(adapter, model, check))
    return check


def _structured_share(adapter: EncoderAdapter, model: nn.Module) -> int:
    """Parameters owned by heads and FFN neurons (all of them) in the distinct layers."""
    total = 0
    for layer in adapter.layer_modules(model):
        lins = adapter.layer_linears(layer)
        paths = [*adapter.head_linear_paths(), adapter.ffn_in]
        for path in paths:
            if _has(layer, path) and isinstance(mod := layer.get_submodule(path), nn.Linear):
                total += sum(_numel(p) for p in mod.parameters())
        for entry in adapter.extra_head_params:
            path, _ = head_param(entry)
            parent, _, name = path.rpartition(".")
            owner = layer.get_submodule(parent) if _has(layer, parent) else None
            p = getattr(owner, name, None) if owner is not None else None
            total += _numel(p) if isinstance(p, nn.Parameter) else 0
        total += _numel(lins["attn_out"].weight) + _numel(lins["ffn_out"].weight)
    return total


def describe(check: DeepCheck, structured: bool) -> list[tuple[str, str]]:
    """``(label, value)`` rows for ``capscale inspect``."""
    rows = [("unpruned linear maps", check.unpruned_text() or "none"),
            ("reachable encoder sparsity", f"{check.reachable:.1%} (unstructured: every "
             "prunable weight pruned)")]
    if structured:
        rewrites: list[Any] = [*check.head_attrs]
        if check.config_heads_attr:
            rewrites.append(f"config.{check.config_heads_attr} (a copy per layer)")
        rows.append(("structured pruning", f"refused: {check.structured_refusal}"
                     if check.structured_refusal else "fits the layout"))
        if not check.structured_refusal:
            rows.append(("head count rewritten on export", ", ".join(rewrites) or "none"))
    return rows

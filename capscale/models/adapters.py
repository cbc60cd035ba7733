"""Encoder adapters: where an encoder keeps its layers, linear maps, heads and FFN.

capscale never forks modeling code. Everything architecture-specific that pruning
needs is a handful of module paths, collected here in one small registry keyed by the
Hugging Face ``config.model_type``. A custom encoder plugs in with one call::

    from capscale.models.adapters import EncoderAdapter, register_adapter
    register_adapter(EncoderAdapter(
        model_types=("my-encoder",), layers="blocks",
        query="attn.q", key="attn.k", value="attn.v", attn_out="attn.o",
        ffn_in="mlp.fc1", ffn_out="mlp.fc2", head_linear="head.proj"))

Three layouts beyond six separate linear maps per layer are described by fields:

* fused attention input (``qkv``): one linear map computes Q, K and V. ``qkv_layout``
  says how its output rows are laid out: ``stacked`` is ``[Q; K; V]`` with each block
  head-major (ModernBERT's ``Wqkv``); ``per_head`` is, head by head, ``[q_h; k_h; v_h]``
  (DeBERTa v1's ``in_proj``, read through a ``(heads, 3 * d)`` view). Unstructured
  pruning ranks Q, K and V separately inside it (three logical matrices); structured
  pruning keeps a head's rows in all three.
* gated FFN (``ffn_gated``): the FFN input projection produces ``[input; gate]`` halves
  of ``I`` rows each and the block computes ``act(input) * gate`` (GLU). The halves are
  two logical matrices; neuron ``j`` owns rows ``j`` and ``I + j`` and is pruned as a pair.
* shared layers (ALBERT): ``layers`` names the distinct layer modules (``*`` matches
  every child, so ``encoder.albert_layer_groups.*.albert_layers`` lists each group's
  layers); the model applies them ``config.num_hidden_layers`` times in all. Their
  matrices are pruned once, and reports say how often each is applied.
Prunable matrices are the ``nn.Linear`` modules at those paths (checked by type).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

# The six logical roles of a layer's prunable matrices (a fused or gated linear map
# holds several of them as row blocks), and the physical linear maps that hold them.
ROLES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
LOGICAL_ROLES = (*ROLES, "ffn_gate")
QKV_LAYOUTS = ("stacked", "per_head")


@dataclass(frozen=True)
class EncoderAdapter:
    """Module paths of one encoder family.

    Attributes:
        model_types: ``config.model_type`` values this adapter serves.
        layers: path, from the task model's ``base_model``, of the ModuleList of layers;
            ``*`` segments match every child in order (layers listed once each even when
            the model applies them several times).
        query, key, value, attn_out, ffn_in, ffn_out: paths, from one layer, of its linear
            maps (attention Q/K/V and output projection, FFN up and down). ``query``,
            ``key`` and ``value`` are unused when ``qkv`` is set.
        qkv: path of a fused Q/K/V linear map, or None.
        qkv_layout: row layout of ``qkv``: ``stacked`` or ``per_head`` (module docstring).
        ffn_gated: ``ffn_in`` outputs ``[input; gate]`` halves (GLU); see module docstring.
        head_linear: path, from the task model root, of the classification head's final
            linear layer; its input is the ``head`` representation (BERT: the pooler
            output after dropout, RoBERTa: the head's tanh features after dropout).
        num_heads_attr: config attribute holding the number of attention heads.
        head_size_attr: config attribute holding the width of one head, when it is not
            ``hidden_size / heads`` (Funnel's ``d_head``); None: ``attention_head_size``
            where the config sets it, else ``hidden_size / heads``.
        extra_head_linears: paths, from one layer, of further linear maps whose output is
            laid out per head like Q/K/V (DeBERTa-v2's unshared relative-position
            projections); structured export slices them too where they exist.
        extra_head_params: paths, from one layer, of parameters laid out per head;
            structured export slices them too. ``path``: a vector of ``heads x head
            size`` entries, head-major (DeBERTa v1's ``q_bias`` / ``v_bias``);
            ``path:N``: a tensor whose dimension ``N`` has one slice per head (Funnel's
            ``r_kernel:1``, a per-head convolution's ``conv.weight:0``; a convolution
            with one channel group per head gets its channel counts rewritten).
        head_inputs: ``(module path from one layer, argument name, position)`` of forward
            arguments that carry one slice per head in dimension 1 (MPNet's relative
            position bias, computed once for all layers); a physically pruned layer
            selects its kept heads' slices.
        structured_refusal: why this family's heads cannot be removed one by one (its
            modeling code needs every head, or mixes them); structured pruning is then
            refused at setup with this reason. Empty: the deep check and a trial export
            on a tiny random copy decide (capscale.models.deep_check).
        attn_block, ffn_block: ``(compute, outputs, residual)``: paths from one layer of
            the module computing a block's value (returning ``outputs`` values: 1, a
            tensor; more, a tuple, value first) and of the module called as
            ``residual(value, block_input)`` returning the block's output. None: the
            block cannot be skipped without forking the family's code.
        embedding_norm, hidden_norms: the LayerNorm whose output leaves the embeddings
            (path from ``base_model``) and those closing each block (paths from one
            layer), when every residual-stream value is one of their outputs (post-LN
            encoders): the hidden dimension is then prunable (``structured.
            hidden_sparsity``). None: not declared for the family (refused).
        remove_empty_blocks: set by the run (``structured.remove_empty_blocks``): a block
            with every head (neuron) pruned is skipped, its residual module returning
            ``block_input`` (capscale.pruning.structured), in training and export.
    """

    model_types: tuple[str, ...]
    layers: str = "encoder.layer"
    query: str = "attention.self.query"
    key: str = "attention.self.key"
    value: str = "attention.self.value"
    attn_out: str = "attention.output.dense"
    ffn_in: str = "intermediate.dense"
    ffn_out: str = "output.dense"
    head_linear: str = "classifier"
    num_heads_attr: str = "num_attention_heads"
    head_size_attr: str | None = None
    extra_head_linears: tuple[str, ...] = ()
    qkv: str | None = None
    qkv_layout: str = "stacked"
    ffn_gated: bool = False
    extra_head_params: tuple[str, ...] = ()
    head_inputs: tuple[tuple[str, str, int], ...] = ()
    structured_refusal: str = ""
    attn_block: tuple[str, int, str] | None = ("attention.self", 2, "attention.output")
    ffn_block: tuple[str, int, str] | None = ("intermediate", 1, "output")
    embedding_norm: str | None = None
    hidden_norms: tuple[str, ...] | None = None
    remove_empty_blocks: bool = False

    def __post_init__(self) -> None:
        if self.qkv_layout not in QKV_LAYOUTS:
            raise ValueError(f"adapter {self.name}: qkv_layout {self.qkv_layout!r} is not "
                             f"one of {', '.join(QKV_LAYOUTS)}")
        for entry in self.extra_head_params:
            try:
                head_param(entry)
            except ValueError as err:
                raise ValueError(f"adapter {self.name}: {err}") from None

    @property
    def name(self) -> str:
        return self.model_types[0] if self.model_types else "<adapter>"

    @property
    def physical_roles(self) -> tuple[str, ...]:
        """Roles of the linear maps of one layer: ``qkv`` replaces Q/K/V when fused."""
        if self.qkv:
            return ("qkv", "attn_out", "ffn_in", "ffn_out")
        return ROLES

    def role_path(self, role: str) -> str:
        path = getattr(self, role)
        if not path:
            raise ValueError(f"adapter {self.name}: no path for {role}")
        return path

    def head_linear_paths(self) -> list[str]:
        """Paths, from one layer, of the linear maps whose output rows are per head."""
        qkv = [self.qkv] if self.qkv else [self.query, self.key, self.value]
        return [*qkv, *self.extra_head_linears]

    def layer_modules(self, model: nn.Module) -> nn.ModuleList:
        """The encoder's distinct layers (``model``: the task model, bare)."""
        base = getattr(model, "base_model", model)
        found = _expand(base, self.layers, f"adapter {self.name}: layers")
        if len(found) == 1 and isinstance(found[0], nn.ModuleList):
            return found[0]
        layers: list[nn.Module] = []
        for mod in found:
            layers.extend(mod if isinstance(mod, nn.ModuleList) else [mod])
        if not layers:
            raise TypeError(f"adapter {self.name}: {self.layers} matches no layer")
        return nn.ModuleList(layers)

    def layer_paths(self, model: nn.Module) -> list[str]:
        """Path of each distinct layer from ``base_model`` (same order as layer_modules)."""
        base = getattr(model, "base_model", model)
        names = {id(m): n for n, m in base.named_modules()}
        return [names[id(m)] for m in self.layer_modules(model)]

    def applications(self, model_or_config: Any) -> int:
        """How many times the model applies each distinct layer (ALBERT: depth / groups).

        1 unless the config's ``num_hidden_layers`` exceeds the distinct layers (needs a
        model, not a config, to count them; a config alone answers 1).
        """
        config = getattr(model_or_config, "config", None)
        if config is None:
            return 1
        depth = getattr(config, "num_hidden_layers", None)
        distinct = len(self.layer_modules(model_or_config))
        if not depth or depth <= distinct or depth % distinct:
            return 1
        return depth // distinct

    def layer_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The linear maps of one layer, by physical role (``physical_roles``)."""
        out = {}
        for role in self.physical_roles:
            path = self.role_path(role)
            mod = get_submodule(layer, path, what=f"adapter {self.name}: {role}")
            if not isinstance(mod, nn.Linear):
                raise TypeError(f"adapter {self.name}: {role} at {path} is "
                                f"{type(mod).__name__}, not nn.Linear")
            out[role] = mod
        return out

    def prunable_linears(self, model: nn.Module) -> dict[str, nn.Linear]:
        """Every prunable linear map, keyed ``"<layer index>.<physical role>"``."""
        return {f"{i}.{role}": lin for i, layer in enumerate(self.layer_modules(model))
                for role, lin in self.layer_linears(layer).items()}

    def qualified_names(self, model: nn.Module) -> dict[str, str]:
        """``"<layer>.<role>"`` -> qualified module name in ``model`` (for swapping)."""
        by_id = {id(m): n for n, m in model.named_modules()}
        return {k: by_id[id(m)] for k, m in self.prunable_linears(model).items()}

    def row_groups(self, role: str, out_features: int, num_heads: int
                   ) -> dict[str, Tensor] | None:
        """Logical matrices inside the physical linear map of ``role``: logical role ->
        its output-row indices; None when the map is one logical matrix. ``num_heads``
        is read for ``qkv`` only (callers may pass 0 for an adapter without one)."""
        if role == "qkv":
            d = out_features // (3 * num_heads)
            rows = torch.arange(out_features)
            if self.qkv_layout == "stacked":
                blocks = rows.view(3, num_heads * d)
            else:  # per head: [q_h; k_h; v_h]
                blocks = rows.view(num_heads, 3, d).transpose(0, 1).reshape(3, num_heads * d)
            return dict(zip(("query", "key", "value"), blocks))
        if role == "ffn_in" and self.ffn_gated:
            half = out_features // 2
            return {"ffn_in": torch.arange(half), "ffn_gate": torch.arange(half, 2 * half)}
        return None

    def head_rows(self, role: str, heads: Tensor, head_size: int, num_heads: int) -> Tensor:
        """Output rows of the head linear ``role`` that belong to the heads ``heads``."""
        d = head_size
        per = (heads[:, None] * d + torch.arange(d)[None, :]).flatten()
        if role != "qkv":
            return per
        if self.qkv_layout == "stacked":
            return torch.cat([b * num_heads * d + per for b in range(3)])
        return (heads[:, None] * 3 * d + torch.arange(3 * d)[None, :]).flatten()

    def neuron_rows(self, neurons: Tensor, intermediate: int) -> Tensor:
        """Rows of ``ffn_in`` that belong to the FFN neurons ``neurons``."""
        return torch.cat([neurons, intermediate + neurons]) if self.ffn_gated else neurons

    def intermediate_size(self, layer: nn.Module) -> int:
        """FFN width of one layer (the input width of ``ffn_out``)."""
        return self.layer_linears(layer)["ffn_out"].in_features

    def head(self, model: nn.Module) -> nn.Linear:
        mod = get_submodule(model, self.head_linear,
                            what=f"adapter {self.name}: head_linear")
        if not is_head_module(mod):
            raise TypeError(f"head_linear {self.head_linear} is {type(mod).__name__}")
        return cast(nn.Linear, mod)

    def num_heads(self, config: object) -> int:
        return int(getattr(config, self.num_heads_attr))

    def head_size(self, config: object) -> int:
        """Width d of one head: head h owns columns ``h*d:(h+1)*d`` of attn_out's input.

        ``head_size_attr`` when the adapter names one; DeBERTa-v2 may set
        ``attention_head_size`` explicitly; otherwise hidden / heads.
        """
        if self.head_size_attr:
            return int(getattr(config, self.head_size_attr))
        explicit = getattr(config, "attention_head_size", None)
        if explicit:
            return int(explicit)
        return int(config.hidden_size) // self.num_heads(config)  # type: ignore[attr-defined]


def is_head_module(mod: nn.Module) -> bool:
    """Whether ``mod`` can be a task's head: a linear layer, or a parameter-free module
    that declares its input width as ``in_features`` (the embedding task's
    normalisation)."""
    return isinstance(mod, nn.Linear) or (
        isinstance(getattr(mod, "in_features", None), int)
        and next(mod.parameters(), None) is None)


def head_param(entry: str) -> tuple[str, int | None]:
    """An ``extra_head_params`` entry as ``(path, head dimension)``; the dimension is
    None for a head-major vector (``path``), ``N`` for ``path:N``."""
    path, sep, dim = entry.partition(":")
    if not sep:
        return path, None
    if not dim.isdigit():
        raise ValueError(f"extra_head_params entry {entry!r}: expected path or path:N "
                         "(N: the dimension with one slice per head)")
    return path, int(dim)


def _expand(root: nn.Module, path: str, what: str) -> list[nn.Module]:
    """Modules at ``path`` from ``root``, a ``*`` segment matching every child in order."""
    found = [root]
    done: list[str] = []
    for part in path.split(".") if path else []:
        nxt: list[nn.Module] = []
        for mod in found:
            if part == "*":
                nxt.extend(mod.children())
            else:
                child = getattr(mod, "_modules", {}).get(part)
                if child is None:
                    raise AttributeError(
                        f"{what}: no submodule {'.'.join([*done, part])!r} in "
                        f"{type(root).__name__}; register an EncoderAdapter with the right "
                        "paths")
                nxt.append(child)
        found = nxt
        done.append(part)
    return found


def get_submodule(root: nn.Module, path: str, what: str = "module") -> nn.Module:
    """``root.get_submodule(path)`` with an error that says which adapter path is wrong."""
    try:
        return root.get_submodule(path)
    except AttributeError as err:
        raise AttributeError(f"{what}: no submodule {path!r} in {type(root).__name__}; "
                             "register an EncoderAdapter with the right paths") from err


_REGISTRY: dict[str, EncoderAdapter] = {}


def register_adapter(adapter: EncoderAdapter, overwrite: bool = False) -> EncoderAdapter:
    """Make ``adapter`` serve its ``model_types``."""
    for mt in adapter.model_types:
        if mt in _REGISTRY and not overwrite and _REGISTRY[mt] != adapter:
            raise ValueError(f"an adapter for model_type {mt!r} is already registered; "
                             "pass overwrite=True to replace it")
        _REGISTRY[mt] = adapter
    return adapter


def get_adapter(model_type: str) -> EncoderAdapter:
    """The adapter for a ``config.model_type`` (or an explicit adapter name)."""
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise KeyError(f"no encoder adapter for model_type {model_type!r}; supported: "
                       f"{', '.join(registered_model_types())}. Register one with "
                       "capscale.models.adapters.register_adapter(EncoderAdapter(...))") from None


def registered_model_types() -> list[str]:
    return sorted(_REGISTRY)

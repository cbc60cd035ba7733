"""Encoder adapters: where an encoder keeps its layers, linear maps, heads and FFN.

capscale never forks modeling code. Everything architecture-specific that pruning
needs is a handful of module paths, collected here in one small registry keyed by the
Hugging Face ``config.model_type``. A custom encoder plugs in with one call::

    from capscale.adapters import EncoderAdapter, register_adapter
    register_adapter(EncoderAdapter(
        model_types=("my-encoder",), layers="blocks",
        query="attn.q", key="attn.k", value="attn.v", attn_out="attn.o",
        ffn_in="mlp.fc1", ffn_out="mlp.fc2", head_linear="head.proj"))

Prunable matrices are the ``nn.Linear`` modules at those paths (checked by type), never
parameters picked by substring of their names.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

ROLES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


@dataclass(frozen=True)
class EncoderAdapter:
    """Module paths of one encoder family.

    Attributes:
        model_types: ``config.model_type`` values this adapter serves.
        layers: path, from the task model's ``base_model``, of the ModuleList of layers.
        query, key, value, attn_out, ffn_in, ffn_out: paths, from one layer, of its six
            linear maps (attention Q/K/V and output projection, FFN up and down).
        head_linear: path, from the task model root, of the classification head's final
            linear layer; its input is the ``head`` representation (BERT: the pooler
            output after dropout, RoBERTa: the head's tanh features after dropout).
        num_heads_attr: config attribute holding the number of attention heads.
        extra_head_linears: paths, from one layer, of further linear maps whose output is
            laid out per head like Q/K/V (DeBERTa-v2's unshared relative-position
            projections); structured export slices them too where they exist.
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
    extra_head_linears: tuple[str, ...] = ()

    def layer_modules(self, model: nn.Module) -> nn.ModuleList:
        """The encoder's layers. ``model`` is the task model (e.g. ...ForSequenceClassification)."""
        base = getattr(model, "base_model", model)
        layers = get_submodule(base, self.layers, what=f"adapter {self.model_types[0]}: layers")
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f"adapter {self.model_types[0]}: {self.layers} is "
                            f"{type(layers).__name__}, expected nn.ModuleList")
        return layers

    def layer_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The six linear maps of one layer, by role."""
        out = {}
        for role in ROLES:
            mod = get_submodule(layer, getattr(self, role),
                                what=f"adapter {self.model_types[0]}: {role}")
            if not isinstance(mod, nn.Linear):
                raise TypeError(f"adapter {self.model_types[0]}: {role} at "
                                f"{getattr(self, role)} is {type(mod).__name__}, not nn.Linear")
            out[role] = mod
        return out

    def prunable_linears(self, model: nn.Module) -> dict[str, nn.Linear]:
        """Every prunable linear map, keyed ``"<layer index>.<role>"``."""
        return {f"{i}.{role}": lin for i, layer in enumerate(self.layer_modules(model))
                for role, lin in self.layer_linears(layer).items()}

    def qualified_names(self, model: nn.Module) -> dict[str, str]:
        """``"<layer>.<role>"`` -> qualified module name in ``model`` (for swapping)."""
        by_id = {id(m): n for n, m in model.named_modules()}
        return {k: by_id[id(m)] for k, m in self.prunable_linears(model).items()}

    def head(self, model: nn.Module) -> nn.Linear:
        mod = get_submodule(model, self.head_linear,
                            what=f"adapter {self.model_types[0]}: head_linear")
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"head_linear {self.head_linear} is {type(mod).__name__}")
        return mod

    def num_heads(self, config: object) -> int:
        return int(getattr(config, self.num_heads_attr))

    def head_size(self, config: object) -> int:
        """Width d of one head: head h owns columns ``h*d:(h+1)*d`` of attn_out's input.

        DeBERTa-v2 may set ``attention_head_size`` explicitly; otherwise hidden / heads.
        """
        explicit = getattr(config, "attention_head_size", None)
        if explicit:
            return int(explicit)
        return int(config.hidden_size) // self.num_heads(config)  # type: ignore[attr-defined]


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
                       "capscale.adapters.register_adapter(EncoderAdapter(...))") from None


def registered_model_types() -> list[str]:
    return sorted(_REGISTRY)


# BERT-like layouts (BERT, RoBERTa, XLM-R, ELECTRA, CamemBERT, ...).
register_adapter(EncoderAdapter(model_types=("bert",)))
register_adapter(EncoderAdapter(model_types=("roberta", "xlm-roberta", "camembert",
                                             "electra"),
                                head_linear="classifier.out_proj"))
register_adapter(EncoderAdapter(model_types=("deberta-v2",),
                                query="attention.self.query_proj",
                                key="attention.self.key_proj",
                                value="attention.self.value_proj",
                                extra_head_linears=("attention.self.pos_key_proj",
                                                    "attention.self.pos_query_proj")))

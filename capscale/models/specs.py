"""Encoder adapters from the config: a name, an import path, a YAML mapping or a plug-in.

``model.adapter`` says where an encoder keeps its prunable matrices, with no code:

* unset: the adapter registered for the model's ``config.model_type``
  (capscale.models.adapters), else one that an installed package declares under the Python
  entry point group ``capscale.models.adapters`` (loaded once, on the first lookup);
* a string: a registered name (or an entry point's name), or an import path
  ``package.module:ATTRIBUTE`` whose attribute is an EncoderAdapter or a mapping;
* a mapping of EncoderAdapter fields, written in the YAML (lists become tuples;
  ``model_types`` defaults to the model's own ``config.model_type``)::

      model:
        trust_remote_code: true
        adapter:
          layers: stack
          qkv: mixer.to_qkv
          attn_out: mixer.to_out
          ffn_in: ff.w_in
          ffn_out: ff.w_out
          head_linear: score
          num_heads_attr: attn_heads

:func:`check_adapter` then checks every path against the task model built on the meta
device from the config alone (no weights, no memory), so a wrong path fails in seconds
with the linear maps the model does have.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
from collections.abc import Mapping
from importlib import metadata
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PretrainedConfig

from capscale.errors import ConfigError, ModelError, did_you_mean
from capscale.models.adapters import (
    EncoderAdapter,
    get_adapter,
    is_head_module,
    registered_model_types,
)

if TYPE_CHECKING:
    from capscale.tasks import Task

ENTRY_POINT_GROUP = "capscale.models.adapters"
AdapterSpec = str | Mapping[str, Any] | EncoderAdapter | None
_TUPLE_FIELDS = ("model_types", "extra_head_linears", "extra_head_params")
_PLUGINS: dict[str, EncoderAdapter] | None = None
_PLUGIN_ERRORS: list[str] = []
logger = logging.getLogger("capscale")


def adapter_fields() -> list[str]:
    """The keys a ``model.adapter`` mapping may hold (EncoderAdapter's fields)."""
    return [f.name for f in dataclasses.fields(EncoderAdapter)]


def adapter_from_mapping(spec: Mapping[str, Any], model_type: str | None = None,
                         where: str = "model.adapter") -> EncoderAdapter:
    """An EncoderAdapter from a mapping of its fields; ConfigError naming a bad key.

    Args:
        spec: field -> value; lists become tuples, ``head_inputs`` entries
            ``[module path, argument name, position]``.
        model_type: ``model_types`` when the mapping has none.
        where: the config key (or source) named in error messages.
    """
    fields = {f.name: f for f in dataclasses.fields(EncoderAdapter)}
    kwargs: dict[str, Any] = {}
    for key, value in spec.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}{did_you_mean(key, fields)} "
                              f"(valid keys: {', '.join(fields)})")
        kwargs[key] = _field_value(key, value, f"{where}.{key}")
    if "model_types" not in kwargs:
        kwargs["model_types"] = (model_type,) if model_type else ()
    try:
        return EncoderAdapter(**kwargs)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def _field_value(key: str, value: Any, where: str) -> Any:
    """``value`` checked and converted for the EncoderAdapter field ``key``."""
    if key in _TUPLE_FIELDS:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{where} = {value!r}: expected a list of strings")
        return tuple(items)
    if key == "head_inputs":
        ok = isinstance(value, list | tuple) and all(
            isinstance(v, list | tuple) and len(v) == 3 and isinstance(v[0], str)
            and isinstance(v[1], str) and isinstance(v[2], int) for v in value)
        if not ok:
            raise ConfigError(f"{where} = {value!r}: expected a list of "
                              "[module path, argument name, position]")
        return tuple(tuple(v) for v in value)
    if key == "ffn_gated":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}: expected true or false")
        return value
    if value is None and key in ("qkv", "head_size_attr"):
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{where} = {value!r}: expected a string (a module path)")
    return value


def _as_adapter(obj: Any, model_type: str | None, where: str) -> EncoderAdapter:
    if isinstance(obj, EncoderAdapter):
        return obj
    if isinstance(obj, Mapping):
        return adapter_from_mapping(obj, model_type, where)
    raise ConfigError(f"{where} is a {type(obj).__name__}, not an EncoderAdapter or a "
                      "mapping of its fields")


def import_adapter(path: str, model_type: str | None = None) -> EncoderAdapter:
    """The adapter at ``package.module:ATTRIBUTE`` (an EncoderAdapter or a mapping)."""
    module_name, _, attr = path.partition(":")
    where = f"model.adapter {path!r}"
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{where}: cannot import {module_name!r} ({err}); is the package "
                          "installed or on PYTHONPATH?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return _as_adapter(obj, model_type, where)


def plugin_adapters() -> dict[str, EncoderAdapter]:
    """Adapters installed by packages (entry point group ``capscale.models.adapters``), by
    model_type and by entry point name; loaded once. An entry point loads to an
    EncoderAdapter, a list or tuple of them, or a mapping (whose ``model_types``
    default to the entry point's name). One that fails is skipped and reported in
    :func:`plugin_errors`."""
    global _PLUGINS
    if _PLUGINS is not None:
        return _PLUGINS
    found: dict[str, EncoderAdapter] = {}
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        where = f"entry point {ep.name} = {ep.value} ({ENTRY_POINT_GROUP})"
        try:
            obj = ep.load()
            items = obj if isinstance(obj, list | tuple) else [obj]
            adapters = [_as_adapter(o, ep.name, where) for o in items]
        except Exception as err:  # a broken plug-in must not stop every other run
            _PLUGIN_ERRORS.append(f"{where}: {type(err).__name__}: {err}")
            continue
        for adapter in adapters:
            for key in (*adapter.model_types, ep.name):
                found.setdefault(key, adapter)
    _PLUGINS = found
    return found


def plugin_errors() -> list[str]:
    """Why plug-in entry points were skipped (after :func:`plugin_adapters` ran)."""
    plugin_adapters()
    return list(_PLUGIN_ERRORS)


def resolve_adapter(spec: AdapterSpec, model_type: str) -> EncoderAdapter:
    """The adapter ``model.adapter`` = ``spec`` names for a model of ``model_type``.

    Raises:
        ConfigError: a malformed mapping or an import path that does not resolve.
        ModelError: no adapter has that name or serves that model_type.
    """
    if isinstance(spec, EncoderAdapter):
        return spec
    if isinstance(spec, Mapping):
        return adapter_from_mapping(spec, model_type)
    if isinstance(spec, str) and ":" in spec:
        return import_adapter(spec, model_type)
    key = spec or model_type
    try:
        return get_adapter(key)
    except KeyError as err:
        message = err.args[0]
    if key in plugin_adapters():
        return plugin_adapters()[key]
    plugins = sorted(set(plugin_adapters()) - set(registered_model_types()))
    extra = f"; installed plug-ins: {', '.join(plugins)}" if plugins else ""
    broken = plugin_errors()
    extra += f"; plug-ins that failed to load: {' | '.join(broken)}" if broken else ""
    what = f"no encoder adapter named {key!r}" if spec else None
    if what:
        message = message.replace(f"no encoder adapter for model_type {key!r}", what, 1)
    raise ModelError(f"{message}{extra}; or give its module paths as a model.adapter "
                     "mapping in the YAML (`capscale inspect MODEL` suggests one)")


def skeleton(config: PretrainedConfig, trust_remote_code: bool = False,
             task: Task | None = None) -> nn.Module:
    """The task model of ``config`` on the meta device: every module, no weights.

    ``task.model_class`` (an Auto class) when the task has one, else
    AutoModelForSequenceClassification. Raises ModelError when that Auto class has no
    model for the config.
    """
    auto = (task.model_class if task is not None else None) or AutoModelForSequenceClassification
    try:
        with torch.device("meta"):
            return auto.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelError(f"{auto.__name__} cannot build a model of model_type "
                         f"{config.model_type!r} ({first})") from None


def for_task(adapter: EncoderAdapter, task: Task | None, model: nn.Module) -> EncoderAdapter:
    """``adapter`` with ``task.head_linear`` as its head path when the task names one
    and ``model`` has a linear layer there (QA: ``qa_outputs``), else unchanged."""
    path = task.head_linear if task is not None else None
    if not path or path == adapter.head_linear:
        return adapter
    try:
        head = model.get_submodule(path)
    except AttributeError:
        return adapter
    return dataclasses.replace(adapter, head_linear=path) if is_head_module(
        head) else adapter


def _linear_list(root: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in root.named_modules() if isinstance(m, nn.Linear) and n}


def _closest(path: str, names: list[str]) -> list[str]:
    """``names`` ordered by likeness to ``path`` (difflib), the closest first."""
    def likeness(n: str) -> float:
        return difflib.SequenceMatcher(None, path, n).ratio()
    return sorted(names, key=likeness, reverse=True)


def describe_linears(root: nn.Module, near: str = "") -> str:
    """``path [in -> out], ...`` for the linear maps under ``root``, closest to
    ``near`` first."""
    lins = _linear_list(root)
    names = _closest(near, list(lins)) if near else list(lins)
    return ", ".join(f"{n} [{lins[n].in_features} -> {lins[n].out_features}]"
                     for n in names) or "none"


def _at(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def adapter_problems(adapter: EncoderAdapter, model: nn.Module) -> list[str]:
    """Everything about ``adapter`` that does not fit ``model`` (empty: it fits).

    Checks that ``layers`` resolves to layers; that every role path is an nn.Linear in
    every layer; ``head_linear`` and ``num_heads_attr``; that a fused ``qkv`` has a
    multiple of ``3 * heads`` outputs and a gated ``ffn_in`` twice ``ffn_out``'s inputs.
    Each problem names the path and the linear maps it could have meant.
    """
    problems: list[str] = []
    config = getattr(model, "config", None)
    heads = getattr(config, adapter.num_heads_attr, None)
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
        ints = [k for k, v in vars(config).items() if isinstance(v, int)
                and not isinstance(v, bool)] if config is not None else []
        likely = [k for k in ints if "head" in k] or ints
        problems.append(f"num_heads_attr {adapter.num_heads_attr!r} is not an integer "
                        f"attribute of {type(config).__name__}; candidates: "
                        f"{', '.join(_closest(adapter.num_heads_attr, likely)) or 'none'}")
        heads = None
    head = _at(model, adapter.head_linear)
    if head is None or not is_head_module(head):
        base = getattr(model, "base_model", model)
        inside = {id(m) for m in base.modules()} if base is not model else set()
        outside = {n: m for n, m in _linear_list(model).items() if id(m) not in inside}
        wrong = "not found" if head is None else f"a {type(head).__name__}, not nn.Linear"
        names = _closest(adapter.head_linear, list(outside))
        problems.append(f"head_linear {adapter.head_linear!r} is {wrong}; linear maps of "
                        f"{type(model).__name__} outside the encoder: " + (", ".join(
                            f"{n} [{outside[n].in_features} -> {outside[n].out_features}]"
                            for n in names) or "none"))
    try:
        layers = list(adapter.layer_modules(model))
    except (AttributeError, TypeError):
        base = getattr(model, "base_model", model)
        lists = {n: m for n, m in base.named_modules() if isinstance(m, nn.ModuleList) and n}
        names = _closest(adapter.layers, list(lists))
        listed = ", ".join(f"{n} ({len(lists[n])} x "
                           f"{type(next(iter(lists[n]), None)).__name__})" for n in names)
        problems.append(f"layers {adapter.layers!r} is not found in {type(base).__name__} "
                        f"(the base model); its ModuleLists: {listed or 'none'}")
        return problems
    problems += _layer_problems(adapter, layers, heads)
    return problems


def _layer_problems(adapter: EncoderAdapter, layers: list[nn.Module], heads: int | None
                    ) -> list[str]:
    problems: list[str] = []
    for role in adapter.physical_roles:
        path = getattr(adapter, role)
        for i, layer in enumerate(layers):
            mod = _at(layer, path) if path else None
            if isinstance(mod, nn.Linear):
                continue
            wrong = ("has no path" if not path else "not found" if mod is None
                     else f"a {type(mod).__name__}, not nn.Linear")
            close = difflib.get_close_matches(path or role, list(_linear_list(layer)), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{role} {path!r} in layer {i} of {len(layers)} "
                            f"({type(layer).__name__}) is {wrong}{hint}; its linear maps: "
                            f"{describe_linears(layer, path or role)}")
            break
    for path, _, _ in adapter.head_inputs:
        if any(_at(layer, path) is None for layer in layers):
            problems.append(f"head_inputs module {path!r} is not found in every layer")
    if problems:
        return problems
    lins = adapter.layer_linears(layers[0])
    ffn_in, ffn_out = lins["ffn_in"], lins["ffn_out"]
    if adapter.qkv and heads and lins["qkv"].out_features % (3 * heads):
        problems.append(f"qkv {adapter.qkv!r} has {lins['qkv'].out_features} outputs, not a "
                        f"multiple of 3 x {heads} heads ({adapter.num_heads_attr})")
    if adapter.ffn_gated and ffn_in.out_features != 2 * ffn_out.in_features:
        problems.append(f"ffn_gated: ffn_in {adapter.ffn_in!r} has {ffn_in.out_features} "
                        f"outputs, not 2 x the {ffn_out.in_features} inputs of ffn_out "
                        f"{adapter.ffn_out!r}")
    elif not adapter.ffn_gated and ffn_in.out_features != ffn_out.in_features:
        gated = ffn_in.out_features == 2 * ffn_out.in_features
        problems.append(f"ffn_in {adapter.ffn_in!r} has {ffn_in.out_features} outputs but "
                        f"ffn_out {adapter.ffn_out!r} takes {ffn_out.in_features}"
                        + ("; a gated FFN? set ffn_gated: true" if gated else ""))
    return problems


def check_adapter(adapter: EncoderAdapter, model: nn.Module, what: str = "model") -> None:
    """Raise ModelError naming every path of ``adapter`` that does not fit ``model``
    (see :func:`adapter_problems`)."""
    problems = adapter_problems(adapter, model)
    if problems:
        raise ModelError(f"{what}: adapter {adapter.name} does not fit "
                         f"{type(model).__name__}: {'; '.join(problems)}")


def validate_encoder(config: PretrainedConfig, spec: AdapterSpec = None,
                     trust_remote_code: bool = False, task: Any = None,
                     what: str = "model") -> EncoderAdapter:
    """The adapter of a model, resolved from ``spec`` and checked against its meta
    skeleton (built from ``config`` alone); ModelError / ConfigError otherwise.

    A skeleton that cannot be built on the meta device for a reason other than a
    missing Auto class (modeling code that needs real tensors at construction) skips
    the path checks with a logged warning: loading the weights then tells.
    """
    try:
        adapter = resolve_adapter(spec, config.model_type)
    except ModelError as err:
        raise ModelError(f"{what}: {err}") from None
    try:
        model = skeleton(config, trust_remote_code, task)
    except ModelError as err:
        raise ModelError(f"{what}: {err}") from None
    except Exception as err:  # any failure of foreign modeling code
        logger.warning("%s: adapter paths not checked before loading: the model could not "
                       "be built on the meta device (%s: %s)", what, type(err).__name__, err)
        return adapter
    adapter = for_task(adapter, task, model)
    check_adapter(adapter, model, what)
    return adapter


def block_specs(adapter: EncoderAdapter) -> dict[str, tuple[str, int, str]]:
    """``{"attention": attn_block, "ffn": ffn_block}``; ValueError when the adapter
    cannot skip one of them (``structured.remove_empty_blocks`` is then refused)."""
    specs = {"attention": adapter.attn_block, "ffn": adapter.ffn_block}
    missing = [k for k, v in specs.items() if v is None]
    if missing:
        raise ValueError(f"structured.remove_empty_blocks: the {adapter.name} adapter "
                         f"cannot skip whole {' / '.join(missing)} blocks (its layers add "
                         "the residual inside their own forward); set it to false")
    return cast(dict[str, tuple[str, int, str]], specs)

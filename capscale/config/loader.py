"""The generic half of the configuration: YAML, ``key=value`` overrides, type checks.

Nothing here knows capscale's sections: :func:`build` turns a nested dict into any tree
of dataclasses, checking every value against the field's annotation and naming the
field (with a "did you mean" for unknown keys). Supported annotations: ``int``,
``float`` (ints accepted), ``bool``, ``str``, ``Literal[...]``, ``X | None``,
``list[X]``, ``dict[str, Any]`` (a free mapping), nested dataclasses, and
``dict[str, Dataclass]`` (a table of sections whose entries start from the field's
default entry of that name, or from the dataclass's defaults for a new name).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from capscale.errors import ConfigError, did_you_mean


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check ``value`` against annotation ``tp``; return (ok, coerced value)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin is dict:  # a free mapping (its keys are checked by the field's owner)
        return isinstance(value, dict), value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        (item_tp,) = typing.get_args(tp)
        out = []
        for v in value:
            ok, cv = _type_ok(v, item_tp)
            if not ok:
                return False, value
            out.append(cv)
        return True, out
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False, value
        return True, float(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _section_table(tp: Any) -> type | None:
    """The entry dataclass of a ``dict[str, Dataclass]`` annotation, else None."""
    if typing.get_origin(tp) is dict:
        _, value_tp = typing.get_args(tp)
        if dataclasses.is_dataclass(value_tp):
            return cast(type, value_tp)  # an annotation: the class, not an instance
    return None


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return copy.deepcopy(f.default)


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """An instance of dataclass ``cls`` from ``data`` (a mapping); fields not given keep
    their defaults. Raises ConfigError naming the first bad key or value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got "
                          f"{type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {prefix}{key}"
                              f"{did_you_mean(key, fields, prefix)} "
                              f"(known: {', '.join(fields)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(cast(type, tp), value or {}, f"{prefix}{key}.")
        elif (entry := _section_table(tp)) is not None:
            kwargs[key] = _build_table(entry, _default(fields[key]), value or {},
                                       f"{prefix}{key}.")
        else:
            ok, coerced = _type_ok(value, tp)
            if not ok:
                raise ConfigError(f"{prefix}{key} = {value!r}: expected {_type_name(tp)}")
            kwargs[key] = coerced
    return cls(**kwargs)


def _build_table(entry: type, defaults: dict[str, Any], data: Any, prefix: str
                 ) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a mapping of name -> section")
    out = dict(defaults)
    for name, value in data.items():
        base = dataclasses.asdict(defaults[name]) if name in defaults else {}
        out[str(name)] = build(entry, merge_dicts(base, value or {}), f"{prefix}{name}.")
    return out


def get_dotted(obj: Any, dotted: str) -> Any:
    """``get_dotted(cfg, "train.lr")``; table entries are reached by key."""
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``) and
    ``2:4`` as a string (YAML 1.1 reads it as the base-60 integer 124)."""


_INT = "tag:yaml.org,2002:int"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _INT]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)"
                     r"|[-+]?0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."))


def parse_yaml(text: str, source: str = "<text>") -> Any:
    """YAML ``text`` (a SafeLoader subclass: no arbitrary objects); a syntax error is a
    one-line ConfigError ``source:line:column: ...``."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(yaml_error(err, source)) from None


def yaml_error(err: yaml.YAMLError, source: str) -> str:
    """``FILE:LINE:COLUMN: YAML syntax error: PROBLEM (CONTEXT at L:C)``, one line."""
    mark = getattr(err, "problem_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context, cmark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and cmark is not None:
        problem += f" ({context} at {cmark.line + 1}:{cmark.column + 1})"
    return f"{where}: YAML syntax error: {' '.join(problem.split())}"


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[x, y]"]`` into a nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        value = parse_yaml(raw, f"override {item!r}, value") if raw.strip() else None
        _set_dotted(tree, key.strip(), value)
    return tree


def merge_dicts(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``, nested dicts merged key by key (inputs unchanged)."""
    out = dict(base)
    for k, v in extra.items():
        nested = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = merge_dicts(out[k], v) if nested else v
    return out


def read_yaml_file(path: str | Path, search_dir: Path | None = None) -> dict[str, Any]:
    """A YAML mapping from ``path``, or, when ``path`` is not a file, from ``search_dir /
    path`` or ``search_dir / name`` (packaged configs: ``paper/cap_m_qqp_90.yaml``)."""
    p = Path(path)
    if not p.is_file():
        candidates = [] if search_dir is None else [search_dir / p.name]
        if search_dir is not None and not p.is_absolute():
            candidates.insert(0, search_dir / p)
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise ConfigError(f"config file {path} not found")
        p = found[0]
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {p}: not UTF-8 text (byte 0x{err.object[err.start]:02x}"
                          f" at offset {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"config file {p} cannot be read ({err.strerror or err})") from None
    data = parse_yaml(text, str(p)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping at the top level")
    return data


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

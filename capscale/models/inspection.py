"""``capscale inspect MODEL``: what capscale sees in an encoder, before any weight loads.

The task model is built on the meta device from the config alone (``skeleton`` in
capscale.models.specs). :func:`inspect_model` reports its class, the adapter that would be used (or
why none fits), its layers and how often each is applied, and the prunable matrices of
one layer with their shapes and logical row blocks (fused Q/K/V, gated FFN halves).
When no adapter fits, :func:`suggest_adapter` guesses one from module names and shapes,
written as the ``model.adapter`` mapping a config takes, and checks it like any other.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from capscale.console import Console
from capscale.errors import ConfigError, ModelError
from capscale.export.trial import padded_forward_error, trial_export
from capscale.models.adapters import EncoderAdapter
from capscale.models.deep_check import DeepCheck, deep_check, describe
from capscale.models.loading import fixed_input_length, read_config
from capscale.models.specs import (
    AdapterSpec,
    adapter_from_mapping,
    adapter_problems,
    resolve_adapter,
    skeleton,
)

# Last path segments that name Q / K / V maps, a fused Q/K/V map and an output projection.
_QKV_WORDS = {"query": "q", "key": "k", "value": "v"}
_FUSED = ("qkv", "in_proj", "c_attn", "query_key_value")
_OUT = {"o", "out", "wo", "o_proj", "out_proj", "out_lin", "o_lin", "to_out", "dense", "proj",
        "c_proj", "output", "attn_out", "dense_out"}
_UP = ("up", "in", "fc1", "wi", "intermediate", "lin1", "fc_in", "w1", "dense_h_to_4h")
_HEAD_ATTRS = ("num_attention_heads", "n_heads", "n_head", "num_heads", "attention_heads",
               "encoder_attention_heads", "heads")


def _role_names(role: str) -> set[str]:
    letter = _QKV_WORDS[role]
    return {letter, role, f"w{letter}", f"w_{letter}", f"to_{letter}", f"{letter}_proj",
            f"{role}_proj", f"{letter}_lin", f"{letter}_linear", f"linear_{letter}",
            f"{letter}_layer", f"{role}_layer", f"{letter}proj", f"{role}_dense"}


@dataclass
class Inspection:
    """What ``capscale inspect`` found (see :func:`inspect_model`)."""

    name: str
    model_type: str
    config_class: str
    model_class: str
    adapter: EncoderAdapter | None = None
    source: str = ""
    problems: list[str] = field(default_factory=list)
    summary: list[tuple[str, str]] = field(default_factory=list)
    matrices: list[tuple[str, str, str, str]] = field(default_factory=list)
    suggestion: dict[str, Any] | None = None
    suggestion_problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    deep: DeepCheck | None = None
    structured: str = ""  # why structured pruning is refused ("" when its trial export ran)
    unusable: str = ""  # why no run can use the model (a fixed input length)

    @property
    def fits(self) -> bool:
        return self.adapter is not None and not self.problems and not self.unusable


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


def _linears(root: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in root.named_modules() if isinstance(m, nn.Linear) and n}


def _block_list(base: nn.Module) -> tuple[str, nn.Module] | None:
    """The layers path and the first block: the ModuleList of same-class children holding
    linear maps with the most parameters; when each child only wraps a ModuleList of
    the real blocks (ALBERT's groups), ``outer.*.inner``."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in base.named_modules():
        if not (name and isinstance(mod, nn.ModuleList) and len(mod)):
            continue
        if len({type(c) for c in mod}) != 1 or len(_linears(mod[0])) < 2:
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[0]:
            best = (size, name, mod)
    if best is None:
        return None
    _, name, blocks = best
    count = len(_linears(blocks[0]))
    for inner, mod in blocks[0].named_modules():
        if (inner and isinstance(mod, nn.ModuleList) and len(mod)
                and len(_linears(mod)) == count
                and all(isinstance(b.get_submodule(inner), nn.ModuleList) for b in blocks)):
            return f"{name}.*.{inner}", mod[0]
    return name, blocks[0]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        n += 1
    return n


def _attention(lins: dict[str, nn.Linear], hidden: int, spec: dict[str, Any],
               notes: list[str]) -> set[str]:
    """Fill Q/K/V (or qkv) and attn_out of ``spec``; return the paths used."""
    last = {n: n.rsplit(".", 1)[-1].lower() for n in lins}
    found = {role: next((n for n in lins if last[n] in _role_names(role)), None)
             for role in _QKV_WORDS}
    used: set[str] = set()
    if all(found.values()):
        spec.update(found)
        used.update(p for p in found.values() if p)
    else:
        fused = next((n for n in lins if any(w in last[n] for w in _FUSED)), None) or next(
            (n for n, m in lins.items() if m.in_features == hidden
             and m.out_features == 3 * hidden), None)
        if fused is None:
            notes.append("no Q/K/V maps found by name (q/k/v, query/key/value, to_q, "
                         "q_proj, ...) and no fused one (qkv, in_proj, 3 x hidden outputs)")
            spec.update({role: "TODO" for role in _QKV_WORDS})
        else:
            spec.update(qkv=fused, qkv_layout="stacked")
            used.add(fused)
            notes.append(f"qkv {fused}: layout 'stacked' ([Q; K; V]) assumed; use "
                         "'per_head' if the model views its output as (heads, 3 x head size)")
    anchor = next(iter(used), "")
    square = [n for n, m in lins.items() if n not in used
              and m.in_features == m.out_features == hidden]
    square.sort(key=lambda n: (last[n] not in _OUT, -_common_prefix(n, anchor)))
    spec["attn_out"] = square[0] if square else "TODO"
    used.update(square[:1])
    return used


def _ffn(lins: dict[str, nn.Linear], hidden: int, used: set[str], spec: dict[str, Any],
         notes: list[str]) -> None:
    """Fill ffn_in / ffn_out (and ffn_gated) of ``spec`` from the shapes hidden -> I -> hidden."""
    rest = {n: m for n, m in lins.items() if n not in used}
    for out_name, out in rest.items():
        inner = out.in_features
        if out.out_features != hidden or inner == hidden:
            continue
        ups = [n for n, m in rest.items() if m.in_features == hidden
               and m.out_features in (inner, 2 * inner)]
        if not ups:
            continue
        ups.sort(key=lambda n: not any(w in n.rsplit(".", 1)[-1].lower() for w in _UP))
        spec.update(ffn_in=ups[0], ffn_out=out_name)
        if rest[ups[0]].out_features == 2 * inner:
            spec["ffn_gated"] = True
        elif len(ups) > 1:
            notes.append(f"FFN maps {', '.join(ups[1:])} (a separate gate?) are not "
                         "covered by an adapter; only ffn_in and ffn_out are pruned")
        return
    notes.append("no FFN found (hidden -> I and I -> hidden maps)")
    spec.update(ffn_in="TODO", ffn_out="TODO")


def _heads_attr(config: Any, hidden: int) -> str:
    ints = {k: v for k, v in vars(config).items() if isinstance(v, int)
            and not isinstance(v, bool)}
    names = [a for a in _HEAD_ATTRS if isinstance(getattr(config, a, None), int)]
    names += [k for k in ints if "head" in k and not any(
        w in k for w in ("dim", "size", "kv", "key_value"))]
    fits = [n for n in names if getattr(config, n) > 0 and hidden % getattr(config, n) == 0]
    return (fits or names or ["TODO"])[0]


def suggest_adapter(model: nn.Module) -> tuple[dict[str, Any], list[str]]:
    """A ``model.adapter`` mapping guessed from ``model``'s module names and shapes, and
    notes on what was assumed or not found (paths not found are ``TODO``).

    The repeated blocks are the largest ModuleList of same-class modules; in a block,
    Q/K/V are found by name (or one fused map by name or by 3 x hidden outputs), the
    output projection is the hidden -> hidden map nearest to them, the FFN the maps
    hidden -> I -> hidden (gated when the first has 2 x I outputs); the head linear is
    the task model's last linear map outside the encoder.
    """
    notes: list[str] = []
    base = _base(model)
    spec: dict[str, Any] = {}
    blocks = _block_list(base)
    if blocks is None:
        notes.append("no ModuleList of repeated blocks with linear maps found")
        spec["layers"] = "TODO"
        inside: set[int] = set()
    else:
        spec["layers"] = blocks[0]
        lins = _linears(blocks[1])
        hidden = collections.Counter(m.in_features for m in lins.values()).most_common(1)[0][0]
        _ffn(lins, hidden, _attention(lins, hidden, spec, notes), spec, notes)
        spec["num_heads_attr"] = _heads_attr(model.config, hidden)
        top = base.get_submodule(blocks[0].split(".*.")[0])
        inside = {id(m) for m in top.modules()}
    if base is not model:
        inside = {id(m) for m in base.modules()}
    outside = [n for n, m in _linears(model).items() if id(m) not in inside]
    spec["head_linear"] = outside[-1] if outside else "TODO"
    return spec, notes


def matrix_rows(adapter: EncoderAdapter, model: nn.Module) -> list[tuple[str, str, str, str]]:
    """``(role, path in a layer, weight shape, logical matrices)`` of the prunable maps."""
    layers = adapter.layer_modules(model)
    heads = adapter.num_heads(model.config)
    rows = []
    for role, lin in adapter.layer_linears(layers[0]).items():
        shapes = {tuple(adapter.layer_linears(layer)[role].weight.shape) for layer in layers}
        shape = " x ".join(map(str, lin.weight.shape))
        if len(shapes) > 1:
            shape += f" (layer 0; {len(shapes)} shapes across layers)"
        groups = adapter.row_groups(role, lin.out_features, heads)
        logical = ", ".join(f"{name} {len(rows_)} x {lin.in_features}"
                            for name, rows_ in (groups or {}).items())
        rows.append((role, adapter.role_path(role), shape, logical or "-"))
    return rows


def _describe(ins: Inspection, adapter: EncoderAdapter, model: nn.Module) -> None:
    layers = adapter.layer_modules(model)
    kinds = sorted({type(m).__name__ for m in layers})
    times = adapter.applications(model)
    head = adapter.head(model)
    ins.summary += [
        ("layers", f"{adapter.layers}: {len(layers)} distinct ({', '.join(kinds)}), each "
                   f"applied {times}x ({len(layers) * times} layer applications)"),
        ("attention heads", f"{adapter.num_heads(model.config)} ({adapter.num_heads_attr})"),
        ("head linear", f"{adapter.head_linear} [{head.in_features} -> {head.out_features}]")]
    ins.matrices = matrix_rows(adapter, model)


def _deep(ins: Inspection, adapter: EncoderAdapter, model: nn.Module, config: Any,
          trust_remote_code: bool, task: Any) -> None:
    """The checks a run makes before loading weights: the deep layout checks, the fixed
    input length, and a structured export of a tiny random copy (capscale.export.trial)."""
    ins.deep = found = deep_check(adapter, model, structured=True)
    fixed = fixed_input_length(config)
    if fixed is not None:
        tried = padded_forward_error(config, fixed[0], trust_remote_code, task)
        ins.unusable = f"{fixed[1]}" + (f"; a padded batch fails ({tried})" if tried else
                                        "; capscale pads batches to their longest text")
    ins.structured = found.structured_refusal
    if not ins.structured and not ins.unusable:
        trial = trial_export(config, adapter, trust_remote_code, task)
        ins.structured = trial.message if trial.ok is False else ""
        if trial.ok is None:
            ins.notes.append(f"the structured export was not tried: {trial.message}")
    found.structured_refusal = ins.structured
    ins.summary += describe(found, structured=True)
    if not ins.structured and not ins.unusable:
        ins.summary.append(("trial structured export", "runs and reproduces the masked "
                            "model (a tiny random copy, reloaded with transformers alone)"))


def inspect_model(name: str, trust_remote_code: bool = False, spec: AdapterSpec = None,
                  task: Any = None) -> Inspection:
    """Inspect the model at ``name`` (a folder, a cached hub name or a packaged name).

    Args:
        spec: the ``model.adapter`` to check (None: the registered or plug-in one).
        task: the task whose model class is built (default: sequence classification).
    """
    config = read_config(name, trust_remote_code)
    model = skeleton(config, trust_remote_code, task)
    ins = Inspection(name, config.model_type, type(config).__name__, type(model).__name__)
    try:
        ins.adapter = resolve_adapter(spec, config.model_type)
        ins.source = ("model.adapter mapping" if isinstance(spec, dict) else
                      f"model.adapter {spec!r}" if spec else
                      f"registered for model_type {config.model_type!r}")
    except ModelError as err:
        ins.source = f"none: {err}"
    if ins.adapter is not None:
        ins.problems = adapter_problems(ins.adapter, model)
        if not ins.problems:
            _describe(ins, ins.adapter, model)
            _deep(ins, ins.adapter, model, config, trust_remote_code, task)
            return ins
    ins.suggestion, ins.notes = suggest_adapter(model)
    guessed = adapter_from_mapping(ins.suggestion, config.model_type)
    ins.suggestion_problems = adapter_problems(guessed, model)
    if ins.adapter is None and not ins.suggestion_problems:
        _describe(ins, guessed, model)
        _deep(ins, guessed, model, config, trust_remote_code, task)
    return ins


def parse_adapter_option(text: str) -> AdapterSpec:
    """``--adapter``: a YAML file (a config with ``model.adapter``, or the mapping
    itself), an inline YAML mapping, a registered name or an import path."""
    from capscale.config.loader import parse_yaml

    path = Path(text)
    value = parse_yaml(path.read_text()) if path.is_file() else parse_yaml(text)
    if isinstance(value, dict):
        model = value.get("model")
        if isinstance(model, dict) and "adapter" in model:
            return model["adapter"]
        return value.get("adapter", value) if set(value) == {"adapter"} else value
    if path.is_file():
        raise ConfigError(f"--adapter {text}: the file holds no adapter mapping")
    return text


def suggestion_yaml(spec: dict[str, Any], trust_remote_code: bool = False) -> str:
    """The suggestion as the config section that takes it."""
    model: dict[str, Any] = {"trust_remote_code": True} if trust_remote_code else {}
    return yaml.safe_dump({"model": {**model, "adapter": spec}}, sort_keys=False)


def render(ins: Inspection, console: Console, trust_remote_code: bool = False) -> None:
    """Print an inspection: a summary table, the prunable matrices, problems and, when
    no adapter is registered, the suggested ``model.adapter`` YAML."""
    rows = [("model", ins.name), ("model_type", ins.model_type),
            ("config class", ins.config_class),
            ("task model", f"{ins.model_class} (meta device, no weights)")]
    if ins.adapter is not None:
        fit = ": does not fit (problems below)" if ins.problems else ""
        rows.append(("adapter", f"{ins.adapter.name} ({ins.source}){fit}"))
    else:
        rows += [("adapter", "none: see the suggestion below"),
                 ("why", ins.source.removeprefix("none: "))]
    console.table(f"capscale inspect {ins.name}", rows + ins.summary)
    if ins.matrices:
        from rich.table import Table

        which = "suggested adapter" if ins.adapter is None else "adapter"
        t = Table(title=f"prunable matrices of one layer ({which})", header_style="bold")
        for col in ("role", "path in a layer", "weight (out x in)", "logical matrices"):
            t.add_column(col)
        for row in ins.matrices:
            t.add_row(*row)
        console.rich.print(t)
    for problem in ins.problems:
        print(f"problem: {problem}")
    if ins.unusable:
        print(f"refused: no run can use this model: {ins.unusable}")
    elif ins.structured and ins.deep is not None:
        print(f"structured pruning refused: {ins.structured}")
    if ins.suggestion is not None:
        state = ("does not pass the checks yet (see below)" if ins.suggestion_problems
                 else f"fails a deeper check ({ins.unusable})" if ins.unusable
                 else "passes the checks for unstructured pruning; structured pruning is "
                 "refused (above)" if ins.structured
                 else "passes the checks, and a structured export of a tiny random copy "
                 "runs")
        print("\nsuggested adapter, guessed from module names and shapes; it " + state
              + ". Check it against the modeling code, then put it in the run's YAML:\n")
        print(suggestion_yaml(ins.suggestion, trust_remote_code))
        for note in ins.notes:
            print(f"note: {note}")
        for problem in ins.suggestion_problems:
            print(f"problem of the suggestion: {problem}")

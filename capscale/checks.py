"""Checks above the configuration and the tables, run before any model loads.

Each config section checks itself (capscale.config); what involves more than one
section, or a name from an extension table (pruning methods, tasks, objectives,
contrastive modules), is checked here, so that config/ imports nothing of the domain.
:func:`load_run_config` is what the CLI and the recipe use: a loaded config with every
rule checked. :func:`check_run_inputs` then checks the data, the model configs and the
text lengths, and returns the data and the tokenizer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from capscale.config import DATA_PRESETS, Config, ConfigError, config_from_dict, load_config
from capscale.contrastive.modules import CONTRASTIVE_MODULES
from capscale.contrastive.objectives import OBJECTIVES
from capscale.data import TaskData, check_lengths, load_task_data
from capscale.distributed.precision import precision_refusal, resolve_precision
from capscale.errors import ModelError
from capscale.export.formats import FORMATS, NEEDS
from capscale.export.trial import padded_forward_error, trial_export
from capscale.models.adapters import EncoderAdapter
from capscale.models.deep_check import deep_check
from capscale.models.loading import (
    check_encoder,
    check_teacher,
    fixed_input_length,
    load_tokenizer,
    model_max_tokens,
    read_config,
)
from capscale.models.specs import adapter_from_mapping, block_specs, for_task, skeleton
from capscale.pruning.hidden import hidden_norms
from capscale.pruning.methods import PRUNING_METHODS
from capscale.pruning.schedule import cubic_sparsity, warmup_steps
from capscale.pruning.unstructured import NoPruning
from capscale.tasks import TASKS, Task
from capscale.token_cache import TokenCache

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """:func:`capscale.config.load_config`, then every cross-section rule."""
    return check_config(load_config(path, overrides))


def run_config_from_dict(data: dict[str, Any]) -> Config:
    """:func:`capscale.config.config_from_dict`, then every cross-section rule."""
    return check_config(config_from_dict(data))


def check_config(cfg: Config) -> Config:
    """Raise a ConfigError naming the first broken rule; returns ``cfg``."""
    if isinstance(cfg.model.adapter, dict):  # its keys and value types, before any model
        adapter_from_mapping(cfg.model.adapter)
    for rule in [*_export_formats(cfg.export.formats), *cross_section_rules(cfg)]:
        raise ConfigError(rule)
    return cfg


def _export_formats(formats: list[str]) -> list[str]:
    """``export.formats``: known names, and the packages they need installed."""
    if not all(f in FORMATS for f in formats):
        return [f"export.formats = {formats!r}: each one of {', '.join(FORMATS)}"]
    missing = sorted({p for f in formats for p in NEEDS.get(f, ())
                      if importlib.util.find_spec(p) is None})
    if missing:
        return [f"export.formats = {formats!r}: needs {', '.join(missing)}: pip install "
                "'capscale[onnx]' (or bash scripts/setup.sh)"]
    return []


def check_run_inputs(cfg: Config, task: Task) -> tuple[TaskData, PreTrainedTokenizerBase]:
    """Load and check the data, check the student's (and a given teacher's) config and
    the text lengths, load the tokenizer; nothing heavy is loaded. A note about
    truncated texts joins ``data.notes``. With ``data.cache_tokenized`` the data keeps
    its tokenised results under ``<output_dir>/cache`` (capscale.token_cache), the
    length check's token counts first."""
    data = load_task_data(cfg.data)
    if cfg.data.cache_tokenized:  # written by the main rank, read by every rank
        data.cache = TokenCache(Path(cfg.output_dir) / "cache", writer=not (
            dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0)
    m = cfg.model
    if cfg.data.task_type == "embedding" and m.teacher is None and wants_teacher(cfg) and len(
            [c for c in data.train.column_names if c not in ("labels", "example_id")]) == 1:
        raise ConfigError("model.teacher: a corpus of single texts gives a teacher's "
                          "fine-tuning nothing to learn (no pairs, no scores); set "
                          "model.teacher (the dense model itself, e.g. model.teacher="
                          f"{m.name_or_path}), or turn KD, layer distillation and FiC off")
    adapter = check_encoder(m.name_or_path, m.adapter, m.trust_remote_code, task)
    limits = [model_max_tokens(m.name_or_path, m.trust_remote_code)]
    if m.teacher is not None:
        check_teacher(m.teacher, data.num_labels, m.trust_remote_code, task)
        limits.append(model_max_tokens(m.teacher, m.trust_remote_code, "model.teacher"))
    data.notes += check_layout(cfg, adapter, task)
    limit = min((n for n in limits if n is not None), default=None)
    check_output_dirs(cfg)
    tokenizer = load_tokenizer(m.name_or_path, m.trust_remote_code)
    with data.cache.held() if data.cache is not None else contextlib.nullcontext():
        note = check_lengths(data, tokenizer, cfg.data, limit)  # kept when it passes
    data.notes += [n for n in (note, negatives_warning(cfg, len(data.train))) if n]
    return data, tokenizer


def check_layout(cfg: Config, adapter: EncoderAdapter, task: Task) -> list[str]:
    """The deep checks of the model's layout, before any weight loads: a model that needs
    inputs of one fixed length is refused (capscale's batches are padded to their
    longest text); a structured method (``physical_export``) is refused where the deep
    check or a trial export on a tiny random copy says heads cannot be removed one by
    one. Returns notes: the encoder sparsity the run can reach when the adapter leaves
    linear maps of the layers unpruned, a trial that could not run. ModelError (exit 2)
    on refusal."""
    m, p = cfg.model, cfg.pruning
    configs = {key: (name, read_config(name, m.trust_remote_code, key))
               for key, name in (("model.name_or_path", m.name_or_path),
                                 ("model.teacher", m.teacher)) if name is not None}
    for key, (name, config) in configs.items():
        fixed = fixed_input_length(config)
        if fixed is not None:
            tried = padded_forward_error(config, fixed[0], m.trust_remote_code, task)
            how = (f"a padded batch of {fixed[0]} tokens fails on a tiny random copy ({tried})"
                   if tried else "capscale pads each batch to its longest text, not to one "
                   "fixed length")
            raise ModelError(f"{key} {name}: {fixed[1]}, and {how}; use a checkpoint that "
                             "takes any length (nystromformer: num_landmarks = "
                             "segment_means_seq_len)")
    method = PRUNING_METHODS[p.method]
    structured = method.physical_export
    config = configs["model.name_or_path"][1]
    teacher_config = configs.get("model.teacher", configs["model.name_or_path"])[1]
    depth = getattr(teacher_config, "num_hidden_layers", None)
    asked = cfg.loss.layer_teacher_layers
    if cfg.loss.w_layer > 0 and asked and isinstance(depth, int) and max(asked) > depth:
        raise ConfigError(f"loss.layer_teacher_layers = {asked}: the teacher has {depth} "
                          "layers (counted from 1)")
    try:
        model = skeleton(config, m.trust_remote_code, task)
    except Exception:  # foreign modeling code: validate_encoder has warned already
        return []
    try:
        if cfg.structured.remove_empty_blocks:
            block_specs(adapter)
        if cfg.structured.hidden_sparsity > 0:
            hidden_norms(model, for_task(adapter, task, model))
    except ValueError as err:
        raise ModelError(f"model {m.name_or_path}: {err}") from None
    found = deep_check(for_task(adapter, task, model), model, structured)
    why, notes = found.structured_refusal, []
    # transformers writes a model only on rank 0 of an initialised process group, so
    # the trial runs there; a refusal ends that rank, and the launcher the job.
    main_rank = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if structured and not why and main_rank:
        trial = trial_export(config, adapter, m.trust_remote_code, task)
        why = trial.message if trial.ok is False else ""
        if trial.ok is None:
            notes.append(f"WARNING: the structured export was not tried before training "
                         f"({trial.message}); it is still verified at the end")
    if why:
        raise ModelError(f"model {m.name_or_path}: pruning.method={p.method} removes whole "
                         f"attention heads, which this {config.model_type} model does not "
                         f"allow: {why}")
    note = None if isinstance(method, NoPruning) else found.sparsity_note(
        p.final_sparsity, structured)
    return [*notes, *([note] if note else [])]


def check_output_dirs(cfg: Config) -> None:
    """Raise a ConfigError when ``output_dir`` (or ``checkpoint.dir``) cannot be a folder
    the run writes to: a regular file, under one, or not writable. Creates nothing."""
    for key, value in (("output_dir", cfg.output_dir), ("checkpoint.dir", cfg.checkpoint.dir)):
        if value is None:
            continue
        path = Path(value).absolute()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            where = "is a file" if existing == path else f"is under {existing}, a file"
            raise ConfigError(f"{key} = {value!r}: {where}, not a folder; choose another "
                              f"{key}")
        if not os.access(existing, os.W_OK | os.X_OK):
            where = "" if existing == path else f" ({existing}, where it would be made)"
            raise ConfigError(f"{key} = {value!r}: not writable{where}; choose another "
                              f"{key} or change its permissions")


def negatives_warning(cfg: Config, train_examples: int) -> str | None:
    """A warning when the bank's extra negatives ask for more examples than there are."""
    n = cfg.cap.num_negatives
    if (n > train_examples and cfg.cap.enabled_modules()
            and not OBJECTIVES[cfg.cap.mode].online):
        return (f"WARNING: cap.num_negatives = {n} is more than the {train_examples} "
                "training examples: every step takes the whole bank as extra negatives "
                f"(no random draw); lower cap.num_negatives to {train_examples} or less")
    return None


def schedule_warning(cfg: Config, total_steps: int) -> str | None:
    """A warning when the run is too short for its sparsity schedule: one mask update
    raises the sparsity by more than 10 points (cubic schedules; a structured cubic one
    when a single update goes all the way), e.g. one step from 0% to the final sparsity.
    Iterative structured levels jump by design, and ``none`` does not prune."""
    p = cfg.pruning
    method = PRUNING_METHODS[cfg.pruning.method]
    every = cfg.structured.update_every if method.evaluates_itself else 1
    if (isinstance(method, NoPruning) or p.final_sparsity <= p.initial_sparsity
            or (method.evaluates_itself and cfg.structured.schedule == "iterative")):
        return None
    t_i, t_f = warmup_steps(p.initial_warmup, total_steps), warmup_steps(p.final_warmup,
                                                                          total_steps)
    step = min((t_i // every + 1) * every, total_steps)  # the first update that prunes
    before = p.initial_sparsity
    after = cubic_sparsity(step, total_steps, p.initial_sparsity, p.final_sparsity, t_i, t_f)
    limit = p.final_sparsity - p.initial_sparsity - 1e-9 if every > 1 else 0.1
    if after - before <= limit:
        return None
    return (f"WARNING: a run of {total_steps} optimiser step(s) is too short for its "
            f"sparsity schedule: the mask update at step {step} goes from {before:.0%} to "
            f"{after:.0%} sparsity at once; give more steps (train.epochs, train.max_steps) "
            "or shorter warm-ups (pruning.initial_warmup, pruning.final_warmup)")


def wants_teacher(cfg: Config) -> bool:
    """Whether the run uses the fine-tuned teacher (KD, layer distillation, or a
    contrastive module fed by it)."""
    return cfg.loss.w_kd > 0 or cfg.loss.w_layer > 0 or any(
        CONTRASTIVE_MODULES[n].source == "teacher" for n in cfg.cap.enabled_modules())


def _precision_rules(cfg: Config) -> list[str]:
    """``train.precision`` on this machine and strategy, and a DeepSpeed file that
    switches a precision on by itself (``train.precision`` fills those sections)."""
    cuda = torch.cuda.is_available()
    refusal = precision_refusal(cfg.train.precision, cfg.cap.reference_dtype, cfg.strategy,
                                cuda)
    out = [refusal] if refusal else []
    path = cfg.distributed.deepspeed_config
    if cfg.strategy == "zero3" and path and Path(path).is_file():
        name = resolve_precision(cfg.train.precision, "cuda" if cuda else "cpu")
        with open(path) as f:
            file_cfg = json.load(f)
        for key in ("bf16", "fp16"):
            section = file_cfg.get(key)
            if isinstance(section, dict) and section.get("enabled") is True and key != name:
                out.append(f"distributed.deepspeed_config {path} enables {key}, but "
                           f"train.precision={cfg.train.precision} resolves to {name}: set "
                           f"train.precision: {key}, or \"enabled\": \"auto\" in the file "
                           "(train.precision decides)")
    return out


def _table_name(value: str, table: dict[str, Any], key: str) -> str | None:
    if value in table:
        return None
    known = ", ".join(repr(n) for n in sorted(table))
    return f"{key} = {value!r}: expected one of {known} (the registered names)"


def cross_section_rules(cfg: Config) -> list[str]:
    """Every rule that involves more than one section, or an extension table; returns
    the messages of the broken ones (empty: the config is consistent)."""
    out = [msg for msg in (
        _table_name(cfg.pruning.method, PRUNING_METHODS, "pruning.method"),
        _table_name(cfg.data.task_type, TASKS, "data.task_type"),
        _table_name(cfg.cap.mode, OBJECTIVES, "cap.mode")) if msg]
    out += [f"cap.modules.{name}: no such contrastive module; registered: "
            f"{', '.join(sorted(CONTRASTIVE_MODULES))}"
            for name in cfg.cap.modules if name not in CONTRASTIVE_MODULES]
    if out:
        return out
    if cfg.strategy in ("ddp", "fsdp2") and (cfg.distributed.offload_params
                                             or cfg.distributed.offload_optimizer):
        out.append(f"distributed.offload_params / offload_optimizer: CPU offload needs "
                   f"strategy zero3 (got {cfg.strategy!r})")
    sources = [cfg.data.preset, cfg.data.dataset_name, cfg.data.train_file]
    if sum(s is not None for s in sources) != 1:
        out.append("data: give exactly one of data.preset, data.dataset_name or "
                   f"data.train_file (got preset={cfg.data.preset!r}, dataset_name="
                   f"{cfg.data.dataset_name!r}, train_file={cfg.data.train_file!r})")
    if cfg.data.preset is not None and cfg.data.preset not in DATA_PRESETS:
        out.append(f"data.preset = {cfg.data.preset!r}: known presets are "
                   f"{sorted(DATA_PRESETS)}")
    if cfg.resume not in (None, "latest") and not Path(cfg.resume).is_dir():
        out.append(f"resume = {cfg.resume!r}: not a checkpoint directory; give null, "
                   "latest, or a path such as <output_dir>/checkpoints/step-00000100")
    task = TASKS[cfg.data.task_type]
    supervised = [m for m in cfg.cap.enabled_modules() if cfg.cap.modules[m].w_sup > 0]
    if not task.class_labels and supervised:
        out.append(f"cap.modules.{supervised[0]}.w_sup = {cfg.cap.modules[supervised[0]].w_sup}"
                   f": supervised contrastive terms need class labels; set w_sup to 0 for "
                   f"every module ({', '.join(supervised)}) of a {cfg.data.task_type} task")
    if cfg.cap.representation not in task.representations:
        out.append(f"cap.representation = {cfg.cap.representation!r}: a "
                   f"{cfg.data.task_type} task reads its contrastive representation as "
                   f"{' / '.join(task.representations)}")
    extra = [f for f in cfg.export.formats if f != "pytorch"]
    if extra and not task.extra_formats:
        out.append(f"export.formats {', '.join(extra)}: a {cfg.data.task_type} task exports "
                   "its Hugging Face folder only (export.formats: [pytorch])")
    method = PRUNING_METHODS[cfg.pruning.method]
    if "sparse" in cfg.export.formats and method.physical_export:
        out.append(f"export.formats sparse: pruning.method={cfg.pruning.method} exports a "
                   "physically smaller dense model, with no zeros to store sparsely; drop "
                   "sparse (onnx / int8 apply)")
    for key, on in (("remove_empty_blocks", cfg.structured.remove_empty_blocks),
                    ("hidden_sparsity", cfg.structured.hidden_sparsity > 0)):
        if on and cfg.pruning.method not in ("structured", "hybrid"):
            out.append(f"structured.{key}: a setting of the physically smaller methods "
                       f"(structured, hybrid); pruning.method={cfg.pruning.method} does not "
                       "read it")
    if (cfg.pruning.method == "hybrid" and cfg.structured.remove_empty_blocks
            and cfg.pruning.scope != "global"):
        out.append("structured.remove_empty_blocks with pruning.method=hybrid needs "
                   "pruning.scope: global (scope local keeps 1 - s of every layer's heads "
                   "and neurons, so no block ever empties)")
    if cfg.pruning.target_latency_ms is not None and not method.physical_export:
        out.append(f"pruning.target_latency_ms: pruning.method={cfg.pruning.method} exports "
                   "a dense model that runs at dense speed; a latency target needs a "
                   "physically smaller method (structured or hybrid)")
    out += _precision_rules(cfg)
    refusal = method.refuses_strategy(cfg.strategy)
    if refusal:
        out.append(f"pruning.method={cfg.pruning.method} with strategy={cfg.strategy}: "
                   f"{refusal}")
    objective = OBJECTIVES[cfg.cap.mode]
    refusal = method.refuses(objective.name)
    if refusal:
        out.append(f"pruning.method={cfg.pruning.method} with cap.mode={cfg.cap.mode}: "
                   f"{refusal}")
    return out

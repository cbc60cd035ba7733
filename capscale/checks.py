"""Cross-section rules of the configuration: everything that involves more than one
section, or a name from an extension table, checked in one place."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from capscale.config.schema import DATA_PRESETS

if TYPE_CHECKING:
    from capscale.config.schema import Config


def _table_name(value: str, table: dict[str, Any], key: str) -> str | None:
    if value in table:
        return None
    known = ", ".join(repr(n) for n in sorted(table))
    return f"{key} = {value!r}: expected one of {known} (the registered names)"


def cross_section_rules(cfg: Config) -> list[str]:
    """Every rule that involves more than one section, or an extension table; returns
    the messages of the broken ones (empty: the config is consistent)."""
    # Function-level imports: the tables import no config at module level, so this is
    # the only direction of the dependency.
    from capscale.contrastive.modules import CONTRASTIVE_MODULES
    from capscale.contrastive.objectives import OBJECTIVES
    from capscale.pruning.methods import PRUNING_METHODS
    from capscale.tasks import TASKS

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
    method = PRUNING_METHODS[cfg.pruning.method]
    if "sparse" in cfg.export.formats and method.physical_export:
        out.append(f"export.formats sparse: pruning.method={cfg.pruning.method} exports a "
                   "physically smaller dense model, with no zeros to store sparsely; drop "
                   "sparse (onnx / int8 apply)")
    if cfg.pruning.target_latency_ms is not None and not method.physical_export:
        out.append(f"pruning.target_latency_ms: pruning.method={cfg.pruning.method} exports "
                   "a dense model that runs at dense speed; a latency target needs a "
                   "physically smaller method (structured or hybrid)")
    objective = OBJECTIVES[cfg.cap.mode]
    refusal = method.refuses(objective.name)
    if refusal:
        out.append(f"pruning.method={cfg.pruning.method} with cap.mode={cfg.cap.mode}: "
                   f"{refusal}")
    return out

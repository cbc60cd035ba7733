"""Typed run configuration: a YAML file, then ``key=value`` overrides, then validation.

``schema.py`` holds capscale's sections (each checks itself); ``loader.py`` the generic
YAML / override / type-checking machinery. Unknown keys and impossible values raise
:class:`ConfigError` naming the field before any model or dataset is loaded; the
rules across sections and the extension tables' names are checked by capscale.checks
(``load_run_config``), which the CLI and the recipe use. The resolved config is written
next to every output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from capscale.config.loader import (
    ConfigError,
    build,
    merge_dicts,
    parse_overrides,
    read_yaml_file,
    save_yaml,
    to_dict,
)
from capscale.config.presets import DATA_PRESETS
from capscale.config.schema import (
    CAPConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    DistributedConfig,
    ExportConfig,
    LossConfig,
    ModelConfig,
    ModuleWeights,
    PruningConfig,
    ReportConfig,
    StructuredConfig,
    TeacherTrainingConfig,
    TrainConfig,
)

PACKAGED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (YAML contents)."""
    data = dict(data or {})
    preset = (data.get("data") or {}).get("preset")
    if preset in DATA_PRESETS:  # preset defaults, then the user's own data keys
        data["data"] = merge_dicts(DATA_PRESETS[preset], data["data"])
    return build(Config, data).validate()


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (a path, or a name in capscale/configs; None: defaults) and
    apply ``key=value`` overrides."""
    data = read_yaml_file(path, PACKAGED_CONFIGS) if path is not None else {}
    return config_from_dict(merge_dicts(data, parse_overrides(overrides or [])))


config_to_dict = to_dict
save_config = save_yaml

__all__ = [
    "DATA_PRESETS",
    "CAPConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "ExportConfig",
    "LossConfig",
    "ModelConfig",
    "ModuleWeights",
    "PruningConfig",
    "ReportConfig",
    "StructuredConfig",
    "TeacherTrainingConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "merge_dicts",
    "parse_overrides",
    "save_config",
]

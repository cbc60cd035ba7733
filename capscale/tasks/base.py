"""The task base class and its table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor, nn

from capscale.errors import ConfigError, DataError
from capscale.registry import add_entry

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from capscale.config import DataConfig


class Task:
    """What capscale needs to know about a task; an entry of :data:`TASKS` subclasses it.

    Attributes:
        name: the ``data.task_type`` that selects it.
        class_labels: whether labels are classes (supervised contrastive terms use them
            as keys; otherwise every label is -1 and only unsupervised terms apply).
        main_metric: the metric reported as "the" score (retained %, summaries).

    Optional capabilities are declared here with the sequence-level default, so every
    caller uses them without asking whether they exist (capscale.tasks.qa overrides
    them all):

    * ``model_class``: the Auto class of the task model (None:
      AutoModelForSequenceClassification); ``architecture_suffix``: the end of a
      fitting checkpoint's architecture name (a teacher is checked against it).
    * ``head_linear``: path of the head's final linear layer in the task model, used
      instead of the adapter's when set (a module with ``in_features`` and no
      parameters, such as the embedding task's normalisation, also serves).
    * ``label_head``: whether the model ends in a head of ``num_labels`` outputs (False
      for sentence embeddings: a teacher's output count is then not checked).
    * :meth:`prepare_splits`: checked examples instead of the text / label column
      checks and ``encode_labels``.
    * :meth:`check_lengths`: what to do with texts longer than ``data.max_length``.
    * :meth:`features`: tokenised datasets instead of one row per example.
    """

    name: str = ""
    class_labels: bool = True
    main_metric: str = ""
    model_class: Any = None
    architecture_suffix: str | None = None
    head_linear: str | None = None
    label_head: bool = True  # a head of num_labels outputs (a teacher's is checked)
    representations: tuple[str, ...] = ("head", "cls", "mean")  # cap.representation
    extra_formats: bool = True  # export.formats beyond pytorch (ONNX, INT8, sparse)

    def label_names(self, cfg: DataConfig, train: datasets.Dataset) -> list[str] | None:
        """The label set (None where labels are not classes)."""
        raise NotImplementedError

    def check_labels(self, values: list[Any], feature: Any) -> tuple[int, str] | None:
        """The first unusable label of a split's label column as read (``feature``: its
        datasets feature) and why, e.g. ``(8, "missing label ('')")``; None: all usable.
        The default accepts every value (:meth:`encode_labels` still checks them)."""
        return None

    def encode_labels(self, ds: datasets.Dataset, cfg: DataConfig,
                      names: list[str] | None, split: str) -> datasets.Dataset:
        """``ds`` with a ``labels`` column; raises DataError naming a bad row."""
        raise NotImplementedError

    def load_model(self, path: str, num_labels: int, label_names: list[str] | None,
                   trust_remote_code: bool = False) -> nn.Module:
        """The encoder with this task's head (a fresh head when the checkpoint has none
        of the right size)."""
        raise NotImplementedError

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The supervised loss of a batch (scalar)."""
        raise NotImplementedError

    def distill(self, student_logits: Tensor, teacher_logits: Tensor,
                temperature: float, labels: Tensor | None = None) -> Tensor:
        """The logit distillation loss of a batch (scalar); ``labels``: the batch's
        labels (token classification distils its labelled positions only)."""
        raise NotImplementedError

    def contrastive_labels(self, labels: Tensor) -> Tensor:
        """(B,) long keys of the supervised contrastive terms (-1: no class)."""
        raise NotImplementedError

    def metrics(self, logits: np.ndarray, labels: np.ndarray, num_labels: int,
                reference: Any = None) -> dict[str, float]:
        """Every metric of the task on the whole evaluation set (``reference``: what
        :meth:`features` returned for the evaluation rows, when it made them)."""
        raise NotImplementedError

    # -- optional capabilities, with the sequence-level default ----------------------
    def prepare_splits(self, train: datasets.Dataset, validation: datasets.Dataset,
                       cfg: DataConfig
                       ) -> tuple[datasets.Dataset, datasets.Dataset, list[str]] | None:
        """(train, validation, notes) as checked examples; None: the default column
        checks and :meth:`encode_labels`."""
        return None

    def check_lengths(self, data: Any, tokenizer: PreTrainedTokenizerBase,
                      cfg: DataConfig, max_positions: int | None = None) -> str | None:
        """Count the texts of ``data`` (a TaskData) longer than ``cfg.max_length`` tokens
        (special tokens included); a note for the log when some will be truncated.
        ``max_positions``: the most tokens the model takes, when known.

        Raises:
            ConfigError: when ``data.max_length`` is more than ``max_positions`` and a
                text is longer than the model takes (its batch would crash the model).
            DataError: when texts are longer and ``data.truncation`` is ``error``.
        """
        counts, first, longest = {}, None, (0, "")
        cache = getattr(data, "cache", None)  # capscale.token_cache: a requeued job's
        for split, ds in (("train", data.train), ("validation", data.validation)):
            def count(ds: datasets.Dataset = ds) -> list[int]:
                texts = list(ds[cfg.text_column])
                pairs = list(ds[cfg.text_pair_column]) if cfg.text_pair_column else None
                return [len(ids) for ids in tokenizer(texts, pairs,
                                                      truncation=False)["input_ids"]]
            lengths = count() if cache is None else cache.lengths(ds, tokenizer, cfg, count)
            over = [i for i, n in enumerate(lengths) if n > cfg.max_length]
            counts[split] = len(over)
            if over and first is None:
                first = f"{split} row {over[0]} has {lengths[over[0]]} tokens"
            top = max(range(len(lengths)), key=lengths.__getitem__, default=None)
            if top is not None and lengths[top] > longest[0]:
                longest = (lengths[top], f"{split} row {top}")
        cut = min(cfg.max_length, longest[0])  # what the model would be given
        if max_positions is not None and cut > max_positions:
            crash = ("which would crash the model" if cut == longest[0] else
                     f"which cut to {cut} would still crash the model")
            raise ConfigError(
                f"data.max_length = {cfg.max_length}: the model's position embeddings take "
                f"at most {max_positions} tokens, and {longest[1]} has {longest[0]}, "
                f"{crash}; lower data.max_length to {max_positions} or less")
        if not any(counts.values()):
            return None
        what = (f"{counts['train']} train and {counts['validation']} validation texts are "
                f"longer than data.max_length = {cfg.max_length} tokens ({first})")
        if cfg.truncation == "error":
            if max_positions is None:
                fix = "raise data.max_length, shorten them"
            elif cfg.max_length < max_positions:
                fix = (f"raise data.max_length (the model takes up to {max_positions} "
                       "tokens), shorten them")
            else:  # already the model's limit: only shorter texts or truncation help
                fix = f"shorten them ({max_positions} tokens is the most the model takes)"
            raise DataError(f"{what}; {fix}, or set data.truncation=truncate")
        return f"{what}: truncated"

    def features(self, data: Any, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
                 ) -> tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset, Any] | None:
        """(train rows, bank rows: one per training example, eval rows, eval reference)
        made by the task (QA: token windows); None: one tokenised row per example."""
        return None


def over_length(over: int, first: str | None, noun: str, cfg: DataConfig, fix: str,
                note: str = "truncated") -> str | None:
    """The log note for ``over`` texts longer than ``data.max_length`` (``first``: where
    the first is), or None when there are none; DataError (``fix`` suggested) under
    ``data.truncation: error``."""
    if not over:
        return None
    what = f"{over} {noun} are longer than data.max_length = {cfg.max_length} ({first})"
    if cfg.truncation == "error":
        raise DataError(f"{what}; {fix}, or set data.truncation=truncate")
    return f"{what}: {note}"


TASKS: dict[str, Any] = {}


def register_task(task: Task, overwrite: bool = False) -> Task:
    """Add ``task`` to the table under ``task.name`` (``data.task_type`` selects it)."""
    if not isinstance(task, Task):
        raise TypeError(f"{task!r} is not a capscale.tasks.Task (subclass it, or one of "
                        "the built-in tasks)")
    return add_entry(TASKS, task.name, task, "task", overwrite)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"no task {name!r}; registered: {', '.join(sorted(TASKS))}")
    return TASKS[name]

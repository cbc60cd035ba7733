"""The task protocol and its table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from torch import Tensor, nn

from capscale.registry import add_entry

if TYPE_CHECKING:
    import datasets

    from capscale.config import DataConfig


@runtime_checkable
class Task(Protocol):
    """What capscale needs to know about a task.

    Attributes:
        name: the ``data.task_type`` that selects it.
        class_labels: whether labels are classes (supervised contrastive terms use them
            as keys; otherwise every label is -1 and only unsupervised terms apply).
        main_metric: the metric reported as "the" score (retained %, summaries).

    Optional members, looked up with ``getattr`` (a task without them gets the
    sequence-level behaviour; capscale.tasks.qa has them all):

    * ``model_class``: the Auto class of the task model (default
      AutoModelForSequenceClassification); ``architecture_suffix``: the end of a
      fitting checkpoint's architecture name (a teacher is checked against it).
    * ``head_linear``: path of the head's final linear layer in the task model, used
      instead of the adapter's when the model has it.
    * ``prepare_splits(train, validation, cfg) -> (train, validation, notes)``: checked
      examples instead of the text / label column checks and ``encode_labels``.
    * ``check_lengths(data, tokenizer, cfg) -> note``: instead of the truncation count.
    * ``features(data, tokenizer, cfg) -> (train, bank, eval, eval_reference)``:
      tokenised datasets instead of one row per example; the bank set has one row per
      training example; ``eval_reference`` is handed to ``metrics(..., reference=)``.
    """

    name: str
    class_labels: bool
    main_metric: str

    def label_names(self, cfg: DataConfig, train: datasets.Dataset) -> list[str] | None:
        """The label set (None where labels are not classes)."""
        ...

    def encode_labels(self, ds: datasets.Dataset, cfg: DataConfig,
                      names: list[str] | None, split: str) -> datasets.Dataset:
        """``ds`` with a ``labels`` column; raises DataError naming a bad row."""
        ...

    def load_model(self, path: str, num_labels: int, label_names: list[str] | None,
                   trust_remote_code: bool = False) -> nn.Module:
        """The encoder with this task's head (a fresh head when the checkpoint has none
        of the right size)."""
        ...

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The supervised loss of a batch (scalar)."""
        ...

    def distill(self, student_logits: Tensor, teacher_logits: Tensor,
                temperature: float) -> Tensor:
        """The logit distillation loss of a batch (scalar)."""
        ...

    def contrastive_labels(self, labels: Tensor) -> Tensor:
        """(B,) long keys of the supervised contrastive terms (-1: no class)."""
        ...

    def metrics(self, logits: np.ndarray, labels: np.ndarray, num_labels: int
                ) -> dict[str, float]:
        """Every metric of the task on the whole evaluation set."""
        ...


TASKS: dict[str, Any] = {}


def register_task(task: Task, overwrite: bool = False) -> Task:
    """Add ``task`` to the table under ``task.name`` (``data.task_type`` selects it)."""
    if not isinstance(task, Task):
        raise TypeError(f"{task!r} does not implement capscale.tasks.Task")
    return add_entry(TASKS, task.name, task, "task", overwrite)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"no task {name!r}; registered: {', '.join(sorted(TASKS))}")
    return TASKS[name]

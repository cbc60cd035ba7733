"""Sequence-level tasks: classification (CE, KL distillation, accuracy / F1 / MCC) and
regression (MSE, MSE distillation, Pearson / Spearman), both on
``AutoModelForSequenceClassification``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel

from capscale.errors import DataError
from capscale.tasks.base import Task
from capscale.tasks.metrics import accuracy, f1, matthews, pearson, spearman

if TYPE_CHECKING:
    from capscale.config import DataConfig


def load_sequence_model(path: str, num_labels: int, label_names: list[str] | None,
                        trust_remote_code: bool = False) -> PreTrainedModel:
    """An encoder with a sequence-level head of ``num_labels`` outputs.

    A checkpoint whose head has another size (e.g. a pre-trained encoder) gets a fresh
    head; a *teacher* must match, which ``capscale.models.loading.check_teacher`` verifies.
    """
    config = AutoConfig.from_pretrained(path, num_labels=num_labels,
                                        trust_remote_code=trust_remote_code)
    if label_names:
        config.id2label = dict(enumerate(label_names))
        config.label2id = {n: i for i, n in enumerate(label_names)}
    config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    return AutoModelForSequenceClassification.from_pretrained(
        path, config=config, ignore_mismatched_sizes=True, trust_remote_code=trust_remote_code)


def _missing(value: Any) -> str:
    """How a missing label cell reads in a message."""
    if value is None:  # pandas reads an empty CSV cell, NA, null, None, nan so
        return "an empty cell, or NA / null / None / nan in a CSV"
    return repr(value)


class ClassificationTask(Task):
    """One label per text (pair) out of a fixed set."""

    name = "classification"
    class_labels = True
    main_metric = "accuracy"

    def label_names(self, cfg: DataConfig, train: datasets.Dataset) -> list[str] | None:
        if cfg.label_names:
            return list(cfg.label_names)
        feat = train.features.get(cfg.label_column)
        if isinstance(feat, datasets.ClassLabel):
            return list(feat.names)
        values = set(train[cfg.label_column])
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        # Numbers in numeric order (0, 1, 2, 10), anything else in string order.
        return [str(v) for v in sorted(values, key=(lambda v: v) if numeric else str)]

    def check_labels(self, values: list[Any], feature: Any) -> tuple[int, str] | None:
        """An empty cell (None, blank, NaN; -1 in a ClassLabel column, a hub test split's
        "no label") is refused: it would otherwise become a class of its own."""
        class_label = isinstance(feature, datasets.ClassLabel)
        for i, v in enumerate(values):
            if (v is None or (isinstance(v, str) and not v.strip())
                    or (isinstance(v, float) and math.isnan(v))
                    or (class_label and isinstance(v, int) and v < 0)):
                return i, f"missing label ({_missing(v)})"
        return None

    def encode_labels(self, ds: datasets.Dataset, cfg: DataConfig,
                      names: list[str] | None, split: str) -> datasets.Dataset:
        assert names is not None
        index = {n: i for i, n in enumerate(names)}
        class_label = isinstance(ds.features.get(cfg.label_column), datasets.ClassLabel)
        out = []
        for i, v in enumerate(ds[cfg.label_column]):
            if class_label:  # already integer classes: only the range can be wrong
                idx = v if isinstance(v, int) and 0 <= v < len(names) else None
            else:
                idx = index.get(str(v))
            if idx is None:
                raise DataError(f"{split} row {i}: label {v!r} is not in the label set "
                                f"{names}; fix the row or set data.label_names")
            out.append(int(idx))
        return ds.add_column("labels", out)

    def load_model(self, path: str, num_labels: int, label_names: list[str] | None,
                   trust_remote_code: bool = False) -> PreTrainedModel:
        return load_sequence_model(path, num_labels, label_names, trust_remote_code)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), labels)

    def distill(self, student_logits: Tensor, teacher_logits: Tensor,
                temperature: float, labels: Tensor | None = None) -> Tensor:
        """``T^2 * KL(softmax(t/T) || softmax(s/T))``, batch mean (Hinton et al., 2015)."""
        t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        s = F.log_softmax(student_logits.float() / temperature, dim=-1)
        return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2

    def contrastive_labels(self, labels: Tensor) -> Tensor:
        return labels.long()

    def metrics(self, logits: np.ndarray, labels: np.ndarray, num_labels: int,
                reference: Any = None) -> dict[str, float]:
        pred, gold = logits.argmax(-1), labels.astype(np.int64)
        return {"accuracy": accuracy(pred, gold), "f1": f1(pred, gold, num_labels),
                "matthews": matthews(pred, gold, num_labels)}


class RegressionTask(ClassificationTask):
    """One real-valued score per text (pair), e.g. STS-B."""

    name = "regression"
    class_labels = False
    main_metric = "pearson"

    def label_names(self, cfg: DataConfig, train: datasets.Dataset) -> list[str] | None:
        return None

    def check_labels(self, values: list[Any], feature: Any) -> tuple[int, str] | None:
        """Every target a finite number. Empty cells first, then text that is not a number
        (one such cell makes a CSV column text: the numbers in it are named only when
        nothing else is wrong), then NaN / infinity."""
        def empty(v: Any) -> bool:
            return v is None or (isinstance(v, str) and not v.strip())

        def number(v: Any) -> float | None:
            if isinstance(v, bool):
                return None
            try:
                return float(v)
            except (TypeError, ValueError):
                return None
        checks = [(empty, "missing regression label ({})"),
                  (lambda v: number(v) is None, "regression label {} is not a number"),
                  (lambda v: isinstance(v, str), "regression label {} is text, not a "
                   "number"),
                  (lambda v: not math.isfinite(number(v) or 0.0),
                   "regression label {} is not a finite number")]
        for test, why in checks:
            bad = next((i for i, v in enumerate(values) if test(v)), None)
            if bad is not None:
                value = values[bad]
                return bad, why.format(_missing(value) if empty(value) else repr(value))
        return None

    def encode_labels(self, ds: datasets.Dataset, cfg: DataConfig,
                      names: list[str] | None, split: str) -> datasets.Dataset:
        values = ds[cfg.label_column]
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
                raise DataError(f"{split} row {i}: regression label {v!r} is not a number")
        return ds.add_column("labels", [float(v) for v in values])

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())

    def distill(self, student_logits: Tensor, teacher_logits: Tensor,
                temperature: float, labels: Tensor | None = None) -> Tensor:
        """Mean squared error between the two predictions (no temperature)."""
        return F.mse_loss(student_logits.float(), teacher_logits.float())

    def contrastive_labels(self, labels: Tensor) -> Tensor:
        return torch.full_like(labels, -1, dtype=torch.long)

    def metrics(self, logits: np.ndarray, labels: np.ndarray, num_labels: int,
                reference: Any = None) -> dict[str, float]:
        pred, gold = logits.reshape(-1).astype(np.float64), labels.astype(np.float64)
        return {"pearson": pearson(pred, gold), "spearman": spearman(pred, gold)}

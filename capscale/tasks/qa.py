"""Extractive question answering (SQuAD v1.1 / v2) on ``AutoModelForQuestionAnswering``.

The model's start and end logits travel through capscale stacked as one ``(B, L, 2)``
tensor (capscale.models.loading.output_logits); a window's labels are its ``(start, end)``
token positions. What is computed (docs/algorithm.md, "Extractive QA"):

* loss: the mean of the cross-entropies of the start and of the end position;
* distillation: the mean over start and end of ``T^2 * KL(softmax(t/T) ||
  softmax(s/T))`` over the positions of each window (Sanh et al. 2020's SQuAD KD, which
  CAP's reference code uses);
* no class labels: only the unsupervised contrastive terms apply (a supervised weight
  is refused by the config rules), on the first token's last-layer state;
* metrics: the official SQuAD exact match and F1 (percent) after decoding the best span
  of each example over all its windows (capscale.tasks.qa_metrics).

The data side (SQuAD files, checks, windows, one bank row per example) is
capscale.tasks.qa_data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoConfig, AutoModelForQuestionAnswering, PreTrainedModel

from capscale.errors import ConfigError
from capscale.tasks.base import Task
from capscale.tasks.qa_data import (
    QAEvalReference,
    check_examples,
    drop_long_questions,
    qa_features,
)
from capscale.tasks.qa_metrics import best_answers, squad_scores

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from capscale.config import DataConfig


class QuestionAnsweringTask(Task):
    """Extractive QA: a start and an end position per question (see module docstring).

    It overrides every optional capability of :class:`~capscale.tasks.Task`:
    ``prepare_splits`` (checked examples instead of labels), ``check_lengths``
    (questions too long for a window), ``features`` (token windows, the bank's windows
    and the decoding reference), ``model_class`` / ``architecture_suffix`` (the head), and
    ``head_linear`` (where the ``head`` representation is read).
    """

    name = "qa"
    class_labels = False
    main_metric = "f1"
    model_class = AutoModelForQuestionAnswering
    architecture_suffix = "ForQuestionAnswering"
    head_linear = "qa_outputs"

    # -- data --------------------------------------------------------------------------
    def prepare_splits(self, train: datasets.Dataset, validation: datasets.Dataset,
                       cfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset,
                                                 list[str]]:
        """Both splits as checked examples (capscale.tasks.qa_data.check_examples)."""
        train, n_train = check_examples(train, cfg, "train")
        validation, n_val = check_examples(validation, cfg, "validation")
        return train, validation, [n for n in (n_train, n_val) if n]

    def check_lengths(self, data: Any, tokenizer: PreTrainedTokenizerBase,
                      cfg: DataConfig, max_positions: int | None = None) -> str | None:
        """Drop the questions too long for a window from both splits of ``data`` (a
        TaskData), numbering the training examples again; a note when any were. Windows
        fill ``data.max_length`` tokens: more than ``max_positions`` is a ConfigError."""
        if max_positions is not None and cfg.max_length > max_positions:
            raise ConfigError(f"data.max_length = {cfg.max_length}: the model's position "
                              f"embeddings take at most {max_positions} tokens, and QA "
                              "windows fill data.max_length; lower data.max_length to "
                              f"{max_positions} or less")
        notes = []
        data.train, note = drop_long_questions(data.train, tokenizer, cfg, "train")
        notes.append(note)
        data.validation, note = drop_long_questions(data.validation, tokenizer, cfg,
                                                    "validation")
        notes.append(note)
        data.train = data.train.remove_columns("example_id").add_column(
            "example_id", list(range(len(data.train))))
        return "; ".join(n for n in notes if n) or None

    def features(self, data: Any, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
                 ) -> tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset,
                            QAEvalReference]:
        """(training windows, one window per training example for the banks,
        evaluation windows, the decoding reference of the evaluation windows)."""
        train, bank, _ = qa_features(data.train, tokenizer, cfg, train=True)
        evaluation, _, ref = qa_features(data.validation, tokenizer, cfg, train=False)
        assert bank is not None and ref is not None
        if len(bank) != len(data.train):
            raise RuntimeError(f"{len(bank)} representative windows for "
                               f"{len(data.train)} training examples")
        return train, bank, evaluation, ref

    def label_names(self, cfg: DataConfig, train: datasets.Dataset) -> list[str] | None:
        """Two outputs per token, the start and the end score (``config.num_labels``)."""
        return ["start", "end"]

    def encode_labels(self, ds: datasets.Dataset, cfg: DataConfig,
                      names: list[str] | None, split: str) -> datasets.Dataset:
        """Checked examples; the labels are token positions, set per window later."""
        return check_examples(ds, cfg, split)[0]

    # -- model -------------------------------------------------------------------------
    def load_model(self, path: str, num_labels: int, label_names: list[str] | None,
                   trust_remote_code: bool = False) -> PreTrainedModel:
        """An encoder with a span head (a fresh one when the checkpoint has none)."""
        config = AutoConfig.from_pretrained(path, num_labels=2,
                                            trust_remote_code=trust_remote_code)
        return AutoModelForQuestionAnswering.from_pretrained(
            path, config=config, ignore_mismatched_sizes=True,
            trust_remote_code=trust_remote_code)

    # -- objective ---------------------------------------------------------------------
    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean of the start and end cross-entropies; ``logits`` (B, L, 2), ``labels``
        (B, 2) token positions."""
        logits = logits.float()
        return (F.cross_entropy(logits[..., 0], labels[:, 0].long())
                + F.cross_entropy(logits[..., 1], labels[:, 1].long())) / 2

    def distill(self, student_logits: Tensor, teacher_logits: Tensor,
                temperature: float, labels: Tensor | None = None) -> Tensor:
        """Mean over start and end of ``T^2 * KL(softmax(t/T) || softmax(s/T))``."""
        t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
        s = F.log_softmax(student_logits.float() / temperature, dim=1)
        kl = [F.kl_div(s[..., i], t[..., i], log_target=True, reduction="batchmean")
              for i in (0, 1)]
        return (kl[0] + kl[1]) / 2 * temperature**2

    def contrastive_labels(self, labels: Tensor) -> Tensor:
        return torch.full((labels.shape[0],), -1, dtype=torch.long, device=labels.device)

    # -- metrics -----------------------------------------------------------------------
    def metrics(self, logits: np.ndarray, labels: np.ndarray, num_labels: int,
                reference: QAEvalReference | None = None) -> dict[str, float]:
        """SQuAD exact match and F1 (percent) of the decoded answers.

        Args:
            logits: (F, L, 2) of every evaluation window, in the windows' order.
            labels: (F, 2) their token labels (unused: answers are scored as text).
            num_labels: unused.
            reference: the windows' offsets, the examples' contexts and answers, and the
                decoding settings (``data.qa``).
        """
        if reference is None:
            raise ValueError("QA metrics need the evaluation windows' reference "
                             "(capscale.data.Loaders.eval_reference)")
        q = reference.settings
        texts = best_answers(logits[..., 0], logits[..., 1], reference.offsets,
                             reference.feature_example, reference.contexts,
                             reference.cls_index, q.n_best, q.max_answer_length,
                             q.version_2_with_negative, q.null_score_threshold)
        return squad_scores(dict(zip(reference.ids, texts)),
                            dict(zip(reference.ids, reference.answers)))

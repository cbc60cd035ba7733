"""Token classification (``data.task_type: token_classification``): NER, PII tagging,
on ``AutoModelForTokenClassification``.

Data: one sentence per example, its words in ``data.text_column`` and one tag per word
in ``data.label_column`` (lists; CoNLL-style ``.conll`` / ``.txt`` files are read into
``tokens`` / ``ner_tags``, capscale.tasks.corpora). Tags are strings (the label set is
``data.label_names``, else the training tags sorted) or the integer classes of a
datasets ``ClassLabel`` column. Words are tokenised into sub-tokens
(``is_split_into_words``, a fast tokenizer); a word's tag labels its first sub-token,
the other sub-tokens and the special tokens get ``IGNORE_INDEX`` (-100).

Objective (docs/algorithm.md, "Token classification"): cross-entropy over the labelled
sub-tokens; distillation ``T^2 * KL(softmax(t/T) || softmax(s/T))`` per token, averaged
over the labelled sub-tokens; the contrastive terms read the first token's last-layer
state as the sentence's representation (the input of the token head at position 0),
unsupervised only.

Metrics: entity-level precision, recall and F1 (micro-averaged over entity types, the
CoNLL-2000 ``conlleval`` chunk definition that seqeval's default mode follows: a chunk
starts at ``B-X``, or at ``I-X`` after anything but a ``B-X`` / ``I-X``), and
accuracy over the labelled words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoConfig, AutoModelForTokenClassification, PreTrainedModel

from capscale.errors import DataError
from capscale.tasks.base import Task, over_length
from capscale.tasks.collective import global_mean

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from capscale.config import DataConfig

IGNORE_INDEX = -100


@dataclass
class TagReference:
    """What the metrics need beside the logits: the tag names and every evaluation
    sentence's tags per word (indices)."""

    names: list[str]
    tags: list[list[int]]


def entity_spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, first, last) of the chunks of one sentence's IOB1 / IOB2 tags."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, name = tag.partition("-")
        begins = prefix == "B" or (prefix == "I" and (kind != name or start is None))
        if start is not None and (prefix == "O" or begins or name != kind):
            spans.add((str(kind), start, i - 1))
            start, kind = None, None
        if prefix in ("B", "I") and begins:
            start, kind = i, name
    return spans


def entity_scores(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Micro precision / recall / F1 of predicted entity chunks against gold ones."""
    tp = n_pred = n_gold = 0
    for g, p in zip(gold, pred, strict=True):
        gs, ps = entity_spans(g), entity_spans(p)
        tp += len(gs & ps)
        n_pred += len(ps)
        n_gold += len(gs)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


class TokenClassificationTask(Task):
    """Tags per word (see the module docstring)."""

    name = "token_classification"
    class_labels = False
    main_metric = "f1"
    model_class = AutoModelForTokenClassification
    architecture_suffix = "ForTokenClassification"
    head_linear = "classifier"
    extra_formats = False

    # -- data --------------------------------------------------------------------------
    def label_names(self, cfg: DataConfig, train: datasets.Dataset) -> list[str] | None:
        if cfg.label_names:
            return list(cfg.label_names)
        column = cfg.label_column if cfg.label_column in train.column_names else "tags"
        feat = train.features.get(column)  # "tags": a prepared split's ClassLabel
        inner = getattr(feat, "feature", None)
        if isinstance(inner, datasets.ClassLabel):
            return list(inner.names)
        return sorted({str(t) for tags in train[cfg.label_column] for t in tags})

    def prepare_splits(self, train: datasets.Dataset, validation: datasets.Dataset,
                       cfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset,
                                                 list[str]]:
        """Both splits checked (words, tags, their counts) and their tags as indices."""
        for ds, split in ((train, "train"), (validation, "validation")):
            for col in (cfg.text_column, cfg.label_column):
                if col not in ds.column_names:
                    raise DataError(f"{split} data has no column {col!r} (columns: "
                                    f"{', '.join(ds.column_names)}); set data.text_column "
                                    "(the words) / data.label_column (their tags)")
            self._check_rows(ds, cfg, split)
        names = self.label_names(cfg, train)
        assert names is not None
        if len(names) < 2:
            raise DataError(f"token classification needs at least 2 tags, found {names}")
        return (self.encode_labels(train, cfg, names, "train"),
                self.encode_labels(validation, cfg, names, "validation"), [])

    def encode_labels(self, ds: datasets.Dataset, cfg: DataConfig,
                      names: list[str] | None, split: str) -> datasets.Dataset:
        """``words`` and per-word ``tags`` (indices); DataError naming a bad row."""
        assert names is not None
        self._check_rows(ds, cfg, split)
        index = {n: i for i, n in enumerate(names)}
        inner = getattr(ds.features.get(cfg.label_column), "feature", None)
        class_label = isinstance(inner, datasets.ClassLabel)
        words_out, tags_out = [], []
        for i, (words, tags) in enumerate(zip(ds[cfg.text_column], ds[cfg.label_column])):
            ids = []
            for j, t in enumerate(tags):
                k = (t if isinstance(t, int) and 0 <= t < len(names) else None) \
                    if class_label else index.get(str(t))
                if k is None:
                    raise DataError(f"{split} row {i}: tag {t!r} of word {j} ({words[j]!r}) "
                                    f"is not in the tag set {names}; fix the row or set "
                                    "data.label_names")
                ids.append(int(k))
            words_out.append(list(words))
            tags_out.append(ids)
        features = datasets.Features({
            "words": datasets.Sequence(datasets.Value("string")),
            "tags": datasets.Sequence(datasets.ClassLabel(names=list(names)))})
        return datasets.Dataset.from_dict({"words": words_out, "tags": tags_out},
                                          features=features)

    @staticmethod
    def _check_rows(ds: datasets.Dataset, cfg: DataConfig, split: str) -> None:
        """Every row a non-empty list of words with one tag each."""
        for i, (words, tags) in enumerate(zip(ds[cfg.text_column], ds[cfg.label_column])):
            where = f"{split} row {i}"
            if not isinstance(words, list) or not words:
                raise DataError(f"{where}: column {cfg.text_column!r} holds no words "
                                f"({words!r}); drop the empty sentence")
            if not isinstance(tags, list) or len(tags) != len(words):
                n = len(tags) if isinstance(tags, list) else "no"
                raise DataError(f"{where}: {len(words)} words but {n} tags in column "
                                f"{cfg.label_column!r}; the two must align one to one")
            bad = next((j for j, w in enumerate(words)
                        if not isinstance(w, str) or not w.strip()), None)
            if bad is not None:
                raise DataError(f"{where}: word {bad} is empty or not text "
                                f"({words[bad]!r})")

    def check_lengths(self, data: Any, tokenizer: PreTrainedTokenizerBase,
                      cfg: DataConfig, max_positions: int | None = None) -> str | None:
        """Sentences longer than ``data.max_length`` sub-tokens: the words past the cut
        go unlabelled and unscored (counted), or are refused under
        ``data.truncation: error``."""
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("token classification aligns tags to sub-tokens with a fast "
                            "tokenizer (word_ids); this model's tokenizer is not one")
        over, first = 0, None
        for split, ds in (("train", data.train), ("validation", data.validation)):
            enc = tokenizer(list(ds["words"]), is_split_into_words=True, truncation=False)
            long = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) > cfg.max_length]
            over += len(long)
            if long and first is None:
                first = f"{split} row {long[0]} has {len(enc['input_ids'][long[0]])} tokens"
        return over_length(over, first, "sentences", cfg, "raise data.max_length",
                           "truncated (the words past the cut are not scored)")

    def features(self, data: Any, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
                 ) -> tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset,
                            TagReference]:
        """Tokenised sentences with per-sub-token labels; the evaluation reference holds
        the tag names and each validation sentence's tags (every word, truncated ones
        included)."""
        train = self.tokenize(data.train, tokenizer, cfg)
        return (train, train, self.tokenize(data.validation, tokenizer, cfg),
                TagReference(list(data.label_names), list(data.validation["tags"])))

    @staticmethod
    def tokenize(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
                 cfg: DataConfig) -> datasets.Dataset:
        def enc(batch: dict[str, list]) -> dict[str, list]:
            out = tokenizer(batch["words"], is_split_into_words=True, truncation=True,
                            max_length=cfg.max_length)
            labels = []
            for i, tags in enumerate(batch["tags"]):
                row, last = [], None
                for w in out.word_ids(i):
                    row.append(IGNORE_INDEX if w is None or w == last else tags[w])
                    last = w
                labels.append(row)
            return {**out, "labels": labels}
        keep = {"example_id"}
        return ds.map(enc, batched=True, remove_columns=[
            c for c in ds.column_names if c not in keep]).with_format("torch")

    # -- model -------------------------------------------------------------------------
    def load_model(self, path: str, num_labels: int, label_names: list[str] | None,
                   trust_remote_code: bool = False) -> PreTrainedModel:
        config = AutoConfig.from_pretrained(path, num_labels=num_labels,
                                            trust_remote_code=trust_remote_code)
        if label_names:
            config.id2label = dict(enumerate(label_names))
            config.label2id = {n: i for i, n in enumerate(label_names)}
        return AutoModelForTokenClassification.from_pretrained(
            path, config=config, ignore_mismatched_sizes=True,
            trust_remote_code=trust_remote_code)

    # -- objective ---------------------------------------------------------------------
    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy over the labelled sub-tokens of every rank's batch: ``logits``
        (B, L, C), ``labels`` (B, L) (capscale.tasks.collective.global_mean)."""
        flat = labels.long().flatten()
        ce = F.cross_entropy(logits.float().flatten(0, 1), flat, ignore_index=IGNORE_INDEX,
                             reduction="sum")
        return global_mean(ce, int((flat != IGNORE_INDEX).sum()))

    def distill(self, student_logits: Tensor, teacher_logits: Tensor,
                temperature: float, labels: Tensor | None = None) -> Tensor:
        """``T^2 * KL(softmax(t/T) || softmax(s/T))`` per sub-token, averaged over the
        labelled sub-tokens of every rank's batch (every position without ``labels``)."""
        t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, 1)
        s = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, 1)
        kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
        if labels is not None:
            kl = kl[labels.flatten() != IGNORE_INDEX]
        return global_mean(kl.sum(), kl.numel()) * temperature**2

    def contrastive_labels(self, labels: Tensor) -> Tensor:
        return torch.full((labels.shape[0],), -1, dtype=torch.long, device=labels.device)

    # -- metrics -----------------------------------------------------------------------
    def metrics(self, logits: np.ndarray, labels: np.ndarray, num_labels: int,
                reference: Any = None) -> dict[str, float]:
        """Entity precision / recall / F1 and word accuracy.

        Args:
            logits: (N, L, C) of every evaluation sentence.
            labels: (N, L) its sub-token labels (``IGNORE_INDEX`` off first sub-tokens).
            num_labels: unused.
            reference: the tag names and the sentences' tags per word (words cut by
                truncation count as predicted ``O``).
        """
        if reference is None:
            raise ValueError("token classification metrics need the tag names and the "
                             "sentences' tags (capscale.data.Loaders.eval_reference)")
        names = reference.names
        pred_ids = logits.argmax(-1)
        gold, pred = [], []
        for n in range(len(labels)):
            keep = labels[n] != IGNORE_INDEX
            p = pred_ids[n][keep].tolist()
            g = list(reference.tags[n])
            p = p + [-1] * (len(g) - len(p))  # truncated words: predicted "O"
            gold.append(g)
            pred.append(p)
        flat_g = np.array([x for g in gold for x in g])
        flat_p = np.array([x for p in pred for x in p])

        def tags(seq: list[int]) -> list[str]:
            return [names[i] if i >= 0 else "O" for i in seq]
        scores = entity_scores([tags(g) for g in gold], [tags(p) for p in pred])
        return {**scores, "accuracy": float((flat_g == flat_p).mean()) if len(flat_g) else 0.0}

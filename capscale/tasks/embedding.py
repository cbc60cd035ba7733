"""Sentence embeddings (``data.task_type: embedding``): STS pairs, retrieval pairs and
triples, or a plain text corpus, on a :class:`~capscale.tasks.embedding_model.SentenceEmbedder`.

Data. Each example holds one to three texts: ``data.text_column`` (the anchor),
``data.text_pair_column`` (its pair: an STS sentence, a retrieval positive) and
``data.text_negative_column`` (a hard negative), each optional beyond the first where a
split lacks the column; and a similarity score in ``data.label_column`` when the split
has one. The texts are tokenised separately and batched as ``(B, k, L)``; the model's
"logits" are the ``(B, k, H)`` embeddings. The validation split must be scored pairs.

Objective (docs/algorithm.md, "Sentence embeddings"):

* supervised loss (``loss.w_ce``): CoSENT (Su, 2022) on scored pairs, ``log(1 + sum
  over pairs (i, j) with s_i > s_j of exp(lambda (cos_j - cos_i)))``, lambda = 20;
  MultipleNegativesRanking (Henderson et al., 2017) on unscored pairs / triples, the
  anchor's positive scored against every positive and negative of the global batch
  (scale 20); nothing on single texts. Both gather the batch over ranks with a
  gradient-carrying all-gather, so a world of W ranks computes the loss of the W-times
  larger batch;
* distillation (``loss.w_kd``): the dense teacher's embeddings as targets, the mean
  over texts of ``||e_s - e_t||^2`` (``2 (1 - cos)`` for normalised embeddings);
* contrastive terms: PrC / FiC / SnC on the anchor text's embedding (the input of
  the embedding head), unsupervised only (no classes).

Metrics: Spearman and Pearson correlation of the pairs' cosine similarity with their
scores (STS), and retrieval over the pairs scored at least ``RETRIEVAL_MIN_SCORE`` (all
pairs when the scores are constant): each anchor retrieves its pair among those
pairs' second texts by cosine, ``recall@1``, ``recall@10`` and ``mrr@10``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from capscale.errors import DataError
from capscale.tasks.base import Task, over_length
from capscale.tasks.collective import gather_with_grad, rank_offset
from capscale.tasks.embedding_model import SentenceEmbedder
from capscale.tasks.metrics import pearson, spearman

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from capscale.config import DataConfig

COSENT_SCALE = 20.0
MNRL_SCALE = 20.0
RETRIEVAL_MIN_SCORE = 4.0  # STS-B: "mostly equivalent" and above
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def text_columns(cfg: DataConfig) -> list[str]:
    """The configured text columns, anchor first."""
    return [c for c in (cfg.text_column, cfg.text_pair_column, cfg.text_negative_column) if c]


def cosent(cos: Tensor, scores: Tensor) -> Tensor:
    """CoSENT loss of (N,) cosines against (N,) gold scores."""
    diff = COSENT_SCALE * (cos[None, :] - cos[:, None])  # [i, j] = cos_j - cos_i
    ordered = scores[:, None] > scores[None, :]           # pairs with s_i > s_j
    terms = diff[ordered]
    return torch.logsumexp(torch.cat([terms.new_zeros(1), terms]), dim=0)


def multiple_negatives(emb: Tensor) -> Tensor:
    """MultipleNegativesRanking loss of (B, k, H) anchors / positives / negatives, the
    candidates gathered over ranks."""
    anchors = F.normalize(emb[:, 0], dim=-1)
    cands = F.normalize(gather_with_grad(torch.cat([emb[:, 1]] + [emb[:, i] for i in
                                                         range(2, emb.shape[1])])), dim=-1)
    b = emb.shape[0]
    world_b = cands.shape[0] // (emb.shape[1] - 1)
    # Gathered layout: per rank, its positives then its negatives.
    per_rank = cands.view(world_b // b, emb.shape[1] - 1, b, -1)
    cands = per_rank.permute(1, 0, 2, 3).reshape(-1, emb.shape[-1])  # positives first
    target = torch.arange(b, device=emb.device) + rank_offset(b)
    return F.cross_entropy(MNRL_SCALE * anchors @ cands.T, target)


def retrieval_scores(queries: np.ndarray, corpus: np.ndarray) -> dict[str, float]:
    """recall@1, recall@10 and mrr@10 of query i retrieving corpus row i (cosine; a
    tie with the gold row counts in its favour)."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True).clip(1e-12)
    c = corpus / np.linalg.norm(corpus, axis=1, keepdims=True).clip(1e-12)
    sims = q @ c.T
    gold = np.diag(sims)
    rank = (sims > gold[:, None]).sum(1) + 1
    return {"recall@1": float((rank <= 1).mean()), "recall@10": float((rank <= 10).mean()),
            "mrr@10": float(np.where(rank <= 10, 1.0 / rank, 0.0).mean())}


class EmbeddingTask(Task):
    """Sentence embeddings (see the module docstring)."""

    name = "embedding"
    class_labels = False
    main_metric = "spearman"
    model_class = SentenceEmbedder
    architecture_suffix = None
    head_linear = "embedding_head"
    label_head = False
    representations = ("head",)
    extra_formats = False

    # -- data --------------------------------------------------------------------------
    def prepare_splits(self, train: datasets.Dataset, validation: datasets.Dataset,
                       cfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset,
                                                 list[str]]:
        """Both splits checked and reduced to their text columns and ``labels``; the
        validation split must hold scored pairs."""
        train, note, _ = self._split(train, cfg, "train")
        validation, _, scored = self._split(validation, cfg, "validation")
        if not scored:
            raise DataError("embedding: the validation split must hold scored pairs "
                            f"(columns {cfg.text_column!r}, {cfg.text_pair_column!r} and "
                            f"{cfg.label_column!r}) to be evaluated")
        return train, validation, [note]

    def _split(self, ds: datasets.Dataset, cfg: DataConfig, split: str
               ) -> tuple[datasets.Dataset, str, bool]:
        """The split's text columns and ``labels`` (NaN where unscored), a note, and
        whether it is scored pairs."""
        if cfg.text_column not in ds.column_names:
            raise DataError(f"{split} data has no column {cfg.text_column!r} (columns: "
                            f"{', '.join(ds.column_names)}); set data.text_column")
        cols = [c for c in text_columns(cfg) if c in ds.column_names]
        if cfg.text_negative_column in cols and cfg.text_pair_column not in cols:
            raise DataError(f"{split} data has a negative column "
                            f"{cfg.text_negative_column!r} but no pair column "
                            f"{cfg.text_pair_column!r}")
        for col in cols:
            for i, t in enumerate(ds[col]):
                if not isinstance(t, str) or not t.strip():
                    raise DataError(f"{split} row {i}: column {col!r} is empty or not "
                                    f"text ({t!r}); clean the data or drop the row")
        # A split read with another file's columns has the score column all empty.
        scored = (cfg.label_column in ds.column_names and len(cols) >= 2
                  and any(v is not None for v in ds[cfg.label_column]))
        labels = [math.nan] * len(ds)
        if scored:
            labels = []
            for i, v in enumerate(ds[cfg.label_column]):
                try:
                    x = float(v)
                except (TypeError, ValueError):
                    x = math.nan
                if isinstance(v, bool) or not math.isfinite(x):
                    raise DataError(f"{split} row {i}: similarity score {v!r} in column "
                                    f"{cfg.label_column!r} is not a finite number")
                labels.append(x)
        out = ds.select_columns(cols).add_column("labels", labels)
        what = {1: "single texts", 2: "pairs", 3: "triples"}[len(cols)]
        note = f"embedding {split}: {len(out)} {what}{', scored' if scored else ''}"
        return out, note, scored

    def check_lengths(self, data: Any, tokenizer: PreTrainedTokenizerBase,
                      cfg: DataConfig, max_positions: int | None = None) -> str | None:
        """Texts (each tokenised alone) longer than ``data.max_length`` are truncated, or
        refused under ``data.truncation: error``."""
        over, first = 0, None
        for split, ds in (("train", data.train), ("validation", data.validation)):
            for col in (c for c in text_columns(cfg) if c in ds.column_names):
                ids = tokenizer(list(ds[col]), truncation=False)["input_ids"]
                long = [i for i, x in enumerate(ids) if len(x) > cfg.max_length]
                over += len(long)
                if long and first is None:
                    first = f"{split} row {long[0]} column {col!r} has {len(ids[long[0]])} tokens"
        return over_length(over, first, "texts", cfg, "raise data.max_length, shorten them")

    def features(self, data: Any, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
                 ) -> tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset, None]:
        """Rows whose ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``) hold one
        token list per text."""
        train = self.tokenize(data.train, tokenizer, cfg)
        return train, train, self.tokenize(data.validation, tokenizer, cfg), None

    @staticmethod
    def tokenize(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
                 cfg: DataConfig) -> datasets.Dataset:
        cols = [c for c in text_columns(cfg) if c in ds.column_names]

        def enc(batch: dict[str, list]) -> dict[str, list]:
            parts = [tokenizer(batch[c], truncation=True, max_length=cfg.max_length)
                     for c in cols]
            return {k: [list(texts) for texts in zip(*(p[k] for p in parts))]
                    for k in TEXT_KEYS if k in parts[0]}
        keep = {"labels", "example_id"}
        out = ds.map(enc, batched=True,
                     remove_columns=[c for c in ds.column_names if c not in keep])
        return out.with_format("torch")

    def label_names(self, cfg: DataConfig, train: datasets.Dataset) -> list[str] | None:
        return None

    def encode_labels(self, ds: datasets.Dataset, cfg: DataConfig,
                      names: list[str] | None, split: str) -> datasets.Dataset:
        return ds  # prepare_splits made the labels

    # -- model -------------------------------------------------------------------------
    def load_model(self, path: str, num_labels: int, label_names: list[str] | None,
                   trust_remote_code: bool = False) -> SentenceEmbedder:
        try:
            return SentenceEmbedder.from_pretrained(path, trust_remote_code)
        except ValueError as err:  # an unsupported pooling
            from capscale.errors import ModelError
            raise ModelError(str(err)) from None

    # -- objective ---------------------------------------------------------------------
    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        emb = logits.float()
        if emb.shape[1] < 2:
            return emb.sum() * 0.0  # single texts: no supervised signal
        if torch.isnan(labels).any():
            return multiple_negatives(emb)
        cos = F.cosine_similarity(emb[:, 0], emb[:, 1], dim=-1)
        return cosent(gather_with_grad(cos), gather_with_grad(labels.float()))

    def distill(self, student_logits: Tensor, teacher_logits: Tensor,
                temperature: float, labels: Tensor | None = None) -> Tensor:
        """Mean over texts of the squared distance of the two embeddings."""
        d = student_logits.float() - teacher_logits.float()
        return (d * d).sum(-1).mean()

    def contrastive_labels(self, labels: Tensor) -> Tensor:
        return torch.full((labels.shape[0],), -1, dtype=torch.long, device=labels.device)

    # -- metrics -----------------------------------------------------------------------
    def metrics(self, logits: np.ndarray, labels: np.ndarray, num_labels: int,
                reference: Any = None) -> dict[str, float]:
        """Spearman / Pearson of the pairs' cosines with their scores, and retrieval
        (see the module docstring)."""
        a, b = logits[:, 0].astype(np.float64), logits[:, 1].astype(np.float64)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
                                ).clip(1e-12)
        gold = labels.astype(np.float64)
        out = {"spearman": spearman(cos, gold), "pearson": pearson(cos, gold)}
        keep = gold >= RETRIEVAL_MIN_SCORE
        if keep.sum() < 2:
            keep = np.ones_like(gold, dtype=bool)
        out.update(retrieval_scores(a[keep], b[keep]))
        return out

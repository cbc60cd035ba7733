"""SQuAD scoring: answer normalisation, exact match and F1, and span decoding.

The scores follow the official SQuAD evaluation scripts (v1.1 and v2.0, Rajpurkar et
al. 2016 / 2018); the behaviour is restated here so that nothing outside this file is
needed to check it:

* An answer is normalised by lower-casing, removing every ASCII punctuation character,
  removing the articles ``a``, ``an`` and ``the`` as whole words, and collapsing runs of
  white space to one space (in that order).
* Exact match is 1 when the normalised prediction equals a normalised gold answer. F1
  is the harmonic mean of token precision and recall between the normalised
  prediction and a gold answer, counting shared tokens with multiplicity; when either
  side has no token at all, F1 is 1 if both have none, else 0 (the v2 script's rule;
  with v1.1 data the gold side is never empty and the two scripts agree).
* Each question takes the maximum over its gold answers; an unanswerable question (v2)
  has the single gold answer ``""``. Reported numbers are means over questions, in
  percent, as the official scripts print them.

Span decoding (:func:`best_answers`) looks at every window (feature) of an example: the
``n_best`` highest start and end logits of each window, spans inside the context that
end after they start and are at most ``max_answer_length`` tokens long, scored
``start + end``. With SQuAD v2 the null score is the lowest ``start[CLS] + end[CLS]``
over the example's windows, and the empty answer is predicted when it exceeds the best
span's score by more than the threshold.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the official order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token F1 of two answers after normalisation (see the module docstring)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], golds: dict[str, list[str]]
                 ) -> dict[str, float]:
    """``exact_match`` and ``f1`` in percent over the questions of ``golds``, and for
    a set with unanswerable questions also ``has_answer_*`` / ``no_answer_*``.

    Args:
        predictions: question id -> predicted text (a missing id counts as ``""``).
        golds: question id -> gold answer texts (empty: unanswerable).
    """
    em, f1, has = {}, {}, {}
    for qid, answers in golds.items():
        refs = [a for a in answers if normalize_answer(a)] or [""]
        pred = predictions.get(qid, "")
        em[qid] = max(exact_match(pred, r) for r in refs)
        f1[qid] = max(f1_score(pred, r) for r in refs)
        has[qid] = refs != [""]
    out = {"exact_match": _mean(em.values()), "f1": _mean(f1.values()),
           "total": float(len(golds))}
    if not all(has.values()):
        for name, keep in (("has_answer", True), ("no_answer", False)):
            ids = [q for q in golds if has[q] == keep]
            out[f"{name}_exact_match"] = _mean(em[q] for q in ids)
            out[f"{name}_f1"] = _mean(f1[q] for q in ids)
            out[f"{name}_total"] = float(len(ids))
    return out


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else 0.0


def best_answers(start: np.ndarray, end: np.ndarray, offsets: np.ndarray,
                 feature_example: np.ndarray, contexts: Sequence[str],
                 cls_index: np.ndarray, n_best: int = 20, max_answer_length: int = 30,
                 with_negative: bool = False, null_threshold: float = 0.0) -> list[str]:
    """The predicted answer text of every example.

    Args:
        start, end: (F, L) start and end logits of every feature (window).
        offsets: (F, L, 2) character span of each token in its example's context, -1
            for tokens outside the context (question, special tokens, padding).
        feature_example: (F,) the example (index into ``contexts``) of each feature.
        contexts: the examples' context texts.
        cls_index: (F,) position of the CLS token (the null answer) in each feature.
        n_best: candidate starts and ends kept per feature.
        max_answer_length: longest span in tokens.
        with_negative: SQuAD v2 (the empty answer may win).
        null_threshold: how much the null score must beat the best span by.
    """
    best: list[tuple[float, str] | None] = [None] * len(contexts)
    null = np.full(len(contexts), np.inf)
    top = min(n_best, start.shape[1])
    for f in range(start.shape[0]):
        ex = int(feature_example[f])
        c = int(cls_index[f])
        null[ex] = min(null[ex], float(start[f, c] + end[f, c]))
        inside = offsets[f, :, 0] >= 0
        starts = np.argsort(-start[f], kind="stable")[:top]
        ends = np.argsort(-end[f], kind="stable")[:top]
        for s in starts:
            if not inside[s]:
                continue
            for e in ends:
                if not inside[e] or e < s or e - s + 1 > max_answer_length:
                    continue
                score = float(start[f, s] + end[f, e])
                current = best[ex]
                if current is None or score > current[0]:
                    text = contexts[ex][int(offsets[f, s, 0]):int(offsets[f, e, 1])]
                    best[ex] = (score, text)
    out = []
    for ex, found in enumerate(best):
        if with_negative and (found is None or null[ex] - found[0] > null_threshold):
            out.append("")
        else:
            out.append(found[1] if found is not None else "")
    return out

"""Extractive QA data: SQuAD-layout files, checks of the examples, and token windows.

* :func:`read_squad_file` flattens a SQuAD-layout JSON file (``{"data": [{"title",
  "paragraphs": [{"context", "qas": [{"id", "question", "answers", "is_impossible"}]}]}]}``)
  into the hub's columns (``id``, ``title``, ``context``, ``question``, ``answers`` =
  ``{"text": [...], "answer_start": [...]}``).
* :func:`check_examples` turns the configured columns into those and checks every
  example before any model is loaded (see its docstring for what is skipped and what
  stops the run); :func:`drop_long_questions` needs the tokenizer and runs next.
* :func:`qa_features` cuts each question + context into windows of ``max_length``
  tokens that overlap by ``doc_stride`` (``truncation="only_second"``, overflowing
  tokens returned), padded to ``max_length`` so that a window's logits do not depend on
  the batch it is in. Training windows carry token start / end positions (the CLS
  position when the answer is not inside the window, or there is none); every window
  carries its example's id.

One example may yield several windows. Its representation bank row holds ONE vector:
that of its *representative* window, the first one containing the answer (the first
window when none does or there is no answer). The bank is encoded from the
representative windows only, so every id is written exactly once whatever the ranks;
during training every window is an anchor whose positives are the bank views of its
example and the current vectors of the other windows of the same example in the
(gathered) batch (docs/algorithm.md, "Extractive QA").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np

from capscale.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from capscale.config import DataConfig
    from capscale.config.qa_schema import QAConfig

QA_COLUMNS = ("id", "question", "context", "answers")


def read_squad_file(path: str | Path) -> datasets.Dataset | None:
    """The examples of a SQuAD-layout JSON file, or None when ``path`` is not one."""
    if Path(path).suffix.lower() != ".json":
        return None
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # left to the generic reader to report
    if not (isinstance(doc, dict) and isinstance(doc.get("data"), list)
            and all(isinstance(a, dict) and "paragraphs" in a for a in doc["data"])):
        return None
    rows = []
    for article in doc["data"]:
        for p, par in enumerate(article["paragraphs"]):
            for q, qa in enumerate(par.get("qas", [])):
                answers = qa.get("answers") or []
                rows.append({
                    "id": str(qa.get("id", f"{article.get('title', '')}-{p}-{q}")),
                    "title": str(article.get("title", "")),
                    "context": par.get("context", ""), "question": qa.get("question", ""),
                    "answers": {"text": [str(a["text"]) for a in answers],
                                "answer_start": [int(a["answer_start"]) for a in answers]}})
    if not rows:
        raise DataError(f"SQuAD file {path} holds no question")
    return datasets.Dataset.from_list(rows)


def _answers(value: Any) -> tuple[list[str], list[int]]:
    """(texts, starts) from ``{"text": [...], "answer_start": [...]}`` or a list of
    ``{"text", "answer_start"}``."""
    if isinstance(value, dict):
        return list(value.get("text") or []), [int(s) for s in value.get("answer_start") or []]
    if isinstance(value, list):
        return [a["text"] for a in value], [int(a["answer_start"]) for a in value]
    raise TypeError(type(value).__name__)


def check_examples(ds: datasets.Dataset, cfg: DataConfig, split: str
                   ) -> tuple[datasets.Dataset, str | None]:
    """The examples in the hub's columns, checked.

    Raises DataError, naming the example: a missing column; an empty context or
    question; no answer without ``data.qa.version_2_with_negative``; a malformed answers
    value. An answer whose text is not found at its ``answer_start`` is a counted skip
    in ``train`` (its label would be wrong) and a counted note in ``validation``, which
    is scored on the answer texts alone; a split left with nothing raises.

    Returns:
        (examples, note for the log or None).
    """
    q = cfg.qa
    names = {"id": q.id_column, "question": q.question_column,
             "context": q.context_column, "answers": q.answers_column}
    for key, col in names.items():
        if col not in ds.column_names and key != "id":
            raise DataError(f"{split} data has no column {col!r} (columns: "
                            f"{', '.join(ds.column_names)}); set data.qa.{key}_column")
    ids = ([str(i) for i in ds[q.id_column]] if q.id_column in ds.column_names
           else [str(i) for i in range(len(ds))])
    keep, bad, out = [], [], []
    for i, (qid, question, context, answers) in enumerate(zip(
            ids, ds[q.question_column], ds[q.context_column], ds[q.answers_column])):
        where = f"{split} example {qid!r} (row {i})"
        if not isinstance(context, str) or not context.strip():
            raise DataError(f"{where}: empty context; drop the example or fix its context")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: empty question; drop the example or fix it")
        try:
            texts, starts = _answers(answers)
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{where}: answers {answers!r} are not {{'text': [...], "
                            f"'answer_start': [...]}} ({err!r})") from None
        if len(texts) != len(starts):
            raise DataError(f"{where}: {len(texts)} answer texts but {len(starts)} starts")
        if not texts and not q.version_2_with_negative:
            raise DataError(f"{where}: no answer; SQuAD v2 data needs "
                            "data.qa.version_2_with_negative: true")
        if any(context[s:s + len(t)] != t or not t for t, s in zip(texts, starts)):
            bad.append(where)
            if split == "train":
                continue
        keep.append(i)
        out.append({"id": qid, "question": question, "context": context,
                    "answers": {"text": texts, "answer_start": starts}})
    if not out:
        raise DataError(f"every {split} example has an answer that is not at its "
                        f"answer_start (first: {bad[0]}); check the offsets' encoding")
    note = None
    if bad:
        what = "skipped" if split == "train" else "kept (scored on the texts alone)"
        note = (f"{len(bad)} {split} examples have an answer text that is not at its "
                f"answer_start, {what}; first: {bad[0]}")
    features = datasets.Features({
        "id": datasets.Value("string"), "question": datasets.Value("string"),
        "context": datasets.Value("string"),
        "answers": {"text": datasets.Sequence(datasets.Value("string")),
                    "answer_start": datasets.Sequence(datasets.Value("int64"))}})
    return datasets.Dataset.from_list(out, features=features), note


def room_for_context(tokenizer: PreTrainedTokenizerBase, questions: list[str],
                     max_length: int) -> list[int]:
    """Context tokens a window of ``max_length`` leaves after each question."""
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    ids = tokenizer([s.lstrip() for s in questions], add_special_tokens=False)["input_ids"]
    return [max_length - specials - len(t) for t in ids]


def drop_long_questions(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
                        cfg: DataConfig, split: str) -> tuple[datasets.Dataset, str | None]:
    """Skip the questions too long for a window (a counted, logged skip).

    A window holds the question, the special tokens and more than ``doc_stride`` context
    tokens (so that consecutive windows can overlap by ``doc_stride``); a question
    that leaves no more room than that cannot be windowed.

    Returns:
        (the remaining examples, a note or None); DataError when none remain.
    """
    if not tokenizer.is_fast:
        raise DataError("data.task_type=qa needs a fast tokenizer (character offsets of "
                        f"the tokens); {type(tokenizer).__name__} is not one")
    room = room_for_context(tokenizer, ds["question"], cfg.max_length)
    long = [i for i, r in enumerate(room) if r <= cfg.qa.doc_stride]
    if not long:
        return ds, None
    first = (f"example {ds[long[0]]['id']!r}: {cfg.max_length - room[long[0]]} tokens with "
             "the special tokens")
    what = (f"{len(long)} {split} questions are too long for data.max_length = "
            f"{cfg.max_length} with data.qa.doc_stride = {cfg.qa.doc_stride} ({first})")
    if len(long) == len(ds):
        raise DataError(f"{what}: none left; raise data.max_length or lower doc_stride")
    drop = set(long)
    return ds.select([i for i in range(len(ds)) if i not in drop]), f"{what}: skipped"


@dataclass
class QAEvalReference:
    """What span decoding needs beside the logits of the evaluation windows.

    Attributes:
        ids, contexts, answers: per example: question id, context, gold answer texts.
        feature_example: (F,) the example of each window.
        offsets: (F, L, 2) characters of each token in its context; -1 outside it.
        cls_index: (F,) the CLS position of each window (the null answer).
        settings: the decoding settings (``data.qa``: n-best, answer length, v2).
    """

    ids: list[str]
    contexts: list[str]
    answers: list[list[str]]
    feature_example: np.ndarray
    offsets: np.ndarray
    cls_index: np.ndarray
    settings: QAConfig


def _windows(batch: dict[str, list], indices: list[int], tokenizer: PreTrainedTokenizerBase,
             cfg: DataConfig) -> dict[str, list]:
    """The windows of a batch of examples (a ``datasets.map`` function; an example's
    windows are all made in the batch that holds it)."""
    enc = tokenizer([q.lstrip() for q in batch["question"]], batch["context"],
                    truncation="only_second", max_length=cfg.max_length,
                    stride=cfg.qa.doc_stride, return_overflowing_tokens=True,
                    return_offsets_mapping=True, padding="max_length")
    out: dict[str, list] = {k: [] for k in ("labels", "example_id", "offsets", "cls_index")}
    first: dict[int, int] = {}  # example -> its first window, its first with the answer
    answered: dict[int, int] = {}
    for f, sample in enumerate(enc.pop("overflow_to_sample_mapping")):
        seq = enc.sequence_ids(f)
        ids = enc["input_ids"][f]
        cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
        offsets = [list(o) if s == 1 else [-1, -1]
                   for o, s in zip(enc["offset_mapping"][f], seq)]
        ctx = [t for t, s in enumerate(seq) if s == 1]
        label = [cls, cls]
        answers = batch["answers"][sample]
        if answers["text"]:
            a0 = answers["answer_start"][0]
            a1 = a0 + len(answers["text"][0])
            if ctx and offsets[ctx[0]][0] <= a0 and offsets[ctx[-1]][1] >= a1:
                label = [max(t for t in ctx if offsets[t][0] <= a0),
                         min(t for t in ctx if offsets[t][1] >= a1)]
        out["labels"].append(label)
        out["example_id"].append(batch["example_id"][sample] if "example_id" in batch
                                 else indices[sample])
        out["offsets"].append(offsets)
        out["cls_index"].append(cls)
        first.setdefault(sample, f)
        if label != [cls, cls]:
            answered.setdefault(sample, f)
    chosen = {answered.get(sample, f) for sample, f in first.items()}
    out["representative"] = [f in chosen for f in range(len(out["labels"]))]
    enc.pop("offset_mapping")
    return {**enc, **out}


def qa_features(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                train: bool) -> tuple[datasets.Dataset, datasets.Dataset | None,
                                      QAEvalReference | None]:
    """Token windows of ``ds``'s examples.

    Returns:
        train: (windows, the representative windows (bank), None);
        evaluation: (windows, None, the span-decoding reference).
    """
    room = room_for_context(tokenizer, ds["question"], cfg.max_length)
    if any(r <= cfg.qa.doc_stride for r in room):
        raise DataError("a question is too long for data.max_length and data.qa.doc_stride;"
                        " drop_long_questions (capscale.data.check_lengths) removes them")
    feats = ds.map(_windows, batched=True, with_indices=True, remove_columns=ds.column_names,
                   fn_kwargs={"tokenizer": tokenizer, "cfg": cfg})
    if train:
        bank = feats.filter(lambda r: r, input_columns="representative")
        drop = ["offsets", "cls_index", "representative"]
        return (feats.remove_columns(drop).with_format("torch"),
                bank.remove_columns(drop).with_format("torch"), None)
    arrays = feats.with_format("numpy", columns=["offsets", "cls_index", "example_id"])
    ref = QAEvalReference(list(ds["id"]), list(ds["context"]),
                          [list(a["text"]) for a in ds["answers"]],
                          np.asarray(arrays["example_id"]),
                          np.asarray(arrays["offsets"]).reshape(len(feats), -1, 2),
                          np.asarray(arrays["cls_index"]), cfg.qa)
    feats = feats.remove_columns(["offsets", "cls_index", "representative"])
    return feats.with_format("torch"), None, ref

"""Tiny sentence-embedding and NER assets, and the 2-rank worker of their parity tests
(tests/test_embedding.py, tests/test_token_classification.py, tests/test_tasks_ranks.py).

The models are real Hugging Face models with random weights (hidden 32, 2 layers) saved
next to the packaged MiniLM WordPiece tokenizer: a ``BertModel`` saved as a
sentence-transformers folder (mean pooling, normalised) and a
``BertForTokenClassification``. The data are synthetic: STS-like scored pairs whose
score counts shared words, and CoNLL-style sentences built from templates.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

import torch
from qa_helpers import GLOBAL_BATCH, NO_SUP, as_list, bank_record, first_losses
from qa_helpers import build_qa_run as build_run

__all__ = ["GLOBAL_BATCH", "as_list", "build_run"]

TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
WORDS = ["man", "woman", "dog", "cat", "plays", "guitar", "eats", "apple", "runs", "park",
         "red", "car", "drives", "fast", "child", "reads", "book", "bird", "sings", "tree"]


def _bert_config(**extra: Any) -> Any:
    import transformers
    return transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=80, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, **extra)


def _tokenizer(path: Path) -> None:
    from transformers import AutoTokenizer

    from capscale.models.loading import resolve_model_path
    AutoTokenizer.from_pretrained(resolve_model_path("minilm")).save_pretrained(path)


def save_embedder(path: Path, seed: int = 0, pooling: str = "mean") -> Path:
    """A tiny BERT sentence embedder saved as a sentence-transformers folder."""
    import transformers

    from capscale.tasks.embedding_model import Pooling, SentenceEmbedder
    torch.manual_seed(seed)
    SentenceEmbedder(transformers.BertModel(_bert_config()), Pooling(pooling)
                     ).save_pretrained(path)
    _tokenizer(path)
    return path


def save_tagger(path: Path, seed: int = 0) -> Path:
    """A tiny BERT token classifier over :data:`TAGS`."""
    import transformers
    torch.manual_seed(seed)
    cfg = _bert_config(num_labels=len(TAGS), id2label=dict(enumerate(TAGS)),
                       label2id={t: i for i, t in enumerate(TAGS)})
    transformers.BertForTokenClassification(cfg).save_pretrained(path)
    _tokenizer(path)
    return path


def sts_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` pairs of 5-word sentences; the score (0-5) is the number of shared words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = rng.sample(WORDS, 5)
        shared = rng.randint(0, 5)
        b = a[:shared] + rng.sample([w for w in WORDS if w not in a], 5 - shared)
        rng.shuffle(b)
        rows.append({"sentence1": " ".join(a), "sentence2": " ".join(b),
                     "score": float(shared)})
    return rows


def write_sts(root: Path, n_train: int = 32, n_val: int = 16) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for name, n, seed in (("train", n_train, 0), ("dev", n_val, 1)):
        path = root / f"sts_{name}.csv"
        rows = sts_rows(n, seed)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        out.append(path)
    return out[0], out[1]


FIRST = ["John", "Mary", "Peter", "Anna"]
LAST = ["Smith", "Jones", "Brown"]
ORGS = [["Acme", "Corp"], ["United", "Nations"], ["Reuters"]]
PLACES = [["London"], ["New", "York"], ["Paris"], ["Tokyo"]]
MISC = [["English"], ["World", "Cup"]]


def _entity(words: list[str], kind: str) -> list[tuple[str, str]]:
    return [(w, ("B-" if i == 0 else "I-") + kind) for i, w in enumerate(words)]


def ner_sentences(n: int, seed: int) -> list[list[tuple[str, str]]]:
    """``n`` sentences of (word, IOB2 tag) built from templates."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        person = [rng.choice(FIRST)] + ([rng.choice(LAST)] if rng.random() < 0.5 else [])
        parts = [_entity(person, "PER"), [("works", "O"), ("for", "O")],
                 _entity(rng.choice(ORGS), "ORG"), [("in", "O")],
                 _entity(rng.choice(PLACES), "LOC")]
        if rng.random() < 0.5:
            parts += [[("after", "O"), ("the", "O")], _entity(rng.choice(MISC), "MISC")]
        out.append([*(p for part in parts for p in part), (".", "O")])
    return out


def write_conll(path: Path, sentences: list[list[tuple[str, str]]]) -> Path:
    """A CoNLL-2003-style file (``word POS chunk tag``, -DOCSTART- first)."""
    lines = ["-DOCSTART- -X- -X- O", ""]
    for sent in sentences:
        lines += [f"{w} NNP B-NP {t}" for w, t in sent] + [""]
    path.write_text("\n".join(lines))
    return path


def write_ner(root: Path, n_train: int = 32, n_val: int = 16) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    return (write_conll(root / "train.conll", ner_sentences(n_train, 0)),
            write_conll(root / "valid.conll", ner_sentences(n_val, 1)))


def task_overrides(task: str, model: Path, teacher: Path, data: tuple[Path, Path],
                   out: Path, **extra: Any) -> dict[str, Any]:
    """A short CAP-m run of ``task`` (``embedding`` / ``token_classification``)."""
    base: dict[str, Any] = {
        "model.name_or_path": str(model), "model.teacher": str(teacher),
        "data.task_type": task, "data.train_file": str(data[0]),
        "data.validation_file": str(data[1]), "data.max_length": 32, **NO_SUP,
        "cap.num_negatives": 16, "cap.max_snapshots": 2,
        "pruning.method": "movement", "pruning.final_sparsity": 0.5,
        "pruning.initial_warmup": 0, "pruning.final_warmup": 1,
        "train.batch_size": GLOBAL_BATCH, "train.eval_batch_size": 8, "train.lr": 1e-3,
        "train.max_steps": 2, "train.epochs": 1, "train.progress": False,
        "report.enabled": False, "report.trackers": [], "output_dir": str(out)}
    if task == "embedding":
        base.update({"data.text_column": "sentence1", "data.text_pair_column": "sentence2",
                     "data.label_column": "score"})
    else:
        base.update({"data.text_column": "tokens", "data.label_column": "ner_tags"})
    base.update(extra)
    return base


METHODS: dict[str, dict[str, Any]] = {
    "movement": {},
    "soft_movement": {"pruning.method": "soft_movement"},
    "magnitude": {"pruning.method": "magnitude"},
    "nm": {"pruning.pattern": "2:4"},
    "structured": {"pruning.method": "structured", "structured.schedule": "iterative",
                   "structured.levels": [0.5], "structured.retrain_steps": 2,
                   "structured.importance_fraction": 1.0},  # order-free importance
    "hybrid": {"pruning.method": "hybrid", "pruning.final_sparsity": 0.5},
}


def record(overrides: dict[str, Any], ctx: Any, world: int = 1) -> dict[str, Any]:
    """First-batch losses, banks and teacher metrics of a run, then a few steps of
    training and its verified export."""
    run = build_run({**overrides, "train.batch_size": GLOBAL_BATCH // world}, ctx)
    out = {"losses": first_losses(run, ctx), "banks": bank_record(run),
           "teacher_metrics": run.evaluate(run.teacher)}
    run.train()
    results = run.finish(export=True)
    out.update(pruned_metrics=results["pruned_metrics"], steps=results["steps"],
               verified=results.get("export_verified"))
    return out


def tasks_worker(rank: int, world: int, strategy: str,
                 jobs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One rank (tests/rank_pool.py): :func:`record` of every ``(name, overrides)`` job
    under ``strategy``; rank 0's records by name."""
    from capscale.distributed import init_distributed
    out = {}
    for name, overrides in jobs:
        ctx = init_distributed(strategy)
        rec = record(overrides, ctx, world)
        rec["strategy"] = ctx.strategy
        out[name] = rec
    return out if rank == 0 else {}

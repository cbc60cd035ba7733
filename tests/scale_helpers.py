"""Shared fixtures of the scale-out tests: a tiny BERT on disk, a small labelled csv,
and their 2-rank gloo runs (on the session's two ranks, tests/rank_pool.py)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import rank_pool
import torch
from transformers import BertConfig, BertForSequenceClassification

from capscale.models.loading import load_tokenizer

WORDS = {0: "awful bad sad terrible", 1: "plain okay table window",
         2: "great happy lovely good"}


def write_csv(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` rows of ``sentence,label`` whose words hint at one of 3 labels."""
    rng = random.Random(seed)
    rows = ["sentence,label"]
    for i in range(n):
        label = i % 3
        words = WORDS[label].split() + WORDS[(label + 1) % 3].split()[:1]
        rows.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
                    + f",{['neg', 'neu', 'pos'][label]}")
    path.write_text("\n".join(rows) + "\n")
    return path


def tiny_bert(path: Path, num_labels: int = 3, seed: int = 0) -> Path:
    """Save a 2-layer, 32-wide BERT classifier with the packaged MiniLM tokenizer."""
    tok = load_tokenizer("minilm")
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, num_labels=num_labels)
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_ranks(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(rank, 2, *args)`` on the session's two gloo ranks (tests/rank_pool.py);
    a rank's error is raised here."""
    rank_pool.run(fn, *args)

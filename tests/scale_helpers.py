"""Shared fixtures of the scale-out tests: a tiny BERT on disk, a small labelled csv,
and a 2-rank gloo launcher (torch.multiprocessing.spawn)."""

from __future__ import annotations

import os
import random
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple,
            errors: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], *args: Any, world: int = 2) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; re-raise a rank's error."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(_worker, args=(world, free_port(), fn, args, errors),
                           nprocs=world, start_method="spawn")
    except mp.ProcessRaisedException as err:
        msg = errors.get() if not errors.empty() else str(err)
        raise AssertionError(msg) from None

"""Tiny offline runs of the real entry point: a 2-layer BERT and a two-class text task."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad", "the", "a", "movie",
         "film", "was", "is", "very", "quite", "plot", "cast", "music", "ending"]


def make_model(path: Path, num_labels: int = 2, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT classifier and a word-level tokenizer, saved to ``path``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                     num_labels=num_labels)
    BertForSequenceClassification(cfg).save_pretrained(path)
    return path


def sentence(rng: random.Random, label: int) -> str:
    sentiment = WORDS[:4] if label == 1 else WORDS[4:8]
    words = [rng.choice(WORDS[8:]) for _ in range(rng.randint(3, 8))]
    words.insert(rng.randrange(len(words)), rng.choice(sentiment))
    return " ".join(words)


def write_data(path: Path, rows: int, seed: int, text: str = "sentence",
               label: str = "label") -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([text, label])
        for i in range(rows):
            w.writerow([sentence(rng, i % 2), ["neg", "pos"][i % 2]])
    return path


def setup(tmp: Path) -> dict[str, Path]:
    """Model and data files shared by one test module."""
    return {"model": make_model(tmp / "bert"),
            "train": write_data(tmp / "data" / "train.csv", 64, 1),
            "dev": write_data(tmp / "data" / "dev.csv", 32, 2)}


def overrides(assets: dict[str, Path], out: Path, **extra: object) -> list[str]:
    """key=value overrides of a 24-step CAP run (3 epochs of 8 batches) on the tiny task."""
    base = {
        "model.name_or_path": assets["model"], "model.teacher": assets["model"],
        "data.train_file": assets["train"], "data.validation_file": assets["dev"],
        "data.max_length": 16, "pruning.final_sparsity": 0.5,
        "cap.num_negatives": 16, "cap.max_snapshots": 2, "train.epochs": 3,
        "train.batch_size": 8, "train.eval_batch_size": 16, "train.lr": 1e-3,
        "train.eval_every": 6, "train.progress": False, "train.num_threads": 1,
        "report.speed_batches": 1, "output_dir": out,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def env() -> dict[str, str]:
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CAPSCALE_CPU="1",
             TOKENIZERS_PARALLELISM="false")
    e.pop("CAPSCALE_TEST_STALL_CHECKPOINT_STEP", None)
    return e


def command(args: list[str], nproc: int = 1, program: tuple[str, ...] = ("-m", "capscale.run")
            ) -> list[str]:
    if nproc == 1:
        return [sys.executable, *program, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "--max-restarts=0", *program, *args]


def descendants(pid: int) -> list[int]:
    """Child processes, recursively (torchrun starts each rank in its own session)."""
    out = []
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for k in map(int, kids):
        out += [k, *descendants(k)]
    return out


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun worker ``rank`` (found by its RANK environment variable)."""
    for pid in descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"capscale.run" in Path(
                f"/proc/{pid}/cmdline").read_bytes():
            return pid
    return None


def run(args: list[str], nproc: int = 1, timeout: float = 120,
        extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(args, nproc), env={**env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def run_batch(arg_lists: list[list[str]], plan: Path, nproc: int = 1, timeout: float = 900,
              ) -> list[subprocess.CompletedProcess]:
    """``run(args, nproc)`` for each of ``arg_lists``, all in ONE launch (tests/_run_batch.py:
    the runs one after another, each joining and leaving the process group as its own
    launch would); one CompletedProcess per run, with that run's part of the output.

    Process and launcher start-up dominate a tiny run, so the uninterrupted reference
    runs are made this way. A launch that dies gives its return code (and the whole
    output) to every run it did not finish."""
    plan.write_text(json.dumps([[str(a) for a in args] for args in arg_lists]))
    batch = str(Path(__file__).resolve().parent / "_run_batch.py")
    r = subprocess.run(command([str(plan)], nproc, (batch,)), env=env(), capture_output=True,
                       text=True, timeout=timeout, cwd=ROOT)
    rc_file = Path(f"{plan}.rc")
    codes = json.loads(rc_file.read_text()) if r.returncode == 0 and rc_file.is_file() else []

    def parts(text: str) -> list[str]:
        out = []
        for i in range(len(arg_lists)):
            start = text.find(f"@@run {i}@@")
            end = text.find(f"@@run {i + 1}@@")
            out.append(text[start:] if start >= 0 and end < 0 else
                       text[start:end] if start >= 0 else "")
        return out

    outs, errs = parts(r.stdout), parts(r.stderr)
    return [subprocess.CompletedProcess(
        args, codes[i] if i < len(codes) else (r.returncode or -1),
        outs[i] if i < len(codes) else r.stdout, errs[i] if i < len(codes) else r.stderr)
        for i, args in enumerate(arg_lists)]

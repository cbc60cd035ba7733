"""Tokenising an MNLI-sized pair-classification set as a capscale run does, writing the
tokenised-data cache (``data.cache_tokenized``), and reading it back as a requeued job.

The data: a synthetic CSV of ``--rows`` training pairs (default 400,000, MNLI's
392,702 rounded up) and ``--validation-rows`` dev pairs (premise, hypothesis, label).
Sentence lengths follow MNLI's: premise ~N(22, 8) words (5 to 60), hypothesis
~N(11, 4) words (3 to 30); the words are drawn by frequency from the packaged tweets
corpus (real English, so WordPiece splits some of them as it would real text). The
tokenizer is the packaged all-MiniLM-L6-v2 (BERT uncased WordPiece), ``max_length``
128 as in the paper's MNLI recipes.

Two fresh processes, one after the other, one thread each (torch, OpenMP, the Rust
tokenizer; ``datasets.map`` in-process), with their own Hugging Face datasets cache
(so ``datasets``' own cache of ``map`` results cannot answer for the tokenizer):

* ``first``: ``load_task_data`` (read the CSV, check it, encode labels), then what a
  run does with ``data.cache_tokenized``: the length check's token counts of both
  splits (capscale.data.check_lengths, inside the cache's held block as
  check_run_inputs runs it) and the tokenised splits (capscale.data.tokenized_splits),
  each made and written as a cache entry. Timed apart: the token counts, the
  tokenising, the writes, and (in a separate pass of the same functions) the
  fingerprints of the rows and the tokenizer.
* ``requeued``: the same calls in a new process over the same output_dir, as a job the
  scheduler requeued: the entries are verified (checksums) and read back. The train and
  eval rows read back are hashed and compared with what the first process tokenised.

Reading happens right after writing, so the files come from the page cache; a cold
read from a network file system adds their transfer. Peak RSS is each process's.

    python bench/tokenize_cache.py            # -> bench/results/tokenize_cache.{json,md}
    python bench/tokenize_cache.py --rows 2000 --validation-rows 200 --out /tmp/tc
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
LABELS = ("entailment", "neutral", "contradiction")


def vocabulary() -> tuple[list[str], list[float]]:
    """Words of the packaged tweets corpus and their frequencies (links, mentions,
    hashtags and numbers left out)."""
    sys.path.insert(0, str(ROOT))
    from capscale.data import preset_path

    counts: collections.Counter[str] = collections.Counter()
    with open(preset_path("tweets"), encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            for word in row["text"].split():
                word = word.strip(".,!?;:\"'()[]*-").lower()
                if re.fullmatch(r"[a-z][a-z']*", word) and not word.startswith("http"):
                    counts[word] += 1
    words = sorted(counts, key=lambda w: (-counts[w], w))
    total = sum(counts.values())
    return words, [counts[w] / total for w in words]


def write_pairs(path: Path, n: int, seed: int, words: list[str], probs: list[float]) -> None:
    """``n`` rows of premise, hypothesis, label with MNLI-like sentence lengths."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.stack([np.clip(rng.normal(22, 8, n).round(), 5, 60),
                        np.clip(rng.normal(11, 4, n).round(), 3, 30)], 1).astype(int)
    drawn = rng.choice(len(words), size=int(lengths.sum()), p=np.asarray(probs))
    labels = rng.integers(0, len(LABELS), n)
    at = 0
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["premise", "hypothesis", "label"])
        for i in range(n):
            pair = []
            for k in lengths[i]:
                text = " ".join(words[j] for j in drawn[at:at + k])
                at += k
                pair.append(text[:1].upper() + text[1:] + ".")
            out.writerow([*pair, LABELS[labels[i]]])


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One process: read the data, then the run's two tokenising calls through a cache
    whose parts are timed."""
    import torch

    from capscale.checks import load_run_config
    from capscale.data import check_lengths, load_task_data, tokenized_splits
    from capscale.models.loading import load_tokenizer
    from capscale.tasks import get_task
    from capscale.token_cache import TokenCache, code_digest, rows_digest, tokenizer_digest

    torch.set_num_threads(1)
    seconds: dict[str, float] = collections.defaultdict(float)

    @contextmanager
    def clock(name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds[name] += time.perf_counter() - t0

    def timed(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with clock(name):
                return fn()
        return run

    class TimedCache(TokenCache):
        """The run's cache, its making, writing and verifying timed."""

        def lengths(self, ds, tokenizer, cfg, count):
            return super().lengths(ds, tokenizer, cfg, timed("count_tokens", count))

        def features(self, train, validation, tokenizer, cfg, task, make):
            return super().features(train, validation, tokenizer, cfg, task,
                                    timed("tokenize", make))

        def _open(self, name, what):
            with clock("verify"):
                return super()._open(name, what)

        def _write(self, name, what, fill):
            with clock("write"):
                return super()._write(name, what, fill)

    work = Path(args.work)
    cfg = load_run_config(None, [
        f"data.train_file={work / 'train.csv'}", f"data.validation_file={work / 'dev.csv'}",
        "data.text_column=premise", "data.text_pair_column=hypothesis",
        f"data.max_length={args.max_length}", f"output_dir={work / 'out'}"]).data
    with clock("read"):
        data = load_task_data(cfg)
    tokenizer = load_tokenizer("minilm")
    with clock("fingerprints"):
        rows_digest(data.train), rows_digest(data.validation)
        tokenizer_digest(tokenizer), code_digest(get_task(cfg.task_type))
    cache = TimedCache(work / "out" / "cache")
    data.cache = cache
    with clock("total"):
        with cache.held():
            note = check_lengths(data, tokenizer, cfg)
        train, _, evaluation, _ = tokenized_splits(data, tokenizer, cfg)
    return {"phase": args.child, "seconds": dict(seconds), "note": note,
            "rows": {"train": len(train), "validation": len(evaluation)},
            "digests": {"train": rows_digest(train), "eval": rows_digest(evaluation)},
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--validation-rows", type=int, default=10_000)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--out", default=str(RESULTS / "tokenize_cache"))
    p.add_argument("--work", default=None, help="where the CSVs and the cache go "
                   "(default: a temporary folder, removed afterwards)")
    p.add_argument("--child", choices=("first", "requeued"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    load_before = os.getloadavg()
    work = Path(args.work or tempfile.mkdtemp(prefix="tokenize_cache-"))
    try:
        result = measure(args, work, argv)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result["machine"]["loadavg_before"] = load_before
    result["machine"]["loadavg_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def measure(args: argparse.Namespace, work: Path, argv: list[str] | None) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    words, probs = vocabulary()
    write_pairs(work / "train.csv", args.rows, 0, words, probs)
    write_pairs(work / "dev.csv", args.validation_rows, 1, words, probs)
    made_s = time.perf_counter() - t0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(work / "hf_datasets"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    shape = ["--work", str(work), "--max-length", str(args.max_length)]
    phases = {}
    for phase in ("first", "requeued"):  # one fresh process each, one at a time
        done = subprocess.run([sys.executable, __file__, "--child", phase, *shape],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{phase}: {done.stderr[-3000:]}")
        phases[phase] = json.loads(done.stdout.strip().splitlines()[-1])
    sizes: dict[str, int] = collections.defaultdict(int)
    for f in (work / "out" / "cache").rglob("*"):
        if f.is_file():
            sizes[f.relative_to(work / "out" / "cache").parts[0].split("-")[0]] += \
                f.stat().st_size
    first, again = phases["first"], phases["requeued"]
    s1, s2 = first["seconds"], again["seconds"]
    tokenising = s1["count_tokens"] + s1["tokenize"]
    return {
        "command": " ".join(["python bench/tokenize_cache.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "data": {"train_rows": args.rows, "validation_rows": args.validation_rows,
                 "csv_mib": sum((work / f).stat().st_size for f in ("train.csv", "dev.csv"))
                 / 2**20, "max_length": args.max_length, "made_s": made_s,
                 "length_note": first["note"]},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "cpu": _cpu_model(), "threads": 1},
        "first": first, "requeued": again,
        "cache_mib": {k: v / 2**20 for k, v in sorted(sizes.items())},
        "identical": first["digests"] == again["digests"],
        "summary": {
            "tokenise_s": tokenising, "count_tokens_s": s1["count_tokens"],
            "tokenize_splits_s": s1["tokenize"], "write_s": s1["write"],
            "fingerprints_s": s1["fingerprints"], "first_run_s": s1["total"],
            "reload_s": s2["total"], "reload_verify_s": s2["verify"],
            "read_csv_s": s2["read"], "speedup": tokenising / s2["total"],
            "cache_mib": sum(sizes.values()) / 2**20}}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def markdown(r: dict[str, Any]) -> str:
    d, m, s = r["data"], r["machine"], r["summary"]
    first, again = r["first"]["seconds"], r["requeued"]["seconds"]
    lb, la = m["loadavg_before"], m["loadavg_after"]
    return "\n".join([
        "# Tokenising an MNLI-sized training set, and reading it back from the cache", "",
        f"`{r['command']}`", "",
        f"{d['train_rows']:,} training + {d['validation_rows']:,} dev pairs (synthetic CSV, "
        f"{d['csv_mib']:.0f} MiB, MNLI-like lengths), packaged MiniLM tokenizer, "
        f"max_length {d['max_length']}; {d['length_note'] or 'no text over max_length'}. "
        f"One thread, each phase in a fresh process. Machine: {m['cpus']} CPUs "
        f"({m['cpu']}), load average {lb[0]:.2f} before and {la[0]:.2f} after "
        "(a shared machine: times are indicative).", "",
        "| first run (no cache entry yet) | s |", "|---|---|",
        f"| read the CSV (load_task_data; not cached) | {first['read']:.1f} |",
        f"| token counts of the length check | {first['count_tokens']:.1f} |",
        f"| tokenised splits | {first['tokenize']:.1f} |",
        f"| **tokenising, both passes** | **{s['tokenise_s']:.1f}** |",
        f"| fingerprints of rows and tokenizer (measured apart) | {first['fingerprints']:.1f} |",
        f"| **writing the cache entries** | **{s['write_s']:.1f}** |",
        f"| the run's two calls, cache on | {first['total']:.1f} |", "",
        "| requeued run (entries there) | s |", "|---|---|",
        f"| read the CSV (datasets' Arrow cache) | {again['read']:.1f} |",
        f"| verify the entries' checksums | {again['verify']:.1f} |",
        f"| **the run's two calls, reading the entries** | **{s['reload_s']:.1f}** |", "",
        f"Cache: {s['cache_mib']:.0f} MiB ("
        + ", ".join(f"{k} {v:.1f} MiB" for k, v in r["cache_mib"].items()) + "). "
        f"Reading back is {s['speedup']:.0f}x faster than tokenising again; the rows read "
        f"back {'equal' if r['identical'] else 'DIFFER from'} those tokenised "
        "(hash of every column). Peak RSS: first "
        f"{r['first']['peak_rss_mib']:.0f} MiB, requeued {r['requeued']['peak_rss_mib']:.0f} "
        "MiB.", ""])


if __name__ == "__main__":
    sys.exit(main())

"""The uninterrupted reference runs of the kill-and-resume tests, made in two launches.

Every kill / resume test (test_resume, test_resume_modes, test_resume_sharded) compares
its resumed run with an uninterrupted run of the same config on the same assets. Those
runs do not depend on the test, and on tiny models process and launcher start-up cost
more than the run itself, so the session fixture ``references`` (conftest.py) makes
them in one launch per process count (tests/_tiny_run.run_batch): when a test first asks
for a reference, every reference with that process count that a test module of the
session uses is made. A test asks by process count and config, so its reference is
always the uninterrupted run of its own config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _tiny_run import overrides, run_batch

EVERY = 3  # checkpoint.every_steps

# 3 levels x 6 retraining steps: levels start at steps 0, 6, 12, so checkpoints every 3
# steps land inside levels (3, 9, 15) and on their boundaries (6, 12).
STRUCTURED = {"pruning.method": "structured", "structured.levels": "[0.25, 0.5, 0.75]",
              "structured.retrain_steps": 6, "structured.importance_fraction": 0.5}
ONLINE = {"cap.mode": "online", "cap.queue_size": 24, "cap.max_snapshots": 2}
KEEP_ALL = {"checkpoint.keep_last": 100}  # runs a test resumes from a copy of

# name: (the test module comparing with it, processes, config overrides). The 2-rank
# ones run ddp first and zero3 last.
REFERENCES: dict[str, tuple[str, int, dict[str, Any]]] = {
    "single": ("test_resume", 1, {}),
    "structured": ("test_resume_modes", 1, STRUCTURED),
    "online": ("test_resume_modes", 1, ONLINE),
    "structured-online": ("test_resume_modes", 1, {**STRUCTURED, **ONLINE}),
    "single-keep-all": ("test_resume_modes", 1, KEEP_ALL),
    "accumulation": ("test_gradient_accumulation", 1, {"train.batch_size": 4,
                                                       "train.gradient_accumulation_steps": 2}),
    "structured-keep-all": ("test_resume_modes", 1, {**KEEP_ALL, **STRUCTURED}),
    "structured-online-keep-all": ("test_resume_modes", 1,
                                   {**KEEP_ALL, **STRUCTURED, **ONLINE}),
    "ddp": ("test_resume", 2, {}),
    "ddp-sharded-banks": ("test_resume_modes", 2, {"strategy": "ddp",
                                                   "cap.bank_sharding": "sharded"}),
    "fsdp2-online": ("test_resume_modes", 2, {"strategy": "fsdp2", **ONLINE}),
    "fsdp2": ("test_resume_sharded", 2, {"strategy": "fsdp2"}),
    "zero3-structured": ("test_resume_modes", 2, {"strategy": "zero3", **STRUCTURED}),
    "zero3": ("test_resume_sharded", 2, {"strategy": "zero3"}),
}


def _args(assets: dict[str, Path], out: Path, **extra: Any) -> list[str]:
    return overrides(assets, out, **{"checkpoint.every_steps": EVERY, "report.enabled": False,
                                     **extra})


class References:
    """``get(nproc, extra)``: the output folder of the finished uninterrupted run of
    ``_args(assets, out, **extra)`` on ``nproc`` processes (one of ``REFERENCES``)."""

    def __init__(self, assets: dict[str, Path], root: Path, modules: set[str]) -> None:
        self.assets, self.root, self.modules = assets, root, modules
        self.done: dict[str, tuple[Path, int, str]] = {}  # name -> (folder, rc, stderr)

    def get(self, nproc: int, extra: dict[str, Any]) -> Path:
        name = next((n for n, (_, np, ex) in REFERENCES.items() if (np, ex) == (nproc, extra)),
                    None)
        assert name is not None, f"no reference run on {nproc} process(es) with {extra}"
        if name not in self.done:
            names = [n for n, (module, np, _) in REFERENCES.items()
                     if np == nproc and n not in self.done
                     and (module in self.modules or n == name)]
            outs = [self.root / n for n in names]
            results = run_batch([_args(self.assets, out, **REFERENCES[n][2])
                                 for n, out in zip(names, outs)],
                                self.root / f"plan-{len(self.done)}.json", nproc)
            for n, out, r in zip(names, outs, results):
                self.done[n] = (out, r.returncode, r.stderr[-3000:])
        out, rc, err = self.done[name]
        if rc != 0:
            pytest.fail(f"reference run {name!r} failed (rc {rc}): {err}")
        return out

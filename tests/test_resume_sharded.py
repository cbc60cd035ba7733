"""Kill a 2-rank zero3 / fsdp2 run (SIGKILL) and resume it from its sharded checkpoint.

The resumed run must end exactly like an uninterrupted one with the same seed: masks,
exported weights, every logged loss and learning rate, evaluations and final metrics
are compared with ``==`` (on CPU each step is deterministic, and the shards, AdamW
moments, LR schedule, SnC bank and RNG states all round-trip bit-exactly).

The 2-rank run has 12 steps, too few to land a timed kill reliably before the end, so
the kill lands while checkpoint ``S`` is half written (every rank's shards on disk, the
trainer state not yet): the run then resumes from ``S - 3`` and redoes the last steps.
"""

from __future__ import annotations

import random
import time

import pytest
from _tiny_run import overrides, run
from references import EVERY, _args
from test_resume import _kill, _start, _steps, _wait_for, assert_same_run

from capscale.cli import main

SHARDS = {"zero3": "deepspeed/state/*", "fsdp2": "dcp/*.distcp"}


@pytest.fixture(scope="module")
def assets(resume_assets):
    return resume_assets


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_sigkill_sharded_run_then_resume_matches_uninterrupted(assets, references, tmp_path,
                                                               strategy, capsys):
    ref = references.get(2, {"strategy": strategy})  # the uninterrupted run
    stall = random.choice([2 * EVERY, 3 * EVERY, 4 * EVERY])
    out, log = tmp_path / "killed", tmp_path / "killed.log"
    proc = _start(_args(assets, out, strategy=strategy), log, nproc=2,
                  extra_env={"CAPSCALE_TEST_STALL_CHECKPOINT_STEP": str(stall)})
    partial = out / "checkpoints" / f".tmp-step-{stall:08d}"
    _wait_for(proc, lambda: (partial / "objective.pt").is_file(), log)
    time.sleep(0.2)
    _kill(proc)
    assert len(list(partial.glob(SHARDS[strategy]))) >= 2, "every rank writes its shards"
    resumed_at = stall - EVERY
    assert _steps(out)[-1] == resumed_at, f"stall {stall}: {_steps(out)}"
    r = run(_args(assets, out, strategy=strategy, resume="latest"), 2)
    assert r.returncode == 0, r.stderr[-3000:]
    logged = " ".join(r.stdout.split())
    assert f"(step {resumed_at}, epoch" in logged, f"stall {stall}: did not resume there"
    assert not partial.exists(), "the partial checkpoint is cleaned up by the next save"
    assert_same_run(ref, out)
    # ``capscale export`` reads a model.pt; it refuses shards with a clear message.
    assert main(["export", *overrides(assets, out, strategy=strategy)]) == 2
    assert "sharded (zero3 / fsdp2) checkpoint" in capsys.readouterr().err

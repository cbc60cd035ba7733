"""Exact resume for the modes that are not plain unstructured bank CAP: structured CAP
(inside a level and between two), online mode (queue and live snapshots) and sharded
banks, with 1 and 2 processes, under single, ddp, zero3 and fsdp2; and a resume that
starts in a later epoch.

Every comparison is bit-exact (``==``) against an uninterrupted run with the same seed:
masks (or the heads and neurons kept), exported weights, every logged loss and learning
rate, evaluations and final metrics.
"""

from __future__ import annotations

import random
import shutil
import time

import pytest
from _tiny_run import run
from references import EVERY, KEEP_ALL, ONLINE, STRUCTURED, _args
from test_resume import _kill, _kill_and_resume, _start, _steps, _wait_for, assert_same_run

from capscale.train.checkpoint import list_checkpoints


@pytest.fixture(scope="module")
def assets(resume_assets):
    return resume_assets


@pytest.mark.parametrize("mode", [STRUCTURED, ONLINE, {**STRUCTURED, **ONLINE}],
                         ids=["structured", "online", "structured-online"])
def test_sigkill_then_resume_one_process(assets, references, tmp_path, mode):
    _kill_and_resume(assets, tmp_path, nproc=1, ref=references.get(1, mode), **mode)


def _stall_kill_resume(assets, tmp_path, ref, extra: dict, stall: int) -> None:
    """2 ranks: SIGKILL while checkpoint ``stall`` is half written (deterministic), resume
    from ``stall - EVERY``, compare with the uninterrupted run ``ref``."""
    out, log = tmp_path / "killed", tmp_path / "killed.log"
    proc = _start(_args(assets, out, **extra), log, nproc=2,
                  extra_env={"CAPSCALE_TEST_STALL_CHECKPOINT_STEP": str(stall)})
    partial = out / "checkpoints" / f".tmp-step-{stall:08d}"
    _wait_for(proc, lambda: any(partial.glob("objective*.pt")), log, timeout=300)
    time.sleep(0.3)
    _kill(proc)
    assert _steps(out)[-1] == stall - EVERY
    r = run(_args(assets, out, resume="latest", **extra), 2, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"(step {stall - EVERY}, epoch" in " ".join(r.stdout.split())
    assert_same_run(ref, out)


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy,extra,stall", [
    ("ddp", {"cap.bank_sharding": "sharded"}, 9),
    ("zero3", STRUCTURED, 9),   # resumes at 6: a level boundary
    ("fsdp2", ONLINE, 6),       # resumes at 3, in epoch 0 with a queue in play
], ids=["ddp-sharded-banks", "zero3-structured", "fsdp2-online"])
def test_two_ranks_kill_mid_checkpoint_then_resume(assets, references, tmp_path, strategy,
                                                   extra, stall):
    extra = {"strategy": strategy, **extra}
    _stall_kill_resume(assets, tmp_path, references.get(2, extra), extra, stall)


def _resume_from_copy(assets, tmp_path, references, extra: dict, pick) -> None:
    """Take the uninterrupted run keeping every checkpoint, resume a fresh run from the
    one ``pick`` chooses, and compare (the seed of a random pick is in every failure)."""
    extra = {**KEEP_ALL, **extra}
    ref = references.get(1, extra)
    seed = random.randrange(10**6)
    ckpt = pick(list_checkpoints(ref / "checkpoints"), random.Random(seed))
    out = tmp_path / "resumed"
    shutil.copytree(ckpt, out / "checkpoints" / ckpt.name)
    r = run(_args(assets, out, resume="latest", **extra))
    assert r.returncode == 0, f"seed {seed}, {ckpt.name}: {r.stderr[-3000:]}"
    step = int(ckpt.name.split("-")[1])
    assert f"(step {step}, epoch {step // 8}" in " ".join(r.stdout.split()), f"seed {seed}"
    try:
        assert_same_run(ref, out)
    except AssertionError as err:
        raise AssertionError(f"seed {seed}, resumed from {ckpt.name}: {err}") from err


def test_resume_in_a_later_epoch_matches(assets, references, tmp_path):
    """Resume from a checkpoint taken in epoch 1 or 2 (8 batches per epoch, 24 steps),
    so the epoch's permutation, the batches already consumed and the RNG states of a
    later epoch are restored, not only those of epoch 0."""
    _resume_from_copy(assets, tmp_path, references, {}, lambda found, rng: rng.choice(
        [p for p in found if 8 < int(p.name.split("-")[1]) < 24]))


@pytest.mark.parametrize("mode", [STRUCTURED, {**STRUCTURED, **ONLINE}],
                         ids=["structured", "structured-online"])
def test_structured_resume_inside_a_level_with_a_prune_ahead(assets, references, tmp_path,
                                                             mode):
    """Resume at step 9 (inside level 2, epoch 1): the level-3 importance at step 12
    must draw the same batches and see the same snapshots as the uninterrupted run."""
    _resume_from_copy(assets, tmp_path, references, mode, lambda found, rng: next(
        p for p in found if p.name == "step-00000009"))

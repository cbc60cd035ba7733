"""Faults: non-finite losses stop or skip as configured; a dead rank ends the job.

NaNs come from the documented test hook ``train.debug_nan_batches`` (the loss of those
batches is multiplied by NaN, exactly what a real overflow would look like to the loop).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from _tiny_run import ROOT, command, env, overrides, rank_pid, setup

from capscale.run import main
from capscale.train.checkpoint import list_checkpoints


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return setup(tmp_path_factory.mktemp("faults"))


def _main(assets, out, **extra) -> int:
    return main(overrides(assets, out, **{"checkpoint.every_steps": 3,
                                          "report.enabled": False, **extra}))


def test_nan_stops_with_diagnostic_and_keeps_last_good_checkpoint(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert _main(assets, out, **{"train.debug_nan_batches": "[7]"}) == 3
    err = capsys.readouterr().err.strip()
    assert "non-finite loss at step 7: ce" in err, err
    assert "step-00000006" in err and "resume=latest" in err
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [
        "step-00000003", "step-00000006"]
    assert not (out / "results.json").exists()
    state = json.loads((out / "checkpoints" / "step-00000006" / "trainer_state.json")
                       .read_text())
    assert state["step"] == 6 and all(r["loss"] == r["loss"] for r in state["run"]["history"])


def test_nan_batch_is_skipped_when_configured(assets, tmp_path):
    out = tmp_path / "run"
    assert _main(assets, out, **{"train.debug_nan_batches": "[5]",
                                 "train.on_nonfinite": "skip"}) == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    # The skipped batch is gone: 3 epochs of 8 batches now make 23 optimiser steps.
    assert [r["step"] for r in history] == list(range(1, 24))
    assert all(r["loss"] == r["loss"] for r in history)
    state = json.loads((out / "checkpoints" / "step-00000021" / "trainer_state.json")
                       .read_text())
    assert state["run"]["skipped_steps"] == [5] and state["run"]["batches_drawn"] == 22


def test_consecutive_skips_are_limited(assets, tmp_path, capsys):
    out = tmp_path / "run"
    rc = _main(assets, out, **{"train.debug_nan_batches": "[4, 5, 6]",
                               "train.on_nonfinite": "skip", "train.max_nonfinite_skips": 2})
    assert rc == 3
    err = capsys.readouterr().err
    assert "non-finite loss at step 4" in err and "3 batches in a row" in err


@pytest.mark.multiprocess
def test_killed_rank_ends_the_job_nonzero_within_timeout(assets, tmp_path):
    """SIGKILL rank 1 mid-run: rank 0's next collective fails, torchrun stops the job."""
    out = tmp_path / "run"
    args = overrides(assets, out, **{"checkpoint.every_steps": 3, "report.enabled": False,
                                     "train.epochs": 50, "train.collective_timeout_s": 20})
    with open(tmp_path / "job.log", "w") as log:
        proc = subprocess.Popen(command(args, 2), env=env(), cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 120
        while not list_checkpoints(out / "checkpoints"):
            assert proc.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            assert time.monotonic() < end, "no checkpoint written"
            time.sleep(0.05)
        victim = rank_pid(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        rc = proc.wait(timeout=60)
        assert rc != 0
        assert time.monotonic() - killed < 60
    finally:
        if proc.poll() is None:
            for pid in [proc.pid, *[p for p in (rank_pid(proc.pid, r) for r in (0, 1)) if p]]:
                os.kill(pid, signal.SIGKILL)
    assert not (out / "results.json").exists()

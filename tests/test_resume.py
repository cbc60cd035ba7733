"""Kill a real run (SIGKILL) and resume it: it must end exactly like an uninterrupted run.

On CPU every step is deterministic, so masks, exported weights, every logged loss and the
final metrics are compared for bit equality (``==``, not ``allclose``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from _tiny_run import ROOT, command, descendants, env, run
from references import EVERY, _args
from safetensors.torch import load_file

from capscale.checks import load_run_config
from capscale.config import ConfigError, config_to_dict
from capscale.train.checkpoint import checkpoint_root, list_checkpoints, resolve_resume


@pytest.fixture(scope="module")
def assets(resume_assets):
    return resume_assets


@pytest.fixture(scope="module")
def reference(references):
    """The uninterrupted single-process run (made with the session's other references)."""
    return references.get(1, {})


def _start(args: list[str], log: Path, nproc: int = 1, extra_env: dict | None = None
           ) -> subprocess.Popen:
    with open(log, "w") as f:  # a file, not a pipe nobody reads while waiting
        return subprocess.Popen(command(args, nproc), env={**env(), **(extra_env or {})},
                                cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)


def _wait_for(proc: subprocess.Popen, ready, log: Path, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before the kill point: "
                        f"{log.read_text()[-2000:]}")
        if time.monotonic() > end:
            _kill(proc)
            pytest.fail("kill point never reached")
        time.sleep(0.01)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank at once, as when a node goes away."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(30)


def _steps(out: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in list_checkpoints(out / "checkpoints")]


def assert_same_run(a: Path, b: Path) -> None:
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert ra["pruned_metrics"] == rb["pruned_metrics"]
    assert ra["sparsity"] == rb["sparsity"] and ra["steps"] == rb["steps"]
    if (a / "pruned" / "masks.safetensors").is_file():  # unstructured: the weight masks
        ma, mb = (load_file(d / "pruned" / "masks.safetensors") for d in (a, b))
        assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    else:  # structured: the heads and neurons kept, per layer
        sa, sb = (json.loads((d / "pruned" / "sparsity_report.json").read_text())
                  for d in (a, b))
        assert sa["heads_per_layer"] == sb["heads_per_layer"]
        assert sa["intermediate_per_layer"] == sb["intermediate_per_layer"]
    wa, wb = (load_file(d / "pruned" / "model" / "model.safetensors") for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ha, hb = ([json.loads(line) for line in (d / "history.jsonl").read_text().splitlines()]
              for d in (a, b))
    drop = ("examples_per_s",)  # wall-clock throughput is the one thing that may differ
    assert [{k: v for k, v in r.items() if k not in drop} for r in ha] == \
        [{k: v for k, v in r.items() if k not in drop} for r in hb]
    ea = json.loads((a / "evals.json").read_text())
    assert ea == json.loads((b / "evals.json").read_text())
    steps = [e["step"] for e in ea]
    assert len(set(steps)) == len(steps), f"a step evaluated twice: {steps}"


def _kill_and_resume(assets, tmp_path: Path, nproc: int, ref: Path, **extra) -> None:
    """SIGKILL a run after a random checkpoint (seeded; the seed is in every failure),
    resume it, and compare it with the uninterrupted run ``ref`` (of the same config)."""
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    kill_after = rng.choice(range(EVERY, 13, EVERY))
    out = tmp_path / "killed"
    proc = _start(_args(assets, out, **extra), tmp_path / "killed.log", nproc)
    _wait_for(proc, lambda: any(s >= kill_after for s in _steps(out)), tmp_path / "killed.log")
    time.sleep(rng.uniform(0, 0.2))  # land anywhere in the next steps, mid-step included
    _kill(proc)
    assert not (out / "results.json").exists(), f"seed {seed}: run finished before the kill"
    killed_at = max(_steps(out))
    r = run(_args(assets, out, resume="latest", **extra), nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    logged = " ".join(r.stdout.split())
    assert f"(step {killed_at}, epoch" in logged, f"seed {seed}: did not resume at {killed_at}"
    try:
        assert_same_run(ref, out)
    except AssertionError as err:
        raise AssertionError(f"seed {seed}, killed after step {killed_at}: {err}") from err


def test_sigkill_single_process_then_resume_matches_uninterrupted(assets, reference,
                                                                  tmp_path):
    _kill_and_resume(assets, tmp_path, nproc=1, ref=reference)


@pytest.mark.multiprocess
def test_sigkill_two_ranks_then_resume_matches_uninterrupted(assets, references, tmp_path):
    _kill_and_resume(assets, tmp_path, nproc=2, ref=references.get(2, {}))


def test_kill_during_checkpoint_write_leaves_previous_checkpoint(assets, reference,
                                                                 tmp_path):
    """A SIGKILL while step 6 is half written: step 3 stays the latest and resumes."""
    out = tmp_path / "killed"
    proc = _start(_args(assets, out), tmp_path / "killed.log",
                  extra_env={"CAPSCALE_TEST_STALL_CHECKPOINT_STEP": "6"})
    partial = out / "checkpoints" / ".tmp-step-00000006"
    _wait_for(proc, lambda: (partial / "model.pt").is_file(), tmp_path / "killed.log")
    time.sleep(0.2)
    _kill(proc)
    assert partial.is_dir() and not (partial / "trainer_state.json").exists()
    assert _steps(out) == [3]
    r = run(_args(assets, out, resume="latest"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not partial.exists(), "the partial checkpoint is cleaned up by the next save"
    assert _steps(out) == [21, 24]  # checkpoint.keep_last = 2
    assert_same_run(reference, out)


def test_resume_latest_without_checkpoint_starts_fresh(tmp_path):
    cfg = load_run_config(None, ["data.preset=tweets", f"output_dir={tmp_path}", "resume=latest"])
    assert resolve_resume(cfg.resume, checkpoint_root(cfg.checkpoint.dir, cfg.output_dir),
                          config_to_dict(cfg)) is None


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    ckpt = tmp_path / "checkpoints" / "step-00000003"
    ckpt.mkdir(parents=True)
    base = ["data.preset=tweets", f"output_dir={tmp_path}"]
    saved = config_to_dict(load_run_config(None, base))
    (ckpt / "trainer_state.json").write_text(json.dumps({"config": saved}))

    def resume(*extra: str) -> Path | None:
        cfg = load_run_config(None, [*base, "resume=latest", *extra])
        return resolve_resume(cfg.resume, checkpoint_root(cfg.checkpoint.dir, cfg.output_dir),
                              config_to_dict(cfg))
    assert resume("train.progress=false") == ckpt
    with pytest.raises(ConfigError, match=r"pruning.final_sparsity: 0.9 -> 0.8"):
        resume("pruning.final_sparsity=0.8")

"""slurm/prune_large.sh submitted with the real ``sbatch`` to a real two-node Slurm cluster.

``scripts/slurm_local.sh start`` (a session fixture) installs Slurm and munge where
missing and starts one controller and two ``slurmd`` nodes, n1 and n2, on this machine.
Every job below is the unmodified script: one launcher per node (torchrun; accelerate for
the fsdp2 job), c10d rendezvous on n1, one CPU rank per node (gloo), a tiny BERT. The only
test hook is a launcher wrapper first in the job's PATH (it runs the real launcher with
this interpreter): it records each node's launcher pid (so a test can kill a
"node") and, while a flag file exists, asks capscale to stall in the middle of writing
one checkpoint (``CAPSCALE_TEST_STALL_CHECKPOINT_STEP``) so a preemption lands at a
known point; the flag is removed before the preemption, so the requeued job runs plain.

Checked: both launchers rendezvous and the job exports a model transformers loads
(zero3, fsdp2); ``scontrol requeue`` and the time-limit signal (USR1 to the batch shell,
which the script traps and turns into a requeue) bring the job back, it resumes from the
latest checkpoint and ends bit-identical to an uninterrupted job; a node whose launcher
and ranks are SIGKILLed ends the job non-zero well within the collective timeout and
leaves the last complete checkpoint loadable.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _tiny_run import ROOT, descendants, overrides, setup
from test_resume import assert_same_run

from capscale.checks import load_run_config
from capscale.config import save_config
from capscale.train.checkpoint import STATE_FILE, list_checkpoints

pytestmark = pytest.mark.slurm

SCRIPT = ROOT / "slurm" / "prune_large.sh"
CLUSTER = ROOT / "scripts" / "slurm_local.sh"
EVERY = 3  # checkpoint.every_steps; the 2-rank runs have 12 steps
STALL = 6  # the checkpoint a preempted job is stalled in (step 3 is then the latest)
TIMEOUT_S = 30.0  # train.collective_timeout_s of the node-death job
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
        "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
SHARDS = {"zero3": "deepspeed/state/*", "fsdp2": "dcp/*.distcp"}

# Records this node's launcher pid, then becomes the real launcher (same pid).
WRAPPER = """#!/usr/bin/env bash
echo $$ > "$CAPSCALE_TEST_JOB_DIR/launcher-$SLURMD_NODENAME.pid"
# Both "nodes" share one host: a non-head launcher that binds the rendezvous port first
# (it takes n1 for a local name) makes accelerate's port check on the head node fail.
# On a real cluster the port on the head node is the head's alone.
if [[ "$SLURM_NODEID" != 0 && "$(basename "$0")" == accelerate ]]; then sleep 3; fi
if [[ -e "$CAPSCALE_TEST_JOB_DIR/stall" ]]; then
  export CAPSCALE_TEST_STALL_CHECKPOINT_STEP=$(<"$CAPSCALE_TEST_JOB_DIR/stall")
fi
exec {python} -m {module} "$@"
"""
LAUNCHERS = {"torchrun": "torch.distributed.run",
             "accelerate": "accelerate.commands.accelerate_cli"}
# The uninterrupted jobs cover both launchers the script offers.
LAUNCHER_OF = {"zero3": "torchrun", "fsdp2": "accelerate"}


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> dict[str, str]:
    """A running two-node cluster (started here, stopped at the end); its client env."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root on Linux (slurmd, munged, /etc/hosts)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and apt-get is not available to install it")
    # Own state folder and ports: a cluster a developer runs on the defaults is left alone.
    state = tmp_path_factory.mktemp("slurm-state")
    env = dict(os.environ, CAPSCALE_SLURM_DIR=str(state), CAPSCALE_SLURM_PORT="17100",
               SLURM_CONF=str(state / "slurm.conf"))
    r = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0 and "apt-get" in r.stderr:
        pytest.skip(f"could not install Slurm: {r.stderr.strip()}")
    assert r.returncode == 0, r.stdout + r.stderr
    yield env
    subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return setup(tmp_path_factory.mktemp("slurm_assets"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scontrol_job(env: dict[str, str], job: int) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", str(job)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


class Job:
    """One sbatch submission of slurm/prune_large.sh and its files."""

    def __init__(self, slurm: dict[str, str], assets: dict[str, Path], base: Path,
                 strategy: str, stall: int | None = None, launcher: str = "torchrun",
                 **extra: object) -> None:
        self.dir, self.out, self.env = base / "job", base / "run", slurm
        (self.dir / "bin").mkdir(parents=True)
        wrapper = self.dir / "bin" / launcher
        wrapper.write_text(WRAPPER.format(python=sys.executable, module=LAUNCHERS[launcher]))
        wrapper.chmod(0o755)
        if stall is not None:
            (self.dir / "stall").write_text(str(stall))
        cfg = load_run_config(None, overrides(
            assets, self.out, **{"checkpoint.every_steps": EVERY, "report.enabled": False,
                                 "train.collective_timeout_s": 120, "train.progress": True,
                                 **extra}))
        save_config(cfg, self.dir / "tiny.yaml")
        job_env = dict(
            slurm, PATH=f"{self.dir / 'bin'}:{slurm['PATH']}", PYTHONPATH=str(ROOT),
            CAPSCALE_TEST_JOB_DIR=str(self.dir), CONFIG=str(self.dir / "tiny.yaml"),
            OUTPUT_DIR=str(self.out), STRATEGY=strategy, LAUNCHER=launcher,
            MAIN_PORT=str(_free_port()), REPO_DIR=str(ROOT),
            CAPSCALE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
            DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
        # Ranks per node come from the allocation (--gpus-per-node=0: one CPU rank).
        for name in ("CAPSCALE_TEST_STALL_CHECKPOINT_STEP", "GPUS_PER_NODE", "PYTHONWARNINGS",
                     "CAPSCALE_PROGRESS_INTERVAL_S"):
            job_env.pop(name, None)
        # Command-line options override the script's #SBATCH lines: no GPUs, one core
        # per node. The script's --open-mode=append keeps a requeued run's output after
        # the first one's (the usr1 test reads the first run's lines).
        r = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1",
                            f"--output={self.dir / 'job.out'}",
                            f"--chdir={ROOT}", str(SCRIPT)],
                           env=job_env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        self.id = int(r.stdout.strip().split(";")[0])
        self.started = time.monotonic()

    def info(self) -> dict[str, str]:
        return _scontrol_job(self.env, self.id)

    def log(self) -> str:
        path = self.dir / "job.out"
        return path.read_text() if path.exists() else ""

    def wait_until(self, ready, what: str, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        while not ready():
            state = self.info()["JobState"]
            if state in DONE:
                pytest.fail(f"job {self.id} ended ({state}) before {what}:\n"
                            f"{self.log()[-3000:]}")
            if time.monotonic() > end:
                self.cancel()
                pytest.fail(f"job {self.id}: no {what} after {timeout} s:\n"
                            f"{self.log()[-3000:]}")
            time.sleep(0.05)

    def wait_done(self, timeout: float = 300) -> dict[str, str]:
        end = time.monotonic() + timeout
        while (info := self.info())["JobState"] not in DONE:
            if time.monotonic() > end:
                self.cancel()
                pytest.fail(f"job {self.id} still {info['JobState']} after {timeout} s:\n"
                            f"{self.log()[-3000:]}")
            time.sleep(0.2)
        self.seconds = time.monotonic() - self.started
        return info

    def release_requeued(self, timeout: float = 60) -> None:
        """Start the requeued job now: Slurm holds a requeued job back for 120 s
        (``Reason=BeginTime``) before it may run again; the test need not wait that out."""
        end = time.monotonic() + timeout
        while not ((info := self.info())["JobState"] == "PENDING"
                   and int(info["Restarts"]) >= 1):
            if time.monotonic() > end or info["JobState"] in DONE:
                pytest.fail(f"job {self.id} not requeued ({info['JobState']}):\n"
                            f"{self.log()[-3000:]}")
            time.sleep(0.1)
        subprocess.run(["scontrol", "update", f"JobId={self.id}", "StartTime=now"],
                       env=self.env, check=True, capture_output=True, timeout=30)

    def cancel(self) -> None:
        subprocess.run(["scancel", str(self.id)], env=self.env, capture_output=True)

    def launcher_pid(self, node: str) -> int:
        return int((self.dir / f"launcher-{node}.pid").read_text())

    def assert_no_processes_left(self, timeout: float = 15) -> None:
        """No launcher or rank of this job survives it (found by their environment)."""
        mark = f"CAPSCALE_TEST_JOB_DIR={self.dir}".encode()
        end = time.monotonic() + timeout
        while True:
            left = []
            for proc in Path("/proc").iterdir():
                with contextlib.suppress(OSError):
                    if proc.name.isdigit() and mark in (proc / "environ").read_bytes().split(
                            b"\0"):
                        left.append(f"{proc.name}: {(proc / 'cmdline').read_bytes()[:200]!r}")
            if not left:
                return
            if time.monotonic() > end:
                pytest.fail(f"job {self.id} left processes behind: {left}")
            time.sleep(0.2)


def _assert_completed(job: Job, info: dict[str, str]) -> None:
    log = job.log()
    # Seen once in ~15 jobs: the run finished and exported, then a rank aborted while its
    # process exited (C++ thread torn down), failing the job. Say so, but still fail.
    teardown = ("; the run had finished: a rank aborted at exit ('terminate called')"
                if (job.out / "results.json").is_file() and "terminate called" in log else "")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        f"{info['JobState']} {info['ExitCode']}{teardown}:\n{log[-3000:]}"
    assert (job.out / "results.json").is_file()
    job.assert_no_processes_left()


@pytest.fixture(scope="module")
def finished(slurm, assets, tmp_path_factory) -> Callable[[str], Job]:
    """Uninterrupted jobs by strategy, run once (zero3's is the preemption reference)."""
    cache: dict[str, Job] = {}

    def get(strategy: str) -> Job:
        if strategy not in cache:
            job = Job(slurm, assets, tmp_path_factory.mktemp(f"slurm-{strategy}"), strategy,
                      launcher=LAUNCHER_OF[strategy])
            _assert_completed(job, job.wait_done())
            print(f"slurm {strategy} job: {job.seconds:.1f} s")
            cache[strategy] = job
        return cache[strategy]
    return get


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_two_node_job_exports_a_loadable_model(finished, strategy):
    job = finished(strategy)
    log = job.log()
    assert "capscale: 2 node(s) x 1 GPU(s) = 2 ranks; head node n1:" in log
    # Plain progress lines in the output file (not a terminal): the first, the last with
    # its status; and no per-collective deprecation warnings burying them.
    assert re.search(r"^\[[\d: -]+\] CAP pruning 0/12 \(0\.0%\)", log, re.M), log[-3000:]
    assert re.search(r"^\[[\d: -]+\] CAP pruning 12/12 \(100\.0%\) \| sp=0\.50 .* ex/s \| "
                     r".* \| elapsed \d:\d\d:\d\d$", log, re.M), log[-3000:]
    assert "FutureWarning" not in log
    for node in ("n1", "n2"):  # each node started its own launcher
        assert job.launcher_pid(node) > 0
    ckpt = list_checkpoints(job.out / "checkpoints")[-1]
    assert json.loads((ckpt / STATE_FILE).read_text())["world_size"] == 2
    assert len(list(ckpt.glob(SHARDS[strategy]))) >= 2, "both ranks wrote their shards"
    results = json.loads((job.out / "results.json").read_text())
    assert results["steps"] == 12  # 24 batches of 8 over 2 ranks
    # The export needs nothing but transformers.
    code = ("import sys, torch, transformers as t; "
            "m = t.AutoModelForSequenceClassification.from_pretrained(sys.argv[1]); "
            "tok = t.AutoTokenizer.from_pretrained(sys.argv[1]); "
            "print(m(**tok(['a good movie'], return_tensors='pt')).logits.shape)")
    r = subprocess.run([sys.executable, "-c", code, str(job.out / "pruned" / "model")],
                       capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torch.Size([1, 2])" in r.stdout


@pytest.mark.parametrize("how", ["requeue", "usr1"])
def test_preempted_job_requeues_resumes_and_matches_uninterrupted(finished, slurm, assets,
                                                                  tmp_path, how):
    reference = finished("zero3")
    job = Job(slurm, assets, tmp_path, "zero3", stall=STALL)
    partial = job.out / "checkpoints" / f".tmp-step-{STALL:08d}"
    job.wait_until(lambda: (partial / "objective.pt").is_file(), f"checkpoint {STALL} half written")
    (job.dir / "stall").unlink()  # the requeued run must not stall again
    if how == "requeue":  # what a preempting scheduler does
        cmd = ["scontrol", "requeue", str(job.id)]
    else:  # what Slurm sends --signal=B:USR1@300 before the time limit
        cmd = ["scancel", "--signal=USR1", "--batch", str(job.id)]
    subprocess.run(cmd, env=slurm, check=True, capture_output=True, timeout=30)
    job.release_requeued()
    info = job.wait_done()
    print(f"slurm {how} job: {job.seconds:.1f} s")
    _assert_completed(job, info)
    assert int(info["Restarts"]) == 1, info
    log = " ".join(job.log().split())
    if how == "usr1":
        assert f"capscale: caught signal, requeueing job {job.id}" in log
    assert f"(step {STALL - EVERY}, epoch" in log, "did not resume from the latest checkpoint"
    assert not partial.exists(), "the half-written checkpoint is cleaned up"
    assert_same_run(reference.out, job.out)


def test_dead_node_fails_the_job_without_hanging(slurm, assets, tmp_path):
    job = Job(slurm, assets, tmp_path, "zero3", **{"train.collective_timeout_s": TIMEOUT_S})
    ckpts = job.out / "checkpoints"
    job.wait_until(lambda: list_checkpoints(ckpts) and (job.dir / "launcher-n2.pid").exists(),
                   "a first checkpoint")
    # Node n2 goes away: its launcher and its rank die at once.
    launcher = job.launcher_pid("n2")
    killed_at = time.monotonic()
    for pid in [launcher, *descendants(launcher)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    info = job.wait_done(timeout=TIMEOUT_S + 90)
    took = time.monotonic() - killed_at
    print(f"slurm dead-node job: {job.seconds:.1f} s, ended {took:.1f} s after the kill")
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info
    assert took < TIMEOUT_S + 30, f"ended {took:.0f} s after the node died"
    assert not (job.out / "results.json").exists()
    job.assert_no_processes_left()
    # The last complete checkpoint is whole: state, every rank's shards and RNG, loadable.
    last = list_checkpoints(ckpts)[-1]
    state = json.loads((last / STATE_FILE).read_text())
    assert state["step"] % EVERY == 0 and state["world_size"] == 2
    shards = sorted(last.glob(SHARDS["zero3"]))
    assert len(shards) >= 2
    for f in [*shards, *last.glob("rng_rank*.pt")]:
        torch.load(f, map_location="cpu", weights_only=False)
    assert len(list(last.glob("rng_rank*.pt"))) == 2

"""slurm/prune_large.sh: syntax, and its dry run under a faked 2-node allocation."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "slurm" / "prune_large.sh"

# Like Slurm: `scontrol show hostnames` expands the node list; srun starts its command
# once per node with that node's SLURM_NODEID (options before the command are skipped).
FAKE_SCONTROL = """#!/usr/bin/env bash
if [[ "$1 $2" == "show hostnames" ]]; then printf 'gpu-node-017\\ngpu-node-018\\n'; fi
"""
FAKE_SRUN = """#!/usr/bin/env bash
while [[ "$1" == -* ]]; do shift; done
hosts=(gpu-node-017 gpu-node-018)
for ((i = 0; i < SLURM_NNODES; i++)); do
  SLURM_NODEID=$i SLURMD_NODENAME=${hosts[$i]} SLURM_PROCID=$i "$@" || exit $?
done
"""


@pytest.fixture
def fake_slurm(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_NODELIST="gpu-node-[017-018]",
               SLURM_NNODES="2", SLURM_NODEID="0", SLURM_JOB_ID="4242",
               SLURM_JOB_NAME="capscale-prune", SLURM_SUBMIT_DIR=str(tmp_path / "repo"),
               GPUS_PER_NODE="8", DRY_RUN="1")
    return env


def _run(env: dict[str, str], **extra: str) -> list[str]:
    out = subprocess.run(["bash", str(SCRIPT)], env={**env, **extra}, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line.startswith("[node ")]


def test_script_syntax() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --ntasks-per-node=1" in text
    assert "trap requeue USR1" in text
    assert "#SBATCH --open-mode=append" in text  # a requeue must not truncate the log


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_dry_run_two_nodes_accelerate(fake_slurm: dict[str, str]) -> None:
    lines = _run(fake_slurm, CONFIG="capscale/configs/big.yaml", STRATEGY="zero3",
                 EXTRA="train.lr=2.0e-5 cap.bank_sharding=sharded", OUTPUT_DIR="/scratch/run 1")
    assert len(lines) == 2  # one launcher per node
    for node, line in enumerate(lines):
        assert line.startswith(f"[node {node}] cd ")
        assert "accelerate launch --multi_gpu" in line
        for flag, value in (("num_machines", "2"), ("num_processes", "16"),
                            ("main_process_ip", "gpu-node-017"),
                            ("main_process_port", "29500"), ("rdzv_backend", "c10d"),
                            ("machine_rank", str(node))):
            assert re.search(rf"--{flag} {re.escape(value)}( |$)", line), (flag, line)
        args = line.split("capscale/run.py ", 1)[1]
        assert args.startswith("--config capscale/configs/big.yaml ")
        for override in (r"output_dir=/scratch/run\ 1", "strategy=zero3", "resume=latest",
                         "train.lr=2.0e-5", "cap.bank_sharding=sharded"):
            assert override in args.split(" ") or override in args, (override, args)


def test_real_run_starts_one_launcher_per_node(fake_slurm: dict[str, str],
                                               tmp_path: Path) -> None:
    """Without DRY_RUN the per-node string is executed: a fake `accelerate` records the
    arguments each node's launcher got (quoting and the node rank survive srun)."""
    (tmp_path / "repo").mkdir()
    log = tmp_path / "launches.txt"
    fake = tmp_path / "bin" / "accelerate"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s|" "$PWD" "$@" >> {log}\necho >> {log}\n')
    fake.chmod(0o755)
    _run(fake_slurm, DRY_RUN="0", EXTRA="train.max_steps=5", OUTPUT_DIR="/scratch/run 1")
    launches = log.read_text().splitlines()
    assert len(launches) == 2
    for node, line in enumerate(launches):
        args = line.split("|")
        assert args[0] == str(tmp_path / "repo")  # ran from the submission directory
        assert args[args.index("--machine_rank") + 1] == str(node)
        assert "output_dir=/scratch/run 1" in args  # one argument, space kept
        assert args[-3:-1] == ["resume=latest", "train.max_steps=5"]


def test_dry_run_torchrun_and_resume_off(fake_slurm: dict[str, str]) -> None:
    lines = _run(fake_slurm, LAUNCHER="torchrun", RESUME="0", GPUS_PER_NODE="4",
                 MAIN_PORT="6000")
    assert len(lines) == 2
    for node, line in enumerate(lines):
        assert "torchrun --nnodes 2 --nproc_per_node 4" in line
        assert "--rdzv_backend c10d --rdzv_endpoint gpu-node-017:6000" in line
        assert f"--node_rank {node} " in line
        assert "resume=latest" not in line


def test_refuses_outside_an_allocation_and_bad_launcher(fake_slurm: dict[str, str]) -> None:
    env = {k: v for k, v in fake_slurm.items() if k != "SLURM_JOB_NODELIST"}
    out = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "sbatch" in out.stderr
    out = subprocess.run(["bash", str(SCRIPT)], env={**fake_slurm, "LAUNCHER": "mpirun"},
                         capture_output=True, text=True)
    assert out.returncode == 2 and "LAUNCHER" in out.stderr


@pytest.mark.parametrize(("alloc", "expected"), [
    ({"SLURM_GPUS_ON_NODE": "4"}, "4"),
    ({"SLURM_GPUS_PER_NODE": "a100:2"}, "2"),  # --gpus-per-node=a100:2
    ({"SLURM_GPUS_PER_NODE": "0"}, "1"),  # --gpus-per-node=0 (CPU nodes): one rank each
])
def test_ranks_per_node_follow_the_allocation(fake_slurm: dict[str, str], alloc, expected):
    lines = _run({**fake_slurm, "GPUS_PER_NODE": "", **alloc}, LAUNCHER="torchrun")
    assert len(lines) == 2
    assert all(f"--nproc_per_node {expected} " in line for line in lines), lines


def test_refuses_a_bad_ranks_per_node(fake_slurm: dict[str, str]) -> None:
    out = subprocess.run(["bash", str(SCRIPT)], env={**fake_slurm, "GPUS_PER_NODE": "x"},
                         capture_output=True, text=True)
    assert out.returncode == 2 and "GPUS_PER_NODE" in out.stderr

"""Real-size CAP scale-out on this CPU machine: a RoBERTa-large-shaped encoder, one
process per rank, per-rank memory of every component, step and gather times.

What runs: ``capscale.recipe.CAPRecipe`` (movement pruning, PrC + FiC + SnC in bank
mode, KD) built with ``recipe.setup()`` and stepped with ``recipe.train_step``, on a
RobertaConfig(hidden 1024, 24 layers, 16 heads, FFN 4096, vocab 50265, 514 positions)
with random weights (355.4 M parameters with the 3-way classification head), saved to a
temp folder with the packaged MiniLM WordPiece tokenizer (30522 ids; the embedding
keeps RoBERTa's 50265 rows so the parameter count is RoBERTa-large's; ``pad_token_id``
is the tokenizer's [PAD], 0). The teacher (``model.teacher``) is the same saved
encoder, so no teacher is fine-tuned; ``model.student_init: pretrained`` makes PrC
encode the student itself before pruning (no third model). Pruning scope is ``local``
(top-k per matrix, the reference recipe): ``global`` finds its threshold by 32
bisection passes over every score (``kth_largest``), about 1.5 s per pass over 302 M
scores on one thread here, i.e. ~50 s a step at this size. Jobs: world 1 (single,
zero3, fsdp2) and world 2 (ddp, zero3, fsdp2); each rank is a process started here
with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT / CAPSCALE_CPU=1 /
DS_ACCELERATOR=cpu, one torch thread. A job whose estimated memory (``estimate``)
exceeds the guard is not started and is reported as skipped with the estimate; a
running job whose ranks' summed RSS passes ``--guard-gib`` (or whose machine
MemAvailable drops under 1 GiB) is killed and reported as killed.

Then ``--largest`` tries RoBERTa-large-width encoders with more layers under ZeRO-3
with ``offload_params`` / ``offload_optimizer`` at world 2, the largest first among those
whose estimate (from the measured zero3 bytes per parameter) fits, and writes the
single-process breakdown: which component's bytes take one process past the machine.

Commands (from the repository root):

    PYTHONPATH=. python bench/scale_real.py --largest     # -> bench/results/scale_real.{json,md}
    PYTHONPATH=. python bench/scale_real.py --quick --out /tmp/sr   # smoke: 2 layers, hidden 64

What produced bench/results/scale_real.* (2 cores, 23.5 GiB; the default DeepSpeed
config and glibc's dynamic mmap threshold did not fit, see the notes there):

    PYTHONPATH=. python bench/scale_real.py --largest --work /tmp/scale_real_work
    PYTHONPATH=. python bench/scale_real.py --ds-lean --merge --malloc-mmap-threshold 1048576 \
        --guard-gib 21 --jobs 1:zero3,2:zero3,2:fsdp2 --largest --largest-tries 2 \
        --largest-budget-s 300 --work /tmp/scale_real_work
    PYTHONPATH=. python bench/scale_real.py --ds-lean --merge --malloc-mmap-threshold 1048576 \
        --guard-gib 21 --jobs 2:zero3,1:fsdp2,1:single --work /tmp/scale_real_work
    PYTHONPATH=. python bench/scale_real.py --jobs none --merge --malloc-mmap-threshold 1048576 \
        --ds-lean --largest-from <the second call's results JSON> --work /tmp/scale_real_work

The GPU plan in the markdown is arithmetic on the measured bytes per parameter, not a
measurement: no GPU was used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024 ** 3
JOBS: list[tuple[int, str]] = [(1, "single"), (1, "zero3"), (1, "fsdp2"),
                               (2, "ddp"), (2, "zero3"), (2, "fsdp2")]
NUM_LABELS = 3


@dataclass(frozen=True)
class Shape:
    """An encoder shape (RoBERTa layout)."""

    hidden: int = 1024
    layers: int = 24
    heads: int = 16
    intermediate: int = 4096
    vocab: int = 50265
    positions: int = 514

    @property
    def name(self) -> str:
        return f"roberta h{self.hidden} L{self.layers} ffn{self.intermediate}"

    def params(self) -> int:
        """Parameters of RobertaForSequenceClassification (3 labels), no pooler."""
        h, f = self.hidden, self.intermediate
        emb = (self.vocab + self.positions + 1) * h + 2 * h
        layer = 4 * (h * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h
        head = h * h + h + h * NUM_LABELS + NUM_LABELS
        return emb + self.layers * layer + head

    def scored(self) -> int:
        """Weights that carry movement scores: the encoder's linear layers."""
        h, f = self.hidden, self.intermediate
        return self.layers * (4 * h * h + 2 * h * f)


LARGE = Shape()
QUICK = Shape(hidden=64, layers=2, heads=4, intermediate=128, vocab=50265, positions=64)


# -- memory model (for skipping and for the plan; measured figures replace it) ---------
def estimate(shape: Shape, strategy: str, world: int, offload: bool = False) -> dict[str, float]:
    """Bytes per rank by component (fp32 everywhere; a rough model, not a measurement).

    single / ddp: student + scores + their grads + AdamW moments + teacher (ddp adds
    its gradient buckets). zero3: bf16-free fp32 partitions, a fp32 master copy, AdamW
    moments and a gradient partition of student + scores, the teacher's partition.
    fsdp2: shards of parameters, grads and moments; the teacher's shard. All: the
    full student + teacher each rank loads before it shards them (setup transient).
    """
    n, s = shape.params(), shape.scored()
    t = n + s  # trainable values
    w = world if strategy in ("zero3", "fsdp2") else 1
    comp = {"student": 4 * n / w, "scores": 4 * s / w, "grads": 4 * t / w,
            "optimizer": (12 if strategy == "zero3" else 8) * t / w, "teacher": 4 * n / w}
    if strategy == "ddp":
        comp["ddp_buckets"] = 4 * t
    comp["base"] = 0.7 * GIB
    steady = sum(comp.values())
    transient = 4 * (n + s + n) + 0.7 * GIB  # full student + scores + teacher, unsharded
    comp["peak_estimate"] = max(steady, transient)
    return comp


# -- assets ------------------------------------------------------------------------------
def build_assets(root: Path, shape: Shape, n_train: int) -> dict[str, str]:
    """Encoder folder (random weights + MiniLM tokenizer) and train / validation CSVs."""
    root.mkdir(parents=True, exist_ok=True)
    enc = root / "encoder"
    if not (enc / "config.json").exists() and shape.params() < 20e6:
        _build_encoder(shape, enc)  # tiny: in this process
    elif not (enc / "config.json").exists():  # a child process: its memory is given back
        subprocess.run([sys.executable, __file__, "--_build", json.dumps(asdict(shape)),
                        str(enc)], check=True, env=_child_env())
    from capscale.models.loading import load_tokenizer
    tok = load_tokenizer("minilm")
    words = [w for w, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
             if w.isalpha() and len(w) > 3 and 2000 <= i < 12000]
    import random
    rng = random.Random(0)
    paths = {"encoder": str(enc)}
    for split, n in (("train", n_train), ("validation", 16)):
        rows = ["sentence,label"]
        for _ in range(n):
            label = rng.randrange(NUM_LABELS)
            third = len(words) // NUM_LABELS
            pool = words[label * third:(label + 1) * third]
            rows.append(f"{' '.join(rng.choice(pool) for _ in range(40))},{'abc'[label]}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
        paths[split] = str(root / f"{split}.csv")
    return paths


def _build_encoder(shape: Shape, out: Path) -> None:
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from capscale.models.loading import load_tokenizer
    torch.set_num_threads(1)
    tok = load_tokenizer("minilm")
    cfg = RobertaConfig(hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                        num_attention_heads=shape.heads, intermediate_size=shape.intermediate,
                        vocab_size=max(shape.vocab, len(tok)),
                        max_position_embeddings=shape.positions, type_vocab_size=1,
                        pad_token_id=tok.pad_token_id, num_labels=NUM_LABELS)
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)


# -- one rank --------------------------------------------------------------------------
def _status(field: str) -> int:
    """A VmXXX line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _local_bytes(t: Any) -> int:
    local = getattr(t, "ds_tensor", None)
    if local is None:
        local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _state_bytes(state: Any) -> int:
    import torch
    total = 0
    for per_param in state.values():
        for v in per_param.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                total += _local_bytes(v)
    return total


def optimizer_bytes(opt: Any) -> dict[str, int]:
    """This rank's optimiser state: AdamW moments (+ ZeRO-3's fp32 master partitions
    and its flat gradient partition buffer, reported apart)."""
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # DeepSpeed ZeRO-3
        master = sum(t.numel() * t.element_size() for t in opt.fp32_partitioned_groups_flat)
        buf = getattr(opt, "grad_partitions_flat_buffer", None)
        return {"optimizer": master + _state_bytes(opt.optimizer.state),
                "optimizer_master": master,
                "optimizer_moments": _state_bytes(opt.optimizer.state),
                "grad_buffer": 0 if buf is None else buf.numel() * buf.element_size()}
    moments = _state_bytes(opt.state)
    return {"optimizer": moments, "optimizer_master": 0, "optimizer_moments": moments,
            "grad_buffer": 0}


def cap_config(assets: dict[str, str], length: int, steps: int, batch_size: int,
               max_snapshots: int, output_dir: str) -> dict[str, Any]:
    """The benchmark's CAP run (a config dict): movement pruning with local top-k, PrC /
    FiC / SnC in bank mode, KD from the same saved encoder, the student the pre-trained
    encoder itself."""
    return {
        "model": {"name_or_path": assets["encoder"], "teacher": assets["encoder"],
                  "student_init": "pretrained"},
        "data": {"train_file": assets["train"], "validation_file": assets["validation"],
                 "max_length": length},
        "pruning": {"method": "movement", "scope": "local", "initial_sparsity": 0.3,
                    "final_sparsity": 0.7, "initial_warmup": 0, "final_warmup": 0.3,
                    "zero_pruned_weights": True},
        "cap": {"mode": "bank", "num_negatives": 8, "snapshot_schedule": "epoch",
                "max_snapshots": max_snapshots},
        "train": {"epochs": 1, "max_steps": steps, "batch_size": batch_size, "lr": 1e-4,
                  "eval_batch_size": 8, "grad_clip": 1.0, "progress": False, "seed": 3},
        "output_dir": output_dir,
    }


def worker(spec: dict[str, Any]) -> None:
    """One rank: set up the recipe, time the steps, record bytes; writes its JSON."""
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from capscale.checks import run_config_from_dict
    from capscale.console import Console
    from capscale.data import Collator
    from capscale.distributed import init_distributed, local_param_bytes
    from capscale.recipe import CAPRecipe

    sys.path.insert(0, str(ROOT / "bench"))
    from scaleout_memory import gather_cost

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    t_start = time.perf_counter()
    ctx = init_distributed(spec["strategy"])
    a, gb = spec["assets"], spec["global_batch"]
    cfg = run_config_from_dict({
        **cap_config(a, spec["length"], spec["steps"], gb // world, 2, spec["workdir"]),
        "distributed": {"offload_params": spec["offload"],
                        "offload_optimizer": spec["offload"],
                        "deepspeed_config": spec.get("ds_config")}})
    recipe = CAPRecipe(cfg, ctx, Console(enabled=False))
    recipe.setup()
    recipe.snapshot(cfg.cap.snapshot_train_mode, "bench snapshot")  # SnC bank: one view
    setup_s = time.perf_counter() - t_start
    setup_hwm = _status("VmHWM")
    ds = recipe.loaders.bank.dataset
    per = gb // world
    hidden = spec["hidden"]
    out = Path(spec["out"]).with_suffix(f".rank{rank}.json")
    times: list[float] = []

    def record(phase: str, gathers: dict[str, Any] | None) -> None:
        """This rank's figures so far (rewritten after setup and every step, so a job
        killed at the memory guard still reports what it measured)."""
        student = recipe.student.model
        scores = sum(_local_bytes(p) for p in recipe.controller.pruner.score_parameters())
        rec = {"rank": rank, "world": world, "strategy": ctx.strategy,
               "offload": spec["offload"], "phase": phase,
               "peak_rss": _status("VmHWM"), "setup_peak_rss": setup_hwm,
               "rss_end": _status("VmRSS"),
               "student": local_param_bytes(student) - scores, "scores": scores,
               **optimizer_bytes(recipe.student.optimizer),
               "teacher": (local_param_bytes(recipe.teacher) if recipe.teacher is not None
                           else 0),
               "prc": 0,  # student_init pretrained: PrC encodes the student itself
               "step_s": times,
               "median_step_s": statistics.median(times[1:] or times) if times else None,
               "setup_s": setup_s, "gather_s": gathers}
        out.write_text(json.dumps(rec))

    record("setup", None)
    for step in range(spec["steps"]):
        start = (step * gb) % max(1, len(ds) - gb + 1) + rank * per
        batch = Collator(0)([ds[i] for i in range(start, start + per)])
        ctx.barrier()
        t0 = time.perf_counter()
        recipe.train_step(batch)
        times.append(time.perf_counter() - t0)
        record(f"step {step + 1}", None)
    gathers = {"local": gather_cost(ctx, per, hidden), "32": gather_cost(ctx, 32, hidden),
               "shapes": {"local": [per, hidden], "32": [32, hidden]}}
    record("done", gathers)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


LEAN_DS = {  # ZeRO-3 with bounded working memory (capscale fills the "auto" values)
    "zero_optimization": {
        "stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        # optimiser step over 1e8-element sub-groups: AdamW temporaries of 0.4 GB, not of
        # the whole flat partition; at most 1e8 gathered parameters kept live
        "sub_group_size": 100_000_000, "stage3_max_live_parameters": 100_000_000,
        "stage3_max_reuse_distance": 100_000_000},
    "steps_per_print": 2147483647,
}


# -- the parent: jobs with a memory guard -----------------------------------------------
EXTRA_ENV: dict[str, str] = {}  # --malloc-mmap-threshold


def _child_env() -> dict[str, str]:
    env = dict(os.environ, **EXTRA_ENV, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CAPSCALE_CPU="1",
               DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def run_job(spec: dict[str, Any], world: int, guard: float, timeout: float,
            script: str = __file__, base_env: dict[str, str] | None = None
            ) -> dict[str, Any]:
    """Start ``world`` rank processes of ``script --_worker <spec>`` (this file's worker
    unless told; bench/scale_train.py uses its own); poll their RSS; kill them past the
    guard. ``base_env``: the ranks' environment before the rank variables.

    The rendezvous port is free when picked but not held until rank 0 binds it, so a
    process starting meanwhile (parallel jobs, other tests) can take it; a job whose
    rank 0 found it taken is started again on another port (three tries)."""
    for _ in range(3):
        job = _run_job_once(spec, world, guard, timeout, script, base_env)
        if "EADDRINUSE" not in job["status"]:
            break
    return job


def _run_job_once(spec: dict[str, Any], world: int, guard: float, timeout: float,
                  script: str, base_env: dict[str, str] | None) -> dict[str, Any]:
    port = _free_port()
    spec_path = Path(spec["out"]).with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    procs = []
    for rank in range(world):
        env = dict(base_env or _child_env(), RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        with open(Path(spec["out"]).with_suffix(f".rank{rank}.log"), "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, script, "--_worker", str(spec_path)], env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True))
    t0, peak_sum, why = time.time(), 0, None
    while any(p.poll() is None for p in procs):
        total = sum(_rss(p.pid) for p in procs if p.poll() is None)
        peak_sum = max(peak_sum, total)
        if total > guard:
            why = f"killed: ranks' RSS {total / GIB:.1f} GiB passed the {guard / GIB:.1f} GiB guard"
        elif _available() < GIB:
            why = f"killed: MemAvailable under 1 GiB (ranks' RSS {total / GIB:.1f} GiB)"
        elif time.time() - t0 > timeout:
            why = f"killed: over the {timeout:.0f} s timeout"
        if why:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(0.25)
    for p in procs:
        p.wait()
    ranks = []
    for rank in range(world):
        f = Path(spec["out"]).with_suffix(f".rank{rank}.json")
        if f.exists():
            ranks.append(json.loads(f.read_text()))
    rc = [p.returncode for p in procs]
    if why is None and (len(ranks) < world or any(rc)):
        tail = Path(spec["out"]).with_suffix(".rank0.log").read_text()[-2000:]
        why = f"failed: return codes {rc}; rank 0 log tail: {tail}"
    return {"world": world, "strategy": spec["strategy"], "offload": spec.get("offload", False),
            "status": why or "ok", "wall_s": time.time() - t0,
            "ranks_rss_sum_peak_polled": peak_sum, "ranks": ranks}


def load_avg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# -- analysis --------------------------------------------------------------------------
COMPONENTS = ("student", "scores", "optimizer", "grad_buffer", "teacher", "prc")


def per_rank_max(job: dict[str, Any], key: str) -> float:
    return max(r[key] for r in job["ranks"]) if job["ranks"] else float("nan")


def ratios(jobs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """World 2 / world 1 of each reference's and of student+scores+optimiser bytes per rank."""
    out = {}
    def usable(j: dict[str, Any]) -> bool:  # done, or killed after its optimiser existed
        return bool(j["ranks"]) and len(j["ranks"]) == j["world"] and (
            j["status"] == "ok" or all(r["optimizer"] > 0 for r in j["ranks"]))

    by = {(j["world"], j["strategy"], j["offload"], j.get("ds_config")): j for j in jobs
          if usable(j)}
    for strat, configs in (("zero3", ("lean", "default")), ("fsdp2", (None,))):
        pairs = [(by.get((1, strat, False, c)), by.get((2, strat, False, c))) for c in configs]
        one, two = next(((a, b) for a, b in pairs if a and b), (None, None))
        if one is None or two is None:
            continue
        r: dict[str, Any] = {}
        for key in ("teacher",):
            r[key] = per_rank_max(two, key) / per_rank_max(one, key)
        train = ("student", "scores", "optimizer")
        r["student+scores+optimizer"] = (max(sum(x[k] for k in train) for x in two["ranks"])
                                         / max(sum(x[k] for k in train) for x in one["ranks"]))
        r["peak_rss"] = per_rank_max(two, "peak_rss") / per_rank_max(one, "peak_rss")
        r["ds_config"] = one.get("ds_config")
        r["source"] = "; ".join(
            f"world {j['world']}: {j['status'][:60]}"
            + ("" if j["status"] == "ok" else " (bytes as recorded at "
               + ", ".join(sorted({x.get("phase", "?") for x in j["ranks"]})) + ")")
            for j in (one, two))
        r["meets_0.55"] = all(r[k] <= 0.55 for k in ("teacher", "student+scores+optimizer"))
        out[strat] = r
    return out


def bytes_per_param(job: dict[str, Any], shape: Shape) -> dict[str, float]:
    """Summed over ranks, per model parameter, of each component."""
    n = shape.params()
    out = {k: sum(r[k] for r in job["ranks"]) / n for k in COMPONENTS}
    out["peak_rss_sum"] = sum(r["peak_rss"] for r in job["ranks"]) / n
    return out


def gpu_plan(jobs: list[dict[str, Any]], shape: Shape) -> list[dict[str, Any]]:
    """GPUs of 80 GiB needed per strategy for a few model sizes (arithmetic, not measured).

    Model state bytes per parameter come from the measured world-1 jobs (student +
    scores + optimiser + grads + teacher); activations / buffers are budgeted at 10 GiB
    per GPU. Replicated strategies need the whole state on one GPU; ZeRO-3 / FSDP2
    divide it by the GPU count.
    """
    by = {j["strategy"]: j for j in jobs if j["world"] == 1 and j["status"] == "ok"}
    plan = []
    for label, n in (("RoBERTa-large 355M", 355e6), ("encoder 1.3B", 1.3e9),
                     ("encoder 3B", 3e9)):
        for strat, src in (("ddp", "single"), ("zero3", "zero3"), ("fsdp2", "fsdp2")):
            if src not in by:
                continue
            b = bytes_per_param(by[src], shape)
            # grads: torch frees them after the step (set_to_none) but they are live
            # between backward and step: 4 B per trainable value (params + scores).
            grads = 0.0 if strat == "zero3" else b["student"] + b["scores"]
            if strat == "ddp":  # its gradient buckets: one more fp32 copy of the grads
                grads *= 2
            per_param = b["student"] + b["scores"] + b["optimizer"] + b["grad_buffer"] \
                + b["teacher"] + grads
            state = per_param * n
            usable = (80 - 10) * GIB
            if strat == "ddp":
                gpus = 1 if state <= usable else None
            else:
                gpus = max(1, -(-int(state) // int(usable)))
            plan.append({"model": label, "params": n, "strategy": strat,
                         "bytes_per_param": per_param, "state_gib": state / GIB,
                         "gpus_80gib": gpus,
                         "arithmetic": f"{per_param:.1f} B/param x {n / 1e9:.2f}e9 = "
                                       f"{state / GIB:.1f} GiB; "
                                       + (f"<= 70 GiB: {'yes' if gpus else 'no'}"
                                          if strat == "ddp" else
                                          f"ceil({state / GIB:.1f} / 70) = {gpus}")})
    return plan


def single_process_breakdown(job: dict[str, Any], shape: Shape, machine: float
                             ) -> dict[str, Any]:
    """One process (a world-1 job): measured bytes per parameter of each component in
    the order setup allocates them, its other memory (peak RSS less the components)
    and the largest model the machine holds at these rates.

    torch optimisers free the gradients at every step (``set_to_none``), so they are
    not resident at the end; they are live between backward and step: counted as
    4 B per trainable value (student + scores), inferred, not read.
    """
    b = bytes_per_param(job, shape)
    order = [("student", b["student"]), ("teacher", b["teacher"]), ("scores", b["scores"]),
             ("optimizer" + (" (fp32 master + AdamW moments)" if b["grad_buffer"] else
                             " (AdamW moments)"), b["optimizer"])]
    if b["grad_buffer"]:
        order.append(("grad partition buffer", b["grad_buffer"]))
    else:
        order.append(("grads (live in backward..step; inferred)", b["student"] + b["scores"]))
    r0 = job["ranks"][0]
    rows, cum = [], 0.0
    for name, v in order:
        cum += v
        rows.append({"component": name, "bytes_per_param": v, "cumulative": cum})
    other = r0["peak_rss"] - sum(r0[k] for k in COMPONENTS)
    if not b["grad_buffer"]:
        other -= (r0["student"] + r0["scores"])  # the grads are inside the peak
    total = cum
    return {"strategy": job["strategy"], "rows": rows, "bytes_per_param_total": total,
            "other_bytes": other, "max_params_one_process": (machine - max(other, 0)) / total}


def cumulative_at(sp: dict[str, Any], params: int, machine: float) -> dict[str, Any]:
    """The one-process cumulative GiB of each component for a ``params`` model, and the
    first component that takes it past ``machine``."""
    rows, cum, first = [], sp["other_bytes"], None
    for row in sp["rows"]:
        cum += row["bytes_per_param"] * params
        rows.append({"component": row["component"], "gib": row["bytes_per_param"] * params
                     / GIB, "cumulative_gib": cum / GIB})
        if first is None and cum > machine:
            first = row["component"]
    return {"params": params, "rows": rows, "first_over": first}


def layers_for(params: float, hidden: int = 1024, intermediate: int = 4096) -> int:
    base = replace(LARGE, hidden=hidden, intermediate=intermediate, layers=0)
    per = replace(base, layers=1).params() - base.params()
    return int((params - base.params()) // per)


# -- markdown --------------------------------------------------------------------------
def _label(j: dict[str, Any]) -> str:
    ds = j.get("ds_config")
    return (j["strategy"] + (f" ({ds} DS config)" if ds else "")
            + (" mmap-thr" if j.get("env", {}).get("MALLOC_MMAP_THRESHOLD_") else "")
            + (" +offload" if j.get("offload") else ""))


def _g(x: float) -> str:
    return f"{x / GIB:.2f}"


def write_md(res: dict[str, Any], path: Path) -> None:
    L = [f"# Real-size CAP scale-out on CPU ({res['model']['name']}, "
         f"{res['model']['params'] / 1e6:.1f} M parameters)", "",
         f"Command: `{res['command']}`  ",
         *[f"merged into the results of: `{m['command']}` (load {m['load_start']} -> "
           f"{m['load_end']}, wall {(m['wall_s'] or 0) / 60:.1f} min)  "
           for m in reversed(res.get("merged_from") or [])],
         f"torch {res['torch']}, deepspeed "
         f"{res['deepspeed']}, {res['threads_per_rank']} thread per rank, "
         f"{res['cpu_count']} CPUs, {res['mem_total_gib']:.1f} GiB RAM, no GPU.  ",
         ("" if res.get("complete") else "**Partial: the run had not finished when this "
          "was written.**  "),
         f"Global batch {res['global_batch']}, length {res['length']}, "
         f"{res['train_rows']} train rows, {res['steps']} steps (median of steps 2..). "
         f"Load average at start {res['load_start']}, end {res['load_end']}; wall "
         f"{res['wall_s'] / 60:.1f} min.", "",
         f"Tokenizer: {res['tokenizer']}", "",
         "Bytes in GiB per rank (max over ranks); optimiser = AdamW moments (+ ZeRO-3's "
         "fp32 master partition); grad buf = ZeRO-3's flat fp32 gradient partition; "
         "PrC = 0 because the student is the pre-trained model (no extra copy).", "",
         "| world | strategy | status | peak RSS / rank | setup peak | student | scores | "
         "optimiser | grad buf | teacher | PrC | step s (median) | gather (local x H) | "
         "gather (32 x H) |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for j in res["jobs"]:
        if j["status"] != "ok" and j["ranks"]:
            rks = j["ranks"]
            L.append(f"| {j['world']} | {_label(j)} | {j['status'][:40]}; last record: "
                     + ", ".join(r.get("phase", "?") for r in rks) + " | "
                     + " / ".join(_g(r["peak_rss"]) for r in rks) + " | "
                     + " / ".join(_g(r["setup_peak_rss"]) for r in rks) + " | "
                     + " | ".join(_g(per_rank_max(j, k)) for k in COMPONENTS) + " | "
                     + " / ".join(", ".join(f"{t:.1f}" for t in r["step_s"]) or "-"
                                  for r in rks) + " |  |  |")
            continue
        if j["status"] != "ok":
            est = j.get("estimate", {})
            peak = (f"summed over ranks {_g(j['ranks_rss_sum_peak_polled'])} at the kill"
                    if j.get("ranks_rss_sum_peak_polled") else
                    f"est. {_g(est.get('peak_estimate', 0))}")
            L.append(f"| {j['world']} | {_label(j)} | {j['status']} | {peak} "
                     "|  |  |  |  |  |  |  |  |  |  |")
            continue
        rks = j["ranks"]
        peak = " / ".join(_g(r["peak_rss"]) for r in rks)
        setup = " / ".join(_g(r["setup_peak_rss"]) for r in rks)
        g_local = max(r["gather_s"]["local"] for r in rks) * 1e3
        g_32 = max(r["gather_s"]["32"] for r in rks) * 1e3
        L.append(f"| {j['world']} | {_label(j)} | ok "
                 f"| {peak} | {setup} | " + " | ".join(_g(per_rank_max(j, k)) for k in COMPONENTS)
                 + f" | {max(r['median_step_s'] for r in rks):.2f} | "
                 f"{g_local:.2f} ms | {g_32:.2f} ms |")
    for j in res["jobs"]:
        if j["status"] != "ok":
            est = j.get("estimate", {})
            L += ["", f"World {j['world']} {j['strategy']}: {j['status']}. Estimate basis: "
                  f"{est.get('basis', 'the fp32 memory model (estimate())')}; components "
                  + ", ".join(f"{k} {_g(v)} GiB" for k, v in est.items()
                              if isinstance(v, float | int) and k != "peak_estimate") + "."]
    L += ["", "Setup seconds (max over ranks): " + ", ".join(
        f"w{j['world']} {_label(j)} {max(r['setup_s'] for r in j['ranks']):.0f}"
        for j in res["jobs"] if j["ranks"]) + "."]
    L += ["", "## World 2 / world 1, bytes per rank (target <= 0.55)", "",
          "| strategy | teacher | student+scores+optimiser | peak RSS | meets 0.55 | from |",
          "|---|---|---|---|---|---|"]
    for s, r in res["ratios"].items():
        L.append(f"| {s} | {r['teacher']:.3f} | {r['student+scores+optimizer']:.3f} | "
                 f"{r['peak_rss']:.3f} | {r['meets_0.55']} | {r.get('source', '')} |")
    if res.get("largest") and res["largest"].get("tries"):
        lg = res["largest"]
        L += ["", "## Largest encoder pruned (ZeRO-3)", "", lg["summary"], ""]
        L += ["| model | params | world | offload | status | peak RSS per rank GiB | "
              "student | scores | optimiser | grad buf | teacher | step s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in lg["tries"]:
            if t["status"] == "ok":
                L.append(f"| {t['model']} | {t['params'] / 1e6:.0f} M | {t['world']} | "
                         f"{t['offload']} | ok | "
                         + " / ".join(_g(r["peak_rss"]) for r in t["ranks"]) + " | "
                         + " | ".join(_g(per_rank_max(t, k)) for k in COMPONENTS[:-1])
                         + f" | {max(r['median_step_s'] for r in t['ranks']):.2f} |")
            else:
                L.append(f"| {t['model']} | {t['params'] / 1e6:.0f} M | {t['world']} | "
                         f"{t['offload']} | {t['status'][:160]} |  |  |  |  |  |  |  |")
    if res.get("single_process"):
        L += ["", "## Where one process runs out (measured bytes per parameter, world 1)", ""]
    for sp in res.get("single_process", []):
        L += [f"### {sp['strategy']}", "",
              "| component (setup order) | B / param | cumulative B / param | "
              + " | ".join(f"GiB cumulative, {a['label']} ({a['params'] / 1e6:.0f} M)"
                           for a in sp["at"]) + " |",
              "|---|---|---|" + "---|" * len(sp["at"])]
        for i, row in enumerate(sp["rows"]):
            L.append(f"| {row['component']} | {row['bytes_per_param']:.2f} | "
                     f"{row['cumulative']:.2f} | "
                     + " | ".join(f"{a['rows'][i]['cumulative_gib']:.1f}" for a in sp["at"])
                     + " |")
        L += ["", sp["text"] + " Cumulative GiB include the other memory. First component "
              "past the machine: " + "; ".join(f"{a['label']}: {a['first_over'] or 'none (fits)'}"
                                               for a in sp["at"]) + ".", ""]
    L += ["", "## GPU plan on paper (arithmetic, not a measurement: no GPU was available)",
          "", "State bytes per parameter from the world-1 jobs above (single for ddp; the bench "
          "model's share of scored weights), "
          "plus fp32 gradients for torch optimisers (ddp: twice, its buckets) "
          "(all fp32, as measured here; bf16 "
          "weights with fp32 master copies would change the figures); 10 GiB of each "
          "80 GiB GPU kept for activations and buffers. ddp replicates the state: it "
          "fits one GPU or none.", "",
          "| model | strategy | B / param | state GiB | 80 GiB GPUs | arithmetic |",
          "|---|---|---|---|---|---|"]
    for p in res["gpu_plan"]:
        gp = p["gpus_80gib"] if p["gpus_80gib"] is not None else "does not fit one GPU"
        L.append(f"| {p['model']} | {p['strategy']} | {p['bytes_per_param']:.1f} | "
                 f"{p['state_gib']:.1f} | {gp} | {p['arithmetic']} |")
    path.write_text("\n".join(L) + "\n")


# -- main ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 layers, hidden 64 (smoke)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--train-rows", type=int, default=16)
    p.add_argument("--guard-gib", type=float, default=20.5)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--jobs", default="all", help="'all' or e.g. 1:zero3,2:zero3")
    p.add_argument("--largest", action="store_true", help="also search the largest encoder")
    p.add_argument("--largest-layers", default="",
                   help="descending comma list of layer counts to try until one fits "
                        "(default: from the estimate)")
    p.add_argument("--largest-tries", type=int, default=2)
    p.add_argument("--largest-world", type=int, default=2, choices=(1, 2))
    p.add_argument("--largest-from", default=None,
                   help="take the largest-model section from this results JSON")
    p.add_argument("--largest-budget-s", type=float, default=900,
                   help="no further candidate after this long in the search")
    p.add_argument("--ds-lean", action="store_true",
                   help="zero3 jobs use LEAN_DS (sub-groups, bounded live parameters)")
    p.add_argument("--malloc-mmap-threshold", type=int, default=0,
                   help="MALLOC_MMAP_THRESHOLD_ for the ranks (bytes; 0: glibc's dynamic "
                        "default, which keeps freed tensors under 32 MB in the heap)")
    p.add_argument("--merge", action="store_true",
                   help="keep the jobs of the existing results file that this call does not "
                        "rerun (same world, strategy and DeepSpeed config)")
    p.add_argument("--parallel", type=int, default=1,
                   help="jobs run at once (smoke test only: timings then mean nothing)")
    p.add_argument("--work", default=None, help="assets folder (kept between calls)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    import torch

    wall0, load_start = time.time(), load_avg()
    if args.malloc_mmap_threshold:
        EXTRA_ENV["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    shape = QUICK if args.quick else LARGE
    work = Path(args.work or tempfile.mkdtemp(prefix="scale_real_"))
    assets = build_assets(work / shape.name.replace(" ", "_"), shape, args.train_rows)
    guard = args.guard_gib * GIB
    jobs_wanted = JOBS if args.jobs == "all" else [] if args.jobs == "none" else [
        (int(w), s) for w, s in (x.split(":") for x in args.jobs.split(","))]
    base_spec = {"assets": assets, "global_batch": args.global_batch, "length": args.length,
                 "steps": args.steps, "hidden": shape.hidden, "offload": False,
                 "ds_config": None}
    ds_name = "default"
    if args.ds_lean:
        ds_path = work / "ds_lean.json"
        ds_path.write_text(json.dumps(LEAN_DS))
        base_spec["ds_config"], ds_name = str(ds_path), "lean"
    done: dict[str, dict[str, Any]] = {}
    jobs: list[dict[str, Any]] = []
    res: dict[str, Any] = {
        "command": "PYTHONPATH=. python bench/scale_real.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "model": {"name": shape.name, "params": shape.params(), "scored": shape.scored(),
                  "shape": asdict(shape)},
        "tokenizer": "packaged MiniLM WordPiece (capscale.models.loading.load_tokenizer('minilm'), "
                     "30522 ids); the embedding keeps 50265 rows (RoBERTa-large's vocab) "
                     "so the parameter count is RoBERTa-large's; pad_token_id 0, "
                     "type_vocab_size 1",
        "torch": torch.__version__, "deepspeed": _ds_version(), "threads_per_rank": 1,
        "cpu_count": os.cpu_count(), "mem_total_gib": _meminfo("MemTotal") / GIB,
        "global_batch": args.global_batch, "length": args.length,
        "train_rows": args.train_rows, "steps": args.steps, "guard_gib": args.guard_gib,
        "load_start": load_start, "jobs": jobs, "complete": False}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "scale_real_quick" if args.quick else "scale_real"

    def save() -> None:  # after every job: an interrupted run keeps what it measured
        finish(res, jobs, shape, wall0)
        (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
        write_md(res, out / f"{stem}.md")

    def one(world: int, strategy: str) -> dict[str, Any]:
        est = estimate(shape, strategy, world)
        spec = {**base_spec, "strategy": strategy,
                "out": str(work / f"job_{world}_{strategy}_{ds_name}.json"),
                "workdir": str(work / f"run_{world}_{strategy}_{ds_name}")}
        if strategy != "zero3":
            spec["ds_config"] = None
        single = done.get("single")
        if strategy == "ddp" and single is not None and single["status"] == "ok":
            # measured one-process peak + DDP's gradient buckets (a copy of every grad)
            est["peak_estimate"] = single["ranks"][0]["peak_rss"] + 4 * (
                shape.params() + shape.scored())
            est["basis"] = "measured single peak RSS + 4 B x (params + scores) of buckets"
        if est["peak_estimate"] * world > guard:
            job = {"world": world, "strategy": strategy, "offload": False, "ranks": [],
                   "status": f"skipped: estimated {est['peak_estimate'] / GIB:.1f} GiB per "
                             f"rank x {world} > {args.guard_gib} GiB guard"}
        else:  # concurrent jobs (--parallel, smoke only) share the guard
            job = run_job(spec, world, guard / args.parallel, args.timeout)
        job["estimate"] = est
        job["ds_config"] = (ds_name if strategy == "zero3" else None)
        job["env"] = dict(EXTRA_ENV)
        if job["ds_config"] == "lean":
            job["ds_config_json"], job["ds_config_path"] = LEAN_DS, base_spec["ds_config"]
        done[strategy if world == 1 else f"{strategy}@{world}"] = job
        print(json.dumps({k: v for k, v in job.items() if k != "ranks"}), flush=True)
        return job

    def key(j: dict[str, Any]) -> tuple:
        return (j["world"], j["strategy"], j.get("ds_config"),
                j.get("env", {}).get("MALLOC_MMAP_THRESHOLD_"))

    old_file = out / f"{stem}.json"
    if args.merge and old_file.exists():
        previous = json.loads(old_file.read_text())
        thr = EXTRA_ENV.get("MALLOC_MMAP_THRESHOLD_")
        rerun = {(w, st, ds_name if st == "zero3" else None, thr) for w, st in jobs_wanted}
        jobs.extend(j for j in previous["jobs"] if key(j) not in rerun)
        chain = previous.get("merged_from") or []
        chain = [chain] if isinstance(chain, dict) else chain
        res["merged_from"] = [*chain, {"command": previous.get("command"),
                                       "load_start": previous.get("load_start"),
                                       "load_end": previous.get("load_end"),
                                       "wall_s": previous.get("wall_s")}]
        if previous.get("largest") and not args.largest:
            res["largest"] = previous["largest"]
    if args.largest_from:  # the search section of another results file (same machine)
        res["largest"] = json.loads(Path(args.largest_from).read_text())["largest"]
        for j in jobs:
            if j["strategy"] == "single" and j["status"] == "ok":
                done["single"] = j
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for job in pool.map(lambda ws: one(*ws), jobs_wanted):
            jobs.append(job)
            jobs.sort(key=lambda j: (j["world"], JOBS.index((j["world"], j["strategy"])),
                                     str(j.get("ds_config"))))
            save()
    zs = sorted((j for j in jobs if j["strategy"] == "zero3" and j["status"] == "ok"),
                key=lambda j: j["world"])  # the largest-model estimate: world 1 if measured
    z1 = zs[0] if zs else None
    if args.largest and z1 is not None:
        res["largest"] = search_largest(args, work, guard, z1, shape, save, res)
    res["complete"] = True
    save()
    print(f"wrote {out / stem}.json and .md")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def finish(res: dict[str, Any], jobs: list[dict[str, Any]], shape: Shape, wall0: float
           ) -> None:
    """Derived figures from the jobs so far (ratios, plan, one-process breakdown)."""
    machine = _meminfo("MemTotal")
    res["ratios"] = ratios(jobs)
    res["gpu_plan"] = gpu_plan(jobs, shape)
    sizes = [("bench model", shape.params())]
    if res.get("largest", {}).get("best_params"):
        sizes.append(("largest found", res["largest"]["best_params"]))
    sizes.append(("1.3B encoder", int(1.3e9)))
    res["single_process"] = []
    for j in jobs:
        if j["world"] == 1 and j["strategy"] in ("single", "zero3") and j["status"] == "ok":
            sp = single_process_breakdown(j, shape, machine)
            n_max = sp["max_params_one_process"]
            sp["text"] = (f"{j['strategy']}, one process: {sp['bytes_per_param_total']:.1f} B "
                          f"per parameter + {_g(sp['other_bytes'])} GiB other memory; "
                          f"{machine / GIB:.1f} GiB holds at most {n_max / 1e6:.0f} M "
                          f"parameters (about "
                          f"{layers_for(n_max, shape.hidden, shape.intermediate)} layers of "
                          f"this width).")
            sp["at"] = [{"label": label, **cumulative_at(sp, n, machine)} for label, n in sizes]
            res["single_process"].append(sp)
    res["load_end"], res["wall_s"] = load_avg(), time.time() - wall0


def search_largest(args: argparse.Namespace, work: Path, guard: float,
                   z1: dict[str, Any], shape: Shape, save: Any, res: dict[str, Any]
                   ) -> dict[str, Any]:
    """ZeRO-3 + offload at world 2 on RoBERTa-large-width encoders with more layers.

    The first candidate is the largest whose estimate fits the guard: the measured
    world-1 ZeRO-3 state bytes per parameter times the parameters, plus each rank's other
    memory (the world-1 peak RSS less its components) and 1 GiB of margin. A candidate
    killed at the guard is followed by one 15 % smaller, one that fits with room to spare
    by a larger one at its measured rate (``--largest-tries`` in all).
    """
    other = max(r["peak_rss"] - sum(r[k] for k in COMPONENTS) for r in z1["ranks"])
    state_pp = sum(sum(r[k] for k in COMPONENTS) for r in z1["ranks"]) / shape.params()
    fit = layers_for((guard - args.largest_world * other - GIB) / state_pp, shape.hidden,
                     shape.intermediate)
    cap = 4 if args.quick else 200  # the quick shape's "fit" would be thousands of layers
    fit = max(1, min(fit, cap))
    layers = ([int(x) for x in args.largest_layers.split(",")] if args.largest_layers
              else [fit])
    tries: list[dict[str, Any]] = []
    found: dict[str, Any] = {"tries": tries, "summary": "search under way",
                             "best_params": None, "first_candidate_layers": fit}
    res["largest"] = found
    best = None
    t0 = time.time()
    while layers and len(tries) < args.largest_tries:
        nl = layers.pop(0)
        big = replace(shape, layers=nl)
        assets = build_assets(work / big.name.replace(" ", "_"), big, args.train_rows)
        spec = {"assets": assets, "global_batch": args.global_batch, "length": args.length,
                "steps": 2, "hidden": big.hidden, "offload": True, "strategy": "zero3",
                "ds_config": z1.get("ds_config_path"),
                "out": str(work / f"largest_{nl}.json"), "workdir": str(work / f"run_big_{nl}")}
        t = run_job(spec, args.largest_world, guard, args.timeout)
        t.update(model=big.name, params=big.params(), layers=nl,
                 estimate_gib=(big.params() * state_pp + args.largest_world * other) / GIB)
        tries.append(t)
        save()
        print(json.dumps({k: v for k, v in t.items() if k != "ranks"}), flush=True)
        shutil.rmtree(Path(assets["encoder"]), ignore_errors=True)
        if t["status"] == "ok":
            if best is None or big.params() > best["params"]:
                best = t
            if args.largest_layers:  # a descending list: the first that fits is the answer
                break
            # room left: one larger candidate at the rate this one measured
            rate = sum(r["peak_rss"] for r in t["ranks"]) / big.params()
            up = min(cap, layers_for((guard - GIB) / rate, shape.hidden, shape.intermediate))
            if (not args.largest_layers and up >= nl + 2
                    and time.time() - t0 < args.largest_budget_s):
                layers.append(up)
        elif (not args.largest_layers and time.time() - t0 < args.largest_budget_s
              and int(nl * 0.85) >= 1):
            layers.append(int(nl * 0.85))
    if best is None:
        summary = "No candidate finished (see the statuses)."
    else:
        peak = sum(r["peak_rss"] for r in best["ranks"])
        summary = (f"Largest pruned: {best['model']} ({best['params'] / 1e6:.0f} M "
                   f"parameters), ZeRO-3 + offload_params + offload_optimizer at world "
                   f"{best['world']} "
                   f"(CPU DeepSpeed: the offload target is the same RAM): peak RSS "
                   + " + ".join(_g(r["peak_rss"]) for r in best["ranks"])
                   + f" = {_g(peak)} GiB of {_meminfo('MemTotal') / GIB:.1f} GiB; "
                   f"{max(r['median_step_s'] for r in best['ranks']):.1f} s per step. "
                   f"Estimate before the run: {best['estimate_gib']:.1f} GiB.")
    found.update(summary=summary, state_bytes_per_param=state_pp, other_bytes_per_rank=other,
                 best_params=best["params"] if best else None)
    return found


def _meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _ds_version() -> str:
    try:
        from importlib.metadata import version
        return version("deepspeed")
    except Exception:
        return "not installed"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_build":
        _build_encoder(Shape(**json.loads(sys.argv[2])), Path(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--_worker":
        worker(json.loads(Path(sys.argv[2]).read_text()))
    else:
        sys.exit(main())

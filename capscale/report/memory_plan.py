"""Per-rank memory of a CAP pruning run, by part, worked out from the config alone.

:func:`plan_memory` counts what each rank holds for one strategy, world size, precision,
micro-batch and checkpointing setting, in two layers:

* **state**, held between optimiser steps: the student's weights and scores, AdamW's two
  fp32 moments, master copies, persistent gradient buffers, the frozen references, the
  banks (or the online queue), the no-grad mask cache an evaluation or a snapshot
  encoding leaves until the next step, and a runtime baseline (CUDA context, libraries);
* **step**, what one micro-batch adds at its peak: the activations autograd keeps, the
  masks and masked weights every masked linear keeps for backward (``W * M`` and ``M``,
  weight-sized, full size on every rank whatever the sharding, since they are computed
  from gathered parameters), the gradients, and transients (gathered parameter units,
  the teacher's forward, contrastive candidates, optimiser temporaries).

The step is followed through its phases (mask update, the end of the forward, each
layer of the backward sweep, the embeddings, the optimiser step) and its peak is the
largest of them: going down the backward, each layer frees its activations and masks
while its gradients appear, so neither all activations nor all gradients need be held
at once. Activations are counted item by item per token and per layer (the inputs each
linear map saves, Q / K / V, attention, dropout masks, LayerNorm inputs, the FFN
intermediate), each in the dtype it has under the precision: on CUDA, SDPA's fused
kernels keep no sequence x sequence matrix and dropout keeps a one-byte mask; on CPU the
math attention keeps three and dropout a mask of the input's dtype (the CPU setting
is the one tests/test_memory_plan.py measures). With ``train.gradient_checkpointing``
each layer keeps its input only, and the layer being recomputed holds its full set once.

Precision (``train.precision``; ``auto``: bf16 on CUDA, which the planner assumes
supports it, fp32 on CPU): single / ddp / fsdp2 autocast over fp32 parameters (no extra
master copy; LayerNorm runs in fp32); fsdp2 gathers each unit in the compute dtype;
zero3 keeps 2-byte parameter partitions plus fp32 master and gradient partitions. The
references are stored in ``cap.reference_dtype`` (``auto``: the compute dtype) and
sharded over the ranks under zero3 / fsdp2 with ``distributed.shard_references``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from capscale.checks import cross_section_rules
from capscale.report.memory_terms import (
    DS_MAX_REUSE,
    Run,
    bank_bytes,
    offload,
    reference_bytes,
    step_peak,
    views,
    zero3_kept_layers,
    zero_options,
)
from capscale.report.model_shapes import ModelShape, model_shape, training_set_size

if TYPE_CHECKING:
    from capscale.config import Config

GIB = 2**30
Strategy = Literal["single", "ddp", "zero3", "fsdp2"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
STRATEGIES = ("single", "ddp", "zero3", "fsdp2")
# CUDA context, cuBLAS / cuDNN workspaces and NCCL buffers of one rank (an estimate).
CUDA_BASELINE_BYTES = GIB
PARTS = ("student weights", "scores", "masks", "gradients", "optimiser state",
         "master copies", "references", "banks", "activations", "transient", "runtime")


def resolve_precision(precision: str, device: str) -> str:
    """``train.precision`` as it runs on ``device``: ``auto`` is bf16 on CUDA, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if device == "cuda" else "fp32"


@dataclass
class Part:
    """One line of the plan: bytes per rank held between steps (``state``), added by a
    step at its peak (``step``), and kept in host memory instead (``host``)."""

    name: str
    state: int = 0
    step: int = 0
    host: int = 0
    note: str = ""

    @property
    def device(self) -> int:
        return self.state + self.step


@dataclass
class MemoryPlan:
    """The memory one rank needs for one setting (see the module docstring)."""

    strategy: str
    world: int
    device: str
    precision: str
    reference_dtype: str
    gradient_checkpointing: bool
    micro_batch: int
    accumulation: int
    seq_length: int
    train_examples: int
    examples_source: str
    shape: ModelShape
    parts: list[Part]
    peak_phase: str
    refused: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world

    @property
    def state_bytes(self) -> int:
        return sum(p.state for p in self.parts)

    @property
    def step_bytes(self) -> int:
        """What one micro-batch adds at its peak over the state."""
        return sum(p.step for p in self.parts)

    @property
    def device_bytes(self) -> int:
        """The peak per rank on the device: state plus the step's peak."""
        return self.state_bytes + self.step_bytes

    @property
    def host_bytes(self) -> int:
        return sum(p.host for p in self.parts)

    def part(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)

    def fits(self, device_gib: float) -> bool:
        return self.refused is None and self.device_bytes <= device_gib * GIB

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready numbers (GiB per rank)."""
        return {
            "strategy": self.strategy, "world": self.world, "device": self.device,
            "precision": self.precision, "reference_dtype": self.reference_dtype,
            "gradient_checkpointing": self.gradient_checkpointing,
            "micro_batch": self.micro_batch, "accumulation": self.accumulation,
            "global_batch": self.global_batch, "seq_length": self.seq_length,
            "train_examples": self.train_examples, "examples_source": self.examples_source,
            "model": {"name": self.shape.name, "source": self.shape.source,
                      "parameters": self.shape.parameters, "prunable": self.shape.prunable},
            "refused": self.refused, "peak_phase": self.peak_phase,
            "parts_gib": {p.name: {"state": p.state / GIB, "step": p.step / GIB,
                                   "host": p.host / GIB, "note": p.note} for p in self.parts},
            "state_gib": self.state_bytes / GIB, "step_gib": self.step_bytes / GIB,
            "device_gib": self.device_bytes / GIB, "host_gib": self.host_bytes / GIB,
            "notes": self.notes}


@dataclass(frozen=True)
class PlanInputs:
    """What the plan reads besides the config: the student's shape and the training-set
    size N, with where each came from (:func:`read_inputs`)."""

    shape: ModelShape
    train_examples: int
    examples_source: str


def read_inputs(cfg: Config, train_examples: int | None = None) -> PlanInputs:
    """The shape and N for ``cfg`` (capscale.report.model_shapes); ``train_examples``
    overrides N."""
    n, labels, source = training_set_size(cfg, train_examples)
    return PlanInputs(model_shape(cfg, labels), n, source)


def _setting(cfg: Config, strategy: Strategy, precision: Precision | None, ckpt: bool | None,
             micro_batch: int | None, accumulation: int | None) -> Config:
    """``cfg`` with the planned setting in it (CPU offload only where zero3 runs it)."""
    t = cfg.train
    train = replace(t, precision=precision or t.precision,
                    gradient_checkpointing=t.gradient_checkpointing if ckpt is None else ckpt,
                    batch_size=micro_batch or t.batch_size,
                    gradient_accumulation_steps=accumulation or t.gradient_accumulation_steps)
    dist = cfg.distributed
    if strategy != "zero3":
        dist = replace(dist, offload_params=False, offload_optimizer=False)
    return replace(cfg, strategy=strategy, train=train, distributed=dist)


def plan_memory(cfg: Config, world: int = 1, *, strategy: Strategy | None = None,
                precision: Precision | None = None, gradient_checkpointing: bool | None = None,
                micro_batch: int | None = None, accumulation: int | None = None,
                device: str = "cuda", baseline_bytes: int | None = None,
                inputs: PlanInputs | None = None, after_evaluation: bool = True
                ) -> MemoryPlan:
    """Per-rank memory of ``cfg`` run on ``world`` ranks (see the module docstring).

    Args:
        cfg: the run config; the arguments below override its fields when given.
        world: ranks (processes, one device each).
        strategy: ``single`` (world 1 only), ``ddp``, ``zero3`` or ``fsdp2``.
        precision: ``train.precision`` (``auto``: bf16 on CUDA, fp32 on CPU).
        gradient_checkpointing: ``train.gradient_checkpointing``.
        micro_batch, accumulation: ``train.batch_size`` (per rank, what activations
            scale with) and ``train.gradient_accumulation_steps``.
        device: ``cuda`` or ``cpu``: what precision ``auto`` resolves to, the attention
            and dropout kernels, and the runtime baseline.
        baseline_bytes: memory a rank holds before capscale allocates anything (CUDA
            context and libraries, or a measured process baseline on CPU); None: 1 GiB
            on CUDA, 0 on CPU.
        inputs: the shape and N (:func:`read_inputs`); None: read them now.
        after_evaluation: plan the step that follows an evaluation (the worst case of a
            run: the no-grad forward leaves every masked linear's mask cached until the
            next optimiser step); False: a step after a step, as a loop without
            evaluations between them runs.
    """
    name = strategy or cfg.strategy
    cfg = _setting(cfg, name, precision, gradient_checkpointing, micro_batch, accumulation)
    inputs = inputs or read_inputs(cfg)
    t = cfg.train
    run = Run(cfg, inputs.shape, name, world, device, resolve_precision(t.precision, device),
              "", t.gradient_checkpointing, t.batch_size, t.gradient_accumulation_steps,
              cfg.data.max_length, inputs.train_examples)
    ref = cfg.cap.reference_dtype
    run = replace(run, reference_dtype=run.precision if ref == "auto" else ref)
    refused = ("single runs one process; on several ranks it is ddp" if name == "single"
               and world > 1 else next(iter(cross_section_rules(cfg)), None))
    r_views = views(cfg, inputs.train_examples, world)
    off_params, off_opt = offload(cfg) if name == "zero3" else (False, False)
    parts = _state_parts(run, r_views, off_params, off_opt, baseline_bytes, after_evaluation)
    phase, step = step_peak(run, r_views, off_opt)
    for p in parts:
        p.step = step.get(p.name, 0)
    return MemoryPlan(name, world, device, run.precision, run.reference_dtype, run.ckpt,
                      run.batch, run.accumulation, run.length, inputs.train_examples,
                      inputs.examples_source, inputs.shape, parts, phase, refused,
                      _notes(run, off_params, off_opt))


def _placed(name: str, size: int, on_host: bool, note: str) -> Part:
    return Part(name, host=size, note=f"{note}, on the host") if on_host else \
        Part(name, state=size, note=note)


def _state_parts(run: Run, r_views: dict[str, int], off_params: bool, off_opt: bool,
                 baseline: int | None, after_evaluation: bool = True) -> list[Part]:
    """Every part with what it holds between steps (the step's share is added after)."""
    s, w, strategy = run.shape, run.world, run.strategy
    p, n_scores, train = s.parameters, run.scores, run.trainable
    if strategy == "zero3":
        weights, how = run.cp * p // w, f"{run.cp}-byte partitions / {w}"
    elif strategy == "fsdp2":
        weights, how = 4 * p // w, f"fp32 shards / {w}"
    else:
        weights, how = 4 * p, "fp32, replicated"
    parts = [_placed("student weights", weights, off_params, f"{p:,} parameters, {how}")]
    if not run.learns:
        size = 4 * n_scores  # structured: unit masks kept outside the model
        parts.append(Part("scores", state=size, note="unit masks" if size else
                          f"none ({run.cfg.pruning.method} learns no scores)"))
    else:
        parts.append(_placed("scores", weights * n_scores // p,
                             off_params, f"{n_scores:,} learned scores, {how}"))
    cache = s.prunable * (run.cp if run.sharded else 4) if run.kind == "weight" \
        and after_evaluation else 0
    if run.cfg.pruning.zero_pruned_weights and run.kind == "weight":
        cache += s.prunable // run.shard  # each step's local mask, bool
    parts.append(Part("masks", state=cache, note=(
        "no-grad mask cache after an evaluation, full size; " if after_evaluation else "")
        + "in a step: M and W*M of each masked linear" if run.kind == "weight"
        else "no per-weight masks"))
    grads, note = 0, "fp32, allocated by each step"
    if strategy == "ddp" and w > 1:
        grads, note = 4 * train, "DDP's gradient buckets, plus the step's fp32 gradients"
    elif strategy == "zero3":
        grads, note = 4 * train // w, f"fp32 partitions / {w}"
    parts.append(_placed("gradients", grads, off_opt and strategy == "zero3", note))
    parts.append(_placed("optimiser state", 8 * train // run.shard, off_opt,
                         f"AdamW moments, fp32{f' / {w}' if run.sharded else ''}"))
    master = 4 * train // w if strategy == "zero3" and run.c < 4 else 0
    parts.append(_placed("master copies", master, off_opt, f"fp32 partitions / {w}" if master
                         else "none: the fp32 parameters are the master"))
    size, what = reference_bytes(run, r_views)
    sharded_refs = run.sharded and run.cfg.distributed.shard_references
    parts.append(_placed("references", size, off_params and sharded_refs,
                         f"{what}, {run.reference_dtype}"))
    dev, host, note = bank_bytes(run, r_views)
    parts.append(Part("banks", state=dev, host=host, note=note))
    parts.append(Part("activations", note=f"micro-batch {run.batch} x {run.length} tokens"
                      f"{', checkpointed' if run.ckpt else ''}"))
    parts.append(Part("transient", note="gathered parameters, reference forwards, "
                      "contrastive candidates, backward and optimiser temporaries"))
    if baseline is None:
        baseline = CUDA_BASELINE_BYTES if run.device == "cuda" else 0
    parts.append(Part("runtime", state=baseline, note="CUDA context and libraries"
                      if run.device == "cuda" else "process baseline"))
    return parts


def _notes(run: Run, off_params: bool, off_opt: bool) -> list[str]:
    """The assumptions behind the numbers worth reading next to them."""
    notes = []
    if run.cfg.train.precision == "auto":
        notes.append(f"train.precision auto: {run.precision} on {run.device}")
    if run.kind == "weight":
        notes.append("masks: every masked linear keeps M and W*M for backward, full size "
                     "on every rank whatever the sharding (computed from gathered "
                     "weights); with checkpointing only the recomputed layer's")
    cap = run.cfg.cap
    if run.world > 1 and cap.bank_sharding == "replicated" and cap.mode == "bank":
        notes.append("banks: every rank holds all rows (on the host with cap.bank_device "
                     "cpu: once per rank of a node); cap.bank_sharding=sharded divides them")
    if run.strategy == "zero3":
        kept = zero3_kept_layers(run)
        reuse = zero_options(run.cfg).get("stage3_max_reuse_distance", DS_MAX_REUSE)
        notes.append(f"zero3: {kept} of {run.shape.positions} layers come back within "
                     f"stage3_max_reuse_distance ({float(reuse):g} parameters) and stay "
                     "gathered from forward to backward (in 'transient'); a smaller "
                     "value releases them")
        if off_params or off_opt:
            notes.append("zero3 offload: " + ", ".join(
                n for n, on in (("parameters", off_params), ("optimiser", off_opt)) if on)
                + " on the host")
    return notes

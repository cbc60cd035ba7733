"""The terms of the memory plan (capscale.report.memory_plan), one function each, and
the walk through one training step that finds its peak.

Every function reads a :class:`Run`, the setting resolved from the config and the
planner's arguments, and returns bytes per rank. The step walk (:func:`step_peak`)
follows one micro-batch: the mask update before it, the end of the forward, the backward
layer by layer from the top, the embeddings and the optimiser step; at each point it
sums what is alive by part, and the largest total is the step's peak.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capscale.checks import wants_teacher
from capscale.contrastive.modules import CONTRASTIVE_MODULES
from capscale.contrastive.objectives import OBJECTIVES
from capscale.pruning.hybrid import HybridPruning
from capscale.pruning.methods import PRUNING_METHODS
from capscale.pruning.structured_run import StructuredPruning
from capscale.pruning.unstructured import WeightPruning
from capscale.pruning.weight_rules import WEIGHT_RULES, SoftMovementRule
from capscale.report.model_shapes import ModelShape
from capscale.train.schedules import snapshot_views

if TYPE_CHECKING:
    from capscale.config import Config

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# DeepSpeed's own defaults for the ZeRO-3 knobs the plan reads.
DS_MAX_REUSE, DS_MAX_LIVE, DS_PREFETCH = 1e9, 1e9, 5e7


@dataclass(frozen=True)
class Run:
    """The resolved setting the arithmetic reads."""

    cfg: Config
    shape: ModelShape
    strategy: str
    world: int
    device: str
    precision: str
    reference_dtype: str
    ckpt: bool
    batch: int
    accumulation: int
    length: int
    examples: int

    @property
    def c(self) -> int:
        """Bytes of the compute dtype."""
        return DTYPE_BYTES[self.precision]

    @property
    def r(self) -> int:
        """Bytes of a reference parameter."""
        return DTYPE_BYTES[self.reference_dtype]

    @property
    def sharded(self) -> bool:
        return self.strategy in ("zero3", "fsdp2")

    @property
    def shard(self) -> int:
        return self.world if self.sharded else 1

    @property
    def cp(self) -> int:
        """Bytes of a parameter as the forward sees it: fp32 replicated parameters
        (autocast casts copies), the compute dtype when gathered from shards."""
        return self.c if self.sharded else 4

    @property
    def ln(self) -> int:
        """LayerNorm inputs and outputs: fp32 under autocast, the model's own dtype in
        DeepSpeed's bf16 / fp16 mode."""
        return self.c if self.strategy == "zero3" else 4

    @property
    def drop(self) -> int:
        """A dropout mask: bool on CUDA; on CPU dropout multiplies by a noise tensor."""
        return 1 if self.device == "cuda" else self.c

    @property
    def kind(self) -> str:
        return mask_kind(self.cfg)

    @property
    def learns(self) -> bool:
        return PRUNING_METHODS[self.cfg.pruning.method].learns_scores

    @property
    def scores(self) -> int:
        return scores_count(self.cfg, self.shape)

    @property
    def trainable(self) -> int:
        """Parameters AdamW updates (scores included; frozen embeddings not)."""
        frozen = self.shape.embedding_parameters if self.cfg.train.freeze_embeddings else 0
        return self.shape.parameters - frozen + (self.scores if self.learns else 0)


def mask_kind(cfg: Config) -> str:
    """``weight`` (a mask per weight: ``W * M`` in forward), ``unit`` (heads and FFN
    neurons) or ``none``."""
    method = PRUNING_METHODS[cfg.pruning.method]
    if isinstance(method, WeightPruning):
        return "weight"
    if isinstance(method, (HybridPruning, StructuredPruning)):
        return "unit"
    return "weight" if method.learns_scores else "none"


def scores_count(cfg: Config, shape: ModelShape) -> int:
    """Learned scores: one per prunable weight (movement, soft movement), one per head
    and FFN neuron (hybrid; structured keeps unit masks of that size), else none."""
    kind = mask_kind(cfg)
    if kind == "unit":
        return shape.unit_scores
    return shape.prunable if kind == "weight" and PRUNING_METHODS[
        cfg.pruning.method].learns_scores else 0


def zero_options(cfg: Config) -> dict[str, Any]:
    """The ``zero_optimization`` section of ``distributed.deepspeed_config`` ({} when
    none is given)."""
    path = cfg.distributed.deepspeed_config
    if path and Path(path).is_file():
        return dict(json.loads(Path(path).read_text()).get("zero_optimization", {}))
    return {}


def _zero_value(run: Run, key: str, auto: float, default: float) -> float:
    value = zero_options(run.cfg).get(key, default)
    return auto if value == "auto" else float(value)


def offload(cfg: Config) -> tuple[bool, bool]:
    """(parameters, optimiser) offloaded to the host under zero3: the config's flags or
    the DeepSpeed file's ``offload_param`` / ``offload_optimizer`` sections."""
    zero = zero_options(cfg)

    def named(key: str) -> bool:
        return str(zero.get(key, {}).get("device", "none")) == "cpu"
    d = cfg.distributed
    return (d.offload_params or named("offload_param"),
            d.offload_optimizer or named("offload_optimizer"))


def views(cfg: Config, examples: int, world: int) -> dict[str, int]:
    """R per enabled contrastive module (snapshot modules: the views the run keeps)."""
    method = PRUNING_METHODS[cfg.pruning.method]
    t = cfg.train
    per_epoch = max(1, examples // (t.batch_size * world) // t.gradient_accumulation_steps)
    steps = min(per_epoch * t.epochs, t.max_steps or per_epoch * t.epochs)
    snc = snapshot_views(cfg.cap, method.planned_snapshots(cfg.pruning, cfg.structured),
                         math.ceil(steps / per_epoch))
    return {m: snc if CONTRASTIVE_MODULES[m].snapshots else 1
            for m in cfg.cap.enabled_modules()}


def layer_token_bytes(run: Run) -> int:
    """Bytes autograd keeps per token for one layer application: the inputs the linear
    maps save, Q / K / V, attention, dropout masks, LayerNorm inputs and statistics, the
    activation function's input."""
    s, c = run.shape, run.c
    h, f, fin, a = s.hidden, s.intermediate, s.ffn_in_width, s.heads
    linear_inputs = (3 * h + f) * c  # Q/K/V input (shared), attn_out, ffn_in, ffn_out
    qkv = 3 * h * c
    # CUDA's fused SDPA keeps its output and the log-sum-exp; CPU's math attention the
    # probabilities, the dropout noise and the dropped probabilities.
    attention = h * c + a * 4 if run.device == "cuda" else a * run.length * (4 + run.drop + c)
    dropout = 2 * h * run.drop
    layer_norms = 2 * h * run.ln + 16
    activation = fin * c
    # Learned unit scores (hybrid): ``x * m`` keeps x for the scores' gradient.
    units = (h + f) * c if run.kind == "unit" and run.learns else 0
    return linear_inputs + qkv + attention + dropout + layer_norms + activation + units


def reference_bytes(run: Run, r_views: dict[str, int]) -> tuple[int, str]:
    """The frozen models held through training (per rank), and what they are: the
    teacher, and in online mode the pre-trained model and the snapshot copies."""
    cfg, online = run.cfg, OBJECTIVES[run.cfg.cap.mode].online
    per_copy = run.r * run.shape.parameters
    copies, what = 0, []
    if wants_teacher(cfg):
        copies, what = 1, ["teacher"]
    if online and "prc" in r_views:
        copies += 1
        what.append("pre-trained model")
    total = copies * per_copy
    if online:
        snaps = sum(r for m, r in r_views.items() if CONTRASTIVE_MODULES[m].snapshots)
        total += snaps * (per_copy + run.r * run.scores)
        if snaps:
            what.append(f"{snaps} snapshot copies")
    if run.sharded and cfg.distributed.shard_references:
        total = -(-total // run.world)
    if not online and "prc" in r_views and cfg.model.student_init != "pretrained":
        what.append("pre-trained model only while its bank is encoded")
    return total, " + ".join(what) or "none"


def bank_bytes(run: Run, r_views: dict[str, int]) -> tuple[int, int, str]:
    """(device, host, note) of the banks (bank mode) or of the online queues."""
    cap, s = run.cfg.cap, run.shape
    width = 2 if cap.bank_dtype == "bfloat16" else 4
    if OBJECTIVES[cap.mode].online:
        size = sum(cap.queue_size * (r * s.representation * width + 16)
                   for r in r_views.values())
        return size, 0, f"online queues of {cap.queue_size}"
    rows = run.examples
    if cap.bank_sharding == "sharded" and run.world > 1:
        rows = -(-rows // run.world)
    size = sum(rows * r * (s.representation * width + 1) for r in r_views.values())
    size += 8 * run.examples if r_views else 0  # every example's contrastive label
    note = (f"{rows:,} rows x R={'+'.join(str(r) for r in r_views.values())} x "
            f"{s.representation} {cap.bank_dtype}, on {cap.bank_device}")
    return (size, 0, note) if cap.bank_device == "accelerator" else (0, size, note)


# -- one step ----------------------------------------------------------------------
def _layer_unit(run: Run) -> int:
    """Parameters of one encoder layer with its learned scores (a gathered unit)."""
    scores = run.scores // run.shape.layers if run.learns else 0
    return run.shape.layer_parameters + scores


def _head_parameters(s: ModelShape) -> int:
    return max(s.parameters - s.layers * s.layer_parameters - s.embedding_parameters, 0)


def _zero3_kept(run: Run, unit: int) -> list[bool]:
    """Which layer applications ZeRO-3 keeps gathered from their forward to their
    backward: those whose parameters come back within ``stage3_max_reuse_distance``
    parameters fetched (the rest of the forward above them and the backward down to
    them)."""
    reuse = _zero_value(run, "stage3_max_reuse_distance", DS_MAX_REUSE, DS_MAX_REUSE)
    positions, head = run.shape.positions, _head_parameters(run.shape)
    return [2 * ((positions - j) * unit + head) < reuse for j in range(1, positions + 1)]


def zero3_kept_layers(run: Run) -> int:
    """How many layer applications ZeRO-3 keeps gathered through the step."""
    return sum(_zero3_kept(run, _layer_unit(run)))


def _reference_forward(run: Run) -> int:
    """A frozen reference's forward on the batch (no grad): one layer's intermediates,
    plus its gathered units when references are sharded."""
    s, cfg = run.shape, run.cfg
    runs = (wants_teacher(cfg) and max(cfg.loss.w_kd, cfg.loss.w_layer) > 0) or OBJECTIVES[
        cfg.cap.mode].online
    if not runs:
        return 0
    tokens = run.batch * run.length
    size = tokens * (4 * s.hidden + s.ffn_in_width + s.intermediate) * run.c
    if run.device != "cuda":
        size += 2 * run.batch * s.heads * run.length ** 2 * 4
    if run.sharded and cfg.distributed.shard_references:
        size += 2 * s.layer_parameters * run.r
    return size


def _contrastive(run: Run, r_views: dict[str, int]) -> int:
    """Candidates (the gathered batch and the extra negatives, R views each) and the
    similarity rows of every module, kept for backward."""
    cap, online = run.cfg.cap, OBJECTIVES[run.cfg.cap.mode].online
    total, batch = 0, run.batch * run.world
    for r in r_views.values():
        extra = cap.queue_size if online else min(cap.num_negatives // max(r, 1),
                                                  run.examples)
        cands = (batch + extra) * r
        total += cands * run.shape.representation * 4 * 2 + run.batch * cands * 4 * 3
    return total


def _mask_update(run: Run) -> int:
    """A global threshold's exact bisection: int64 sort keys of every local score."""
    cfg = run.cfg.pruning
    rule = WEIGHT_RULES.get(cfg.method)
    if (run.kind != "weight" or cfg.scope != "global" or cfg.nm() is not None
            or rule is None or not rule.uses_topk(cfg)):
        return 0
    extra = 0 if rule.has_scores else 4  # |W| of magnitude pruning
    return run.shape.prunable * (9 + extra) // run.shard


def _optimiser_temporaries(run: Run, offloaded: bool) -> int:
    """torch AdamW: a denominator per tensor on CPU, per group with CUDA's foreach
    kernels; DeepSpeed: its fused AdamW on CUDA, torch's over the flat partition on
    CPU, nothing on the device when the optimiser is offloaded."""
    s = run.shape
    if run.strategy == "zero3":
        return 0 if offloaded or run.device == "cuda" else 4 * run.trainable // run.world
    if run.device == "cuda":
        return 4 * max(run.trainable - run.scores, run.scores) // run.shard
    return 4 * max(s.largest_table, s.largest_matrix) // run.shard


def step_peak(run: Run, r_views: dict[str, int], offloaded: bool) -> tuple[str, dict[str, int]]:
    """The phase of one micro-batch where a rank holds the most, and what it holds
    then by part (activations, masks, gradients, transient), over the state."""
    s, c, strategy = run.shape, run.c, run.strategy
    positions, tokens = s.positions, run.batch * run.length
    act = tokens * layer_token_bytes(run)
    inp = tokens * s.hidden * run.ln  # a checkpointed layer's input
    emb = tokens * (s.hidden * (2 * run.ln + run.drop) + 32)  # + the last layer's output
    per_weight = (run.cp + run.cp) if run.sharded else (4 + c)  # M and W * M
    held = s.prunable // positions * per_weight if run.kind == "weight" else 0
    unit = _layer_unit(run)
    grad = 0 if strategy == "zero3" else 4  # fp32 gradients allocated by the step
    shard = run.shard
    g_pos = grad * unit // s.applications // shard
    g_head = grad * _head_parameters(s) // shard
    frozen = run.cfg.train.freeze_embeddings
    g_emb = 0 if frozen else grad * s.embedding_parameters // shard
    # FSDP2 keeps every unit's unsharded gradient across the micro-batches of a step.
    g_acc = 4 * run.trainable if strategy == "fsdp2" and run.accumulation > 1 else 0
    # Backward through a layer: the gradient leaving it and the widest one inside it
    # (saved tensors are freed as their op's backward completes), and dL/d(W * M).
    flow = tokens * (s.hidden + max(s.ffn_in_width, s.intermediate)) * c
    flow += (4 + c) * s.largest_matrix if run.kind == "weight" else 0
    if strategy == "fsdp2":
        flow += unit * (2 * run.cp + 4)  # re-gathered unit, its gradient, fp32 for reduce
    elif strategy == "zero3":
        flow += unit * c  # the layer's gradient before the reduce-scatter
    kept = _zero3_kept(run, unit) if strategy == "zero3" else [False] * positions
    prefetch = _zero_value(run, "stage3_prefetch_bucket_size", 0.9 * s.hidden ** 2,
                           DS_PREFETCH) if strategy == "zero3" else 0
    live = _zero_value(run, "stage3_max_live_parameters", DS_MAX_LIVE, DS_MAX_LIVE)

    def gathered(below: int, current: bool) -> int:
        """Parameters gathered in the compute dtype with layers 1..below still down."""
        if strategy == "fsdp2":
            return (_head_parameters(s) + (2 * unit if current else 0)) * run.cp
        if strategy == "zero3":
            held_back = min(live, sum(kept[:below]) * unit)
            return int(held_back + (unit if current else 0) + prefetch) * run.cp
        return 0

    l1 = 4 * s.prunable if isinstance(WEIGHT_RULES.get(run.cfg.pruning.method),
                                      SoftMovementRule) else 0
    phases: list[tuple[str, dict[str, int]]] = [("mask update", {
        "transient": _mask_update(run)})]
    fwd_act = emb + positions * (inp if run.ckpt else act)
    phases.append(("end of forward", {
        "activations": fwd_act, "masks": (0 if run.ckpt else positions * held) + l1,
        "gradients": g_acc, "transient": _reference_forward(run)
        + _contrastive(run, r_views) + gathered(positions, False)}))
    for i in range(positions, 0, -1):
        below = emb + (i - 1) * (inp if run.ckpt else act)
        phases.append((f"backward, layer {i}", {
            "activations": below + act, "masks": held if run.ckpt else i * held,
            # accumulating: every unsharded gradient, each freed as its unit's
            # reduce-scatter in the last micro-batch replaces it by its shard
            "gradients": g_acc or (positions - i) * g_pos + g_head,
            "transient": flow + gathered(i - 1, True)}))
    phases.append(("backward, embeddings", {
        "activations": emb, "gradients": g_acc or positions * g_pos + g_head + g_emb,
        "transient": s.largest_table * (run.cp + 4) if run.sharded else 0}))
    phases.append(("optimiser step", {
        "gradients": positions * g_pos + g_head + g_emb,
        "transient": _optimiser_temporaries(run, offloaded)}))
    return max(phases, key=lambda ph: sum(ph[1].values()))

"""A latency target for the physically smaller methods (``structured``, ``hybrid``).

With ``pruning.target_latency_ms`` set, the run measures, as it prunes, the forward
latency of the model it would export (heads and FFN neurons sliced away, written and
reloaded the way the export is, then timed at ``pruning.latency_batch_size`` x
``pruning.latency_seq_length`` tokens on the run's device) and stops pruning at the
first sparsity whose latency meets the target: the schedule's sparsity is capped there
and the rest of the run retrains at it. ``pruning.final_sparsity`` is then the most it
may prune; a run that reaches it without meeting the target says so in its results.

Each measurement also records what the export kept (heads, FFN neurons, hidden
dimensions) and where one more forward's time went: the embeddings, the attention
blocks, the FFN blocks and the rest (:func:`time_parts`), so a run shows which
granularity its remaining time is in.

Latency is a property of the machine (its cores, their load, the thread count): the
target is met where it is measured. The measurement is the median of
``pruning.latency_repeats`` timed forwards after one warm-up, taken on the main rank
(the other ranks wait for its decision).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import transformers
from torch import Tensor, nn
from transformers import PretrainedConfig

from capscale.export.huggingface import auto_class_name, export_structured

if TYPE_CHECKING:
    from capscale.models.adapters import EncoderAdapter
    from capscale.pruning.controller import PruningContext


def time_forward(model: nn.Module, batch_size: int, seq_length: int, repeats: int = 3,
                 device: torch.device | str = "cpu") -> float:
    """Median milliseconds of ``repeats`` forwards of ``model`` (after one warm-up) on
    random token ids of shape (batch_size, seq_length)."""
    model = model.to(device).eval()
    vocab = int(cast(PretrainedConfig, model.config).vocab_size)
    ids = torch.randint(5, max(6, vocab), (batch_size, seq_length),
                        generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def exported_latency(model: nn.Module, adapter: EncoderAdapter, heads: list[Tensor],
                     ffn: list[Tensor], batch_size: int, seq_length: int, repeats: int = 3,
                     device: torch.device | str = "cpu",
                     prepare: Callable[[nn.Module], None] | None = None,
                     hidden: Tensor | None = None, parts: dict[str, float] | None = None
                     ) -> float:
    """Latency (ms) of the export of ``model`` at these keep masks: a copy is sliced,
    written as the export writes it, reloaded with transformers (its loader file) and
    timed. ``model`` is left as it was; ``prepare`` edits the copy first (e.g. removes
    capscale's masked layers). ``parts``, when given, receives where one more forward's
    time went (:func:`time_parts`)."""
    target = copy.deepcopy(model).cpu()
    if prepare is not None:
        prepare(target)
    with tempfile.TemporaryDirectory() as tmp:
        export_structured(target, adapter, heads, ffn, tmp, inplace=True, hidden=hidden)
        auto = getattr(transformers, auto_class_name(type(target).__name__))
        loaded = auto.from_pretrained(Path(tmp) / "model", trust_remote_code=True)
    del target
    ms = time_forward(loaded, batch_size, seq_length, repeats, device)
    if parts is not None:
        parts.update(time_parts(loaded, adapter, batch_size, seq_length, device))
    return ms


def time_parts(model: nn.Module, adapter: EncoderAdapter, batch_size: int, seq_length: int,
               device: torch.device | str = "cpu") -> dict[str, float]:
    """Milliseconds of one forward spent in the embeddings, the attention blocks (their
    compute and residual modules, adapter ``attn_block``), the FFN blocks and the rest
    (task head, pooler, masks), timed by hooks (synchronising a GPU at each)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    spans: dict[str, float] = {"embeddings": 0.0, "attention": 0.0, "ffn": 0.0}
    started: dict[str, float] = {}
    handles = []

    def span(name: str, first: nn.Module, last: nn.Module) -> None:
        def begin(*_: Any) -> None:
            sync()
            started[name] = time.perf_counter()

        def end(*_: Any) -> None:
            sync()
            spans[name] += 1000 * (time.perf_counter() - started.pop(name))
        handles.extend([first.register_forward_pre_hook(begin),
                        last.register_forward_hook(end)])
    base = getattr(model, "base_model", model)
    if adapter.embedding_norm is not None:
        emb = base.get_submodule(adapter.embedding_norm.rpartition(".")[0])
        span("embeddings", emb, emb)
    for layer in adapter.layer_modules(model):
        for name, spec in (("attention", adapter.attn_block), ("ffn", adapter.ffn_block)):
            if spec is not None:
                span(name, layer.get_submodule(spec[0]), layer.get_submodule(spec[2]))
    try:  # a warm-up and a timed forward; the spans of both are halved
        t0 = time.perf_counter()
        time_forward(model, batch_size, seq_length, 1, device)
        total = 1000 * (time.perf_counter() - t0)
    finally:
        for h in handles:
            h.remove()
    spans = {k: v / 2 for k, v in spans.items()}
    return {**{k: round(v, 2) for k, v in spans.items()},
            "other": round(max(total / 2 - sum(spans.values()), 0.0), 2)}


class LatencyTarget:
    """The latency check of one run (see the module docstring).

    ``check(level, keep)`` is collective: every rank calls it at the same step; the
    main rank measures and all get its verdict. Its state (measurements, the sparsity
    the target was met at) is part of the controller's checkpoint.
    """

    def __init__(self, run: PruningContext, prepare: Callable[[nn.Module], None] | None = None
                 ) -> None:
        p = run.pruning
        self.run = run
        self.prepare = prepare
        self.target_ms: float | None = p.target_latency_ms
        self.batch_size, self.seq_length = p.latency_batch_size, p.latency_seq_length
        self.repeats = p.latency_repeats
        self.measured: list[dict[str, Any]] = []
        self.met_at: float | None = None  # the sparsity the target was met at

    @property
    def enabled(self) -> bool:
        return self.target_ms is not None

    @property
    def frozen(self) -> bool:
        """Whether pruning stopped (the target is met)."""
        return self.met_at is not None

    def due(self, step: int, level: float) -> bool:
        """Whether to measure at ``step`` (every ``latency_every`` steps, once pruning
        has gone past the last measurement, until the target is met)."""
        last = self.measured[-1]["sparsity"] if self.measured else 0.0
        return (self.enabled and not self.frozen and step > 0
                and step % self.run.pruning.latency_every == 0 and level > last + 1e-9)

    def check(self, level: float,
              keep: Callable[[nn.Module], tuple[list[Tensor], list[Tensor]]],
              hidden: Tensor | None = None) -> bool:
        """Measure the export at ``level`` (``keep(copy)`` gives the head / neuron masks
        of the unsharded copy on the main rank, ``hidden`` the hidden dimensions' keep
        mask); True, and pruning stops, when it meets the target."""
        run = self.run
        model = run.full_student()  # collective
        verdict = torch.zeros(2, dtype=torch.float64)
        parts: dict[str, float] = {}
        shape: dict[str, Any] = {}
        if model is not None:
            heads, ffn = keep(model)
            ms = exported_latency(model, run.adapter, heads, ffn, self.batch_size,
                                  self.seq_length, self.repeats, run.ctx.device, self.prepare,
                                  hidden, parts)
            shape = {"heads": sum(int(h.sum()) for h in heads),
                     "neurons": sum(int(f.sum()) for f in ffn),
                     "hidden": None if hidden is None else int(hidden.sum())}
            assert self.target_ms is not None  # checked only with a target
            verdict[0], verdict[1] = ms, float(ms <= self.target_ms)
        if run.ctx.distributed:
            verdict = run.ctx.all_reduce_sum(verdict)
        ms, met = float(verdict[0]), bool(verdict[1] > 0)
        # Where the time went, and what was kept, as the main rank measured it.
        self.measured.append({"step": run.state.step, "sparsity": level, "ms": ms,
                              **({"parts_ms": parts, "kept": shape} if parts else {})})
        where = ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
        run.console.log(f"latency at sparsity {level:.1%}: {ms:.1f} ms for batch "
                        f"{self.batch_size} x {self.seq_length} (target {self.target_ms:g} "
                        f"ms{'; ' + where + ' ms' if where else ''})"
                        f"{': met, pruning stops here' if met else ''}")
        if met:
            self.met_at = level
        return met

    def warn_if_missed(self, level: float, what: str) -> None:
        """At the end of a run: log that the target was not met at the final ``level``
        (``what``: the setting to raise). Nothing when met or disabled."""
        if self.enabled and not self.frozen:
            last = self.measured[-1]["ms"] if self.measured else float("nan")
            self.run.console.warn(
                f"latency target {self.target_ms:g} ms not met at the final "
                f"sparsity {level:.1%} ({last:.1f} ms); raise {what} or the target")

    def summary(self) -> dict[str, Any] | None:
        """What the results record: target, shape, every measurement, where it was met."""
        if not self.enabled:
            return None
        return {"target_ms": self.target_ms, "batch_size": self.batch_size,
                "seq_length": self.seq_length, "measured": self.measured,
                "met": self.frozen, "met_at_sparsity": self.met_at,
                "device": str(self.run.ctx.device), "threads": torch.get_num_threads()}

    def state_dict(self) -> dict[str, Any]:
        return {"measured": self.measured, "met_at": self.met_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.measured = list(state.get("measured", []))
        self.met_at = state.get("met_at")

"""``capscale plan``: the memory plan of every strategy at each world size, whether it
fits the device, and what to change when it does not.

For a strategy that does not fit, :func:`advise` tries the changes that trade speed or
precision for memory, cheapest first, keeping each one that lowers the plan until it
fits: activation checkpointing, frozen references in bf16, ZeRO-3's CPU offload of the
optimiser and then of the parameters, a smaller micro-batch with more accumulation
steps (the global batch kept), banks on the device sharded or in bf16, bf16 compute.
Changes found unnecessary once it fits are dropped again, so what is printed is a
short list of ``key=value`` overrides that can be pasted after the config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from capscale.config import config_from_dict, config_to_dict
from capscale.config.loader import merge_dicts, parse_overrides
from capscale.report.memory_plan import (
    GIB,
    PARTS,
    STRATEGIES,
    MemoryPlan,
    PlanInputs,
    Strategy,
    plan_memory,
    read_inputs,
)

if TYPE_CHECKING:
    from capscale.config import Config
    from capscale.console import Console


@dataclass
class Advice:
    """One strategy at one world size: its plan and, when it does not fit, the
    overrides tried (``changes``), the plan with them (``best``) and whether that fits."""

    plan: MemoryPlan
    changes: list[str] = field(default_factory=list)
    best: MemoryPlan | None = None
    fixed: bool = False

    def to_dict(self, device_gib: float) -> dict[str, Any]:
        out = {**self.plan.to_dict(), "fits": self.plan.fits(device_gib)}
        if self.best is not None:
            out["suggestion"] = {"overrides": self.changes, "fits": self.fixed,
                                 "device_gib": self.best.device_bytes / GIB}
        return out


def with_overrides(cfg: Config, changes: list[str]) -> Config:
    """``cfg`` with ``key=value`` overrides applied (checked like the config itself)."""
    return config_from_dict(merge_dicts(config_to_dict(cfg), parse_overrides(changes)))


def _moves(plan: MemoryPlan, cfg: Config) -> list[list[str]]:
    """Candidate changes for ``plan`` in order of cost (see the module docstring)."""
    moves: list[list[str]] = []
    if not plan.gradient_checkpointing:
        moves.append(["train.gradient_checkpointing=true"])
    if plan.reference_dtype == "fp32" and plan.device == "cuda":
        moves.append(["cap.reference_dtype=bf16"])
    if plan.strategy == "zero3":
        moves += [["distributed.offload_optimizer=true"], ["distributed.offload_params=true"]]
    batch, accumulation = plan.micro_batch, plan.accumulation
    while batch > 1 and batch % 2 == 0:
        batch, accumulation = batch // 2, accumulation * 2
        moves.append([f"train.batch_size={batch}",
                      f"train.gradient_accumulation_steps={accumulation}"])
    if plan.part("banks").state:
        if plan.world > 1 and cfg.cap.bank_sharding != "sharded":
            moves.append(["cap.bank_sharding=sharded"])
        if cfg.cap.bank_dtype != "bfloat16":
            moves.append(["cap.bank_dtype=bfloat16"])
    if plan.precision == "fp32" and plan.device == "cuda":
        moves.append(["train.precision=bf16"])
    return moves


def _key(change: str) -> str:
    return change.split("=", 1)[0]


def advise(plan: MemoryPlan, cfg: Config, device_gib: float, inputs: PlanInputs,
           baseline_bytes: int | None = None) -> Advice:
    """The overrides under which ``plan`` (of ``cfg``) fits in ``device_gib``."""
    if plan.refused is not None or plan.fits(device_gib):
        return Advice(plan)

    def replan(changes: list[str]) -> MemoryPlan:
        return plan_memory(with_overrides(cfg, changes), plan.world,
                           strategy=cast(Strategy, plan.strategy), device=plan.device,
                           baseline_bytes=baseline_bytes, inputs=inputs)

    changes: list[str] = []
    best = plan
    for move in _moves(plan, cfg):
        keys = {_key(m) for m in move}
        trial = [c for c in changes if _key(c) not in keys] + move
        candidate = replan(trial)
        if candidate.device_bytes < best.device_bytes:
            changes, best = trial, candidate
        if best.fits(device_gib):
            break
    if not best.fits(device_gib):
        return Advice(plan, changes, best, False)
    for change in list(changes):  # drop what the fit does not need
        if _key(change) == "train.gradient_accumulation_steps":
            continue  # goes with its batch size
        fewer = [c for c in changes if c != change and not (
            _key(change) == "train.batch_size"
            and _key(c) == "train.gradient_accumulation_steps")]
        candidate = replan(fewer)
        if candidate.fits(device_gib):
            changes, best = fewer, candidate
    return Advice(plan, changes, best, True)


def strategies_at(world: int) -> list[str]:
    """The strategies planned at ``world`` ranks: ``single`` only at 1."""
    return [s for s in STRATEGIES if world == 1 or s != "single"]


def plan_all(cfg: Config, worlds: list[int], device_gib: float, device: str = "cuda",
             train_examples: int | None = None, baseline_bytes: int | None = None
             ) -> dict[int, list[Advice]]:
    """Every strategy's plan and advice at each world size."""
    inputs = read_inputs(cfg, train_examples)
    out: dict[int, list[Advice]] = {}
    for world in worlds:
        out[world] = []
        for name in strategies_at(world):
            plan = plan_memory(cfg, world, strategy=cast(Strategy, name), device=device,
                               baseline_bytes=baseline_bytes, inputs=inputs)
            out[world].append(advise(plan, cfg, device_gib, inputs, baseline_bytes))
    return out


def _gib(size: int) -> str:
    return f"{size / GIB:.2f}"


def render(found: dict[int, list[Advice]], device_gib: float, console: Console) -> None:
    """One table per world size (parts in GiB per rank, a column per strategy), then
    the suggestions for every strategy that does not fit."""
    from rich.table import Table

    first = next(iter(found.values()))[0].plan
    s = first.shape
    print(f"model {s.name}: {s.parameters:,} parameters, {s.prunable:,} prunable, "
          f"{s.layers} layers x {s.hidden} ({s.source})")
    print(f"training set: {first.train_examples:,} examples ({first.examples_source}); "
          f"micro-batch {first.micro_batch} x {first.seq_length} tokens, "
          f"{first.accumulation} accumulation step(s); device {first.device}, "
          f"{device_gib:g} GiB; precision {first.precision}, references "
          f"{first.reference_dtype}; checkpointing "
          f"{'on' if first.gradient_checkpointing else 'off'}")
    for world, advice in found.items():
        t = Table(title=f"memory per rank (GiB), world {world}", header_style="bold")
        t.add_column("part")
        for a in advice:
            t.add_column(a.plan.strategy, justify="right")
        for name in PARTS:
            t.add_row(name, *(_gib(a.plan.part(name).device) for a in advice))
        t.add_row("total per rank", *(_gib(a.plan.device_bytes) for a in advice),
                  style="bold")
        t.add_row("host per rank", *(_gib(a.plan.host_bytes) for a in advice))
        t.add_row("peak at", *(a.plan.peak_phase for a in advice))
        t.add_row(f"fits {device_gib:g} GiB", *(
            "refused" if a.plan.refused else "yes" if a.plan.fits(device_gib) else "NO"
            for a in advice))
        console.rich.print(t)
        for a in advice:
            _advice_lines(a, advice, device_gib)
    notes = dict.fromkeys(n for advice in found.values() for a in advice for n in a.plan.notes)
    for note in notes:
        print(f"note: {note}")


def _advice_lines(a: Advice, row: list[Advice], device_gib: float) -> None:
    p = a.plan
    if p.refused is not None:
        print(f"  {p.strategy}: refused: {p.refused}")
        return
    if p.fits(device_gib):
        return
    head = f"  {p.strategy} (world {p.world}): needs {_gib(p.device_bytes)} GiB"
    best = a.best or p
    if a.fixed:
        print(f"{head}; fits ({_gib(best.device_bytes)} GiB) with: " + " ".join(a.changes))
    else:
        tried = f"{_gib(best.device_bytes)} GiB with " + " ".join(a.changes) \
            if a.changes else "no change the planner tries lowers it"
        print(f"{head}; does not fit ({tried}; {_gib(best.state_bytes)} GiB is held "
              "between steps)")
    if p.strategy in ("zero3", "fsdp2"):
        return
    others = [f"{o.plan.strategy} (fits as configured)" if o.plan.fits(device_gib)
              else f"{o.plan.strategy} (fits with its changes)" for o in row
              if o.plan.strategy in ("zero3", "fsdp2") and (o.plan.fits(device_gib) or o.fixed)]
    if others:
        print(f"    or strategy={', '.join(others)}")


def write_json(found: dict[int, list[Advice]], device_gib: float, path: str) -> None:
    """The plans as JSON (GiB per rank), by world size then strategy."""
    data = {"device_memory_gib": device_gib,
            "worlds": {str(w): {a.plan.strategy: a.to_dict(device_gib) for a in advice}
                       for w, advice in found.items()}}
    text = json.dumps(data, indent=1) + "\n"
    if path == "-":
        print(text, end="")
    else:
        Path(path).write_text(text)

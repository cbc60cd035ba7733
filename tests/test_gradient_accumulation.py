"""Gradient accumulation (``train.gradient_accumulation_steps``): k micro-batches per
optimiser step, every schedule counting optimiser steps, the gradient all-reduce only on
the last micro-batch, and a kill mid-accumulation that resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import rank_pool
import torch
from distributed_helpers import GLOBAL_BATCH, batch_rows, build_run, make_assets
from test_resume import _kill_and_resume, _steps
from torch.utils.data import DataLoader

from capscale.checks import load_run_config
from capscale.config import ConfigError, config_from_dict, config_to_dict
from capscale.console import Console
from capscale.distributed import DistContext
from capscale.recipe import steps_per_epoch
from capscale.train.hooks import LoopHook
from capscale.train.loop import TrainLoop
from capscale.train.state import RunState

ACCUM = {"train.gradient_accumulation_steps": 2}
# CE + KD + soft movement's L1 regulariser, the contrastive terms off.
PLAIN = {"pruning.method": "soft_movement", "pruning.final_lambda": 5.0,
         **{f"cap.modules.{m}.enabled": False for m in ("prc", "fic", "snc")}}
# The tiny resume task (64 rows) in micro-batches of 4, two per step: 8 optimiser steps
# per epoch, 24 in all, as many as the single reference's batches of 8 (tests/references.py).
ACCUM_RUN = {"train.batch_size": 4, **ACCUM}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), else the tensor."""
    to_local = getattr(t, "to_local", None)
    return (to_local() if callable(to_local) else t).detach().clone()


def _grads_at_each_step(run: Any) -> list[dict[str, torch.Tensor]]:
    """The gradients the optimiser steps on (after clipping; this rank's shards under
    FSDP2), one dict per step."""
    seen: list[dict[str, torch.Tensor]] = []
    model = run.strategy.unwrap(run.student.model)

    def record(*_: Any) -> None:
        seen.append({n: _local(p.grad) for n, p in model.named_parameters()
                     if p.grad is not None})
    run.student.optimizer.register_step_pre_hook(record)
    return seen


def _params(run: Any) -> dict[str, torch.Tensor]:
    return {n: _local(p) for n, p in run.strategy.unwrap(run.student.model).named_parameters()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_micro_batches_equal_one_batch_of_twice_the_size(assets):
    """CE, KD and the regulariser over the two halves of a batch of 8 give the gradients
    (clipped, as the optimiser sees them) and the parameters of the whole batch."""
    torch.set_num_threads(1)
    big = build_run(assets, DistContext(), 8, **PLAIN)
    acc = build_run(assets, DistContext(), 4, **PLAIN, **ACCUM)
    g_big, g_acc = _grads_at_each_step(big), _grads_at_each_step(acc)
    assert _max_diff(_params(big), _params(acc)) == 0
    for step in range(3):
        first = 8 * step
        r_big = big.train_step(batch_rows(big, first, first + 8))
        r_acc = acc.train_step([batch_rows(acc, first, first + 4),
                                batch_rows(acc, first + 4, first + 8)])
        assert {"ce", "kd", "l1", "loss"} <= r_big.keys() == r_acc.keys()
        for key in ("ce", "kd", "l1", "loss"):  # the record: the micro-batches' mean
            assert r_acc[key] == pytest.approx(r_big[key], abs=1e-6), key
    assert big.state.step == acc.state.step == 3
    assert (big.state.batches_drawn, acc.state.batches_drawn) == (3, 6)
    assert len(g_big) == len(g_acc) == 3  # one optimiser step per two micro-batches
    for gb, ga in zip(g_big, g_acc):
        assert _max_diff(gb, ga) < 1e-6
    assert _max_diff(_params(big), _params(acc)) < 1e-6
    moved = _max_diff(_params(big), _params(build_run(assets, DistContext(), 8, **PLAIN)))
    assert moved > 1e-4  # the steps did change the parameters


def test_a_non_finite_micro_batch_skips_the_whole_step(assets):
    """A NaN in the second micro-batch: no update, the first one's gradients dropped, so
    the next step is exactly a fresh run's first step."""
    torch.set_num_threads(1)
    nan = build_run(assets, DistContext(), 4, **PLAIN, **ACCUM,
                    **{"train.debug_nan_batches": [1]})
    fresh = build_run(assets, DistContext(), 4, **PLAIN, **ACCUM)
    before = _params(nan)
    halves = [batch_rows(nan, 0, 4), batch_rows(nan, 4, 8)]
    with pytest.raises(FloatingPointError, match="non-finite loss at step 0"):
        nan.train_step(halves)
    assert _max_diff(_params(nan), before) == 0
    assert all(p.grad is None for p in nan.student.model.parameters())
    assert (nan.state.step, nan.state.batches_drawn) == (0, 2)
    nan.train_step(halves)
    fresh.train_step(halves)
    assert _max_diff(_params(nan), _params(fresh)) == 0


class _Steps(LoopHook):
    def __init__(self) -> None:
        self.before: list[int] = []
        self.after: list[int] = []

    def before_step(self, step: int) -> None:
        self.before.append(step)

    def after_step(self, record: dict[str, Any]) -> None:
        self.after.append(record["step"])


def _loop(k: int, total: int, batches: int = 5) -> tuple[list[list[int]], _Steps, RunState]:
    rows = [{"input_ids": torch.full((2, 3), i)} for i in range(batches)]
    loader = DataLoader(rows, batch_size=None)  # batch i is row i, in order
    groups: list[list[int]] = []

    def step(group: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        groups.append([int(b["input_ids"][0, 0]) for b in group])
        return {"loss": 0.0}
    hook, state = _Steps(), RunState()
    TrainLoop(state, loader, total, step, Console(enabled=False), "test", [hook],
              accumulation=k).run()
    return groups, hook, state


def test_the_loop_counts_optimiser_steps():
    """k micro-batches per step; an epoch of 5 batches has 2 steps of 2 (the fifth batch
    is not trained on); hooks see optimiser step numbers."""
    groups, hook, state = _loop(2, 4)
    assert groups == [[0, 1], [2, 3], [0, 1], [2, 3]]
    assert hook.before == [0, 1, 2, 3] and hook.after == [1, 2, 3, 4]
    assert (state.step, state.epoch, state.batches_done, state.batches_drawn) == (4, 1, 4, 8)
    groups, hook, state = _loop(1, 4)
    assert groups == [[0], [1], [2], [3]] and hook.after == [1, 2, 3, 4]


def test_steps_per_epoch_counts_groups_of_micro_batches():
    cfg = load_run_config(None, ["data.preset=tweets", "train.gradient_accumulation_steps=4"])
    assert steps_per_epoch(16, cfg.train) == 4 and steps_per_epoch(17, cfg.train) == 4
    with pytest.raises(ConfigError, match="more than the 3 training batch"):
        steps_per_epoch(3, cfg.train)


def test_config_value_checked_and_round_trips(tmp_path):
    base = ["data.preset=tweets", f"output_dir={tmp_path}"]
    for bad in ("0", "-2"):
        with pytest.raises(ConfigError) as err:
            load_run_config(None, [*base, f"train.gradient_accumulation_steps={bad}"])
        assert "train.gradient_accumulation_steps" in str(err.value)
        assert "\n" not in str(err.value)
    for strategy in ("single", "ddp", "zero3", "fsdp2"):
        load_run_config(None, [*base, f"strategy={strategy}",
                               "train.gradient_accumulation_steps=2"])
    cfg = load_run_config(None, [*base, "strategy=ddp", "train.gradient_accumulation_steps=4"])
    again = config_from_dict(config_to_dict(cfg))
    assert again.train.gradient_accumulation_steps == 4 and again == cfg
    assert load_run_config(None, base).train.gradient_accumulation_steps == 1


def _history(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def test_a_run_schedules_by_optimiser_steps(references):
    """Micro-batches of 4, two per step, against batches of 8: the same 24 optimiser
    steps, LR and sparsity at every step, evaluations and checkpoints at the same step
    numbers (twice the steps of batches of 4 without accumulation)."""
    acc, ref = references.get(1, ACCUM_RUN), references.get(1, {})
    ha, hr = _history(acc), _history(ref)
    assert [r["step"] for r in ha] == [r["step"] for r in hr] == list(range(1, 25))
    assert [r["lr"] for r in ha] == [r["lr"] for r in hr]
    assert [r["sparsity"] for r in ha] == [r["sparsity"] for r in hr]
    ea, er = (json.loads((d / "evals.json").read_text()) for d in (acc, ref))
    # every 6 steps (train.eval_every) and at each epoch's end (8 optimiser steps)
    assert [e["step"] for e in ea] == [e["step"] for e in er] == [6, 8, 12, 16, 18, 24]
    assert _steps(acc) == _steps(ref) == [21, 24]
    state = json.loads((acc / "checkpoints" / "step-00000024" / "trainer_state.json")
                       .read_text())
    run = state["run"]
    assert (run["step"], run["batches_drawn"]) == (24, 48)
    assert json.loads((acc / "results.json").read_text())["steps"] == 24


def test_kill_mid_accumulation_resumes_exactly(references, resume_assets, tmp_path):
    """SIGKILL anywhere after a checkpoint (mid-accumulation included), resume: the run
    ends exactly as the uninterrupted one; checkpoints hold whole optimiser steps."""
    ref = references.get(1, ACCUM_RUN)
    _kill_and_resume(resume_assets, tmp_path, 1, ref, **ACCUM_RUN)
    for ckpt in (tmp_path / "killed" / "checkpoints").glob("step-*"):
        state = json.loads((ckpt / "trainer_state.json").read_text())
        run = state["run"]
        assert run["batches_done"] % 2 == 0 and run["batches_drawn"] == 2 * run["step"]


def _accumulate_on_ranks(rank: int, world: int, strategy: str, assets: dict[str, str],
                         **plain: Any) -> dict[str, Any]:
    """k = 1 with local batches of 4 against k = 2 with micro-batches of 2; first one
    micro-batch alone with the sync off, then dropped (``Update.discard``): what it left
    would show in the next step's gradients."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from capscale.distributed import init_distributed
    ctx = init_distributed(strategy)
    per = GLOBAL_BATCH // world
    big = build_run(assets, ctx, per, **plain)
    acc = build_run(assets, ctx, per // 2, **plain, **ACCUM)
    calls = {"big": 0, "acc": 0}  # DDP's gradient all-reduces (one per bucket)

    def counting(name: str) -> Any:
        def hook(state: Any, bucket: Any) -> Any:
            calls[name] += 1
            return allreduce_hook(None, bucket)  # type: ignore[arg-type]
        hook.__annotations__.clear()  # DDP checks real (not postponed) annotations only
        return hook
    if strategy == "ddp":
        big.student.model.register_comm_hook(None, counting("big"))
        acc.student.model.register_comm_hook(None, counting("acc"))
    out: dict[str, Any] = {}
    first = batch_rows(acc, rank * per, rank * per + per // 2)
    acc.controller.before_step(0)
    with acc.update.sync(False):
        acc.update.backward(acc.loss(acc.student.model, acc.student.tap, first, 0), 0, 0, 0.5)
    model = acc.strategy.unwrap(acc.student.model)
    out["unsynced_calls"] = calls["acc"]
    if strategy == "ddp":  # replicated: the local gradients, not yet averaged
        grad = next(p.grad for p in model.parameters() if p.grad is not None)
        gathered = [torch.zeros_like(grad) for _ in range(world)]
        torch.distributed.all_gather(gathered, grad.contiguous())
        out["unsynced_rank_diff"] = float((gathered[0] - gathered[1]).abs().max())
    elif strategy == "fsdp2":  # sharded: nothing reduce-scattered into the shards yet
        out["sharded_grads"] = sum(p.grad is not None for p in model.parameters())
    acc.update.discard()
    # ZeRO-3 keeps its gradients in the engine's partitions: parameters and losses only.
    zero3 = strategy == "zero3"
    g_big, g_acc = ([], []) if zero3 else (_grads_at_each_step(big), _grads_at_each_step(acc))
    per_step, loss_diff = [], 0.0
    for step in range(2):
        start = step * GLOBAL_BATCH + rank * per
        before = dict(calls)
        r_big = big.train_step(batch_rows(big, start, start + per))
        r_acc = acc.train_step([batch_rows(acc, start, start + per // 2),
                                batch_rows(acc, start + per // 2, start + per)])
        loss_diff = max(loss_diff, abs(r_big["loss"] - r_acc["loss"]))
        per_step.append({k: calls[k] - before[k] for k in calls})
    out["calls_per_step"], out["loss_diff"] = per_step, loss_diff
    if zero3:
        out["param_diff"] = _max_diff(*(_gathered_params(r) for r in (big, acc)))
        return out
    out["steps"] = (len(g_big), len(g_acc))
    out["grad_diff"] = max(_max_diff(a, b) for a, b in zip(g_big, g_acc))
    out["grad_scale"] = max(float(g.abs().max()) for step in g_big for g in step.values())
    out["param_diff"] = _max_diff(_params(big), _params(acc))
    out["grads"] = g_acc[-1]
    return out


def _gathered_params(run: Any) -> dict[str, torch.Tensor]:
    """The whole parameters of a sharded student (collective)."""
    with run.strategy.gathered(run.student.model) as bare:
        return {n: p.detach().clone() for n, p in bare.named_parameters()}


def _two_rank_worker(rank: int, world: int, assets: dict[str, str]) -> dict[str, Any]:
    # FSDP2: movement (CE + KD); soft movement's regulariser fails in backward under
    # fsdp2 with or without accumulation, a limitation of its own.
    movement = {**PLAIN, "pruning.method": "movement"}
    return {"ddp": _accumulate_on_ranks(rank, world, "ddp", assets, **PLAIN),
            "fsdp2": _accumulate_on_ranks(rank, world, "fsdp2", assets, **movement),
            "zero3": _accumulate_on_ranks(rank, world, "zero3", assets, **movement)}


@pytest.fixture(scope="module")
def two_ranks(assets) -> list[dict[str, Any]]:
    return rank_pool.run(_two_rank_worker, assets)


def _matches_the_doubled_batch(r: dict[str, Any]) -> None:
    assert r["steps"] == (2, 2)  # one optimiser step per two micro-batches
    # fp32 rounding of sums taken in another order (locally, then over ranks); AdamW
    # divides by sqrt(v), which magnifies it in the parameters of near-zero gradients
    assert r["grad_diff"] < 1e-6 * max(r["grad_scale"], 1.0) and r["param_diff"] < 1e-5


@pytest.mark.multiprocess
def test_ddp_syncs_only_the_last_micro_batch(two_ranks):
    r0, r1 = (r["ddp"] for r in two_ranks)
    for r in (r0, r1):
        assert r["unsynced_calls"] == 0  # no all-reduce in a micro-batch's backward ...
        assert r["unsynced_rank_diff"] > 1e-6  # ... so the ranks' gradients differ
        for step in r["calls_per_step"]:  # one all-reduce per bucket and optimiser step
            assert step["acc"] == step["big"] >= 1
        _matches_the_doubled_batch(r)
    assert _max_diff(r0["grads"], r1["grads"]) == 0  # synced at the step


@pytest.mark.multiprocess
def test_zero3_accumulates_in_its_partitions(two_ranks):
    """ZeRO-3 reduce-scatters every micro-batch (partitioned gradients); the engine adds
    the partitions up to the step, which equals the doubled batch's."""
    for r in (r["zero3"] for r in two_ranks):
        assert r["loss_diff"] < 1e-6 and r["param_diff"] < 1e-5


@pytest.mark.multiprocess
def test_fsdp2_reduce_scatters_only_the_last_micro_batch(two_ranks):
    for r in (r["fsdp2"] for r in two_ranks):
        assert r["sharded_grads"] == 0  # the sync-off backward sent nothing
        _matches_the_doubled_batch(r)

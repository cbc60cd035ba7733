"""``train.precision`` (bf16 / fp16 with fp32 masters) and ``cap.reference_dtype``, on one
process and under ddp / fsdp2 / zero3 at two ranks."""

from __future__ import annotations

import json
from typing import Any

import pytest
import rank_pool
import torch
from distributed_helpers import batch_rows, build_run, make_assets
from test_structured_run import _args, tiny_assets  # noqa: F401  (a fixture)

from capscale.checks import load_run_config
from capscale.config import ConfigError
from capscale.distributed import DistContext
from capscale.distributed.precision import GradientOverflow, resolve_precision
from capscale.pruning.masked import MaskedLinear
from capscale.run import main

# Score updates of ~1e-4 (AdamW moves each score by about its lr) on scores near 0.1
# (the magnitude warm start): below half of bf16's spacing there (2**-11 = 4.9e-4), so
# scores stored in bf16 would not move at all.
SMALL_SCORE_STEPS = {"pruning.method": "movement", "pruning.score_lr": 1e-4}
STEPS = 3


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return (to_local() if callable(to_local) else t).detach().float().clone()


def _scores(run: Any) -> dict[str, torch.Tensor]:
    """This rank's fp32 master of every score matrix (ZeRO-3: the optimiser's fp32
    partition; FSDP2: the fp32 shard; else the parameter)."""
    out = {}
    for name, m in run.strategy.unwrap(run.student.model).named_modules():
        if isinstance(m, MaskedLinear) and m.mask_scores is not None:
            if run.strategy.name == "zero3":
                master = run.strategy.ds.utils.safe_get_local_fp32_param(m.mask_scores)
                assert master.dtype == torch.float32
                out[name] = master.detach().clone()
            else:
                assert m.mask_scores.dtype == torch.float32
                out[name] = _local(m.mask_scores)
    return out


def _train(run: Any, rank: int, world: int, per: int) -> tuple[list[float], torch.Tensor]:
    """STEPS optimiser steps on fixed rows; the losses and every score's change."""
    before = _scores(run)
    losses = []
    for step in range(STEPS):
        start = step * per * world + rank * per
        losses.append(run.train_step(batch_rows(run, start, start + per))["loss"])
    after = _scores(run)
    return losses, torch.cat([(after[k] - before[k]).flatten() for k in before])


def _compare(run_fp32: Any, run_low: Any, rank: int, world: int, per: int) -> dict[str, Any]:
    l32, d32 = _train(run_fp32, rank, world, per)
    llow, dlow = _train(run_low, rank, world, per)
    moved = d32.abs() > 0
    return {"loss_rel": max(abs(a - b) / abs(a) for a, b in zip(l32, llow)),
            "moved_fp32": float(moved.float().mean()),
            # scores the fp32 run moved that the low-precision run moved too
            "moved_low": float((dlow[moved].abs() > 0).float().mean()),
            "delta_ratio": float(dlow[moved].abs().median() / d32[moved].abs().median()),
            "teacher_dtype": str(next(run_low.teacher.parameters()).dtype)}


def test_bf16_keeps_fp32_masters_and_small_score_updates(assets):
    torch.set_num_threads(1)
    fp32 = build_run(assets, DistContext(), 8, **SMALL_SCORE_STEPS,
                     **{"train.precision": "fp32"})
    bf16 = build_run(assets, DistContext(), 8, **SMALL_SCORE_STEPS,
                     **{"train.precision": "bf16"})
    r = _compare(fp32, bf16, 0, 1, 8)
    assert r["moved_fp32"] > 0.9
    assert r["moved_low"] > 0.99 and 0.7 < r["delta_ratio"] < 1.3
    assert r["loss_rel"] < 0.02  # bf16 matmuls; the loss itself is summed in fp32
    assert r["teacher_dtype"] == "torch.bfloat16"  # cap.reference_dtype auto
    params = {p.dtype for p in bf16.strategy.unwrap(bf16.student.model).parameters()}
    assert params == {torch.float32}
    losses = bf16.loss(bf16.student.model, bf16.student.tap, batch_rows(bf16, 0, 8), 0)
    assert {v.dtype for v in losses.values()} == {torch.float32}
    # a snapshot copy is held in bf16 but ranks fp32 scores with its fp32 keep fraction
    copy = bf16.refs.student_copy(False)
    masked = [m for m in copy.modules() if isinstance(m, MaskedLinear)]
    assert masked and all(m.weight.dtype == torch.bfloat16 for m in masked)
    assert all(m.mask_scores is not None and m.mask_scores.dtype == torch.float32
               and m.keep_frac.dtype == torch.float64 for m in masked)


def test_reference_dtype_fp32_keeps_full_precision_references(assets):
    torch.set_num_threads(1)
    run = build_run(assets, DistContext(), 8, **{"train.precision": "bf16",
                                                 "cap.reference_dtype": "fp32"})
    assert {p.dtype for p in run.teacher.parameters()} == {torch.float32}
    assert run.strategy.autocast() is not None and run.strategy.precision.name == "bf16"


def test_fp16_overflow_skips_the_step_and_the_schedule(assets, tmp_path):
    """A loss scale far too large: the first steps overflow and are skipped (no
    optimiser, LR or sparsity step) and counted; the steps that follow have the fp32
    run's sparsity at the same step numbers (the schedule counts made steps)."""
    torch.set_num_threads(1)
    base = {"train.eval_every": 0, "checkpoint.every_steps": 0}  # 6 batches, 6 steps
    fp16 = build_run(assets, DistContext(), 8, **base, **{"train.precision": "fp16"},
                     output_dir=str(tmp_path / "fp16"))
    assert fp16.strategy.scaler is not None
    fp16.strategy.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**18)
    before = {n: p.detach().clone() for n, p in fp16.student.model.named_parameters()}
    with pytest.raises(GradientOverflow):
        fp16.train_step(batch_rows(fp16, 0, 8))
    assert fp16.state.step == 0 and fp16.student.scheduler.last_epoch == 0
    assert all(torch.equal(p, before[n]) for n, p in fp16.student.model.named_parameters())
    fp16.state.batches_drawn = 0  # the direct call above drew a batch the loop did not
    fp16.train()
    ref = build_run(assets, DistContext(), 8, **base, output_dir=str(tmp_path / "fp32"))
    ref.train()
    made = fp16.state.step
    assert fp16.state.overflow_skips >= 1 and made >= 1
    assert made + fp16.state.overflow_skips == 6 == ref.state.step  # one epoch's batches
    assert fp16.student.scheduler.last_epoch == made
    assert [r["step"] for r in fp16.state.history] == list(range(1, made + 1))
    assert [r["sparsity"] for r in fp16.state.history] == \
        [r["sparsity"] for r in ref.state.history][:made]
    assert fp16.strategy.scaler.get_scale() < 2.0**18
    # the scale travels with the checkpointed optimiser state
    fp16.strategy.save_state(tmp_path, fp16.student.model, fp16.student.optimizer,
                             fp16.student.scheduler)
    again = build_run(assets, DistContext(), 8, **base, **{"train.precision": "fp16"},
                      output_dir=str(tmp_path / "again"))
    again.strategy.load_state(tmp_path, again.student.model, again.student.optimizer,
                              again.student.scheduler)
    assert again.strategy.scaler is not None
    assert again.strategy.scaler.get_scale() == fp16.strategy.scaler.get_scale()


def test_structured_run_end_to_end_in_bf16(tiny_assets, tmp_path):  # noqa: F811
    """The entry point in bf16: teacher fine-tuning, structured CAP (unit masks,
    Taylor importance under autocast), the physically smaller export verified."""
    out = tmp_path / "run"
    rc = main(_args(tiny_assets, out, "structured.schedule=cubic", "structured.levels=[0.5]",
                    "structured.update_every=2", "pruning.final_sparsity=0.5",
                    "pruning.initial_warmup=0.2", "pruning.final_warmup=0.2",
                    "train.max_steps=6", "train.precision=bf16"))
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["export_verified"]["metrics"]


def test_precision_config_rules(tmp_path):
    base = ["data.preset=tweets", f"output_dir={tmp_path}"]
    assert load_run_config(None, base).train.precision == "auto"
    assert resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(ConfigError) as err:
        load_run_config(None, [*base, "train.precision=fp8"])
    assert "train.precision" in str(err.value)
    if not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        with pytest.raises(ConfigError, match="fp16 with strategy=zero3") as err:
            load_run_config(None, [*base, "strategy=zero3", "train.precision=fp16"])
        assert "\n" not in str(err.value)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True},
                              "zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match=r"enables bf16, but train\.precision=fp32"):
        load_run_config(None, [*base, "strategy=zero3", "train.precision=fp32",
                               f"distributed.deepspeed_config={ds}"])
    load_run_config(None, [*base, "strategy=zero3", "train.precision=bf16",
                           f"distributed.deepspeed_config={ds}"])


def _precision_on_ranks(rank: int, world: int, assets: dict[str, str]) -> dict[str, Any]:
    from capscale.distributed import init_distributed
    out: dict[str, Any] = {}
    for strategy in ("ddp", "fsdp2", "zero3"):
        ctx = init_distributed(strategy)
        runs = [build_run(assets, ctx, 4, **SMALL_SCORE_STEPS, **{"train.precision": p})
                for p in ("fp32", "bf16")]
        out[strategy] = _compare(*runs, rank, world, 4)
        if strategy == "zero3":
            cfg = runs[1].strategy.student_config(runs[1].student.model, 1e-3, 4, 1.0)
            out[strategy]["ds_bf16"] = cfg["bf16"]["enabled"]
            continue
        fp16 = build_run(assets, ctx, 4, **{"train.precision": "fp16"})
        outcome = []  # the default scale (2**16) overflows the first steps here
        for step in range(6):  # both ranks must skip the same steps
            start = step * 4 * world + rank * 4
            try:
                fp16.train_step(batch_rows(fp16, start, start + 4))
                outcome.append("step")
            except GradientOverflow:
                outcome.append("skip")
        out[strategy]["fp16"] = outcome
        out[strategy]["fp16_scale"] = fp16.strategy.scaler.get_scale()
    return out


@pytest.fixture(scope="module")
def two_ranks(assets) -> list[dict[str, Any]]:
    return rank_pool.run(_precision_on_ranks, assets)


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "zero3"])
def test_bf16_on_two_ranks(two_ranks, strategy):
    """Masters stay fp32 under each strategy's own bf16 (autocast; FSDP2's bf16 gathers;
    DeepSpeed's bf16 section): score updates far below bf16's spacing are kept."""
    for r in (ranks[strategy] for ranks in two_ranks):
        assert r["moved_fp32"] > 0.9 and r["moved_low"] > 0.99
        assert 0.7 < r["delta_ratio"] < 1.3
        assert r["loss_rel"] < 0.02
        assert r["teacher_dtype"] == "torch.bfloat16"
    if strategy == "zero3":
        assert two_ranks[0]["zero3"]["ds_bf16"] is True


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_fp16_overflow_is_agreed_over_ranks(two_ranks, strategy):
    r0, r1 = (ranks[strategy] for ranks in two_ranks)
    assert r0["fp16"] == r1["fp16"] and r0["fp16"][0] == "skip" and "step" in r0["fp16"]
    assert r0["fp16_scale"] == r1["fp16_scale"] < 2.0**16

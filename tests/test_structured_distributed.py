"""Structured CAP (iterative, 2 levels) under ddp / zero3 / fsdp2 equals one process.

One 2-rank job per strategy (on the session's two ranks, tests/rank_pool.py) runs the
real structured recipe on a tiny BERT (dropout off) with the training set read in a
fixed order, so that global batch ``k`` is the same rows for one process and for the
two ranks (4 rows each). Checked against one process: the Taylor importance at every
level (1e-4 relative), the heads and neurons kept per layer (exactly), the per-step
losses averaged over ranks, the LR of every step (fresh schedule per level), and the
final logits. Half the hidden dimension is pruned along (structured.hidden_sparsity).
On rank 0 the exported, physically smaller model gives the masked
student's logits (1e-5) and loads with
``AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import rank_pool
import torch
import torch.distributed as dist
from distributed_helpers import GLOBAL_BATCH, batch_rows, make_assets, run_config, scratch_dir
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification

from capscale.distributed import DistContext

pytestmark = pytest.mark.multiprocess

LEVELS = [0.25, 0.5]
HIDDEN = 0.5  # of the 32 hidden dimensions: 8 pruned at the first level, 16 at the last


def build(assets: dict[str, str], ctx: Any) -> Any:
    """The real recipe, structured, reading the training set in a fixed order."""
    from capscale.checks import run_config_from_dict
    from capscale.console import Console
    from capscale.data import Collator
    from capscale.recipe import CAPRecipe

    world, rank = ctx.world_size, ctx.rank
    cfg = run_config_from_dict(run_config(assets, scratch_dir(assets), **{
        "pruning.method": "structured", "structured.levels": LEVELS,
        "structured.retrain_steps": 2, "structured.importance_fraction": 0.5,
        "structured.hidden_sparsity": HIDDEN, "train.batch_size": GLOBAL_BATCH // world}))
    run = CAPRecipe(cfg, ctx, Console(enabled=False))
    run.setup()
    ds, per = run.loaders.bank.dataset, GLOBAL_BATCH // world
    order = [i for b in range(len(ds) // GLOBAL_BATCH)
             for i in range(b * GLOBAL_BATCH + rank * per, b * GLOBAL_BATCH + (rank + 1) * per)]
    run.loaders.train = run.loaders.importance = DataLoader(
        ds, batch_size=per, sampler=order, collate_fn=Collator(0))
    # the controller was handed the importance loader at setup: hand it this one
    run.controller.run = dataclasses.replace(run.controller.run,
                                             importance_loader=run.loaders.importance)
    return run


def record_run(run: Any, export_dir: Path) -> dict[str, Any]:
    """Run it; importance and kept units per level, losses, LRs, logits, the export."""
    from capscale.data import model_inputs

    ctx, out = run.ctx, {"importance": [], "keep": []}
    ctl = run.controller
    importance, prune_to = ctl.importance, ctl.prune_to

    def recorded_importance() -> Any:
        imp = importance()
        out["importance"].append(torch.cat([*imp.heads, *imp.ffn, imp.hidden]))
        return imp

    def recorded_prune_to(level: float) -> None:
        prune_to(level)
        out["keep"].append((*ctl.masks.keep(), [ctl.masks.hidden_keep()]))

    ctl.importance, ctl.prune_to = recorded_importance, recorded_prune_to
    run.train()
    losses = torch.tensor([h["loss"] for h in run.state.history], dtype=torch.float64)
    out["losses"] = (ctx.all_reduce_sum(losses) / ctx.world_size).tolist()
    out["lrs"] = [h["lr"] for h in run.state.history]
    out["accuracy"] = [e["metrics"]["accuracy"] for e in run.state.evals]
    out["head_sparsity"] = ctl.report()["head_sparsity"]
    batch = model_inputs(batch_rows(run, 0, GLOBAL_BATCH), ctx.device)
    run.student.model.eval()
    with torch.no_grad():
        out["logits"] = run.student.model(**batch).logits.cpu()
    report = run.export(export_dir)  # collective; slices in place on one process
    if ctx.is_main:
        model = AutoModelForSequenceClassification.from_pretrained(
            export_dir / "model", trust_remote_code=True).eval()
        with torch.no_grad():
            out["export_logits"] = model(**{k: v.cpu() for k, v in batch.items()}).logits
        out["export_heads"] = report["heads_per_layer"]
    return out


def worker(rank: int, world: int, strategy: str, assets: dict[str, str], out_dir: str
           ) -> None:
    """One rank (of tests/rank_pool.py)."""
    from capscale.distributed import init_distributed
    ctx = init_distributed(strategy)  # the pool's process group, with this strategy
    record = record_run(build(assets, ctx), Path(out_dir) / "export")
    if rank == 0:
        torch.save({**record, "strategy": ctx.strategy}, Path(out_dir) / "record.pt")
    if strategy != "ddp":
        _entry_point(assets, Path(out_dir), strategy)
    dist.barrier()


def _entry_point(assets: dict[str, str], out_dir: Path, strategy: str) -> None:
    """The real entry point, structured, on 2 ranks (its export is collective)."""
    import yaml

    from capscale.run import main
    cfg_path = out_dir / "smoke.yaml"
    if dist.get_rank() == 0:
        cfg_path.write_text(yaml.safe_dump(run_config(assets, str(out_dir / "smoke"), **{
            "pruning.method": "structured", "structured.levels": [0.5],
            "structured.retrain_steps": 1, "structured.importance_fraction": 0.2,
            "train.batch_size": 4, "report.enabled": False})))
    dist.barrier()
    rc = main(["--config", str(cfg_path), f"strategy={strategy}"])
    if dist.get_rank() == 0:
        (out_dir / "smoke_rc.txt").write_text(str(rc))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def single(assets, tmp_path_factory):
    torch.set_num_threads(1)
    run = build(assets, DistContext())
    return record_run(run, tmp_path_factory.mktemp("single") / "export")


@pytest.mark.parametrize("strategy", ["ddp", "zero3", "fsdp2"])
def test_structured_two_ranks_match_one_process(strategy, assets, single, tmp_path):
    rank_pool.run(worker, strategy, assets, str(tmp_path))
    rec = torch.load(tmp_path / "record.pt", weights_only=False)
    assert rec["strategy"] == strategy
    assert len(rec["importance"]) == len(rec["keep"]) == len(LEVELS)
    for level, (got, want) in enumerate(zip(rec["importance"], single["importance"])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9,
                                   msg=lambda m, i=level: f"importance, level {i}: {m}")
    for got, want in zip(rec["keep"], single["keep"]):  # heads / neurons kept per layer
        for g, w in zip([*got[0], *got[1], *got[2]], [*want[0], *want[1], *want[2]]):
            assert torch.equal(g, w)
    assert [int((~k[2][0]).sum()) for k in rec["keep"]] == [8, 16]
    assert rec["head_sparsity"] == pytest.approx(LEVELS[-1])
    assert all(torch.isfinite(torch.tensor(rec["losses"])))
    assert rec["losses"] == pytest.approx(single["losses"], rel=1e-4)
    assert rec["lrs"] == pytest.approx(single["lrs"], rel=1e-9)  # restarted per level
    assert rec["accuracy"] == pytest.approx(single["accuracy"])
    torch.testing.assert_close(rec["logits"], single["logits"], rtol=1e-4, atol=1e-5)
    # The sliced export on rank 0 is the masked (sharded) student.
    torch.testing.assert_close(rec["export_logits"], rec["logits"], rtol=0, atol=1e-5)
    assert rec["export_heads"] == single["export_heads"]
    assert sum(rec["export_heads"]) == round((1 - LEVELS[-1]) * 8)
    if strategy != "ddp":  # python -m capscale.run, structured, on the 2 ranks
        assert (tmp_path / "smoke_rc.txt").read_text() == "0"
        smoke = tmp_path / "smoke" / "pruned"
        report = json.loads((smoke / "sparsity_report.json").read_text())
        assert report["head_sparsity"] == pytest.approx(0.5)
        assert report["results"]["strategy"] == strategy
        model = AutoModelForSequenceClassification.from_pretrained(
            smoke / "model", trust_remote_code=True)
        assert [lay.attention.self.num_attention_heads
                for lay in model.base_model.encoder.layer] == report["heads_per_layer"]

"""The CAP objective on 2 real gloo ranks equals one process on the concatenated batch."""

from __future__ import annotations

import pytest
import rank_pool
import torch
import torch.nn.functional as F

from capscale.config import CAPConfig
from capscale.contrastive.objectives import BankObjective, gathered_pairs
from capscale.distributed import DistContext

N, H, BATCH = 30, 8, 8  # training-set size, width, global batch (4 per rank)


def _problem() -> tuple[BankObjective, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    table = F.normalize(torch.randn(3, N, H, generator=g), dim=-1)  # prc, fic, snc views
    anchors = F.normalize(torch.randn(BATCH, H, generator=g), dim=-1)
    ids = torch.randperm(N, generator=g)[:BATCH]
    cfg = CAPConfig(num_negatives=10, temperature=0.2, max_snapshots=8)
    obj = BankObjective(cfg, N, H, torch.arange(N) % 3, seed=5)
    return obj, table, anchors, ids


def _fill_and_loss(ctx: DistContext, rows: slice) -> tuple[dict[str, float], torch.Tensor,
                                                            torch.Tensor]:
    obj, table, anchors, ids = _problem()
    for v, name in enumerate(("prc", "fic", "snc")):
        # each rank encodes its DistributedSampler-like shard (every world_size-th id)
        shard = torch.arange(ctx.rank, N, ctx.world_size)
        batches = [{"example_id": chunk} for chunk in shard.split(4)]
        obj.fill(name, gathered_pairs(lambda b, v=v: table[v][b["example_id"]], batches, ctx))
    mine = [{"example_id": c} for c in torch.arange(ctx.rank, N, ctx.world_size).split(4)]
    obj.fill("snc", gathered_pairs(lambda b: table[0][b["example_id"]].flip(-1), mine,
                                   ctx))  # a second snapshot: R = 2
    local = anchors[rows].clone().requires_grad_()
    losses = obj(local, ids[rows], ids[rows] % 3, step=3, ctx=ctx)
    torch.stack(list(losses.values())).sum().backward()
    return ({k: float(v.detach()) for k, v in losses.items()}, local.grad,
            obj.banks["snc"].vectors)


def _worker(rank: int, world: int, out: str) -> None:
    """One of the session's two gloo ranks (tests/rank_pool.py)."""
    per = BATCH // world
    losses, grad, snc = _fill_and_loss(DistContext(rank, world),
                                       slice(rank * per, (rank + 1) * per))
    torch.save({"losses": losses, "grad": grad, "snc": snc}, f"{out}/rank{rank}.pt")


@pytest.mark.multiprocess
def test_two_gloo_ranks_match_one_process(tmp_path):
    torch.set_num_threads(1)
    rank_pool.run(_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    losses, grad, snc = _fill_and_loss(DistContext(), slice(0, BATCH))
    assert set(losses) == {f"{m}_{k}" for m in ("prc", "fic", "snc") for k in ("unsup", "sup")}
    for name, value in losses.items():  # what a logger averaging over ranks shows
        mean = (ranks[0]["losses"][name] + ranks[1]["losses"][name]) / 2
        assert mean == pytest.approx(value, rel=1e-5, abs=1e-6), name
    # DDP averages gradients over ranks: each rank's rows, halved, are the one-process rows
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]) / 2, grad)
    for r in ranks:  # both ranks hold the whole bank, every row at its id
        torch.testing.assert_close(r["snc"], snc, rtol=0, atol=0)

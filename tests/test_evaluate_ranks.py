"""``evaluate`` on 2 and 3 gloo ranks, 13 validation rows: the same metrics as one process.

A DistributedSampler pads 13 rows to 14 (2 ranks) by repeating row 0, or to 15 (3 ranks)
by repeating rows 0 and 1; the gathered predictions must drop those copies. The model
is a fixed lookup whose prediction depends on the row (right on rows 0, 4, 8, 12, wrong
on row 1), so the padded copies change the accuracy.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import rank_pool
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DistributedSampler

from capscale.data import Collator, make_loader
from capscale.distributed import DistContext
from capscale.tasks import get_task
from capscale.train.evaluation import evaluate

ROWS, CLASSES, EVAL_BATCH = 13, 3, 3
GOLD = [0, 1, 2, 0, 1, 2, 0, 1, 2, 1, 0, 2, 1]
PRED = [0, 2, 0, 1, 1, 1, 2, 0, 2, 0, 2, 1, 1]  # right on rows 0, 4, 8 and 12


class RowLookup(nn.Module):
    """logits = a fixed table row per token id (the first token is the row number)."""

    def __init__(self) -> None:
        super().__init__()
        table = torch.zeros(ROWS, CLASSES)
        table[torch.arange(ROWS), torch.tensor(PRED)] = 1.0
        table += 0.01 * torch.arange(ROWS)[:, None]  # distinct logits per row
        self.register_buffer("table", table)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def _dataset() -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": torch.tensor([i, i]), "attention_mask": torch.ones(2, dtype=torch.long),
             "labels": torch.tensor(GOLD[i])} for i in range(ROWS)]


def _metrics(ctx: DistContext) -> dict[str, float]:
    ds = _dataset()
    sampler = (DistributedSampler(ds, ctx.world_size, ctx.rank, shuffle=False)
               if ctx.distributed else None)  # as data.build_loaders shards the eval set
    loader = make_loader(ds, EVAL_BATCH, Collator(0), sampler=sampler)
    return evaluate(RowLookup(), loader, ctx, get_task("classification"), CLASSES)


def _rank_metrics(rank: int, world: int, out: str) -> None:
    metrics = _metrics(DistContext(rank, world))
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(metrics, f)


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        _rank_metrics(rank, world, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_uneven_eval_set_equal_one_process(tmp_path, world):
    one = _metrics(DistContext())
    # independent check of the one-process numbers: 4 of 13 right
    assert one["accuracy"] == pytest.approx(4 / 13, abs=0, rel=1e-12)
    # what keeping the sampler's padding would report (2 ranks: row 0 twice, 5 of 14
    # right; 3 ranks: rows 0 and 1 twice, 5 of 15): different
    padded = list(range(ROWS)) + list(range(-ROWS % world))
    naive = get_task("classification").metrics(RowLookup().table[padded].numpy(),
                            torch.tensor(GOLD)[padded].numpy(), CLASSES)
    assert naive["accuracy"] == pytest.approx(5 / len(padded)) and naive != one

    if world == 2:  # the session's two ranks (tests/rank_pool.py)
        rank_pool.run(_rank_metrics, str(tmp_path))
    else:
        mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
                 join=True)
    for rank in range(world):
        ranks = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert ranks == one, (rank, ranks, one)  # exact, every metric, on every rank

"""Banks under 2 gloo ranks: rows stay matched to example ids under a shuffled
DistributedSampler, a sharded bank equals a replicated one, bf16 storage works."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scale_helpers import run_ranks, tiny_bert, write_csv
from torch.utils.data import DistributedSampler

from capscale.config import CAPConfig, DataConfig
from capscale.contrastive.banks import RepresentationBank
from capscale.contrastive.objectives import BankObjective, gathered_pairs
from capscale.data import Collator, load_task_data, make_loader, model_inputs, tokenize
from capscale.distributed import DistContext
from capscale.models.loading import (
    RepresentationTap,
    adapter_for,
    forward_with_representation,
    freeze,
    load_classifier,
    load_tokenizer,
)

N_ROWS = 50  # 45 train rows after the 10% hold-out: odd, so the sampler pads a rank


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("banks")
    return (write_csv(d / "train.csv", N_ROWS), tiny_bert(d / "a", seed=0),
            tiny_bert(d / "b", seed=1))


def _setup(csv: Path, model_dirs: list[Path]):
    data = load_task_data(DataConfig(train_file=str(csv), text_column="sentence",
                                     label_column="label"))
    tok = load_tokenizer(str(model_dirs[0]))
    ds = tokenize(data.train, tok, DataConfig(max_length=32))
    encoders = []
    for path in model_dirs:
        model = freeze(load_classifier(str(path), 3))
        tap = RepresentationTap(model, adapter_for(model))
        encoders.append(lambda b, m=model, t=tap: forward_with_representation(
            m, model_inputs(b, "cpu"), t)[1])
    labels = torch.as_tensor(data.train["labels"])
    return ds, Collator(tok.pad_token_id), encoders, labels


def _cfg(**kw) -> CAPConfig:
    return CAPConfig(num_negatives=16, max_snapshots=8, **kw)


def _fill_all(obj: BankObjective, ds, coll, encoders, ctx: DistContext, epoch: int) -> None:
    """PrC from model a, FiC from model b, SnC: two views (a then b), each from a
    freshly shuffled DistributedSampler epoch."""
    plan = [("prc", 0), ("fic", 1), ("snc", 0), ("snc", 1)]
    for i, (name, e) in enumerate(plan):
        sampler = DistributedSampler(ds, ctx.world_size, ctx.rank, shuffle=True, seed=3)
        sampler.set_epoch(epoch + i)
        obj.fill(name, gathered_pairs(encoders[e], make_loader(ds, 4, coll, sampler=sampler), ctx))


def _bank_worker(rank: int, world: int, csv: Path, a: Path, b: Path) -> None:
    ds, coll, encoders, labels = _setup(csv, [a, b])
    n, ctx = len(ds), DistContext(rank, world)
    with torch.no_grad():  # single-process encoding, in id order
        expected = [torch.cat([enc(bt) for bt in make_loader(ds, 7, coll)]) for enc in encoders]
    objs = {}
    for kind in ("replicated", "sharded"):
        for dtype in ("float32", "bfloat16"):
            obj = BankObjective(_cfg(bank_sharding=kind, bank_dtype=dtype), n, 32, labels,
                               seed=5, rank=rank, world_size=world)
            _fill_all(obj, ds, coll, encoders, ctx, epoch=1)
            objs[kind, dtype] = obj

    # Every row of the replicated bank is the single-process encoding of its id.
    rep = objs["replicated", "float32"].banks
    assert rep["prc"].num_rows == n
    torch.testing.assert_close(rep["prc"].vectors[:, 0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rep["fic"].vectors[:, 0], expected[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rep["snc"].views(torch.arange(n)),
                               torch.stack(expected, 1), atol=1e-5, rtol=1e-5)

    # A sharded bank stores ~N / world rows (ids = rank mod world) and serves them all.
    sh = objs["sharded", "float32"].banks
    assert sh["prc"].num_rows == len(range(rank, n, world))
    torch.testing.assert_close(sh["prc"].vectors[:, 0], expected[0][rank::world],
                               atol=1e-5, rtol=1e-5)
    ids = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:20]
    for name in ("prc", "fic", "snc"):
        assert torch.equal(sh[name].views(ids, sum_fn=ctx.sum_over_ranks),
                           rep[name].views(ids))
    with pytest.raises(ValueError, match="sum_fn"):
        sh["prc"].views(ids)

    # The CAP loss and its gradient: sharded == replicated exactly, in fp32 and bf16.
    g = torch.Generator().manual_seed(100 + rank)
    local_ids = torch.randperm(n, generator=g)[:6]
    raw = torch.randn(6, 32, generator=g)
    for dtype in ("float32", "bfloat16"):
        out = {}
        for kind in ("replicated", "sharded"):
            anchors = torch.nn.functional.normalize(raw, dim=-1).requires_grad_(True)
            losses = objs[kind, dtype](anchors, local_ids, labels[local_ids], 7, ctx)
            assert set(losses) == {f"{m}_{t}" for m in ("prc", "fic", "snc")
                                   for t in ("unsup", "sup")}
            total = torch.stack(list(losses.values())).sum()
            total.backward()
            out[kind] = (losses, anchors.grad)
        for k, v in out["replicated"][0].items():
            assert torch.isfinite(v), k
            assert torch.equal(v, out["sharded"][0][k]), (dtype, k)
        assert torch.equal(out["replicated"][1], out["sharded"][1])
        if dtype == "float32":
            fp32 = out["replicated"][0]
        else:  # bf16 storage only rounds the views: same loss to ~1e-2
            for k, v in out["replicated"][0].items():
                torch.testing.assert_close(v, fp32[k], rtol=2e-2, atol=2e-2)
    # bf16 storage halves the bank.
    assert objs["sharded", "bfloat16"].banks["prc"].vectors.element_size() == 2


@pytest.mark.multiprocess
def test_banks_two_ranks_shuffled_sharded_bf16(assets) -> None:
    run_ranks(_bank_worker, *assets)


def test_sharded_bank_single_rank_view_owns_rows() -> None:
    """Rows by id % world; a write of foreign ids is ignored; missing counts local rows."""
    bank = RepresentationBank(10, 4, 1, shard_rank=1, shard_world=3)
    assert bank.num_rows == 3  # ids 1, 4, 7
    slot = bank.begin_view()
    ids = torch.arange(10)
    bank.write(ids, ids[:, None].float().expand(10, 4), slot)
    assert bank.complete(slot)
    assert bank.vectors[:, 0, 0].tolist() == [1.0, 4.0, 7.0]
    part = bank.views(torch.tensor([4, 5, 1]), sum_fn=lambda t: t)
    assert part[:, 0, 0].tolist() == [4.0, 0.0, 1.0]  # 5 belongs to rank 2

"""Online CAP: bounded FIFO queue, live references, a recipe run, 2-rank parity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from scale_helpers import run_ranks, tiny_bert, write_csv

from capscale.checks import load_run_config
from capscale.config import CAPConfig, DataConfig
from capscale.console import Console
from capscale.contrastive.online import OnlineObjective
from capscale.contrastive.queue import ReferenceQueue
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
from capscale.recipe import CAPRecipe


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("online")
    return (write_csv(d / "train.csv", 60), tiny_bert(d / "a", seed=0),
            tiny_bert(d / "b", seed=1))


def _batches(csv: Path, model_dir: Path, batch_size: int) -> list[dict[str, torch.Tensor]]:
    data = load_task_data(DataConfig(train_file=str(csv), text_column="sentence",
                                     label_column="label"))
    tok = load_tokenizer(str(model_dir))
    ds = tokenize(data.train, tok, DataConfig(max_length=32))
    return list(make_loader(ds, batch_size, Collator(tok.pad_token_id)))


class FixedReferences:
    """A reference provider with fixed models: the objective needs no run to test."""

    def __init__(self, fixed: dict, snapshots: list) -> None:
        self.fixed, self.snapshots = fixed, list(snapshots)

    def frozen(self, module, persistent: bool):
        return self.fixed[module.name]

    def student_copy(self, train_mode: bool):
        return self.snapshots.pop(0)

    def reader(self, model):
        tap = RepresentationTap(model, adapter_for(model))
        return lambda inputs: forward_with_representation(model, inputs, tap)[1]

    def release(self, model) -> None:
        pass


def _objective(a: Path, b: Path, queue_size: int = 8, **kw) -> OnlineObjective:
    """PrC = model a, FiC = model b, SnC = a frozen copy of b then of a."""
    cfg = CAPConfig(queue_size=queue_size, max_snapshots=2, snapshot_train_mode=False, **kw)
    obj = OnlineObjective(cfg, 32)
    ma, mb = (freeze(load_classifier(str(p), 3)) for p in (a, b))
    refs = FixedReferences({"prc": ma, "fic": mb}, [mb, ma])
    obj.setup(refs)
    obj.add_snapshot(refs, False, "first")
    obj.add_snapshot(refs, False, "second")
    return obj


def test_queue_is_bounded_fifo_and_resets_on_new_views() -> None:
    q = ReferenceQueue(size=5, max_views=2, hidden=3)
    nbytes = sum(b.numel() * b.element_size() for b in q.buffers())
    for start in range(0, 12, 4):  # ids 0..11 in batches of 4
        ids = torch.arange(start, start + 4)
        q.enqueue(ids[:, None, None].float().expand(4, 1, 3), ids, ids % 3)
        assert len(q) == min(start + 4, 5)
    vecs, ids, labels = q.entries()
    assert ids.tolist() == [7, 8, 9, 10, 11]  # the newest 5, oldest first
    assert vecs.shape == (5, 1, 3) and vecs[:, 0, 0].tolist() == [7, 8, 9, 10, 11]
    assert labels.tolist() == [i % 3 for i in range(7, 12)]
    assert sum(b.numel() * b.element_size() for b in q.buffers()) == nbytes
    q.enqueue(torch.zeros(7, 2, 3), torch.arange(100, 107), torch.zeros(7, dtype=torch.long))
    assert q.entries()[1].tolist() == list(range(102, 107))  # R changed: reset, newest 5
    with pytest.raises(ValueError, match="at most 2 views"):
        q.enqueue(torch.zeros(1, 3, 3), torch.zeros(1, dtype=torch.long),
                  torch.zeros(1, dtype=torch.long))


def test_online_losses_finite_lower_when_aligned_memory_bounded(assets) -> None:
    csv, a, b = assets
    batches = _batches(csv, a, 6)
    obj = _objective(a, b, queue_size=8)
    mem = obj.memory_bytes()
    # Per module: K x R_max x H fp32 views, K ids and labels, 3 counters; SnC R_max = 2.
    assert mem == sum(8 * r * 32 * 4 + 2 * 8 * 8 + 3 * 8 for r in (1, 1, 2))
    student = load_classifier(str(a), 3).eval()
    tap = RepresentationTap(student, adapter_for(student))
    ctx = DistContext()
    for step, batch in enumerate(batches):  # 54 examples through a queue of 8
        inputs = model_inputs(batch, "cpu")
        aligned = forward_with_representation(student, inputs, tap)[1]
        # PrC's reference is the student itself: its anchors are perfectly aligned;
        # rolled by one, every anchor is another example's vector.
        rolled = aligned.roll(1, dims=0)
        state = {k: v.clone() for k, v in obj.queues.state_dict().items()}
        good = obj(aligned, batch["example_id"], batch["labels"], step, ctx, inputs=inputs)
        obj.queues.load_state_dict(state)  # both see the same queue
        bad = obj(rolled, batch["example_id"], batch["labels"], step, ctx, inputs=inputs)
        assert set(good) == {f"{m}_{t}" for m in ("prc", "fic", "snc")
                             for t in ("unsup", "sup")}
        assert all(torch.isfinite(v) for v in (*good.values(), *bad.values()))
        assert good["prc_unsup"] < bad["prc_unsup"]
    assert obj.memory_bytes() == mem
    assert all(len(q) == 8 for q in obj.queues.values())


def _online_worker(rank: int, world: int, csv: Path, a: Path, b: Path) -> None:
    torch.manual_seed(0)
    batches = _batches(csv, a, 8)[:3]
    dist_obj, single_obj = _objective(a, b), _objective(a, b)
    ctx, single = DistContext(rank, world), DistContext()
    g = torch.Generator().manual_seed(0)
    for step, batch in enumerate(batches):  # step 0: empty queue; later: queue in play
        anchors = F.normalize(torch.randn(8, 32, generator=g), dim=-1)
        half = slice(rank * 4, rank * 4 + 4)
        local = {k: v[half] for k, v in batch.items()}
        a_loc = anchors[half].clone().requires_grad_(True)
        a_all = anchors.clone().requires_grad_(True)
        per_rank = dist_obj(a_loc, local["example_id"], local["labels"], step, ctx,
                            inputs=model_inputs(local, "cpu"))
        expected = single_obj(a_all, batch["example_id"], batch["labels"], step, single,
                              inputs=model_inputs(batch, "cpu"))
        assert set(per_rank) == set(expected)
        for k, v in per_rank.items():
            mean = ctx.all_reduce_sum(v.detach().reshape(1))[0] / world
            torch.testing.assert_close(mean, expected[k], rtol=1e-5, atol=1e-6)
        torch.stack(list(per_rank.values())).sum().backward()
        torch.stack(list(expected.values())).sum().backward()
        # Gradients averaged over ranks (DDP) == the single-process gradient.
        torch.testing.assert_close(a_loc.grad / world, a_all.grad[half], rtol=1e-4, atol=1e-6)
    for name, q in dist_obj.queues.items():  # replicated: same queue as one process
        for x, y in zip(q.entries(), single_obj.queues[name].entries()):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.multiprocess
def test_online_two_ranks_match_global_loss(assets) -> None:
    run_ranks(_online_worker, *assets)


def test_cap_pruner_online_mode_trains(assets, tmp_path: Path) -> None:
    csv, a, b = assets
    cfg = load_run_config(None, [
        f"model.name_or_path={a}", f"model.teacher={b}", f"data.train_file={csv}",
        "data.text_column=sentence", "data.label_column=label", "data.max_length=32",
        "cap.mode=online", "cap.queue_size=16", "cap.max_snapshots=2",
        "train.epochs=3", "train.batch_size=8", "train.lr=0.001", "train.progress=false",
        "pruning.final_sparsity=0.5", f"output_dir={tmp_path}"])
    run = CAPRecipe(cfg, DistContext(), Console(enabled=False, progress=False))
    run.setup()
    assert isinstance(run.objective, OnlineObjective)
    before = {k: v.clone() for k, v in run.student.model.state_dict().items()}
    run.train()
    history = run.state.history
    assert run.state.step == 3 * len(run.loaders.train)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    assert {"prc_unsup", "fic_sup", "snc_unsup", "kd", "ce"} <= set(history[-1])
    assert len(run.objective.references["snc"]) == 2  # 3 epoch snapshots, at most 2 kept
    assert all(len(q) == 16 for q in run.objective.queues.values())
    after = run.student.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    sparsity = run.controller.report()["linear_sparsity"]
    assert sparsity == pytest.approx(0.5, abs=0.005)  # final

"""Faithful mode: the reference code's SnC epoch schedule (R = e views in epoch e, none
in epoch 0), every snapshot kept by default with its memory logged before training,
train-mode snapshot vectors read before the head's dropout, frozen embeddings, and the
LR and cubic-schedule warm-ups in steps. Each is pinned on a tiny real run."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from _tiny_run import overrides, run_batch, setup
from tiny import fast_overrides, tiny_config
from transformers import AutoTokenizer

from capscale.checks import load_run_config
from capscale.config import ConfigError
from capscale.console import Console
from capscale.data import model_inputs
from capscale.distributed import DistContext
from capscale.models.loading import forward_with_representation, resolve_model_path
from capscale.recipe import CAPRecipe
from capscale.train.hooks import LoopHook


class ViewsPerStep(LoopHook):
    """Records, at every step, the epoch, the SnC views the step saw and its terms."""

    def __init__(self, recipe: CAPRecipe) -> None:
        self.recipe, self.rows = recipe, []

    def after_step(self, record: dict[str, Any]) -> None:
        bank = self.recipe.objective.banks["snc"]
        self.rows.append((record["epoch"], bank.num_views, "snc_unsup" in record))


def _recipe(model: Path, data: tuple[Path, Path], out: Path, *extra: str,
            console: Console | None = None) -> CAPRecipe:
    cfg = load_run_config(None, [*fast_overrides(model, data, out), *extra])
    recipe = CAPRecipe(cfg, DistContext(), console or Console(enabled=False, progress=False))
    recipe.setup()
    return recipe


FOUR_EPOCHS = ("train.epochs=4", "train.max_steps=null", "train.batch_size=32")  # 2 steps each


@pytest.mark.parametrize("extra,views,kept", [
    ((), {0: 0, 1: 1, 2: 2, 3: 3}, 3),                                    # the reference
    (("cap.snapshot_first_epoch=true",), {0: 1, 1: 2, 2: 3, 3: 4}, 4),
    (("cap.max_snapshots=2",), {0: 0, 1: 1, 2: 2, 3: 2}, 2),              # a ring of 2
], ids=["reference", "first-epoch", "max-2"])
def test_snc_epoch_schedule_has_e_views_in_epoch_e(tiny_bert, tiny_csv, tmp_path, extra,
                                                   views, kept):
    recipe = _recipe(tiny_bert, tiny_csv, tmp_path, *FOUR_EPOCHS, *extra)
    seen = ViewsPerStep(recipe)
    recipe.train([seen])
    assert {e: r for e, r, _ in seen.rows} == views
    # The SnC terms exist exactly when there is a view (none in epoch 0 by default).
    assert all(has == (r > 0) for _, r, has in seen.rows)
    bank = recipe.objective.banks["snc"]
    assert bank.max_views == kept and bank.num_views == kept


def test_unbounded_snapshot_memory_is_logged_before_training(tiny_bert, tiny_csv, tmp_path,
                                                             capsys):
    capsys.readouterr()
    recipe = _recipe(tiny_bert, tiny_csv, tmp_path, *FOUR_EPOCHS,
                     console=Console(enabled=True, progress=False))
    setup_log = " ".join(capsys.readouterr().out.split())
    plan = recipe.snapshot_plan
    assert recipe.cfg.cap.max_snapshots is None and plan["views"] == 3
    assert plan["bytes"] == 3 * 64 * 32 * 4  # N x H float32 per view
    assert plan["bytes"] == recipe.objective.banks["snc"].vectors.nbytes  # what is held
    assert "SnC (epoch schedule): all 3 snapshot(s) kept" in setup_log
    recipe.train()
    results = recipe.finish(export=False)
    assert results["snapshots"] == plan


def test_online_snapshot_memory_matches_the_copies(tiny_bert, tiny_csv, tmp_path):
    recipe = _recipe(tiny_bert, tiny_csv, tmp_path, *FOUR_EPOCHS, "cap.mode=online",
                     "cap.queue_size=8")
    recipe.train()
    copies = [m for m, _ in recipe.objective.references["snc"]]
    assert len(copies) == recipe.snapshot_plan["views"] == 3
    held = sum(t.numel() * t.element_size() for t in [*copies[0].parameters(),
                                                      *copies[0].buffers()])
    # Weights, buffers and scores; the masks' few scalar buffers are not counted.
    assert recipe.snapshot_plan["bytes_per_view"] == pytest.approx(held, rel=1e-3)


@pytest.fixture(scope="module")
def head_dropout_bert(tmp_path_factory) -> Path:
    """A tiny BERT whose encoder has no dropout and whose classifier dropout is 0.9."""
    path = tmp_path_factory.mktemp("head-dropout")
    cfg = tiny_config("bert")
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    cfg.classifier_dropout = 0.9
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model_path("minilm")).save_pretrained(path)
    return path


@pytest.mark.parametrize("mode", ["bank", "online"])
@pytest.mark.parametrize("head_dropout", [False, True])
def test_train_mode_snapshot_is_read_before_the_head_dropout(head_dropout_bert, tiny_csv,
                                                              tmp_path, mode, head_dropout):
    recipe = _recipe(head_dropout_bert, tiny_csv, tmp_path, f"cap.mode={mode}",
                     f"cap.snapshot_head_dropout={str(head_dropout).lower()}")
    recipe.snapshot(True, "test")  # a train-mode snapshot (the reference's unstructured)
    model, tap = recipe.student.model, recipe.student.tap
    batch = next(iter(recipe.loaders.bank))
    inputs = model_inputs(batch, "cpu")
    with torch.no_grad():
        model.eval()  # the pooler output itself: no dropout anywhere
        pooled = forward_with_representation(model, inputs, tap)[1]
        model.train()
        anchor = forward_with_representation(model, inputs, tap)[1]  # after the dropout
        if mode == "bank":
            snap = recipe.objective.banks["snc"].views(batch["example_id"])[:, 0]
        else:
            snap = recipe.objective.encode("snc", inputs)[:, 0]
    assert model.training and not torch.allclose(anchor, pooled)  # the dropout is there
    if head_dropout:
        assert not torch.allclose(snap, pooled, atol=1e-3)
    else:
        torch.testing.assert_close(snap, pooled, rtol=0, atol=1e-6)


def _embeddings(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    base = getattr(model, "module", model).base_model
    return {n: p.detach().clone() for n, p in base.embeddings.named_parameters()}


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_embeddings_do_not_move(tiny_bert, tiny_csv, tmp_path, freeze):
    recipe = _recipe(tiny_bert, tiny_csv, tmp_path, f"train.freeze_embeddings={freeze}")
    model = recipe.student.model
    before = _embeddings(model)
    layer = {n: p.detach().clone() for n, p in model.bert.encoder.named_parameters()}
    recipe.train()
    after = _embeddings(model)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert "word_embeddings.weight" in moved or freeze
    assert not moved if freeze else len(moved) >= 3
    trained = {id(p) for g in recipe.student.optimizer.param_groups for p in g["params"]}
    frozen = list(model.bert.embeddings.parameters())
    assert all((id(p) in trained) != freeze for p in frozen)
    assert any(not torch.equal(p, layer[n]) for n, p in model.bert.encoder.named_parameters())


SHARDED = ("fsdp2", "zero3")


@pytest.fixture(scope="module")
def frozen_sharded_runs(tmp_path_factory) -> tuple[dict[str, Path], dict[str, Any]]:
    """The 2-rank runs of both sharded strategies with frozen embeddings, through the
    real entry point in ONE torchrun launch (tests/_tiny_run.run_batch)."""
    root = tmp_path_factory.mktemp("frozen_sharded")
    assets = setup(root / "assets")
    runs = run_batch([overrides(assets, root / s, **{
        "train.freeze_embeddings": True, "strategy": s, "train.max_steps": 4,
        "train.eval_every": 0, "report.enabled": False}) for s in SHARDED],
        root / "plan.json", nproc=2, timeout=600)
    return assets, {s: (root / s, r) for s, r in zip(SHARDED, runs)}


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", SHARDED)
def test_frozen_embeddings_under_sharding(strategy, frozen_sharded_runs):
    """2 ranks through the real entry point: the export's embeddings are the
    pre-trained ones, its encoder weights are not."""
    assets, runs = frozen_sharded_runs
    out, r = runs[strategy]
    assert r.returncode == 0, r.stderr[-3000:]
    load = transformers.AutoModelForSequenceClassification.from_pretrained
    start, pruned = load(assets["model"]), load(out / "pruned" / "model")
    for name, p in start.bert.embeddings.named_parameters():
        assert torch.equal(p, pruned.bert.embeddings.get_parameter(name)), name
    assert not torch.equal(start.bert.encoder.layer[0].output.dense.weight,
                           pruned.bert.encoder.layer[0].output.dense.weight)


def test_warmups_in_steps(tiny_bert, tiny_csv, tmp_path):
    recipe = _recipe(tiny_bert, tiny_csv, tmp_path, "train.max_steps=8", "train.epochs=4",
                     "train.warmup_steps=4", "pruning.initial_warmup=3",
                     "pruning.final_warmup=2", "pruning.final_sparsity=0.5")
    recipe.train()
    hist = recipe.state.history
    lrs = [r["lr"] for r in hist]
    peak = recipe.cfg.train.lr
    # The LR of step k is peak * k / 4 during the warm-up (the reference's schedule: 0 at
    # step 0); a record holds the LR the next step uses.
    assert recipe.student.scheduler.lr_lambdas[0](0) == 0.0
    assert lrs[:3] == pytest.approx([peak * (k + 1) / 4 for k in range(3)])
    assert lrs[3] == pytest.approx(peak)
    assert all(a > b for a, b in itertools.pairwise(lrs[3:]))
    sparsity = [r["sparsity"] for r in hist]
    assert sparsity[:4] == [0.0] * 4 and 0 < sparsity[4] < 0.5  # dense for t <= 3 steps
    assert sparsity[-1] == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [["pruning.initial_warmup=1.5"],
                                 ["train.warmup_steps=10", "train.warmup_ratio=0.1"],
                                 ["cap.max_snapshots=0"]])
def test_ambiguous_warmups_are_refused(bad):
    with pytest.raises(ConfigError):
        load_run_config(None, ["data.preset=tweets", *bad])



def test_a_warmup_longer_than_the_run_is_refused(tiny_bert, tiny_csv, tmp_path):
    """The reference's GLUE warm-ups (22,000 steps dense) on a shorter run would never
    prune: refused at setup, naming the field."""
    with pytest.raises(ConfigError, match=r"pruning\.initial_warmup"):
        _recipe(tiny_bert, tiny_csv, tmp_path, "pruning.initial_warmup=6")

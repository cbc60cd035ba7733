"""``train.gradient_checkpointing``: the student's encoder layers are recomputed in
backward, and nothing the run computes changes.

Each check sets up the real CAPRecipe with the flag on (tests/tiny.py models: BERT,
ModernBERT with its fused Q/K/V and gated FFN, ALBERT with one layer applied twice),
runs one CAP loss forward / backward, undoes the checkpointing and runs the same batch
again from the same RNG state (dropout on): the loss terms, the contrastive
representation and every gradient (weights, movement scores, unit scores, structured
masks' Taylor importance) agree to 1e-6 in fp32, while a probe inside the first layer
sees it recomputed in backward with the flag and never without. One pooled 2-rank call
does the same under ddp, zero3 and fsdp2 (full gradients). The teacher capscale
fine-tunes is recomputed too, to the same weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import rank_pool
import torch
from distributed_helpers import GLOBAL_BATCH, batch_rows, build_run, local_rows

from capscale.checks import check_run_inputs, load_run_config
from capscale.config import ConfigError, config_from_dict, config_to_dict, load_config
from capscale.console import Console
from capscale.distributed import DistContext
from capscale.models.adapters import EncoderAdapter
from capscale.models.loading import RepresentationTap, adapter_for
from capscale.models.recompute import (
    checkpoint_layers,
    checkpointed_layers,
    recomputations,
    uncheckpoint_layers,
)
from capscale.pruning.structured import taylor_importance
from capscale.run import main
from capscale.tasks import get_task
from capscale.train.finetune import finetune_teacher

ON = {"train.gradient_checkpointing": True}
ATOL = 1e-6


def _assets(model_dir: Path, csv: tuple[Path, Path]) -> dict[str, str]:
    return {"student": str(model_dir), "teacher": str(model_dir), "train": str(csv[0]),
            "validation": str(csv[1])}


class _Probe:
    """Counts the calls of the first layer's first prunable linear map."""

    def __init__(self, bare: torch.nn.Module, adapter: EncoderAdapter) -> None:
        self.calls = 0
        first = adapter.layer_modules(bare)[0]
        linear = next(iter(adapter.layer_linears(first).values()))
        self.handle = linear.register_forward_pre_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1


def _batch(run: Any) -> dict[str, torch.Tensor]:
    return batch_rows(run, *local_rows(0, run.ctx.rank, run.ctx.world_size))


def on_and_off(run: Any) -> dict[str, Any]:
    """One CAP loss forward / backward with the run's checkpointed layers, then with them
    undone, from the same RNG state: loss terms, representation, full gradients, and the
    first layer's recomputations in backward. Collective under sharding."""
    model, tap, strategy = run.student.model, run.student.tap, run.strategy
    bare = strategy.unwrap(model)
    out: dict[str, Any] = {"checkpointed": checkpointed_layers(bare, run.adapter)}
    probe = _Probe(bare, run.adapter)
    batch = _batch(run)
    for mode in ("on", "off"):
        if mode == "off":
            uncheckpoint_layers(bare, run.adapter)
        torch.manual_seed(11)
        losses = run.loss(model, tap, batch, 0)
        rep = tap.value
        forward_calls = probe.calls
        strategy.backward(torch.stack(list(losses.values())).sum(), model)
        out[mode] = {"losses": {k: float(v.detach()) for k, v in losses.items()},
                     "rep": rep.detach().cpu().clone(), "rep_graph": rep.grad_fn is not None,
                     "rep_kept": tap.value is rep,
                     "recomputed": probe.calls - forward_calls,
                     "grads": {k: g.cpu() for k, g in strategy.full_grads(model).items()}}
        run.student.optimizer.zero_grad(set_to_none=True)
    probe.handle.remove()
    checkpoint_layers(bare, run.adapter)
    return out


def assert_same(rec: dict[str, Any], applications: int, what: str) -> None:
    """``rec`` (from :func:`on_and_off`): equal results, recomputation only when on."""
    on, off = rec["on"], rec["off"]
    assert rec["checkpointed"] > 0, what
    assert on["recomputed"] == applications and off["recomputed"] == 0, what
    assert on["rep_graph"] and on["rep_kept"], what  # the forward's tensor, with its graph
    assert on["losses"].keys() == off["losses"].keys() and len(on["losses"]) >= 3, what
    for k, v in off["losses"].items():
        assert on["losses"][k] == pytest.approx(v, abs=ATOL, rel=1e-6), f"{what}: {k}"
    torch.testing.assert_close(on["rep"], off["rep"], atol=ATOL, rtol=0)
    assert on["grads"].keys() == off["grads"].keys(), what
    assert any(k.endswith("mask_scores") for k in off["grads"]), what
    for k, g in off["grads"].items():
        assert g.abs().sum() > 0 or "embeddings" in k, f"{what}: {k} has no gradient"
        torch.testing.assert_close(on["grads"][k], g, atol=ATOL, rtol=0,
                                   msg=lambda m, k=k: f"{what}: {k}: {m}")


# (family, pruning method, times the model applies its first layer in one forward)
CASES = [("bert", "movement", 1), ("modernbert", "movement", 1), ("albert", "movement", 2),
         ("modernbert", "hybrid", 1)]


@pytest.mark.parametrize("family,method,applications", CASES,
                         ids=[f"{f}-{m}" for f, m, _ in CASES])
def test_one_process_same_losses_representation_and_gradients(
        family, method, applications, tiny_model_factory, tiny_csv):
    run = build_run(_assets(tiny_model_factory(family), tiny_csv), DistContext(), GLOBAL_BATCH,
                    **ON, **{"pruning.method": method})
    rec = on_and_off(run)
    assert_same(rec, applications, f"{family} {method}")
    if method == "hybrid":  # scores per head (attn_out) and per FFN neuron (ffn_out)
        assert sum(k.endswith("mask_scores") for k in rec["off"]["grads"]) == 4


def test_structured_masks_taylor_importance_unchanged(tiny_model_factory, tiny_csv):
    """CAP-f's head and neuron masks (pre-hooks inside the layers) get the same
    gradients, through ``torch.autograd.grad``, on ALBERT's shared layer."""
    run = build_run(_assets(tiny_model_factory("albert"), tiny_csv), DistContext(), GLOBAL_BATCH,
                    **ON, **{"pruning.method": "structured"})
    bare = run.strategy.unwrap(run.student.model)
    probe = _Probe(bare, run.adapter)
    batch = _batch(run)
    found = {}
    for mode in ("on", "off"):
        if mode == "off":
            assert uncheckpoint_layers(bare, run.adapter) == 1
        torch.manual_seed(5)
        calls = probe.calls
        imp = taylor_importance(run.controller.masks, lambda b: run.loss_fn(bare, b),
                                [batch], None, 1)
        found[mode] = (imp, probe.calls - calls)
    (on, on_calls), (off, off_calls) = found["on"], found["off"]
    assert (on_calls, off_calls) == (4, 2)  # 2 applications, each recomputed when on
    for a, b in zip([*on.heads, *on.ffn], [*off.heads, *off.ffn]):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_tap_inside_a_recomputed_layer_keeps_the_forward_tensor(tiny_model_factory):
    """A representation read inside a checkpointed layer (an adapter whose head linear
    is layer 1's FFN output map) is the forward's tensor, with its graph, after backward
    too; the recomputation would otherwise replace it."""
    import transformers
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        tiny_model_factory("bert")).train()
    inner = EncoderAdapter(model_types=("bert",),
                           head_linear="bert.encoder.layer.1.output.dense")
    assert checkpoint_layers(model, inner) == 2
    tap = RepresentationTap(model, inner)
    ids = torch.randint(1000, 3000, (2, 8))
    model(input_ids=ids).logits.sum().backward()
    first = tap.value
    assert first is not None and first.grad_fn is not None
    seen = []
    model.bert.encoder.layer[1].output.dense.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0]))
    model(input_ids=ids).logits.sum().backward()
    assert len(seen) == 2 and seen[1] is not seen[0]  # the layer ran again in backward
    assert tap.value is seen[0] and tap.value.grad_fn is not None


def test_checkpoint_layers_is_idempotent_and_undone(tiny_model_factory):
    import transformers
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        tiny_model_factory("albert"))
    adapter = adapter_for(model)
    assert checkpoint_layers(model, adapter) == checkpoint_layers(model, adapter) == 1
    assert checkpointed_layers(model, adapter) == 1
    assert uncheckpoint_layers(model, adapter) == 1
    assert checkpointed_layers(model, adapter) == 0
    assert "forward" not in vars(adapter.layer_modules(model)[0])


def test_teacher_fine_tuning_is_recomputed_and_trains_the_same(tiny_bert, tiny_csv, tmp_path):
    """The dense teacher capscale fine-tunes honours the flag: its layers are recomputed
    (2 steps x 2 layers) and the fine-tuned weights are the same."""
    import transformers
    weights, recomputed = {}, {}
    for flag in ("false", "true"):
        cfg = load_run_config(None, [
            f"model.name_or_path={tiny_bert}", f"data.train_file={tiny_csv[0]}",
            f"data.validation_file={tiny_csv[1]}", "data.max_length=32",
            "teacher_training.max_steps=2", "teacher_training.batch_size=8",
            "train.eval_batch_size=16", "train.progress=false",
            f"train.gradient_checkpointing={flag}", f"output_dir={tmp_path / flag}"])
        task = get_task(cfg.data.task_type)
        data, tokenizer = check_run_inputs(cfg, task)
        before = recomputations()
        path, _ = finetune_teacher(cfg, DistContext(), data, tokenizer, task,
                                   Console(enabled=False))
        recomputed[flag] = recomputations() - before
        weights[flag] = transformers.AutoModelForSequenceClassification.from_pretrained(
            path).state_dict()
    assert recomputed == {"false": 0, "true": 4}
    for name, w in weights["false"].items():
        torch.testing.assert_close(weights["true"][name], w, atol=ATOL, rtol=0)


def test_a_run_resumes_with_the_flag_switched(tiny_bert, tiny_csv, tmp_path):
    """Checkpointing changes no state, so a checkpoint written without it resumes with it
    (e.g. a run that ran out of memory); the rest of the config must still match."""
    from tiny import fast_overrides
    args = [*fast_overrides(tiny_bert, tiny_csv, tmp_path / "run"), "report.enabled=false",
            "checkpoint.every_steps=3"]
    assert main(args) == 0
    again = [*args, "resume=latest", "train.gradient_checkpointing=true"]
    assert main(again) == 0
    assert main([*again, "train.lr=2e-3"]) == 2  # a real change is still refused


def test_config_flag_round_trips_and_a_bad_value_is_one_line(tmp_path, capsys):
    assert load_config(None).train.gradient_checkpointing is False
    cfg = load_config(None, ["train.gradient_checkpointing=true"])
    assert cfg.train.gradient_checkpointing is True
    assert config_from_dict(config_to_dict(cfg)).train.gradient_checkpointing is True
    with pytest.raises(ConfigError, match=r"train\.gradient_checkpointing = 'sometimes': "
                                          r"expected bool"):
        load_config(None, ["train.gradient_checkpointing=sometimes"])
    code = main([f"output_dir={tmp_path}", "train.gradient_checkpointing=sometimes"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "capscale: config error: " \
        "train.gradient_checkpointing = 'sometimes': expected bool" in err, err


# -- 2 ranks ----------------------------------------------------------------------------
STRATEGY_CASES = [("ddp", "bert"), ("zero3", "bert"), ("fsdp2", "bert"),
                  ("zero3", "albert"), ("fsdp2", "albert"), ("zero3", "modernbert"),
                  ("fsdp2", "modernbert")]


def _worker(rank: int, world: int, assets: dict[str, dict[str, str]]) -> dict[str, Any]:
    """One of the session's two gloo ranks: :func:`on_and_off` under each strategy."""
    from capscale.distributed import init_distributed
    out = {}
    for strategy, family in STRATEGY_CASES:
        ctx = init_distributed(strategy)  # the pool's process group, with this strategy
        run = build_run(assets[family], ctx, GLOBAL_BATCH // world, **ON)
        out[f"{strategy}-{family}"] = on_and_off(run)
        del run
    return out


@pytest.fixture(scope="module")
def two_ranks(tiny_model_factory, tiny_csv) -> list[dict[str, Any]]:
    assets = {f: _assets(tiny_model_factory(f), tiny_csv)
              for f in {f for _, f in STRATEGY_CASES}}
    return rank_pool.run(_worker, assets)


@pytest.mark.multiprocess
def test_two_ranks_same_losses_and_full_gradients(two_ranks):
    for rank, records in enumerate(two_ranks):
        assert set(records) == {f"{s}-{f}" for s, f in STRATEGY_CASES}
        for name, rec in records.items():
            assert_same(rec, 2 if name.endswith("albert") else 1, f"rank {rank} {name}")

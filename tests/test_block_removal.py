"""structured.remove_empty_blocks: an emptied attention / FFN block is skipped in the
masked model and removed from the export, which reproduces the masked model; a layer
with both blocks removed is the identity; families that cannot skip a block refuse."""

from __future__ import annotations

import pytest
import torch
from structured_models import CONFIGS, tiny_inputs, tiny_model
from transformers import AutoModelForSequenceClassification

from capscale.checks import load_run_config
from capscale.config import ConfigError
from capscale.export.huggingface import export_structured
from capscale.models.loading import adapter_for
from capscale.pruning.hybrid import attach_block_skips, attach_unit_masks, unmask
from capscale.pruning.structured import StructuredMasks, structured_param_counts

SKIPPING = sorted(f for f in CONFIGS if adapter_for(tiny_model(f)).attn_block
                  and adapter_for(tiny_model(f)).ffn_block)


def _keep(masks: StructuredMasks) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Layer 0: both blocks empty; layer 1: no head, half the FFN; layer 2: one head,
    no neuron."""
    inter = masks.intermediate
    heads = [torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool),
             torch.tensor([False, True, False, False])]
    ffn = [torch.zeros(inter[0], dtype=torch.bool), torch.arange(inter[1]) % 2 == 0,
           torch.zeros(inter[2], dtype=torch.bool)]
    return heads, ffn


def _layer_io(model: torch.nn.Module, adapter, inputs) -> list[tuple[torch.Tensor, ...]]:
    seen = []
    hooks = [layer.register_forward_hook(
        lambda m, a, kw, out: seen.append((kw.get("hidden_states", a[0] if a else None),
                                           out[0] if isinstance(out, tuple) else out)),
        with_kwargs=True) for layer in adapter.layer_modules(model)]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    return seen


def test_the_families_that_skip_blocks():
    assert {"bert", "roberta", "deberta-v2", "deberta", "electra"} <= set(SKIPPING)
    assert not {"albert", "distilbert", "modernbert", "mpnet"} & set(SKIPPING)


@pytest.mark.parametrize("family", SKIPPING)
def test_removed_blocks_match_the_masked_model(family, tmp_path):
    model = tiny_model(family)
    adapter = adapter_for(model, remove_empty_blocks=True)
    inputs = tiny_inputs()
    masks = StructuredMasks(model, adapter)
    heads, ffn = _keep(masks)
    masks.set(heads, ffn)
    io = _layer_io(model, adapter, inputs)
    torch.testing.assert_close(io[0][1], io[0][0])  # layer 0 is the identity
    assert not torch.allclose(io[1][1], io[1][0])
    with torch.no_grad():
        masked = model(**inputs).logits
    counts = structured_param_counts(model, adapter, heads, ffn)
    plain = structured_param_counts(model, adapter_for(model), heads, ffn)
    assert counts["pruned_parameters"] > plain["pruned_parameters"]  # LN, biases go too
    report = export_structured(model, adapter, heads, ffn, tmp_path / "out")
    assert report["heads_per_layer"] == [0, 0, 1]
    assert report["intermediate_per_layer"] == [0, masks.intermediate[1] // 2, 0]
    loaded = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out" / "model", trust_remote_code=True).eval()
    layer0 = adapter.layer_modules(loaded)[0]
    assert sum(p.numel() for p in layer0.parameters()) == 0  # the layer is gone
    assert report["exported_encoder_parameters"] == sum(
        p.numel() for p in adapter.layer_modules(loaded).parameters())
    assert report["exported_encoder_parameters"] == (
        counts["encoder_parameters"] - counts["pruned_parameters"])
    with torch.no_grad():
        got = loaded(**inputs).logits
    torch.testing.assert_close(got, masked, atol=1e-5, rtol=1e-5)


def test_without_the_option_an_empty_block_adds_its_bias():
    model = tiny_model("bert")
    adapter = adapter_for(model)
    masks = StructuredMasks(model, adapter)
    masks.set(*_keep(masks))
    io = _layer_io(model, adapter, tiny_inputs())
    assert not torch.allclose(io[0][1], io[0][0])


def test_masks_changed_in_place_are_seen():
    model = tiny_model("bert")
    adapter = adapter_for(model, remove_empty_blocks=True)
    masks = StructuredMasks(model, adapter)
    inputs = tiny_inputs()
    io = _layer_io(model, adapter, inputs)
    assert not torch.allclose(io[0][1], io[0][0])
    masks.set(*_keep(masks))
    io = _layer_io(model, adapter, inputs)
    torch.testing.assert_close(io[0][1], io[0][0])


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="albert adapter cannot skip whole attention / ffn"):
        adapter_for(tiny_model("albert"), remove_empty_blocks=True)
    with pytest.raises(ValueError, match="mpnet adapter cannot skip whole attention blocks"):
        adapter_for(tiny_model("mpnet"), remove_empty_blocks=True)
    demo = "capscale/configs/demo_minilm_tweets.yaml"
    with pytest.raises(ConfigError, match="hybrid needs pruning"):
        load_run_config(demo, ["structured.remove_empty_blocks=true", "pruning.method=hybrid",
                               "pruning.scope=local"])
    with pytest.raises(ConfigError, match="physically smaller methods"):
        load_run_config(demo, ["structured.remove_empty_blocks=true",
                               "pruning.method=movement"])


def test_hybrid_skips_the_blocks_its_scores_empty(tmp_path):
    """Hybrid's unit masks (scores thresholded, as global scope does): the emptied
    blocks are skipped in the masked model and removed from its export, which gives
    the same logits."""
    model = tiny_model("bert")
    adapter = adapter_for(model, remove_empty_blocks=True)
    units = attach_unit_masks(model, adapter)
    attach_block_skips(model, adapter, units)
    masks = StructuredMasks(tiny_model("bert"), adapter_for(tiny_model("bert")))
    heads, ffn = _keep(masks)
    for i in range(3):
        for role, keep in (("attn_out", heads[i]), ("ffn_out", ffn[i])):
            unit = units[f"{i}.{role}"]
            unit.global_scope = True
            with torch.no_grad():
                unit.mask_scores.copy_(keep.float() * 2 - 1)  # kept above threshold 0
    inputs = tiny_inputs()
    io = _layer_io(model, adapter, inputs)
    torch.testing.assert_close(io[0][1], io[0][0])  # layer 0 is the identity
    with torch.no_grad():
        masked = model(**inputs).logits
    unmask(model)
    report = export_structured(model, adapter, heads, ffn, tmp_path / "out")
    assert report["removed_blocks"] == {"attention": [0, 1], "ffn": [0, 2]}
    loaded = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out" / "model", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, masked, atol=1e-5, rtol=1e-5)

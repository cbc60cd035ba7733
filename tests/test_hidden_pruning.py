"""structured.hidden_sparsity: the hidden dimension pruned across embeddings and layers.
The masked model equals the sliced export (with heads, neurons and removed blocks),
its LayerNorms normalise over the kept dimensions only, the parameter count matches
the export, and families that cannot prune it refuse."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from structured_models import tiny_inputs, tiny_model
from transformers import AutoModelForSequenceClassification

from capscale.checks import load_run_config
from capscale.config import ConfigError
from capscale.export.huggingface import export_structured
from capscale.models.loading import adapter_for
from capscale.pruning.hidden import filler, pruned_count, select_hidden
from capscale.pruning.structured import (
    StructuredMasks,
    structured_param_counts,
    taylor_importance,
)


def _hidden_keep(width: int = 32, pruned: int = 16, seed: int = 5) -> torch.Tensor:
    keep = torch.ones(width, dtype=torch.bool)
    keep[torch.randperm(width, generator=torch.Generator().manual_seed(seed))[:pruned]] = False
    return keep


def test_filler_and_counts():
    for m in (2, 3, 8, 17):
        v = filler(m, "cpu", torch.float64)
        assert abs(float(v.mean())) < 1e-12 and float(v.var(unbiased=False)) == \
            pytest.approx(1.0)
    assert [pruned_count(f, 384) for f in (0.0, 0.01, 0.25, 0.5, 0.99)] == [0, 0, 96, 192,
                                                                            376]
    imp = torch.arange(32, dtype=torch.float64)
    keep = select_hidden(imp, 0.25, None)
    assert int((~keep).sum()) == 8 and not bool(keep[:8].any())
    # Monotone: a dimension pruned before stays pruned, even when now important.
    current = torch.ones(32, dtype=torch.bool)
    current[31] = False
    again = select_hidden(imp, 0.25, current)
    assert not bool(again[31]) and int((~again).sum()) == 8


def test_layer_norms_see_the_kept_dimensions_only():
    model = tiny_model("bert")
    masks = StructuredMasks(model, adapter_for(model), hidden=True)
    keep = _hidden_keep()
    masks.hidden.set(keep)
    norm = model.bert.encoder.layer[1].output.LayerNorm
    seen = {}
    handle = norm.register_forward_hook(lambda m, a, out: seen.update(x=a[0], out=out),
                                        prepend=True)
    with torch.no_grad():
        model(**tiny_inputs())
    handle.remove()
    x = seen["x"][..., keep]  # the kept entries the pre-hook left as they were
    want = F.layer_norm(x, (int(keep.sum()),), norm.weight[keep], norm.bias[keep], norm.eps)
    torch.testing.assert_close(seen["out"][..., keep], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,blocks", [("bert", False), ("bert", True),
                                           ("roberta", True), ("xlm-roberta", False),
                                           ("ernie", True), ("roformer", True)])
def test_masked_equals_exported_with_hidden_pruned(family, blocks, tmp_path):
    model = tiny_model(family)
    adapter = adapter_for(model, remove_empty_blocks=blocks)
    inputs = tiny_inputs()
    masks = StructuredMasks(model, adapter, hidden=True)
    inter = masks.intermediate
    heads = [torch.tensor([True, False, True, True]), torch.zeros(4, dtype=torch.bool),
             torch.tensor([False, True, False, False])]
    ffn = [torch.arange(inter[0]) % 3 == 0, torch.zeros(inter[1], dtype=torch.bool),
           torch.arange(inter[2]) % 2 == 1]
    if not blocks:
        heads[1][0] = True  # no empty block where it would keep one zeroed unit
        ffn[1][:4] = True
    keep = _hidden_keep()
    masks.set(heads, ffn)
    masks.hidden.set(keep)
    with torch.no_grad():
        masked = model(**inputs).logits
        masks.hidden.set(torch.ones(32, dtype=torch.bool))
        unpruned_hidden = model(**inputs).logits
        masks.hidden.set(keep)
    assert not torch.allclose(masked, unpruned_hidden, atol=1e-4)
    counts = structured_param_counts(model, adapter, heads, ffn, keep)
    report = export_structured(model, adapter, heads, ffn, tmp_path / "out", hidden=keep)
    assert report["hidden_size_kept"] == 16
    loaded = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out" / "model", trust_remote_code=True).eval()
    assert loaded.base_model.embeddings.word_embeddings.embedding_dim == 16
    assert report["exported_encoder_parameters"] == (
        counts["encoder_parameters"] - counts["pruned_parameters"])
    with torch.no_grad():
        got = loaded(**inputs).logits
        hidden = loaded(**inputs, output_hidden_states=True).hidden_states
    torch.testing.assert_close(got, masked, atol=1e-5, rtol=1e-5)
    assert hidden[-1].shape[-1] == 32 and hidden[1].shape[-1] == 16  # widened at the end


def test_taylor_importance_scores_the_hidden_dimensions():
    model = tiny_model("bert")
    masks = StructuredMasks(model, adapter_for(model), hidden=True)
    inputs = tiny_inputs()
    imp = taylor_importance(masks, lambda b: model(**b).logits.pow(2).sum(), [inputs])
    assert imp.hidden is not None and imp.hidden.shape == (32,) and float(imp.hidden.sum()) > 0
    assert len(imp.heads) == len(imp.ffn) == 3


def test_refusals():
    with pytest.raises(ValueError, match="albert adapter does not declare"):
        StructuredMasks(tiny_model("albert"), adapter_for(tiny_model("albert")), hidden=True)
    electra = tiny_model("electra")  # 24-wide embeddings projected to 32
    with pytest.raises(ValueError, match="not the hidden size 32"):
        StructuredMasks(electra, adapter_for(electra), hidden=True)
    with pytest.raises(ConfigError, match=r"structured\.hidden_sparsity"):
        load_run_config("capscale/configs/demo_minilm_tweets.yaml",
                        ["structured.hidden_sparsity=0.5", "pruning.method=movement"])
    with pytest.raises(ConfigError, match=r"structured\.hidden_sparsity"):
        load_run_config("capscale/configs/demo_minilm_tweets.yaml",
                        ["structured.hidden_sparsity=1.0", "pruning.method=structured"])


def test_onnx_export_of_a_narrowed_model_with_removed_blocks(tmp_path):
    """The loader's stubs and its widening hook trace to ONNX (and INT8)."""
    pytest.importorskip("onnxruntime")
    from capscale.export.formats import load_export
    from capscale.export.onnx_export import export_onnx, onnx_logits, onnx_session, quantize_int8

    model = tiny_model("bert")
    adapter = adapter_for(model, remove_empty_blocks=True)
    masks = StructuredMasks(model, adapter, hidden=True)
    heads = [torch.tensor([True, False, True, True]), torch.zeros(4, dtype=torch.bool),
             torch.tensor([False, True, False, False])]
    ffn = [torch.ones(48, dtype=torch.bool), torch.zeros(48, dtype=torch.bool),
           torch.arange(48) % 2 == 0]
    keep = _hidden_keep()
    masks.set(heads, ffn)
    masks.hidden.set(keep)
    inputs = tiny_inputs()
    with torch.no_grad():
        want = model(**inputs).logits
    export_structured(model, adapter, heads, ffn, tmp_path / "out", hidden=keep)
    loaded = load_export(tmp_path / "out" / "model", trust_remote_code=True)
    path = export_onnx(loaded, tmp_path / "model.onnx")
    feed = {**inputs, "token_type_ids": torch.zeros_like(inputs["input_ids"])}
    got = torch.tensor(onnx_logits(onnx_session(path), feed))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    int8 = quantize_int8(path, tmp_path / "model_int8.onnx")
    assert onnx_logits(onnx_session(int8), feed).shape == tuple(want.shape)

"""Export formats: ONNX, INT8 ONNX and the sparse checkpoint of real tiny exports, each
checked against the PyTorch model, and the model card every export carries."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml
from structured_models import CONFIGS, tiny_inputs, tiny_model
from tiny import eval_inputs, run_cap
from transformers import AutoModelForSequenceClassification

from capscale.checks import load_run_config
from capscale.config import ConfigError, save_config
from capscale.export.formats import load_export, write_formats
from capscale.export.huggingface import export_pruned, export_structured
from capscale.export.onnx_export import onnx_logits, onnx_session
from capscale.export.sparse import pack_bits, write_sparse
from capscale.models.loading import adapter_for
from capscale.pruning.structured import StructuredMasks

FORMATS = "export.formats=[pytorch,onnx,int8,sparse]"


@pytest.fixture(scope="module")
def masked_run(tiny_bert, tiny_csv, tmp_path_factory):
    """A tiny BERT after 6 CAP-m steps at 90%, finished by the recipe with every format."""
    out = tmp_path_factory.mktemp("formats") / "run"
    recipe = run_cap(tiny_bert, tiny_csv, out, FORMATS)
    results = recipe.finish()
    return recipe, results, out / "pruned"


@pytest.fixture(scope="module")
def structured(tmp_path_factory):
    """A tiny structured-pruned BERT export (heads and FFN neurons sliced away), its
    masked model's logits, and the export's ONNX + INT8 copies."""
    out = tmp_path_factory.mktemp("structured")
    model = tiny_model("bert")
    adapter = adapter_for(model)
    masks = StructuredMasks(model, adapter)
    g = torch.Generator().manual_seed(0)
    heads = [torch.rand(4, generator=g) > 0.5 for _ in range(masks.num_layers)]
    for h in heads:
        h[1] = True
    ffn = [torch.rand(n, generator=g) > 0.6 for n in masks.intermediate]
    masks.set(heads, ffn)
    inputs = tiny_inputs(batch=5, length=9)
    with torch.no_grad():
        masked = model(**inputs).logits
    export_structured(model, adapter, heads, ffn, out)
    found = write_formats(out, ["int8"], tiny_inputs(batch=6, length=14, seed=4))
    return out, inputs, masked, found


def test_masked_export_onnx_matches_the_masked_model(masked_run):
    recipe, results, out = masked_run
    found = json.loads((out / "sparsity_report.json").read_text())["formats"]
    assert found == results["export_formats"] and found["ok"]
    assert found["onnx"]["max_abs_diff"] <= found["onnx"]["tolerance"] == 1e-4
    # The ONNX model against the masked student itself (not the reloaded export), on a
    # batch of another size and length than the one it was traced with.
    session = onnx_session(out / "onnx" / "model.onnx")
    inputs = eval_inputs(recipe)
    recipe.student.model.eval()
    for rows, length in ((inputs["input_ids"].shape[0], inputs["input_ids"].shape[1]), (3, 7)):
        batch = {k: v[:rows, :length] for k, v in inputs.items()}
        with torch.no_grad():
            want = recipe.student.model(**batch).logits.numpy()
        np.testing.assert_allclose(onnx_logits(session, batch), want, rtol=0, atol=1e-4)
    names = [i.name for i in session.get_inputs()]
    assert names == ["input_ids", "attention_mask", "token_type_ids"]  # BERT: segments too


def test_int8_is_smaller_and_scored_on_the_dev_set(masked_run):
    _, results, _ = masked_run
    found = results["export_formats"]
    int8 = found["int8"]
    assert int8["ok"] and int8["max_abs_diff"] <= int8["tolerance"]
    assert int8["max_abs_diff"] > 0  # really quantised: not the fp32 logits
    assert 0.0 <= int8["argmax_agreement"] <= 1.0
    assert int8["bytes"] < found["onnx"]["bytes"]
    dev = found["dev"]
    assert dev["examples"] == results["eval_examples"] == 16
    assert set(dev["metrics"]) == {"pytorch", "onnx", "int8"}
    # the PyTorch export scores what the run measured on the masked student
    assert dev["metrics"]["pytorch"]["accuracy"] == pytest.approx(
        results["pruned_metrics"]["accuracy"])
    assert dev["metrics"]["onnx"] == dev["metrics"]["pytorch"]
    assert dev["agreement"]["onnx"] == 1.0 and 0.0 <= dev["agreement"]["int8"] <= 1.0


def test_run_report_lists_the_formats(masked_run):
    from capscale.report.document import write_report

    _, _, out = masked_run
    md = write_report(out.parent, speed_batches=0).read_text()
    assert "ONNX INT8 (dynamic quantisation): onnx/model_int8.onnx" in md
    assert "sparse checkpoint (bitmask + values): sparse/" in md
    assert "dev set (16 examples), int8" in md and "argmax agreement" in md
    assert "CSR (estimate)" not in md  # measured, so no estimate


def test_sparse_checkpoint_of_the_run_equals_the_dense_one(masked_run):
    _, results, out = masked_run
    sparse = results["export_formats"]["sparse"]
    assert sparse["ok"] and sparse["max_abs_diff"] == 0.0
    assert sparse["coded_matrices"] == 12  # 2 layers x Q, K, V, O, FFN in, FFN out
    assert sparse["bytes"] < sparse["dense_bytes"]  # this tiny model is mostly embeddings
    dense = load_export(out / "model").state_dict()
    loaded = load_export(out / "sparse").state_dict()
    assert dense.keys() == loaded.keys()
    assert all(torch.equal(dense[k], loaded[k]) for k in dense)


def test_sparse_checkpoint_loads_with_transformers_alone(tmp_path):
    """A model whose encoder matrices are 90% zeros: the sparse file is less than half the
    dense one (embeddings and the pooler stay dense), and a fresh
    interpreter without capscale loads it to the dense export's exact logits."""
    model = tiny_model("bert")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim == 2 and ".encoder." in name:
                p.mul_(torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) > 0.9)
    model.save_pretrained(tmp_path / "model")
    info = write_sparse(tmp_path / "model", tmp_path / "sparse")
    assert info["coded_matrices"] == 18 and info["ratio"] > 2
    assert info["bytes"] == (tmp_path / "sparse" / "model.safetensors").stat().st_size
    inputs = tiny_inputs()
    with torch.no_grad():
        want = model(**inputs).logits
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["capscale"] = None  # any import of capscale fails
        import torch
        from transformers import AutoModelForSequenceClassification
        m = AutoModelForSequenceClassification.from_pretrained(
            {str(tmp_path / "sparse")!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            torch.save(m(**torch.load({str(tmp_path / "inputs.pt")!r})).logits,
                       {str(tmp_path / "got.pt")!r})
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "got.pt"), want)


def test_bit_packing_order():
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 0, 1, 1], [0] * 9 + [1]], dtype=torch.bool)
    assert pack_bits(mask).tolist() == [[0b10110000, 0b11000000], [0, 0b01000000]]


def test_structured_export_to_onnx_and_int8(structured):
    out, inputs, masked, found = structured
    assert found["ok"] and found["onnx"]["max_abs_diff"] <= 1e-4
    assert "sparse" not in found and "dev" not in found
    for name, atol in (("model.onnx", 1e-4), ("model_int8.onnx", 0.05)):
        got = onnx_logits(onnx_session(out / "onnx" / name), inputs)
        np.testing.assert_allclose(got, masked.numpy(), rtol=0, atol=atol)
    assert found["int8"]["argmax_agreement"] >= 0.5
    with pytest.raises(ValueError, match="auto_map"):
        write_formats(out, ["sparse"])


def _front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def test_model_card_of_the_run(masked_run, tmp_path):
    recipe, results, out = masked_run
    card = (out / "model" / "README.md").read_text()
    front = _front_matter(card)
    assert front["library_name"] == "transformers"
    assert front["pipeline_tag"] == "text-classification"
    assert front["base_model"] == recipe.cfg.model.name_or_path
    assert {"capscale", "pruning", "movement", "onnx", "int8"} <= set(front["tags"])
    for section in ("Base model", "Task", "Method", "Sparsity", "Metrics", "Files",
                    "How to load"):
        assert f"## {section}" in card
    assert f"{100 * results['sparsity']['encoder_sparsity']:.2f}%" in card
    assert "prc on" in card and "sparse/" in card and "model_int8.onnx" in card
    assert (out / "sparse" / "README.md").read_text() == card
    # The card's snippets run as written: PyTorch, the sparse checkpoint, ONNX Runtime.
    code = "\n".join(re.findall(r"```python\n(.*?)```", card, re.S))
    scope: dict = {}
    exec(code, scope)
    assert scope["logits"].shape == (1, 2)


def test_model_card_of_a_structured_export(structured):
    out, *_ = structured
    card = (out / "model" / "README.md").read_text()
    front = _front_matter(card)
    assert {"capscale", "structured-pruning"} <= set(front["tags"])
    assert "heads kept per layer" in card and "attention heads removed" in card
    assert "from_pretrained(path, trust_remote_code=True)" in card
    assert "onnxruntime" in card


def test_cli_adds_formats_to_an_export(masked_run, tmp_path, capsys):
    from capscale.cli import main

    recipe, _, _ = masked_run
    export_pruned(recipe.student.model, recipe.adapter, tmp_path / "plain", recipe.tokenizer)
    assert not (tmp_path / "plain" / "sparse").exists()
    save_config(recipe.cfg, tmp_path / "run.yaml")
    assert main(["export", "--config", str(tmp_path / "run.yaml"), "--add-to",
                 str(tmp_path / "plain"), "--formats", "sparse"]) == 0
    assert "sparse checkpoint:" in capsys.readouterr().out
    report = json.loads((tmp_path / "plain" / "sparsity_report.json").read_text())
    assert report["formats"]["sparse"]["ok"] and "onnx" not in report["formats"]
    assert "sparse/" in (tmp_path / "plain" / "model" / "README.md").read_text()


def test_formats_config_is_checked():
    with pytest.raises(ConfigError, match=r"export\.formats = "):
        load_run_config(None, ["data.preset=tweets", "export.formats=[onnx,tflite]"])
    with pytest.raises(ConfigError, match=r"export\.formats sparse"):
        load_run_config(None, ["data.preset=tweets", "pruning.method=structured",
                           "export.formats=[sparse]"])
    cfg = load_run_config(None, ["data.preset=tweets", "pruning.method=structured",
                             "export.formats=[onnx,int8]"])
    assert cfg.export.formats == ["onnx", "int8"]


def test_sparse_refuses_a_remote_architecture(tmp_path):
    model = AutoModelForSequenceClassification.from_config(tiny_model("bert").config)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["architectures"] = ["MyOwnModel"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a transformers class"):
        write_sparse(tmp_path / "m", tmp_path / "s")


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_structured_exports_of_every_family_convert_to_onnx(family, tmp_path):
    """Each family's physically smaller export (its trust_remote_code loader, per-layer
    head counts and FFN widths) converts and matches the masked model."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    masks = StructuredMasks(model, adapter)
    heads = [torch.arange(masks.num_heads) % 2 == i % 2 for i in range(masks.num_layers)]
    ffn = [torch.arange(n) % 3 != 0 for n in masks.intermediate]
    masks.set(heads, ffn)
    inputs = tiny_inputs(batch=3, length=11)
    with torch.no_grad():
        masked = model(**inputs).logits
    export_structured(model, adapter, heads, ffn, tmp_path)
    assert write_formats(tmp_path, ["onnx"], tiny_inputs(batch=2, length=17, seed=5))["ok"]
    got = onnx_logits(onnx_session(tmp_path / "onnx" / "model.onnx"), inputs)
    np.testing.assert_allclose(got, masked.numpy(), rtol=0, atol=1e-4)

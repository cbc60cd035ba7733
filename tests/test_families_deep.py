"""Seven more encoder families, checked deeply at setup: each prunes (unstructured and
structured CAP) to an export that reloads with transformers alone and reproduces the
student, or is refused in one line before any weight loads, with the reason.

One module fixture runs every family once per method through ``capscale prune``
(a few steps each) and keeps the outcomes; the tests read them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import time

import pytest
from tiny import MORE_FAMILIES, fast_overrides, save_tiny, tiny_config

from capscale.cli import main
from capscale.export.trial import trial_export
from capscale.models.deep_check import deep_check
from capscale.models.specs import resolve_adapter, skeleton

# family -> why structured pruning is refused at setup (absent: it exports, verified)
STRUCTURED_REFUSED = {"convbert": "a head is not one unit of Q/K/V and attn_out",
                      "longformer": "a layer with fewer heads cannot run the stock forward"}
# the linear maps unstructured pruning leaves in every layer, where there are any
UNPRUNED = {"convbert": ["attention.self.conv_kernel_layer", "attention.self.conv_out_layer"],
            "longformer": ["attention.self.query_global", "attention.self.key_global",
                           "attention.self.value_global"]}
METHODS = {"unstructured": ["pruning.method=movement", "pruning.final_sparsity=0.5"],
           "structured": ["pruning.method=structured", "structured.levels=[0.5]",
                          "structured.retrain_steps=2", "structured.importance_fraction=0.25"]}


def _prune(model, data, out, *extra) -> dict:
    """``capscale prune`` in this process: exit code, seconds, stderr lines, output_dir."""
    args = ["prune", *fast_overrides(model, data, out), "train.max_steps=3",
            "report.enabled=false", "cap.num_negatives=8", *extra]
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err):
        rc = main(args)
    return {"rc": rc, "seconds": time.perf_counter() - t0,
            "err": err.getvalue().strip().splitlines(), "out": out}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_csv) -> dict[str, dict[str, dict]]:
    """family -> method -> the run's outcome (see _prune): every family once per method
    (the landmark Nystromformer once: it is refused whatever the method)."""
    found: dict[str, dict[str, dict]] = {}
    for family in (*MORE_FAMILIES, "nystromformer-landmarks"):
        root = tmp_path_factory.mktemp(family)
        model = save_tiny(family, root / "model")
        methods = ["unstructured"] if family == "nystromformer-landmarks" else list(METHODS)
        for method in methods:
            found.setdefault(family, {})[method] = _prune(model, tiny_csv, root / method,
                                                          *METHODS[method])
    return found


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_family_exports_verified_or_is_refused_at_setup(family, method, outcomes):
    run = outcomes[family][method]
    out = run["out"]
    if method == "structured" and family in STRUCTURED_REFUSED:
        assert run["rc"] == 2, run
        assert len(run["err"]) == 1, run["err"]
        line = run["err"][0]
        assert line.startswith(f"capscale: model error: model {out.parent / 'model'}: "
                               "pruning.method=structured removes whole attention heads")
        assert STRUCTURED_REFUSED[family] in line
        assert not (out / "checkpoints").exists() and not (out / "results.json").exists()
        return
    assert run["rc"] == 0, run["err"][-5:]
    results = json.loads((out / "results.json").read_text())
    assert results["export_verified"]["ok"], results["export_verified"]
    assert results["export_verified"]["max_abs_diff"] <= 1e-4
    report = json.loads((out / "pruned" / "sparsity_report.json").read_text())
    assert list(report["unpruned_linears"]) == UNPRUNED.get(family, [])
    if method == "structured":
        assert report["head_sparsity"] == pytest.approx(0.5)
        assert sum(report["heads_per_layer"]) == 4  # of 2 x 4
        return
    assert results["sparsity"]["linear_sparsity"] == pytest.approx(0.5, abs=0.01)
    notes = [n for n in results["notes"] if "not pruned (every layer)" in n]
    if family in UNPRUNED:  # said before training, and reached as said
        reach = report["reachable_encoder_sparsity"]
        assert len(notes) == 1 and all(p in notes[0] for p in UNPRUNED[family])
        assert f"reaches {0.5 * reach:.1%} encoder sparsity at most" in notes[0]
        assert report["encoder_sparsity"] == pytest.approx(0.5 * reach, abs=0.01)
        assert reach < 0.8
    else:
        assert not notes and report["reachable_encoder_sparsity"] > 0.8


def test_a_fixed_length_model_is_refused_before_any_weight_loads(outcomes):
    run = outcomes["nystromformer-landmarks"]["unstructured"]
    assert run["rc"] == 2 and len(run["err"]) == 1
    line = run["err"][0]
    assert line.startswith("capscale: model error: model.name_or_path ")
    assert "num_landmarks 8 != segment_means_seq_len 32" in line
    assert "inputs of exactly 32 tokens" in line and "a padded batch of 32 tokens fails" in line
    assert not run["out"].exists() or not any(run["out"].iterdir())


# Adapters as a YAML mapping may leave out what the registered ones know: the deep check
# (or, past it, the trial export) says what is missing before any training.
@pytest.mark.parametrize("family,change,expected", [
    ("convbert", {"structured_refusal": ""},
     "attention.self.query, attention.self.key, attention.self.value have 16 outputs, not "
     "4 heads x 8 (num_attention_heads x head size)"),
    ("longformer", {"structured_refusal": "", "extra_head_linears": ()},
     "attention.self.query_global [32 -> 32], attention.self.key_global [32 -> 32], "
     "attention.self.value_global [32 -> 32] are laid out per head like Q/K/V but the "
     "adapter does not slice them: add them to extra_head_linears"),
    ("funnel", {"extra_head_params": ("attention.r_kernel:1",)},
     "attention.r_w_bias (4, 8), attention.r_r_bias (4, 8), attention.r_s_bias (4, 8), "
     "attention.seg_embed (2, 4, 8) are laid out per head but the adapter does not slice"),
    ("nystromformer", {"extra_head_params": ()},
     "attention.self.conv.weight (4, 1, 5, 1) are laid out per head"),
    ("bert", {"extra_head_params": ("attention.self.query.weight:1",)},
     "extra_head_params attention.self.query.weight:1 has shape (32, 32): dimension 1 is "
     "not the 4 heads"),
], ids=["convbert", "longformer", "funnel", "nystromformer", "bert"])
def test_the_deep_check_names_what_an_adapter_misses(family, change, expected):
    config = tiny_config(family)
    model = skeleton(config)
    registered = resolve_adapter(None, config.model_type)
    assert deep_check(registered, model).structured_refusal == (
        registered.structured_refusal)
    refusal = deep_check(dataclasses.replace(registered, **change), model).structured_refusal
    assert refusal.startswith("layer 0: ") and expected in refusal


def test_the_trial_export_finds_what_the_layout_does_not_show():
    """Longformer's layout passes once its global projections are sliced; only running
    a sliced copy shows that its forward needs every head."""
    config = tiny_config("longformer")
    adapter = dataclasses.replace(resolve_adapter(None, "longformer"), structured_refusal="")
    assert deep_check(adapter, skeleton(config)).structured_refusal == ""
    trial = trial_export(config, adapter)
    assert trial.ok is False
    assert trial.message.startswith("a structured export of a tiny random copy fails: "
                                    "RuntimeError: shape")
    funnel = trial_export(tiny_config("funnel"), resolve_adapter(None, "funnel"))
    assert funnel.ok is True


def test_inspect_runs_the_same_checks(tiny_model_factory, capsys):
    verdicts = {}
    for family in ("convbert", "funnel"):
        assert main(["inspect", str(tiny_model_factory(family))]) == 0
        out = capsys.readouterr().out
        verdicts[family] = out
    assert "structured pruning refused: ConvBERT's attention output" in verdicts["convbert"]
    assert "attention.self.conv_kernel_layer [16 -> 18]" in verdicts["convbert"]
    assert "trial structured export" not in verdicts["convbert"]
    assert "structured pruning refused" not in verdicts["funnel"]
    assert "config.n_head (a copy per layer)" in verdicts["funnel"]
    assert "runs and reproduces the masked" in verdicts["funnel"]


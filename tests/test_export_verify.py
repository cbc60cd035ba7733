"""Every export checks itself: reloaded with transformers alone, run on dev batches, and
compared with the masked student before the run reports success."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_run import overrides, setup
from transformers import AutoModelForSequenceClassification

from capscale.cli import main
from capscale.distributed import DistContext
from capscale.export.verify import ExportMismatch
from capscale.export.writer import write_verified_export
from capscale.models.loading import adapter_for
from capscale.pruning.controller import ExportPlan
from capscale.pruning.unstructured import WeightMaskController
from capscale.train.checkpoint import list_checkpoints


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return setup(tmp_path_factory.mktemp("verify"))


def _batches(n: int = 2, rows: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(5, 25, (rows, 9), generator=g),
             "attention_mask": torch.ones(rows, 9, dtype=torch.long)} for _ in range(n)]


def _write(model, plan, out):
    """One process: the student and its unsharded copy are the same module."""
    return write_verified_export(model, lambda: model, plan, adapter_for(model), out, None,
                                 None, _batches(), 2, 1e-4, False, DistContext())


def _model(assets):
    return AutoModelForSequenceClassification.from_pretrained(assets["model"]).eval()


def test_a_faithful_export_is_verified(assets, tmp_path):
    model = _model(assets)
    report = _write(model, lambda m: ExportPlan(), tmp_path)
    v = report["verified"]
    assert v["ok"] and v["max_abs_diff"] <= 1e-6
    assert v["batches"] == 2 and v["examples"] == 8
    saved = json.loads((tmp_path / "sparsity_report.json").read_text())
    assert saved["verified"] == v


@pytest.mark.parametrize("damage", ["noise", "nan"])
def test_an_export_that_differs_from_the_student_is_refused(assets, tmp_path, damage):
    """The plan runs after the student's outputs are recorded: damaging the copy there
    stands for an export that writes something other than the student."""
    def faulty_plan(m: torch.nn.Module) -> ExportPlan:
        w = m.get_submodule("bert.encoder.layer.0.output.dense").weight
        with torch.no_grad():
            if damage == "noise":
                w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
            else:
                w.fill_(float("nan"))
        return ExportPlan()

    model = _model(assets)
    with pytest.raises(ExportMismatch) as err:
        _write(model, faulty_plan, tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "model") in msg
    assert "does not reproduce the student" in msg and "dev batch" in msg
    assert ("nan" in msg) == (damage == "nan")


def test_an_export_that_does_not_load_is_refused(assets, tmp_path):
    def unloadable(m: torch.nn.Module) -> ExportPlan:
        m.config.num_attention_heads = 3  # 32 hidden units do not split into 3 heads
        return ExportPlan()

    model = _model(assets)
    with pytest.raises(ExportMismatch, match="does not load or run with transformers alone"):
        _write(model, unloadable, tmp_path)


def test_a_run_whose_export_fails_exits_4_and_keeps_the_student(assets, tmp_path,
                                                                  monkeypatch, capsys):
    """Exit code 4 and one line naming the export; the trained student is saved as a
    checkpoint, and ``capscale export`` writes it again once the fault is gone."""
    original = WeightMaskController.export_plan

    def faulty(self, model):
        with torch.no_grad():
            model.get_submodule("bert.pooler.dense").bias.add_(1.0)
        return original(self, model)

    out = tmp_path / "run"
    args = ["prune", *overrides(assets, out, **{"train.epochs": 1, "report.enabled": False})]
    monkeypatch.setattr(WeightMaskController, "export_plan", faulty)
    assert main(args) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("capscale: export error: the export in")
    assert not (out / "results.json").exists()
    kept = list_checkpoints(out / "checkpoints")
    assert kept and str(kept[-1]) in err[0]
    monkeypatch.setattr(WeightMaskController, "export_plan", original)
    assert main(["export", "--config", str(out / "config.yaml"), "--checkpoint", "latest",
                 "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "model" / "model.safetensors").is_file()


def test_the_results_and_summary_say_the_export_was_verified(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", *overrides(assets, out, **{"train.epochs": 1})]) == 0
    results = json.loads((out / "results.json").read_text())
    v = results["export_verified"]
    assert v["ok"] and v["max_abs_diff"] <= 1e-4 and v["examples"] > 0
    # The reported accuracy is the reloaded export's over the whole dev set: a share of
    # its rows, equal to the masked student's (the export reproduces its logits).
    n_dev = results["eval_examples"]
    acc = v["metrics"]["accuracy"]
    assert acc * n_dev == pytest.approx(round(acc * n_dev), abs=1e-9)
    assert v["metrics"] == pytest.approx(results["pruned_metrics"])
    printed = " ".join(capsys.readouterr().out.replace("│", " ").split())  # table cells
    assert "export verified" in printed
    assert f"pruned model accuracy (verified export) {acc:.4f}" in printed
    report = (out / "report" / "report.md").read_text()
    assert "export verified" in report
    assert f"| pruned model accuracy (verified export) | {acc:.4f} |" in report
    card = (out / "pruned" / "model" / "README.md").read_text()
    assert f"pruned model accuracy (dev) | {acc:.4f}" in card and "export check" in card

"""Extension points used from outside the package: a pruning method, a contrastive
module and a task are each registered here as one table entry, configured by name, and
run through the real entry point."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
from safetensors.torch import load_file

from capscale.contrastive.modules import (
    CONTRASTIVE_MODULES,
    ContrastiveModule,
    register_contrastive_module,
)
from capscale.pruning.methods import PRUNING_METHODS, WeightPruning, register_pruning_method
from capscale.pruning.weight_rules import WEIGHT_RULES, MagnitudeRule
from capscale.run import main
from capscale.tasks import TASKS, ClassificationTask, register_task


def _args(model, csv, out, *extra: str) -> list[str]:
    return [f"model.name_or_path={model}", f"model.teacher={model}",
            f"data.train_file={csv[0]}", f"data.validation_file={csv[1]}",
            f"output_dir={out}", "data.max_length=32", "pruning.final_sparsity=0.75",
            "pruning.initial_warmup=0", "pruning.final_warmup=2", "cap.num_negatives=16",
            "train.batch_size=16", "train.max_steps=6", "train.lr=1e-3",
            "train.num_threads=1", "train.progress=false", "report.enabled=false", *extra]


class SmallestMagnitudeRule(MagnitudeRule):
    """Keeps the *smallest* weights: the opposite of magnitude pruning, so the test can
    tell from the export alone that this rule, and no built-in one, chose the masks."""

    name = "smallest_magnitude"

    def importance(self, m):
        return -m.weight.detach().abs()


@pytest.fixture
def smallest_magnitude() -> Iterator[str]:
    register_pruning_method(WeightPruning(SmallestMagnitudeRule()))
    yield "smallest_magnitude"
    PRUNING_METHODS.pop("smallest_magnitude")
    WEIGHT_RULES.pop("smallest_magnitude")


def test_pruning_method_from_outside(smallest_magnitude, tiny_bert, tiny_csv, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_bert, tiny_csv, out, f"pruning.method={smallest_magnitude}",
                      "checkpoint.every_steps=3")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "smallest_magnitude"
    assert results["sparsity"]["linear_sparsity"] == pytest.approx(0.75, abs=0.005)
    masks = load_file(out / "pruned" / "masks.safetensors")
    # the weights the masks were chosen from: the last checkpoint is the final state
    state = torch.load(out / "checkpoints" / "step-00000006" / "model.pt", weights_only=True)
    assert len(masks) == 12  # 6 linears x 2 layers
    for name, mask in masks.items():
        w, keep = state[f"{name}.weight"].abs(), mask.bool()
        assert int(keep.sum()) == round(0.25 * w.numel())
        assert w[keep].max() <= w[~keep].min(), name  # the smallest weights survived
    # the checkpoint exports with the rule found by name, as the run did
    assert main(["export", *_args(tiny_bert, tiny_csv, out,
                                  f"pruning.method={smallest_magnitude}",
                                  "checkpoint.every_steps=3"),
                 "--out", str(tmp_path / "exported")]) == 0
    again = load_file(tmp_path / "exported" / "masks.safetensors")
    assert all(torch.equal(again[k], masks[k]) for k in masks)


def test_smallest_magnitude_rule_keeps_small_weights():
    from capscale.pruning.masked import MaskedLinear

    lin = torch.nn.Linear(8, 4)
    m = MaskedLinear.from_linear(lin, SmallestMagnitudeRule())
    m.keep_frac.fill_(0.25)
    mask = m.mask().bool()
    assert int(mask.sum()) == 8
    assert lin.weight.abs()[mask].max() <= lin.weight.abs()[~mask].min()


@pytest.fixture
def second_teacher(tiny_model_factory) -> Iterator[str]:
    other = tiny_model_factory("bert", 2)  # the same family, its own random weights
    register_contrastive_module(ContrastiveModule(
        "fic2", source=lambda loader: loader.load_frozen(str(other))))
    yield "fic2"
    CONTRASTIVE_MODULES.pop("fic2")


def test_contrastive_module_from_outside(second_teacher, tiny_bert, tiny_csv, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_bert, tiny_csv, out, "cap.modules.fic2.w_unsup=0.2",
                      "cap.modules.fic2.w_sup=0.5")) == 0
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert {"fic2_unsup", "fic2_sup", "fic_unsup", "prc_unsup"} <= set(history[-1])
    # its own weights and its own reference: not a copy of another module's term
    assert all(r["fic2_unsup"] != pytest.approx(2 * r["fic_unsup"]) for r in history)
    assert all(r["fic2_unsup"] > 0 for r in history)


def test_unregistered_contrastive_module_is_refused(tiny_bert, tiny_csv, tmp_path, capsys):
    assert main(_args(tiny_bert, tiny_csv, tmp_path, "cap.modules.fic3.w_unsup=1")) == 2
    assert "cap.modules.fic3: no such contrastive module" in capsys.readouterr().err


class SmoothedClassification(ClassificationTask):
    """Classification trained with label smoothing, scored with its log-likelihood too."""

    name = "smoothed_classification"

    def __init__(self) -> None:
        self.loss_calls = 0

    def loss(self, logits, labels):
        self.loss_calls += 1
        return torch.nn.functional.cross_entropy(logits.float(), labels, label_smoothing=0.2)

    def metrics(self, logits, labels, num_labels):
        out = super().metrics(logits, labels, num_labels)
        logp = torch.log_softmax(torch.as_tensor(logits), -1)
        out["nll"] = float(-logp[torch.arange(len(labels)), torch.as_tensor(labels)].mean())
        return out


@pytest.fixture
def smoothed() -> Iterator[SmoothedClassification]:
    task = register_task(SmoothedClassification())
    yield task
    TASKS.pop(task.name)


def test_task_from_outside(smoothed, tiny_bert, tiny_csv, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_bert, tiny_csv, out, f"data.task_type={smoothed.name}",
                      "loss.w_ce=1.0", "loss.w_kd=0")) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["pruned_metrics"]) == {"accuracy", "f1", "matthews", "nll"}
    assert results["teacher_metrics"]["nll"] > 0
    assert smoothed.loss_calls == 6  # the task's loss drove every one of the 6 steps
    metrics = results["pruned_metrics"]
    assert metrics["nll"] > 0 and metrics["accuracy"] == results["pruned_metrics"]["accuracy"]

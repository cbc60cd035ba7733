"""The memory planner (capscale.report.memory_plan, ``capscale plan``).

* Arithmetic: the shape read off a tiny BERT equals the real model's counts; the state
  parts follow the stated byte counts per strategy and precision; the built-in table
  gives the published parameter counts of well-known encoders offline.
* Calibration against measurement: a real CAPRecipe on a random BERT (hidden 192, 4
  layers, 4 heads, FFN 768; batch 8 x 64 tokens; movement pruning with a global
  threshold, KD, PrC / FiC / SnC banks) runs a few steps on CPU in a subprocess
  (tests/_memory_probe.py), with the encoder layers checkpointed and without. The
  state the run holds between steps, counted off its live tensors, must equal the
  plan's state parts within 1%; the peak a step adds (peak RSS less the RSS before it)
  must be within :data:`STEP_TOLERANCE` of the plan's step, with and without
  checkpointing, and so must the saving checkpointing brings. An estimator off by a
  factor of 2 in either direction fails.
* ``capscale plan`` on the RoBERTa-large ZeRO-3 config runs offline (shape from the
  built-in table, N from the table of GLUE sizes), prints per-strategy totals at world
  1, 8 and 32, writes its JSON, and suggests overrides where a strategy does not fit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForSequenceClassification

from capscale.checks import load_run_config, run_config_from_dict
from capscale.cli import main
from capscale.models.loading import adapter_for
from capscale.report.memory_plan import GIB, PlanInputs, plan_memory
from capscale.report.memory_terms import Run, layer_token_bytes
from capscale.report.model_shapes import ModelShape, model_config, model_shape

ROOT = Path(__file__).resolve().parent.parent
ROBERTA = "capscale/configs/roberta_large_zero3.yaml"
STEP_TOLERANCE = 0.2  # |planned / measured - 1| for what a step adds
STATE_TOLERANCE = 0.01


def _tiny_cfg(model_dir: Path, csv: tuple[Path, Path], **extra: object):
    data = {"model": {"name_or_path": str(model_dir), "teacher": str(model_dir)},
            "data": {"train_file": str(csv[0]), "validation_file": str(csv[1]),
                     "max_length": 32},
            "train": {"batch_size": 4, "progress": False}, "output_dir": "unused"}
    for key, value in extra.items():
        section, leaf = key.split(".")
        data.setdefault(section, {})[leaf] = value
    return run_config_from_dict(data)


# -- arithmetic --------------------------------------------------------------------
def test_shape_counts_equal_the_real_models(tiny_bert, tiny_csv):
    cfg = _tiny_cfg(tiny_bert, tiny_csv)
    shape = model_shape(cfg, num_labels=2)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    adapter = adapter_for(model)
    layers = adapter.layer_modules(model)
    matrices = [m.weight.numel() for m in adapter.prunable_linears(model).values()]
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert shape.prunable == sum(matrices) and shape.largest_matrix == max(matrices)
    assert shape.layer_parameters == sum(p.numel() for p in layers[0].parameters())
    assert shape.embedding_parameters == sum(
        p.numel() for p in model.bert.embeddings.parameters())
    assert shape.largest_table == model.bert.embeddings.word_embeddings.weight.numel()
    assert (shape.layers, shape.heads, shape.hidden, shape.intermediate) == (2, 4, 32, 64)
    assert shape.unit_scores == 2 * (4 + 64)
    assert shape.source.startswith("local config")


def _plan(shape: ModelShape, cfg, **kw):
    return plan_memory(cfg, inputs=PlanInputs(shape, 64, "stated"), **kw)


def test_state_parts_follow_the_stated_byte_counts(tiny_bert, tiny_csv):
    """P parameters, S = prunable scores (movement), trainable T = P + S:
    single fp32: 4P weights, 4S scores, 8T AdamW; ddp adds 4T of gradient buckets;
    zero3 bf16 on W ranks: 2P/W partitions, 4T/W master, 4T/W gradients, 8T/W AdamW;
    fsdp2: 4P/W shards, 8T/W AdamW; the teacher in the reference dtype (/W sharded)."""
    cfg = _tiny_cfg(tiny_bert, tiny_csv)
    shape = model_shape(cfg)
    p, s = shape.parameters, shape.prunable
    t = p + s

    def state(plan, name):
        return plan.part(name).state

    single = _plan(shape, cfg, strategy="single", device="cpu")
    assert single.precision == "fp32" and single.reference_dtype == "fp32"
    assert (state(single, "student weights"), state(single, "scores")) == (4 * p, 4 * s)
    assert (state(single, "optimiser state"), state(single, "gradients")) == (8 * t, 0)
    assert state(single, "references") == 4 * p and state(single, "master copies") == 0
    assert single.part("runtime").state == 0 and single.step_bytes > 0
    ddp = _plan(shape, cfg, strategy="ddp", world=4, device="cpu")
    assert state(ddp, "gradients") == 4 * t
    zero3 = _plan(shape, cfg, strategy="zero3", world=4, device="cuda")
    assert zero3.precision == "bf16" and zero3.reference_dtype == "bf16"
    assert state(zero3, "student weights") == 2 * p // 4
    assert state(zero3, "master copies") == 4 * t // 4
    assert state(zero3, "gradients") == 4 * t // 4
    assert state(zero3, "optimiser state") == 8 * t // 4
    assert state(zero3, "references") == -(-2 * p // 4)
    assert zero3.part("runtime").state == GIB
    fsdp2 = _plan(shape, cfg, strategy="fsdp2", world=4, device="cuda",
                  precision="fp32")
    assert state(fsdp2, "student weights") == 4 * p // 4
    assert state(fsdp2, "optimiser state") == 8 * t // 4
    magnitude = _tiny_cfg(tiny_bert, tiny_csv, **{"pruning.method": "magnitude"})
    no_scores = _plan(shape, magnitude, strategy="single", device="cpu")
    assert state(no_scores, "scores") == 0 and state(no_scores, "optimiser state") == 8 * p
    assert _plan(shape, cfg, strategy="single", world=8).refused is not None


def test_activation_items_per_token():
    """One layer application, per token, bf16 autocast on CUDA (fused SDPA, bool dropout
    masks, fp32 LayerNorm inputs): 24 H + 4 F + 4 A + 16 bytes; fp32 on CPU (math
    attention over S keys, fp32 dropout noise): 40 H + 8 F + 12 A S + 16."""
    cfg = load_run_config(ROBERTA)
    shape = model_shape(cfg, 3)
    h, f, a = 1024, 4096, 16
    run = Run(cfg, shape, "single", 1, "cuda", "bf16", "bf16", False, 16, 1, 128, 100)
    assert layer_token_bytes(run) == 24 * h + 4 * f + 4 * a + 16
    run = Run(cfg, shape, "single", 1, "cpu", "fp32", "fp32", False, 16, 1, 128, 100)
    assert layer_token_bytes(run) == 40 * h + 8 * f + 12 * a * 128 + 16


@pytest.mark.parametrize("name,labels,parameters", [
    ("roberta-large", 3, 355_362_819), ("roberta-base", 2, 124_647_170),
    ("bert-base-uncased", 2, 109_483_778), ("bert-large-uncased", 2, 335_143_938)])
def test_known_models_offline(name, labels, parameters):
    cfg = load_run_config(ROBERTA, [f"model.name_or_path={name}"])
    _, source = model_config(name)
    assert "built-in table" in source  # nothing is fetched
    assert model_shape(cfg, labels).parameters == parameters


# -- calibration ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("memory_probe")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(ROOT / "tests" / "_memory_probe.py"), str(root)],
                   env=env, check=True, capture_output=True, text=True, timeout=300)
    return json.loads((root / "probe.json").read_text())


def _probe_plans(probe: dict) -> dict[str, object]:
    cfg = run_config_from_dict(probe["config"])
    inputs = PlanInputs(model_shape(cfg, probe["num_labels"]), probe["train_examples"],
                        "the probe's data")
    return {ck: plan_memory(cfg, 1, strategy="single", device="cpu",
                            gradient_checkpointing=ck == "on", inputs=inputs)
            for ck in ("on", "off")}


def test_state_matches_the_live_tensors(probe):
    plan = _probe_plans(probe)["off"]
    for name, measured in probe["state"].items():
        part = plan.part(name)
        planned = part.state + part.host
        assert planned == pytest.approx(measured, rel=STATE_TOLERANCE), name


def test_step_peak_matches_measurement(probe):
    plans = _probe_plans(probe)
    measured = probe["step_peak"]
    report = {ck: (plans[ck].step_bytes / 2**20, measured[ck] / 2**20) for ck in plans}
    for ck, (planned, got) in report.items():
        assert abs(planned / got - 1) <= STEP_TOLERANCE, \
            f"checkpointing {ck}: planned {planned:.1f} MiB, measured {got:.1f} MiB"
    saving = (report["off"][0] - report["on"][0], report["off"][1] - report["on"][1])
    assert abs(saving[0] / saving[1] - 1) <= STEP_TOLERANCE, f"saving {saving}"
    # the test can fail: an estimate off by a factor of 2 is outside the tolerance
    assert all(abs(2 * p / g - 1) > STEP_TOLERANCE and abs(p / (2 * g) - 1) > STEP_TOLERANCE
               for p, g in report.values())


# -- the command -------------------------------------------------------------------
def test_plan_command_offline_at_three_world_sizes(capsys, tmp_path):
    out = tmp_path / "plan.json"
    code = main(["plan", "--config", ROBERTA, "--world", "1", "8", "32", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert "built-in table of published config numbers" in text
    assert "published size of glue/mnli" in text
    data = json.loads(out.read_text())
    assert sorted(data["worlds"], key=int) == ["1", "8", "32"]
    assert set(data["worlds"]["1"]) == {"single", "ddp", "zero3", "fsdp2"}
    assert set(data["worlds"]["8"]) == {"ddp", "zero3", "fsdp2"}
    for world in ("1", "8", "32"):
        assert f"memory per rank (GiB), world {world}" in text
        for plan in data["worlds"][world].values():
            assert f"{plan['device_gib']:.2f}" in text
    # sharding divides the state: ZeRO-3 on 32 ranks needs far less than on 1
    z1, z32 = data["worlds"]["1"]["zero3"], data["worlds"]["32"]["zero3"]
    assert z32["state_gib"] < z1["state_gib"] / 4


def test_plan_command_suggests_what_makes_it_fit(capsys, tmp_path):
    out = tmp_path / "plan.json"
    code = main(["plan", "--config", ROBERTA, "--world", "1", "--device-memory", "6",
                 "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 1  # no strategy fits as configured at world 1
    zero3 = json.loads(out.read_text())["worlds"]["1"]["zero3"]
    assert not zero3["fits"] and zero3["suggestion"]["fits"]
    changes = zero3["suggestion"]["overrides"]
    assert "train.gradient_checkpointing=true" in changes
    assert zero3["suggestion"]["device_gib"] <= 6
    assert "zero3 (world 1): needs" in text and "fits (" in text
    assert " ".join(changes) in text
    assert "single (world 1): needs" in text and "does not fit" in text
    # the suggested overrides do make the plan fit
    cfg = load_run_config(ROBERTA, changes)
    assert plan_memory(cfg, 1, strategy="zero3").fits(6)

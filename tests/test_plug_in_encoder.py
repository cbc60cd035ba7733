"""An encoder with its own modeling code, plugged in with no code: ``capscale inspect``
reads it on the meta device and suggests its adapter, and that YAML alone prunes it
under ``accelerate launch`` with 2 CPU processes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _tiny_run import ROOT, env, write_data
from remote_encoder import save_remote_encoder
from safetensors.torch import load_file

from capscale.cli import main
from capscale.errors import ModelError
from capscale.models.loading import check_encoder, read_config

EMBER = {"layers": "stack", "query": "mixer.to_q", "key": "mixer.to_k", "value": "mixer.to_v",
         "attn_out": "mixer.to_out", "ffn_in": "ff.w_in", "ffn_out": "ff.w_out",
         "num_heads_attr": "attn_heads", "head_linear": "score"}
EMBER_FUSED_GLU = {"layers": "stack", "qkv": "mixer.to_qkv", "qkv_layout": "stacked",
                   "attn_out": "mixer.to_out", "ffn_in": "ff.w_in", "ffn_out": "ff.w_out",
                   "ffn_gated": True, "num_heads_attr": "attn_heads", "head_linear": "score"}


@pytest.fixture(scope="module")
def ember(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ember")
    return {"plain": save_remote_encoder(tmp / "ember_plain"),
            "fused_glu": save_remote_encoder(tmp / "ember_fused", fused_qkv=True, glu=True)}


def _suggested(out: str) -> dict:
    """The YAML block ``capscale inspect`` printed (from ``model:`` to the blank line)."""
    lines = out.splitlines()
    start = lines.index("model:")
    end = lines.index("", start)
    return yaml.safe_load("\n".join(lines[start:end]))


def test_inspect_a_registered_family(tiny_bert, capsys):
    assert main(["inspect", str(tiny_bert)]) == 0
    out = capsys.readouterr().out
    summary = {line.split("│")[1].strip(): line.split("│")[2].strip()
               for line in out.splitlines() if line.count("│") == 3}
    assert summary["model_type"] == "bert"
    assert summary["config class"] == "BertConfig"
    assert summary["task model"] == "BertForSequenceClassification (meta device, no weights)"
    assert summary["adapter"] == "bert (registered for model_type 'bert')"
    assert summary["layers"] == ("encoder.layer: 2 distinct (BertLayer), each applied 1x "
                                 "(2 layer applications)")
    assert summary["attention heads"] == "4 (num_attention_heads)"
    assert summary["head linear"] == "classifier [32 -> 2]"
    assert "prunable matrices of one layer (adapter)" in out
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in out.splitlines() if line.count("│") == 5}
    assert rows["query"] == ["attention.self.query", "32 x 32", "-"]
    assert rows["ffn_in"] == ["intermediate.dense", "64 x 32", "-"]
    assert rows["ffn_out"] == ["output.dense", "32 x 64", "-"]
    assert "suggested adapter" not in out


@pytest.mark.parametrize("variant,expected", [("plain", EMBER),
                                              ("fused_glu", EMBER_FUSED_GLU)])
def test_inspect_suggests_an_adapter_that_validates(variant, expected, ember, tmp_path,
                                                    capsys):
    model = ember[variant]
    assert main(["inspect", str(model), "--trust-remote-code"]) == 1  # nothing registered
    out = capsys.readouterr().out
    assert "no encoder adapter for model_type 'ember'" in out
    assert "EmberForSequenceClassification (meta device" in out
    assert "stack: 2 distinct (EmberBlock), each applied 1x" in out
    assert "it passes the checks" in out
    suggestion = _suggested(out)
    assert suggestion == {"model": {"trust_remote_code": True, "adapter": expected}}
    if variant == "fused_glu":
        assert "query 32 x 32, key 32 x 32, value 32 x 32" in out  # logical matrices
        assert "ffn_in 64 x 32, ffn_gate 64 x 32" in out
    # the suggestion is valid model.adapter input, and passes the check before loading
    adapter = check_encoder(str(model), expected, trust_remote_code=True)
    assert adapter.model_types == ("ember",) and adapter.layers == "stack"
    with pytest.raises(ModelError, match="no encoder adapter for model_type 'ember'"):
        check_encoder(str(model), None, trust_remote_code=True)
    # --adapter takes the printed YAML back: now an adapter fits
    (tmp_path / "adapter.yaml").write_text(yaml.safe_dump(suggestion))
    assert main(["inspect", str(model), "--trust-remote-code", "--adapter",
                 str(tmp_path / "adapter.yaml")]) == 0
    out = capsys.readouterr().out
    assert "ember (model.adapter mapping)" in out and "suggested adapter" not in out
    # a wrong inline mapping is shown with what the model has
    assert main(["inspect", str(model), "--trust-remote-code", "--adapter",
                 "{layers: stack, query: mixer.q}"]) == 1
    out = capsys.readouterr().out
    assert "problem: query 'mixer.q'" in out and "did you mean mixer.to_q" in out
    assert _suggested(out)["model"]["adapter"] == expected  # and what would fit


def test_remote_code_needs_trust(ember, capsys):
    assert main(["inspect", str(ember["plain"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("capscale: model error:") and "ships its own modeling code" in err
    assert "model.trust_remote_code: true" in err and "\n" not in err
    assert read_config(str(ember["plain"]), trust_remote_code=True).model_type == "ember"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_remote_code_encoder_prunes_from_yaml_alone(ember, tmp_path):
    """``accelerate launch`` (2 CPU processes, DDP over gloo) of capscale/run.py with the
    adapter given in the YAML only: no registration, no Python."""
    data = (write_data(tmp_path / "train.csv", 64, 1), write_data(tmp_path / "dev.csv", 32, 2))
    out = tmp_path / "run"
    model = str(ember["plain"])
    config = {
        "model": {"name_or_path": model, "teacher": model, "trust_remote_code": True,
                  "adapter": EMBER},
        "data": {"train_file": str(data[0]), "validation_file": str(data[1]),
                 "max_length": 16},
        "pruning": {"final_sparsity": 0.5, "initial_warmup": 0, "final_warmup": 2},
        "cap": {"num_negatives": 16, "max_snapshots": 2},
        "train": {"max_steps": 4, "epochs": 1, "batch_size": 8, "eval_batch_size": 32,
                  "lr": 1e-3, "progress": False, "num_threads": 1},
        "report": {"speed_batches": 1, "trackers": []}, "output_dir": str(out)}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    # accelerate's --cpu launches a single process; --multi_gpu with CAPSCALE_CPU=1 (set
    # by env()) starts 2 ranks on the CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "capscale/run.py", "--config", str(tmp_path / "cfg.yaml")]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=180,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 4
    assert results["sparsity"]["linear_sparsity"] == pytest.approx(0.5, abs=0.01)
    exported = out / "pruned" / "model"
    assert (exported / "modeling_ember.py").is_file()  # the export keeps its own code
    masks = load_file(out / "pruned" / "masks.safetensors")
    assert len(masks) == 2 * 6  # every prunable map of both layers, no other
    assert any(k.endswith("mixer.to_q") for k in masks)
    weights = load_file(exported / "model.safetensors")
    for name, mask in masks.items():
        kept = mask.bool()
        assert 0 < int(kept.sum()) < kept.numel(), name
        assert bool((weights[f"{name}.weight"][~kept] == 0).all()), name
    assert (out / "report" / "report.md").is_file()
    assert "forward latency" in (out / "report" / "report.md").read_text()

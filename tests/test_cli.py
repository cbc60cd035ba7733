"""The ``capscale`` command: prune, evaluate, export and report on one tiny run."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from _tiny_run import overrides, setup
from safetensors.torch import load_file

from capscale.cli import main


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A run launched as ``capscale prune --config run.yaml key=value``."""
    tmp = tmp_path_factory.mktemp("cli")
    assets = setup(tmp)
    out = tmp / "run"
    tree: dict = {}
    for item in overrides(assets, out, **{"checkpoint.every_steps": 12,
                                          "report.speed_batches": 0}):
        key, value = item.split("=", 1)
        section, _, leaf = key.rpartition(".")
        (tree.setdefault(section, {}) if section else tree)[leaf] = yaml.safe_load(value)
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump(tree))
    assert main(["prune", "--config", str(config), "train.seed=7"]) == 0
    return config, out


def test_evaluate_reproduces_the_run_metrics(pruned, capsys):
    config, out = pruned
    capsys.readouterr()
    assert main(["evaluate", "--config", str(config)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics == json.loads((out / "results.json").read_text())["pruned_metrics"]


def test_export_of_the_last_checkpoint_equals_the_final_export(pruned, tmp_path):
    config, out = pruned
    dest = tmp_path / "export"
    assert main(["export", "--config", str(config), "--checkpoint", "latest",
                 "--out", str(dest)]) == 0
    a, b = load_file(dest / "masks.safetensors"), load_file(out / "pruned" / "masks.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    wa = load_file(dest / "model" / "model.safetensors")
    wb = load_file(out / "pruned" / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wb)


def test_export_with_formats(pruned, tmp_path):
    """``--formats sparse``: the sparse checkpoint beside the export, checked equal, and
    the model card lists it."""
    config, _ = pruned
    dest = tmp_path / "export"
    assert main(["export", "--config", str(config), "--out", str(dest),
                 "--formats", "sparse"]) == 0
    report = json.loads((dest / "sparsity_report.json").read_text())
    sparse = report["formats"]["sparse"]
    assert sparse["ok"] and sparse["max_abs_diff"] == 0.0
    assert sparse["bytes"] == (dest / "sparse" / "model.safetensors").stat().st_size
    card = (dest / "model" / "README.md").read_text()
    assert "sparse/" in card and report["run"]["method"] == "movement"
    assert main(["export", "--config", str(config), "--formats", "tflite"]) == 2


def test_report_subcommand(pruned, capsys):
    _, out = pruned
    (out / "report" / "report.md").unlink()
    assert main(["report", str(out), "--speed-batches", "0"]) == 0
    assert (out / "report" / "report.md").is_file()
    assert main(["report", str(out.parent)]) == 2
    assert "has no results.json" in capsys.readouterr().err


def test_input_errors_exit_2_in_every_subcommand(pruned, tmp_path, capsys):
    config, _ = pruned
    for argv in (["evaluate", "--config", str(config), "--model", str(tmp_path)],
                 ["export", "--config", str(config), "--checkpoint", str(tmp_path)],
                 ["prune", "--config", str(config), "train.lr=-1"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("capscale: ") and "\n" not in err, err


def test_no_subcommand_means_prune_and_help(capsys):
    # ``python -m capscale.run --config ...`` itself is run by tests/test_resume.py.
    assert main(["--config", "/no/such.yaml"]) == 2
    assert "config file /no/such.yaml not found" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "capscale prune" in capsys.readouterr().out


def test_one_entry_point():
    """``capscale``, ``python -m capscale.run`` and ``accelerate launch capscale/run.py``
    reach the same ``main``: the console script is capscale.cli:cli, run.py re-exports it."""
    from pathlib import Path

    import capscale.cli
    import capscale.run

    assert capscale.run.main is capscale.cli.main
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert 'capscale = "capscale.cli:cli"' in pyproject.splitlines()

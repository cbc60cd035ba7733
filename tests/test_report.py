"""The report written with every run: markdown, HTML and real PNG plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _tiny_run import overrides, setup
from matplotlib import image

from capscale.report.document import Trackers, write_report
from capscale.run import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("sparsity.png", "losses.png", "layer_sparsity.png", "accuracy_vs_sparsity.png")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "run"
    assert main(overrides(setup(tmp), out)) == 0
    return out


def test_plots_are_valid_nontrivial_pngs(run_dir):
    for name in PLOTS:
        path = run_dir / "report" / name
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE, name
        assert len(data) > 10_000, f"{name} is suspiciously small ({len(data)} bytes)"
        pixels = image.imread(path)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300
        assert np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0).shape[0] > 20, name


def test_markdown_and_html_reference_every_plot_and_the_export(run_dir):
    md = (run_dir / "report" / "report.md").read_text()
    html = (run_dir / "report" / "report.html").read_text()
    for name in PLOTS:
        assert f"({name})" in md and f'src="{name}"' in html
    results = json.loads((run_dir / "results.json").read_text())
    exported = results["export_verified"]["metrics"]["accuracy"]  # the export's dev score
    assert f"| pruned model accuracy (verified export) | {exported:.4f} |" in md
    assert "exported model (dense safetensors)" in md and "forward latency" in md
    assert html.startswith("<!doctype html>")
    # the loop's phases, timed through its hooks: every phase of a CAP step, in order
    phases = results["phase_ms"]
    assert list(phases) == ["mask_update", "forward", "teacher", "contrastive", "backward",
                            "optimizer"]
    assert all(ms > 0 for ms in phases.values())
    for phase, ms in phases.items():
        assert f"| {phase.replace('_', ' ')} per step | {ms:.1f} ms |" in md


def test_report_is_rewritten_from_the_run_files(run_dir, tmp_path):
    (run_dir / "report" / "losses.png").unlink()
    write_report(run_dir, speed_batches=0)
    assert (run_dir / "report" / "losses.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "forward latency" not in (run_dir / "report" / "report.md").read_text()


def test_missing_or_unknown_trackers_are_skipped_with_a_note(tmp_path):
    t = Trackers(["no_such_tracker"], "run", tmp_path)
    assert t.trackers == [] and "unknown tracker 'no_such_tracker'" in t.notes[0]
    t({"step": 1, "loss": 1.0})  # logging with nothing attached is a no-op
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        t = Trackers(["tensorboard"], "run", tmp_path)
        assert t.trackers == [] and "not installed" in t.notes[0]
    else:
        t = Trackers(["tensorboard"], "run", tmp_path)
        t({"step": 1, "loss": 1.0})
        t.finish()
        assert list(tmp_path.rglob("events.out.tfevents*"))


def test_loss_plot_includes_components_that_start_mid_run():
    from capscale.report.document import loss_names
    history = [{"step": 1, "ce": 0.5, "prc_unsup": 0.3, "loss": 0.8, "sparsity": 0.0},
               {"step": 2, "ce": 0.4, "prc_unsup": 0.3, "snc_unsup": 0.2, "loss": 0.9,
                "sparsity": 0.1}]
    assert loss_names(history) == ["ce", "prc_unsup", "snc_unsup", "loss"]


def test_report_places_the_run_on_a_frontier(run_dir, tmp_path):
    """With a frontier file the report times the export against the dense model it came
    from (same process, same shape) and plots the run among the frontier's points."""
    frontier = tmp_path / "frontier.json"
    frontier.write_text(json.dumps({"points": [
        {"name": "dense", "runtime": "torch fp32", "relative_accuracy": 1.0,
         "speedup_b32": 1.0},
        {"name": "hybrid 50%", "runtime": "onnxruntime int8", "relative_accuracy": 0.97,
         "speedup_b32": 3.5}]}))
    md = write_report(run_dir, speed_batches=1, frontier=frontier).read_text()
    results = json.loads((run_dir / "results.json").read_text())
    rel = results["pruned_metrics"]["accuracy"] / results["teacher_metrics"]["accuracy"]
    assert "## Where this model sits" in md
    assert f"| accuracy, % of the dense teacher | {100 * rel:.1f}% |" in md
    assert "speed-up over the dense model (PyTorch fp32, batch 32 x " in md
    assert "(frontier.png)" in md
    assert (run_dir / "report" / "frontier.png").read_bytes()[:8] == PNG_SIGNATURE

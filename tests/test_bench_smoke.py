"""The benchmarks' smallest configurations run end to end (not timed; figures unchecked).

They exercise the real harnesses on the packaged MiniLM and tweets corpus, so a change
that breaks a benchmark fails CI instead of the next person who wants the figures.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_fidelity_smoke_budget(tmp_path):
    fidelity = _bench("fidelity")
    out, work = tmp_path / "results", tmp_path / "work"
    args = ["--budget", "smoke", "--sparsities", "0.9", "--methods", "movement",
            "--no-ablation", "--out", str(out), "--work", str(work)]
    # Two workers split the runs and share one results file.
    assert fidelity.main([*args, "--worker", "0/2"]) == 0
    first = json.loads((out / "fidelity_smoke.json").read_text())["runs"]
    assert [(r["method"], r["cap"]) for r in first] == [("movement", False)]
    assert fidelity.main([*args, "--worker", "1/2"]) == 0
    res = json.loads((out / "fidelity_smoke.json").read_text())
    assert {(r["method"], r["cap"]) for r in res["runs"]} == {("movement", False),
                                                              ("movement", True)}
    assert res["split"]["dev_rows"] == 64  # the smoke budget's max_eval_samples
    assert all(r["steps"] == 4 for r in res["runs"])
    for acc in [res["dense_accuracy"], *(r["accuracy"] for r in res["runs"])]:
        # a share of the 64 dev rows: not a fraction of a padded or truncated eval set
        assert acc * 64 == pytest.approx(round(acc * 64), abs=1e-9), acc
    assert "movement + CAP" in (out / "fidelity_smoke.md").read_text()
    # Resumable: a call without a split finds both runs done and trains nothing new.
    assert fidelity.main(args) == 0
    again = json.loads((out / "fidelity_smoke.json").read_text())
    assert again["runs"] == res["runs"]


def test_fidelity_rejects_a_bad_worker_split(capsys):
    fidelity = _bench("fidelity")
    with pytest.raises(SystemExit) as exc:
        fidelity.main(["--worker", "2/2"])
    assert exc.value.code == 2  # argparse's usage error, not a crash
    assert "--worker wants K/N with 0 <= K < N, got '2/2'" in capsys.readouterr().err


@pytest.mark.slow
def test_perf_quick(tmp_path):
    perf = _bench("perf")
    assert perf.main(["--steps", "2", "--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "perf_quick.json").read_text())
    med = res["step"]["median_seconds"]
    assert set(med) == {"cap", "movement_kd"}
    assert med["cap"]["total"] > 0 and med["movement_kd"]["total"] > 0
    assert res["step"]["cap_over_movement_kd"] == pytest.approx(
        med["cap"]["total"] / med["movement_kd"]["total"])
    times = res["bank_build"]["times"]
    assert set(times) == {"2000", "8000"}  # quick: N and 4N
    assert res["bank_build"]["ratio_by_id"] == pytest.approx(
        times["8000"]["by_id"] / times["2000"]["by_id"])

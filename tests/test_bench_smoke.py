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
    assert all(0 <= r["accuracy"] <= 1 and r["steps"] == 4 for r in res["runs"])
    assert "movement + CAP" in (out / "fidelity_smoke.md").read_text()
    # Resumable: a call without a split finds both runs done and trains nothing new.
    assert fidelity.main(args) == 0
    again = json.loads((out / "fidelity_smoke.json").read_text())
    assert again["runs"] == res["runs"]


def test_fidelity_rejects_a_bad_worker_split():
    fidelity = _bench("fidelity")
    with pytest.raises(SystemExit):
        fidelity.main(["--worker", "2/2"])


@pytest.mark.slow
def test_perf_quick(tmp_path):
    perf = _bench("perf")
    assert perf.main(["--steps", "2", "--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "perf_quick.json").read_text())
    assert res["step"]["cap_over_movement_kd"] > 0
    assert set(res["step"]["median_seconds"]) == {"cap", "movement_kd"}
    assert res["bank_build"]["ratio_by_id"] > 0

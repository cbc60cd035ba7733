"""The benchmarks' smallest configurations run end to end (not timed; figures unchecked).

They exercise the real harnesses on the packaged MiniLM and tweets corpus, so a change
that breaks a benchmark fails CI instead of the next person who wants the figures.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
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


@pytest.fixture(scope="module")
def smoke_teacher(tmp_path_factory) -> Path:
    """The smoke budget's fine-tuned dense teacher (``<work>/smoke/teacher_run``), made
    once by ``bench/fidelity.py --teacher-only``. fidelity, fair_baselines and frontier
    each fine-tune it in their work folder unless it is there (same config, same
    fingerprint): a test copies it into its own work folder, where the bench reuses it."""
    root = tmp_path_factory.mktemp("smoke_teacher")
    assert _bench("fidelity").main(["--budget", "smoke", "--teacher-only", "--work",
                                    str(root / "work"), "--out", str(root / "out")]) == 0
    return root / "work" / "smoke" / "teacher_run"


def _work_with_teacher(tmp_path: Path, teacher: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(teacher, work / "smoke" / "teacher_run")
    return work


@pytest.mark.slow
def test_fidelity_smoke_budget(tmp_path, smoke_teacher):
    fidelity = _bench("fidelity")
    out, work = tmp_path / "results", _work_with_teacher(tmp_path, smoke_teacher)
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


@pytest.mark.slow
def test_scale_real_quick(tmp_path):
    """Every (world, strategy) job of bench/scale_real.py runs on the tiny shape and the
    sharded strategies' per-rank reference bytes halve from world 1 to world 2."""
    scale = _bench("scale_real")
    assert scale.main(["--quick", "--steps", "2", "--train-rows", "8", "--parallel", "6",
                       "--out", str(tmp_path), "--work", str(tmp_path / "work")]) == 0
    res = json.loads((tmp_path / "scale_real_quick.json").read_text())
    jobs = {(j["world"], j["strategy"]): j for j in res["jobs"]}
    assert set(jobs) == set(scale.JOBS)
    for (world, _), job in jobs.items():
        assert job["status"] == "ok", job["status"]
        assert len(job["ranks"]) == world
        for r in job["ranks"]:
            for key in ("peak_rss", "student", "scores", "optimizer", "teacher"):
                assert r[key] > 0, (job["strategy"], world, key)
            assert r["median_step_s"] > 0
    for strategy in ("zero3", "fsdp2"):
        one, two = jobs[(1, strategy)]["ranks"][0], jobs[(2, strategy)]["ranks"]
        for r in two:  # sharded references: about half per rank (padding aside)
            assert r["teacher"] / one["teacher"] == pytest.approx(0.5, abs=0.03), strategy
            trained = sum(r[k] for k in ("student", "scores", "optimizer"))
            assert trained / sum(one[k] for k in ("student", "scores", "optimizer")) \
                == pytest.approx(0.5, abs=0.03), strategy
        assert res["ratios"][strategy]["meets_0.55"]
    for strategy in ("single", "ddp"):  # replicated: every rank holds the whole teacher
        assert {r["teacher"] for r in jobs[(2 if strategy == "ddp" else 1, strategy)]["ranks"]} \
            == {jobs[(1, "single")]["ranks"][0]["teacher"]}
    assert "GPU plan on paper" in (tmp_path / "scale_real_quick.md").read_text()


def test_scale_train_quick(tmp_path):
    """bench/scale_train.py on the tiny shape: the global batch of 32 from micro-batches,
    accumulation and checkpointing under fsdp2 at world 2 (the harness it shares with
    bench/scale_real.py runs zero3 in test_scale_real_quick), the record with the
    fields the issue asks for and the planner's estimate beside the measured peak."""
    bench = _bench("scale_train")
    assert bench.main(["--quick", "--jobs", "0", "--steps", "2", "--length", "32",
                       "--out", str(tmp_path), "--work", str(tmp_path / "work")]) == 0
    res = json.loads((tmp_path / "scale_train_quick.json").read_text())
    assert len(res["records"]) == 1
    for r in res["records"]:
        assert r["status"] == "ok", r["status"]
        assert r["global_batch"] == 32 == r["micro_batch"] * r["accumulation"] * r["world"]
        for key in ("model", "params", "strategy", "world", "precision",
                    "gradient_checkpointing", "seq_length"):
            assert r[key] is not None, key
        assert r["peak_gib"] > 0 and r["planned_gib"] > 0 and r["step_s"] > 0
    assert "planned GiB" in (tmp_path / "scale_train_quick.md").read_text()


def test_encoders_one_family(tmp_path):
    """bench/encoders.py on ModernBERT (fused Q/K/V, gated FFN): both methods, exports
    re-loaded with the masked student's logits."""
    encoders = _bench("encoders")
    assert encoders.main(["--families", "modernbert", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "encoders.json").read_text())["records"]
    assert [r["method"] for r in records] == ["unstructured", "structured"]
    for r in records:
        assert r["max_abs_logit_diff"] < 1e-5, r
    assert "ffn_gate" in records[0]["logical_matrices"]
    assert records[1]["exported_encoder_parameters"] < records[1]["encoder_parameters"]


def test_fidelity_paper_budget_lists_loadable_commands(capsys):
    """--budget paper --list: one command per paper recipe selected, each of whose
    configs loads (MNLI and QQP rows; the first row of a task trains its teacher)."""
    import shlex

    from capscale.checks import load_run_config

    fidelity = _bench("fidelity")
    assert fidelity.main(["--budget", "paper", "--list", "--sparsities", "0.9", "0.97",
                          "--methods", "movement", "soft_movement"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 24  # 3 tasks x 2 methods x {KD, CAP} x 2 sparsities
    for task in ("mnli", "qqp", "squad"):
        rows = [ln for ln in lines if f"_{task}_" in ln]
        assert "model.teacher" not in rows[0]
        assert all(f"model.teacher=outputs/paper/movement_kd_{task}_97_seed0/teacher" in ln
                   for ln in rows[1:])
    for line in lines:
        args = shlex.split(line)
        cfg_name = args[args.index("--config") + 1]
        cfg = load_run_config(cfg_name, args[args.index("--config") + 2:])
        assert cfg.train.seed == 42


@pytest.mark.slow
def test_fair_baselines_smoke(tmp_path, smoke_teacher):
    """bench/fair_baselines.py: the sweep picks each side's best rate and the table
    says which rate each cell used (one rate, one seed: the sweep is the whole grid)."""
    fair = _bench("fair_baselines")
    work = _work_with_teacher(tmp_path, smoke_teacher)
    assert fair.main(["--budget", "smoke", "--lrs", "2e-4", "--methods", "movement",
                      "--seeds", "1", "--sparsities", "0.9", "--out", str(tmp_path / "out"),
                      "--work", str(work)]) == 0
    runs = json.loads((tmp_path / "out" / "fair_baselines_smoke.json").read_text())["runs"]
    assert sorted(r["cap"] for r in runs) == [False, True]
    assert all(r["phase"] == "sweep" and r["lr"] == 2e-4 for r in runs)
    md = (tmp_path / "out" / "fair_baselines_smoke.md").read_text()
    assert "lr 0.0002" in md and "| movement | 90% |" in md


def test_quantized_speed_smoke(tmp_path):
    """bench/quantized_speed.py on a 2-layer model: every runtime timed and compared."""
    bench = _bench("quantized_speed")
    assert bench.main(["--tiny", "--length", "8", "--repeats", "1", "--batches", "2",
                       "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "quantized_speed.json").read_text())
    assert [r["runtime"] for r in res["rows"]] == [
        "torch fp32", "torch int8", "torch int8 per-channel", "onnxruntime fp32",
        "onnxruntime int8"]
    assert res["accuracy"]["onnxruntime fp32"]["max_abs_logit_diff"] < 1e-4
    assert res["bytes"]["onnxruntime int8"] < res["bytes"]["onnxruntime fp32"]
    assert "| onnxruntime int8 | 2 |" in (tmp_path / "quantized_speed.md").read_text()


def test_sparse_size_smoke(tmp_path):
    """bench/sparse_size.py on a 2-layer model: the sparse checkpoint is smaller and
    reloads exactly; the compressed-tensors probe records what transformers did."""
    bench = _bench("sparse_size")
    assert bench.main(["--tiny", "--sparsities", "0.9", "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "sparse_size.json").read_text())["rows"][0]
    assert row["capscale_sparse_bytes"] < row["dense_bytes"]
    assert row["capscale_max_abs_logit_diff"] == 0.0
    assert "loads" in row["compressed_tensors_bitmask"]


@pytest.mark.slow
def test_frontier_smoke(tmp_path, smoke_teacher):
    """bench/frontier.py end to end on the smoke budget: a hybrid point trained and
    exported (with ONNX and INT8), timed next to the dense model, tabled."""
    frontier = _bench("frontier")
    args = ["--budget", "smoke", "--out", str(tmp_path / "out"), "--work",
            str(_work_with_teacher(tmp_path, smoke_teacher))]
    assert frontier.main([*args, "--only", "hybrid 50%"]) == 0
    assert frontier.main([*args, "--time", "--repeats", "1", "--length", "16"]) == 0
    data = json.loads((tmp_path / "out" / "frontier_smoke.json").read_text())
    assert {r["name"] for r in data["runs"]} == {"hybrid 50%"}
    names = {(p["name"], p["runtime"]) for p in data["points"]}
    assert ("dense", "torch fp32") in names and ("hybrid 50%", "onnxruntime int8") in names
    dense = next(p for p in data["points"] if p["name"] == "dense"
                 and p["runtime"] == "torch fp32")
    assert dense["speedup_b32"] == pytest.approx(1.0)
    hybrid = next(p for p in data["points"] if p["name"] == "hybrid 50%"
                  and p["runtime"] == "torch fp32")
    assert 0.2 < hybrid["sparsity_reached"] < 0.6 and hybrid["latency_ms_b32"] > 0
    assert all(p["accuracy"] is not None for p in data["points"])
    md = (tmp_path / "out" / "frontier_smoke.md").read_text()
    assert "| hybrid 50% | onnxruntime int8 |" in md and "| dense | torch fp32 |" in md
    assert (tmp_path / "out" / "frontier_smoke.png").stat().st_size > 0


@pytest.mark.slow
def test_tokenize_cache_small(tmp_path):
    """bench/tokenize_cache.py on 2,000 pairs: both processes run, the requeued one reads
    back the rows the first tokenised, and the cache holds both kinds of entry."""
    bench = _bench("tokenize_cache")
    assert bench.main(["--rows", "2000", "--validation-rows", "200", "--out",
                       str(tmp_path / "tc"), "--work", str(tmp_path / "work")]) == 0
    res = json.loads((tmp_path / "tc.json").read_text())
    assert res["identical"] and res["first"]["rows"] == {"train": 2000, "validation": 200}
    assert set(res["cache_mib"]) == {"features", "lengths"}
    assert res["first"]["seconds"]["tokenize"] > 0 and "tokenize" not in \
        res["requeued"]["seconds"]  # the requeued process never tokenised


def test_frontier_coarse_points_are_valid_configs(tmp_path):
    """Every point of ``bench/frontier.py --points coarse`` is a config the run accepts,
    with what its name says (blocks, layer distillation, CAP off, steps)."""
    import argparse

    from capscale.checks import run_config_from_dict

    frontier, fidelity = _bench("frontier"), _bench("fidelity")
    args = argparse.Namespace(lr=1e-4, update_every=10, warm_start_scale=0.1)
    for point in frontier.COARSE_POINTS:
        cfg = run_config_from_dict(frontier.point_config(
            fidelity, args, {**fidelity.BUDGETS["cpu"], "max_steps": 150}, tmp_path,
            str(tmp_path / "teacher"), point, dense_ms=1000.0))
        name = point[0]
        assert cfg.pruning.target_latency_ms == (125.0 if "8x target" in name else None)
        assert cfg.structured.remove_empty_blocks == ("blocks" in name)
        assert (cfg.loss.w_layer > 0) == ("layer" in name)
        assert cfg.cap.modules["prc"].enabled == ("no CAP" not in name)
        assert cfg.train.max_steps == (int(name.split("@")[1]) if "@" in name else 150)
        assert (cfg.structured.hidden_sparsity > 0) == (" h" in name)

"""Damaged checkpoints: found before anything loads, skipped by ``resume=latest``, a
one-line error when named explicitly; non-finite restored tensors are refused.

One uninterrupted 24-step run (checkpoints every 3 steps; steps 21 and 24 kept) is
shared by the module. Each case copies its checkpoints, damages the newest one and
resumes twice in-process: naming it (exit code 2, one line naming the file, nothing
written) and with ``resume=latest`` (a warning naming the file, then the run resumes
from step 21 and ends bit-identical to the uninterrupted run).
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _tiny_run import overrides, run, setup
from test_resume import assert_same_run
from torch import nn

from capscale.cli import main
from capscale.train.checkpoint import list_checkpoints
from capscale.train.integrity import (
    MANIFEST_FILE,
    STATE_FILE,
    live_tensors,
    nonfinite,
    verification_share,
    verify_checkpoint,
    write_manifest,
)

EVERY = 3
NEWEST, PREVIOUS = "step-00000024", "step-00000021"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return setup(tmp_path_factory.mktemp("integrity"))


def _args(assets, out: Path, **extra) -> list[str]:
    return overrides(assets, out, **{"checkpoint.every_steps": EVERY, "report.enabled": False,
                                     **extra})


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """The uninterrupted run, in-process (as every resume here)."""
    ref = tmp_path_factory.mktemp("reference") / "run"
    assert main(_args(assets, ref)) == 0
    assert [p.name for p in list_checkpoints(ref / "checkpoints")] == [PREVIOUS, NEWEST]
    return ref


def _copy(reference: Path, tmp_path: Path) -> Path:
    """A run folder holding only the reference's checkpoints."""
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    return out


def _text(s: str) -> str:
    """``s`` without white space: rich wraps long log lines, inside a path too."""
    return "".join(s.split())


# -- damage ------------------------------------------------------------------------------
def _largest_record(pt: Path) -> int:
    """Byte offset of the data of the largest tensor record in a torch zip file."""
    with zipfile.ZipFile(pt) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)
    with open(pt, "rb") as f:
        f.seek(info.header_offset + 26)
        head = f.read(4)
    return info.header_offset + 30 + int.from_bytes(head[:2], "little") + \
        int.from_bytes(head[2:], "little")


def overwrite_4k(ckpt: Path) -> None:
    """The issue's case: 4 KiB of a tensor overwritten in place (0xFF: 1,024 NaN)."""
    pt = ckpt / "model.pt"
    with open(pt, "r+b") as f:
        f.seek(_largest_record(pt))
        f.write(b"\xff" * 4096)


def bit_flip(ckpt: Path) -> None:
    pt = ckpt / "model.pt"
    with open(pt, "r+b") as f:
        f.seek(_largest_record(pt) + 100)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


def truncate(ckpt: Path) -> None:
    pt = ckpt / "model.pt"
    os.truncate(pt, pt.stat().st_size // 2)


def garbage_state(ckpt: Path) -> None:
    (ckpt / STATE_FILE).write_bytes(b"\x00\x13garbage{not json")


def missing_optimizer(ckpt: Path) -> None:
    (ckpt / "optimizer.pt").unlink()


def incomplete(ckpt: Path) -> None:
    (ckpt / STATE_FILE).unlink()


def missing_manifest(ckpt: Path) -> None:
    (ckpt / MANIFEST_FILE).unlink()


def nan_score(ckpt: Path) -> None:
    """model.pt rewritten with one NaN movement score (the manifest no longer fits)."""
    state = torch.load(ckpt / "model.pt", weights_only=True)
    key = next(k for k in state if k.endswith("mask_scores"))
    state[key].view(-1)[0] = float("nan")
    torch.save(state, ckpt / "model.pt")


CASES: list[tuple[Callable[[Path], None], str]] = [
    # (damage to the newest checkpoint, what the messages must say)
    (overwrite_4k, "model.pt does not match its sha256 in manifest.json"),
    (bit_flip, "model.pt does not match its sha256 in manifest.json"),
    (truncate, "model.pt has "),  # "<half> bytes where <all> were written (truncated"
    (garbage_state, "trainer_state.json is not readable JSON"),
    (missing_optimizer, "optimizer.pt is missing"),
    (incomplete, "trainer_state.json is missing (the save never finished)"),
    (missing_manifest, "manifest.json is missing"),
    (nan_score, "model.pt "),  # a new size or only a new sha256 (the pickle may differ)
]


@pytest.mark.parametrize(("damage", "message"), CASES, ids=[c[0].__name__ for c in CASES])
def test_damaged_newest_checkpoint_explicit_exits_2_latest_falls_back(
        assets, reference, tmp_path, capsys, damage, message):
    out = _copy(reference, tmp_path)
    newest = out / "checkpoints" / NEWEST
    damage(newest)
    before = sorted((p.relative_to(out), p.stat().st_size) for p in out.rglob("*"))
    capsys.readouterr()

    assert main(_args(assets, out, resume=str(newest))) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"capscale: checkpoint error: resume = {newest}: damaged "
                          "checkpoint: "), err
    assert message in err, err
    assert sorted((p.relative_to(out), p.stat().st_size) for p in out.rglob("*")) == before
    assert not (out / "config.yaml").exists()  # stopped before the run started

    assert main(_args(assets, out, resume="latest")) == 0
    logged = _text(capsys.readouterr().out)
    assert _text(f"checkpoint {newest} is damaged or incomplete, skipped: {message}") in logged
    assert _text(f"resumed from {out / 'checkpoints' / PREVIOUS} (step 21, epoch") in logged
    assert_same_run(reference, out)
    assert verify_checkpoint(newest).problem is None  # saved again, intact


def test_every_checkpoint_damaged_is_a_one_line_error(assets, reference, tmp_path, capsys):
    out = _copy(reference, tmp_path)
    truncate(out / "checkpoints" / NEWEST)
    missing_optimizer(out / "checkpoints" / PREVIOUS)
    assert main(_args(assets, out, resume="latest")) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"capscale: checkpoint error: resume = latest: no intact checkpoint "
                          f"in {out / 'checkpoints'} (2 damaged; the newest, {NEWEST}: "
                          "model.pt has "), err
    assert "were written (truncated or extended)" in err
    logged = _text(captured.out)
    assert _text(f"{PREVIOUS} is damaged or incomplete, skipped: optimizer.pt is missing") \
        in logged


def _reseal(ckpt: Path) -> None:
    """A new manifest for the files as they are now: as if the run had saved them."""
    (ckpt / MANIFEST_FILE).unlink()
    write_manifest(ckpt)


def test_nonfinite_score_saved_by_the_run_is_refused(assets, reference, tmp_path, capsys):
    """An intact checkpoint whose model.pt holds a NaN score (the manifest agrees)."""
    out = _copy(reference, tmp_path)
    newest = out / "checkpoints" / NEWEST
    nan_score(newest)
    _reseal(newest)
    assert verify_checkpoint(newest).problem is None
    assert main(_args(assets, out, resume="latest")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert (f"resume = {newest}: non-finite values restored: student: 1 NaN in parameter "
            "bert.encoder.layer.0.attention.self.query.mask_scores (its files match the "
            "manifest: the run saved them); resume from an earlier checkpoint (resume="
            f"{out / 'checkpoints' / PREVIOUS})") in err, err


def test_nonfinite_in_a_saved_entry_is_refused(assets, reference, tmp_path, capsys):
    out = _copy(reference, tmp_path)
    newest = out / "checkpoints" / NEWEST
    state = torch.load(newest / "objective.pt", weights_only=False)
    state["snc"]["vectors"][3, 0, 5] = float("inf")
    torch.save(state, newest / "objective.pt")
    _reseal(newest)
    assert main(_args(assets, out, resume=str(newest))) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "non-finite values restored: objective.pt: 1 Inf in snc.vectors (" in err, err


def _strip_manifest(ckpt: Path) -> None:
    """What a checkpoint written before manifests looks like."""
    (ckpt / MANIFEST_FILE).unlink()
    state = json.loads((ckpt / STATE_FILE).read_text())
    del state["manifest"]
    (ckpt / STATE_FILE).write_text(json.dumps(state))


def test_old_checkpoint_without_manifest_resumes_with_a_warning(assets, reference, tmp_path,
                                                                capsys):
    out = _copy(reference, tmp_path)
    for ckpt in list_checkpoints(out / "checkpoints"):
        _strip_manifest(ckpt)
    assert main(_args(assets, out, resume="latest")) == 0
    logged = _text(capsys.readouterr().out)
    assert _text(f"checkpoint {out / 'checkpoints' / NEWEST} has no manifest.json (written "
                 "before checkpoints carried one): its files cannot be verified") in logged
    assert _text(f"resumed from {out / 'checkpoints' / NEWEST} (step 24") in logged
    assert_same_run(reference, out)


@pytest.mark.parametrize(("damage", "message"), [
    (overwrite_4k, "non-finite values restored: student: 1024 NaN in parameter "
                   "bert.embeddings.position_embeddings.weight (it has no manifest"),
    (truncate, "student could not be restored from this unverified checkpoint "
               "(PytorchStreamReader failed"),
], ids=["overwrite_4k", "truncate"])
def test_old_checkpoint_damage_is_a_one_line_error(assets, reference, tmp_path, capsys,
                                                   damage, message):
    """Without a manifest nothing is verified, but a damaged file still never resumes
    silently (the issue's 4 KiB overwrite gave 1,024 NaN and no message)."""
    out = _copy(reference, tmp_path)
    newest = out / "checkpoints" / NEWEST
    _strip_manifest(newest)
    damage(newest)
    assert main(_args(assets, out, resume="latest")) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"capscale: checkpoint error: resume = {newest}: "), err
    assert message in err, err
    assert _text("has no manifest.json") in _text(captured.out)


def test_export_verifies_its_checkpoint_too(assets, reference, tmp_path, capsys):
    """``capscale export --checkpoint`` picks its checkpoint as a resume does."""
    out = _copy(reference, tmp_path)
    newest = out / "checkpoints" / NEWEST
    bit_flip(newest)
    assert main(["export", *_args(assets, out), "--checkpoint", str(newest)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"capscale: checkpoint error: --checkpoint {newest}: damaged "
                          "checkpoint: model.pt does not match its sha256"), err
    assert main(["export", *_args(assets, out), "--checkpoint", "latest"]) == 0
    assert _text(f"exported {out / 'checkpoints' / PREVIOUS} to {out / f'export-{PREVIOUS}'}") \
        in _text(capsys.readouterr().out)


# -- units -------------------------------------------------------------------------------
def test_manifest_lists_every_file_and_verification_is_shared_by_ranks(reference):
    ckpt = reference / "checkpoints" / NEWEST
    files = json.loads((ckpt / MANIFEST_FILE).read_text())["files"]
    on_disk = {p.name for p in ckpt.iterdir()} - {MANIFEST_FILE}
    assert set(files) == on_disk == {"model.pt", "optimizer.pt", "objective.pt",
                                     "rng_rank0.pt", STATE_FILE}
    shares = [verification_share(files, r, 3) for r in range(3)]
    assert sorted(n for s in shares for n in s) == sorted(files)
    assert shares[0] == ["optimizer.pt"]  # the largest file alone; the rest shared


def test_nonfinite_scan_allows_infinite_buffers_only():
    m = nn.Linear(3, 2)
    m.register_buffer("threshold", torch.tensor(float("-inf")))  # "keep everything"
    opt = torch.optim.AdamW(m.parameters())
    m(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert nonfinite(live_tensors([m, opt])) is None
    m.threshold.fill_(float("nan"))
    assert nonfinite(live_tensors([m, opt])) == "1 NaN in buffer threshold"
    m.threshold.fill_(0.0)
    opt.state[m.bias]["exp_avg"][1] = float("inf")
    assert nonfinite(live_tensors([m, opt])) == \
        "1 Inf in optimizer state exp_avg of parameter 0.1"
    with torch.no_grad():
        m.weight[0, 0] = float("-inf")
    assert nonfinite(live_tensors([m, opt])) == "1 Inf in parameter weight"


# -- two ranks ---------------------------------------------------------------------------
@pytest.mark.multiprocess
def test_two_ranks_skip_a_checkpoint_whose_rank_file_is_damaged(assets, tmp_path):
    """Rank 1 hashes its own files for the manifest, and verifies its share on resume."""
    out = tmp_path / "run"
    r = run(_args(assets, out), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = tmp_path / "ref"
    shutil.copytree(out, ref, ignore=shutil.ignore_patterns("checkpoints"))
    newest, previous = (p for p in reversed(list_checkpoints(out / "checkpoints")))
    assert (newest.name, previous.name) == ("step-00000012", "step-00000009")
    files = json.loads((newest / MANIFEST_FILE).read_text())["files"]
    assert {"rng_rank0.pt", "rng_rank1.pt", "model.pt"} <= set(files)
    with open(newest / "rng_rank1.pt", "r+b") as f:  # one bit of rank 1's RNG state
        f.seek(600)
        byte = f.read(1)[0]
        f.seek(600)
        f.write(bytes([byte ^ 1]))
    r = run(_args(assets, out, resume="latest"), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    logged = _text(r.stdout)
    assert _text(f"checkpoint {newest} is damaged or incomplete, skipped: rng_rank1.pt does "
                 "not match its sha256") in logged, logged[-3000:]
    assert _text(f"resumed from {previous} (step 9, epoch") in logged
    assert_same_run(ref, out)

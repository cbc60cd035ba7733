"""More formats of an export, each checked against the PyTorch export it came from.

:func:`write_formats` reads the export in ``out_dir`` (``model/``, loaded the way users
load it: ``AutoModelForSequenceClassification.from_pretrained``, with
``trust_remote_code`` for a structured export) and writes:

* ``onnx``: ``onnx/model.onnx`` (torch.onnx, dynamic batch and sequence axes); check:
  ONNX Runtime's logits on a batch within ``onnx_atol`` (max abs diff) of PyTorch's;
* ``int8``: ``onnx/model_int8.onnx``, ONNX Runtime dynamic quantisation (INT8 weights)
  of the ONNX model; check: max abs logit diff within ``int8_rtol`` x the largest
  |logit| of the batch, and the argmax agreement on it;
* ``sparse``: ``sparse/``, the unstructured export as bitmask + kept values
  (capscale.export.sparse); check: its logits after loading equal the dense
  export's (max abs diff within 1e-6), and its size next to the dense one.

With a dev set, the task metrics of the PyTorch, ONNX and INT8 models on it and the
argmax agreement of each with PyTorch are added. Everything goes to the export's
``sparsity_report.json`` under ``formats``, and the model card is rewritten.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from capscale.export.card import write_model_card

if TYPE_CHECKING:
    from capscale.tasks import Task

FORMATS = ("pytorch", "onnx", "int8", "sparse")
ONNX_ATOL = 1e-4  # fp32 ONNX Runtime vs PyTorch: max abs logit difference
INT8_RTOL = 0.1  # INT8 vs fp32: max abs logit difference / largest |logit|
SPARSE_ATOL = 1e-6  # sparse checkpoint vs dense: the same weights, so in practice 0
NEEDS = {"onnx": ("onnx", "onnxruntime", "onnxscript"), "int8": ("onnx", "onnxruntime")}


@dataclass
class DevSet:
    """The dev set the ONNX / INT8 models are scored on (batches with ``labels``)."""

    loader: Iterable[dict[str, torch.Tensor]]
    task: Task
    num_labels: int
    limit: int | None = None  # examples read (None: all)


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in batch.items() if k not in ("labels", "example_id")}


def load_export(model_dir: str | Path, trust_remote_code: bool = False) -> torch.nn.Module:
    """The exported model as users load it (float32, eval mode, CPU): the Auto class of
    the task model its config names (capscale.export.verify.reload_export)."""
    from capscale.export.verify import reload_export

    config = json.loads((Path(model_dir) / "config.json").read_text())
    arch = (config.get("architectures") or ["ForSequenceClassification"])[0]
    return reload_export(model_dir, arch, bool(config.get("auto_map")) or trust_remote_code)


@torch.no_grad()
def _dev_figures(model: torch.nn.Module, sessions: dict[str, Any], dev: DevSet
                 ) -> dict[str, Any]:
    from capscale.export.onnx_export import onnx_logits

    logits: dict[str, list[np.ndarray]] = {"pytorch": [], **{k: [] for k in sessions}}
    labels, n = [], 0
    for batch in dev.loader:
        inputs = _inputs(batch)
        logits["pytorch"].append(model(**inputs).logits.float().numpy())
        for name, session in sessions.items():
            logits[name].append(onnx_logits(session, inputs))
        labels.append(batch["labels"].cpu().numpy())
        n += len(labels[-1])
        if dev.limit and n >= dev.limit:
            break
    n = min(n, dev.limit or n)
    y = np.concatenate(labels)[:n]
    got = {k: np.concatenate(v)[:n] for k, v in logits.items()}
    out: dict[str, Any] = {"examples": n, "metrics": {
        k: {m: float(x) for m, x in dev.task.metrics(v, y, dev.num_labels).items()}
        for k, v in got.items()}}
    if dev.task.class_labels:
        ref = got["pytorch"].argmax(-1)
        out["agreement"] = {k: float((v.argmax(-1) == ref).mean())
                            for k, v in got.items() if k != "pytorch"}
    return out


def write_formats(out_dir: str | Path, formats: Iterable[str],
                  batch: dict[str, torch.Tensor] | None = None, dev: DevSet | None = None,
                  trust_remote_code: bool = False, onnx_atol: float = ONNX_ATOL,
                  int8_rtol: float = INT8_RTOL,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write ``formats`` (names from :data:`FORMATS`; ``int8`` implies ``onnx``) of the
    export in ``out_dir`` and check each; see the module doc.

    Args:
        out_dir: an export folder (``export_pruned`` / ``export_structured``).
        formats: the formats to write (``pytorch``, always there, is skipped).
        batch: model inputs the checks compare logits on (default: a random batch).
        dev: the dev set for task metrics (None: logits checks only).
        trust_remote_code: the base model ships its own modeling code.
        onnx_atol, int8_rtol: the tolerances of the ONNX and INT8 checks.
        log: progress lines (default: silent).

    Returns:
        the ``formats`` entry of the report: per format its path, bytes, figures and
        ``ok``; ``ok`` at the top when every check passed.
    """
    from capscale.export.onnx_export import sample_inputs as random_inputs

    out, say = Path(out_dir), log or (lambda _: None)
    formats = list(formats)
    asked = set(formats) | ({"onnx"} if "int8" in formats else set())
    if asked - set(FORMATS):
        raise ValueError(f"unknown export formats {sorted(asked - set(FORMATS))}; "
                         f"known: {', '.join(FORMATS)}")
    wanted = [f for f in FORMATS if f in asked]
    model = load_export(out / "model", trust_remote_code)
    batch = _inputs(batch) if batch is not None else random_inputs(model, 8, 32)
    with torch.no_grad():
        ref = model(**batch).logits.float().numpy()
    result: dict[str, Any] = {"check_batch": list(batch["input_ids"].shape)}
    sessions: dict[str, Any] = {}
    if "sparse" in wanted:
        result["sparse"] = _sparse(out, batch, ref, trust_remote_code, say)
    if "onnx" in wanted:
        result["onnx"] = _onnx(model, out, batch, ref, onnx_atol, sessions, say)
    if "int8" in wanted:
        result["int8"] = _int8(out, batch, ref, int8_rtol, sessions, say)
    if dev is not None and sessions:
        t0 = time.perf_counter()
        result["dev"] = {**_dev_figures(model, sessions, dev),
                         "seconds": time.perf_counter() - t0}
    result["ok"] = all(v.get("ok", True) for v in result.values() if isinstance(v, dict))
    report_file = out / "sparsity_report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    report["formats"] = result
    report_file.write_text(json.dumps(report, indent=1))
    write_model_card(out, report)
    return result


def _sparse(out: Path, batch: dict[str, torch.Tensor], ref: np.ndarray,
            trust_remote_code: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """The bitmask + values checkpoint, reloaded and compared with the export."""
    from capscale.export.sparse import write_sparse

    t0 = time.perf_counter()
    info = write_sparse(out / "model", out / "sparse")
    with torch.no_grad():
        got = load_export(out / "sparse", trust_remote_code)(**batch).logits.numpy()
    diff = float(np.abs(got - ref).max())
    say(f"sparse checkpoint: {info['bytes']:,} bytes (dense {info['dense_bytes']:,}, "
        f"{info['ratio']:.2f}x smaller), max |Δlogit| {diff:.1e}")
    return {"path": "sparse/", **info, "max_abs_diff": diff, "tolerance": SPARSE_ATOL,
            "ok": diff <= SPARSE_ATOL, "seconds": time.perf_counter() - t0}


def _onnx(model: torch.nn.Module, out: Path, batch: dict[str, torch.Tensor], ref: np.ndarray,
          atol: float, sessions: dict[str, Any], say: Callable[[str], None]
          ) -> dict[str, Any]:
    """fp32 ONNX, run in ONNX Runtime (its session joins ``sessions``) and compared."""
    from capscale.export.onnx_export import export_onnx, onnx_logits, onnx_session

    t0 = time.perf_counter()
    path = export_onnx(model, out / "onnx" / "model.onnx")
    sessions["onnx"] = onnx_session(path)
    diff = float(np.abs(onnx_logits(sessions["onnx"], batch) - ref).max())
    say(f"ONNX: {path} (max |Δlogit| {diff:.1e}, tolerance {atol:g})")
    return {"path": "onnx/model.onnx", "bytes": _bytes(path), "max_abs_diff": diff,
            "tolerance": atol, "ok": diff <= atol, "seconds": time.perf_counter() - t0}


def _int8(out: Path, batch: dict[str, torch.Tensor], ref: np.ndarray, rtol: float,
          sessions: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
    """INT8 ONNX (dynamic quantisation of the fp32 ONNX), checked relative to the
    logits' scale (its session joins ``sessions``)."""
    from capscale.export.onnx_export import onnx_logits, onnx_session, quantize_int8

    t0 = time.perf_counter()
    path = quantize_int8(out / "onnx" / "model.onnx", out / "onnx" / "model_int8.onnx")
    sessions["int8"] = onnx_session(path)
    got = onnx_logits(sessions["int8"], batch)
    diff, scale = float(np.abs(got - ref).max()), float(np.abs(ref).max())
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
    say(f"INT8 ONNX: {path} (max |Δlogit| {diff:.2e}, tolerance {rtol:g} x "
        f"{scale:.2f}; argmax agreement {100 * agree:.1f}%)")
    return {"path": "onnx/model_int8.onnx", "bytes": _bytes(path), "max_abs_diff": diff,
            "tolerance": rtol * scale, "rtol": rtol, "ok": diff <= rtol * scale,
            "argmax_agreement": agree, "seconds": time.perf_counter() - t0}


def _bytes(path: Path) -> int:
    data = Path(f"{path}.data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


__all__ = ["FORMATS", "DevSet", "load_export", "write_formats", "write_model_card"]

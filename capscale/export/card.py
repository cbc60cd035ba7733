"""The model card (``README.md``) written beside every export, as Hugging Face models
carry one: YAML front matter, then base model, task, method, sparsity, metrics, files
and how to load them.

Its facts come from the export's report (``sparsity_report.json``: the sparsity
figures, plus ``run`` from :func:`run_facts`, the run's ``results`` and the extra
formats' ``formats``) and from the exported ``config.json``; what is not known (an
export made outside a run) is left out rather than guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from capscale.tasks.embedding_model import is_sentence_folder

if TYPE_CHECKING:
    from capscale.config import Config

# Packaged model names -> the hub model they are a copy of.
HUB_NAMES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
METHODS = {
    "movement": "movement pruning (unstructured weight masks from learned scores, top-k)",
    "soft_movement": "soft movement pruning (unstructured; scores above a threshold, L1)",
    "magnitude": "magnitude pruning (unstructured; smallest weights removed)",
    "structured": "structured CAP-f pruning (attention heads and FFN neurons removed)",
    "hybrid": "hybrid pruning (movement scores on whole attention heads and FFN neurons, "
              "which are removed)",
    "none": "no pruning (distillation / contrastive terms only)",
}


def run_facts(cfg: Config) -> dict[str, Any]:
    """What the card says about the run that made a model (``report["run"]``)."""
    d = cfg.data
    dataset = d.preset or (f"{d.dataset_name}/{d.dataset_config}" if d.dataset_config
                           else d.dataset_name) or d.train_file
    return {"base_model": HUB_NAMES.get(cfg.model.name_or_path, cfg.model.name_or_path),
            "teacher": cfg.model.teacher, "task_type": d.task_type, "dataset": dataset,
            "method": cfg.pruning.method, "cap_mode": cfg.cap.mode,
            "cap_modules": {name: m.enabled for name, m in cfg.cap.modules.items()},
            "seed": cfg.train.seed}


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _files(out: Path, formats: dict[str, Any]) -> list[tuple[str, str, int, str]]:
    """(format, path, bytes, check) of every file set in the export folder."""
    rows = []
    weights = sum(_size(f) for f in (out / "model").glob("*.safetensors"))
    rows.append(("PyTorch (safetensors)", "model/", weights, "reference"))
    if (out / "masks.safetensors").is_file():
        rows.append(("pruning masks (uint8)", "masks.safetensors",
                     _size(out / "masks.safetensors"), "-"))
    for name, label, rel in (("sparse", "sparse bitmask + values", "sparse/"),
                             ("onnx", "ONNX fp32", "onnx/model.onnx"),
                             ("int8", "ONNX INT8 (dynamic quantisation)",
                              "onnx/model_int8.onnx")):
        if (out / rel).exists():
            info = formats.get(name, {})
            check = (f"max abs logit diff {info['max_abs_diff']:.2e} "
                     f"(tolerance {info['tolerance']:.2g})"
                     if "max_abs_diff" in info else "-")
            size = _size(out / rel) + _size(out / f"{rel}.data")
            if name == "sparse":
                size = _size(out / rel / "model.safetensors")
            rows.append((label, rel, size, check))
    return rows


def _sparsity_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [(label, f"{100 * r[key]:.2f}%") for key, label in (
        ("encoder_sparsity", "encoder sparsity (pruned / all encoder-layer weights)"),
        ("linear_sparsity", "prunable-matrix sparsity"),
        ("total_sparsity", "sparsity over all parameters"),
        ("head_sparsity", "attention heads removed"),
        ("ffn_sparsity", "FFN neurons removed")) if isinstance(r.get(key), float | int)]
    if "heads_per_layer" in r:
        rows.append(("heads kept per layer", " ".join(map(str, r["heads_per_layer"]))))
        rows.append(("FFN neurons kept per layer",
                     " ".join(map(str, r["intermediate_per_layer"]))))
    removed = r.get("removed_blocks") or {}
    if any(removed.values()):
        rows.append(("blocks removed (layer indices)",
                     f"attention {removed.get('attention', [])}, FFN {removed.get('ffn', [])}"
                     f", whole layers {r.get('removed_layers', [])}"))
    return rows


def _metric_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    results = r.get("results") or {}
    key = results.get("task_metric")
    rows = []
    if key:
        exported = (r.get("verified") or {}).get("metrics") or {}
        for name, value in (("dense teacher", (results.get("teacher_metrics") or {}).get(key)),
                            ("pruned model", exported.get(key, (results.get("pruned_metrics")
                                                                or {}).get(key)))):
            if value is not None:
                rows.append((f"{name} {key} (dev)", f"{value:.4f}"))
        verified = r.get("verified")
        if verified:
            rows.append(("export check", f"reloaded with transformers, max |Δoutput| "
                         f"{verified['max_abs_diff']:.1e} vs the pruned student on "
                         f"{verified['examples']} dev examples"))
    dev = (r.get("formats") or {}).get("dev") or {}
    for runtime, metrics in (dev.get("metrics") or {}).items():
        rows += [(f"{runtime} {k} (dev, {dev['examples']} examples)", f"{v:.4f}")
                 for k, v in metrics.items() if k == (key or k)]
    if "agreement" in dev:
        rows += [(f"argmax agreement with PyTorch: {k}", f"{100 * v:.2f}%")
                 for k, v in dev["agreement"].items()]
    return rows


# The Auto class of an export -> (pipeline tag, what the title calls the model, output).
KINDS = {"AutoModelForSequenceClassification": ("text-classification", "classifier", "logits"),
         "AutoModelForQuestionAnswering": ("question-answering", "question-answering model",
                                           "start_logits"),
         "AutoModelForTokenClassification": ("token-classification", "token classifier",
                                             "logits"),
         "AutoModel": ("feature-extraction", "encoder", "last_hidden_state")}


def _auto_class(config: dict[str, Any]) -> str:
    from capscale.export.auto import auto_class_name
    return auto_class_name((config.get("architectures") or ["ForSequenceClassification"])[0])


def _load_snippet(model_dir: Path, remote: bool, out: Path, auto: str) -> str:
    trust = ", trust_remote_code=True" if remote else ""
    if is_sentence_folder(model_dir):
        return "\n".join([
            "```python", "from sentence_transformers import SentenceTransformer", "",
            f'model = SentenceTransformer("{model_dir}"{trust})',
            'embeddings = model.encode(["an example", "another one"])', "```", "",
            f"With transformers alone: `AutoModel.from_pretrained(path{trust})`, then the "
            "pooling in `1_Pooling/config.json` (and L2 normalisation when `modules.json` "
            "lists `Normalize`)."])
    output = KINDS.get(auto, KINDS["AutoModelForSequenceClassification"])[2]
    lines = ["```python", f"from transformers import {auto}, AutoTokenizer", "",
             f'path = "{model_dir}"', "tokenizer = AutoTokenizer.from_pretrained(path)",
             f"model = {auto}.from_pretrained(path{trust})",
             f'{output} = model(**tokenizer(["an example"], return_tensors="pt")).{output}',
             "```"]
    if (out / "sparse").is_dir():
        lines += ["", "The sparse checkpoint (same weights, smaller file) loads with its "
                  "loader file:", "", "```python",
                  "model = AutoModelForSequenceClassification.from_pretrained("
                  f'"{out / "sparse"}", trust_remote_code=True)', "```"]
    onnx = [f for f in ("model.onnx", "model_int8.onnx") if (out / "onnx" / f).is_file()]
    if onnx:
        lines += ["", "ONNX Runtime (CPU):", "", "```python", "import onnxruntime as ort", "",
                  f'session = ort.InferenceSession("{out / "onnx" / onnx[-1]}", '
                  'providers=["CPUExecutionProvider"])',
                  'enc = tokenizer(["an example"], return_tensors="np")',
                  "names = {i.name for i in session.get_inputs()}",
                  'logits = session.run(["logits"], {k: v.astype("int64") '
                  "for k, v in enc.items() if k in names})[0]", "```"]
    return "\n".join(lines)


def model_card(out_dir: str | Path, report: dict[str, Any]) -> str:
    """The card text of the export in ``out_dir`` (its ``model/`` written)."""
    out = Path(out_dir).resolve()
    config = json.loads((out / "model" / "config.json").read_text())
    run = report.get("run") or {}
    method = run.get("method") or ("structured" if "heads_per_layer" in report else None)
    structured = "heads_per_layer" in report
    formats = report.get("formats") or {}
    tags = ["capscale", "pruning", "structured-pruning" if structured else "sparse"]
    tags += [method] if method and method not in tags else []
    tags += [t for t, f in (("onnx", "onnx/model.onnx"), ("int8", "onnx/model_int8.onnx"))
             if (out / f).is_file()]
    auto = _auto_class(config)
    sentence = is_sentence_folder(out / "model")
    tag, kind, _ = KINDS.get(auto, KINDS["AutoModelForSequenceClassification"])
    if sentence:
        tag, kind = "sentence-similarity", "sentence embedder"
    front: dict[str, Any] = {
        "library_name": "sentence-transformers" if sentence else "transformers",
        "pipeline_tag": tag, "tags": tags}
    if run.get("base_model"):
        front["base_model"] = run["base_model"]
    labels = config.get("id2label") or {}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {out.name}: a pruned {config.get('model_type', '')} {kind}", "",
             "Pruned with capscale (Contrastive Pruning, CAP).", "", "## Base model", "",
             f"`{run.get('base_model', config.get('_name_or_path') or 'unknown')}`"
             + (f" (fine-tuned teacher: `{run['teacher']}`)" if run.get("teacher") else ""),
             "", "## Task", "",
             f"{run.get('task_type', 'classification')}"
             + (f" on `{run['dataset']}`" if run.get("dataset") else "")
             + (f"; labels: {', '.join(str(v) for v in labels.values())}" if labels else ""),
             "", "## Method", "", f"{METHODS.get(method or '', method or 'unknown')}."]
    if run.get("cap_modules"):
        mods = ", ".join(f"{k} {'on' if v else 'off'}" for k, v in run["cap_modules"].items())
        lines.append(f"CAP contrastive modules ({run.get('cap_mode')} mode): {mods}.")
    lines += ["", "## Sparsity", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _sparsity_rows(report)]
    metrics = _metric_rows(report)
    if metrics:
        lines += ["", "## Metrics", "", "| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in metrics]
    lines += ["", "## Files", "", "| format | path | bytes | check against PyTorch |",
              "|---|---|---|---|"]
    lines += [f"| {a} | `{b}` | {c:,} | {d} |" for a, b, c, d in _files(out, formats)]
    lines += ["", "## How to load", "",
              _load_snippet(out / "model", bool(config.get("auto_map")), out, auto), ""]
    return "\n".join(lines)


def write_model_card(out_dir: str | Path, report: dict[str, Any]) -> Path:
    """Write the card to ``out_dir/model/README.md`` (and ``sparse/README.md`` when the
    sparse checkpoint is there); returns the first."""
    out = Path(out_dir)
    text = model_card(out, report)
    for folder in ("model", "sparse"):
        if (out / folder / "config.json").is_file():
            (out / folder / "README.md").write_text(text)
    return out / "model" / "README.md"

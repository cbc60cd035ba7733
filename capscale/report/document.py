"""The run report (markdown + HTML + PNG plots) and live experiment trackers.

``write_report(output_dir)`` reads what a run leaves behind (``history.jsonl``,
``evals.json``, ``results.json``, ``pruned/sparsity_report.json``, ``pruned/model``) and
writes ``report/report.md``, ``report/report.html`` and their plots: the sparsity
schedule, every loss component over steps, per-layer sparsity by matrix type, accuracy
against sparsity, the export's size and speed, and where the model sits on the
accuracy / speed frontier (capscale.report.placement). ``capscale report DIR`` re-runs it.

:class:`Trackers` forwards every step's record to accelerate's trackers (TensorBoard by
default); a tracker whose package is missing is skipped with a logged note.
"""

from __future__ import annotations

import html
import inspect
import json
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt
import numpy as np
import torch

from capscale.models.adapters import LOGICAL_ROLES
from capscale.report.results import collapse_summary, pruned_rows

NOT_LOSSES = ("step", "epoch", "lr", "examples_per_s", "sparsity", "loss")


def _read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def _history(out: Path) -> list[dict[str, Any]]:
    path = out / "history.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _save(fig: plt.Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_schedule(history: list[dict[str, Any]], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in history], [r["sparsity"] for r in history], lw=2)
    ax.set(xlabel="step", ylabel="target sparsity", title="Sparsity schedule", ylim=(0, 1))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def loss_names(history: list[dict[str, Any]]) -> list[str]:
    """Every loss component logged in the run, in first-seen order, then the total.

    Components can appear mid-run (SnC terms start with the first snapshot).
    """
    return [*dict.fromkeys(k for r in history for k in r if k not in NOT_LOSSES), "loss"]


def plot_losses(history: list[dict[str, Any]], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in history]
    names = loss_names(history)
    for name in names:
        ax.plot(steps, [r.get(name, np.nan) for r in history], label=name,
                lw=2.5 if name == "loss" else 1.2)
    ax.set(xlabel="step", ylabel="weighted loss", title="Loss components")
    if all(r.get(n, 1) > 0 for r in history for n in names if r.get(n) is not None):
        ax.set_yscale("log")  # components differ by orders of magnitude
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_layer_heatmap(per_matrix: dict[str, dict[str, Any]], path: Path) -> str:
    """Sparsity by encoder layer (rows) and matrix type (columns)."""
    layers = sorted({int(k.split(".", 1)[0]) for k in per_matrix})
    roles = [r for r in LOGICAL_ROLES if any(k.split(".", 1)[1] == r for k in per_matrix)]
    grid = np.full((len(layers), len(roles)), np.nan)
    for key, v in per_matrix.items():
        layer, role = key.split(".", 1)
        grid[layers.index(int(layer)), roles.index(role)] = v["sparsity"]
    fig, ax = plt.subplots(figsize=(1.2 * len(roles) + 2, 0.45 * len(layers) + 1.5))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(roles)), roles)
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set(xlabel="matrix", ylabel="layer", title="Sparsity per layer and matrix")
    for i in range(len(layers)):
        for j in range(len(roles)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if grid[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_accuracy(evals: list[dict[str, Any]], key: str, teacher: float | None,
                  path: Path) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([e["sparsity"] for e in evals], [e["metrics"][key] for e in evals], "o-",
            label="student")
    if teacher is not None:
        ax.axhline(teacher, ls="--", color="gray", label="dense teacher")
    ax.set(xlabel="target sparsity", ylabel=key, title=f"{key} against sparsity")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def export_figures(model_dir: Path, sparsity: dict[str, Any], batches: int,
                   seq_len: int = 64, batch_size: int = 8,
                   trust_remote_code: bool = False) -> list[tuple[str, str]]:
    """Size on disk, the size a sparse format would take, and forward latency
    (``trust_remote_code``: the run's model ships its own modeling code)."""
    rows = []
    files = list(model_dir.glob("*.safetensors"))
    dense = sum(f.stat().st_size for f in files)
    rows.append(("exported model (dense safetensors)", f"{dense / 2**20:.2f} MiB"))
    # A structured export is already physically smaller and needs its loader file.
    structured = (model_dir.parent / "structure.json").is_file()
    formats = sparsity.get("formats") or {}
    rows += _format_rows(formats)
    if not structured and "sparse" not in formats:
        pruned = sparsity.get("pruned_weights", 0)
        # CSR for the pruned matrices: a float32 value + an int32 column index per kept one.
        sparse = dense - 4 * pruned + 4 * (sparsity.get("prunable_weights", 0) - pruned)
        rows.append(("same with pruned matrices in CSR (estimate)",
                     f"{sparse / 2**20:.2f} MiB"))
    if batches <= 0 or not files:
        return rows
    import transformers

    from capscale.export.huggingface import auto_class_name

    config = json.loads((model_dir / "config.json").read_text())
    auto = getattr(transformers, auto_class_name((config.get("architectures") or [""])[0]))
    model = auto.from_pretrained(model_dir,
                                 trust_remote_code=structured or trust_remote_code).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator()
                        .manual_seed(0))
    with torch.inference_mode():
        model(input_ids=ids)  # warm-up
        t0 = time.perf_counter()
        for _ in range(batches):
            model(input_ids=ids)
    ms = 1000 * (time.perf_counter() - t0) / batches
    rows.append((f"forward latency, batch {batch_size} x {seq_len} tokens, CPU dense kernels",
                 f"{ms:.1f} ms ({batch_size * 1000 / ms:.0f} ex/s)"))
    return rows


def _format_rows(formats: dict[str, Any]) -> list[tuple[str, str]]:
    """The extra export formats (capscale.export.formats): size and check of each, and the
    dev-set scores of the ONNX / INT8 models next to the PyTorch one."""
    rows = []
    for name, label in (("sparse", "sparse checkpoint (bitmask + values)"),
                        ("onnx", "ONNX fp32"), ("int8", "ONNX INT8 (dynamic quantisation)")):
        f = formats.get(name)
        if f:
            rows.append((f"{label}: {f['path']}",
                         f"{f['bytes'] / 2**20:.2f} MiB; max abs logit diff "
                         f"{f['max_abs_diff']:.1e} (tolerance {f['tolerance']:.1e}, "
                         f"{'passed' if f['ok'] else 'FAILED'})"))
    dev = formats.get("dev") or {}
    for runtime, metrics in (dev.get("metrics") or {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        agree = (dev.get("agreement") or {}).get(runtime)
        rows.append((f"dev set ({dev['examples']} examples), {runtime}",
                     shown + (f"; argmax agreement {100 * agree:.1f}%" if agree is not None
                              else "")))
    return rows


def _trusts_remote_code(out: Path) -> bool:
    """Whether the run in ``out`` trusted its model's own code (its config.yaml says)."""
    import yaml

    path = out / "config.yaml"
    config = yaml.safe_load(path.read_text()) if path.is_file() else None
    model = config.get("model") if isinstance(config, dict) else None
    return bool(isinstance(model, dict) and model.get("trust_remote_code"))


def _results_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    key = results.get("task_metric", "accuracy")
    teacher = (results.get("teacher_metrics") or {}).get(key)
    rows = [(f"dense teacher {key}", f"{teacher:.4f}" if teacher is not None else "n/a"),
            *((name, f"{value:.4f}") for name, value in pruned_rows({"task_metric": key,
                                                                     **results}))]
    rows += [(k.replace("_", " "), f"{100 * v:.2f}%") for k, v in results["sparsity"].items()]
    verified = results.get("export_verified")
    if verified:
        rows.append(("export verified", f"max |Δoutput| {verified['max_abs_diff']:.1e} on "
                     f"{verified['examples']} dev examples (tolerance {verified['tolerance']:g})"))
    if results.get("collapse"):
        rows.append(("collapse detected", collapse_summary(results["collapse"])))
    rows += [("steps", str(results.get("steps"))),
             ("pruning time", f"{results.get('seconds', {}).get('pruning', 0):.0f} s")]
    rows += [(f"{phase.replace('_', ' ')} per step", f"{ms:.1f} ms")
             for phase, ms in results.get("phase_ms", {}).items()]
    return rows


def write_report(output_dir: str | Path, speed_batches: int = 5,
                 frontier: str | Path | None = None) -> Path:
    """Write ``<output_dir>/report/report.{md,html}`` and their PNG plots.

    ``frontier``: a bench/frontier.py results file; the report then times the export and
    the dense model at its shape (batch 32 x 128) and plots the run among its points.

    Returns:
        the markdown file.
    """
    out = Path(output_dir)
    dest = out / "report"
    dest.mkdir(parents=True, exist_ok=True)
    history, evals = _history(out), _read_json(out / "evals.json", [])
    results = _read_json(out / "results.json", None)
    sparsity = _read_json(out / "pruned" / "sparsity_report.json", {})
    sections: list[tuple[str, list[tuple[str, str]] | None, str | None]] = []
    if results:
        events = (results.get("collapse") or {}).get("events") or []
        if events:  # first: a collapsed run's other figures are not worth reading alone
            sections.append(("Warning: training collapse", [
                (f"step {e['step']}", e["message"]) for e in events], None))
        sections.append(("Result", _results_rows(results), None))
    if history:
        sections.append(("Sparsity schedule", None, plot_schedule(history,
                                                                   dest / "sparsity.png")))
        sections.append(("Loss components", None, plot_losses(history, dest / "losses.png")))
    if sparsity.get("per_matrix"):
        sections.append(("Per-layer sparsity", None, plot_layer_heatmap(
            sparsity["per_matrix"], dest / "layer_sparsity.png")))
    if evals:
        key = next(iter(evals[-1]["metrics"]))
        key = results["task_metric"] if results else key
        teacher = ((results or {}).get("teacher_metrics") or {}).get(key)
        sections.append((f"{key} against sparsity", None, plot_accuracy(
            evals, key, teacher, dest / "accuracy_vs_sparsity.png")))
    if (out / "pruned" / "model").is_dir():
        trust = _trusts_remote_code(out)
        sections.append(("Export", export_figures(out / "pruned" / "model", sparsity,
                                                  speed_batches, trust_remote_code=trust),
                         None))
        if results:
            from capscale.report.placement import placement
            rows, image = placement(out, results, out / "pruned" / "model", speed_batches,
                                    *((32, 128) if frontier else (8, 64)),
                                    frontier=Path(frontier) if frontier else None,
                                    plot_path=dest / "frontier.png", trust_remote_code=trust)
            sections.append(("Where this model sits", rows, image))
    md = dest / "report.md"
    md.write_text(_markdown(out.name, sections))
    (dest / "report.html").write_text(_html(out.name, sections))
    return md


def _markdown(title: str, sections: list) -> str:
    lines = [f"# capscale report: {title}", ""]
    for name, rows, image in sections:
        lines += [f"## {name}", ""]
        if rows:
            lines += ["| quantity | value |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in rows]
        if image:
            lines.append(f"![{name}]({image})")
        lines.append("")
    return "\n".join(lines)


def _html(title: str, sections: list) -> str:
    body = [f"<h1>capscale report: {html.escape(title)}</h1>"]
    for name, rows, image in sections:
        body.append(f"<h2>{html.escape(name)}</h2>")
        if rows:
            body.append("<table>" + "".join(
                f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                for k, v in rows) + "</table>")
        if image:
            body.append(f'<img src="{html.escape(image)}" alt="{html.escape(name)}">')
    style = ("body{font-family:sans-serif;max-width:900px;margin:auto}"
             "td{padding:2px 12px;border-bottom:1px solid #ddd}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>"
            f"{html.escape(title)}</title><style>{style}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")


class Trackers:
    """accelerate trackers fed with every step's record; missing ones are skipped.

    Args:
        names: tracker names (``tensorboard``, ``wandb``, ...).
        run_name: the run's name in the trackers.
        logging_dir: where file-based trackers write (``<output_dir>/tracking``).
        config: hyper-parameters to store with the run.
    """

    def __init__(self, names: list[str], run_name: str, logging_dir: str | Path,
                 config: dict[str, Any] | None = None) -> None:
        import accelerate.utils
        from accelerate import PartialState, tracking

        # accelerate's trackers ask its process state who the main process is; capscale
        # owns the process group, so the state just describes it (created on rank 0).
        PartialState()
        self.trackers: list[Any] = []
        self.notes: list[str] = []
        for name in names:
            cls = tracking.LOGGER_TYPE_TO_CLASS.get(name)
            if cls is None:
                self.notes.append(f"unknown tracker {name!r} (known: "
                                  f"{', '.join(tracking.LOGGER_TYPE_TO_CLASS)}); skipped")
                continue
            if not getattr(accelerate.utils, f"is_{name}_available", lambda: False)():
                self.notes.append(f"tracker {name!r} is not installed; skipped "
                                  f"(pip install {name} to enable it)")
                continue
            kwargs = {"logging_dir": str(logging_dir)} if "logging_dir" in inspect.signature(
                cls.__init__).parameters else {}
            tracker = cls(run_name, **kwargs)
            tracker.main_process_only = False  # capscale calls it on rank 0 only
            tracker.start()
            if config:
                tracker.store_init_configuration(_flat(config))
            self.trackers.append(tracker)

    def __call__(self, record: dict[str, Any]) -> None:
        values = {k: v for k, v in record.items() if k not in ("step", "epoch")}
        for t in self.trackers:
            t.log(values, step=record["step"])

    def finish(self) -> None:
        for t in self.trackers:
            t.finish()


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return out

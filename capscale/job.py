"""The whole pruning job, as ``capscale prune`` runs it: build -> setup -> train ->
finish (capscale.recipe), then ``results.json``, the report and the summary table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from capscale.checks import schedule_warning
from capscale.config import Config, config_to_dict, save_config
from capscale.console import Console
from capscale.distributed import DistContext
from capscale.recipe import CAPRecipe
from capscale.report.results import print_summary, write_results
from capscale.train.collapse import CollapseDetector
from capscale.train.hooks import LoopHook, RecordHook


def prune(cfg: Config, ctx: DistContext, console: Console, export: bool = True,
          teacher_metrics: dict[str, float] | None = None) -> dict[str, Any]:
    """The whole job. Returns the results.

    ``export=False`` skips writing the pruned model (benchmarks that only need metrics).
    ``teacher_metrics``: the given ``model.teacher``'s dev metrics when already known.
    """
    from capscale.report.document import (  # matplotlib: loaded only when reporting
        Trackers,
        write_report,
    )

    start = time.perf_counter()
    recipe = CAPRecipe(cfg, ctx, console, teacher_metrics)
    out = Path(cfg.output_dir)
    if ctx.is_main:
        save_config(cfg, out / "config.yaml")
    for note in recipe.data.notes:
        console.log(note)
    recipe.setup()
    warning = schedule_warning(cfg, recipe.total_steps)  # the length is known by now
    if warning is not None:
        recipe.data.notes.append(warning)
        console.log(warning)
    trackers = None
    if ctx.is_main and cfg.report.trackers:
        trackers = Trackers(cfg.report.trackers, out.name, out / "tracking",
                            config_to_dict(cfg))
        for note in trackers.notes:
            console.log(note)
    collapse = CollapseDetector.for_run(cfg.pruning, recipe.state, recipe.data, recipe.task,
                                        recipe.teacher_metrics, console.warn)
    hooks: list[LoopHook] = [collapse]
    if trackers is not None:
        hooks.append(RecordHook(trackers))
    try:
        recipe.train(hooks)
    finally:
        if trackers is not None:
            trackers.finish()
    if export and cfg.checkpoint.final:  # the export bakes masks into the student itself
        recipe.checkpointer.ensure_saved(recipe.state.step)
    results = recipe.finish(export)
    results["collapse"] = collapse.summary()
    results["seconds"]["total"] = time.perf_counter() - start
    if ctx.is_main:
        write_results(out, results)
        if cfg.report.enabled:
            console.log(f"report: {write_report(cfg.output_dir, cfg.report.speed_batches)}")
    cap = cfg.cap.enabled_modules()
    method = f"{cfg.pruning.method} + CAP ({', '.join(cap)})" if cap else cfg.pruning.method
    print_summary(console, results, method, out)
    return results

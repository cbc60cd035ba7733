"""Rank-zero logging, rich progress bars and summary tables.

Only the main process prints; other ranks get no-op bars, so loops need no rank checks.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console as RichConsole
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

logger = logging.getLogger("capscale")


class Console:
    """Everything capscale shows a user.

    Args:
        enabled: False on non-main ranks (prints nothing).
        progress: show progress bars (off in CI logs if desired).
    """

    def __init__(self, enabled: bool = True, progress: bool = True) -> None:
        self.enabled = enabled
        self.show_progress = progress and enabled
        self.rich = RichConsole(stderr=False, force_terminal=None,
                                width=None if sys.stdout.isatty() else 120)
        if enabled and not logger.handlers:
            handler = RichHandler(console=self.rich, show_path=False, markup=False)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False

    def log(self, msg: str, *args: Any) -> None:
        if self.enabled:
            logger.info(msg, *args)

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[ProgressBar]:
        """A progress bar with a free-text status field (loss components, sparsity...)."""
        if not self.show_progress:
            yield ProgressBar(None, None)
            return
        prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[status]}"), console=self.rich,
                        transient=False, refresh_per_second=2)
        with prog:
            task = prog.add_task(description, total=total, status="")
            yield ProgressBar(prog, task)

    def table(self, title: str, rows: list[tuple[str, str]]) -> None:
        if not self.enabled:
            return
        t = Table(title=title, show_header=True, header_style="bold")
        t.add_column("quantity")
        t.add_column("value", justify="right")
        for k, v in rows:
            t.add_row(k, v)
        self.rich.print(t)


class ProgressBar:
    """Handle to one bar; a no-op when progress is off."""

    def __init__(self, prog: Progress | None, task: Any) -> None:
        self.prog, self.task = prog, task

    def advance(self, n: int = 1, status: str | None = None) -> None:
        if self.prog is None:
            return
        if status is not None:
            self.prog.update(self.task, advance=n, status=status)
        else:
            self.prog.advance(self.task, n)


def format_losses(losses: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in losses.items())

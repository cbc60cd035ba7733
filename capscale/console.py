"""Rank-zero logging, rich progress bars and summary tables.

Only the main process prints; other ranks get no-op bars, so loops need no rank checks.

A bar on a terminal is rich's live bar. Where stdout is not a terminal (a Slurm output
file, nohup, CI) a live bar is never redrawn, so a user tailing the file would see
nothing until the loop ends: there every bar writes plain lines instead, one at its first
update, then one every ``progress_interval_s`` seconds (``CAPSCALE_PROGRESS_INTERVAL_S``,
default 30; 0: every update), and one at its last update::

    [2026-11-29 19:05:03] CAP pruning 120/1000 (12.0%) | sp=0.45 ce=0.31 ... 56 ex/s |
        3.21 it/s | elapsed 0:00:37 | left 0:04:34
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
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
INTERVAL_ENV = "CAPSCALE_PROGRESS_INTERVAL_S"
DEFAULT_INTERVAL_S = 30.0


class Console:
    """Everything capscale shows a user.

    Args:
        enabled: False on non-main ranks (prints nothing).
        progress: show progress bars (off in CI logs if desired).
        progress_interval_s: seconds between plain progress lines when stdout is not a
            terminal; None: ``$CAPSCALE_PROGRESS_INTERVAL_S`` or 30.
        clock: monotonic seconds for those intervals (tests pass a fake one).
    """

    def __init__(self, enabled: bool = True, progress: bool = True,
                 progress_interval_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = enabled
        self.show_progress = progress and enabled
        self.rich = RichConsole(stderr=False, force_terminal=None,
                                width=None if sys.stdout.isatty() else 120)
        if progress_interval_s is None:
            progress_interval_s = _interval_from_env()
        self.progress_interval_s = progress_interval_s
        self.clock = clock
        if enabled and not logger.handlers:
            handler = RichHandler(console=self.rich, show_path=False, markup=False)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False

    def log(self, msg: str, *args: Any) -> None:
        if self.enabled:
            logger.info(msg, *args)

    def warn(self, msg: str, *args: Any) -> None:
        """A line the user must not miss (logged at WARNING: its own colour and label;
        the handler renders no markup, so none is put in ``msg``)."""
        if self.enabled:
            logger.warning(msg, *args)

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[ProgressBar]:
        """A progress bar with a free-text status field (loss components, sparsity...)."""
        if not self.show_progress:
            yield ProgressBar(None, None)
            return
        if not self.rich.is_terminal:  # a file: plain lines at a steady interval
            lines = PlainProgress(description, total, self.progress_interval_s, self.clock,
                                  self._print_plain)
            try:
                yield ProgressBar(None, None, lines)
            finally:
                lines.close()
            return
        prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[status]}"), console=self.rich,
                        transient=False, refresh_per_second=2)
        with prog:
            task = prog.add_task(description, total=total, status="")
            yield ProgressBar(prog, task)

    def _print_plain(self, line: str) -> None:
        # No markup (statuses may hold brackets), no wrapping: one grep-able line each.
        self.rich.print(line, markup=False, highlight=False, soft_wrap=True)

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

    def __init__(self, prog: Progress | None, task: Any,
                 lines: PlainProgress | None = None) -> None:
        self.prog, self.task, self.lines = prog, task, lines

    def advance(self, n: int = 1, status: str | None = None) -> None:
        if self.lines is not None:
            self.lines.update(n, status)
        if self.prog is None:
            return
        if status is not None:
            self.prog.update(self.task, advance=n, status=status)
        else:
            self.prog.advance(self.task, n)


class PlainProgress:
    """Progress as plain lines: the first update, then one per ``interval_s``, the last.

    The rate counts only steps advanced after the first update, so a loop that resumes
    (its first advance jumps to the restored step) reports its real speed.
    """

    def __init__(self, description: str, total: int, interval_s: float,
                 clock: Callable[[], float], write: Callable[[str], None]) -> None:
        self.description, self.total, self.interval_s = description, total, interval_s
        self.clock, self.write = clock, write
        self.completed, self.status = 0, ""
        self.start = clock()
        self.first: tuple[float, int] | None = None  # (time, completed) at the first update
        self.last_line_at = 0.0
        self.shown = -1  # completed count of the last line written

    def update(self, n: int, status: str | None) -> None:
        self.completed += n
        if status is not None:
            self.status = status
        now = self.clock()
        if self.first is None:
            self.first = (now, self.completed)
            self._line(now)
        elif now - self.last_line_at >= self.interval_s or (
                self.completed >= self.total > self.shown):
            self._line(now)

    def close(self) -> None:
        """The last update, unless it was already written."""
        if self.first is not None and self.shown != self.completed:
            self._line(self.clock())

    def _line(self, now: float) -> None:
        assert self.first is not None
        t0, c0 = self.first
        elapsed = now - self.start
        parts = [f"{self.description} {self.completed}/{self.total}"
                 + (f" ({100 * self.completed / self.total:.1f}%)" if self.total > 0 else "")]
        if self.status:
            parts.append(self.status)
        done, span = self.completed - c0, now - t0
        if done > 0 and span > 0:
            rate = done / span
            parts.append(f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.2f} s/it")
            parts.append(f"elapsed {_hms(elapsed)}")
            if self.total > self.completed:
                parts.append(f"left {_hms((self.total - self.completed) / rate)}")
        else:
            parts.append(f"elapsed {_hms(elapsed)}")
        self.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] " + " | ".join(parts))
        self.last_line_at, self.shown = now, self.completed


def _interval_from_env() -> float:
    # A typo in a job script's environment must not stop the run: fall back to 30 s.
    try:
        value = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S))
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if value >= 0 else DEFAULT_INTERVAL_S


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_losses(losses: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in losses.items())

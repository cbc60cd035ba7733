"""Console progress where stdout is not a terminal: plain lines at a steady interval."""

from __future__ import annotations

import io
import re

from rich.console import Console as RichConsole

from capscale.console import Console


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _lines(text: str) -> list[str]:
    # Drop the wall-clock stamp, which the fake clock does not drive.
    return [re.sub(r"^\[[\d: -]+\] ", "", line) for line in text.splitlines() if line]


def test_plain_lines_first_every_interval_and_last(capsys):
    clock = FakeClock()
    console = Console(progress_interval_s=30, clock=clock)
    with console.progress("CAP pruning", 100) as bar:
        bar.advance(0)
        for i in range(1, 101):  # one step per second
            clock.t = float(i)
            bar.advance(1, f"sp={i / 100:.2f} ce=0.500 64 ex/s")
    lines = _lines(capsys.readouterr().out)
    assert lines == [
        "CAP pruning 0/100 (0.0%) | elapsed 0:00:00",
        "CAP pruning 30/100 (30.0%) | sp=0.30 ce=0.500 64 ex/s | 1.00 it/s | elapsed 0:00:30"
        " | left 0:01:10",
        "CAP pruning 60/100 (60.0%) | sp=0.60 ce=0.500 64 ex/s | 1.00 it/s | elapsed 0:01:00"
        " | left 0:00:40",
        "CAP pruning 90/100 (90.0%) | sp=0.90 ce=0.500 64 ex/s | 1.00 it/s | elapsed 0:01:30"
        " | left 0:00:10",
        "CAP pruning 100/100 (100.0%) | sp=1.00 ce=0.500 64 ex/s | 1.00 it/s"
        " | elapsed 0:01:40",
    ]


def test_resumed_loop_rate_and_last_line_on_early_exit(capsys):
    """A resumed loop jumps to its step first; the rate counts only later steps. A loop
    that stops short of its total still gets its last state written on exit."""
    clock = FakeClock()
    console = Console(progress_interval_s=1000, clock=clock)
    with console.progress("bank snc (train)", 100) as bar:
        bar.advance(50)
        for _ in range(10):
            clock.t += 2.0
            bar.advance(1)
    lines = _lines(capsys.readouterr().out)
    assert lines == ["bank snc (train) 50/100 (50.0%) | elapsed 0:00:00",
                     "bank snc (train) 60/100 (60.0%) | 2.00 s/it | elapsed 0:00:20"
                     " | left 0:01:20"]


def test_interval_from_environment_and_quiet_cases(capsys, monkeypatch):
    monkeypatch.setenv("CAPSCALE_PROGRESS_INTERVAL_S", "0")
    clock = FakeClock()
    with Console(clock=clock).progress("x", 3) as bar:
        for _ in range(3):
            clock.t += 1
            bar.advance()
    assert len(_lines(capsys.readouterr().out)) == 3  # interval 0: every update
    monkeypatch.setenv("CAPSCALE_PROGRESS_INTERVAL_S", "soon")
    assert Console().progress_interval_s == 30.0  # a bad value falls back, no crash
    for console in (Console(enabled=False, clock=clock), Console(progress=False, clock=clock)):
        with console.progress("x", 3) as bar:
            bar.advance(3, "status")
    assert capsys.readouterr().out == ""


def test_terminal_keeps_the_rich_bar():
    console = Console(progress_interval_s=0)
    buf = io.StringIO()
    console.rich = RichConsole(file=buf, force_terminal=True, width=100)
    with console.progress("CAP pruning", 4) as bar:
        assert bar.lines is None and bar.prog is not None
        for _ in range(4):
            bar.advance(1, "sp=0.10")
    out = buf.getvalue()
    assert "CAP pruning" in out and "4/4" in out
    assert "it/s" not in out  # no plain lines on a terminal

"""Showing the progress of a run's steps: a rich bar, sparse plain lines, or nothing.

One step runs at a time (preprocessing, training, scoring, reports, group level). Every
reporter writes a plain line per step to the run's log (``logs/run-*.log``) through the
``bids_anomaly.progress`` logger; the console sees

- ``rich``: a live bar on stderr (a terminal), with N/M, details and the ETA;
- ``plain``: short lines on stderr (pipes, batch logs): the start, then at most one line
  per ``interval_s`` or per quarter of the step, and the end;
- ``quiet``: nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from ..core.config import ProgressConfig

LOG = logging.getLogger("bids_anomaly.progress")


def format_duration(seconds: float) -> str:
    """Seconds as MM:SS, or H:MM:SS from an hour up."""
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


@dataclass
class StepState:
    """What a step shows: ``done`` of ``total`` (None: unknown), details and the ETA."""

    title: str
    total: float | None = None
    unit: str = ""
    done: float = 0
    count: str = ""  # e.g. "3/10 scans" or "fold 2/3 · epoch 4/30"; derived when empty
    info: str = ""
    eta_s: float | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return min(1.0, max(0.0, self.done / self.total))

    def counter(self) -> str:
        if self.count:
            return self.count
        if self.total is None:
            return ""
        return f"{int(self.done)}/{int(self.total)}" + (f" {self.unit}" if self.unit else "")

    def line(self) -> str:
        """The step on one line (plain output and the log)."""
        parts = [p for p in (self.counter(), self.info) if p]
        if self.eta_s is not None:
            parts.append(f"ETA {format_duration(self.eta_s)}")
        parts.append(f"elapsed {format_duration(time.monotonic() - self.started)}")
        return f"{self.title}: " + " · ".join(parts)


class Step(Protocol):
    """A running step; ``update`` may be called from any thread."""

    state: StepState

    def update(self, **changes: object) -> None: ...

    def close(self, summary: str | None = None) -> None: ...


class _BaseStep:
    def __init__(self, state: StepState):
        self.state = state
        self._lock = threading.Lock()
        self._closed = False
        LOG.info("%s: started%s", state.title, f" ({state.counter()})" if state.total else "")

    def update(self, **changes: object) -> None:
        with self._lock:
            if self._closed:
                return
            for k, v in changes.items():
                setattr(self.state, k, v)
            self._show()

    def close(self, summary: str | None = None) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.state.eta_s = None
            text = summary or self.state.line()
            took = format_duration(time.monotonic() - self.state.started)
            final = f"{self.state.title}: done · {text} · took {took}" if summary else (
                f"{text} · done")
            LOG.info("%s", final)
            self._finish(final)

    def _show(self) -> None:
        pass

    def _finish(self, line: str) -> None:
        pass


class QuietStep(_BaseStep):
    """Nothing on the console; start and end in the log."""


class PlainStep(_BaseStep):
    """Line-oriented output for pipes and batch logs: short, one line at a time."""

    def __init__(self, state: StepState, stream, interval_s: float):
        self._stream, self._interval = stream, interval_s
        self._last = time.monotonic()
        self._quarter = 0
        super().__init__(state)
        self._print(f"{state.title}: started" + (f" ({state.counter()})" if state.total
                                                  else ""))

    def _print(self, text: str) -> None:
        try:
            self._stream.write(text + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def _show(self) -> None:
        now = time.monotonic()
        frac = self.state.fraction
        quarter = int(frac * 4) if frac is not None else self._quarter
        if (quarter > self._quarter and quarter < 4) or now - self._last >= self._interval:
            self._quarter = max(self._quarter, quarter)
            self._last = now
            line = self.state.line()
            LOG.info("%s", line)
            self._print(line)

    def _finish(self, line: str) -> None:
        self._print(line)


class RichStep(_BaseStep):
    """A live rich bar on stderr; the final line stays on screen."""

    def __init__(self, state: StepState, console):
        from rich.progress import BarColumn, Progress, TextColumn

        super().__init__(state)
        self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=28),
                             TextColumn("{task.fields[count]}"),
                             TextColumn("[dim]{task.fields[info]}"),
                             TextColumn("{task.fields[eta]}"), console=console,
                             transient=True, refresh_per_second=4)
        self._task = self._bar.add_task(state.title, total=None, count="", info="", eta="")
        self._bar.start()
        self._show()

    def _show(self) -> None:
        s = self.state
        frac = s.fraction
        eta = f"ETA {format_duration(s.eta_s)}" if s.eta_s is not None else "ETA --:--"
        self._bar.update(self._task, total=None if frac is None else 1000,
                         completed=0 if frac is None else int(frac * 1000),
                         count=s.counter(), info=s.info, eta=eta)

    def _finish(self, line: str) -> None:
        self._bar.stop()
        self._bar.console.print(f"[green]✓[/] {line}", highlight=False, soft_wrap=True)


def resolve_mode(cfg: ProgressConfig, stream=None) -> str:
    """``auto`` → ``rich`` on a terminal (not TERM=dumb), else ``plain``."""
    if cfg.mode != "auto":
        return cfg.mode
    stream = stream or sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return "rich" if tty and os.environ.get("TERM", "") != "dumb" else "plain"


class Reporter:
    """Makes the steps of one run, all in the mode ``cfg`` asks for."""

    def __init__(self, cfg: ProgressConfig | None = None):
        self.cfg = cfg or ProgressConfig()
        self.mode = resolve_mode(self.cfg)
        self._console = None

    def step(self, title: str, total: float | None = None, unit: str = "") -> Step:
        state = StepState(title, total, unit)
        if self.mode == "rich":
            if self._console is None:
                from rich.console import Console

                self._console = Console(stderr=True, highlight=False)
            return RichStep(state, self._console)
        if self.mode == "plain":
            return PlainStep(state, sys.stderr, self.cfg.interval_s)
        return QuietStep(state)

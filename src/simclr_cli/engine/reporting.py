"""Metrics to ``metrics.jsonl`` (and the trackers) and progress to the screen (rich bar or plain lines)."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn


class MetricsLog:
    """Append-only JSON lines, flushed per line; only the main process writes (and calls ``track``)."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None = None,
                 track: Callable[[dict[str, float], int], None] | None = None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        # The experiment trackers (engine/trackers.py), given each record's numbers after the line is written.
        self.track = track if enabled else None
        if enabled and keep_until_step is not None and self.path.exists():
            # Resuming: drop lines logged after the saved state, they will be logged again.
            kept = [ln for ln in self.path.read_text().splitlines() if _step_of(ln, default=None) is not None
                    and _step_of(ln) <= keep_until_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif enabled and keep_until_step is None:
            self.path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # disk full mid-run: name the file (the saved states are intact)
            from simclr_cli.errors import from_os_error

            err = from_os_error(e, self.path)
            if err is None:
                raise
            raise err from e
        if self.track is not None:
            from simclr_cli.engine.trackers import scalars

            values = scalars(record, skip=("step", "epoch", "time"))
            if values:
                self.track(values, int(record.get("step", 0)))


def _step_of(line: str, default: int | None = 0) -> int | None:
    """The step of a metrics line; None for a torn or empty line (a crash mid-write)."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return default


def format_duration(seconds: float) -> str:
    """``45s``, ``3m12s``, ``2h05m``: a remaining time at the precision a person plans with."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def finish_time(remaining: float, now: datetime | None = None) -> str:
    """The clock time ``remaining`` seconds from now: ``14:32``, with the day when it is not today."""
    now = now or datetime.now()
    end = now + timedelta(seconds=max(remaining, 0.0))
    return end.strftime("%H:%M") if end.date() == now.date() else end.strftime("%a %d %b %H:%M")


class Eta:
    """The remaining time of a stage from its pace so far: wall time per step (the kNN monitor and other hooks
    included, since the user waits for them too), measured from the first step reported, so that setup and the
    first batches' warm-up do not count, except for the first estimate, which has nothing else to go on."""

    def __init__(self, total: int, done: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.clock = total, clock
        self.start = (clock(), done)
        self.ref: tuple[float, int] | None = None

    def remaining(self, step: int) -> float | None:
        """Seconds still to go after ``step``; None before any step was measured."""
        now = self.clock()
        t_ref, s_ref = self.ref if self.ref is not None else self.start
        if step <= s_ref or now <= t_ref:
            return None
        if self.ref is None:
            self.ref = (now, step)
        return (self.total - step) * (now - t_ref) / (step - s_ref)


class ProgressDisplay:
    """One rich progress bar on a terminal; plain log lines when stdout is not a terminal. Both show the
    percent done and the remaining time with the expected finish time (:class:`Eta`); the first estimate is
    also said once, as a line of its own, so that a newcomer knows how long to wait."""

    def __init__(self, total: int, done: int, enabled: bool, description: str, unit: str = "steps",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = enabled
        self.total, self.description, self.unit = max(total, 1), description, unit
        self.eta = Eta(total, done, clock)
        self.estimated = False
        self._stderr = sys.stderr  # before the bar starts (a live bar redirects sys.stderr into itself)
        self.console = Console(file=sys.stdout)
        self.rich = enabled and self.console.is_terminal
        self.progress: Progress | None = None
        if self.rich:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[eta]}"),
                console=self.console,
            )
            self.task = self.progress.add_task(description, total=total, completed=done, info="", eta="")
            self.progress.start()

    def update(self, step: int, info: str, line: str | None = None) -> None:
        """Step ``step`` is done: the bar moves, or ``line`` is printed with the percent and the ETA after it."""
        if not self.enabled:
            return
        remaining = self.eta.remaining(step)
        eta = ""
        if remaining is not None and step < self.total:
            eta = f"eta {format_duration(remaining)} (finish ~{finish_time(remaining)})"
            if not self.estimated:
                self.estimated = True
                self.message(f"{self.description}: about {format_duration(remaining)} to go for the remaining "
                             f"{self.total - step} of {self.total} {self.unit} at the pace so far; expected to finish at "
                             f"{finish_time(remaining)}")
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info, eta=eta)
        elif line:
            print(f"{line} | {100 * step / self.total:.0f}%" + (f" {eta}" if eta else ""), flush=True)

    def message(self, text: str) -> None:
        """A line above the bar (or a plain line). Warnings go to stderr, like the unreadable-image ones;
        other lines to stdout."""
        if not self.enabled:
            return
        warning = text.startswith("warning:")
        if warning and not (self.progress is not None and self._stderr.isatty()):
            print(text, file=self._stderr, flush=True)
        elif self.progress is not None:
            self.progress.console.print(text)  # a warning too when stderr is this screen: keeps the bar intact
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()

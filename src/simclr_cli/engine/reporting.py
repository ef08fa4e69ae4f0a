"""Metrics to ``metrics.jsonl`` (and the trackers) and progress to the screen (rich bar or plain lines)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


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


class ProgressDisplay:
    """One rich progress bar on a terminal; plain log lines when stdout is not a terminal."""

    def __init__(self, total: int, done: int, enabled: bool, description: str) -> None:
        self.enabled = enabled
        self._stderr = sys.stderr  # before the bar starts (a live bar redirects sys.stderr into itself)
        self.console = Console(file=sys.stdout)
        self.rich = enabled and self.console.is_terminal
        self.progress: Progress | None = None
        if self.rich:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.progress.add_task(description, total=total, completed=done, info="")
            self.progress.start()

    def update(self, step: int, info: str, line: str | None = None) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)
        elif line:
            print(line, flush=True)

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

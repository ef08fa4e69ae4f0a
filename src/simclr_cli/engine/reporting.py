"""Metrics to ``metrics.jsonl`` and progress to the screen (rich bar on a terminal, plain lines otherwise)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class MetricsLog:
    """Append-only JSON lines, flushed per line; only the main process writes."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None = None,
                 tensorboard: bool = False) -> None:
        self.path = Path(path)
        self.enabled = enabled
        # Optional TensorBoard event files beside metrics.jsonl (the ``tensorboard`` extra).
        self.writer = tensorboard_writer(self.path.parent / "tensorboard") if enabled and tensorboard else None
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
        if self.writer is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if k not in ("step", "epoch", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()


def require_tensorboard(enabled: bool) -> None:
    """Fail before any work is done (or replaced) when TensorBoard is asked for but not installed."""
    if enabled:
        tensorboard_writer(None)


def tensorboard_writer(folder: Path | None):
    """A TensorBoard ``SummaryWriter`` for ``folder``; a clear error when the extra is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from simclr_cli.errors import UsageError

        raise UsageError("tensorboard = true needs TensorBoard: pip install 'simclr-cli[tensorboard]' "
                         "(or set tensorboard = false)") from None
    return SummaryWriter(log_dir=str(folder)) if folder is not None else None


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

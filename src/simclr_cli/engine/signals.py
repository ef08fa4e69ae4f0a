"""Ctrl-C / SIGTERM: ask the loop to save state and stop at the next step boundary."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Iterator


class StopRequest:
    """A flag set by SIGINT or SIGTERM while active. A second Ctrl-C stops at once.

    ``immediate``: the first signal already stops at once (raises ``KeyboardInterrupt``), for work
    with no step boundary to stop at, or once the state is saved (see :meth:`immediately`).
    While :meth:`shielded`, signals are only recorded (for short clean-ups that must not be cut).
    """

    def __init__(self, immediate: bool = False) -> None:
        self.requested = False
        self.signal_name = ""
        self.immediate = immediate
        self._shielded = 0
        self._pending = False  # a stop-at-once that arrived while shielded
        self._previous: dict[int, object] = {}
        self._depth = 0  # re-entrant: a stage may hold it while the loop enters it again

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        at_once = self.immediate or (self.requested and signum == signal.SIGINT)
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        if at_once:
            if self._shielded:
                self._pending = True
            else:
                raise KeyboardInterrupt

    @contextmanager
    def immediately(self) -> Iterator["StopRequest"]:
        """Within the block a signal stops at once; one that arrived before stops on entry."""
        previous, self.immediate = self.immediate, True
        try:
            if self.requested and not self._shielded:
                raise KeyboardInterrupt
            yield self
        finally:
            self.immediate = previous

    @contextmanager
    def shielded(self, deliver: bool = True) -> Iterator["StopRequest"]:
        """Within the block a signal is only recorded; one that should have stopped at once does so at the
        end of the block (unless ``deliver`` is false)."""
        self._shielded += 1
        try:
            yield self
        finally:
            self._shielded -= 1
        if deliver and not self._shielded and self._pending:
            self._pending = False
            raise KeyboardInterrupt

    def __enter__(self) -> "StopRequest":
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

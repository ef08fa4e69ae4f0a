"""``simclr`` with a test-only gate, for the group-SIGTERM tests (tests/stages/test_preemption.py).

    python preempt_worker.py SIMCLR-ARGS...

After the first metrics line is written, the main process waits (polling, at most 10 minutes) until it has received
SIGTERM or SIGINT, so the test's signal always lands in the middle of the run, whatever the speed of the machine.
Nothing else is changed: the signal handlers, the DataLoader workers and the loop are the real ones.
"""

import signal
import sys
import time

from simclr_cli.engine import reporting, signals

got: list[int] = []
handle = signals.StopRequest._handle


def noting_handle(self, signum, frame):
    got.append(signum)
    return handle(self, signum, frame)


signals.StopRequest._handle = noting_handle
write = reporting.MetricsLog.write


def write_then_wait(self, record):
    write(self, record)
    if self.enabled and "loss" in record and not getattr(self, "_gated", False):
        self._gated = True
        deadline = time.monotonic() + 600
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)


reporting.MetricsLog.write = write_then_wait

from simclr_cli.cli import app  # noqa: E402

app(sys.argv[1:], prog_name="simclr")

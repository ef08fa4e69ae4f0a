"""Test-only faults for the preemption and several-node tests (tests/stages/test_preemption.py,
tests/stages/test_elastic.py), loaded by every Python process that has this folder on PYTHONPATH (the command,
``accelerate launch``, torchrun and its workers).

``SIMCLR_TEST_HOLD_RANK=R``: the worker of rank R never starts its command (it sleeps, as a process stuck before
joining the process group would), so the other ranks wait for it.

``SIMCLR_TEST_KILL_RANK1_AT_SAVE=N``: the worker of rank 1 SIGKILLs itself right after its N-th saved state, once
per launch (a file ``SIMCLR_TEST_KILL_MARK`` records it; the restarted group runs unharmed).

``SIMCLR_TEST_GATE=1``:
After the first metrics line is written, the main process waits (polling, at most 10 minutes) until it has received
SIGTERM or SIGINT, so the test's signal always lands in the middle of the run, whatever the speed of the machine.
Nothing else is changed: the signal handlers, the DataLoader workers and the loop are the real ones.
"""

import importlib.abc
import importlib.util
import os
import sys
import time

TARGETS = ("simclr_cli.engine.signals", "simclr_cli.engine.reporting", "simclr_cli.stages.scaffold")
got: list[int] = []


def _patch(module) -> None:
    if module.__name__ == "simclr_cli.stages.scaffold":
        at = int(os.environ.get("SIMCLR_TEST_KILL_RANK1_AT_SAVE", "0") or 0)
        mark = os.environ.get("SIMCLR_TEST_KILL_MARK", "")
        if not at or os.environ.get("RANK") != "1" or not mark or os.path.exists(mark):
            return
        import signal

        commit = module.StageRun.commit
        saves = []

        def commit_then_die(self):
            commit(self)
            saves.append(1)
            if len(saves) == at:
                open(mark, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)

        module.StageRun.commit = commit_then_die
    elif os.environ.get("SIMCLR_TEST_GATE") != "1":
        return
    elif module.__name__ == "simclr_cli.engine.signals":
        handle = module.StopRequest._handle

        def noting_handle(self, signum, frame):
            got.append(signum)
            return handle(self, signum, frame)

        module.StopRequest._handle = noting_handle
    else:
        write = module.MetricsLog.write

        def write_then_wait(self, record):
            write(self, record)
            if self.enabled and "loss" in record and not getattr(self, "_gated", False):
                self._gated = True
                deadline = time.monotonic() + 600
                while not got and time.monotonic() < deadline:
                    time.sleep(0.01)

        module.MetricsLog.write = write_then_wait


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if os.environ.get("SIMCLR_TEST_GATE") == "1" or os.environ.get("SIMCLR_TEST_KILL_RANK1_AT_SAVE"):
    sys.meta_path.insert(0, _Finder())
if os.environ.get("SIMCLR_TEST_HOLD_RANK") and os.environ.get("RANK") == os.environ["SIMCLR_TEST_HOLD_RANK"]:
    while True:
        time.sleep(1)

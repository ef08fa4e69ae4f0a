"""One writer per stage folder (issue 15, section 2): OUT/.STAGE.lock, taken atomically, flocked by its holder.

A second command refuses at once naming the holder (exit 2); a lock left by a dead process is taken over with a
line saying so; the lock goes away at the end of a run, on errors and on interrupts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from simclr_cli.checkpoints.lock import EXIT_LOCKED, RunLock, RunLocked, lock_path
from simclr_cli.cli import app

QUICK = ["-q", "--set", "pretrain.knn_every=0", "--set", "pretrain.epochs=1"]
HOLDER = """
import sys
from simclr_cli.checkpoints.lock import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path):
    """A live process holding the lock of OUT/pretrain, until killed."""
    procs = []

    def start(stage_dir):
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(stage_dir)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "held"  # synchronised on its line, not a sleep
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_a_second_lock_in_the_same_process_is_refused_naming_the_first(tmp_path):
    first = RunLock(tmp_path / "pretrain")
    first.acquire()
    try:
        with pytest.raises(RunLocked) as e:
            RunLock(tmp_path / "pretrain").acquire()
        msg = str(e.value)
        assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg and "started " in msg
        assert "\n" not in msg and e.value.exit_code == EXIT_LOCKED == 2
    finally:
        first.release()
    assert not lock_path(tmp_path / "pretrain").exists()
    with RunLock(tmp_path / "pretrain"):  # free again
        pass


def test_second_command_refuses_at_once_naming_the_other_process(tiny_recipe_file, tmp_path, holder):
    out = tmp_path / "run"
    p = holder(out / "pretrain")
    r = CliRunner().invoke(app, ["pretrain", str(tiny_recipe_file), "--out", str(out), *QUICK])
    assert r.exit_code == EXIT_LOCKED, r.output
    line = r.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("error: ")
    assert f"pid {p.pid} on {socket.gethostname()}, started " in line and "--out DIR" in line
    assert not (out / "pretrain").exists()  # nothing written: refused before any work
    p.kill()
    p.wait()
    # The holder died without releasing: its flock went with it, so the next command takes the lock over.
    r = CliRunner().invoke(app, ["pretrain", str(tiny_recipe_file), "--out", str(out), *QUICK])
    assert r.exit_code == 0, r.output
    assert f"took over the lock of {out / 'pretrain'} left by pid {p.pid}" in r.stderr
    assert (out / "pretrain" / "model.safetensors").exists()
    assert not lock_path(out / "pretrain").exists()  # released at the end


def test_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that existed and is gone
    path = lock_path(tmp_path / "pretrain")
    path.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "start": "yesterday"}))
    lines = []
    lock = RunLock(tmp_path / "pretrain", say=lines.append)
    lock.acquire()
    assert lock.held and json.loads(path.read_text())["pid"] == os.getpid()
    assert len(lines) == 1 and f"left by pid {gone.pid}" in lines[0] and "no longer running" in lines[0]
    with pytest.raises(RunLocked):  # and it now holds it
        RunLock(tmp_path / "pretrain").acquire()
    lock.release()
    assert not path.exists()


def test_lock_released_after_a_refusal_an_error_and_an_interrupt(tiny_recipe_file, tmp_path, monkeypatch):
    from simclr_cli.stages import pretrain

    out = tmp_path / "run"
    runner = CliRunner()
    args = ["pretrain", str(tiny_recipe_file), "--out", str(out), *QUICK]
    run = pretrain.run
    with monkeypatch.context() as m:  # interrupted (exit 130): the lock goes, the state stays
        m.setattr(pretrain, "run", lambda *a, **k: run(*a, interrupt_after=2, **k))
        r = runner.invoke(app, args)
    assert r.exit_code == 130, r.output
    assert not lock_path(out / "pretrain").exists()
    r = runner.invoke(app, args)  # refused after the lock was taken (an interrupted run is there): exit 2
    assert r.exit_code == 2 and "already holds an interrupted" in r.stderr, r.output
    assert not lock_path(out / "pretrain").exists()

    def boom(*a, **k):
        raise RuntimeError("boom")

    with monkeypatch.context() as m:  # a failure inside the training loop
        m.setattr("simclr_cli.engine.fit.run_loop", boom)
        r = runner.invoke(app, [*args, "--overwrite"])
    assert r.exit_code == 1 and "boom" in r.stderr, r.output
    assert not lock_path(out / "pretrain").exists()


def test_sigkilled_holder_leaves_a_lock_the_next_run_takes_over(tmp_path, holder):
    p = holder(tmp_path / "pretrain")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert lock_path(tmp_path / "pretrain").exists()  # left behind
    lines = []
    with RunLock(tmp_path / "pretrain", say=lines.append) as lock:
        assert lock.held and f"left by pid {p.pid}" in lines[0]


def test_a_lock_held_on_another_host_is_refused_and_deleting_it_as_told_frees_it(tmp_path):
    import fcntl

    path = lock_path(tmp_path / "pretrain")
    path.write_text(json.dumps({"pid": 1, "host": "node-elsewhere", "start": "2026-01-01 00:00:00 UTC",
                                "command": "simclr pretrain x"}))
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # its holder, alive as far as this host can tell
    try:
        with pytest.raises(RunLocked) as e:
            RunLock(tmp_path / "pretrain").acquire()
        msg = str(e.value)
        assert "pid 1 on node-elsewhere, started 2026-01-01 00:00:00 UTC (simclr pretrain x)" in msg
        assert f"if that process is gone, delete {path}" in msg
        path.unlink()  # what the message says to do
        with RunLock(tmp_path / "pretrain") as lock:
            assert lock.held
    finally:
        os.close(fd)


@pytest.mark.multiprocess
def test_every_process_of_a_launch_refuses_a_busy_folder_for_that_reason(tiny_recipe_file, tmp_path, holder):
    """Review: under a 2-process launch only rank 0 took the lock; rank 1 went on to look at the folder and said
    "already holds a finished pretrain run; pass --overwrite", which is false while another command writes there.
    Every process now learns rank 0's refusal first."""
    out = tmp_path / "run"
    assert CliRunner().invoke(app, ["pretrain", str(tiny_recipe_file), "--out", str(out), *QUICK]).exit_code == 0
    p = holder(out / "pretrain")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "simclr_cli", "pretrain", str(tiny_recipe_file), "--out", str(out), *QUICK],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0
    assert f"is being written by another command: pid {p.pid}" in r.stderr, r.stderr[-3000:]
    assert "(the main process names it)" in r.stderr and "already holds" not in r.stderr, r.stderr[-3000:]

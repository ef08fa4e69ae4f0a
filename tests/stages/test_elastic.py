"""Elastic restarts (issue 15, section 1): under ``torchrun --max-restarts 1`` a worker dies on the first attempt,
torchrun restarts the group, the restarted run resumes from the newest complete state with no --resume typed, and
its final weights are bit-identical to an uninterrupted 2-process run. CPU, 2 processes, gloo.

The faults are test-only hooks in tests/stages/elastic_worker.py, keyed on TORCHELASTIC_RESTART_COUNT and RANK.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_RECIPE

WORKER = str(Path(__file__).with_name("elastic_worker.py"))
# 64 images, batch 16: 4 steps an epoch, 8 steps; a state every 2 steps.
SETS = ["--set", "pretrain.knn_every=0", "--set", "pretrain.checkpoint_every=2", "--set", "pretrain.log_every=1"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra,
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}


def _torchrun(mode: str, recipe: Path, out: Path, *extra: str, restarts: int = 1,
              accelerate: bool = False) -> subprocess.CompletedProcess:
    env = _env()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "--max-restarts", str(restarts), "--monitor-interval", "0.1"]
    if accelerate:  # the Accelerate equivalent (its static rendezvous, another store sharing than torchrun's)
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--max_restarts", str(restarts), "--mixed_precision", "no",
                    "--dynamo_backend", "no", "--main_process_port", "0"]
    cmd = [*launcher, WORKER, mode, "pretrain", str(recipe), "--out", str(out), "-q", *SETS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _identical(a_path: Path, b_path: Path) -> None:
    a, b = load_file(a_path), load_file(b_path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 2-process run, for both tests."""
    tmp = tmp_path_factory.mktemp("elastic_ref")
    recipe = tmp / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    r = _torchrun("none", recipe, tmp / "ref", restarts=0)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return tmp / "ref" / "pretrain" / "model.safetensors"


@pytest.mark.multiprocess
def test_sigkilled_worker_restarts_and_resumes_bit_identical(reference, tiny_recipe_file, tmp_path):
    out = tmp_path / "run"
    # A stale run in the way: the first attempt replaces it (--overwrite), the restart must resume its own run
    # rather than set it aside again or refuse with "already holds".
    (out / "pretrain").mkdir(parents=True)
    (out / "pretrain" / "summary.json").write_text("{}")
    r = _torchrun("kill-after-save", tiny_recipe_file, out, "--overwrite")
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert "elastic restart 1: resuming" in r.stderr and "(step 4)" in r.stderr, r.stderr[-3000:]
    summary = json.loads((out / "pretrain" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["processes"] == 2
    _identical(reference, out / "pretrain" / "model.safetensors")
    steps = [json.loads(x)["step"] for x in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # the restart kept the lines up to its state and logged the rest once
    assert not list(out.glob(".pretrain.*"))  # no folder set aside left over, lock released


@pytest.mark.multiprocess
def test_worker_killed_while_writing_a_state_keeps_the_previous_one(reference, tiny_recipe_file, tmp_path):
    out = tmp_path / "run"
    r = _torchrun("kill-while-saving", tiny_recipe_file, out, accelerate=True)  # accelerate launch --max_restarts 1
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    # The step-4 state was being written when rank 0 died: the restart resumed from step 2, took over the lock
    # the dead rank 0 left, and finished bit-identical.
    assert "elastic restart 1: resuming" in r.stderr and "(step 2)" in r.stderr, r.stderr[-3000:]
    assert "took over the lock" in r.stderr
    _identical(reference, out / "pretrain" / "model.safetensors")
    states = sorted(p.name for p in (out / "pretrain" / "state").iterdir())
    assert not [s for s in states if s.endswith(".tmp")], states


@pytest.mark.multiprocess
def test_restart_that_finds_its_launchs_run_finished_exits_0(reference, tiny_recipe_file, tmp_path):
    """Issue 19, A.2: rank 1 dies after the last state while rank 0 writes the finished run; the restarted group
    said "already holds a finished pretrain run; pass --overwrite" and torchrun exited 1."""
    out = tmp_path / "run"
    r = _torchrun("kill-after-last-save", tiny_recipe_file, out)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert "already holds the finished run that this launch" in r.stderr, r.stderr[-3000:]
    assert "nothing to do" in r.stderr
    _identical(reference, out / "pretrain" / "model.safetensors")
    assert json.loads((out / "pretrain" / "summary.json").read_text())["steps"] == 8


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SITE = str(Path(__file__).with_name("preempt_site"))


def _stop(procs: list[subprocess.Popen]) -> None:
    """End what is left of the processes (after a failure): ``simclr launch`` passes a third signal on as SIGKILL
    to its launcher's process group."""
    import signal

    for p in procs:
        if p.poll() is None:
            for _ in range(3):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _wait_for_port(port: int, proc: subprocess.Popen) -> None:
    import socket
    import time

    while proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)


def _two_nodes(recipe: Path, out: Path, launch: bool = False) -> list[subprocess.CompletedProcess]:
    """Two agents on this machine as two nodes (c10d rendezvous, one gloo process each): torchrun, or ``simclr
    launch --nodes 2``. The worker of rank 1 SIGKILLs itself after its second saved state, once
    (tests/stages/preempt_site/sitecustomize.py)."""
    port = _free_port()
    env = _env(SIMCLR_TEST_KILL_RANK1_AT_SAVE="2", SIMCLR_TEST_KILL_MARK=str(out.parent / "killed"))
    env["PYTHONPATH"] = os.pathsep.join([SITE, env["PYTHONPATH"]])
    stage = ["pretrain", str(recipe), "--out", str(out), "-q", *SETS]
    procs = []
    for node in (0, 1):
        if launch:
            cmd = [sys.executable, "-m", "simclr_cli", "launch", "--processes", "1", "--nodes", "2", "--node-rank",
                   str(node), "--main-address", "127.0.0.1", "--main-port", str(port), "--max-restarts", "1",
                   "--job-id", f"test-{port}", *stage]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"test-{port}",
                   "--max-restarts", "1", "--monitor-interval", "0.1", "-m", "simclr_cli", *stage]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        if node == 0:  # node 0 serves the rendezvous store (accelerate launch refuses a port already taken)
            _wait_for_port(port, procs[0])
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=600)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        _stop(procs)
    return results


@pytest.mark.multiprocess
@pytest.mark.parametrize("launch", [False, True], ids=["torchrun", "simclr-launch"])
def test_two_nodes_worker_sigkilled_restart_on_both_and_finish_bit_identical(reference, tiny_recipe_file, tmp_path,
                                                                             launch):
    """Issue 19, B.4 and B.6: only the failed worker's node raises TORCHELASTIC_RESTART_COUNT; the restarted workers
    joined through different store prefixes and hung. Now both nodes restart, resume from step 4 and finish with
    the weights of an uninterrupted 2-process run."""
    out = tmp_path / "run"
    nodes = _two_nodes(tiny_recipe_file, out, launch=launch)
    for r in nodes:
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert (tmp_path / "killed").exists()  # the fault happened
    said = "".join(r.stderr for r in nodes)
    assert "elastic restart" in said and "resuming" in said and "(step 4)" in said, said[-3000:]
    _identical(reference, out / "pretrain" / "model.safetensors")
    steps = [json.loads(x)["step"] for x in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


@pytest.mark.multiprocess
def test_a_rank_that_never_joins_is_a_clear_error_and_sigterm_stops_the_wait(tiny_recipe_file, tmp_path):
    """Issue 19, B.6: a stage stuck before its first step (here: waiting for a peer that never joins) stopped on
    neither SIGTERM nor a timeout. Rank 1 is held before it starts (tests/stages/preempt_site/sitecustomize.py)."""
    import signal
    import time

    env = _env(SIMCLR_TEST_HOLD_RANK="1", SIMCLR_JOIN_TIMEOUT="8")
    env["PYTHONPATH"] = os.pathsep.join([SITE, env["PYTHONPATH"]])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--monitor-interval", "0.1", "-m", "simclr_cli", "pretrain", str(tiny_recipe_file), "--out",
           str(tmp_path / "run"), "-q", *SETS]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode != 0
    said = "error: joining the process group: rank 0 of 2 waited 8 s for rank(s) 1 to join"
    assert said in r.stderr, r.stderr[-3000:]
    # Without the timeout: SIGTERM to the launch's process group, once rank 0 says it is waiting.
    env["SIMCLR_JOIN_TIMEOUT"] = "600"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    lines = []
    try:
        for line in proc.stderr:  # the note comes after 5 s of waiting
            lines.append(line)
            if "note: rank 0 of 2 waits for rank(s) 1 to join the process group" in line:
                break
        else:
            pytest.fail("".join(lines)[-3000:])
        signalled = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        rest = proc.communicate(timeout=300)[1]
        elapsed = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "stopped by SIGTERM while joining the process group" in rest, rest[-3000:]
    assert elapsed < 30, elapsed  # torchrun itself would SIGKILL its workers after 30 s


# -- the rule, in-process (fast) ------------------------------------------------------------------------------------

QUICK = ["-q", "--set", "pretrain.knn_every=0", "--set", "pretrain.epochs=1"]


@pytest.fixture
def interrupted(tiny_recipe_file, tmp_path, monkeypatch):
    """OUT/pretrain interrupted at step 2 (a state, recipe.toml), started as elastic launch 'launch-a'."""
    from typer.testing import CliRunner

    from simclr_cli.cli import app
    from simclr_cli.stages import pretrain

    out = tmp_path / "run"
    run = pretrain.run
    with monkeypatch.context() as m:
        m.setenv("TORCHELASTIC_RUN_ID", "launch-a")
        m.setattr(pretrain, "run", lambda *a, **k: run(*a, interrupt_after=2, **k))
        r = CliRunner().invoke(app, ["pretrain", str(tiny_recipe_file), "--out", str(out), *QUICK])
    assert r.exit_code == 130, r.output
    return out


def test_the_auto_resume_rule(interrupted, tiny_recipe_file, monkeypatch):
    from simclr_cli.recipe import load_recipe
    from simclr_cli.stages.scaffold import auto_resume

    stage = interrupted / "pretrain"
    same = load_recipe(tiny_recipe_file, ["pretrain.knn_every=0", "pretrain.epochs=1"])
    other = load_recipe(tiny_recipe_file, ["pretrain.knn_every=0", "pretrain.epochs=2"])
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert not auto_resume(stage, same)  # no launcher restart, no --auto-resume: as typed
    assert auto_resume(stage, same, explicit=True)
    assert not auto_resume(stage, other, explicit=True)  # another recipe is not this run
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-a")
    assert auto_resume(stage, same)  # a restart of the launch that started it
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-b")
    assert not auto_resume(stage, same)  # another launch's run: not resumed behind anyone's back
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-a")
    (stage / "summary.json").write_text("{}")
    assert not auto_resume(stage, same)  # a finished run is never resumed


def test_auto_resume_option_resumes_or_starts_fresh(interrupted, tiny_recipe_file, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from simclr_cli.cli import app

    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    runner = CliRunner()
    r = runner.invoke(app, ["pretrain", str(tiny_recipe_file), "--out", str(interrupted), *QUICK, "--auto-resume"])
    assert r.exit_code == 0, r.output
    assert f"--auto-resume: resuming {interrupted / 'pretrain'} from its last complete state (step 2)" in r.stderr
    steps = [json.loads(x)["step"] for x in (interrupted / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]  # log_every=2: the line of step 2 kept, step 4 logged by the resumed run
    fresh = tmp_path / "fresh"
    r = runner.invoke(app, ["pretrain", str(tiny_recipe_file), "--out", str(fresh), *QUICK, "--auto-resume"])
    assert r.exit_code == 0 and "resuming" not in r.stderr, r.output
    assert json.loads((fresh / "pretrain" / "summary.json").read_text())["steps"] == 4
    # Review: a requeued job whose run finished in its last allocation failed (exit 2, "already holds a finished
    # run"); the same command again is done, with a note, and writes nothing.
    model = (fresh / "pretrain" / "model.safetensors").read_bytes()
    r = runner.invoke(app, ["pretrain", str(tiny_recipe_file), "--out", str(fresh), *QUICK, "--auto-resume"])
    assert r.exit_code == 0 and "already holds the finished run of this recipe; nothing to do" in r.stderr, r.output
    assert (fresh / "pretrain" / "model.safetensors").read_bytes() == model
    other = ["--set", "pretrain.lr=0.01"]  # a finished run of another recipe is still never replaced silently
    r = runner.invoke(app, ["pretrain", str(tiny_recipe_file), "--out", str(fresh), *QUICK, *other, "--auto-resume"])
    assert r.exit_code == 2 and "already holds a finished pretrain run" in r.output, r.output
    r = runner.invoke(app, ["pretrain", str(tiny_recipe_file), "--out", str(fresh), *QUICK, "--auto-resume",
                            "--overwrite"])  # review 15: --overwrite was silently ignored
    assert r.exit_code == 2 and "--overwrite replaces it: choose one" in r.output, r.output


def test_auto_resume_of_another_recipes_unfinished_run_says_so(interrupted, tiny_recipe_file, monkeypatch):
    """Review 15: it said "pass --resume to continue it", which then failed on the changed recipe."""
    from typer.testing import CliRunner

    from simclr_cli.cli import app

    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    r = CliRunner().invoke(app, ["pretrain", str(tiny_recipe_file), "--out", str(interrupted), *QUICK,
                                 "--set", "pretrain.lr=0.01", "--auto-resume"])
    assert r.exit_code == 2, r.output
    assert "holds an unfinished run of another recipe than this one" in r.output and "--resume (its own recipe)" in r.output
    r = CliRunner().invoke(app, ["pretrain", str(tiny_recipe_file), "--out", str(interrupted), *QUICK, "--resume"])
    assert r.exit_code == 0, r.output  # the hint, run: its own recipe continues


def test_finetune_auto_resume_with_the_same_options(tiny_recipe_file, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from simclr_cli.cli import app
    from simclr_cli.recipe import load_recipe
    from simclr_cli.stages import finetune, pretrain

    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    run = tmp_path / "run"
    pretrain.run(load_recipe(tiny_recipe_file, ["pretrain.knn_every=0", "pretrain.epochs=1"]), run,
                 show_progress=False)
    args = ["finetune", str(run), "--labels", "50%", "--set", "finetune.epochs=2", "--set", "finetune.batch_size=8",
            "-q", "--auto-resume"]
    ft = finetune.run
    with monkeypatch.context() as m:
        m.setattr(finetune, "run", lambda *a, **k: ft(*a, interrupt_after=2, **k))
        r = CliRunner().invoke(app, args)  # nothing to resume yet: starts fresh, then is interrupted
    assert r.exit_code == 130 and "resuming" not in r.stderr, r.output
    r = CliRunner().invoke(app, args)  # the same command again: continues the interrupted run
    assert r.exit_code == 0, r.output
    assert f"--auto-resume: resuming {run / 'finetune'} from its last complete state (step 2)" in r.stderr
    assert json.loads((run / "finetune" / "summary.json").read_text())["labels"] == "50%"


def test_the_join_round_ignores_a_dead_groups_keys():
    """Issue 19, B.4/B.6: the ranks of a restarted group agree on a round in a store that still holds the dead
    group's keys (the agent's, shared across restarts). Rank 0 of the new group reads rank 1's old token first: it
    must wait for the new rank 1, not take the old acknowledgement for a new one."""
    import threading
    import time

    import torch.distributed as dist

    from simclr_cli.stages.scaffold import _agree_round

    store = dist.HashStore()

    def waiting(what):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.001)

    def run(rank, out):
        out[rank] = _agree_round(store, rank, 2, waiting)

    for expected in (1, 2):
        deadline = time.monotonic() + 60
        got: dict = {}
        first = threading.Thread(target=run, args=(0, got))
        first.start()
        if expected == 2:  # the new rank 0 answers the dead rank 1's token before the new rank 1 asks
            old = store.get("simclr/join/ask/1").decode()
            while not (store.check([f"simclr/join/answer/1/{old}"])
                       and store.get(f"simclr/join/answer/1/{old}") == b"2"):
                waiting("rank 0 to answer the old token")
        second = threading.Thread(target=run, args=(1, got))
        second.start()
        first.join(), second.join()
        assert got == {0: expected, 1: expected}


@pytest.mark.multiprocess
def test_a_node_that_does_not_see_the_state_rank_0_resumes_from_is_an_error(tiny_recipe_file, tmp_path):
    """Issue 19, B.5: each rank read the shared folder itself, so a node whose file system view lagged (NFS) resumed
    from an older state than rank 0. Two nodes on this machine, each in a folder of its own: node 1's copy of the
    run lacks the newest state (step 4)."""
    import shutil

    from simclr_cli.recipe import load_recipe
    from simclr_cli.stages import pretrain

    views = [tmp_path / "node0", tmp_path / "node1"]
    recipe = load_recipe(tiny_recipe_file, ["pretrain.knn_every=0", "pretrain.checkpoint_every=2"])
    with pytest.raises(Exception):
        pretrain.run(recipe, views[0] / "run", show_progress=False, interrupt_after=4)
    shutil.copytree(views[0], views[1])
    shutil.rmtree(views[1] / "run" / "pretrain" / "state" / "step-000000004")
    port = _free_port()
    procs = []
    for node, cwd in enumerate(views):
        cmd = [sys.executable, "-m", "simclr_cli", "launch", "--processes", "1", "--nodes", "2", "--node-rank",
               str(node), "--main-address", "127.0.0.1", "--main-port", str(port), "pretrain",
               str(views[0] / "run" / "pretrain" / "recipe.toml"), "--out", "run", "--resume", "--force", "-q"]
        procs.append(subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=_env()))
        if node == 0:
            _wait_for_port(port, procs[0])
    said = ""
    try:
        for p in procs:
            said += p.communicate(timeout=300)[1]
    finally:
        _stop(procs)
    assert all(p.returncode != 0 for p in procs)
    assert ("error: process(es) 1 of 2 do not see run/pretrain/state/step-000000004, the state the main process "
            "resumes from") in said, said[-3000:]
    assert not (views[0] / "run" / "pretrain" / "model.safetensors").exists()

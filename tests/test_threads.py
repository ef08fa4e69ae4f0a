"""The thread budget (simclr_cli/threads.py): what a process may use and how it is split, without timing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from simclr_cli import threads
from simclr_cli.threads import MARK, ThreadBudget, cgroup_cpu_quota, plan, prepare_process, resolve_workers, usable_cpus


@pytest.fixture
def fresh_state():
    """prepare_process and current() decide once per process: tests that call them get a clean slate."""
    saved = dict(threads._state)
    threads._reset_for_tests()
    yield
    threads._state.clear()
    threads._state.update(saved)


def _cgroup(tmp_path: Path, v2: dict[str, str] | None = None, v1: dict[str, tuple[int, int]] | None = None,
            own: str = "/job/step") -> tuple[Path, Path]:
    """A fake /proc/self/cgroup and /sys/fs/cgroup: ``v2`` maps a cgroup path to its cpu.max text, ``v1`` to
    (cfs_quota_us, cfs_period_us)."""
    root = tmp_path / "sys"
    lines = []
    if v2 is not None:
        lines.append(f"0::{own}")
        for path, text in v2.items():
            d = root / path.lstrip("/")
            d.mkdir(parents=True, exist_ok=True)
            (d / "cpu.max").write_text(text + "\n")
    if v1 is not None:
        lines.append(f"4:cpu,cpuacct:{own}")
        for path, (quota, period) in v1.items():
            d = root / "cpu,cpuacct" / path.lstrip("/")
            d.mkdir(parents=True, exist_ok=True)
            (d / "cpu.cfs_quota_us").write_text(f"{quota}\n")
            (d / "cpu.cfs_period_us").write_text(f"{period}\n")
    (root / "sys").mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "cgroup"
    proc.write_text("\n".join(lines) + "\n")
    return proc, root


def test_cgroup_v2_quota_is_the_smallest_on_the_way_up(tmp_path):
    proc, root = _cgroup(tmp_path, v2={"/": "max 100000", "/job": "300000 100000", "/job/step": "150000 100000"})
    assert cgroup_cpu_quota(proc, root) == 1.5
    proc, root = _cgroup(tmp_path / "b", v2={"/job": "50000 100000", "/job/step": "max 100000"})
    assert cgroup_cpu_quota(proc, root) == 0.5  # a parent's limit binds its children
    proc, root = _cgroup(tmp_path / "c", v2={"/": "max 100000", "/job/step": "max 100000"})
    assert cgroup_cpu_quota(proc, root) is None


def test_cgroup_v1_quota_and_no_limit(tmp_path):
    proc, root = _cgroup(tmp_path, v1={"/job/step": (200000, 100000)})
    assert cgroup_cpu_quota(proc, root) == 2.0
    proc, root = _cgroup(tmp_path / "b", v1={"/job/step": (-1, 100000)})
    assert cgroup_cpu_quota(proc, root) is None
    assert cgroup_cpu_quota(tmp_path / "missing", root) is None  # not Linux, or no /proc


def test_container_shows_its_cgroup_as_root(tmp_path):
    """In a container /proc/self/cgroup says '0::/' and the container's cpu.max is at the mount's root."""
    proc, root = _cgroup(tmp_path, v2={"/": "200000 100000"}, own="/")
    assert cgroup_cpu_quota(proc, root) == 2.0


def test_usable_cpus_is_the_smallest_limit_shared_by_the_local_processes():
    assert usable_cpus({}, affinity=8, quota=None)[0] == 8
    assert usable_cpus({}, affinity=8, quota=1.5)[0] == 2  # rounded to the nearest CPU
    assert usable_cpus({}, affinity=8, quota=0.3)[0] == 1  # at least one
    assert usable_cpus({"SLURM_CPUS_PER_TASK": "3"}, affinity=8, quota=None)[0] == 3
    assert usable_cpus({"SLURM_CPUS_PER_TASK": "3"}, affinity=2, quota=None)[0] == 2
    n, why = usable_cpus({"LOCAL_WORLD_SIZE": "4"}, affinity=8, quota=6.0)
    assert n == 1 and "cgroup quota 6" in why and "4 local processes" in why
    assert usable_cpus({"LOCAL_WORLD_SIZE": "2"}, affinity=16, quota=None)[0] == 8
    assert usable_cpus({"LOCAL_WORLD_SIZE": "8"}, affinity=2, quota=None)[0] == 1
    assert usable_cpus({"SIMCLR_THREADS": "5", "LOCAL_WORLD_SIZE": "4"}, affinity=2, quota=None) == (5, "SIMCLR_THREADS=5")


def test_split_between_intra_op_threads_and_workers():
    b = plan({}, affinity=8, quota=None)
    assert (b.cpus, b.user_threads) == (8, None) and b.wait_policy.startswith("the library default")
    assert b.auto_workers(gpu=False) == 4 and b.auto_workers(gpu=True) == 7
    assert b.intra_op(0) == 8 and b.intra_op(4) == 4 and b.intra_op(10) == 1
    assert b.decode_threads() == 8
    one = plan({}, affinity=1, quota=None)
    assert one.auto_workers() == 0 and one.auto_workers(gpu=True) == 0 and one.intra_op(2) == 1
    two = plan({}, affinity=2, quota=None)
    assert two.auto_workers() == 1 and two.intra_op(two.auto_workers()) == 1
    assert resolve_workers("auto", budget=b) == 4 and resolve_workers(3, budget=b) == 3 and resolve_workers(0, budget=b) == 0


def test_the_users_settings_win():
    b = plan({"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}, affinity=8, quota=None)
    assert b.user_threads == 3 and b.intra_op(4) == 3 and b.decode_threads() == 3
    assert b.wait_policy.startswith("ACTIVE")
    assert resolve_workers(6, budget=b) == 6  # an explicit num_workers is never changed
    # OMP_NUM_THREADS that a parent's budget set (simclr launch, the test suite) is decided again in the child
    child = plan({"OMP_NUM_THREADS": "8", MARK: "8", "LOCAL_WORLD_SIZE": "2"}, affinity=8, quota=None)
    assert child.user_threads is None and child.cpus == 4
    # ... but one the user changed since is theirs
    assert plan({"OMP_NUM_THREADS": "5", MARK: "8"}, affinity=8, quota=None).user_threads == 5
    off = plan({"SIMCLR_THREADS": "off"}, affinity=8, quota=None)
    assert not off.enabled and "off" in off.describe()


def test_prepare_process_sets_only_what_the_user_did_not(fresh_state, monkeypatch):
    monkeypatch.setattr(threads, "busy_cpus", lambda *a, **k: 1.5)  # other processes keep 1.5 CPUs busy
    env: dict[str, str] = {"SIMCLR_THREADS": "3"}
    b = prepare_process(env)
    assert env["OMP_NUM_THREADS"] == env[MARK] == "3" and env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "1.5 CPUs busy" in b.wait_policy
    assert prepare_process({}) is b  # decided once
    threads._reset_for_tests()
    env = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}
    prepare_process(env)
    assert env == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}
    threads._reset_for_tests()
    env = {"SIMCLR_THREADS": "off"}
    prepare_process(env)
    assert env == {"SIMCLR_THREADS": "off"}


def test_waiting_threads_spin_on_idle_cpus_and_sleep_on_busy_ones(fresh_state, monkeypatch):
    """The wait policy follows the load at start (it does not change results); the thread count never does."""
    monkeypatch.setattr(threads, "busy_cpus", lambda *a, **k: 0.1)
    env = {"SIMCLR_THREADS": "2"}
    b = prepare_process(env)
    assert "OMP_WAIT_POLICY" not in env and b.wait_policy.startswith("the library default") and b.intra_op() == 2
    # a child of a process that chose PASSIVE decides again for itself: here the CPUs are idle, so it spins
    threads._reset_for_tests()
    env = {"SIMCLR_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE", "SIMCLR_WAIT_SET": "PASSIVE"}
    prepare_process(env)
    assert "OMP_WAIT_POLICY" not in env and env["OMP_NUM_THREADS"] == "2"
    threads._reset_for_tests()
    monkeypatch.setattr(threads, "busy_cpus", lambda *a, **k: 2.0)
    env = {"SIMCLR_THREADS": "2"}
    assert prepare_process(env).intra_op() == 2 and env["OMP_WAIT_POLICY"] == "PASSIVE"
    # one thread has no team to wait for: the machine is not even looked at
    threads._reset_for_tests()
    monkeypatch.setattr(threads, "busy_cpus", lambda *a, **k: pytest.fail("sampled the load for one thread"))
    env = {"SIMCLR_THREADS": "1"}
    prepare_process(env)
    assert "OMP_WAIT_POLICY" not in env


def test_cpus_that_others_keep_busy_are_left_to_them(fresh_state, monkeypatch):
    """A run that starts beside other work takes the CPUs left (at least one thread); a rank of a launch, a fixed
    budget and the user's OMP_NUM_THREADS do not follow the load."""
    monkeypatch.setattr(threads, "usable_cpus", lambda environ, **k: (4, "test"))
    monkeypatch.setattr(threads, "running_peers", lambda *a, **k: 1)

    def start(busy: float, **env: str) -> tuple[dict, ThreadBudget]:
        threads._reset_for_tests()
        monkeypatch.setattr(threads, "busy_cpus", lambda *a, **k: busy)
        return env, prepare_process(env)

    env, b = start(1.5)
    assert env["OMP_NUM_THREADS"] == "3" and b.intra_op() == 3 and b.cpus == 4 and "1.5 CPUs busy" in b.notes[0]
    assert b.auto_workers() == 2 and b.intra_op(2) == 1  # the worker count does not depend on the load
    env, b = start(3.9)
    assert env["OMP_NUM_THREADS"] == "1" and env["OMP_WAIT_POLICY"] == "PASSIVE"
    env, b = start(0.2)
    assert env["OMP_NUM_THREADS"] == "4" and "OMP_WAIT_POLICY" not in env and not b.notes
    for fixed in ({"SIMCLR_THREADS": "fixed"}, {"LOCAL_WORLD_SIZE": "2"}):
        env, b = start(3.0, **fixed)
        assert env["OMP_NUM_THREADS"] == "4" and env["OMP_WAIT_POLICY"] == "PASSIVE"
    env, b = start(3.0, OMP_NUM_THREADS="2")
    assert env["OMP_NUM_THREADS"] == "2" and b.intra_op() == 2


def test_runs_started_together_share_the_cpus(fresh_state, monkeypatch, tmp_path):
    """Two runs that start at once look at the CPUs while both still sleep and see them idle: they count each
    other instead (one file per process in a shared folder; a dead process's file is ignored)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        for pid in (dead.pid, other.pid):
            (tmp_path / str(pid)).touch()
        (tmp_path / "not-a-pid").touch()
        assert threads.running_peers(tmp_path) == 2  # this process and `other`
        assert not (tmp_path / str(dead.pid)).exists()
    finally:
        other.communicate(b"")
    monkeypatch.setattr(threads, "usable_cpus", lambda environ, **k: (4, "test"))
    monkeypatch.setattr(threads, "busy_cpus", lambda *a, **k: 0.0)
    monkeypatch.setattr(threads, "running_peers", lambda *a, **k: 2)
    env: dict[str, str] = {}
    b = prepare_process(env)
    assert env["OMP_NUM_THREADS"] == "2" and "2 simclr processes" in b.notes[0]
    threads._reset_for_tests()
    env = {"SIMCLR_THREADS": "fixed"}
    assert prepare_process(env).intra_op() == 4


def test_a_resume_goes_back_to_the_thread_count_the_run_started_with(fresh_state):
    import torch

    before = torch.get_num_threads()
    try:
        threads._state.update(budget=ThreadBudget(cpus=2, why="test"), set_threads=2)
        torch.set_num_threads(2)
        assert threads.resume_with(2, 0) is None and torch.get_num_threads() == 2  # the same: nothing to do
        note = threads.resume_with(1, 0)
        assert torch.get_num_threads() == 1 and "resuming with 1 intra-op thread" in note
        assert threads.current().base_threads == 1
        threads._state.update(budget=ThreadBudget(cpus=2, why="test", user_threads=2), set_threads=None)
        torch.set_num_threads(2)
        assert threads.resume_with(1, 0) is None and torch.get_num_threads() == 2  # the user's count wins
    finally:
        torch.set_num_threads(before)


def test_busy_cpus_reads_the_affinity_cpus_of_proc_stat(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    samples = iter([
        "cpu  0 0 0 0 0 0 0 0\ncpu0 100 0 100 800 0 0 0 0\ncpu1 0 0 0 1000 0 0 0 0\ncpu2 0 0 0 0 0 0 0 0\n",
        "cpu  0 0 0 0 0 0 0 0\ncpu0 150 0 150 900 0 0 0 0\ncpu1 0 0 0 1200 0 0 0 0\ncpu2 999 0 0 0 0 0 0 0\n",
    ])
    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: next(samples) if self == stat else real_read(self, *a, **k))
    # cpu0: 100 busy of 200 jiffies, cpu1: 0 of 200; cpu2 is not ours
    assert threads.busy_cpus({0, 1}, window=0, stat=stat) == pytest.approx(2 * 100 / 400)
    assert threads.busy_cpus({0}, window=0, stat=tmp_path / "missing") is None


def test_leave_room_for_workers_unless_someone_else_set_the_threads(fresh_state):
    import torch

    before = torch.get_num_threads()
    try:
        threads._state.update(budget=ThreadBudget(cpus=4, why="test"), set_threads=4)
        torch.set_num_threads(4)
        threads.leave_room_for_workers(3)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)  # the user's call since: theirs
        threads.leave_room_for_workers(1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_current_without_the_cli_keeps_the_callers_threads(fresh_state):
    """A stage run from Python: the caller's torch thread count is theirs, the budget only sizes auto workers."""
    import torch

    b = threads.current()
    assert b.user_threads == torch.get_num_threads()


_PROBE = ("import os, simclr_cli.cli, torch; "
          "print(torch.get_num_threads(), os.environ.get('OMP_WAIT_POLICY'), os.environ.get('SIMCLR_THREADS_SET'))")


def _probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", MARK,
                                                               "SIMCLR_THREADS", "LOCAL_WORLD_SIZE", "SIMCLR_WAIT_SET")}
    r = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_the_cli_sets_the_budget_before_torch_starts_its_threads():
    """Importing the command line sizes torch's pool: through OMP_NUM_THREADS, which acts only before torch loads."""
    assert _probe(SIMCLR_THREADS="1") == ["1", "None", "1"]  # one thread: no wait policy to choose
    cores = len(os.sched_getaffinity(0))
    # SIMCLR_THREADS is per process (torch itself caps its pool at the machine's cores)
    two = _probe(SIMCLR_THREADS="2", LOCAL_WORLD_SIZE="2")  # the wait policy depends on the machine's load now
    assert two[0] == str(min(2, cores)) and two[1] in ("PASSIVE", "None") and two[2] == "2"
    # a torchrun rank whose launcher's budget set 4 threads: it takes its share
    assert _probe(OMP_NUM_THREADS="4", SIMCLR_THREADS_SET="4", SIMCLR_THREADS="", LOCAL_WORLD_SIZE="2")[0] == str(
        max(1, cores // 2))
    # the user's settings win
    assert _probe(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE") == ["1", "ACTIVE", "None"]
    assert _probe(SIMCLR_THREADS="off", OMP_WAIT_POLICY="ACTIVE")[1:] == ["ACTIVE", "None"]


def _summary_threads(out: Path) -> dict:
    import json

    return json.loads((out / "pretrain" / "summary.json").read_text())["threads"]


@pytest.mark.multiprocess
def test_a_launch_shares_the_cpus_among_its_processes(tiny_recipe_file, tmp_path):
    """`simclr pretrain` takes the process's CPUs; `simclr launch --processes 2` gives each rank its share (the
    launcher's budget travels as OMP_NUM_THREADS and each rank decides again); summary.json records it."""
    cores = len(os.sched_getaffinity(0))
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", MARK,
                                                               "SIMCLR_THREADS", "LOCAL_WORLD_SIZE")}
    args = ["pretrain", str(tiny_recipe_file), "-q", "--set", "pretrain.epochs=1", "--set", "pretrain.knn_every=0"]
    one = subprocess.run([sys.executable, "-m", "simclr_cli", *args, "--out", str(tmp_path / "one")], env=clean,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    one_threads = _summary_threads(tmp_path / "one")  # fewer than the CPUs where other work kept some busy at start
    assert one_threads["cpus"] == cores and 1 <= one_threads["intra_op"] <= cores and one_threads["workers"] == 0
    two = subprocess.run([sys.executable, "-m", "simclr_cli", "launch", "--processes", "2", *args,
                          "--out", str(tmp_path / "two")], env={**clean, "CUDA_VISIBLE_DEVICES": ""},
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    share = max(1, cores // 2)
    assert _summary_threads(tmp_path / "two") == {"cpus": share, "intra_op": share, "workers": 0}

"""The thread budget of a process: how many cores it may use, and how they are split (issue 21).

A machine is rarely ours alone: a laptop with a browser open, a workstation shared with other jobs,
a CI runner, the 8 ranks of a GPU node with their DataLoader workers. The libraries' defaults assume
the opposite: torch starts one intra-op thread per core of the machine, and OpenMP threads that wait
for work spin on a core for a while before they sleep. Beside other work, every parallel region then
waits for its slowest thread, which the kernel has just given to someone else, and the spinning
threads burn what the other jobs would have used: measured on 2 cores, a 120-step quickstart beside
other jobs took 289 s with the defaults and 54 s with one thread.

The budget is decided once, when the process starts (:func:`prepare_process`, before torch is
imported), from what the process may actually use:

* its CPU affinity (``os.sched_getaffinity``: taskset, cpusets, SLURM's binding);
* a cgroup CPU quota (``cpu.max`` in cgroup v2, ``cpu.cfs_quota_us`` in v1: containers, SLURM jobs),
  rounded to the nearest whole CPU;
* ``SLURM_CPUS_PER_TASK`` where it is set;

the smallest of these, shared among the processes a launcher started on this machine
(``LOCAL_WORLD_SIZE``), at least 1. ``SIMCLR_THREADS=N`` sets N CPUs for each process instead;
``SIMCLR_THREADS=off`` leaves every setting to the libraries, as before the budget existed;
``SIMCLR_THREADS=fixed`` takes the CPUs whatever the load (the test suite does, for repeatable runs).

The CPUs are split between the main process's intra-op threads and the DataLoader workers (one
thread each, as torch sets them): ``data.num_workers = "auto"`` takes a count from the budget
(:meth:`ThreadBudget.auto_workers`), and the intra-op threads get the CPUs the workers leave
(:func:`leave_room_for_workers`). Decoding a folder into memory, which runs before training, uses the
whole budget (:meth:`ThreadBudget.decode_threads`).

The user's settings win: an ``OMP_NUM_THREADS`` in the environment, a ``torch.set_num_threads`` made
before a stage runs, an explicit ``data.num_workers``, an ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` are
left as they are. A process with several CPUs looks at the machine when it starts (:func:`busy_cpus`, 0.1 s of
``/proc/stat``): the CPUs that other processes keep busy are left to them (at least one thread stays),
and where others are busy the waiting OpenMP threads sleep at once (``OMP_WAIT_POLICY=PASSIVE``) instead
of spinning a core away from them; on idle CPUs they keep the library's default (spin a while, then
sleep), which alone is fastest (docs/performance.md). Float results depend on the thread count, so it is
recorded: a resumed run goes back to the count it started with (:func:`resume_with`, bit-identical to
the uninterrupted run), ``summary.json`` names it, and the ranks of a launch (which must agree) and
``SIMCLR_THREADS=N|fixed`` do not look at the load.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, MutableMapping, Optional

ENV = "SIMCLR_THREADS"
MARK = "SIMCLR_THREADS_SET"  # the OMP_NUM_THREADS a budget set: a child process with the same value decides its own
WAIT_MARK = "SIMCLR_WAIT_SET"  # likewise for OMP_WAIT_POLICY
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class ThreadBudget:
    """How many CPUs this process may use and how they are spent.

    Attributes:
        cpus: CPUs for this process (at least 1).
        why: how ``cpus`` was found, for ``--verbose`` (e.g. ``affinity 8, cgroup quota 4, 2 local processes``).
        user_threads: the intra-op thread count the user fixed (``OMP_NUM_THREADS``), else None.
        wait_policy: the OpenMP wait policy in force, and who chose it.
        enabled: False under ``SIMCLR_THREADS=off`` (nothing is changed).
    """

    cpus: int
    why: str
    user_threads: Optional[int] = None
    wait_policy: str = ""
    enabled: bool = True
    notes: tuple[str, ...] = field(default=())
    threads: Optional[int] = None  # intra-op threads before workers: the CPUs, fewer where others kept them busy at start

    @property
    def base_threads(self) -> int:
        return self.threads if self.threads is not None else self.cpus

    def auto_workers(self, gpu: bool = False) -> int:
        """``data.num_workers = "auto"``: DataLoader workers from the budget.

        One CPU: none (a worker would only compete with the training thread). Training on a GPU, the
        main process mostly launches kernels: every CPU but one decodes. On a CPU the model needs the
        cores too: half of them decode, the rest run the model."""
        if self.cpus <= 1:
            return 0
        return self.cpus - 1 if gpu else self.cpus // 2

    def intra_op(self, workers: int = 0) -> int:
        """The main process's intra-op threads beside ``workers`` DataLoader workers (the user's count if set)."""
        if self.user_threads is not None:
            return self.user_threads
        return max(1, self.base_threads - max(0, workers))

    def decode_threads(self) -> int:
        """Threads that decode a folder into memory (before training: the whole budget, or the user's
        ``OMP_NUM_THREADS`` where it is smaller: a user who asked for fewer threads gets no more)."""
        return min(self.cpus, self.user_threads) if self.user_threads is not None else self.cpus

    def describe(self, workers_setting: object = None, gpu: bool = False) -> str:
        """One line for ``--verbose``."""
        if not self.enabled:
            return f"threads: budget off ({ENV}=off): library defaults"
        parts = [f"threads: {self.cpus} CPU(s) for this process ({self.why})"]
        workers = resolve_workers(workers_setting, gpu, self) if workers_setting is not None else 0
        if workers_setting is not None:
            parts.append(f"data.num_workers={workers_setting!s} -> {workers} worker(s)")
        threads = self.intra_op(workers)
        parts.append(f"{threads} intra-op thread(s)" + (" (OMP_NUM_THREADS)" if self.user_threads is not None else "")
                     + (f" ({'; '.join(self.notes)})" if self.notes else ""))
        parts.append(f"{self.decode_threads()} decode thread(s)")
        if self.wait_policy:
            parts.append(f"OpenMP wait policy {self.wait_policy}")
        return "; ".join(parts)


# ----------------------------------------------------------------------------- what the process may use


def cgroup_cpu_quota(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> Optional[float]:
    """The CPU quota (in CPUs, e.g. 1.5) of this process's cgroup and its ancestors, the smallest; None: no quota.

    cgroup v2: ``cpu.max`` (``"max 100000"`` or ``"150000 100000"``). cgroup v1: ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us`` (-1: none). Inside a container the process's cgroup is often shown as ``/``
    while the container's own limits sit at the mount's root, which the walk up reads too."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2
            quotas += _walk_quotas(root, path, _v2_quota)
        elif "cpu" in controllers.split(","):
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                if mount.is_dir():
                    quotas += _walk_quotas(mount, path, _v1_quota)
                    break
    return min(quotas) if quotas else None


def _walk_quotas(mount: Path, path: str, read: Callable[[Path], Optional[float]]) -> list[float]:
    found: list[float] = []
    folder = mount / path.lstrip("/")
    while True:
        q = read(folder)
        if q is not None:
            found.append(q)
        if folder == mount or mount not in folder.parents:
            return found
        folder = folder.parent


def _v2_quota(folder: Path) -> Optional[float]:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(folder: Path) -> Optional[float]:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _positive_int(value: Optional[str]) -> Optional[int]:
    try:
        n = int(str(value).strip().split("(")[0])  # SLURM writes "8(x2)" in some variables
    except (TypeError, ValueError):
        return None
    return n if n >= 1 else None


def usable_cpus(environ: Mapping[str, str], *, affinity: Optional[int] = None,
                quota: Optional[float] = -1.0) -> tuple[int, str]:
    """CPUs this process may use, and how that was found.

    Args:
        environ: the environment (``SIMCLR_THREADS``, ``SLURM_CPUS_PER_TASK``, ``LOCAL_WORLD_SIZE``).
        affinity: the CPUs of the affinity mask (default: this process's).
        quota: the cgroup quota in CPUs, None for none (default: this process's cgroups).
    """
    local = _positive_int(environ.get("LOCAL_WORLD_SIZE")) or 1
    fixed = _positive_int(environ.get(ENV))
    if fixed is not None:
        return fixed, f"{ENV}={fixed}"
    n_aff = _affinity() if affinity is None else affinity
    limits = [(n_aff, f"affinity {n_aff}")]
    q = cgroup_cpu_quota() if quota == -1.0 else quota
    if q is not None:
        limits.append((max(1, math.floor(q + 0.5)), f"cgroup quota {q:g}"))
    slurm = _positive_int(environ.get("SLURM_CPUS_PER_TASK"))
    if slurm is not None:
        limits.append((slurm, f"SLURM_CPUS_PER_TASK {slurm}"))
    node = min(n for n, _ in limits)
    why = ", ".join(text for _, text in limits)
    if local > 1:
        why += f", shared by {local} local processes"
    return max(1, node // local), why


def busy_cpus(cpus: Optional[set[int]] = None, window: float = 0.1, stat: Path = Path("/proc/stat")) -> Optional[float]:
    """How many of ``cpus`` (default: this process's affinity) other processes keep busy, measured over
    ``window`` seconds from ``/proc/stat`` while this process sleeps (so its own work is not counted);
    None where it cannot be read (not Linux)."""
    if cpus is None:
        try:
            cpus = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return None

    def sample() -> Optional[tuple[int, int]]:
        busy = total = 0
        try:
            lines = stat.read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            name, *values = line.split()
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                continue
            v = [int(x) for x in values[:8]] + [0] * max(0, 8 - len(values))
            idle = v[3] + v[4]  # idle, iowait
            busy += sum(v[:8]) - idle
            total += sum(v[:8])
        return (busy, total) if total else None

    first = sample()
    if first is None:
        return None
    time.sleep(window)
    second = sample()
    if second is None or second[1] <= first[1]:
        return None
    return len(cpus) * (second[0] - first[0]) / (second[1] - first[1])


def running_peers(folder: Optional[Path] = None) -> int:
    """How many ``simclr`` processes that decided their budget themselves run on this machine, this one included.

    Each registers a file named after its pid in a folder shared by the machine's users (removed at exit; a
    file whose process is gone is ignored and removed). Two runs started at the same moment look at the
    CPUs while both still sleep and find them idle; counting each other, they share them instead."""
    import atexit
    import tempfile

    folder = folder or Path(tempfile.gettempdir()) / "simclr-cli-processes"
    try:
        folder.mkdir(mode=0o1777, exist_ok=True)
        mine = folder / str(os.getpid())
        mine.touch()
        atexit.register(lambda: mine.unlink(missing_ok=True))
        live = 0
        for entry in folder.iterdir():
            pid = _positive_int(entry.name)
            if pid is None:
                continue
            try:
                os.kill(pid, 0)
                live += 1
            except ProcessLookupError:
                entry.unlink(missing_ok=True)
            except PermissionError:  # another user's process: it runs
                live += 1
        return max(1, live)
    except OSError:
        return 1


BUSY_THRESHOLD = 0.5  # CPUs kept busy by others at start-up above which waiting OpenMP threads sleep at once


def plan(environ: Mapping[str, str], *, affinity: Optional[int] = None, quota: Optional[float] = -1.0,
         busy: Optional[float] = None) -> ThreadBudget:
    """The budget for a process with this environment (pure but for reading the affinity and cgroups,
    which ``affinity`` and ``quota`` replace in tests). ``busy``: the CPUs other processes kept busy at
    start-up (:func:`busy_cpus`; None: not measured), which chooses the OpenMP wait policy."""
    if environ.get(ENV, "").strip().lower() == "off":
        return ThreadBudget(cpus=_positive_int(environ.get("OMP_NUM_THREADS")) or _affinity(), why=f"{ENV}=off",
                            enabled=False)
    cpus, why = usable_cpus(environ, affinity=affinity, quota=quota)
    user = _positive_int(environ.get("OMP_NUM_THREADS"))
    if user is not None and environ.get(MARK) == environ.get("OMP_NUM_THREADS"):
        user = None  # set by a parent's budget (simclr launch, the test suite), not by the user: decide again here
    return ThreadBudget(cpus=cpus, why=why, user_threads=user, wait_policy=_wait_policy(environ, busy))


def _wait_policy(environ: Mapping[str, str], busy: Optional[float]) -> str:
    """The OpenMP wait policy: the user's; else PASSIVE (sleep at once) when other processes kept the CPUs busy at
    start-up; else the library's default (spin a while, then sleep), the fastest alone."""
    policy = environ.get("OMP_WAIT_POLICY", "")
    if policy and policy != environ.get(WAIT_MARK):
        return f"{policy} (OMP_WAIT_POLICY)"
    if environ.get("GOMP_SPINCOUNT"):
        return f"spin {environ['GOMP_SPINCOUNT']} (GOMP_SPINCOUNT)"
    if busy is not None and busy >= BUSY_THRESHOLD:
        return f"PASSIVE (other processes kept {busy:.1f} CPUs busy at start)"
    return "the library default (spin, then sleep)" + (f": the CPUs were idle at start ({busy:.1f} busy)"
                                                       if busy is not None else "")


# ----------------------------------------------------------------------------- applying it

_state: dict = {"budget": None, "set_threads": None}


def prepare_process(environ: MutableMapping[str, str] = os.environ) -> ThreadBudget:
    """Decide this process's budget and set what must be set before torch is imported.

    Sets ``OMP_NUM_THREADS`` so that torch's thread pool starts at the budget's size, and
    ``OMP_WAIT_POLICY=PASSIVE`` when other processes keep the CPUs busy, where the user set neither.
    A process with several CPUs looks at the machine for 0.1 s (:func:`busy_cpus`): the CPUs that others
    keep busy are left to them (at least one thread), unless ``SIMCLR_THREADS=fixed`` or it is one of
    several processes of a launch (whose ranks must agree); a resumed run goes back to the count it
    started with (:func:`resume_with`), so that the resume computes what the run would have.
    Call it first thing in the command-line entry point; a later call returns the same budget."""
    if _state["budget"] is not None:
        return _state["budget"]
    budget = plan(environ)
    user_wait = bool(environ.get("GOMP_SPINCOUNT")) or (
        bool(environ.get("OMP_WAIT_POLICY")) and environ.get("OMP_WAIT_POLICY") != environ.get(WAIT_MARK))
    if budget.enabled and budget.intra_op() > 1 and (budget.user_threads is None or not user_wait):
        busy = busy_cpus()  # one thread has no team to wait for, and nothing to give back: no look needed
        budget = plan(environ, busy=busy)
        fixed = (environ.get(ENV, "").strip().lower() == "fixed" or _positive_int(environ.get(ENV)) is not None
                 or (_positive_int(environ.get("LOCAL_WORLD_SIZE")) or 1) > 1)
        if budget.user_threads is None and not fixed:
            threads, notes = budget.cpus, []
            if busy is not None:
                threads = max(1, min(threads, math.floor(budget.cpus - busy + 0.5)))
                if threads < budget.cpus:
                    notes.append(f"other processes kept {busy:.1f} CPUs busy at start")
            peers = running_peers()  # runs started together see each other idle in that look: they share instead
            if peers > 1 and budget.cpus // peers < threads:
                threads = max(1, budget.cpus // peers)
                notes.append(f"{peers} simclr processes on this machine share it")
            if threads < budget.cpus:
                budget = replace(budget, threads=threads,
                                 notes=(f"{threads} of its {budget.cpus} CPUs: {'; '.join(notes)}",))
    _state["budget"] = budget
    if budget.enabled:
        if budget.wait_policy.startswith("PASSIVE"):
            environ["OMP_WAIT_POLICY"] = environ[WAIT_MARK] = "PASSIVE"
        elif environ.get(WAIT_MARK) and environ.get("OMP_WAIT_POLICY") == environ.get(WAIT_MARK):
            del environ["OMP_WAIT_POLICY"]  # a parent's choice for its machine state, not the user's: ours is to spin
            del environ[WAIT_MARK]
        if budget.user_threads is None:
            environ["OMP_NUM_THREADS"] = environ[MARK] = str(budget.base_threads)
            _state["set_threads"] = budget.base_threads
    return budget


def resume_with(started: Optional[int], workers: int) -> Optional[str]:
    """A resumed run takes the intra-op thread count it started with (``started``, from its state), where the
    budget chose the count: float results depend on it, and the resume must compute what the run would have.
    Returns a note to print when the count changed, else None."""
    budget = current()
    if (started is None or not budget.enabled or budget.user_threads is not None or _state["set_threads"] is None
            or started == budget.base_threads):
        return None
    import torch

    _state["budget"] = replace(budget, threads=started, notes=(f"{started} as when the run started (its state)",))
    want = _state["budget"].intra_op(workers)
    torch.set_num_threads(want)
    _state["set_threads"] = want
    return (f"resuming with {started} intra-op thread(s) as the run started with (this start would have taken "
            f"{budget.base_threads}), so that it computes what the uninterrupted run would have")


def current() -> ThreadBudget:
    """This process's budget (decided on the first call when :func:`prepare_process` was not called,
    e.g. a stage run from Python: then the caller's own thread settings are left alone)."""
    if _state["budget"] is None:
        budget = plan(os.environ)
        if budget.user_threads is None and budget.enabled:
            import torch

            # Not set up by the CLI: whatever torch runs with now is the user's (or the library default's) choice.
            budget = ThreadBudget(cpus=budget.cpus, why=budget.why, user_threads=torch.get_num_threads(),
                                  wait_policy=budget.wait_policy, notes=("not started by the CLI",))
        _state["budget"] = budget
    return _state["budget"]


def resolve_workers(setting: object, gpu: bool = False, budget: Optional[ThreadBudget] = None) -> int:
    """``data.num_workers`` as a count: an integer as given, ``"auto"`` from the budget."""
    if setting == "auto":
        return (budget or current()).auto_workers(gpu)
    return int(setting)  # type: ignore[arg-type]


def leave_room_for_workers(workers: int) -> None:
    """Give the main process's intra-op threads the CPUs that ``workers`` DataLoader workers leave.

    Only where the budget set the thread count and nobody changed it since (a user's
    ``torch.set_num_threads`` or ``OMP_NUM_THREADS`` wins)."""
    budget = current()
    if not budget.enabled or budget.user_threads is not None or _state["set_threads"] is None:
        return
    import torch

    if torch.get_num_threads() != _state["set_threads"]:
        return  # changed by someone else since: theirs
    want = budget.intra_op(workers)
    if want != _state["set_threads"]:
        torch.set_num_threads(want)
        _state["set_threads"] = want


def _reset_for_tests() -> None:
    _state.update(budget=None, set_threads=None)

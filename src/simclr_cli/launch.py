"""``simclr launch``: build the ``accelerate launch`` command that runs a stage on this node's GPUs (or CPU
processes), on several nodes, or under SLURM, and run it.

:func:`build_plan` is a pure function of the options, the environment and the GPU count: it decides the
``accelerate launch`` flags and returns a :class:`LaunchPlan` (argv, extra environment). :func:`run_plan` runs
it and returns the exit code. The rules:

* An Accelerate config file (``--config-file``, else ``$ACCELERATE_CONFIG_FILE``, else Accelerate's own default
  ``$HF_HOME/accelerate/default_config.yaml``, ``$HF_HOME`` defaulting to ``$XDG_CACHE_HOME/huggingface`` or
  ``~/.cache/huggingface``) is passed with ``--config_file``, and only the flags the user gave (or SLURM gave)
  are added on top of it.
* Without one: ``--num_processes`` (the total over all nodes: nodes x processes per node), ``--num_machines``,
  ``--multi_gpu`` for more than one process (Accelerate's torchrun launcher; on a CPU-only machine it starts
  gloo processes), ``--cpu`` for one CPU process, and for several nodes ``--machine_rank``,
  ``--main_process_ip`` and ``--main_process_port``.
* Mixed precision is never passed: the recipe's ``mixed_precision`` is what the Accelerator is built with.
* Under SLURM (``SLURM_JOB_ID`` set) the node count, this node's rank and the main address come from the
  environment; explicit options win.
* ``--max-restarts``: a rendezvous that a restarted group can join (see :func:`build_plan`'s comments), with an
  id of this launch (:func:`rendezvous_id`).
"""

from __future__ import annotations

import difflib
import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from simclr_cli.errors import UsageError
from simclr_cli.layout import LAUNCHABLE

DEFAULT_PORT = 29500
LAUNCH_OPTIONS = ("--gpus", "--processes", "--nodes", "--node-rank", "--main-address", "--main-port",
                  "--max-restarts", "--job-id", "--config-file", "--dry-run")


@dataclass(frozen=True)
class LaunchOptions:
    """What the user typed (None: not given)."""

    gpus: Optional[int] = None
    processes: Optional[int] = None
    nodes: Optional[int] = None
    node_rank: Optional[int] = None
    main_address: Optional[str] = None
    main_port: Optional[int] = None
    max_restarts: Optional[int] = None
    config_file: Optional[Path] = None
    job_id: Optional[str] = None


@dataclass(frozen=True)
class LaunchPlan:
    """The command to run: ``argv`` with ``env`` set on top of the current environment."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # one line each, why a flag is there (shown on stderr)

    def shell(self) -> str:
        """The command as one copy-pastable shell line."""
        prefix = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join([*prefix, shlex.join(self.argv)])


# --- SLURM -----------------------------------------------------------------------------------------------

def expand_nodelist(nodelist: str) -> list[str]:
    """The host names of a SLURM node list in its compressed syntax.

    ``"gpu[01-03,07],cpu3"`` -> ``["gpu01", "gpu02", "gpu03", "gpu07", "cpu3"]``; zero padding is kept and
    several bracket groups in one name (``"r[1-2]n[1-2]"``) expand to every combination, in SLURM's order.

    Raises:
        UsageError: the list cannot be parsed (an unbalanced bracket, a reversed range).
    """
    hosts: list[str] = []
    for name in _split_top_level(nodelist.strip()):
        parts = re.split(r"(\[[^\[\]]*\])", name)
        choices: list[list[str]] = []
        for part in parts:
            if part.startswith("["):
                choices.append(_expand_ranges(part[1:-1], nodelist))
            elif "[" in part or "]" in part:
                raise UsageError(f"SLURM node list {nodelist!r}: unbalanced brackets; pass --main-address HOST")
            else:
                choices.append([part])
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return [h for h in hosts if h]


def _split_top_level(text: str) -> list[str]:
    names, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            names.append(text[start:i])
            start = i + 1
    names.append(text[start:])
    return [n.strip() for n in names if n.strip()]


def _expand_ranges(spec: str, nodelist: str) -> list[str]:
    out: list[str] = []
    for item in spec.split(","):
        lo, _, hi = item.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise UsageError(f"SLURM node list {nodelist!r}: cannot read the range [{spec}]; pass --main-address HOST")
        width = len(lo)
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi or lo) + 1))
    return out


def _env_int(env: Mapping[str, str], *names: str) -> tuple[Optional[int], str]:
    """The first of ``names`` set in ``env``, as an int, and its name (SLURM writes ``"8(x2)"`` for some)."""
    for name in names:
        value = env.get(name, "").strip()
        if value:
            m = re.match(r"\d+", value)
            if not m:
                raise UsageError(f"${name}={value!r} is not a number; pass the matching simclr launch option instead")
            return int(m.group()), name
    return None, ""


@dataclass(frozen=True)
class SlurmInfo:
    """What a SLURM job step says about the launch (None: not in the environment)."""

    nodes: Optional[int]
    node_rank: Optional[int]
    main_address: Optional[str]
    gpus_per_node: Optional[int]


def slurm_info(env: Mapping[str, str]) -> Optional[SlurmInfo]:
    """The node count, this node's rank, the first host and the GPUs per node of a SLURM job, or None outside
    SLURM (no ``SLURM_JOB_ID``). A job step's own values (``SLURM_STEP_*``, set by ``srun``) come first.

    Raises:
        UsageError: the step runs several tasks on a node (each would start all the node's processes).
    """
    if not env.get("SLURM_JOB_ID"):
        return None
    nodes, _ = _env_int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    tasks, _ = _env_int(env, "SLURM_STEP_NUM_TASKS")
    if nodes is not None and tasks is not None and tasks > nodes:
        raise UsageError(f"this SLURM step runs {tasks} tasks on {nodes} node(s); simclr launch starts all the "
                         "processes of its node itself: run one task per node (srun --ntasks-per-node=1, "
                         "#SBATCH --ntasks-per-node=1)")
    rank, _ = _env_int(env, "SLURM_NODEID")
    if rank is None and nodes is not None:
        ntasks, _ = _env_int(env, "SLURM_NTASKS")
        if ntasks == nodes:  # one task per node: the task's rank is the node's
            rank, _ = _env_int(env, "SLURM_PROCID")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
    hosts = expand_nodelist(nodelist) if nodelist.strip() else []
    gpus, _ = _env_int(env, "SLURM_GPUS_ON_NODE")
    return SlurmInfo(nodes=nodes, node_rank=rank, main_address=hosts[0] if hosts else None, gpus_per_node=gpus)


# --- GPUs and the Accelerate config ----------------------------------------------------------------------

def visible_gpus(env: Mapping[str, str], cuda_count: Callable[[], int]) -> int:
    """The GPUs this node offers: ``SLURM_GPUS_ON_NODE``, else the entries of ``CUDA_VISIBLE_DEVICES``, else
    ``cuda_count()`` (``torch.cuda.device_count()``)."""
    n, _ = _env_int(env, "SLURM_GPUS_ON_NODE") if env.get("SLURM_JOB_ID") else (None, "")
    if n is not None:
        return n
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        ids = [d.strip() for d in cvd.split(",") if d.strip()]
        if not ids or ids[0] in ("-1", "NoDevFiles"):
            return 0
        return len(ids)
    return cuda_count()


def torch_cuda_count() -> int:
    """``torch.cuda.device_count()`` (imports torch: only called when nothing else says)."""
    import torch

    return torch.cuda.device_count()


def accelerate_config(env: Mapping[str, str], explicit: Optional[Path] = None) -> Optional[Path]:
    """The Accelerate config file ``accelerate launch`` would read, or None when there is none.

    ``explicit`` (``--config-file``), else ``$ACCELERATE_CONFIG_FILE``, else Accelerate's default:
    ``$HF_HOME/accelerate/default_config.yaml`` (``$HF_HOME`` defaults to ``$XDG_CACHE_HOME/huggingface``,
    ``~/.cache/huggingface``), or the ``default_config.json`` older versions wrote.

    Raises:
        UsageError: a file named explicitly (option or variable) does not exist.
    """
    if explicit is not None:
        if not Path(explicit).is_file():
            raise UsageError(f"--config-file {explicit}: no such file; run `accelerate config --config_file "
                             f"{explicit}` to write one, or leave the option out")
        return Path(explicit)
    named = env.get("ACCELERATE_CONFIG_FILE")
    if named:
        if not Path(named).is_file():
            raise UsageError(f"$ACCELERATE_CONFIG_FILE={named}: no such file; fix or unset the variable")
        return Path(named)
    home = env.get("HOME") or os.path.expanduser("~")
    cache = env.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    hf_home = env.get("HF_HOME") or os.path.join(cache, "huggingface")
    hf_home = hf_home.replace("~", home, 1) if hf_home.startswith("~") else hf_home
    for name in ("default_config.yaml", "default_config.json"):
        path = Path(hf_home) / "accelerate" / name
        if path.is_file():
            return path
    return None


def _config_values(path: Path) -> dict:
    """The few keys of an Accelerate config that decide the flags added on top of it."""
    import json

    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise UsageError(f"Accelerate config {path}: cannot be read ({_first_line(e)}); fix it with "
                         "`accelerate config`, or pass --config-file with another one") from None
    return data if isinstance(data, dict) else {}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# --- the plan --------------------------------------------------------------------------------------------

def build_plan(
    opts: LaunchOptions,
    stage_args: Sequence[str],
    env: Mapping[str, str],
    cuda_count: Callable[[], int] = torch_cuda_count,
    check_gpus: bool = True,
    python: str = sys.executable,
) -> LaunchPlan:
    """The ``accelerate launch`` command that runs ``python -m simclr_cli STAGE ARGS...``.

    Args:
        opts: the launch options the user gave.
        stage_args: ``[STAGE, *ARGS]``, passed through verbatim.
        env: the environment (SLURM variables, ``CUDA_VISIBLE_DEVICES``, ``HF_HOME``, ...).
        cuda_count: the CUDA devices torch sees (called only when needed).
        check_gpus: refuse ``--gpus N`` beyond the GPUs torch sees (off for ``--dry-run``).
        python: the interpreter that runs Accelerate and the stage.

    Raises:
        UsageError: inconsistent or incomplete options (exit 2).
    """
    _check_stage(stage_args)
    if opts.gpus is not None and opts.processes is not None:
        raise UsageError("--gpus and --processes exclude each other: --gpus N runs N GPU processes per node, "
                         "--processes N runs N CPU processes (gloo)")
    slurm = slurm_info(env)
    config = accelerate_config(env, opts.config_file)
    values = _config_values(config) if config is not None else {}
    nodes = _nodes(opts, slurm, values)
    procs = _processes(opts, env, cuda_count, check_gpus, from_config=config is not None and slurm is None
                       and not nodes.given)
    notes: list[str] = []
    argv = [python, "-m", "accelerate.commands.launch"]
    argv += ["--config_file", str(config)] if config is not None else []
    argv += _process_flags(procs, nodes, values, config is not None, notes)
    argv += ["--num_machines", str(nodes.count)] if config is None or nodes.given else []
    argv += _address_flags(opts, nodes, values, config is not None)
    argv += _restart_flags(opts, nodes, procs.total(nodes))
    argv += ["-m", "simclr_cli", *stage_args]
    return LaunchPlan(argv=argv, env=_plan_env(opts, env, nodes, procs, cuda_count), notes=notes)


@dataclass(frozen=True)
class _Nodes:
    """The machines of a launch: explicit options win, then SLURM, then the Accelerate config."""

    count: int
    rank: Optional[int]  # this node's
    address: Optional[str]  # the rank-0 node's
    given: bool  # the node count came from an option or SLURM, not from the config or the default


@dataclass(frozen=True)
class _Processes:
    """The processes per node, when this launch decides them (None: the Accelerate config's)."""

    per_node: Optional[int]
    cpu: bool  # CPU processes (gloo)
    gpus_here: Optional[int]  # the GPUs this node offers, when they were counted

    def total(self, nodes: _Nodes) -> Optional[int]:
        return nodes.count * self.per_node if self.per_node is not None else None


def _nodes(opts: LaunchOptions, slurm: Optional[SlurmInfo], values: Mapping) -> _Nodes:
    """The node count, this node's rank and the main address (explicit, SLURM, config; whose
    ``num_processes`` counts all nodes).

    Raises:
        UsageError: a rank not below the node count; several nodes without an address, a rank or with port 0.
    """
    nodes = _first(opts.nodes, slurm and slurm.nodes)
    given = nodes is not None
    nodes = _first(nodes, _int_or_none(values.get("num_machines")), 1)
    rank = _first(opts.node_rank, slurm and slurm.node_rank, _int_or_none(values.get("machine_rank")) if nodes > 1
                  else None)
    address = _first(opts.main_address, slurm and slurm.main_address, values.get("main_process_ip"))
    if rank is not None and rank >= nodes:
        source = "" if opts.node_rank is not None else " (from SLURM)" if slurm else " (from the Accelerate config)"
        raise UsageError(f"--node-rank {rank}{source} is not below --nodes {nodes}: node ranks run from 0 to "
                         f"{nodes - 1}")
    if nodes > 1:
        if address is None:
            raise UsageError(f"--nodes {nodes} needs --main-address HOST: the address of the node with rank 0 "
                             "(under SLURM it is the first host of $SLURM_JOB_NODELIST)")
        if rank is None:
            raise UsageError(f"--nodes {nodes} needs --node-rank R: this node's rank, 0 to {nodes - 1}, a "
                             "different one on each node (under SLURM: $SLURM_NODEID)")
        if opts.main_port == 0:
            raise UsageError("--main-port 0 (a free port) works on one node only: every node must use the same "
                             "port; pass one, e.g. --main-port 29500")
    return _Nodes(count=nodes, rank=rank, address=address, given=given)


def _processes(opts: LaunchOptions, env: Mapping[str, str], cuda_count: Callable[[], int], check_gpus: bool,
               from_config: bool) -> _Processes:
    """``--processes N`` (CPU), ``--gpus N``, else every GPU this node offers (one CPU process without one), unless
    the Accelerate config decides (``from_config``: a config, and neither SLURM nor a node count given).

    Raises:
        UsageError: ``--gpus N`` beyond the GPUs torch sees (with ``check_gpus``).
    """
    cpu = opts.processes is not None
    per_node: Optional[int] = opts.processes if cpu else opts.gpus
    if opts.gpus is not None and check_gpus:
        have = cuda_count()
        if opts.gpus > have:
            fix = f"pass --gpus {have} or fewer" if have else "use --processes N for CPU processes"
            raise UsageError(f"--gpus {opts.gpus}: this machine has {have} GPU(s) that torch can use; {fix} "
                             "(--dry-run prints the command without this check)")
    gpus_here: Optional[int] = None
    if per_node is None and not from_config:
        gpus_here = visible_gpus(env, cuda_count)
        per_node, cpu = (gpus_here, False) if gpus_here > 0 else (1, True)
    return _Processes(per_node=per_node, cpu=cpu, gpus_here=gpus_here)


def _process_flags(procs: _Processes, nodes: _Nodes, values: Mapping, has_config: bool, notes: list[str]) -> list[str]:
    """``--num_processes`` (over all nodes) and ``--multi_gpu`` or ``--cpu``; a note on ``notes`` when
    ``--multi_gpu`` starts CPU processes."""
    total = procs.total(nodes)
    if total is None:
        return []
    flags = ["--num_processes", str(total)]
    kind = values.get("distributed_type")  # YAML reads an unquoted NO as false
    config_multi = kind not in (None, False) and str(kind).upper() not in ("NO", "MULTI_CPU")
    if total > 1 and (procs.cpu or not has_config or not config_multi):
        flags.append("--multi_gpu")  # Accelerate's torchrun launcher; gloo processes on a CPU-only machine
        if procs.cpu:
            notes.append(f"note: --multi_gpu is Accelerate's flag for its torchrun launcher; here it starts "
                         f"{total} CPU processes (gloo), no GPU is used")
    elif total == 1 and procs.cpu:
        flags.append("--cpu")
    return flags


def _address_flags(opts: LaunchOptions, nodes: _Nodes, values: Mapping, has_config: bool) -> list[str]:
    """This node's rank and the rank-0 node's address and port, where the config does not already say them."""
    flags: list[str] = []
    if nodes.count > 1 and (not has_config or nodes.given or opts.node_rank is not None or opts.main_address):
        flags += ["--machine_rank", str(nodes.rank), "--main_process_ip", str(nodes.address)]
        port = _first(opts.main_port, None if values.get("main_process_port") else DEFAULT_PORT)
        if port is not None:
            flags += ["--main_process_port", str(port)]
    elif nodes.count > 1:  # all from the config
        if opts.main_port is not None:
            flags += ["--main_process_port", str(opts.main_port)]
    else:
        if opts.main_address is not None:
            flags += ["--main_process_ip", opts.main_address]
        if opts.main_port is not None:
            flags += ["--main_process_port", str(opts.main_port)]
    return flags


def _restart_flags(opts: LaunchOptions, nodes: _Nodes, total: Optional[int]) -> list[str]:
    """``--max_restarts`` (and the c10d rendezvous on several nodes).

    Raises:
        UsageError: ``--job-id`` without a restartable launch on several nodes; ``--main-port`` with restarts on
            one node; restarts of one process.
    """
    if opts.job_id is not None and not (opts.max_restarts is not None and nodes.count > 1):
        raise UsageError("--job-id names the rendezvous of a restartable launch on several nodes: use it with "
                         "--nodes N --max-restarts K, or leave it out")
    if opts.max_restarts is None:
        return []
    if nodes.count == 1 and opts.main_port is not None:
        raise UsageError("--main-port with --max-restarts on one node: the restartable rendezvous picks a free "
                         "port itself (torchrun --standalone); leave --main-port out")
    if total == 1:
        raise UsageError(f"--max-restarts {opts.max_restarts} needs Accelerate's torchrun launcher, which runs "
                         "2 processes or more (--gpus N, --processes N); for one process use `torchrun "
                         f"--nproc_per_node 1 --max-restarts {opts.max_restarts} -m simclr_cli ...`")
    flags = ["--max_restarts", str(opts.max_restarts)]
    if nodes.count > 1:
        flags += ["--rdzv_backend", "c10d"]  # static rendezvous cannot gather a restarted group
    return flags


def _plan_env(opts: LaunchOptions, env: Mapping[str, str], nodes: _Nodes, procs: _Processes,
              cuda_count: Callable[[], int]) -> dict[str, str]:
    """The environment the launch adds: the rendezvous of a restartable launch, and no GPUs for CPU processes."""
    extra: dict[str, str] = {}
    if opts.max_restarts is not None:
        # A restarted group must not read the dead group's addresses from a store shared with the launcher
        # (pytorch/pytorch#135712): each group gets its own store, and one node uses torchrun's --standalone
        # rendezvous (c10d on a free port; PET_* variables set torchrun's options, which Accelerate leaves alone).
        extra["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = env.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        if nodes.count == 1:
            extra["PET_STANDALONE"] = "1"  # its rendezvous id is a new uuid for each launch
        else:
            extra["PET_RDZV_ID"] = rendezvous_id(opts, env, nodes.count)
    if procs.cpu and procs.total(nodes) is not None:
        gpus_here = procs.gpus_here if procs.gpus_here is not None else visible_gpus(env, cuda_count)
        if gpus_here > 0:  # the stages use a GPU whenever torch sees one: hide them for CPU processes
            extra["CUDA_VISIBLE_DEVICES"] = ""
    return extra


def rendezvous_id(opts: LaunchOptions, env: Mapping[str, str], nodes: int) -> str:
    """The rendezvous id of a restartable launch on several nodes (torchrun's ``--rdzv_id``, passed as
    ``PET_RDZV_ID``; the stages see it as ``TORCHELASTIC_RUN_ID``): the same on every node of one launch, new for
    each launch, so that an elastic restart resumes only the run its own launch started. ``--job-id``, else the
    SLURM job (``slurm-JOB[.STEP][-requeueN]``: a requeued job is a new launch).

    Raises:
        UsageError: neither is there (every node would share torchrun's default id, "none").
    """
    if opts.job_id is not None:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", opts.job_id):
            raise UsageError(f"--job-id {opts.job_id!r}: use letters, digits, '.', '_' and '-' only")
        return opts.job_id
    job = env.get("SLURM_JOB_ID", "").strip()
    if job:
        step = env.get("SLURM_STEP_ID", "").strip()
        requeue = env.get("SLURM_RESTART_COUNT", "").strip()
        requeued = f"-requeue{requeue}" if requeue not in ("", "0") else ""
        return f"slurm-{job}" + (f".{step}" if step else "") + requeued
    raise UsageError(f"--nodes {nodes} with --max-restarts needs a rendezvous id, the same on every node and new for "
                     "each launch (so that a restart resumes only the run this launch started): pass --job-id ID on "
                     "every node, e.g. a date chosen once (--job-id 20261207-0312); under SLURM the job id is used")


RELAUNCH_ENV = "SIMCLR_LAUNCH_PREFIX"  # set for the stage: how it was launched, so that its resume hint launches alike


def relaunch_prefix(opts: LaunchOptions) -> str:
    """``simclr launch`` with the launch options the user gave: the start of a resume command that runs the
    stage under the same launch (a plain ``simclr STAGE ... --resume`` would run one process and be refused
    for a state saved by several)."""
    words = ["simclr", "launch"]
    for flag, value in (("--gpus", opts.gpus), ("--processes", opts.processes), ("--nodes", opts.nodes),
                        ("--node-rank", opts.node_rank), ("--main-address", opts.main_address),
                        ("--main-port", opts.main_port), ("--max-restarts", opts.max_restarts),
                        ("--job-id", opts.job_id), ("--config-file", opts.config_file)):
        if value is not None:
            words += [flag, str(value)]
    return shlex.join(words)


def _first(*values):
    """The first value that is not None (or falsy-but-absent: a missing SLURM section gives None or False)."""
    return next((v for v in values if v is not None and v is not False), None)


def _int_or_none(value: object) -> Optional[int]:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _check_stage(stage_args: Sequence[str]) -> None:
    if not stage_args:
        raise UsageError("missing STAGE: simclr launch [OPTIONS] STAGE ARGS..., e.g. simclr launch --gpus 8 "
                         "pretrain imagenet")
    stage = stage_args[0]
    if stage.startswith("-"):
        name = stage.split("=", 1)[0]
        near = difflib.get_close_matches(name, LAUNCH_OPTIONS, n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise UsageError(f"no such option: {name}{hint}; simclr launch's options come before STAGE, the stage's "
                         "after it (see simclr launch --help)")
    if stage not in LAUNCHABLE:
        near = difflib.get_close_matches(stage, LAUNCHABLE, n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        raise UsageError(f"{stage!r} is not a stage simclr launch runs; {hint}one of: {', '.join(LAUNCHABLE)}")


# --- running it ------------------------------------------------------------------------------------------

def run_plan(plan: LaunchPlan, say: Callable[[str], None] = lambda s: None,
             extra_env: Optional[Mapping[str, str]] = None) -> int:
    """Run the plan and return its exit code: the launcher's own, or 130 after Ctrl-C or SIGTERM.

    The launcher runs in its own process group, so that a Ctrl-C on the terminal reaches the workers once,
    through this function, and not a second time through torchrun (whose agent forwards the signal to its
    workers, and a second Ctrl-C stops a stage at once, without saving). The first SIGINT or SIGTERM is passed
    to the whole group as SIGTERM (each stage saves its state at the next step boundary and exits 130); a
    second Ctrl-C is passed as SIGINT (stop at once), a third signal kills them. The processes read no input (a prompt fails instead of
    waiting unseen for the terminal). This returns once every process of the group has ended
    (on Linux, where it can adopt the workers of a launcher that died first), so a SLURM step does not end
    while a state is being written.
    """
    say(plan.shell())
    env = {**os.environ, **plan.env, **(extra_env or {})}  # extra_env: for the stages, not shown in the command
    _become_subreaper()
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    got: list[int] = []
    group: list[int] = []

    def send() -> None:
        if len(got) >= 3:
            sig = signal.SIGKILL
        else:
            sig = signal.SIGINT if len(got) == 2 and got[-1] == signal.SIGINT else signal.SIGTERM
        try:
            os.killpg(group[0], sig)
        except (ProcessLookupError, PermissionError):
            pass

    def forward(signum: int, frame: object) -> None:
        got.append(signum)
        if group:
            send()

    try:
        for s in old:
            signal.signal(s, forward)
        try:
            # stdin: nothing: a background process group reading the terminal would be stopped (SIGTTIN) unseen
            proc = subprocess.Popen(plan.argv, env=env, process_group=0, stdin=subprocess.DEVNULL)
        except OSError as e:
            raise UsageError(f"cannot start {plan.argv[0]}: {e.strerror or e}") from None
        group.append(proc.pid)
        if got:  # a signal that came while it started
            send()
        code = _wait_group(proc)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
    return 130 if got else code


def _wait_group(proc: subprocess.Popen) -> int:
    """Wait for the launcher, then for whatever of its process group this process adopted."""
    code = proc.wait()
    while True:
        try:
            os.waitpid(-proc.pid, 0)
        except ChildProcessError:
            break
    return 128 - code if code < 0 else code


def _become_subreaper() -> None:
    """Adopt orphaned descendants (Linux ``PR_SET_CHILD_SUBREAPER``), so that :func:`_wait_group` can wait for a
    stage whose launcher died on the signal; elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass

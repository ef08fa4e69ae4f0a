"""``simclr launch`` (issue 15): the ``accelerate launch`` command it builds (dry runs: one node, several nodes,
an Accelerate config, SLURM), its usage errors, the wrapper scripts in docs/scripts/, its exit codes and signals,
and a real 2-process CPU run bit-identical to ``torchrun --nproc_per_node 2``."""

from __future__ import annotations

import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.errors import UsageError
from simclr_cli.launch import LaunchOptions, LaunchPlan, build_plan, expand_nodelist, run_plan

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "docs" / "scripts"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
STAGE = ["-m", "simclr_cli", "pretrain", "imagenet", "--set", "data.root=/data/x y", "--out", "runs/a"]


def _clean_env(tmp_path: Path, **extra: str) -> dict:
    """This environment without SLURM, Accelerate and GPU settings (a test machine may have any of them), with an
    empty HF_HOME (no Accelerate config), plus ``extra``."""
    drop = ("SLURM_", "ACCELERATE_", "SIMCLR_LAUNCH")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(drop) and k not in ("CUDA_VISIBLE_DEVICES", "HF_HOME", "XDG_CACHE_HOME")}
    return {**env, "HF_HOME": str(tmp_path / "hf"), **extra}


def _dry(tmp_path: Path, *args: str, **extra: str):
    """``simclr launch --dry-run ARGS`` in-process with a clean environment; the printed command, split, without
    the VAR=VALUE words before it."""
    env = _clean_env(tmp_path, **extra)
    runner_env = {k: None for k in os.environ if k not in env} | env
    result = CliRunner().invoke(app, ["launch", "--dry-run", *args], env=runner_env)
    if result.exit_code:
        return result, None
    words = shlex.split(result.stdout)
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):  # the environment the command is run with
        words.pop(0)
    return result, words


def _flags(argv: list[str]) -> list[str]:
    """The accelerate flags between the launcher and ``-m simclr_cli``."""
    assert argv[:3] == LAUNCH, argv
    end = argv.index("simclr_cli") - 1
    assert argv[end:] == STAGE, argv
    return argv[3:end]


# --- dry runs --------------------------------------------------------------------------------------------

def test_one_node_all_gpus_and_explicit_gpus(tmp_path):
    result, argv = _dry(tmp_path, *STAGE[2:], CUDA_VISIBLE_DEVICES="0,1,2")
    assert result.exit_code == 0, result.output
    assert _flags(argv) == ["--num_processes", "3", "--multi_gpu", "--num_machines", "1"]
    # --gpus wins over what is visible (no GPU check with --dry-run: this machine may have none)
    _, argv = _dry(tmp_path, "--gpus", "8", *STAGE[2:], CUDA_VISIBLE_DEVICES="0,1,2")
    assert _flags(argv) == ["--num_processes", "8", "--multi_gpu", "--num_machines", "1"]
    _, argv = _dry(tmp_path, "--gpus", "1", "--main-port", "0", *STAGE[2:])
    assert _flags(argv) == ["--num_processes", "1", "--num_machines", "1", "--main_process_port", "0"]


def test_dry_run_prints_a_copy_pastable_command(tmp_path):
    """The stage's arguments pass through verbatim (options after STAGE are the stage's, even --dry-run), and
    the line is shell-quoted: splitting it gives the argv back."""
    result, argv = _dry(tmp_path, "--gpus", "2", "pretrain", "r.toml", "--set", "name='a b'", "--dry-run", "-q")
    assert result.exit_code == 0, result.output
    assert argv[-6:] == ["pretrain", "r.toml", "--set", "name='a b'", "--dry-run", "-q"]
    plan = build_plan(LaunchOptions(gpus=2), ["pretrain", "r.toml", "--set", "name='a b'", "--dry-run", "-q"],
                      _clean_env(tmp_path), check_gpus=False)
    assert result.stdout.strip() == plan.shell() and shlex.split(plan.shell()) == plan.argv


def test_cpu_processes(tmp_path):
    _, argv = _dry(tmp_path, "--processes", "2", *STAGE[2:], CUDA_VISIBLE_DEVICES="")
    assert _flags(argv) == ["--num_processes", "2", "--multi_gpu", "--num_machines", "1"]
    _, argv = _dry(tmp_path, "--processes", "1", *STAGE[2:], CUDA_VISIBLE_DEVICES="")
    assert _flags(argv) == ["--num_processes", "1", "--cpu", "--num_machines", "1"]
    # no GPU and no option: one CPU process
    _, argv = _dry(tmp_path, *STAGE[2:], CUDA_VISIBLE_DEVICES="")
    assert _flags(argv) == ["--num_processes", "1", "--cpu", "--num_machines", "1"]
    # on a machine with GPUs, --processes hides them (the stages use a GPU whenever torch sees one)
    result, _ = _dry(tmp_path, "--processes", "2", *STAGE[2:], CUDA_VISIBLE_DEVICES="0,1")
    assert result.stdout.startswith("CUDA_VISIBLE_DEVICES='' ")


def test_dry_run_says_why_multi_gpu_is_there_for_cpu_processes(tmp_path):
    """Issue 22: --multi_gpu for CPU processes puzzles a reader; one note on stderr says why, not for GPUs."""
    result, argv = _dry(tmp_path, "--processes", "2", *STAGE[2:], CUDA_VISIBLE_DEVICES="")
    assert "--multi_gpu" in argv
    notes = [ln for ln in result.stderr.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "--multi_gpu" in notes[0] and "2 CPU processes" in notes[0]
    result, argv = _dry(tmp_path, "--gpus", "2", *STAGE[2:], CUDA_VISIBLE_DEVICES="0,1")
    assert "--multi_gpu" in argv and "note:" not in result.stderr


def test_max_restarts_gets_a_rendezvous_that_survives_a_restart(tmp_path):
    """torchrun's static rendezvous (Accelerate's default) shares its store with the workers, and a restarted
    group cannot connect: one node gets --standalone (PET_STANDALONE), several nodes c10d; each group its own
    store."""
    result, argv = _dry(tmp_path, "--processes", "2", "--max-restarts", "3", *STAGE[2:], CUDA_VISIBLE_DEVICES="")
    assert result.stdout.startswith("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 PET_STANDALONE=1 ")
    assert _flags(argv)[-2:] == ["--max_restarts", "3"]
    result, argv = _dry(tmp_path, "--gpus", "8", "--nodes", "2", "--node-rank", "1", "--main-address", "h",
                        "--max-restarts", "1", "--job-id", "j1", *STAGE[2:])
    assert result.stdout.startswith("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 PET_RDZV_ID=j1 /")
    assert _flags(argv)[-4:] == ["--max_restarts", "1", "--rdzv_backend", "c10d"]
    result, _ = _dry(tmp_path, "--gpus", "2", "--main-port", "1234", "--max-restarts", "1", *STAGE[2:])
    assert result.exit_code == 2 and "leave --main-port out" in result.output


def test_several_nodes_with_restarts_get_a_rendezvous_id_of_their_own(tmp_path):
    """Issue 19, B.3: every multi-node launch shared torchrun's default rendezvous id "none", so the "resume only
    what this launch started" rule could not tell launches apart."""
    nodes = ["--gpus", "8", "--nodes", "2", "--node-rank", "0", "--main-address", "h", "--max-restarts", "1"]
    result, _ = _dry(tmp_path, *nodes, *STAGE[2:])
    assert result.exit_code == 2 and "pass --job-id ID on every node" in result.output, result.output
    result, _ = _dry(tmp_path, *nodes, "--job-id", "x1", *STAGE[2:])
    assert result.exit_code == 0 and " PET_RDZV_ID=x1 " in result.stdout, result.output
    slurm = {"SLURM_JOB_ID": "777", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "n[1-2]",
             "SLURM_GPUS_ON_NODE": "8"}
    result, _ = _dry(tmp_path, "--max-restarts", "1", *STAGE[2:], **slurm)
    assert result.exit_code == 0 and " PET_RDZV_ID=slurm-777 " in result.stdout, result.output
    result, _ = _dry(tmp_path, "--max-restarts", "1", *STAGE[2:], SLURM_RESTART_COUNT="2", SLURM_STEP_ID="0", **slurm)
    assert " PET_RDZV_ID=slurm-777.0-requeue2 " in result.stdout, result.output  # a requeued job is a new launch
    result, _ = _dry(tmp_path, "--processes", "2", "--job-id", "x1", *STAGE[2:])
    assert result.exit_code == 2 and "--job-id names the rendezvous" in result.output


def test_several_nodes_explicit(tmp_path):
    result, argv = _dry(tmp_path, "--gpus", "8", "--nodes", "2", "--node-rank", "1", "--main-address", "10.0.0.1",
                        *STAGE[2:])
    assert result.exit_code == 0, result.output
    assert _flags(argv) == ["--num_processes", "16", "--multi_gpu", "--num_machines", "2", "--machine_rank", "1",
                            "--main_process_ip", "10.0.0.1", "--main_process_port", "29500"]
    _, argv = _dry(tmp_path, "--nodes", "2", "--node-rank", "0", "--main-address", "h0", "--main-port", "1234",
                   *STAGE[2:], CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert _flags(argv) == ["--num_processes", "8", "--multi_gpu", "--num_machines", "2", "--machine_rank", "0",
                            "--main_process_ip", "h0", "--main_process_port", "1234"]


def _config(path: Path, distributed_type: str = "MULTI_GPU", processes: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"compute_environment: LOCAL_MACHINE\ndistributed_type: {distributed_type}\n"
                    f"mixed_precision: bf16\nnum_machines: 1\nnum_processes: {processes}\nmachine_rank: 0\n")
    return path


def test_an_accelerate_config_is_passed_with_only_the_given_flags(tmp_path):
    config = _config(tmp_path / "hf" / "accelerate" / "default_config.yaml")
    result, argv = _dry(tmp_path, *STAGE[2:], CUDA_VISIBLE_DEVICES="0,1")
    assert result.exit_code == 0, result.output
    assert _flags(argv) == ["--config_file", str(config)]
    _, argv = _dry(tmp_path, "--gpus", "2", "--max-restarts", "1", *STAGE[2:])
    assert _flags(argv) == ["--config_file", str(config), "--num_processes", "2", "--max_restarts", "1"]
    # a one-process config needs --multi_gpu for several GPUs (its distributed_type would run one process)
    _config(config, "NO", 1)
    _, argv = _dry(tmp_path, "--gpus", "4", *STAGE[2:])
    assert _flags(argv) == ["--config_file", str(config), "--num_processes", "4", "--multi_gpu"]
    # --config-file and $ACCELERATE_CONFIG_FILE name another one; a missing one is an error
    other = _config(tmp_path / "other.yaml")
    _, argv = _dry(tmp_path, *STAGE[2:], ACCELERATE_CONFIG_FILE=str(other))
    assert _flags(argv) == ["--config_file", str(other)]
    _, argv = _dry(tmp_path, "--config-file", str(other), *STAGE[2:], ACCELERATE_CONFIG_FILE=str(config))
    assert _flags(argv) == ["--config_file", str(other)]
    result, _ = _dry(tmp_path, *STAGE[2:], ACCELERATE_CONFIG_FILE=str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2 and "ACCELERATE_CONFIG_FILE" in result.output and "nope.yaml" in result.output


def test_a_multi_node_config_counts_gpus_per_node(tmp_path):
    """--gpus is per node: with a 2-machine config, 8 GPUs per node are 16 processes; the machine settings stay
    the config's unless given."""
    config = tmp_path / "hf" / "accelerate" / "default_config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("distributed_type: MULTI_GPU\nnum_machines: 2\nnum_processes: 16\nmachine_rank: 1\n"
                      "main_process_ip: 10.1.1.1\nmain_process_port: 4000\n")
    _, argv = _dry(tmp_path, "--gpus", "8", *STAGE[2:])
    assert _flags(argv) == ["--config_file", str(config), "--num_processes", "16"]
    _, argv = _dry(tmp_path, "--nodes", "2", *STAGE[2:], CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert _flags(argv) == ["--config_file", str(config), "--num_processes", "8", "--num_machines", "2",
                            "--machine_rank", "1", "--main_process_ip", "10.1.1.1"]
    result, _ = _dry(tmp_path, "--node-rank", "2", *STAGE[2:])
    assert result.exit_code == 2 and "not below --nodes 2" in result.output


SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "4", "SLURM_JOB_NUM_NODES": "4", "SLURM_NODEID": "2",
         "SLURM_JOB_NODELIST": "gpu[07-09,12]", "SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS": "4",
         "SLURM_PROCID": "2"}


def test_slurm_environment_gives_nodes_rank_and_main_address(tmp_path):
    result, argv = _dry(tmp_path, *STAGE[2:], **SLURM)
    assert result.exit_code == 0, result.output
    assert _flags(argv) == ["--num_processes", "32", "--multi_gpu", "--num_machines", "4", "--machine_rank", "2",
                            "--main_process_ip", "gpu07", "--main_process_port", "29500"]
    # explicit options win
    _, argv = _dry(tmp_path, "--gpus", "2", "--main-address", "head", "--node-rank", "0", *STAGE[2:], **SLURM)
    assert _flags(argv) == ["--num_processes", "8", "--multi_gpu", "--num_machines", "4", "--machine_rank", "0",
                            "--main_process_ip", "head", "--main_process_port", "29500"]
    # no SLURM_NODEID: the task's rank when the step runs one task per node; the step's own values come first
    env = {**{k: v for k, v in SLURM.items() if k != "SLURM_NODEID"}, "SLURM_STEP_NODELIST": "n[3-4]",
           "SLURM_STEP_NUM_NODES": "2", "SLURM_NNODES": "2", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
    _, argv = _dry(tmp_path, *STAGE[2:], **env)
    assert _flags(argv)[:9] == ["--num_processes", "16", "--multi_gpu", "--num_machines", "2", "--machine_rank", "1",
                                "--main_process_ip", "n3"]
    # several tasks per node would each start every process of the node
    result, _ = _dry(tmp_path, *STAGE[2:], **SLURM, SLURM_STEP_NUM_NODES="4", SLURM_STEP_NUM_TASKS="32")
    assert result.exit_code == 2 and "one task per node" in result.output


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-04,07],cpu3", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"]),
    ("node7", ["node7"]),
    ("a1,b[9-10]", ["a1", "b9", "b10"]),
    ("r[1-2]n[08-09]", ["r1n08", "r1n09", "r2n08", "r2n09"]),
    ("gpu-[001-002].cluster", ["gpu-001.cluster", "gpu-002.cluster"]),
])
def test_expand_slurm_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-", "gpu[04-01]", "gpu[a-b]"])
def test_unreadable_nodelist_is_a_usage_error(bad):
    with pytest.raises(UsageError, match="--main-address"):
        expand_nodelist(bad)


@pytest.mark.parametrize("args, message", [
    (["--nodes", "2", "--gpus", "1"], "needs --main-address"),
    (["--nodes", "2", "--main-address", "h", "--gpus", "1"], "needs --node-rank"),
    (["--nodes", "2", "--node-rank", "2", "--main-address", "h"], "not below --nodes 2"),
    (["--node-rank", "1"], "not below --nodes 1"),
    (["--nodes", "2", "--node-rank", "0", "--main-address", "h", "--main-port", "0"], "one node only"),
    (["--gpus", "2", "--processes", "2"], "exclude each other"),
    (["--processes", "1", "--max-restarts", "2"], "torchrun"),
    (["--gpu", "2"], "did you mean --gpus"),
    (["--config-file", "missing.yaml"], "missing.yaml: no such file"),
])
def test_inconsistent_options_exit_2_before_anything_runs(tmp_path, args, message):
    result, _ = _dry(tmp_path, *args, *STAGE[2:], CUDA_VISIBLE_DEVICES="")
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_unknown_or_missing_stage(tmp_path):
    result, _ = _dry(tmp_path, "pretrian", "x")
    assert result.exit_code == 2 and "did you mean pretrain" in result.output
    result = CliRunner().invoke(app, ["launch", "--dry-run"])
    assert result.exit_code == 2


def test_more_gpus_than_the_machine_has_is_refused_unless_dry_run(tmp_path):
    env = _clean_env(tmp_path)
    result = CliRunner().invoke(app, ["launch", "--gpus", "4096", *STAGE[2:]],
                                env={k: None for k in os.environ if k not in env} | env)
    assert result.exit_code == 2 and "--gpus 4096: this machine has" in result.output
    with pytest.raises(UsageError, match="has 1 GPU"):
        build_plan(LaunchOptions(gpus=2), STAGE[2:], {}, cuda_count=lambda: 1)
    assert build_plan(LaunchOptions(gpus=2), STAGE[2:], {}, cuda_count=lambda: 2).argv[3:5] == ["--num_processes", "2"]


def test_dry_run_from_the_environment(tmp_path):
    env = _clean_env(tmp_path, SIMCLR_LAUNCH_DRY_RUN="1", CUDA_VISIBLE_DEVICES="")
    result = CliRunner().invoke(app, ["launch", "--processes", "2", *STAGE[2:]],
                                env={k: None for k in os.environ if k not in env} | env)
    assert result.exit_code == 0 and shlex.split(result.stdout)[:5] == [*LAUNCH, "--num_processes", "2"]


# --- the wrapper scripts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["slurm_pretrain.sbatch", "single_node.sh"])
def test_scripts_are_executable_and_bash_n_clean(name):
    script = SCRIPTS / name
    assert script.stat().st_mode & stat.S_IXUSR, f"{name} is not executable"
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _script_env(tmp_path: Path, **extra: str) -> dict:
    """A fake ``srun`` on PATH that runs its command (dropping its own options), this interpreter as SIMCLR, and
    the dry-run switch: the scripts print the accelerate command they would run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text('#!/usr/bin/env bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    srun.chmod(0o755)
    return _clean_env(tmp_path, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SIMCLR_LAUNCH_DRY_RUN="1",
                      SIMCLR=f"{sys.executable} -m simclr_cli", **extra)


def test_slurm_script_under_a_faked_slurm_job(tmp_path):
    args = ["imagenet", "--set", "data.root=/data/imagenet", "--out", "/shared/runs/imagenet"]
    proc = subprocess.run(["bash", str(SCRIPTS / "slurm_pretrain.sbatch"), *args], capture_output=True, text=True,
                          env=_script_env(tmp_path, **{**SLURM, "SLURM_NODEID": "3"}), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    argv = shlex.split(proc.stdout)
    assert argv[:3] == LAUNCH
    assert argv[3:argv.index("simclr_cli") - 1] == [
        "--num_processes", "32", "--multi_gpu", "--num_machines", "4", "--machine_rank", "3",
        "--main_process_ip", "gpu07", "--main_process_port", "29500"]
    assert argv[argv.index("simclr_cli") + 1:] == ["pretrain", "--auto-resume", *args]


def test_single_node_script(tmp_path):
    args = ["pretrain", "imagenet", "--out", "runs/x"]
    run = lambda **env: subprocess.run(["bash", str(SCRIPTS / "single_node.sh"), *args], capture_output=True,  # noqa: E731
                                       text=True, env=_script_env(tmp_path, **env), timeout=120)
    proc = run(CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shlex.split(proc.stdout) == [*LAUNCH, "--num_processes", "4", "--multi_gpu", "--num_machines", "1",
                                        "-m", "simclr_cli", *args]
    proc = run(CUDA_VISIBLE_DEVICES="0,1,2,3", GPUS="2")
    assert shlex.split(proc.stdout)[3:5] == ["--num_processes", "2"]
    assert subprocess.run(["bash", str(SCRIPTS / "single_node.sh")], capture_output=True).returncode == 2


# --- running: exit codes and signals ---------------------------------------------------------------------

def test_run_forwards_the_exit_code(tmp_path):
    assert run_plan(LaunchPlan([sys.executable, "-c", "import sys; sys.exit(3)"])) == 3
    assert run_plan(LaunchPlan([sys.executable, "-c", "import os; assert os.environ['X'] == ''"], env={"X": ""})) == 0


def test_a_failed_stage_exits_1_with_its_own_error(tmp_path):
    """Accelerate reports any failed process with exit 1; the stage's one-line error is on stderr above it."""
    env = _clean_env(tmp_path, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "simclr_cli", "launch", "--processes", "1", "pretrain",
                        str(tmp_path / "missing.toml")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "error:" in r.stderr and "missing.toml" in r.stderr


CHILD = r"""
import os, signal, subprocess, sys, time
from pathlib import Path
d = Path(sys.argv[1])
if sys.argv[2] == "launcher":  # dies on the first SIGTERM, like Accelerate's one-process launcher
    subprocess.Popen([sys.executable, __file__, sys.argv[1], "worker"])
    while True:
        time.sleep(1)
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append("TERM"))
signal.signal(signal.SIGINT, lambda s, f: got.append("INT"))
(d / "ready").write_text(str(os.getpgrp()))
while not got:
    time.sleep(0.05)
(d / "done").write_text(" ".join(got))   # the worker outlives its launcher: it is still saving its state
sys.exit(130)
"""

RUNNER = r"""
import sys
from simclr_cli.launch import LaunchPlan, run_plan
sys.exit(run_plan(LaunchPlan([sys.executable, sys.argv[1], sys.argv[2], "launcher"])))
"""


def test_a_signal_reaches_each_worker_once_and_the_launch_waits_for_it(tmp_path):
    """Ctrl-C on `simclr launch` reaches the worker once, as SIGTERM (a stage saves and stops); the launch
    exits 130 only after the worker ended, although its launcher died first."""
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(child), str(tmp_path)])
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
        assert (tmp_path / "done").read_text() == "TERM"
    finally:  # leave nothing behind when it failed
        proc.kill()
        group = (tmp_path / "ready").read_text() if (tmp_path / "ready").exists() else ""
        if group.isdigit() and int(group) != os.getpgrp():
            try:
                os.killpg(int(group), signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- a real run ------------------------------------------------------------------------------------------

TINY = """
name = "launch"
seed = 3
[data]
dataset = "synthetic"
image_size = 32
num_workers = 0
synthetic_train_size = 32
synthetic_val_size = 16
[augment]
strength = 0.5
[model]
backbone = "test_resnet"
proj_layers = 2
proj_dim = 16
[pretrain]
epochs = 1
batch_size = 16
optimizer = "lars"
lr = 0.3
warmup_epochs = 0
sync_bn = true
knn_every = 0
log_every = 1

[pretrain.simclr]
temperature = 0.2
"""


# Imported by every Python process of the launch (PYTHONPATH): on the first attempt, rank 1 SIGKILLs itself right
# after the first saved state, so torchrun must restart the group (a test-only fault, as in tests/stages/).
DIE_AFTER_FIRST_STATE = """
import os, signal
if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    from simclr_cli.stages import scaffold

    commit = scaffold.StageRun.commit

    def commit_then_die(self):
        commit(self)
        os.kill(os.getpid(), signal.SIGKILL)

    scaffold.StageRun.commit = commit_then_die
"""


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        for p in [*root.children(recursive=True), root]:
            p.kill()
    except psutil.NoSuchProcess:
        pass


@pytest.mark.multiprocess
def test_launch_two_cpu_processes_equals_torchrun_through_an_elastic_restart(tmp_path):
    """`simclr launch --processes 2` runs 2 gloo processes, and with --max-restarts a SIGKILLed worker is restarted
    and the run resumes: the final weights are bit-identical to an uninterrupted
    `torchrun --nproc_per_node 2` (global BN on)."""
    import torch
    from safetensors.torch import load_file

    recipe = tmp_path / "launch.toml"
    recipe.write_text(TINY)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(DIE_AFTER_FIRST_STATE)
    env = _clean_env(tmp_path, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    hooked = {**env, "PYTHONPATH": os.pathsep.join([str(hook), env.get("PYTHONPATH", "")])}
    # both at once (their start-ups overlap); each on a free port
    runs = [subprocess.Popen([sys.executable, "-m", "simclr_cli", "launch", "--processes", "2", "--max-restarts", "1",
                              "pretrain", str(recipe), "--out", str(tmp_path / "launch"), "-q",
                              "--set", "pretrain.checkpoint_every=1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=hooked),
            subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "simclr_cli", "pretrain", str(recipe), "--out", str(tmp_path / "torchrun"), "-q"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)]
    try:
        (_, a_err), (_, b_err) = (p.communicate(timeout=600) for p in runs)
    finally:  # leave nothing behind when it hung (the launch's processes are in their own group)
        for p in runs:
            if p.poll() is None:
                _kill_tree(p.pid)
    assert runs[0].returncode == 0, a_err[-4000:]
    assert "accelerate.commands.launch --num_processes 2 --multi_gpu" in a_err  # the command it ran
    assert "elastic restart 1: resuming" in a_err and "(step 1)" in a_err, a_err[-4000:]
    assert runs[1].returncode == 0, b_err[-4000:]
    wa = load_file(tmp_path / "launch" / "pretrain" / "model.safetensors")
    wb = load_file(tmp_path / "torchrun" / "pretrain" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    import json

    summary = json.loads((tmp_path / "launch" / "pretrain" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2


def test_the_documented_launch_commands_dry_run(tmp_path):
    """Every `simclr launch` line of docs/distributed.md builds a command (nothing documented is refused)."""
    lines = [line for line in (ROOT / "docs" / "distributed.md").read_text().splitlines()
             if line.startswith("simclr launch ")]
    assert len(lines) >= 4
    for line in lines:
        args = [a for a in shlex.split(line)[2:] if a != "--dry-run"]
        result, argv = _dry(tmp_path, *args, CUDA_VISIBLE_DEVICES="0,1")
        assert result.exit_code == 0, (line, result.output)
        assert argv[argv.index("simclr_cli") + 1:] == args[args.index("pretrain"):], line

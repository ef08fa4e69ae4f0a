"""``simclr launch``: run a stage under ``accelerate launch`` (thin wrapper; the command is built by
:mod:`simclr_cli.launch`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from simclr_cli.cli._app import DebugOpt, app, handle_errors
from simclr_cli.layout import LAUNCHABLE

if TYPE_CHECKING:
    from simclr_cli.launch import LaunchOptions

LAUNCH_PANEL = "Launch"
STAGE_HELP = f"{', '.join(LAUNCHABLE[:-1])} or {LAUNCHABLE[-1]}."  # from the stage registry


StageArg = Annotated[str, typer.Argument(metavar="STAGE", show_default=False, help=STAGE_HELP)]
ArgsArg = Annotated[Optional[list[str]], typer.Argument(
    metavar="ARGS...", show_default=False,
    help="The stage's arguments and options, passed through as they are (--set, --out, ...).")]
GpusOpt = Annotated[Optional[int], typer.Option(
    "--gpus", min=1, help="GPU processes per node (default: every GPU of the node, or the Accelerate config's).",
    show_default=False)]
ProcessesOpt = Annotated[Optional[int], typer.Option(
    "--processes", min=1, help="CPU processes per node (gloo), e.g. to try a multi-process run on a laptop.",
    show_default=False)]
NodesOpt = Annotated[Optional[int], typer.Option(
    "--nodes", min=1, help="Machines (default 1; under SLURM the job step's node count).", show_default=False)]
NodeRankOpt = Annotated[Optional[int], typer.Option(
    "--node-rank", min=0, help="This machine's rank, 0 to NODES-1 (under SLURM: $SLURM_NODEID).",
    show_default=False)]
MainAddressOpt = Annotated[Optional[str], typer.Option(
    "--main-address", metavar="HOST", help="Address of the rank-0 machine (under SLURM: the first host of the "
                                           "job's node list).", show_default=False)]
MainPortOpt = Annotated[Optional[int], typer.Option(
    "--main-port", min=0, max=65535, help="Port on the rank-0 machine (default 29500; 0: a free one, one node "
                                          "only).", show_default=False)]
MaxRestartsOpt = Annotated[Optional[int], typer.Option(
    "--max-restarts", min=0, help="Restart the process group up to K times when a process dies (torchrun "
                                  "elastic); the restarted run resumes from its last state.", show_default=False)]
JobIdOpt = Annotated[Optional[str], typer.Option(
    "--job-id", metavar="ID", help="With --nodes N --max-restarts K: the rendezvous id, the same on every node and "
                                   "new for each launch (under SLURM: the job id).", show_default=False)]
ConfigFileOpt = Annotated[Optional[Path], typer.Option(
    "--config-file", help="Accelerate config (default: $ACCELERATE_CONFIG_FILE, else `accelerate config`'s "
                          "default file when there is one).", show_default=False)]
DryRunOpt = Annotated[bool, typer.Option(
    "--dry-run", envvar="SIMCLR_LAUNCH_DRY_RUN", help="Print the command and exit without running it.")]


@app.command(
    "launch",
    rich_help_panel=LAUNCH_PANEL,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "allow_interspersed_args": False},
)
def launch(
    stage: StageArg,
    args: ArgsArg = None,
    gpus: GpusOpt = None,
    processes: ProcessesOpt = None,
    nodes: NodesOpt = None,
    node_rank: NodeRankOpt = None,
    main_address: MainAddressOpt = None,
    main_port: MainPortOpt = None,
    max_restarts: MaxRestartsOpt = None,
    job_id: JobIdOpt = None,
    config_file: ConfigFileOpt = None,
    dry_run: DryRunOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run a stage with [bold]accelerate launch[/bold]: on every GPU of a node, on several nodes, under SLURM, or as CPU processes.

    Builds `accelerate launch ... -m simclr_cli STAGE ARGS...`, shows it on stderr and runs it (--dry-run: prints it).
    Options go before STAGE; everything after STAGE goes to the stage as it is.

    Exit codes: 0 when every process succeeded; 1 when one failed (its own error is printed above Accelerate's report);
    2 for a launch that cannot work (nothing started); 130 after Ctrl-C or SIGTERM (the processes save their state).
    """
    from simclr_cli import launch as lib

    with handle_errors(debug):
        opts = lib.LaunchOptions(gpus=gpus, processes=processes, nodes=nodes, node_rank=node_rank,
                                 main_address=main_address, main_port=main_port, max_restarts=max_restarts,
                                 config_file=config_file, job_id=job_id)
        code = _build_and_run(opts, [stage, *(args or [])], dry_run)
    raise typer.Exit(code)


def _build_and_run(opts: LaunchOptions, stage_args: list[str], dry_run: bool) -> int:
    """Build the plan, print its notes, then print it (``--dry-run``, exit 0) or run it (its exit code)."""
    from simclr_cli import launch as lib

    plan = lib.build_plan(opts, stage_args, os.environ, check_gpus=not dry_run)
    for note in plan.notes:
        print(note, file=sys.stderr)
    if dry_run:
        print(plan.shell())
        return 0
    return lib.run_plan(plan, say=lambda line: print(f"simclr launch: {line}", file=sys.stderr, flush=True),
                        extra_env={lib.RELAUNCH_ENV: lib.relaunch_prefix(opts)})  # resume hints launch alike

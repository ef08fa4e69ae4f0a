"""The ``simclr`` command: thin Typer wrappers over the package's importable functions.

Each command parses its arguments, calls one plain function (``stages.<stage>.run``, ``embed.embed``,
``validate.validate_recipe``, ...) and prints what it returns. Its own options reach a stage as typed
recipe overrides, never as TOML text.

* ``_app``: the Typer apps, the shared options, errors to exit codes (``handle_errors``), commands registered from
  the stage registry (``stage_command``; the stages are listed once, in :data:`simclr_cli.layout.STAGES`).
* ``stage_base``: what the stage commands after pretrain share (``chained_stage_command``: their common options,
  their inputs by the chaining rules, their body).
* ``stage_commands``: one command per stage of the registry (embed's is with the run commands).
* ``run_commands``: info, runs, export, plot, embed.
* ``recipe_commands``: recipes list, show, validate; data check.
* ``data_commands``: data pack and data index (image folders and lists into indexed WebDataset shards).
* ``launch_commands``: launch (a stage under ``accelerate launch``, SLURM-aware).
* ``render``: the tables and the console they print on.

Exit codes: 0 ok, 1 runtime failure, 2 usage or recipe error, 130 interrupted
(state saved). Errors print one line on stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

# The thread budget first: OMP_WAIT_POLICY and OMP_NUM_THREADS act only when set before torch is imported.
from simclr_cli import threads as _threads

_threads.prepare_process()

from simclr_cli.cli._app import app  # noqa: E402

# Importing a command module registers its commands, in this order in --help: stages, runs, recipes.
from simclr_cli.cli import stage_commands, run_commands, recipe_commands, data_commands, launch_commands  # noqa: E402, F401, I001

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app(prog_name="simclr")

"""The stage scaffold: what every stage does around its own work, in one object.

A stage function is decorated with :func:`with_stage_run` and receives a :class:`StageRun` as ``stage_run``;
it then reads top to bottom as *build, run, report*::

    accelerator = stage_run.open(recipe, out_dir, STAGE, precision=(cfg.mixed_precision, "finetune.mixed_precision"))
    stage_run.check(overwrite=overwrite, resume=resume)          # never replace work by accident
    ...build data and model...                                   # stage-specific
    stage_run.start(overwrite=overwrite, resume=resume)          # set the old run aside, write recipe.toml
    ...train (``Trainer(..., **stage_run.training(...))``)...    # stage-specific
    if stage_run.main: ...evaluate...                            # stage-specific
    return stage_run.finish(stage_run.summary(top1=...), tensors=..., metadata=...)

The scaffold owns the stage folder and its checks, the Accelerator, main-process printing
(:attr:`StageRun.say`), ``recipe.toml``, the barriers, the base summary fields (stage, name, wall
time), writing ``model.safetensors`` + ``summary.json``, signals, and ``--overwrite`` that never
loses the previous run.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from simclr_cli.checkpoints import MODEL_FILE, STATE_DIR, StateWriteError, has_state, read_trainer, save_weights
from simclr_cli.checkpoints.lock import RunLock, RunLocked
from simclr_cli.engine import trackers as tracking
from simclr_cli.engine.setup import make_accelerator
from simclr_cli.engine.signals import StopRequest
from simclr_cli.errors import Interrupted, NothingToDo, SimclrError, UsageError
from simclr_cli.recipe import Recipe, recipe_to_dict, recipe_to_toml
from simclr_cli.stages.common import check_output, write_json
from simclr_cli.utils import atomic_write_text, file_sha256


class StageRun:
    """One invocation of a stage, from its first line to its last file (see :func:`with_stage_run`).

    * Ctrl-C and SIGTERM are caught from the start (:attr:`stop`). The training loop stops at a step
      boundary with state saved (a signal during setup: before its first step); a second Ctrl-C, or any
      signal in a stage without a loop, stops at once. Every stop ends as :class:`Interrupted` (exit 130)
      with a message that says what was kept and, when a state exists, the command that resumes it.
    * ``--overwrite`` never loses the previous run to a failure of the new one: :meth:`begin` moves
      ``RUN/STAGE`` aside to ``RUN/.STAGE.old-PID`` and the new run writes ``RUN/STAGE`` as usual (so every
      path, hint and process sees the usual folder). The old run is deleted once the new one is durable
      (:meth:`commit`: its first saved state, or its finished results) and moved back if the new run fails
      or stops before that.
    """

    def __init__(self, immediate: bool = False) -> None:
        self.stop = StopRequest(immediate=immediate)
        self.stage = ""
        self.stage_dir: Path | None = None
        self.state_dir: Path | None = None
        self.resume_cmd = ""
        self.main = True
        self._aside: Path | None = None
        self._restored = False
        self.recipe: Recipe | None = None
        self.accelerator = None
        self.show_progress = True
        self.t_start = time.perf_counter()
        self.say: Callable[..., None] = lambda *a, **k: None
        self._last_step = 0  # the last step given to the trackers (the summary is logged at it)
        self.lock: RunLock | None = None
        self._leftovers_said = False
        self.resume_step: int | None = None  # the state to resume from, as the main process decided (check())

    def configure(self, stage_dir: Path, stage: str, *, resume_cmd: str = "", keeps_state: bool = True) -> None:
        """Where the stage writes, whether it keeps resume state (``STAGE_DIR/state``), how to resume it."""
        self.stage_dir, self.stage = Path(stage_dir), stage
        self.state_dir = self.stage_dir / STATE_DIR if keeps_state else None
        self.resume_cmd = relaunched(resume_cmd)

    def begin(self, *, overwrite: bool, resume: bool = False, accelerator=None) -> None:
        """Create the stage folder; with ``overwrite`` (and not ``resume``) move the previous run aside first.
        Every process calls it; the main process moves folders while the others wait."""
        assert self.stage_dir is not None, "configure() first"
        if accelerator is not None:
            self.main = accelerator.is_main_process
            accelerator.wait_for_everyone()  # every process has looked at the old folder before it moves
        if self.main:
            with self.stop.shielded():  # a signal here must not lose track of the folder set aside
                self._warn_leftovers()
                if overwrite and not resume and self.stage_dir.exists():
                    aside = self.stage_dir.with_name(f".{self.stage_dir.name}.old-{os.getpid()}")
                    try:
                        self.stage_dir.rename(aside)
                    except OSError as e:
                        raise UsageError(f"{self.stage_dir}: cannot move the previous run aside to replace it "
                                         f"({e.strerror}); make {self.stage_dir.parent} writable, or pass --out DIR "
                                         "to write elsewhere (the previous run is untouched)") from None
                    self._aside = aside
                self.stage_dir.mkdir(parents=True, exist_ok=True)
        if accelerator is not None:
            accelerator.wait_for_everyone()

    # -- the scaffold: build, run, report ---------------------------------------------------------------------

    def open(self, recipe: Recipe, out_dir: str | Path, stage: str, *, precision: tuple[str, str] | None = None,
             resume_cmd: str = "", keeps_state: bool = True, show_progress: bool = True):
        """Start the stage: its folder ``OUT/STAGE``, the Accelerator (``precision``: the recipe value and its
        key, for the error message), main-process printing. Returns the Accelerator."""
        self.t_start = time.perf_counter()
        self.recipe = recipe
        tracking.require_trackers(tracking.tracker_names(recipe))  # a missing extra: before any work
        self.configure(Path(out_dir) / stage, stage, resume_cmd=resume_cmd, keeps_state=keeps_state)
        value, key = precision or ("no", f"{stage}.mixed_precision")
        join_group(self.stop)
        self.accelerator = make_accelerator(value, key=key, log_with=self._trackers(), project_dir=self.stage_dir)
        self.main = self.accelerator.is_main_process
        refused: RunLocked | None = None
        if self.main:  # one writer per stage folder; refused at once when another live command holds it
            self.lock = RunLock(self.stage_dir, stage)
            try:
                self.lock.acquire()
            except RunLocked as e:
                refused = e
        if self.accelerator.num_processes > 1:  # every process learns it, before any of them looks at the folder
            flag = torch.tensor([0 if refused is None else 1], device=self.accelerator.device)
            if int(self.accelerator.reduce(flag, reduction="sum").item()) and refused is None:
                raise RunLocked(f"{self.stage_dir} is being written by another command (the main process names it)")
        if refused is not None:
            raise refused
        self.show_progress = show_progress
        self.say: Callable[..., None] = print if show_progress and self.main else (lambda *a, **k: None)
        return self.accelerator

    def check(self, *, overwrite: bool, resume: bool = False, force: bool = False,
              resumable_changes: frozenset[str] = frozenset(), auto_resume: bool = False) -> bool:
        """Whether the stage resumes, decided by the main process for every process (issue 19, B.5), and the
        checks that never replace finished or interrupted work by accident (on resume: the recipe).

        ``resume``: ``--resume`` was given. Otherwise the stage resumes by :func:`auto_resume` (``auto_resume``:
        ``--auto-resume`` was given). A stage folder that already holds the finished run (of this recipe with
        ``--auto-resume``; of this launch under an elastic restart) is done: :class:`NothingToDo` (a note, exit 0).
        The main process reads the folder, decides and says so; every process gets the decision and the step to
        resume from, and checks that it sees that state (a shared file system out of sync is an error, exit 1,
        rather than processes resuming from different states). Returns whether the stage resumes;
        :attr:`resume_step` is the step.
        """
        assert self.stage_dir is not None, "open() first"
        if self.main:  # before any refusal: `--resume` after a killed --overwrite must say where the old run is
            self._warn_leftovers()
        decision: list[Any] = ["", None, ""]  # kind ("resume", "fresh", "done", "error"), step, message
        if self.main:
            decision = self._decide(overwrite=overwrite, resume=resume, force=force, explicit=auto_resume,
                                    resumable_changes=resumable_changes)
        accelerator = self.accelerator
        several = accelerator is not None and accelerator.num_processes > 1
        if several:
            import torch.distributed as dist

            dist.broadcast_object_list(decision, src=0)
        kind, step, message = decision
        if kind == "error":
            raise UsageError(message)
        if kind == "done":
            raise NothingToDo(message)
        self.resume_step = step if kind == "resume" else None
        if several:  # every process must see the state the main process resumes from
            import torch.distributed as dist

            sees = [None] * accelerator.num_processes
            dist.all_gather_object(sees, self.resume_step is None
                                   or read_trainer(self.state_dir, self.resume_step) is not None)
            blind = [str(rank) for rank, ok in enumerate(sees) if not ok]
            if blind:
                state = self.state_dir / f"step-{self.resume_step:09d}"
                raise SimclrError(
                    f"process(es) {', '.join(blind)} of {accelerator.num_processes} do not see {state}, the state the "
                    f"main process resumes from: the nodes see {self.state_dir} differently (a shared file system "
                    "that caches listings, e.g. NFS: mount it with lookupcache=positive or noac, or put the run on a "
                    "file system every node sees alike), then run the command again")
        if message and self.main:
            print(f"note: {message}", file=sys.stderr, flush=True)
        return kind == "resume"

    def _decide(self, *, overwrite: bool, resume: bool, force: bool, explicit: bool,
                resumable_changes: frozenset[str]) -> list[Any]:
        """The main process's decision for :meth:`check`: ``[kind, step, message]``."""
        from simclr_cli.checkpoints import latest_state

        stage_dir = self.stage_dir
        try:
            note = ""
            if not resume:
                recipe = self.recipe
                restart = own_launch(stage_dir)
                if recipe is not None and (explicit or restart) and finished_with(stage_dir, recipe,
                                                                                       resumable_changes):
                    if explicit:
                        return ["done", None, f"--auto-resume: {stage_dir} already holds the finished run of this "
                                              "recipe; nothing to do"]
                    return ["done", None, f"elastic restart: {stage_dir} already holds the finished run that this "
                                          f"launch ({os.environ.get(ELASTIC_RUN_ID)}) started; nothing to do"]
                resume = auto_resume(stage_dir, recipe, explicit=explicit, resumable_changes=resumable_changes)
                if not resume and explicit and recipe is not None and has_state(self.state_dir) and \
                        not (stage_dir / "summary.json").exists() and not same_recipe(stage_dir, recipe,
                                                                                     resumable_changes):
                    raise UsageError(f"--auto-resume: {stage_dir} holds an unfinished run of another recipe than "
                                     f"this one (see {stage_dir / 'recipe.toml'}); continue it with --resume (its "
                                     "own recipe), replace it with --overwrite, or pass --out DIR to write elsewhere")
                if resume:
                    count = elastic_restart()
                    why = "--auto-resume" if explicit else f"elastic restart{f' {count}' if count else ''}"
                    step = (read_trainer(self.state_dir) or {}).get("step", "?")
                    note = f"{why}: resuming {stage_dir} from its last complete state (step {step})"
            check_output(stage_dir, self.stage, overwrite=overwrite, resume=resume, recipe=self.recipe, force=force,
                         resume_cmd=self.resume_cmd, resumable_changes=resumable_changes)
        except UsageError as e:
            return ["error", None, str(e)]
        latest = latest_state(self.state_dir) if resume and self.state_dir is not None else None
        step = int(json.loads((latest / "trainer.json").read_text())["step"]) if latest is not None else None
        return ["resume" if resume else "fresh", step, note]

    def start(self, *, overwrite: bool, resume: bool = False,
              files: dict[str, Callable[[Path], None]] | None = None) -> None:
        """Everything is built: set a previous run aside (``--overwrite``), write ``recipe.toml`` and any
        ``files`` (name -> writer of that path) on the main process, and wait for every process."""
        self.begin(overwrite=overwrite, resume=resume, accelerator=self.accelerator)
        self._start_trackers(resume)
        if self.main:
            atomic_write_text(self.stage_dir / "recipe.toml", recipe_to_toml(self.recipe))
            if ELASTIC_RUN_ID in os.environ:  # which launch owns the run: its elastic restarts resume it
                atomic_write_text(self.stage_dir / LAUNCH_FILE, json.dumps({"run_id": os.environ[ELASTIC_RUN_ID]}))
            for name, write in (files or {}).items():
                write(self.stage_dir / name)
        self.accelerator.wait_for_everyone()

    def training(self, *, resume: bool = False, force: bool = False, interrupt_after: int | None = None) -> dict:
        """The keyword arguments :class:`~simclr_cli.engine.fit.Trainer` and :func:`~simclr_cli.engine.fit.fit`
        take from the stage: where metrics and states go, the resume hint, signals, and the overwrite commit."""
        return {"stage": self.stage, "metrics_path": self.stage_dir / "metrics.jsonl",
                "show_progress": self.show_progress, "state_dir": self.state_dir, "resume": resume, "force": force,
                "resume_step": self.resume_step if resume else None,
                "resume_hint": f"Resume with: {self.resume_cmd}" if self.resume_cmd else "",
                "interrupt_after": interrupt_after, "description": self.recipe.name,
                "track": self.track, "stop": self.stop, "on_save": self.commit}

    def summary(self, **fields: Any) -> dict[str, Any]:
        """``{"stage", "name", **fields, "wall_seconds", "threads"}`` (``fields`` may set its own ``wall_seconds``).

        ``threads``: what this process ran with (the CPUs of its thread budget, its intra-op threads, the
        DataLoader workers of ``data.num_workers``): float results can depend on the thread count."""
        from simclr_cli import threads

        out = {"stage": self.stage, "name": self.recipe.name, **fields}
        out.setdefault("wall_seconds", round(time.perf_counter() - self.t_start, 2))
        budget = threads.current()
        out["threads"] = {"cpus": budget.cpus, "intra_op": torch.get_num_threads(),
                          "workers": threads.resolve_workers(self.recipe.data.num_workers,
                                                             gpu=torch.cuda.is_available(), budget=budget)}
        return out

    def finish(self, summary: dict[str, Any], *, tensors: dict[str, torch.Tensor] | None = None,
               metadata: dict[str, str] | None = None) -> dict[str, Any]:
        """Write ``model.safetensors`` (when ``tensors``) and ``summary.json`` on the main process, wait for every
        process, and return ``summary``. The summary records the checkpoint's SHA-256 (``model_sha256``), so that
        its numbers are told apart from those of another checkpoint written to the same place later
        (:func:`simclr_cli.export.run_summaries`)."""
        if self.main:
            if tensors is not None:
                save_weights(self.stage_dir / MODEL_FILE, tensors, metadata or {})
                summary["model_sha256"] = file_sha256(self.stage_dir / MODEL_FILE)
            write_json(self.stage_dir / "summary.json", summary)
            self._refresh_plots()
            self.track({f"summary/{k}": v for k, v in tracking.scalars(summary).items()}, self._last_step)
        self.accelerator.wait_for_everyone()
        return summary

    def _refresh_plots(self) -> None:
        """Redraw this stage's curves (RUN/plots/STAGE_curves.png) when the plot extra is installed, so that a
        finished stage needs no ``simclr plot``; never fails the stage."""
        from simclr_cli.plots import refresh_curves

        png = refresh_curves(self.stage_dir.parent, self.stage)
        if png is not None:
            self.say(f"curves: {png}")

    # -- experiment trackers (engine/trackers.py) ------------------------------------------------------------

    def _trackers(self) -> list:
        return tracking.build_trackers(tracking.tracker_names(self.recipe), self.stage_dir,
                                       project=self.recipe.tracker_project, run_name=f"{self.recipe.name}/{self.stage}")

    def _start_trackers(self, resume: bool) -> None:
        """Start the trackers (their files go into the new stage folder, so after :meth:`begin`) with the
        resolved recipe as the run's config; every process calls it, Accelerate starts them on the main one."""
        if self.accelerator is not None and self.accelerator.log_with and not self.accelerator.trackers:
            saved = read_trainer(self.state_dir, self.resume_step) if resume and self.state_dir is not None else None
            ids_file = self.stage_dir / tracking.TRACKER_FILE
            if saved is not None:
                tracking.resume_trackers(self.accelerator.log_with, saved["step"], tracking.read_ids(ids_file))
            config = {"stage": self.stage, **tracking.flat_config(recipe_to_dict(self.recipe))}
            self.accelerator.init_trackers(self.recipe.tracker_project, config=config)
            if self.main and tracking.run_ids(self.accelerator.trackers):
                atomic_write_text(ids_file, json.dumps(tracking.run_ids(self.accelerator.trackers)) + "\n")
        self._last_step = 0

    def track(self, values: dict[str, float], step: int) -> None:
        """Numbers to the trackers at ``step`` (main process only; a no-op without trackers)."""
        if self.main and self.accelerator is not None and self.accelerator.trackers and values:
            self._last_step = max(self._last_step, int(step))
            self.accelerator.log(values, step=int(step))

    def _end_trackers(self, status: str) -> None:
        if self.accelerator is None or not self.accelerator.trackers:
            return
        try:
            tracking.finish_trackers(self.accelerator, status)
        except Exception as e:  # noqa: BLE001 - a tracker that cannot close must not hide the stage's own outcome
            print(f"warning: closing the experiment trackers failed: {e}", file=sys.stderr)


    def commit(self) -> None:
        """The new run is durable: delete the previous one (main process; no-op without one)."""
        aside, self._aside = self._aside, None
        if aside is not None and self.main:
            shutil.rmtree(aside, ignore_errors=True)

    def _rollback(self) -> None:
        aside, self._aside = self._aside, None
        if aside is None or not self.main or self.stage_dir is None:
            return
        shutil.rmtree(self.stage_dir, ignore_errors=True)
        try:
            aside.rename(self.stage_dir)
            self._restored = True
        except OSError as e:
            print(f"warning: the previous {self.stage} run is in {aside}: moving it back to {self.stage_dir} failed "
                  f"({e.strerror}); move it back by hand", file=sys.stderr)

    def _warn_leftovers(self) -> None:
        assert self.stage_dir is not None
        if self._leftovers_said:
            return
        self._leftovers_said = True
        for old in sorted(self.stage_dir.parent.glob(f".{self.stage_dir.name}.old-*")):
            print(f"warning: {old} holds a previous {self.stage} run set aside by an --overwrite that was killed; "
                  f"move it back to {self.stage_dir} to keep it, or delete it", file=sys.stderr)

    def _stopped(self) -> Interrupted:
        """The truth after a stop at once (a second Ctrl-C, or a signal outside the training loop)."""
        how = self.stop.signal_name or "SIGINT"
        if self.stage_dir is None:
            return Interrupted(f"stopped by {how} before the stage started; nothing was written")
        saved = read_trainer(self.state_dir) if self.state_dir is not None else None
        if saved is not None:
            return Interrupted(f"stopped by {how}; the last saved state (step {saved['step']}) is in {self.state_dir}. "
                               f"Resume with: {self.resume_cmd}")
        if self.state_dir is None:
            return Interrupted(f"stopped by {how}; this stage keeps no state, run it again")
        return Interrupted(f"stopped by {how} before any state was saved; run the command again")

    def __enter__(self) -> "StageRun":
        self.stop.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        stopped = self._stopped() if isinstance(exc, KeyboardInterrupt) else None  # about this run, before any rollback
        self._end_trackers("FINISHED" if exc is None else
                           "KILLED" if isinstance(exc, (KeyboardInterrupt, Interrupted)) else "FAILED")
        try:
            with self.stop.shielded(deliver=False):
                if exc is None:
                    self.commit()
                else:
                    self._rollback()
        finally:
            try:
                if self.lock is not None:
                    self.lock.release()
            finally:
                self.stop.__exit__(None, None, None)
        if isinstance(exc, StateWriteError):  # disk full, read-only folder: what was kept, and how to go on
            if self._restored:
                raise StateWriteError(f"{exc}; {self.stage_dir} still holds the previous run") from None
            if self.state_dir is not None and self.resume_cmd and has_state(self.state_dir):
                raise StateWriteError(f"{exc}; then resume with: {self.resume_cmd}") from None
            raise StateWriteError(f"{exc}; then run the command again") from None
        kept = f" ({self.stage_dir} still holds the previous run)" if self._restored else ""
        if exc is None:
            if self.stop.requested:  # the signal came while the results were being written
                raise Interrupted(f"stopped by {self.stop.signal_name} as the {self.stage} run finished; its results "
                                  f"in {self.stage_dir} are complete")
            return False
        if stopped is not None:
            raise Interrupted(f"{stopped}{kept}") from None
        if isinstance(exc, Interrupted) and kept and "state saved in" not in str(exc):
            raise Interrupted(f"{exc}{kept}") from None
        if isinstance(exc, Interrupted) and kept:
            # The stop saved a state, but the --overwrite run was not durable yet: it is discarded (its resume
            # hint would point at nothing) and the previous run is back.
            how = self.stop.signal_name or "interrupt"
            raise Interrupted(f"stopped by {how} before the new {self.stage} run replaced the previous one: "
                              f"{self.stage_dir} still holds the previous run, and the new run was discarded; "
                              "run the command again to replace it") from None
        if kept and not isinstance(exc, Interrupted):  # any other failure: its one line says the old run is back
            if len(exc.args) == 1 and isinstance(exc.args[0], str) and not isinstance(exc, OSError):
                exc.args = (f"{exc.args[0]}{kept}",)
            else:  # an exception whose text is not its one argument: the note on a line of its own
                print(f"note: {self.stage_dir} still holds the previous run", file=sys.stderr)
        return False


ELASTIC_RESTARTS = "TORCHELASTIC_RESTART_COUNT"  # set by torchrun / accelerate launch (the elastic agent)
ELASTIC_RUN_ID = "TORCHELASTIC_RUN_ID"  # the same for every restart of one launch
LAUNCH_FILE = ".launch.json"  # in the stage folder: the elastic launch that started the run


def relaunched(command: str) -> str:
    """A ``simclr STAGE ...`` resume command under the launch that started this process: ``simclr launch``
    passes its options in ``SIMCLR_LAUNCH_PREFIX`` (launch.RELAUNCH_ENV), so the hint runs as many processes."""
    prefix = os.environ.get("SIMCLR_LAUNCH_PREFIX", "").strip()
    if prefix and command.startswith("simclr "):
        return f"{prefix} {command[len('simclr '):]}"
    return command


def elastic_restart() -> int:
    """How many times the elastic launcher restarted this process group (0: the first attempt, or no launcher)."""
    try:
        return int(os.environ.get(ELASTIC_RESTARTS, "0") or 0)
    except ValueError:
        return 0


JOIN_TIMEOUT = "SIMCLR_JOIN_TIMEOUT"  # seconds a process waits for the others to join the process group


def join_timeout() -> float:
    """How long joining the process group may take (``$SIMCLR_JOIN_TIMEOUT`` seconds, default 600)."""
    try:
        return max(1.0, float(os.environ.get(JOIN_TIMEOUT, "") or 600))
    except ValueError:
        raise UsageError(f"${JOIN_TIMEOUT}={os.environ[JOIN_TIMEOUT]!r} is not a number of seconds") from None


def join_group(stop: StopRequest | None = None) -> None:
    """Join the process group of a torchrun / ``accelerate launch`` process (Accelerate then uses it); a no-op
    without a launcher or when the group exists.

    Every attempt of every node joins the same way, so nothing depends on ``TORCHELASTIC_RESTART_COUNT``, which
    torchelastic raises only on the node whose worker failed (issue 19, B.4):

    * The ranks meet in the launcher's store (the agent's, which torch >= 2.4 shares with the workers and keeps
      across restarts; else one that rank 0 serves) and agree on a round number, :func:`_agree_round`. The group is
      then initialized through a store prefix of that round, so a restarted group never reads the keys of the dead
      one (``Gloo connectFullMesh failed``, pytorch/pytorch#135712).
    * Waiting for the others polls, so SIGINT/SIGTERM (``stop``) stop it within a fraction of a second, and a rank
      that does not come within :func:`join_timeout` is a clear error, not a hang.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world < 2 or "MASTER_ADDR" not in os.environ or "RANK" not in os.environ:
        return
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        return
    from datetime import timedelta

    rank = int(os.environ["RANK"])
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    limit = join_timeout()
    waiting = _JoinWait(rank, world, f"the store at {host}:{port}", limit, stop)
    store = None
    while store is None:  # a client connects in short tries (the server may not be up yet)
        try:
            store = dist.TCPStore(host, port, is_master=rank == 0 and not shared, timeout=timedelta(seconds=2),
                                  wait_for_workers=False, multi_tenant=rank == 0 and not shared)
        except (RuntimeError, OSError):
            if rank == 0 and not shared:
                raise
            waiting("rank 0's store")
    store.set_timeout(timedelta(seconds=max(limit, 30)))
    round_ = _agree_round(store, rank, world, waiting)
    timeout = timedelta(hours=3)  # as engine.setup.make_accelerator
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            store=dist.PrefixStore(f"simclr/round-{round_}", store), timeout=timeout,
                            rank=rank, world_size=world)


class _JoinWait:
    """Called between two polls while joining the process group: stops on a signal (``stop``), says once what it
    waits for after 5 s, and fails once ``limit`` seconds have passed since it was made."""

    def __init__(self, rank: int, world: int, where: str, limit: float, stop: StopRequest | None) -> None:
        self.rank, self.world, self.where, self.limit, self.stop = rank, world, where, limit, stop
        self.started = time.monotonic()
        self.deadline = self.started + limit
        self.told = False

    def __call__(self, what: str) -> None:
        rank, world, where, limit, stop = self.rank, self.world, self.where, self.limit, self.stop
        if not self.told and time.monotonic() - self.started > 5:
            self.told = True
            sys.stderr.write(f"note: rank {rank} of {world} waits for {what} to join the process group ({where}); it "
                             f"gives up after {limit:g} s (${JOIN_TIMEOUT})\n")
            sys.stderr.flush()
        if stop is not None and stop.requested:
            raise Interrupted(f"stopped by {stop.signal_name} while joining the process group ({what}); nothing "
                              "was written, run the command again")
        if time.monotonic() > self.deadline:
            raise SimclrError(f"joining the process group: rank {rank} of {world} waited {limit:g} s for {what} to "
                              f"join ({where}); a process of another node may have failed to start or be stuck: check "
                              f"its log (${JOIN_TIMEOUT}=SECONDS waits longer)")
        time.sleep(0.02)


def _agree_round(store, rank: int, world: int, waiting: Callable[[str], None]) -> int:
    """A number all ranks of this group agree on and no earlier group of the launch used, through ``store``
    (which may hold the keys of dead groups). Rank 0 takes the next number; every other rank asks for it under a
    token of its own and acknowledges the number it got; rank 0 answers every token it sees until each rank has
    acknowledged this number: a dead group's token is answered but never acknowledged with it, so stale keys are
    never taken for current ones."""
    import uuid

    key = "simclr/join"
    if rank == 0:
        number = store.add(f"{key}/round", 1)
        pending = set(range(1, world))
        answered: dict[int, str] = {}
        while pending:
            for k in sorted(pending):
                if not store.check([f"{key}/ask/{k}"]):
                    continue
                token = store.get(f"{key}/ask/{k}").decode()
                if answered.get(k) != token:
                    store.set(f"{key}/answer/{k}/{token}", str(number))
                    answered[k] = token
                if store.check([f"{key}/ack/{k}/{token}/{number}"]):
                    pending.discard(k)
            if pending:
                waiting(f"rank(s) {', '.join(map(str, sorted(pending)))}")
        return number
    token = uuid.uuid4().hex
    store.set(f"{key}/ask/{rank}", token)
    while not store.check([f"{key}/answer/{rank}/{token}"]):
        waiting("rank 0")
    number = int(store.get(f"{key}/answer/{rank}/{token}").decode())
    store.set(f"{key}/ack/{rank}/{token}/{number}", "1")
    return number


def own_launch(stage_dir: Path) -> bool:
    """Whether this process's elastic launch started the run in ``stage_dir`` (its ``TORCHELASTIC_RUN_ID`` is the
    one in ``STAGE/.launch.json``): then this is a restart of that launch, on whichever node. torchrun's default id
    "none" (plain ``torchrun --nnodes N`` without ``--rdzv_id``) names no launch; there it also takes
    ``TORCHELASTIC_RESTART_COUNT`` > 0, which only the node of a failed worker sees."""
    run_id = os.environ.get(ELASTIC_RUN_ID, "")
    if not run_id:
        return False
    try:
        owner = json.loads((Path(stage_dir) / LAUNCH_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return False
    if owner != run_id:
        return False
    return run_id != "none" or elastic_restart() > 0


def auto_resume(stage_dir: Path, recipe: Recipe | None, *, explicit: bool = False,
                resumable_changes: frozenset[str] = frozenset()) -> bool:
    """Whether a command that did not say ``--resume`` continues the run in ``stage_dir`` (the rule, also in
    docs/distributed.md):

    * under an elastic launch: when ``stage_dir`` holds a complete state of an unfinished run that this same launch
      started (:func:`own_launch`) with the same recipe: a restart;
    * with ``--auto-resume`` (``explicit``): when ``stage_dir`` holds a complete state of an unfinished run with
      the same recipe, whoever started it.

    Otherwise the command runs as typed: a fresh start, ``--overwrite`` setting the old run aside, or the
    refusal to replace work. So a restart never sets aside the run its first attempt wrote, and a restart of a
    first attempt that was refused does not resume the run it refused to touch. Under several processes only the
    main process applies the rule (:meth:`StageRun.check`).
    """
    if recipe is None:
        return False
    stage_dir = Path(stage_dir)
    if (stage_dir / MODEL_FILE).exists() or (stage_dir / "summary.json").exists():
        return False
    if not has_state(stage_dir / STATE_DIR):
        return False
    if not explicit and not own_launch(stage_dir):
        return False
    return same_recipe(stage_dir, recipe, resumable_changes)


def same_recipe(stage_dir: Path, recipe: Recipe, resumable_changes: frozenset[str] = frozenset()) -> bool:
    """Whether ``stage_dir/recipe.toml`` is ``recipe``, but for keys a resume may change."""
    saved = Path(stage_dir) / "recipe.toml"
    if not saved.is_file():
        return False
    from simclr_cli.recipe import parse_saved_toml, recipe_diff, recipe_from_dict

    try:
        before = recipe_from_dict(parse_saved_toml(saved.read_text(), str(saved)), str(saved))
    except SimclrError:
        return False
    return not [k for k in recipe_diff(before, recipe) if k not in resumable_changes]


def finished_with(stage_dir: Path, recipe: Recipe, resumable_changes: frozenset[str] = frozenset()) -> bool:
    """Whether ``stage_dir`` holds a finished run of ``recipe`` (``--auto-resume`` then has nothing to do)."""
    stage_dir = Path(stage_dir)
    return ((stage_dir / MODEL_FILE).exists() and (stage_dir / "summary.json").exists()
            and same_recipe(stage_dir, recipe, resumable_changes))


def with_stage_run(immediate: bool = False):
    """Run a stage function inside a :class:`StageRun`, passed to it as ``stage_run``. ``immediate``: the stage has
    no training loop to stop at a step boundary, so a signal stops it at once."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with StageRun(immediate=immediate) as stage_run:
                return fn(*args, stage_run=stage_run, **kwargs)
        return run
    return wrap

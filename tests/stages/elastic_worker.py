"""``simclr`` under torchrun with a test-only fault on the first attempt (TORCHELASTIC_RESTART_COUNT=0).

    python elastic_worker.py MODE SIMCLR-ARGS...

MODE ``kill-after-save``: rank 1 SIGKILLs itself right after the second saved state (step 4 with
checkpoint_every=2). MODE ``kill-after-last-save``: rank 1 SIGKILLs itself after the last state (step 8), once
rank 0 has written the finished run's summary.json. MODE ``kill-while-saving``: rank 0, the writer, writes half of the second state's
optimizer.pt temp file, then SIGKILLs itself. MODE ``none``: no fault. The restarted group runs the same command
unpatched.
"""

import os
import signal
import sys
from pathlib import Path

mode, args = sys.argv[1], sys.argv[2:]
first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
rank = int(os.environ.get("RANK", "0"))

if first_attempt and mode == "kill-after-save" and rank == 1:
    from simclr_cli.stages import scaffold

    commit = scaffold.StageRun.commit
    saves = []

    def commit_then_die(self):  # called on every process after each saved state
        commit(self)
        saves.append(1)
        if len(saves) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    scaffold.StageRun.commit = commit_then_die

if first_attempt and mode == "kill-after-last-save" and rank == 1:
    import time

    from simclr_cli.checkpoints import read_trainer
    from simclr_cli.stages import scaffold

    commit = scaffold.StageRun.commit

    def commit_last_then_die(self):
        commit(self)
        if (read_trainer(self.state_dir) or {}).get("step") == 8:
            deadline = time.monotonic() + 600
            while not (self.stage_dir / "summary.json").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)

    scaffold.StageRun.commit = commit_last_then_die

if first_attempt and mode == "kill-while-saving" and rank == 0:
    import simclr_cli.checkpoints as checkpoints

    write = checkpoints.atomic_write_bytes

    def write_half_then_die(path, data):
        path = Path(path)
        if path.name == "optimizer.pt" and path.parent.name == "step-000000004.tmp":
            with open(path.with_name(f".{path.name}.half.tmp"), "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return write(path, data)

    checkpoints.atomic_write_bytes = write_half_then_die

from simclr_cli.cli import app  # noqa: E402

app(args, prog_name="simclr")

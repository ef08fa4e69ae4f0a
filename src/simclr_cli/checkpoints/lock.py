"""One writer per stage folder: a lock file beside it, ``OUT/.STAGE.lock``.

The lock is taken atomically (``O_CREAT | O_EXCL``) and holds JSON ``{pid, host, start, command}`` so a
refused command can name the holder. The holder also keeps an ``fcntl.flock`` on it, which the kernel drops
when the holder dies however it dies (SIGKILL, a crashed node's process on this host): a lock file whose
flock is free, or whose pid is gone on this host, is stale and taken over, with a line saying so (an elastic
restart's new rank 0 takes over from its dead predecessor this way). Only the main process of a
multi-process run takes it. The lock sits beside ``OUT/STAGE``, not inside, so ``--overwrite`` may move the
stage folder aside while holding it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

from simclr_cli.errors import SimclrError

try:  # POSIX; elsewhere the pid check alone detects a stale lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

EXIT_LOCKED = 2  # the project's "fix the command or the output folder" code: another command is writing there


class RunLocked(SimclrError):
    """Another live command writes into the same stage folder (exit 2, like any output folder that cannot be written)."""

    exit_code = EXIT_LOCKED


def lock_path(stage_dir: Path) -> Path:
    stage_dir = Path(stage_dir)
    return stage_dir.with_name(f".{stage_dir.name}.lock")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: another open file holds it; None: no flock here (the pid check alone decides)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # e.g. ENOLCK on a file system without flock
        return None
    return True


class RunLock:
    """The lock of one stage folder; :meth:`acquire` or raise :class:`RunLocked`, :meth:`release` at the end."""

    def __init__(self, stage_dir: Path, stage: str = "", say: Callable[[str], None] | None = None) -> None:
        self.stage_dir = Path(stage_dir)
        self.stage = stage or self.stage_dir.name
        self.path = lock_path(self.stage_dir)
        self.fd: int | None = None
        self._created: list[Path] = []
        self.say = say or (lambda line: print(line, file=sys.stderr))

    def _record(self) -> bytes:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "start": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime()),
                "command": " ".join(["simclr", *sys.argv[1:]])[:300]}
        return (json.dumps(info) + "\n").encode()

    def acquire(self) -> None:
        missing = self.path.parent
        while not missing.exists() and missing.parent != missing:
            self._created.append(missing)  # folders made for the lock, removed with it when left empty
            missing = missing.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # lost races (another taker in between) retry
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o644)
            except FileExistsError:
                if self._take_over_stale():
                    return
                continue
            if _try_flock(fd) is False:  # a taker that flocked the new file between our create and flock
                os.close(fd)
                continue
            os.write(fd, self._record())
            self.fd = fd
            return
        raise RunLocked(f"{self.path}: could not take the lock of {self.stage_dir} (it kept changing); "
                        "run the command again")

    def _take_over_stale(self) -> bool:
        """The lock file exists: take it over when its holder is dead; refuse when it is alive."""
        try:
            fd = os.open(self.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return False  # released in between: create it again
        except OSError as e:  # a folder (or something else unopenable) where the lock file goes
            raise RunLocked(f"{self.path}: cannot use it as the lock of {self.stage_dir} ({e.strerror}); "
                            "move or delete it, or pass --out DIR to write elsewhere") from None
        try:
            info = _read_info(fd)
            free = _try_flock(fd) is True  # its holder's flock went with it
            here = info.get("host") == socket.gethostname()
            dead = here and not pid_alive(int(info.get("pid", -1) or -1))
            if not free and not dead:
                raise RunLocked(f"{self.stage_dir} is being written by another command: pid {info.get('pid', '?')} "
                                f"on {info.get('host', '?')}, started {info.get('start', '?')} "
                                f"({info.get('command', '?')}); wait for it to finish, or pass --out DIR to write "
                                f"elsewhere (if that process is gone, delete {self.path})")
            if not self.path.exists() or os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                os.close(fd)
                return False  # replaced in between
            if not free:  # the holder's pid is gone but its flock lives on (e.g. in a forked child): a new file
                os.close(fd)
                self.path.unlink(missing_ok=True)
                return False
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, self._record())
        except BaseException:
            if self.fd != fd:
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise
        self.fd = fd
        self.say(f"note: took over the lock of {self.stage_dir} left by pid {info.get('pid', '?')} on "
                 f"{info.get('host', '?')} (started {info.get('start', '?')}), which is no longer running")
        return True

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            if self.path.exists() and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                self.path.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)  # drops the flock
        for folder in self._created:  # innermost first: a refused command leaves no empty run folder behind
            try:
                folder.rmdir()
            except OSError:
                break

    @property
    def held(self) -> bool:
        return self.fd is not None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_info(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        info = json.loads(raw.decode() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}

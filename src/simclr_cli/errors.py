"""Errors a person can act on, each with the exit code the CLI uses for it."""

from __future__ import annotations

import errno


class SimclrError(Exception):
    """Base class: a one-line message for the user and an exit code.

    Exit code 2 means the user must fix the command or the recipe, 1 means a
    failure at run time.
    """

    exit_code = 1


class UsageError(SimclrError):
    """A bad command line, recipe name or argument (exit 2)."""

    exit_code = 2


class RecipeError(UsageError):
    """A recipe that cannot be read or does not validate (exit 2)."""


class DataError(SimclrError):
    """Data that cannot be found or read (exit 2 when missing, see ``missing``)."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        if missing:
            self.exit_code = 2


class Interrupted(SimclrError):
    """Training stopped by Ctrl-C or SIGTERM after saving its state (exit 130)."""

    exit_code = 130


class NothingToDo(SimclrError):
    """The work is already done (e.g. an elastic restart finds the run its launch started finished): the CLI says
    so in a note and exits 0."""

    exit_code = 0


class DiskFull(SimclrError):
    """A write failed for lack of space: a runtime failure (exit 1); what was saved before is intact."""

    exit_code = 1


def from_os_error(e: OSError, path: object = None) -> SimclrError | None:
    """The one-line error for a file-system refusal (disk full, permissions, a file where a folder must be).

    ``path`` is the file being written (the writers pass it); without it the error's own file name is
    used and the message does not assume a write. None when ``e`` is none of these (an unexpected failure).
    """
    writing = path is not None
    where = path if writing else (e.filename or "a file")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"{where}: no space left on device; it was not written and what was saved before it "
                        "(the last complete state) is intact: free some space, then run again "
                        "(with --resume where a stage saved a state)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = e.strerror or "Permission denied"
        if writing:
            return UsageError(f"{where}: cannot write there ({reason}); pass --out with a writable folder, "
                              "or fix its permissions")
        return UsageError(f"{where}: {reason}; fix its permissions, or pass --out with a writable folder "
                          "when it is an output")
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return UsageError(f"{where}: a file is in the way where a folder is needed ({e.strerror}); "
                          "move the file, or pass another path (--out for outputs)")
    return None

"""Errors a person can act on, each with the exit code the CLI uses for it."""

from __future__ import annotations


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

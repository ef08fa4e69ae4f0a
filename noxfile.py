"""Developer sessions. `nox -s tests` is the README's test command and what CI runs."""

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The default suite: fast CPU tests (slow and multi-process tests excluded)."""
    session.install(".[test]")
    session.run("pytest", "-m", "not slow and not multiprocess", *session.posargs,
                env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"})


@nox.session
def slow(session: nox.Session) -> None:
    """Slow and multi-process tests (torchrun, gloo, CPU)."""
    session.install(".[test]")
    session.run("pytest", "-m", "slow or multiprocess", *session.posargs, env={"HF_HUB_OFFLINE": "1"})

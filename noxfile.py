"""Developer sessions. `nox -s tests` is the README's test command and what CI runs."""

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The default suite: fast CPU tests, the 2-process (torchrun, gloo) tests included; slow ones excluded."""
    session.install(".[test]")
    # No OMP_NUM_THREADS: the tests' thread budget (simclr_cli.threads, set up in tests/conftest.py) sizes every
    # process from the CPUs it may use, so that torchrun ranks share them instead of each taking all.
    session.run("pytest", "-m", "not slow", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def quick(session: nox.Session) -> None:
    """The edit-test loop: the default suite less the tests that start processes (stage commands, torchrun,
    benchmarks; marked `subprocess` by tests/conftest.py), the multi-process ones and the whole-quickstart test;
    under 3 minutes on 2 cores."""
    session.install(".[test]")
    session.run("pytest", "-m", "not slow and not subprocess and not multiprocess and not end_to_end", *session.posargs,
                env={"HF_HUB_OFFLINE": "1"})


@nox.session
def slow(session: nox.Session) -> None:
    """Slow tests (longer end-to-end runs)."""
    session.install(".[test]")
    session.run("pytest", "-m", "slow", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site (mkdocs, material theme) with warnings as errors."""
    session.install("mkdocs-material>=9.5")
    site = session.create_tmp() + "/site"
    session.run("mkdocs", "build", "--strict", "--site-dir", site, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """The prepared GPU check (issue 14): benchmarks/gpu_check.sh with the machine's own Python and torch
    (no install), about 5 minutes on one H200, one JSON in $OUT (default benchmarks/out/)."""
    session.run("bash", "benchmarks/gpu_check.sh", *session.posargs, external=True)

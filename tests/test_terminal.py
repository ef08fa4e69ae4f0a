"""Under a real pseudo-terminal the progress bar renders; written to a file, the output has no control codes."""

import os
import re
import select
import subprocess
import sys

import pytest

ARGS = ["-m", "simclr_cli", "pretrain", "quickstart", "--set", "pretrain.epochs=1", "--set", "pretrain.knn_every=0",
        "--set", "data.synthetic_train_size=512", "--set", "pretrain.log_every=4"]


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")
def test_progress_bar_renders_in_a_pty(tmp_path):
    master, slave = os.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "OMP_NUM_THREADS": "2"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, *ARGS, "--out", str(tmp_path / "pty")], stdin=slave, stdout=slave,
                            stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=300)
    os.close(master)
    out = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, out[-2000:]
    assert "\x1b[" in out  # rich drew and redrew the bar
    assert "━" in out and "pretrain quickstart" in out
    assert "pretrain step 16/16" not in out  # the plain log lines are for files, not terminals
    # issue 22: the bar shows the percent and the remaining time with the finish time, as the plain lines do
    assert re.search(r"\d+%", out) and re.search(r"eta \d+(s|m\d\ds) \(finish ~\d\d:\d\d\)", out), out[-2000:]
    assert "expected to finish at" in out


def test_output_to_a_file_has_no_control_codes(tmp_path):
    log = tmp_path / "log.txt"
    with log.open("w") as f:
        r = subprocess.run([sys.executable, *ARGS, "--out", str(tmp_path / "file")], stdout=f, stderr=subprocess.STDOUT,
                           env={**os.environ, "TERM": "xterm-256color", "OMP_NUM_THREADS": "2"}, timeout=300)
    text = log.read_text()
    assert r.returncode == 0, text[-2000:]
    assert "\x1b" not in text and "\r" not in text
    assert "pretrain step 16/16" in text and "done: 16 steps" in text
    # issue 22: percent and ETA on the plain lines, and one up-front estimate of the time left
    assert re.search(r"pretrain step 4/16 .* \| 25% eta \S+ \(finish ~\d\d:\d\d\)", text), text
    assert re.search(r"pretrain step 16/16 .* \| 100%$", text, re.M) and text.count("expected to finish at") == 1

"""flexkv.progress: a bar on a terminal, a log line every few seconds otherwise, nothing for quick work."""

from __future__ import annotations

import io
import logging
import os
import pty
import subprocess
import sys

import pytest

from flexkv.progress import Progress

pytestmark = pytest.mark.timeout(60)
GIB = 1 << 30


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_quick_work_shows_nothing(caplog: pytest.LogCaptureFixture) -> None:
    clock, out = Clock(), io.StringIO()
    caplog.set_level(logging.INFO, "flexkv.progress")
    for mode in ("bar", "lines"):
        with Progress("quick", 4 * GIB, stream=out, mode=mode, clock=clock) as p:
            clock.now += 0.5
            p(4 * GIB, 4 * GIB)
    assert out.getvalue() == "" and not caplog.records


def test_lines_mode_logs_every_interval_and_a_closing_line(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    caplog.set_level(logging.INFO, "flexkv.progress")
    with Progress("pre-faulting CPU pool", 80 * GIB, stream=io.StringIO(), mode="lines", interval_s=5.0,
                  clock=clock) as p:
        for i in range(1, 81):  # one GiB every 0.5 s: 40 s of work
            clock.now += 0.5
            p(i * GIB, 80 * GIB)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 9, lines  # at 1 s, then every 5 s until 40 s (8 more would be 41 s), plus the close
    assert lines[0] == "pre-faulting CPU pool: 2.0 GiB / 80.0 GiB (2%), 2.0 GiB/s, 1 s"
    assert lines[-1] == "pre-faulting CPU pool: 80.0 GiB done in 40.0 s"


def test_bar_mode_redraws_in_place_and_ends_with_a_newline() -> None:
    clock, out = Clock(), io.StringIO()
    with Progress("cudaHostRegister", 10, unit="blocks", stream=out, mode="bar", clock=clock) as p:
        for i in range(1, 11):
            clock.now += 1.0
            p(i)
    text = out.getvalue()
    frames = text.split("\r")[1:]
    assert len(frames) == 11 and text.endswith("\n") and "\n" not in text[:-1]
    assert frames[0] == "cudaHostRegister [###...........................]  10% 1 blocks / 10 blocks  1 blocks/s"
    assert frames[-1].startswith("cudaHostRegister [##############################] 100% 10 blocks / 10 blocks")
    assert frames[-1].endswith("done in 10.0 s\n")


def test_the_env_variable_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXKV_PROGRESS", "off")
    clock, out = Clock(), io.StringIO()
    p = Progress("x", 10, stream=out, clock=clock)
    clock.now += 10
    p(5)
    p.finish()
    assert p.mode == "off" and out.getvalue() == ""


_CHILD = """
import time
from flexkv.progress import Progress
with Progress("work", 30, unit="blocks", min_s=0.0) as p:
    for i in range(1, 31):
        time.sleep(0.01)
        p(i)
print("END")
"""


def test_a_real_terminal_gets_a_bar_and_a_pipe_gets_lines() -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLEXKV_PROGRESS"}
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(timeout=30) == 0 and proc.stdout is not None and proc.stdout.read() == b"END\n"
    tty_text = b"".join(chunks).decode()
    assert "\rwork [" in tty_text and "100% 30 blocks / 30 blocks" in tty_text, tty_text
    piped = subprocess.run([sys.executable, "-c", "import logging; logging.basicConfig(level=logging.INFO)\n" + _CHILD],
                           capture_output=True, text=True, env=env, timeout=30, check=True)
    assert "\r" not in piped.stderr and "INFO:flexkv.progress:work:" in piped.stderr, piped.stderr
    assert "INFO:flexkv.progress:work: 30 blocks done in" in piped.stderr

"""Helpers for the operations tests: the real ``flexkv`` command in a subprocess, /metrics over HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def flexkv_command() -> list[str]:
    """The installed console script (build.sh / pip install -e . put it next to this Python)."""
    for folder in (os.path.dirname(sys.executable), sysconfig.get_path("scripts")):
        path = os.path.join(folder, "flexkv")
        if os.access(path, os.X_OK):
            return [path]
    raise AssertionError("the flexkv command is not installed next to this Python: run ./build.sh "
                         "(or pip install -e .) to install the setup.py entry point")


@contextmanager
def flexkv_serve(args: list[str], timeout_s: float = 60.0) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``flexkv serve ARGS`` until it prints that it listens; stopped with SIGTERM, must exit 0 cleanly."""
    proc = subprocess.Popen([*flexkv_command(), "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "FLEXKV_PROGRESS": "lines"})
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    banner = ""
    try:
        while "listening on" not in banner:
            banner = proc.stdout.readline()
            if not banner and proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else ""
                raise AssertionError(f"flexkv serve exited {proc.returncode}: {err}")
            assert time.monotonic() < deadline, "flexkv serve did not start in time"
        yield proc, banner
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:  # never leave a server behind, whatever failed
            proc.kill()
            proc.communicate()
            raise AssertionError("flexkv serve did not stop within 90 s of SIGTERM") from None
    assert proc.returncode == 0, f"flexkv serve exited {proc.returncode}: {err[-2000:]}"
    assert "flexkv server stopped cleanly" in out


def scrape(port: int, host: str = "127.0.0.1") -> Samples:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not exported"
    return samples[key]

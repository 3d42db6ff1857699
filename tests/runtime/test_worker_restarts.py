"""Worker restarts: a budget per time window with backoff (issue 12.4). When a worker keeps dying the
server says so (not ready, stats name the worker and why), ops fail fast with that reason, and a
re-registration or the retry after the window recovers. Real SIGKILLs of real worker processes."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

import pytest

from flexkv.client import HostKVBuffers, KVTPClient
from flexkv.kvmanager import KVManager
from flexkv.layout import LayoutKind
from flexkv.scheduler.server import SchedulerServer
from flexkv.types import ConfigError, TaskStatus
from tests.runtime.kvtest import T, block_bytes, host_buffers, poison, slots_for, small_cache, small_model, tokens

pytestmark = pytest.mark.timeout(120)


@contextlib.contextmanager
def _served(monkeypatch: pytest.MonkeyPatch, restarts: int, window_s: float,
            ) -> Iterator[tuple[KVManager, KVTPClient, HostKVBuffers]]:
    monkeypatch.setenv("FLEXKV_WORKER_RESTARTS", str(restarts))
    monkeypatch.setenv("FLEXKV_WORKER_RESTART_WINDOW_S", str(window_s))
    model = small_model()
    bufs = host_buffers(model, LayoutKind.VLLM_BLOCK_FIRST, 24, seed=4)
    kvm = KVManager(model, small_cache())
    try:
        kvm.start()
        tp = KVTPClient(kvm.server_address)
        try:
            tp.register(bufs, bufs.layout)
            yield kvm, tp, bufs
        finally:
            tp.close()
    finally:
        kvm.shutdown()
        bufs.close()


def _kill_worker(kvm: KVManager, last_pid: int, timeout_s: float = 30.0) -> int:
    """SIGKILL the device worker once a process other than ``last_pid`` runs it; returns the killed pid."""
    deadline = time.monotonic() + timeout_s
    while True:
        pid = int(kvm.stats().get("pid:device-0-0", -1))
        if pid > 0 and pid != last_pid:
            os.kill(pid, signal.SIGKILL)
            return pid
        assert time.monotonic() < deadline, "the worker was not restarted"
        time.sleep(0.01)


def _wait_restarted(kvm: KVManager, killed_pid: int, timeout_s: float = 30.0) -> None:
    """Until a new process runs the device worker and the server is ready again."""
    deadline = time.monotonic() + timeout_s
    while int(kvm.stats().get("pid:device-0-0", -1)) in (killed_pid, -1) or not kvm.is_ready():
        assert time.monotonic() < deadline, "the worker was not restarted"
        time.sleep(0.02)


def _wait_ready(kvm: KVManager, ready: bool, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while kvm.is_ready() != ready:
        assert time.monotonic() < deadline, f"is_ready() did not become {ready}"
        time.sleep(0.02)


def _round_trip(kvm: KVManager, bufs: HostKVBuffers, seed: int) -> None:
    toks = tokens(3 * T, seed=seed)
    put = kvm.put_async(toks, slots_for([0, 1, 2], len(toks)))
    assert kvm.wait(put, timeout=30)[put].status is TaskStatus.SUCCESS
    poison(bufs, [10, 11, 12])
    get = kvm.get_async(toks, slots_for([10, 11, 12], len(toks)))
    assert kvm.wait(get, timeout=30)[get].status is TaskStatus.SUCCESS
    for s, d in zip([0, 1, 2], [10, 11, 12], strict=True):
        assert block_bytes(bufs, d) == block_bytes(bufs, s)
    kvm.check_invariants()


def test_a_worker_that_keeps_dying_is_reported_down_fails_fast_and_reregistration_recovers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with _served(monkeypatch, restarts=2, window_s=60) as (kvm, tp, bufs):
        pid = _kill_worker(kvm, last_pid=-1)
        _wait_restarted(kvm, pid)  # restarted after its backoff, and serving
        _round_trip(kvm, bufs, seed=1)
        pid = _kill_worker(kvm, last_pid=pid)
        _kill_worker(kvm, last_pid=pid)  # the third death within the window: budget spent
        deadline = time.monotonic() + 30
        while "down:device-0-0" not in (stats := kvm.stats()):
            assert time.monotonic() < deadline, "the server never reported the worker down"
            time.sleep(0.02)
        assert "died 3 times" in str(stats["down:device-0-0"]) and "signal 9" in str(stats["down:device-0-0"])
        assert not kvm.is_ready()
        toks = tokens(2 * T, seed=2)
        t0 = time.monotonic()
        put = kvm.put_async(toks, slots_for([0, 1], len(toks)))
        resp = kvm.wait(put, timeout=20)[put]
        assert resp.status is TaskStatus.FAILED and "device-0-0 is down" in resp.error
        assert time.monotonic() - t0 < 5, "ops for a down worker fail at once"
        tp.register(bufs, bufs.layout)  # the engine re-registers: a new worker with a fresh budget
        _wait_ready(kvm, True)
        assert "down:device-0-0" not in kvm.stats()
        _round_trip(kvm, bufs, seed=3)


def test_a_down_worker_is_started_again_when_its_window_has_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    with _served(monkeypatch, restarts=1, window_s=4) as (kvm, _, bufs):
        pid = _kill_worker(kvm, last_pid=-1)
        _kill_worker(kvm, last_pid=pid)  # killed again right after its restart: down
        deadline = time.monotonic() + 10
        while "down:device-0-0" not in kvm.stats():
            assert time.monotonic() < deadline, "the server never reported the worker down"
            time.sleep(0.02)
        assert not kvm.is_ready()
        _wait_ready(kvm, True, timeout_s=60)  # the retry after the window
        assert "down:device-0-0" not in kvm.stats()
        _round_trip(kvm, bufs, seed=5)


def test_a_bad_restart_budget_is_one_error_line_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXKV_WORKER_RESTARTS", "-1")
    with pytest.raises(ConfigError, match="FLEXKV_WORKER_RESTARTS must be >= 0"):
        SchedulerServer(small_model(), small_cache())  # nothing built yet: the leak fixture checks the pool

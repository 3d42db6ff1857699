"""Small ops on the fast paths: busy-polling server and client, waits answered in the completion's loop
turn, and the per-hop trace. Real server and worker processes, host KV buffers, bytes compared."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import zmq

from flexkv import hoptrace
from flexkv.common.config import MAX_BUSY_POLL_US
from flexkv.kvmanager import KVManager
from flexkv.layout import LayoutKind
from flexkv.transport import ServerConnection, ServerUnavailable
from flexkv.types import TaskStatus
from tests.runtime.kvtest import T, block_bytes, poison, serving, slots_for, small_cache, small_model, tokens

pytestmark = pytest.mark.timeout(120)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _worker_pids(kvm: KVManager) -> list[int]:
    stats = kvm._query("stats")
    return [int(v) for k, v in stats.items() if k.startswith("pid:")]


@pytest.mark.parametrize("busy_poll_us", [0, MAX_BUSY_POLL_US])
def test_small_puts_and_gets_restore_exact_bytes_and_are_visible_to_another_client(busy_poll_us: int) -> None:
    """Back-to-back 2-block puts and gets: every get lands the put's bytes in poisoned blocks, and a put
    that wait reported SUCCESS is matched at once by a second client's get_match (read-your-writes)."""
    model = small_model()
    with serving(model, small_cache(busy_poll_us=busy_poll_us), LayoutKind.VLLM_KV_FIRST, 8, seed=5) as (kvm, bufs):
        other = KVManager(model, small_cache(busy_poll_us=busy_poll_us), server_address=kvm.server_address)
        other.start()
        try:
            for i in range(40):
                toks = tokens(2 * T, seed=100 + i)
                src, dst = [2 * (i % 2), 2 * (i % 2) + 1], [4 + 2 * (i % 2), 5 + 2 * (i % 2)]
                put = kvm.put_async(toks, slots_for(src, len(toks)))
                assert kvm.wait(put)[put].status is TaskStatus.SUCCESS
                tid, mask = other.get_match(toks)
                assert mask.all(), f"round {i}: a put reported SUCCESS is not matched by another client"
                other.cancel(tid)
                poison(bufs, dst)
                get = kvm.get_async(toks, slots_for(dst, len(toks)))
                res = kvm.wait(get)[get]
                assert res.status is TaskStatus.SUCCESS and res.return_mask is not None and res.return_mask.all()
                for s, d in zip(src, dst, strict=True):
                    assert block_bytes(bufs, d) == block_bytes(bufs, s), f"round {i}: block {s} -> {d} differs"
            kvm.check_invariants()
        finally:
            other.shutdown()


def test_an_idle_server_and_worker_do_not_spin() -> None:
    """With the longest spin configured, a server and worker with nothing outstanding sleep: over 2 s
    they use a small fraction of a core (a spinning one would use ~2 s)."""
    model = small_model()
    with serving(model, small_cache(busy_poll_us=MAX_BUSY_POLL_US), LayoutKind.VLLM_KV_FIRST, 8, seed=6) as (kvm, _):
        toks = tokens(2 * T, seed=1)
        put = kvm.put_async(toks, slots_for([0, 1], len(toks)))
        assert kvm.wait(put)[put].status is TaskStatus.SUCCESS
        assert kvm._proc is not None
        pids = [kvm._proc.pid, *_worker_pids(kvm)]
        assert len(pids) == 2, pids
        time.sleep(0.3)  # the last turns' spins end
        before = [_cpu_seconds(p) for p in pids]
        time.sleep(2.0)
        used = [_cpu_seconds(p) - b for p, b in zip(pids, before, strict=True)]
        assert max(used) < 0.5, f"CPU seconds over 2 s idle (server, worker): {used}"


def test_a_client_spins_at_most_busy_poll_us_per_request(tmp_path: Path) -> None:
    """A request to a server that never answers spins for busy_poll_us, then sleeps until its timeout."""
    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)
    address = f"ipc://{tmp_path}/silent.sock"
    silent.bind(address)
    conn = ServerConnection(address, 0, "manager", timeout_s=1.5, busy_poll_us=MAX_BUSY_POLL_US)
    try:
        cpu0, t0 = time.process_time(), time.monotonic()
        with pytest.raises(ServerUnavailable):
            conn.hello(timeout_s=1.5)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
        assert wall >= 1.4
        assert cpu < 0.5, f"{cpu:.2f} CPU seconds over a {wall:.1f} s wait: the spin is not bounded"
    finally:
        conn.close(bye=False)
        ctx.destroy(linger=0)


def test_hop_trace_records_every_hop_of_a_put_and_a_get(tmp_path: Path) -> None:
    """FLEXKV_HOP_TRACE: the client, server and worker each record their hops of every task."""
    hoptrace.enable(str(tmp_path))
    try:
        model = small_model()
        with serving(model, small_cache(), LayoutKind.VLLM_KV_FIRST, 8, seed=7) as (kvm, _):
            toks = tokens(2 * T, seed=2)
            put = kvm.put_async(toks, slots_for([0, 1], len(toks)))
            assert kvm.wait(put)[put].status is TaskStatus.SUCCESS
            get = kvm.get_async(toks, slots_for([4, 5], len(toks)))
            assert kvm.wait(get)[get].status is TaskStatus.SUCCESS
    finally:
        hoptrace.disable()  # the server and worker wrote theirs as they exited
    tasks = hoptrace.load(str(tmp_path))
    for tid, kind in ((put, "put"), (get, "get")):
        missing = set(hoptrace.HOPS) - set(tasks[tid]) - {"client_landed"}  # (no progress table here)
        assert not missing and kind in tasks[tid], f"task {tid}: hops not recorded: {sorted(missing)}"
        times = [tasks[tid][h] for h in ("client_send", "server_request", "server_dispatched", "worker_received",
                                         "copy_started", "copy_done", "worker_reported", "server_completed",
                                         "server_replied", "client_replied")]
        assert times == sorted(times), f"task {tid}: hops out of order: {times}"
    lines = hoptrace.summarize(str(tmp_path))
    assert lines[0].startswith("put: hop breakdown over 1 traced tasks") and any("total" in x for x in lines)

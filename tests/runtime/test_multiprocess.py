"""Several processes around one server: TP ranks in their own processes, DP clients sharing a cache,
clients that die, and shutdown that leaves nothing behind."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from flexkv.kvmanager import KVManager
from flexkv.layout import LayoutKind
from flexkv.scheduler.endpoint import AddressInUse
from flexkv.scheduler.server import SchedulerServer
from flexkv.shm import list_flexkv_segments
from flexkv.types import TaskStatus
from tests.runtime.kvtest import (
    T,
    block_bytes,
    host_buffers,
    serving,
    slots_for,
    small_cache,
    small_model,
    start_server,
    tokens,
    tp_rank_process,
)

pytestmark = pytest.mark.timeout(120)
CTX = mp.get_context("spawn")


def _spawn_ranks(address: str, model: Any, kind: LayoutKind, num_blocks: int, dp: int = 0) -> list[tuple[Any, Any]]:
    ranks = []
    for rank in range(model.tp_size):
        parent, child = CTX.Pipe()
        p = CTX.Process(target=tp_rank_process, args=(address, model, kind.value, num_blocks, rank, dp, child))
        p.start()
        ranks.append((p, parent))
    for _, conn in ranks:
        assert conn.poll(60), "TP rank did not register in time"
        assert conn.recv() == "registered"
    return ranks


def _stop_ranks(ranks: list[tuple[Any, Any]]) -> None:
    for p, conn in ranks:
        conn.send("stop")
        p.join(20)
        assert p.exitcode == 0


@pytest.mark.parametrize("kind", [LayoutKind.VLLM_BLOCK_FIRST, LayoutKind.SGLANG, LayoutKind.MLA])
def test_tp2_ranks_in_their_own_processes_get_their_own_head_shards(kind: LayoutKind) -> None:
    """Each rank holds its own head shard (MLA: the same latent; rank 0 writes, both read)."""
    model = small_model(tp_size=2, use_mla=kind is LayoutKind.MLA)
    with KVManager(model, small_cache()) as kvm:
        ranks = _spawn_ranks(kvm.server_address, model, kind, num_blocks=24)
        try:
            kvm.wait_ready(10)
            toks = tokens(5 * T, seed=11)
            put = kvm.put_async(toks, slots_for([0, 1, 2, 3, 4], len(toks)))
            assert kvm.wait(put)[put].status is TaskStatus.SUCCESS
            for _, conn in ranks:
                conn.send(("poison", [10, 11, 12, 13, 14]))
                assert conn.recv() == "ok"
            get = kvm.get_async(toks, slots_for([10, 11, 12, 13, 14], len(toks)))
            assert kvm.wait(get)[get].status is TaskStatus.SUCCESS
            for _, conn in ranks:  # each rank gets back exactly its own (distinct) data
                for s, d in zip(range(5), range(10, 15), strict=True):
                    conn.send(("block", s))
                    src = conn.recv()
                    conn.send(("block", d))
                    assert conn.recv() == src
            kvm.check_invariants()
        finally:
            _stop_ranks(ranks)


def test_two_dp_clients_share_one_server_and_see_each_others_prefixes(tmp_path: Path) -> None:
    model = small_model(dp_size=2)
    address = f"ipc://{tmp_path}/server.sock"
    server = start_server(model, small_cache(), address)
    a, b = KVManager(model, small_cache(), address, dp_client_id=0), KVManager(model, small_cache(), address, 1)
    bufs_a = host_buffers(model, LayoutKind.VLLM_KV_FIRST, 16, seed=1)
    bufs_b = host_buffers(model, LayoutKind.VLLM_KV_FIRST, 16, seed=2)
    try:
        a.start()
        b.start()
        a.register_kv_buffers(bufs_a, bufs_a.layout)
        assert not a.is_ready(), "DP client 1 has not registered yet"
        b.register_kv_buffers(bufs_b, bufs_b.layout)
        a.wait_ready(10)
        toks = tokens(4 * T, seed=12)
        put = a.put_async(toks, slots_for([0, 1, 2, 3], len(toks)))
        assert a.wait(put)[put].status is TaskStatus.SUCCESS
        tid, mask = b.get_match(toks)
        assert mask.all(), "B sees the prefix A stored"
        b.launch(tid, slots_for([8, 9, 10, 11], len(toks)))
        assert b.wait(tid)[tid].status is TaskStatus.SUCCESS
        for s, d in zip([0, 1, 2, 3], [8, 9, 10, 11], strict=True):
            assert block_bytes(bufs_b, d) == block_bytes(bufs_a, s)
        b.check_invariants()
    finally:
        b.shutdown()
        a.shutdown()
        server.send_signal(signal.SIGINT)  # type: ignore[attr-defined]
        assert server.wait(20) == 0  # type: ignore[attr-defined]
        bufs_a.close()
        bufs_b.close()


def _reserve_and_die(address: str, model: Any) -> None:
    kvm = KVManager(model, small_cache(), address, dp_client_id=0)
    kvm.start()
    kvm.put_match(tokens(8 * T, seed=13))  # reserves CPU blocks, never launched
    kvm.get_match(tokens(8 * T, seed=13))
    os._exit(0)  # no shutdown: the server must notice and release


def test_a_killed_client_does_not_wedge_the_server(tmp_path: Path) -> None:
    model = small_model()
    address = f"ipc://{tmp_path}/server.sock"
    server = start_server(model, small_cache(num_cpu_blocks=12), address)
    kvm = KVManager(model, small_cache(), address)
    try:
        kvm.start()
        baseline = kvm.stats()["cpu_free_blocks"]
        p = CTX.Process(target=_reserve_and_die, args=(address, model))
        p.start()
        p.join(30)
        deadline = time.monotonic() + 10
        while kvm.stats()["cpu_free_blocks"] != baseline and time.monotonic() < deadline:
            time.sleep(0.1)
        assert kvm.stats()["cpu_free_blocks"] == baseline, "reservations of the dead client were released"
        tid, mask = kvm.put_match(tokens(8 * T, seed=13))
        assert mask.all(), "the whole pool is usable again"
        kvm.cancel(tid)
        kvm.check_invariants()
    finally:
        kvm.shutdown()
        server.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
        assert server.wait(20) == 0  # type: ignore[attr-defined]


def test_wait_times_out_while_a_worker_is_stopped_then_succeeds() -> None:
    model = small_model()
    with serving(model, small_cache(), LayoutKind.VLLM_KV_FIRST, 16, seed=3) as (kvm, _bufs):
        worker_pid = int(kvm.stats()["pid:device-0-0"])
        os.kill(worker_pid, signal.SIGSTOP)
        try:
            toks = tokens(4 * T, seed=14)
            put = kvm.put_async(toks, slots_for([0, 1, 2, 3], len(toks)))
            t0 = time.monotonic()
            assert kvm.wait(put, timeout=0.3)[put].status is TaskStatus.TIMEOUT
            assert 0.25 < time.monotonic() - t0 < 5
            assert kvm.try_wait(put)[put].status is TaskStatus.UNREADY
        finally:
            os.kill(worker_pid, signal.SIGCONT)
        assert kvm.wait(put, timeout=10)[put].status is TaskStatus.SUCCESS


def test_shutdown_leaves_no_process_socket_or_segment() -> None:
    model = small_model()
    kvm = KVManager(model, small_cache())
    kvm.start()
    bufs = host_buffers(model, LayoutKind.VLLM_KV_FIRST, 8, seed=4)
    try:
        kvm.register_kv_buffers(bufs, bufs.layout)
        stats = kvm.stats()
        pids = [int(v) for k, v in stats.items() if k.startswith("pid:")] + [int(stats["server_pid"])]
        sock_dir = Path(kvm.server_address.removeprefix("ipc://")).parent
        assert sock_dir.exists() and (sock_dir.stat().st_mode & 0o777) == 0o700
        pool = kvm._c.server_info["pool_name"]
        assert pool in list_flexkv_segments()
        kvm.shutdown()
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert not sock_dir.exists()
        assert pool not in list_flexkv_segments()  # this server's pool (other servers may run on this machine)
    finally:
        kvm.shutdown()
        bufs.close()


def test_worker_killed_mid_run_fails_its_ops_and_is_restarted() -> None:
    model = small_model()
    with serving(model, small_cache(), LayoutKind.VLLM_KV_FIRST, 16, seed=5) as (kvm, _bufs):
        pid = int(kvm.stats()["pid:device-0-0"])
        os.kill(pid, signal.SIGSTOP)
        toks = tokens(4 * T, seed=15)
        put = kvm.put_async(toks, slots_for([0, 1, 2, 3], len(toks)))
        kvm.wait(put, timeout=0.2)
        os.kill(pid, signal.SIGKILL)
        res = kvm.wait(put, timeout=10)[put]
        assert res.status is TaskStatus.FAILED and "died" in res.error
        kvm.check_invariants()
        deadline = time.monotonic() + 20
        while int(kvm.stats()["pid:device-0-0"]) == pid and time.monotonic() < deadline:
            time.sleep(0.1)
        kvm.wait_ready(20)
        put = kvm.put_async(toks, slots_for([0, 1, 2, 3], len(toks)))
        assert kvm.wait(put, timeout=10)[put].status is TaskStatus.SUCCESS, "the restarted worker runs ops"


def test_a_taken_address_fails_the_start_and_leaves_nothing_behind(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        before = set(list_flexkv_segments())
        with pytest.raises(AddressInUse, match="already in use"):  # one line, not a ZMQError traceback
            SchedulerServer(small_model(), small_cache(), client_address=f"tcp://127.0.0.1:{port}",
                            runtime_dir=str(tmp_path))
    assert set(list_flexkv_segments()) == before, "the pool of the failed start was unlinked"
    assert not list(tmp_path.iterdir()), "no socket file left"

"""flexkv as SGLang's HiCache storage backend, built by SGLang's own StorageBackendFactory ("dynamic")
and called the way SGLang's cache controller calls it (v1 zero-copy: keys + host indices + prefix keys),
against a real flexkv server process. Destinations are poisoned and compared byte for byte."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import posix_ipc
import pytest
import torch

pytest.importorskip("sglang.srt.mem_cache.storage.backend_factory",
                    reason="sglang is not installed (CI installs sglang==0.5.23 --no-deps, see .ci/run)")

from sglang.srt.mem_cache.hicache_storage import HiCacheStorageExtraInfo

from flexkv.common.config import CacheConfig
from flexkv.kvmanager import KVManager
from flexkv.shm import list_flexkv_segments
from tests.integration.sglang_pool import (
    OUR_PIDS,
    HostPool,
    P,
    flexkv_server,
    host_indices,
    launch_server,
    make_backend,
    our_segments,
    page_keys,
    server_model,
    stop_server,
)
from tests.runtime.kvtest import flip_byte, needs_ssd_tier, ssd_slot

pytestmark = pytest.mark.timeout(240)
CTX = mp.get_context("spawn")


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    before = set(list_flexkv_segments())
    yield
    leaked = our_segments(set(list_flexkv_segments()) - before)  # other agents' tests run beside ours
    assert not leaked, f"shared-memory segments leaked: {sorted(leaked)}"


def checker(address: str, mla: bool = False) -> KVManager:
    """A spare DP client that runs the server's invariant checks."""
    kvm = KVManager(server_model(mla), CacheConfig(tokens_per_block=P), address, dp_client_id=3)
    kvm.start()
    return kvm


def info(prefix: list[str]) -> HiCacheStorageExtraInfo:
    return HiCacheStorageExtraInfo(prefix_keys=list(prefix))


@pytest.mark.parametrize("layout", ["layer_first", "page_first", "page_first_direct"])
def test_set_exists_get_round_trip_pages_byte_exact(tmp_path: Path, layout: str) -> None:
    address = f"ipc://{tmp_path}/server.sock"
    pool = HostPool(layout, seed=1)
    with flexkv_server(address, server_model()):
        backend = make_backend(address, pool)
        check = checker(address)
        try:
            keys = page_keys(6, seed=2)
            # SGLang backs a node up in batches: pages 0-3 first, then 4-5 with the first four as prefix.
            assert backend.batch_set_v1(keys[:4], host_indices([0, 1, 2, 3]), info([])) == [True] * 4
            assert backend.batch_set_v1(keys[4:], host_indices([4, 5]), info(keys[:4])) == [True, True]
            check.check_invariants()
            assert backend.batch_exists(keys, info([])) == 6
            assert backend.batch_exists(keys[2:], info(keys[:2])) == 4
            other = page_keys(3, seed=3)
            assert backend.batch_exists(keys[:2] + other, info([])) == 2, "leading hits only"
            assert backend.batch_exists(other, info([])) == 0
            pool.poison([10, 11, 12, 13, 14, 15, 16])
            assert backend.batch_get_v1(keys[:3], host_indices([12, 10, 14]), info([])) == [True] * 3
            assert backend.batch_get_v1(keys[3:], host_indices([11, 15, 13]), info(keys[:3])) == [True] * 3
            for src, dst in zip([0, 1, 2, 3, 4, 5], [12, 10, 14, 11, 15, 13], strict=True):
                assert pool.page(dst) == pool.page(src), f"host page {dst} (from {src})"
            assert set(pool.page(16)) == {0x5A}, "a page nobody asked for keeps its poison"
            # A get past the cached pages loads the hits and reports the rest missing.
            pool.poison([17, 18])
            got = backend.batch_get_v1([keys[5], other[0]], host_indices([17, 18]), info(keys[:5]))
            assert got == [True, False]
            assert pool.page(17) == pool.page(5) and set(pool.page(18)) == {0x5A}
            check.check_invariants()
        finally:
            check.shutdown()
            backend.close()


@pytest.mark.parametrize("layout", ["layer_first", "page_first"])
def test_mla_one_rank_writes_and_every_rank_reads(tmp_path: Path, layout: str) -> None:
    address = f"ipc://{tmp_path}/server.sock"
    pools = [HostPool(layout, mla=True, seed=10 + r) for r in range(2)]
    with flexkv_server(address, server_model(mla=True)):
        ranks = [make_backend(address, pools[r], tp_rank=r, tp_size=2) for r in range(2)]
        check = checker(address, mla=True)
        try:
            keys = page_keys(3, seed=4)
            assert ranks[1].batch_set_v1(keys, host_indices([0, 1, 2]), info([])) == [True] * 3
            assert ranks[1].batch_exists(keys, info([])) == 0, "a reader rank stores nothing"
            assert ranks[0].batch_set_v1(keys, host_indices([0, 1, 2]), info([])) == [True] * 3
            for r in range(2):
                assert ranks[r].batch_exists(keys, info([])) == 3
            pools[1].poison([5, 6, 7])
            assert ranks[1].batch_get_v1(keys, host_indices([5, 6, 7]), info([])) == [True] * 3
            for src, dst in zip([0, 1, 2], [5, 6, 7], strict=True):
                assert pools[1].page(dst) == pools[0].page(src), "rank 1 reads the latent rank 0 wrote"
            check.check_invariants()
        finally:
            check.shutdown()
            for b in ranks:
                b.close()


def test_tp_ranks_keep_their_own_head_shards(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/server.sock"
    pools = [HostPool("page_first", seed=20 + r) for r in range(2)]
    with flexkv_server(address, server_model()):
        ranks = [make_backend(address, pools[r], tp_rank=r, tp_size=2) for r in range(2)]
        try:
            keys = page_keys(2, seed=5)
            for r in range(2):
                assert ranks[r].batch_set_v1(keys, host_indices([r, r + 2]), info([])) == [True, True]
            for r in range(2):
                pools[r].poison([8, 9])
                assert ranks[r].batch_get_v1(keys, host_indices([8, 9]), info([])) == [True, True]
                assert pools[r].page(8) == pools[r].page(r) and pools[r].page(9) == pools[r].page(r + 2)
        finally:
            for b in ranks:
                b.close()


def _sglang_process(address: str, role: str, conn: Any) -> None:
    """A second SGLang-side process: its own host pool and backend on the same flexkv server."""
    pool = HostPool("page_first", seed=31 if role == "writer" else 32)
    backend = make_backend(address, pool, client_id_base=0 if role == "writer" else 1)
    keys = page_keys(5, seed=6)
    try:
        if role == "writer":
            ok = backend.batch_set_v1(keys, host_indices([0, 1, 2, 3, 4]), info([]))
            conn.send((ok, [pool.page(p) for p in range(5)]))
        else:
            hits = backend.batch_exists(keys, info([]))
            pool.poison([10, 11, 12, 13, 14])
            got = backend.batch_get_v1(keys, host_indices([10, 11, 12, 13, 14]), info([]))
            conn.send((hits, got, [pool.page(p) for p in range(10, 15)]))
    finally:
        backend.close()


def _run_process(address: str, role: str) -> Any:
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=_sglang_process, args=(address, role, child))
    proc.start()
    OUR_PIDS.add(proc.pid)
    assert parent.poll(180), f"{role} process gave no answer"
    out = parent.recv()
    proc.join(30)
    assert proc.exitcode == 0
    return out


def test_two_sglang_processes_sharing_one_server_see_each_others_pages(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/server.sock"
    with flexkv_server(address, server_model()):
        ok, written = _run_process(address, "writer")
        assert ok == [True] * 5
        hits, got, read = _run_process(address, "reader")
        assert hits == 5 and got == [True] * 5
        assert read == written, "the reader's host pages hold the writer's bytes"


def test_pages_evicted_from_flexkv_show_as_misses(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/server.sock"
    pool = HostPool("layer_first", seed=7)
    with flexkv_server(address, server_model(), num_cpu_blocks=8):
        backend = make_backend(address, pool)
        check = checker(address)
        try:
            old, new = page_keys(4, seed=8), page_keys(6, seed=9)
            assert backend.batch_set_v1(old, host_indices([0, 1, 2, 3]), info([])) == [True] * 4
            assert backend.batch_set_v1(new, host_indices([4, 5, 6, 7, 8, 9]), info([])) == [True] * 6
            left = backend.batch_exists(old, info([]))
            assert left < 4, "8 CPU blocks cannot hold 10 pages: the older chain lost its tail"
            pool.poison([20, 21, 22, 23])
            got = backend.batch_get_v1(old, host_indices([20, 21, 22, 23]), info([]))
            assert got == [i < left for i in range(4)]
            for i in range(4):
                assert (pool.page(20 + i) == pool.page(i)) if i < left else set(pool.page(20 + i)) == {0x5A}
            check.check_invariants()
        finally:
            check.shutdown()
            backend.close()


def test_a_get_that_loads_less_than_it_matched_reports_only_the_pages_it_loaded(tmp_path: Path) -> None:
    """A GET ends SUCCESS with a shorter mask when a block read back from SSD fails its checksum (it and the
    rest of the chain are a miss): SGLang must be told only the pages that reached its host pool."""
    needs_ssd_tier()
    address = f"ipc://{tmp_path}/server.sock"
    (tmp_path / "nvme0").mkdir()
    cache = CacheConfig(tokens_per_block=P, num_cpu_blocks=8, enable_ssd=True, num_ssd_blocks=64,
                        ssd_cache_dir=(str(tmp_path / "nvme0"),))
    pool = HostPool("layer_first", seed=11)
    with flexkv_server(address, server_model(), cache=cache):
        backend = make_backend(address, pool)
        check = checker(address)
        try:
            old, new = page_keys(4, seed=12), page_keys(6, seed=13)
            assert backend.batch_set_v1(old, host_indices([0, 1, 2, 3]), info([])) == [True] * 4
            time.sleep(0.5)  # (its SSD write-through finishes behind the put: then its CPU blocks can go)
            assert backend.batch_set_v1(new, host_indices([4, 5, 6, 7, 8, 9]), info([])) == [True] * 6
            time.sleep(0.5)
            block_keys, _ = backend._block_keys(old, info([]))
            for key in block_keys[2:]:  # pages 2 and 3 no longer match their checksums
                path, off = ssd_slot(cache, server_model(), int(key), P)
                flip_byte(path, off + server_model().block_bytes(P) // 2)
            pool.poison([20, 21, 22, 23])
            got = backend.batch_get_v1(old, host_indices([20, 21, 22, 23]), info([]))
            assert got == [True, True, False, False]
            assert pool.page(20) == pool.page(0) and pool.page(21) == pool.page(1)
            assert set(pool.page(22)) == {0x5A} and set(pool.page(23)) == {0x5A}
            check.check_invariants()
        finally:
            check.shutdown()
            backend.close()


def _unlink_pool_of(pid: int) -> None:
    for name in our_segments(set(list_flexkv_segments())):
        if name.startswith("/flexkv-cpu-") and name.split("-")[-2] == str(pid):
            posix_ipc.unlink_shared_memory(name)


def test_server_killed_gives_misses_and_false_then_recovers_after_restart(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    address = f"ipc://{tmp_path}/server.sock"
    pool = HostPool("page_first", seed=11)
    model = server_model()
    with flexkv_server(address, model) as procs:
        backend = make_backend(address, pool)
        try:
            keys = page_keys(3, seed=12)
            assert backend.batch_set_v1(keys, host_indices([0, 1, 2]), info([])) == [True] * 3
            os.kill(procs[0].pid, signal.SIGKILL)
            procs[0].wait(20)
            _unlink_pool_of(procs[0].pid)  # a SIGKILLed server cannot remove its CPU pool; not the backend's
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="flexkv.sglang"):
                for _ in range(3):
                    assert backend.batch_exists(keys, info([])) == 0
                    assert backend.batch_get_v1(keys, host_indices([5, 6, 7]), info([])) == [False] * 3
                    assert backend.batch_set_v1(keys, host_indices([0, 1, 2]), info([])) == [False] * 3
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1, [r.getMessage() for r in warnings]
            stop_server(procs[0])
            procs.append(launch_server(model, address))
            deadline = time.monotonic() + 60
            while backend.batch_set_v1(keys, host_indices([0, 1, 2]), info([])) != [True] * 3:
                assert time.monotonic() < deadline, "the backend did not reconnect to the restarted server"
                time.sleep(0.5)
            assert backend.batch_exists(keys, info([])) == 3, "recovered: the restarted server stores again"
            pool.poison([5, 6, 7])
            assert backend.batch_get_v1(keys, host_indices([5, 6, 7]), info([])) == [True] * 3
            assert [pool.page(p) for p in (5, 6, 7)] == [pool.page(p) for p in (0, 1, 2)]
        finally:
            backend.close()


@pytest.mark.parametrize("layout", ["layer_first", "page_first"])
def test_generic_interface_moves_flat_pages_and_shares_them_with_v1(tmp_path: Path, layout: str) -> None:
    address = f"ipc://{tmp_path}/server.sock"
    pool, reader_pool = HostPool(layout, seed=13), HostPool(layout, seed=14)
    with flexkv_server(address, server_model()):
        generic = make_backend(address, pool, interface_v1=0)
        reader = make_backend(address, reader_pool, client_id_base=1)
        try:
            keys = page_keys(20, seed=15)  # more pages than one staging pass holds
            flat = [pool.flat_page(p) for p in range(20)]
            assert generic.batch_set(keys, flat) is True
            assert generic.batch_exists(keys) == 20
            dummies = [torch.full_like(flat[0], 7.0) for _ in range(21)]
            got = generic.batch_get(keys + page_keys(1, seed=16), dummies)
            assert got[20] is None, "a key never stored is a miss"
            for i in range(20):
                assert got[i] is dummies[i] and got[i].numpy().tobytes() == flat[i].numpy().tobytes(), i
            reader_pool.poison([0, 1])
            assert reader.batch_get_v1(keys[:2], host_indices([0, 1]), info([])) == [True, True]
            assert reader_pool.page(0) == pool.page(0) and reader_pool.page(1) == pool.page(1)
            assert generic.batch_get_v1(keys[:1], host_indices([3]), info([])) == [False], "v1 needs interface_v1"
        finally:
            generic.close()
            reader.close()


def test_attach_refuses_what_cannot_work_and_bad_calls_answer_false(tmp_path: Path) -> None:
    from flexkv.integration.sglang.host_pool import UnsupportedHostPool
    from flexkv.types import InvalidRequest

    address = f"ipc://{tmp_path}/server.sock"
    pool = HostPool("page_first", seed=17)
    pool.layout = "page_head"
    with pytest.raises(UnsupportedHostPool, match="'page_head' is not supported"):
        make_backend(address, pool)
    with flexkv_server(address, server_model()):
        wrong_page = HostPool("layer_first", seed=18)
        wrong_page.page_size = 2 * P  # the same buffer read as pages of 8 tokens: the server has 4
        with pytest.raises(InvalidRequest, match=f"tokens_per_block={P}, SGLang's page size is {2 * P}"):
            make_backend(address, wrong_page)
        backend = make_backend(address, HostPool("layer_first", seed=19))
        try:
            keys = page_keys(2, seed=20)
            assert backend.batch_set_v1(keys, host_indices([0]), info([])) == [False, False], "2 keys, 1 page"
            assert backend.batch_get_v1(keys, host_indices([0, 1, 2]), info([])) == [False, False]
            assert backend.batch_set_v1(keys, host_indices([0, 1]), info([])) == [True, True], "still serves"
        finally:
            backend.close()

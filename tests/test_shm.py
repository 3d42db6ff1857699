"""The shared-memory CPU pool: real POSIX segments under /dev/shm, real child processes (spawn).

Scenarios: a pool created here is seen byte for byte by another process; it is private (0600),
page aligned, and gone from /dev/shm after unlink; a pool left by a SIGKILLed process is replaced,
one whose owner lives is refused; several arrays share one pool across processes.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing as mp
import os
import signal
import stat
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import posix_ipc
import pytest

from flexkv import shm
from flexkv.shm import (
    PAGE_BYTES,
    PoolInUseError,
    SharedPool,
    allocate_host_tensors,
    attach_arrays,
    list_flexkv_segments,
    make_pool_name,
)
from flexkv.types import DType

MIB = 1 << 20
CTX = mp.get_context("spawn")


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    before = set(list_flexkv_segments())
    yield
    assert set(list_flexkv_segments()) == before, "a test left a shared-memory segment behind"


# -- child processes (module level so spawn can import them) ----------------------------------


def child_check_and_write(name: str, conn: Connection) -> None:
    """Attach, report a checksum of what the parent wrote, then write a pattern back."""
    pool = SharedPool.attach(name)
    conn.send((pool.nbytes, int(pool.buffer[: 4 * MIB].sum()), bytes(pool.buffer[:16])))
    pool.buffer[-4096:] = 0xAB
    pool.close()


def child_create_and_wait(name: str, conn: Connection) -> None:
    """Create a pool, mark it, report, and wait to be killed (never unlinks)."""
    pool = SharedPool.create(name, 2 * MIB)
    pool.buffer[:8] = 0x5A
    conn.send(os.getpid())
    time.sleep(60)


def child_read_arrays(name: str, shapes: list[tuple[int, ...]], conn: Connection) -> None:
    pool, arrays = attach_arrays(name, shapes, DType.BFLOAT16)
    conn.send([(a.dtype.str, a.shape, int(a.ctypes.data) % PAGE_BYTES, int(a.astype(np.int64).sum())) for a in arrays])
    arrays[1][...] = 7
    del arrays
    pool.close()


def start_child(target: Callable[..., None], *args: object) -> tuple[mp.process.BaseProcess, int, Connection]:
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=target, args=(*args, child), daemon=True)
    proc.start()
    child.close()
    assert proc.pid is not None
    return proc, proc.pid, parent


def recv(conn: Connection, timeout: float = 30.0) -> Any:
    assert conn.poll(timeout), "child did not answer"
    return conn.recv()


# -- scenarios ------------------------------------------------------------------------------


def test_another_process_sees_the_same_bytes() -> None:
    name = make_pool_name("test")
    with SharedPool.create(name, 8 * MIB) as pool:
        pattern = np.random.default_rng(0).integers(0, 256, size=4 * MIB, dtype=np.uint8)
        pool.buffer[: 4 * MIB] = pattern
        proc, _, conn = start_child(child_check_and_write, name)
        nbytes, checksum, head = recv(conn)
        proc.join(30)
        assert proc.exitcode == 0
        assert (nbytes, checksum, head) == (8 * MIB, int(pattern.sum()), pattern[:16].tobytes())
        assert (pool.buffer[-4096:] == 0xAB).all()  # and the child's write is visible here
        assert pool.buffer[-4097] == 0


def test_pool_is_private_page_aligned_and_unlinked_cleanly() -> None:
    name = make_pool_name("test")
    pool = SharedPool.create(name, 3 * PAGE_BYTES + 100)
    path = f"/dev/shm{name}"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.stat(path).st_size == pool.data_offset + pool.nbytes
    assert name in list_flexkv_segments()
    assert pool.data_offset == PAGE_BYTES and pool.address % PAGE_BYTES == 0
    assert pool.buffer.ctypes.data == pool.address and pool.buffer.shape == (3 * PAGE_BYTES + 100,)
    assert not pool.buffer.any()  # fresh memory is zero

    other = SharedPool.attach(name)
    with pytest.raises(PermissionError, match="only the process that created"):
        other.unlink()
    other.close()
    pool.close()
    pool.close()  # idempotent
    with pytest.raises(ValueError, match="is closed"):
        _ = pool.buffer
    pool.unlink()
    pool.unlink()  # idempotent
    assert not os.path.exists(path) and name not in list_flexkv_segments()
    with pytest.raises(FileNotFoundError, match="no shared-memory pool named"):
        SharedPool.attach(name)


def test_views_outlive_close_without_crashing() -> None:
    with SharedPool.create(make_pool_name("test"), PAGE_BYTES) as pool:
        view = pool.buffer[:16]
        view[:] = 3
    assert view.sum() == 48  # the mapping stays until the last view is dropped


def test_stale_pool_of_a_killed_process_is_replaced(caplog: pytest.LogCaptureFixture) -> None:
    name = make_pool_name("stale")
    proc, pid, conn = start_child(child_create_and_wait, name)
    assert recv(conn) == pid
    assert name in list_flexkv_segments()
    os.kill(pid, signal.SIGKILL)  # the child never unlinks: its segment is left behind
    proc.join(30)
    with caplog.at_level(logging.WARNING, logger="flexkv.shm"):
        pool = SharedPool.create(name, 2 * MIB)
    with pool:
        assert f"removing stale shared-memory pool {name}" in caplog.text and f"dead pid {pid}" in caplog.text
        assert not pool.buffer[:8].any()  # a fresh segment, not the dead child's bytes


def test_zombie_owner_counts_as_dead() -> None:
    name = make_pool_name("zombie")
    proc, pid, conn = start_child(child_create_and_wait, name)
    assert recv(conn) == pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while shm._start_ticks(pid) is not None:  # not reaped yet: a zombie
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with SharedPool.create(name, MIB):
        pass
    proc.join(30)


def test_live_owner_is_a_clear_error() -> None:
    name = make_pool_name("live")
    proc, pid, conn = start_child(child_create_and_wait, name)
    assert recv(conn) == pid
    try:
        with pytest.raises(PoolInUseError, match=f"is in use: its creator pid {pid} is alive"):
            SharedPool.create(name, MIB)
        other = SharedPool.attach(name)  # attaching is what other processes should do
        assert (other.buffer[:8] == 0x5A).all()
        other.close()
    finally:
        os.kill(pid, signal.SIGKILL)
        proc.join(30)
        posix_ipc.unlink_shared_memory(name)
    with SharedPool.create(name, MIB), pytest.raises(PoolInUseError, match=f"creator pid {os.getpid()} is alive"):
        SharedPool.create(name, MIB)  # this process is alive too


def test_a_foreign_segment_is_never_removed() -> None:
    name = make_pool_name("foreign")
    seg = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=PAGE_BYTES)
    seg.close_fd()
    try:
        with pytest.raises(PoolInUseError, match="exists and is not a flexkv pool"):
            SharedPool.create(name, MIB)
        with pytest.raises(PoolInUseError, match="is not a flexkv pool"):
            SharedPool.attach(name)
        assert name in list_flexkv_segments()
    finally:
        posix_ipc.unlink_shared_memory(name)


def test_progress_is_reported_per_chunk_and_at_the_end() -> None:
    calls: list[tuple[int, int]] = []
    nbytes = 300 * MIB
    with SharedPool.create(make_pool_name("test"), nbytes, progress=lambda d, t: calls.append((d, t))) as pool:
        assert calls == [(256 * MIB, nbytes), (nbytes, nbytes)]
        assert os.stat(f"/dev/shm{pool.name}").st_blocks * 512 >= nbytes  # allocated now, not on first touch


def _rss_shmem() -> int:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("RssShmem:"))
    return int(line.split()[1]) * 1024


def test_populate_maps_every_page_of_an_attached_pool_now() -> None:
    """A worker maps the pool before it reports ready: its first copies must not fault per 4 KiB."""
    nbytes = 64 * MIB
    calls: list[tuple[int, int]] = []
    with SharedPool.create(make_pool_name("test"), nbytes) as pool:
        other = SharedPool.attach(pool.name)
        try:
            before = _rss_shmem()
            other.populate(progress=lambda d, t: calls.append((d, t)))
            assert _rss_shmem() - before >= nbytes  # every page of the second mapping is mapped
            assert calls == [(nbytes, nbytes)]
        finally:
            other.close()


@pytest.mark.parametrize("num_threads", [1, 2])
def test_touch_fallback_where_fallocate_is_missing(monkeypatch: pytest.MonkeyPatch, num_threads: int) -> None:
    monkeypatch.setattr(shm, "_fallocate", lambda fd, offset, length: False)
    calls: list[int] = []
    with SharedPool.create(make_pool_name("test"), 8 * MIB + 1, num_threads=num_threads,
                           progress=lambda d, t: calls.append(d)) as pool:
        assert calls == [8 * MIB + 1]
        assert os.stat(f"/dev/shm{pool.name}").st_blocks * 512 >= 8 * MIB
        assert not pool.buffer.any()


def test_no_room_in_dev_shm_fails_before_allocating() -> None:
    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    with pytest.raises(OSError, match=r"/dev/shm has \d+ bytes free") as info:
        SharedPool.create(make_pool_name("huge"), free + (1 << 30))
    assert info.value.errno == errno.ENOSPC


def test_arrays_laid_out_in_one_pool_are_shared() -> None:
    shapes = [(2, 3, 16, 8), (5, 100), (0,), (7,)]
    pool, arrays = allocate_host_tensors(shapes, DType.BFLOAT16, tag="kv")
    with pool:
        assert [a.shape for a in arrays] == shapes and all(a.dtype == np.uint16 for a in arrays)
        assert all(a.ctypes.data % PAGE_BYTES == 0 for a in arrays)
        offsets = [a.ctypes.data - pool.address for a in arrays]
        assert offsets == [0, PAGE_BYTES, 2 * PAGE_BYTES, 2 * PAGE_BYTES]
        arrays[0][...] = np.arange(arrays[0].size).reshape(shapes[0])
        arrays[3][...] = 9
        expected = [("<u2", s, 0, int(a.astype(np.int64).sum())) for s, a in zip(shapes, arrays, strict=True)]
        proc, _, conn = start_child(child_read_arrays, pool.name, shapes)
        seen = recv(conn)
        proc.join(30)
        assert proc.exitcode == 0
        assert seen == expected
        assert (arrays[1] == 7).all()
        del arrays


def test_array_layout_matches_on_attach_or_fails_clearly() -> None:
    pool, arrays = allocate_host_tensors([(4, 1024)], np.float32, tag="kv")
    with pool:
        assert arrays[0].dtype == np.float32 and pool.nbytes == 4 * PAGE_BYTES
        with pytest.raises(ValueError, match="holds 16384 bytes, the shapes need 32768"):
            attach_arrays(pool.name, [(8, 1024)], np.float32)
        other, same = attach_arrays(pool.name, [(4, 1024)], "float32")
        arrays[0][3, 5] = 1.5
        assert same[0][3, 5] == 1.5
        del same
        other.close()
        del arrays
    with pytest.raises(ValueError, match="shape must be non-negative ints"):
        allocate_host_tensors([(4, -1)], np.float32)


def test_pool_names_are_short_unique_and_clean() -> None:
    names = {make_pool_name("cpu") for _ in range(100)}
    assert len(names) == 100
    long = make_pool_name("Some Very/Long Tag!")
    assert long.startswith(f"/flexkv-somevery-{os.getpid()}-") and len(long) <= 31 and "/" not in long[1:]
    assert all(n.startswith(f"/flexkv-cpu-{os.getpid()}-") and len(n) <= 31 for n in names)


@pytest.mark.parametrize(
    ("name", "nbytes", "match"),
    [("no-slash", MIB, "pool name must look like"), ("/a/b", MIB, "pool name must look like"),
     ("/flexkv-x", 0, "nbytes must be a positive int, got 0"), ("/flexkv-x", 1.5, "got 1.5")],
)
def test_bad_arguments_are_clear_errors(name: str, nbytes: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SharedPool.create(name, nbytes)


def test_a_pool_still_being_created_is_not_attached() -> None:
    with SharedPool.create(make_pool_name("test"), MIB) as pool:
        pool._write_header(ready=False)  # as while the creator is still prefaulting
        with pytest.raises(PoolInUseError, match=f"is not ready: pid {os.getpid()} is still creating it"):
            SharedPool.attach(pool.name)


def test_a_forked_child_never_unlinks_its_parents_pool() -> None:
    with SharedPool.create(make_pool_name("test"), MIB) as pool:
        pid = os.fork()
        if pid == 0:  # child: leaving the context must only unmap
            ok = not pool.is_creator
            with pool:
                pass
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert pool.is_creator and pool.name in list_flexkv_segments()


def test_engine_buffers_never_closed_leave_no_segment_once_their_process_exits() -> None:
    """allocate_host_kv_buffers in a process that exits without close(): its segment is removed at exit."""
    import subprocess
    import sys

    code = ("from flexkv.client import allocate_host_kv_buffers\n"
            "from flexkv.layout import KVCacheLayout, LayoutKind\n"
            "layout = KVCacheLayout(LayoutKind.VLLM_KV_FIRST, 2, 8, 16, 2, 16, 2)\n"
            "bufs = allocate_host_kv_buffers(layout, 'float16', tag='exit')\n"
            "print(bufs.segment.name, flush=True)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    name = out.stdout.strip().lstrip("/")
    assert name.startswith("flexkv-exit-"), out
    assert not os.path.exists(f"/dev/shm/{name}"), f"{name} outlived its process"

"""The io_uring engine on real files, pipes and devices: bytes round-trip, per-request errors."""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from flexkv.native.uring import MAX_DEPTH, UringEngine

BLOCK = 16 * 1024


def buffer(num_bytes: int, seed: int | None = None) -> tuple[mmap.mmap, np.ndarray]:
    """A page-aligned buffer (mmap), optionally filled with random bytes."""
    mem = mmap.mmap(-1, num_bytes)
    arr = np.frombuffer(mem, dtype=np.uint8)
    if seed is not None:
        arr[:] = np.random.default_rng(seed).integers(0, 256, num_bytes, dtype=np.uint8)
    return mem, arr


def addr_of(arr: np.ndarray) -> int:
    return int(arr.ctypes.data)


@pytest.fixture
def direct_file(tmp_path: Path) -> Iterator[int]:
    """An O_DIRECT fd on a 4 MiB preallocated file under tmp_path."""
    fd = os.open(tmp_path / "data", os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600)
    os.posix_fallocate(fd, 0, 4 << 20)
    yield fd
    os.close(fd)


def test_blocks_round_trip_with_more_requests_than_depth(direct_file: int, tmp_path: Path) -> None:
    # 200 blocks through a ring of depth 8: the queue is refilled as completions arrive.
    n = 200
    _src_mem, src = buffer(n * BLOCK, seed=1)
    _dst_mem, dst = buffer(n * BLOCK)
    rng = np.random.default_rng(2)
    slots = rng.permutation(256)[:n]  # file slot of memory block i
    with UringEngine(depth=8) as engine:
        res = engine.write([direct_file] * n, slots * BLOCK, addr_of(src) + np.arange(n) * BLOCK, BLOCK)
        assert res.dtype == np.int32 and not res.any()
        order = rng.permutation(n)  # read back in another order
        res = engine.read([direct_file] * n, slots[order] * BLOCK, addr_of(dst) + order * BLOCK, BLOCK)
        assert not res.any()
    assert np.array_equal(src, dst)
    # The bytes really are on disk where we put them (checked without io_uring).
    with open(tmp_path / "data", "rb") as f:
        f.seek(int(slots[7]) * BLOCK)
        assert f.read(BLOCK) == src[7 * BLOCK:8 * BLOCK].tobytes()


def test_each_failure_is_reported_on_its_own_request(direct_file: int) -> None:
    # One batch mixing good requests with a bad fd, a read past EOF, an O_DIRECT misalignment and a
    # bad address: the good ones complete with the right bytes, each bad one gets its own errno.
    _src_mem, src = buffer(4 * BLOCK, seed=3)
    with UringEngine(depth=4) as engine:
        assert not engine.write([direct_file] * 4, np.arange(4) * BLOCK, addr_of(src) + np.arange(4) * BLOCK,
                                BLOCK).any()
        _dst_mem, dst = buffer(8 * BLOCK)
        base = addr_of(dst)
        fds = [direct_file, -1, direct_file, direct_file, direct_file, direct_file]
        offsets = [0, 0, 4 << 20, 100, BLOCK, 3 * BLOCK]
        addrs = [base, base + BLOCK, base + 2 * BLOCK, base + 3 * BLOCK, 4096, base + 5 * BLOCK]
        res = engine.read(fds, offsets, addrs, BLOCK)
    assert res.tolist() == [0, -errno.EBADF, -errno.ENODATA, -errno.EINVAL, -errno.EFAULT, 0]
    assert np.array_equal(dst[:BLOCK], src[:BLOCK])
    assert np.array_equal(dst[5 * BLOCK:6 * BLOCK], src[3 * BLOCK:4 * BLOCK])


def test_short_reads_are_resubmitted_until_complete() -> None:
    # A pipe hands out whatever has arrived, so each read completes short; the engine must keep
    # resubmitting the remainder until all bytes landed, in order.
    total = 64 * 1024
    _src_mem, src = buffer(total, seed=4)
    _dst_mem, dst = buffer(total)
    rfd, wfd = os.pipe()

    def trickle() -> None:
        for start in range(0, total, 7000):
            os.write(wfd, src[start:start + 7000].tobytes())
            time.sleep(0.002)

    writer = threading.Thread(target=trickle)
    writer.start()
    try:
        with UringEngine(depth=2) as engine:
            res = engine.read([rfd], [0], [addr_of(dst)], total)
    finally:
        writer.join()
        os.close(rfd)
        os.close(wfd)
    assert res.tolist() == [0]
    assert np.array_equal(src, dst)


def test_write_errors_from_the_device_are_per_request(direct_file: int) -> None:
    # /dev/full fails every write with ENOSPC; the real file beside it in the batch still succeeds.
    _src_mem, src = buffer(2 * BLOCK, seed=5)
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        with UringEngine(depth=4) as engine:
            res = engine.write([full, direct_file], [0, 0], [addr_of(src), addr_of(src) + BLOCK], BLOCK)
    finally:
        os.close(full)
    assert res.tolist() == [-errno.ENOSPC, 0]
    assert os.pread(direct_file, 0, 0) == b""  # fd still usable


def test_registered_files_are_named_by_index(direct_file: int, tmp_path: Path) -> None:
    other = os.open(tmp_path / "other", os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600)
    os.posix_fallocate(other, 0, BLOCK)
    _src_mem, src = buffer(2 * BLOCK, seed=6)
    _dst_mem, dst = buffer(2 * BLOCK)
    try:
        with UringEngine(depth=4) as engine:
            with pytest.raises(ValueError, match="no files are registered"):
                engine.read([0], [0], [addr_of(dst)], BLOCK, fixed_files=True)
            engine.register_files([direct_file, other])
            assert not engine.write([1, 0], [0, 0], [addr_of(src), addr_of(src) + BLOCK], BLOCK,
                                    fixed_files=True).any()
            res = engine.read([0, 1, 2], [0, 0, 0], [addr_of(dst) + BLOCK, addr_of(dst), addr_of(dst)], BLOCK,
                              fixed_files=True)
            assert res.tolist() == [0, 0, -errno.EBADF]  # index 2 is not registered
            engine.unregister_files()
    finally:
        os.close(other)
    assert np.array_equal(src, dst)


def test_bad_arguments_raise_clear_errors(direct_file: int) -> None:
    with pytest.raises(ValueError, match="depth"):
        UringEngine(depth=0)
    with pytest.raises(ValueError, match="depth"):
        UringEngine(depth=MAX_DEPTH + 1)
    with pytest.raises(OSError, match="io_uring setup"):
        UringEngine(depth=4, setup_flags=1 << 31)  # flag unknown to the kernel: EINVAL
    engine = UringEngine(depth=4)
    with pytest.raises(ValueError, match="offsets has 1 entries, expected 2"):
        engine.read([direct_file] * 2, [0], [4096, 8192], BLOCK)
    with pytest.raises(ValueError, match="length"):
        engine.read([direct_file], [0], [4096], 0)
    with pytest.raises(ValueError, match="1-D"):
        engine.read([[direct_file]], [[0]], [[4096]], BLOCK)
    assert engine.read([], [], [], BLOCK).shape == (0,)
    engine.close()
    engine.close()  # idempotent
    assert engine.closed
    with pytest.raises(ValueError, match="closed"):
        engine.read([direct_file], [0], [4096], BLOCK)

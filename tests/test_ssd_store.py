"""SSDStore on real files under tmp_path: bytes round-trip through a 4 KiB-aligned pool, striping,
file-size caps, restart reuse/recreate, the buffered fallback, and every error path."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest

from flexkv.types import ConfigError
from flexkv.workers.ssd_store import META_NAME, NO_DIRECT_ENV, SSDStore

BLOCK = 3 * 4096 + 100  # not a multiple of 4 KiB: slots are padded to 16 KiB
SLOT = 16 * 1024


class Pool:
    """A CPU block pool like the shared-memory one: page-aligned, stride = one slot."""

    def __init__(self, num_blocks: int, stride: int = SLOT, seed: int | None = None) -> None:
        self.stride = stride
        self.mem = mmap.mmap(-1, num_blocks * stride)
        self.arr = np.frombuffer(self.mem, dtype=np.uint8)
        if seed is not None:
            self.arr[:] = np.random.default_rng(seed).integers(0, 256, self.arr.size, dtype=np.uint8)
        self.addr = int(self.arr.ctypes.data)

    def block(self, cpu_id: int, num_bytes: int = BLOCK) -> bytes:
        return self.arr[cpu_id * self.stride: cpu_id * self.stride + num_bytes].tobytes()


def make_dirs(tmp_path: Path, count: int) -> list[str]:
    dirs = [tmp_path / f"drive{i}" for i in range(count)]
    for d in dirs:
        d.mkdir()
    return [str(d) for d in dirs]


def test_random_blocks_round_trip_through_the_pool(tmp_path: Path) -> None:
    # Write 40 pool blocks to random SSD slots, read them back into other pool blocks: same bytes.
    dirs = make_dirs(tmp_path, 1)
    src, dst = Pool(40, seed=1), Pool(40)
    rng = np.random.default_rng(2)
    ssd_ids = rng.permutation(100)[:40]
    with SSDStore(dirs, num_blocks=100, block_bytes=BLOCK, max_file_bytes=1 << 30, depth=8) as store:
        assert store.direct_io and store.slot_bytes == SLOT and store.io_bytes == SLOT
        assert not store.write_blocks(ssd_ids, src.addr, SLOT, np.arange(40)).any()
        cpu_ids = rng.permutation(40)
        res = store.read_blocks(ssd_ids, dst.addr, SLOT, cpu_ids)
    assert res.dtype == np.int32 and not res.any()
    for i in range(40):
        assert dst.block(int(cpu_ids[i])) == src.block(i)


def test_blocks_are_striped_across_dirs_at_computed_offsets(tmp_path: Path) -> None:
    # Consecutive block ids land on different drives; block i is at local slot i // 3 of dir i % 3.
    dirs = make_dirs(tmp_path, 3)
    src = Pool(12, seed=3)
    with SSDStore(dirs, num_blocks=12, block_bytes=BLOCK, max_file_bytes=1 << 20) as store:
        assert not store.write_blocks(np.arange(12), src.addr, SLOT, np.arange(12)).any()
        for block_id in range(12):
            path, offset = store.locate(block_id)
            assert path == os.path.join(dirs[block_id % 3], "flexkv_ssd_0000.data")
            assert offset == (block_id // 3) * SLOT
            with open(path, "rb") as f:  # read the file directly, no io_uring
                f.seek(offset)
                assert f.read(BLOCK) == src.block(block_id)


def test_file_size_cap_splits_a_dir_into_several_files(tmp_path: Path) -> None:
    # 2 dirs x 11 slots each at most 4 slots per file: files of 4, 4 and 3 slots; 21 blocks -> the
    # second dir gets 10 slots (4, 4, 2).
    dirs = make_dirs(tmp_path, 2)
    src, dst = Pool(21, seed=4), Pool(21)
    with SSDStore(dirs, num_blocks=21, block_bytes=BLOCK, max_file_bytes=4 * SLOT + 100) as store:
        sizes = [sorted(os.path.getsize(p) for p in Path(d).glob("*.data")) for d in dirs]
        assert sizes == [[3 * SLOT, 4 * SLOT, 4 * SLOT], [2 * SLOT, 4 * SLOT, 4 * SLOT]]
        assert store.locate(20) == (os.path.join(dirs[0], "flexkv_ssd_0002.data"), 2 * SLOT)
        assert store.locate(19) == (os.path.join(dirs[1], "flexkv_ssd_0002.data"), 1 * SLOT)
        assert not store.write_blocks(np.arange(21), src.addr, SLOT, np.arange(21)).any()
        assert not store.read_blocks(np.arange(21)[::-1], dst.addr, SLOT, np.arange(21)[::-1]).any()
    assert all(dst.block(i) == src.block(i) for i in range(21))


def test_restart_reuses_matching_files_and_recreates_on_mismatch(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dirs = make_dirs(tmp_path, 2)
    src = Pool(8, seed=5)
    with SSDStore(dirs, num_blocks=8, block_bytes=BLOCK, max_file_bytes=1 << 20) as store:
        assert not store.write_blocks(np.arange(8), src.addr, SLOT, np.arange(8)).any()
    inode = os.stat(os.path.join(dirs[0], "flexkv_ssd_0000.data")).st_ino

    # Same config: the same files are opened and the data is still there.
    caplog.set_level(logging.INFO, logger="flexkv.ssd")
    dst = Pool(8)
    with SSDStore(dirs, num_blocks=8, block_bytes=BLOCK, max_file_bytes=1 << 20) as store:
        assert not store.read_blocks(np.arange(8), dst.addr, SLOT, np.arange(8)).any()
    assert all(dst.block(i) == src.block(i) for i in range(8))
    assert os.stat(os.path.join(dirs[0], "flexkv_ssd_0000.data")).st_ino == inode
    assert "reusing existing files" in caplog.text

    # Another block size: the layout changed, so the files are recreated with a warning and the old
    # blocks are gone (a slot no record names never reads as data).
    caplog.clear()
    dst = Pool(8, stride=8192, seed=6)
    with SSDStore(dirs, num_blocks=8, block_bytes=8192, max_file_bytes=1 << 20) as store:
        assert (store.read_blocks(np.arange(8), dst.addr, 8192, np.arange(8)) == -errno.EBADMSG).all()
        assert store.journal.num_known == 0
    assert "do not match the configured layout; recreating" in caplog.text
    with open(os.path.join(dirs[0], META_NAME)) as f:
        assert '"block_bytes": 8192' in f.read()


def test_clean_and_remove_files_delete_only_our_files(tmp_path: Path) -> None:
    dirs = make_dirs(tmp_path, 1)
    (Path(dirs[0]) / "unrelated.txt").write_text("keep me")
    src, dst = Pool(4, seed=7), Pool(4)
    with SSDStore(dirs, num_blocks=4, block_bytes=BLOCK, max_file_bytes=1 << 20) as store:
        assert not store.write_blocks(np.arange(4), src.addr, SLOT, np.arange(4)).any()
    with SSDStore(dirs, num_blocks=4, block_bytes=BLOCK, max_file_bytes=1 << 20, clean=True) as store:
        # clean=True started from fresh files: the old blocks are unknown, never served
        assert (store.read_blocks(np.arange(4), dst.addr, SLOT, np.arange(4)) == -errno.EBADMSG).all()
    SSDStore.remove_files([*dirs, str(tmp_path / "never-created")])
    assert os.listdir(dirs[0]) == ["unrelated.txt"]


def test_buffered_fallback_when_o_direct_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # Simulate a file system that rejects O_DIRECT at open (EINVAL): one log line, buffered I/O,
    # exact block lengths (no slot padding) and no pool alignment requirement.
    real_open = os.open

    def open_without_direct(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", open_without_direct)
    caplog.set_level(logging.WARNING, logger="flexkv.ssd")
    src, dst = Pool(6, seed=8), Pool(7)
    with SSDStore(make_dirs(tmp_path, 2), num_blocks=6, block_bytes=BLOCK, max_file_bytes=1 << 20) as store:
        assert not store.direct_io and store.io_bytes == BLOCK
        assert not store.write_blocks(np.arange(6), src.addr, SLOT, np.arange(6)).any()
        # An unaligned pool with a packed stride is fine without O_DIRECT.
        assert not store.read_blocks(np.arange(6), dst.addr + 100, BLOCK, np.arange(6)).any()
    assert [r.message for r in caplog.records].count(
        f"SSD cache dir {tmp_path / 'drive0'}: file system refuses O_DIRECT; using buffered I/O") == 1
    for i in range(6):
        assert dst.arr[100 + i * BLOCK: 100 + (i + 1) * BLOCK].tobytes() == src.block(i)


def test_unaligned_pool_under_o_direct_uses_buffered_io_coherently(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A pool packed at block_bytes stride cannot take O_DIRECT (the slot padding would spill into the
    # next block): such calls go buffered, with one warning, and see what O_DIRECT calls wrote.
    caplog.set_level(logging.WARNING, logger="flexkv.ssd")
    aligned, packed_src, packed_dst = Pool(6, seed=11), Pool(6, stride=BLOCK, seed=12), Pool(7, stride=BLOCK)
    with SSDStore(make_dirs(tmp_path, 2), num_blocks=12, block_bytes=BLOCK, max_file_bytes=1 << 20) as store:
        assert store.direct_io
        assert not store.write_blocks(np.arange(6), aligned.addr, SLOT, np.arange(6)).any()  # O_DIRECT
        assert not store.write_blocks(np.arange(6, 12), packed_src.addr, BLOCK, np.arange(6)).any()  # buffered
        assert not store.read_blocks(np.arange(6), packed_dst.addr, BLOCK, np.arange(6)).any()  # buffered
        back = Pool(6)
        assert not store.read_blocks(np.arange(6, 12), back.addr, SLOT, np.arange(6)).any()  # O_DIRECT
    assert all(packed_dst.block(i) == aligned.block(i) for i in range(6))
    assert not packed_dst.arr[6 * BLOCK:].any()  # nothing written past the last packed block
    assert all(back.block(i) == packed_src.block(i) for i in range(6))
    assert sum("not 4096-byte aligned; using buffered I/O" in r.message for r in caplog.records) == 1


def test_buffered_io_by_flag_env_and_on_tmpfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = Pool(3, seed=9), Pool(3)
    with SSDStore(make_dirs(tmp_path, 1), 3, BLOCK, 1 << 20, try_direct_io=False) as store:
        assert not store.direct_io
    monkeypatch.setenv(NO_DIRECT_ENV, "1")
    with SSDStore([str(tmp_path / "drive0")], 3, BLOCK, 1 << 20) as store:
        assert not store.direct_io
    monkeypatch.delenv(NO_DIRECT_ENV)
    # tmpfs: O_DIRECT works on recent kernels, else the store falls back; either way bytes round-trip.
    shm_dir = tempfile.mkdtemp(prefix="flexkv-test-", dir="/dev/shm")
    try:
        with SSDStore([shm_dir], 3, BLOCK, 1 << 20) as store:
            assert not store.write_blocks([2, 0, 1], src.addr, SLOT, [0, 1, 2]).any()
            assert not store.read_blocks([2, 0, 1], dst.addr, SLOT, [0, 1, 2]).any()
    finally:
        shutil.rmtree(shm_dir)
    assert all(dst.block(i) == src.block(i) for i in range(3))


def test_missing_file_and_unwritable_dirs_are_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-drive")
    with pytest.raises(FileNotFoundError, match="does not exist") as exc:
        SSDStore([missing], 4, BLOCK, 1 << 20)
    assert exc.value.filename == missing
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    with pytest.raises(NotADirectoryError, match="not a directory") as exc2:
        SSDStore([str(not_a_dir)], 4, BLOCK, 1 << 20)
    assert exc2.value.filename == str(not_a_dir)


def _try_open_as_nobody(path: str) -> str:
    """Fork, drop to uid/gid 65534, try to open a store in ``path``; return the outcome."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        outcome = "opened"
        try:
            os.setgid(65534)
            os.setuid(65534)
            SSDStore([path], 4, BLOCK, 1 << 20).close()
        except BaseException as e:  # noqa: BLE001 - the child reports any outcome
            outcome = f"{type(e).__name__}: {e}"
        os.write(wfd, outcome.encode())
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        outcome = f.read().decode()
    os.waitpid(pid, 0)
    return outcome


def test_unwritable_dir_is_refused_for_a_non_root_user() -> None:
    # root bypasses permission bits, so the store is opened by an unprivileged child process.
    drive = tempfile.mkdtemp(prefix="flexkv-test-ro-", dir="/tmp")
    try:
        os.chmod(drive, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        if os.geteuid() == 0:
            outcome = _try_open_as_nobody(drive)
        else:
            try:
                SSDStore([drive], 4, BLOCK, 1 << 20).close()
                outcome = "opened"
            except PermissionError as e:
                outcome = f"PermissionError: {e}"
    finally:
        os.chmod(drive, stat.S_IRWXU)
        shutil.rmtree(drive)
    assert outcome.startswith("PermissionError") and "not writable" in outcome and drive in outcome


def test_bad_sizes_and_not_enough_space_are_config_errors(tmp_path: Path) -> None:
    dirs = make_dirs(tmp_path, 2)
    with pytest.raises(ConfigError, match=r"needs .* GiB .* but only .* GiB is free") as exc:
        SSDStore(dirs, num_blocks=1 << 40, block_bytes=1 << 20, max_file_bytes=1 << 40)
    assert dirs[0] in str(exc.value) and dirs[1] in str(exc.value)
    assert os.listdir(dirs[0]) == []  # nothing was created
    with pytest.raises(ConfigError, match="smaller than one block slot"):
        SSDStore(dirs, num_blocks=4, block_bytes=BLOCK, max_file_bytes=SLOT - 1)
    with pytest.raises(ConfigError, match="distinct"):
        SSDStore([dirs[0], dirs[0] + "/"], num_blocks=4, block_bytes=BLOCK, max_file_bytes=1 << 20)
    with pytest.raises(ConfigError, match="at least one directory"):
        SSDStore([], num_blocks=4, block_bytes=BLOCK, max_file_bytes=1 << 20)
    with pytest.raises(ConfigError, match="num_blocks"):
        SSDStore(dirs, num_blocks=0, block_bytes=BLOCK, max_file_bytes=1 << 20)


def test_truncated_file_fails_only_the_blocks_it_lost(tmp_path: Path) -> None:
    # Someone truncates a data file under us: blocks past the new end read short / hit EOF and are
    # reported per block; the others still return their bytes. Never a crash.
    dirs = make_dirs(tmp_path, 1)
    src, dst = Pool(8, seed=10), Pool(8)
    with SSDStore(dirs, num_blocks=8, block_bytes=BLOCK, max_file_bytes=1 << 20) as store:
        assert not store.write_blocks(np.arange(8), src.addr, SLOT, np.arange(8)).any()
        os.truncate(os.path.join(dirs[0], "flexkv_ssd_0000.data"), 5 * SLOT + 100)  # block 5 half gone
        res = store.read_blocks(np.arange(8), dst.addr, SLOT, np.arange(8))
    assert res[:5].tolist() == [0] * 5
    assert all(r < 0 for r in res[5:].tolist())
    assert res[6] == -errno.ENODATA and res[7] == -errno.ENODATA
    assert all(dst.block(i) == src.block(i) for i in range(5))


def test_programming_errors_raise_value_error(tmp_path: Path) -> None:
    pool = Pool(4)
    with SSDStore(make_dirs(tmp_path, 1), 4, BLOCK, 1 << 20) as store:
        with pytest.raises(ValueError, match=r"ssd_ids out of range \(must be 0..3\)"):
            store.read_blocks([4], pool.addr, SLOT, [0])
        with pytest.raises(ValueError, match="cpu_ids out of range"):
            store.read_blocks([0], pool.addr, SLOT, [-1])
        with pytest.raises(ValueError, match="differ in length"):
            store.write_blocks([0, 1], pool.addr, SLOT, [0])
        with pytest.raises(ValueError, match="integer"):
            store.write_blocks([0.5], pool.addr, SLOT, [0])
        with pytest.raises(ValueError, match=f"stride must be >= block_bytes {BLOCK}"):
            store.read_blocks([0], pool.addr, BLOCK - 1, [0])
        with pytest.raises(ValueError, match="address 0x0"):
            store.read_blocks([0], 0, SLOT, [0])
        assert store.read_blocks([], pool.addr, SLOT, []).shape == (0,)

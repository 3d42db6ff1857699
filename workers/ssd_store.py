"""SSD tier storage: block slots in preallocated files striped over drives, moved by io_uring.

Runs in the SSD worker process; the scheduler never touches it. Block ``b`` lives in directory
``b % num_dirs`` (one directory per drive, so consecutive blocks hit different drives), at local
slot ``b // num_dirs`` of that directory, which is split over files of at most ``max_file_bytes``.
Slots are ``block_bytes`` rounded up to 4 KiB, so every block is one aligned O_DIRECT I/O.
Each directory holds a small metadata file recording its layout; on restart files are reused when
it matches and recreated (with a log line) when it does not.

Every block is written with a checksum (XXH3 seeded with the block's hash, ``flexkv.native.checksum``)
kept in the index journal (``flexkv.ssd_journal``) and verified after every read: a block whose
bytes do not match reads as ``-EBADMSG``, never as data. The journal also lets a restarted server
find the blocks again.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import glob
import json
import logging
import mmap
import os
import stat
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from flexkv.native.checksum import MAX_THREADS, checksum_blocks
from flexkv.native.uring import ResultArray, UringEngine
from flexkv.progress import Progress
from flexkv.ssd_journal import JOURNAL_NAME, LOCK_NAME, Journal
from flexkv.types import ConfigError

logger = logging.getLogger("flexkv.ssd")

SLOT_ALIGN = 4096
META_NAME = "flexkv_ssd.meta.json"
DATA_GLOB = "flexkv_ssd_*.data"
NO_DIRECT_ENV = "FLEXKV_SSD_NO_DIRECT"  # "1": never try O_DIRECT (tests, odd file systems)
_META_FORMAT = "flexkv-ssd/1"


def _round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _data_name(file_idx: int) -> str:
    return f"flexkv_ssd_{file_idx:04d}.data"


@dataclasses.dataclass(frozen=True)
class SSDLayout:
    """Where each block lives: pure arithmetic over the store's configuration."""

    num_dirs: int
    num_blocks: int
    block_bytes: int
    slot_bytes: int
    slots_per_file: int

    def num_slots(self, dir_idx: int) -> int:
        return (self.num_blocks - dir_idx + self.num_dirs - 1) // self.num_dirs

    def file_sizes(self, dir_idx: int) -> list[int]:
        slots = self.num_slots(dir_idx)
        full, rest = divmod(slots, self.slots_per_file)
        sizes = [self.slots_per_file * self.slot_bytes] * full
        return [*sizes, rest * self.slot_bytes] if rest else sizes

    def locate(self, ssd_ids: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], ...]:
        """(dir index, file index, byte offset) of each block id."""
        local = ssd_ids // self.num_dirs
        return ssd_ids % self.num_dirs, local // self.slots_per_file, (local % self.slots_per_file) * self.slot_bytes

    def meta(self, dir_idx: int) -> dict[str, Any]:
        return {"format": _META_FORMAT, "dir_index": dir_idx, **dataclasses.asdict(self),
                "file_sizes": self.file_sizes(dir_idx)}


def _check_dir(path: str) -> None:
    """Raise an OSError naming ``path`` unless it is an existing, writable directory."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "SSD cache dir does not exist", path) from None
    except PermissionError:
        raise PermissionError(errno.EACCES, "SSD cache dir is not accessible", path) from None
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "SSD cache dir is not a directory", path)
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "SSD cache dir is not writable", path)


def _read_meta(path: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(path, META_NAME)) as f:
            meta = json.load(f)
        return meta if isinstance(meta, dict) else None
    except (OSError, ValueError):
        return None


def _files_match(path: str, sizes: list[int]) -> bool:
    for idx, size in enumerate(sizes):
        try:
            if os.stat(os.path.join(path, _data_name(idx))).st_size != size:
                return False
        except OSError:
            return False
    return True


def _check_space(dirs: Sequence[str], needed: dict[str, int]) -> None:
    """ConfigError naming the dirs when a file system lacks room for the files still to create."""
    by_dev: dict[int, list[str]] = {}
    for path in dirs:
        if needed.get(path):
            by_dev.setdefault(os.stat(path).st_dev, []).append(path)
    for paths in by_dev.values():
        total = sum(needed[p] for p in paths)
        vfs = os.statvfs(paths[0])
        free = vfs.f_bavail * vfs.f_frsize
        if total > free:
            raise ConfigError(f"ssd_cache_dir {', '.join(paths)}: needs {total / 2**30:.2f} GiB for the SSD "
                              f"cache files but only {free / 2**30:.2f} GiB is free")


_PREALLOC_CHUNK_BYTES = 1 << 30


def _create_files(path: str, layout: SSDLayout, dir_idx: int) -> None:
    """Preallocate this dir's data files, then write its metadata (last, so a crash means 'recreate')."""
    sizes = layout.file_sizes(dir_idx)
    with Progress(f"preallocating SSD cache files in {path}", sum(sizes)) as progress:
        for idx, size in enumerate(sizes):
            name = os.path.join(path, _data_name(idx))
            fd = os.open(name, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
            try:
                for offset in range(0, size, _PREALLOC_CHUNK_BYTES):  # in pieces, for the progress report
                    os.posix_fallocate(fd, offset, min(_PREALLOC_CHUNK_BYTES, size - offset))
                    progress(progress.done + min(_PREALLOC_CHUNK_BYTES, size - offset))
            except OSError as e:
                raise OSError(e.errno, f"cannot preallocate {size} bytes for the SSD cache: {e.strerror}",
                              name) from None
            finally:
                os.close(fd)
    tmp = os.path.join(path, META_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(layout.meta(dir_idx), f)
    os.replace(tmp, os.path.join(path, META_NAME))


def _open_files(dirs: Sequence[str], layout: SSDLayout, direct: bool) -> list[list[int]]:
    """Open every data file (O_DIRECT when asked); closes what it opened and re-raises on error."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
    fds: list[list[int]] = []
    try:
        for dir_idx, path in enumerate(dirs):
            fds.append([])
            for idx in range(len(layout.file_sizes(dir_idx))):
                fds[-1].append(os.open(os.path.join(path, _data_name(idx)), flags))
    except OSError:
        _close_all(fds)
        raise
    return fds


def _close_all(fds: list[list[int]]) -> None:
    for row in fds:
        for fd in row:
            os.close(fd)


def _probe_direct(engine: UringEngine, fd: int) -> bool:
    """True unless an aligned O_DIRECT read is refused with EINVAL (FUSE and some network FS)."""
    with mmap.mmap(-1, SLOT_ALIGN) as page:
        addr = np.frombuffer(page, dtype=np.uint8).ctypes.data
        res = int(engine.read([fd], [0], [addr], SLOT_ALIGN)[0])
    return res != -errno.EINVAL


class SSDStore:
    """Block slots on local drives, read into and written from the shared-memory CPU pool.

    Created in the SSD worker process. Raises ``ConfigError`` for bad sizes or too little free
    space, and an ``OSError`` naming the directory for a missing/unwritable one. ``clean=True``
    removes existing cache files first. ``try_direct_io=False`` (or env ``FLEXKV_SSD_NO_DIRECT=1``)
    skips O_DIRECT; when the file system refuses it, buffered I/O is used with one log line.

    ``fingerprint`` names the KV layout (``kv_fingerprint``): a journal written for another one is
    discarded (one log line). ``durable``: fdatasync the data files before appending a write's
    journal records and the records before the write returns (False: records reach the page cache
    only, which survives a process crash but not a power loss). ``checksum_threads`` 0: up to 4.
    ``persist_index=False`` forgets what the journal holds at open (the tier starts cold).
    """

    def __init__(self, dirs: Sequence[str], num_blocks: int, block_bytes: int, max_file_bytes: int,
                 depth: int = 512, clean: bool = False, try_direct_io: bool = True, fingerprint: str = "",
                 durable: bool = True, checksum_threads: int = 0, persist_index: bool = True) -> None:
        self.dirs = [os.path.abspath(d) for d in dirs]
        self._check_config(num_blocks, block_bytes, max_file_bytes)
        slot_bytes = _round_up(block_bytes, SLOT_ALIGN)
        self.layout = SSDLayout(len(self.dirs), num_blocks, block_bytes, slot_bytes, max_file_bytes // slot_bytes)
        for path in self.dirs:
            _check_dir(path)
        if clean:
            self.remove_files(self.dirs)
        self._prepare_files()
        self.checksum_threads = checksum_threads or max(1, min(4, os.cpu_count() or 1, MAX_THREADS))
        self.durable = durable
        self.num_checksum_failures = 0
        if not persist_index:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.dirs[0], JOURNAL_NAME))
        self.journal = Journal(self.dirs[0], fingerprint, self.layout.meta(0), num_blocks, sync=durable)
        self._verifier = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ssd-verify")
        want_direct = try_direct_io and os.environ.get(NO_DIRECT_ENV, "") not in ("1", "true", "yes")
        self._engine = UringEngine(depth)
        self._direct_fds: list[list[int]] = []
        self._buffered_fds: list[list[int]] = []
        self._warned_unaligned_pool = False
        try:
            self.direct_io = self._open(want_direct)
            self._fd_tables = self._build_fd_tables()
        except BaseException:
            self.close()
            raise
        logger.info("SSD store: %d of %d slots hold known blocks (journal %s)", self.journal.num_known,
                    num_blocks, self.journal.path)
        logger.info("SSD store: %d blocks of %d bytes in %d dir(s), %s I/O, depth %d", num_blocks, block_bytes,
                    len(self.dirs), "O_DIRECT" if self.direct_io else "buffered", depth)

    verify_chunk_bytes = 64 << 20  # reads are verified in chunks of this size while the next chunk is read

    def _check_config(self, num_blocks: int, block_bytes: int, max_file_bytes: int) -> None:
        if not self.dirs:
            raise ConfigError("ssd_cache_dir: at least one directory is required")
        if len({os.path.realpath(d) for d in self.dirs}) != len(self.dirs):
            raise ConfigError(f"ssd_cache_dir: directories must be distinct, got {self.dirs}")
        if num_blocks < 1 or block_bytes < 1:
            raise ConfigError(f"SSD store: num_blocks ({num_blocks}) and block_bytes ({block_bytes}) must be >= 1")
        if max_file_bytes < _round_up(block_bytes, SLOT_ALIGN):
            raise ConfigError(f"ssd_max_file_bytes: {max_file_bytes} is smaller than one block slot "
                              f"({_round_up(block_bytes, SLOT_ALIGN)} bytes)")

    def _prepare_files(self) -> None:
        """Reuse each dir's files when its metadata matches, else (re)create them."""
        stale = [i for i, path in enumerate(self.dirs) if not self._reusable(i, path)]
        if stale:  # the journal names blocks in every dir: one recreated dir invalidates it
            try:
                os.unlink(os.path.join(self.dirs[0], JOURNAL_NAME))
            except FileNotFoundError:
                pass
        _check_space(self.dirs, {self.dirs[i]: sum(self.layout.file_sizes(i)) for i in stale})
        for i in stale:
            _create_files(self.dirs[i], self.layout, i)
            logger.info("SSD cache dir %s: created %d file(s)", self.dirs[i], len(self.layout.file_sizes(i)))

    def _reusable(self, dir_idx: int, path: str) -> bool:
        meta = _read_meta(path)
        if meta == self.layout.meta(dir_idx) and _files_match(path, self.layout.file_sizes(dir_idx)):
            logger.info("SSD cache dir %s: reusing existing files", path)
            return True
        if meta is not None or glob.glob(os.path.join(path, DATA_GLOB)):
            logger.warning("SSD cache dir %s: existing files do not match the configured layout; recreating", path)
        self.remove_files([path])
        return False

    def _open(self, want_direct: bool) -> bool:
        """Open the data files (buffered always, O_DIRECT when possible); returns whether O_DIRECT is in use."""
        self._buffered_fds = _open_files(self.dirs, self.layout, direct=False)
        if not want_direct:
            return False
        try:
            self._direct_fds = _open_files(self.dirs, self.layout, direct=True)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        if self._direct_fds and _probe_direct(self._engine, self._direct_fds[0][0]):
            return True
        _close_all(self._direct_fds)
        self._direct_fds = []
        logger.warning("SSD cache dir %s: file system refuses O_DIRECT; using buffered I/O", self.dirs[0])
        return False

    def _build_fd_tables(self) -> dict[bool, npt.NDArray[np.intc]]:
        """Register every fd; map is_direct -> table of registered indices by (dir, file), -1 where unused."""
        sets = {True: self._direct_fds, False: self._buffered_fds} if self._direct_fds else {False: self._buffered_fds}
        self._engine.register_files([fd for fds in sets.values() for row in fds for fd in row])
        tables, idx = {}, 0
        for is_direct, fds in sets.items():
            table = np.full((len(fds), max(len(r) for r in fds)), -1, dtype=np.intc)
            for d, row in enumerate(fds):
                table[d, : len(row)] = np.arange(idx, idx + len(row))
                idx += len(row)
            tables[is_direct] = table
        return tables

    @property
    def slot_bytes(self) -> int:
        """Bytes between consecutive slots in a file: block_bytes rounded up to 4 KiB."""
        return self.layout.slot_bytes

    @property
    def io_bytes(self) -> int:
        """Bytes moved per block with O_DIRECT: slot_bytes (with buffered I/O: block_bytes)."""
        return self.layout.slot_bytes if self.direct_io else self.layout.block_bytes

    def locate(self, ssd_id: int) -> tuple[str, int]:
        """(file path, byte offset) of block ``ssd_id``."""
        d, f, off = self.layout.locate(self._check_ids(np.array([ssd_id]), "ssd_ids", self.layout.num_blocks))
        return os.path.join(self.dirs[int(d[0])], _data_name(int(f[0]))), int(off[0])

    def read_blocks(self, ssd_ids: npt.ArrayLike, pool_addr: int, pool_block_bytes: int,
                    cpu_ids: npt.ArrayLike, block_hashes: npt.ArrayLike | None = None) -> ResultArray:
        """Copy SSD block ``ssd_ids[i]`` into pool block ``cpu_ids[i]`` (at pool_addr + id * pool_block_bytes).

        Returns int32 results, 0 or -errno per block (-ENODATA: the slot's file is shorter than
        expected; -EBADMSG: the bytes read do not match the checksum recorded when the slot was
        written, the slot holds no known block, or it holds another block than ``block_hashes[i]``
        names; the pool block then holds garbage and must not be used). Raises ``ValueError``
        only for programming errors (ids out of range, lengths differ, pool stride smaller than
        block_bytes). O_DIRECT needs a 4 KiB-aligned pool address
        and stride (so each block's slot padding fits in the pool; reads then also fill the pool
        bytes between block_bytes and slot_bytes); other pools get buffered I/O (one warning),
        which is slower but correct. Blocking; call from one thread.
        """
        ssd = self._check_ids(ssd_ids, "ssd_ids", self.layout.num_blocks)
        cpu = self._check_ids(cpu_ids, "cpu_ids", None)
        if ssd.shape != cpu.shape:
            raise ValueError(f"ssd_ids ({ssd.shape[0]}) and cpu_ids ({cpu.shape[0]}) differ in length")
        n = ssd.shape[0]
        hashes = self._hashes(block_hashes, n)
        results = np.zeros(n, dtype=np.int32)
        # Verify chunk k on the verifier thread while chunk k+1 is read (both release the GIL).
        step = max(self._engine.depth, self.verify_chunk_bytes // self.layout.slot_bytes)
        checks = []
        for start in range(0, n, step):
            sl = slice(start, min(n, start + step))
            _, addrs, results[sl] = self._rw(False, ssd[sl], pool_addr, pool_block_bytes, cpu[sl])
            checks.append(self._verifier.submit(self._verify, ssd[sl], addrs, None if hashes is None else hashes[sl],
                                                results[sl]))
        bad = [int(ssd[i]) for i in np.flatnonzero(results == -errno.EBADMSG)] if sum(
            c.result() for c in checks) else []
        if bad:
            self.num_checksum_failures += len(bad)
            logger.warning("SSD store: %d block(s) failed verification, first ssd block %d", len(bad), bad[0])
        return results

    def _verify(self, ssd: npt.NDArray[np.int64], addrs: npt.NDArray[np.uint64],
                hashes: npt.NDArray[np.uint64] | None, results: ResultArray) -> int:
        """Set ``results`` (a view) to -EBADMSG where a block read fine but does not verify; returns how many."""
        rec = self.journal.table[ssd]
        ok = results == 0
        sums = checksum_blocks(addrs[ok], self.layout.block_bytes, rec["block_hash"][ok], self.checksum_threads)
        good = (sums == rec["checksum"][ok]) & (rec["seq"][ok] != 0)
        if hashes is not None:
            good &= rec["block_hash"][ok] == hashes[ok]
        bad = np.flatnonzero(ok)[~good]
        results[bad] = -errno.EBADMSG
        return int(bad.size)

    def write_blocks(self, ssd_ids: npt.ArrayLike, pool_addr: int, pool_block_bytes: int,
                     cpu_ids: npt.ArrayLike, block_hashes: npt.ArrayLike | None = None,
                     parent_hashes: npt.ArrayLike | None = None, depths: npt.ArrayLike | None = None) -> ResultArray:
        """Copy pool block ``cpu_ids[i]`` into SSD block ``ssd_ids[i]``; results and errors as :meth:`read_blocks`.

        ``block_hashes[i]`` is the block's key (its chained hash), ``depths[i]`` its index in its
        prompt and ``parent_hashes[i]`` the key of the block before it (ignored at depth 0); they go
        into the journal so a restarted server can rebuild the index. Without them the block is
        keyed 0 at depth 0 (readable, not findable after a restart). When this returns, a block
        with result 0 and its record are durable (``durable``) or at least in the page cache.
        """
        ssd = self._check_ids(ssd_ids, "ssd_ids", self.layout.num_blocks)
        n = ssd.shape[0]
        hashes = self._hashes(block_hashes, n)
        hashes = hashes if hashes is not None else np.zeros(n, dtype=np.uint64)
        parents = self._hashes(parent_hashes, n)
        parents = parents if parents is not None else np.zeros(n, dtype=np.uint64)
        levels = np.zeros(n, dtype=np.int64) if depths is None else np.asarray(depths, dtype=np.int64)
        if levels.shape != (n,) or (levels < 0).any():
            raise ValueError(f"depths must be {n} non-negative ints")
        cpu = self._check_ids(cpu_ids, "cpu_ids", None)
        if cpu.shape != ssd.shape:
            raise ValueError(f"ssd_ids ({n}) and cpu_ids ({cpu.shape[0]}) differ in length")
        self._use_direct(pool_addr, pool_block_bytes)  # ValueError for a bad pool before anything runs
        addrs = pool_addr + cpu.astype(np.uint64) * np.uint64(pool_block_bytes)
        # The checksums (of the bytes being written: the pool blocks are locked) run beside the write.
        sums_f = self._verifier.submit(checksum_blocks, addrs, self.layout.block_bytes, hashes, self.checksum_threads)
        ssd, _, results = self._rw(True, ssd, pool_addr, pool_block_bytes, cpu)
        sums = sums_f.result()
        self.journal.forget(ssd[results != 0])  # partly written: the slot's bytes are unknown
        ok = np.flatnonzero(results == 0)
        try:
            if self.durable and ok.size:
                self._sync_data(ssd[ok])
            self.journal.append(ssd[ok], hashes[ok], parents[ok], levels[ok], sums[ok])
        except OSError as e:
            logger.error("SSD store: syncing a write of %d block(s) failed: %s", ok.size, e)
            results[ok] = -(e.errno or errno.EIO)
        return results

    @staticmethod
    def _hashes(values: npt.ArrayLike | None, n: int) -> npt.NDArray[np.uint64] | None:
        if values is None:
            return None
        arr = np.asarray(values)
        if arr.shape != (n,) or (arr.size and arr.dtype.kind not in "iu"):
            raise ValueError(f"block hashes must be {n} unsigned ints, got shape {arr.shape} dtype {arr.dtype}")
        return arr.astype(np.uint64, copy=False)

    def _sync_data(self, ssd: npt.NDArray[np.int64]) -> None:
        """fdatasync every data file holding one of these blocks (O_DIRECT bytes may sit in the drive's cache)."""
        d, f, _ = self.layout.locate(ssd)
        fds = self._direct_fds or self._buffered_fds
        for dir_idx, file_idx in set(zip(d.tolist(), f.tolist(), strict=True)):
            os.fdatasync(fds[dir_idx][file_idx])

    def _rw(self, is_write: bool, ssd_ids: npt.ArrayLike, pool_addr: int, pool_block_bytes: int,
            cpu_ids: npt.ArrayLike) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint64], ResultArray]:
        """(ssd ids, pool addresses, results) of one batch."""
        ssd = self._check_ids(ssd_ids, "ssd_ids", self.layout.num_blocks)
        cpu = self._check_ids(cpu_ids, "cpu_ids", None)
        if ssd.shape != cpu.shape:
            raise ValueError(f"ssd_ids ({ssd.shape[0]}) and cpu_ids ({cpu.shape[0]}) differ in length")
        use_direct = self._use_direct(pool_addr, pool_block_bytes)
        d, f, offsets = self.layout.locate(ssd)
        addrs = pool_addr + cpu.astype(np.uint64) * np.uint64(pool_block_bytes)
        io = self._engine.write if is_write else self._engine.read
        io_len = self.layout.slot_bytes if use_direct else self.layout.block_bytes
        try:
            return ssd, addrs, io(self._fd_tables[use_direct][d, f], offsets, addrs, io_len, fixed_files=True)
        except OSError as e:
            return ssd, addrs, self._recover(e, ssd.shape[0])

    def _recover(self, err: OSError, n: int) -> ResultArray:
        """The ring itself failed: fail the whole batch and start a fresh ring."""
        logger.error("SSD io_uring engine failed (%s); failing %d block(s) and recreating the ring", err, n)
        self._engine.close()
        self._engine = UringEngine(self._engine.depth)
        self._fd_tables = self._build_fd_tables()
        return np.full(n, -(err.errno or errno.EIO), dtype=np.int32)

    @staticmethod
    def _check_ids(ids: npt.ArrayLike, name: str, limit: int | None) -> npt.NDArray[np.int64]:
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ValueError(f"{name} must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        if arr.size and (arr.min() < 0 or (limit is not None and arr.max() >= limit)):
            bound = f"0..{limit - 1}" if limit is not None else ">= 0"
            raise ValueError(f"{name} out of range (must be {bound}): min {arr.min()}, max {arr.max()}")
        return arr

    def _use_direct(self, pool_addr: int, pool_block_bytes: int) -> bool:
        """Whether this pool can take O_DIRECT I/O; ValueError for an invalid pool."""
        if pool_addr <= 0 or pool_block_bytes < self.layout.block_bytes:
            raise ValueError(f"pool: address {pool_addr:#x} / stride {pool_block_bytes} invalid "
                             f"(stride must be >= block_bytes {self.layout.block_bytes})")
        if not self.direct_io:
            return False
        if pool_addr % SLOT_ALIGN == 0 and pool_block_bytes % SLOT_ALIGN == 0:
            return True
        if not self._warned_unaligned_pool:
            self._warned_unaligned_pool = True
            logger.warning("SSD store: pool address %#x / stride %d is not %d-byte aligned; using buffered I/O "
                           "for such pools (pad the pool's block stride to 4 KiB for O_DIRECT)",
                           pool_addr, pool_block_bytes, SLOT_ALIGN)
        return False

    def close(self) -> None:
        """Close the ring, the journal and the files (the files stay on disk for reuse). Idempotent."""
        if hasattr(self, "journal"):
            self.journal.close()
        if hasattr(self, "_verifier"):
            self._verifier.shutdown()
        self._engine.close()
        _close_all(self._direct_fds)
        _close_all(self._buffered_fds)
        self._direct_fds, self._buffered_fds = [], []

    def __enter__(self) -> SSDStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @staticmethod
    def remove_files(dirs: Sequence[str]) -> None:
        """Delete flexkv's cache files (data + metadata) from ``dirs``; other files and the dirs stay."""
        for path in dirs:
            for name in [*glob.glob(os.path.join(path, DATA_GLOB)), os.path.join(path, META_NAME),
                         os.path.join(path, JOURNAL_NAME), os.path.join(path, LOCK_NAME)]:
                try:
                    os.unlink(name)
                except FileNotFoundError:
                    pass

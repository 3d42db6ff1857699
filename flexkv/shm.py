"""The shared-memory CPU pool: one POSIX shared-memory segment mapped by the server and every worker.

The server creates the pool (:meth:`SharedPool.create`); workers and clients map it by name
(:meth:`SharedPool.attach`). The segment starts with one header page recording its creator (pid
and process start time), so a later ``create`` under the same name can tell a stale segment left by
a killed process (removed with a log line) from one still in use (an error). The data region
(``address``, ``buffer``) starts right after the header, 4 KiB aligned, as O_DIRECT SSD I/O needs.

Segments are plain files under /dev/shm on Linux: :func:`list_flexkv_segments` lists ours (leak tests).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import math
import mmap
import os
import secrets
import struct
import threading
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import posix_ipc

from flexkv.types import DType, FlexKVError

log = logging.getLogger(__name__)

PAGE_BYTES = 4096
SHM_DIR = "/dev/shm"
# One header page: magic, version, data offset, creator pid + start time, data bytes, ready flag.
_HEADER = struct.Struct("<8sIIqqQQ")
_MAGIC = b"FLEXKVSH"
_VERSION = 1
_PREFAULT_CHUNK_BYTES = 256 << 20
_NAME_MAX = 31  # macOS PSHMNAMLEN; Linux allows 255

ProgressFn = Callable[[int, int], None]


class PoolInUseError(FlexKVError):
    """A pool with that name exists and its creator is alive (or it is not a flexkv pool)."""


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MADV_POPULATE_WRITE = 23


def make_pool_name(tag: str) -> str:
    """A fresh pool name ``/flexkv-<tag>-<pid>-<random>``, at most 31 characters (macOS's limit).

    ``tag`` is reduced to at most 8 characters of ``[a-z0-9_]``.
    """
    clean = "".join(c for c in tag.lower() if c.isascii() and (c.isalnum() or c == "_"))[:8] or "pool"
    name = f"/flexkv-{clean}-{os.getpid()}-{secrets.token_hex(3)}"
    return name[:_NAME_MAX]


def remove_stale_segments(tag: str) -> list[str]:
    """Unlink every ``/flexkv-<tag>-*`` segment whose creator (pid and start time, from its header) is
    dead, logging each; segments of live creators and segments that are not flexkv pools stay.
    The server calls it with ``"cpu"`` at start: a killed server's pool is found whatever its name."""
    clean = "".join(c for c in tag.lower() if c.isascii() and (c.isalnum() or c == "_"))[:8] or "pool"
    prefix = f"/flexkv-{clean}-"
    return [name for name in list_flexkv_segments() if name.startswith(prefix) and unlink_if_creator_dead(name)]


def unlink_if_creator_dead(name: str) -> bool:
    """Unlink the flexkv segment ``name`` if its creator process is dead (logged). False, and nothing
    done, when it is gone already, its creator is alive, or it is not a flexkv segment."""
    try:
        _check_name(name)
        return _remove_if_stale(name)
    except (PoolInUseError, ValueError, OSError, posix_ipc.Error):
        return False


def list_flexkv_segments() -> list[str]:
    """Names (``/flexkv...``) of the shared-memory segments under /dev/shm whose name starts with flexkv."""
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted("/" + e for e in entries if e.startswith("flexkv"))


class SharedPool:
    """One mapped POSIX shared-memory segment: a header page, then ``nbytes`` of data.

    ``address`` (int) and ``buffer`` (numpy uint8 array of ``nbytes``) refer to the data region,
    which starts ``data_offset`` (4096) bytes into the segment and is page aligned. A pool is
    usable by every process that maps it; only the creating process may :meth:`unlink` it.
    """

    data_offset = PAGE_BYTES

    def __init__(self, name: str, mapping: mmap.mmap, nbytes: int, creator: bool) -> None:
        """Internal: use :meth:`create` or :meth:`attach`."""
        self.name = name
        self.nbytes = nbytes
        self._creator_pid = os.getpid() if creator else 0
        self._mmap: mmap.mmap | None = mapping
        whole = np.frombuffer(mapping, dtype=np.uint8)
        self._buffer: npt.NDArray[np.uint8] | None = whole[self.data_offset : self.data_offset + nbytes]
        self._address = int(whole.ctypes.data) + self.data_offset
        self._unlinked = False

    # -- creation / attachment -------------------------------------------------------------

    @classmethod
    def create(cls, name: str, nbytes: int, prefault: bool = True, progress: ProgressFn | None = None,
               num_threads: int = 0) -> SharedPool:
        """Create and map a new pool of ``nbytes`` data bytes (mode 0600), in the calling process.

        A segment already under ``name`` whose creator is dead is removed (logged) and replaced;
        one whose creator is alive raises :class:`PoolInUseError`. With ``prefault`` the memory is
        allocated now (``posix_fallocate`` on Linux: no first-touch cost later, and a full /dev/shm
        is an ``OSError(ENOSPC)`` here instead of SIGBUS on first touch); ``progress(done, total)``
        is called after every 256 MiB and at the end. ``num_threads`` (0 = auto) only matters where
        fallocate is unavailable and pages are touched instead. The caller owns the pool: ``close``
        it and ``unlink`` it (or use it as a context manager, which does both).
        """
        _check_name(name)
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
        if prefault:
            _check_room(nbytes)
        shm = _create_segment(name, cls.data_offset + nbytes)
        pool = None
        try:
            os.fchmod(shm.fd, 0o600)  # the mode given to shm_open is filtered by the umask
            mapping = mmap.mmap(shm.fd, cls.data_offset + nbytes)
            pool = cls(name, mapping, nbytes, creator=True)
            # the creator is on record before the slow part, so a crash in it leaves a stale pool
            pool._write_header(ready=False)
            if prefault:
                _prefault(shm.fd, pool, progress, num_threads)
            pool._write_header(ready=True)
        except BaseException:
            if pool is not None:
                pool.close()
            shm.unlink()
            raise
        finally:
            shm.close_fd()
        return pool

    @classmethod
    def attach_at_least(cls, name: str, nbytes: int, what: str) -> SharedPool:
        """:meth:`attach`, and ValueError naming ``what`` if the segment holds fewer than ``nbytes``."""
        segment = cls.attach(name)
        if segment.nbytes < nbytes:
            segment.close()
            raise ValueError(f"{what} segment {name!r} holds {segment.nbytes} bytes, need {nbytes}")
        return segment

    @classmethod
    def attach(cls, name: str) -> SharedPool:
        """Map an existing pool created by :meth:`create` (any process). Raises FileNotFoundError
        if there is none, :class:`PoolInUseError` if the segment is not a (finished) flexkv pool."""
        _check_name(name)
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError:
            raise FileNotFoundError(errno.ENOENT, f"no shared-memory pool named {name!r}") from None
        try:
            header = _read_header(shm)
            if header is None:
                raise PoolInUseError(f"shared-memory segment {name!r} is not a flexkv pool")
            if header[6] != 1:
                raise PoolInUseError(f"shared-memory pool {name!r} is not ready: pid {header[3]} is still "
                                     "creating it (or died doing so)")
            nbytes = header[5]
            mapping = mmap.mmap(shm.fd, cls.data_offset + nbytes)
        finally:
            shm.close_fd()
        return cls(name, mapping, nbytes, creator=False)

    def _write_header(self, ready: bool) -> None:
        assert self._mmap is not None
        _HEADER.pack_into(self._mmap, 0, _MAGIC, _VERSION, self.data_offset, os.getpid(),
                          _start_ticks(os.getpid()) or 0, self.nbytes, int(ready))

    # -- views -----------------------------------------------------------------------------

    @property
    def address(self) -> int:
        """Virtual address of the data region in this process (page aligned)."""
        self._check_open()
        return self._address

    @property
    def buffer(self) -> npt.NDArray[np.uint8]:
        """The whole data region as a writable uint8 array (a view: no copy)."""
        self._check_open()
        assert self._buffer is not None
        return self._buffer

    @property
    def is_creator(self) -> bool:
        """True in the process that created the pool (not in a forked child of it)."""
        return self._creator_pid == os.getpid()

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def _check_open(self) -> None:
        if self._mmap is None:
            raise ValueError(f"shared-memory pool {self.name!r} is closed")

    def populate(self, progress: ProgressFn | None = None) -> None:
        """Map every page of the pool into this process's page tables now.

        A process that attaches a pool otherwise takes one page fault per 4 KiB the first time it
        touches each page: a first put ran at 2-5 GB/s instead of ~19 here, and at 0.2 GB/s while a
        background populate raced it on two cores. Uses madvise(MADV_POPULATE_WRITE) (Linux 5.14+;
        where refused, pages fault in on first use instead) through ctypes, in 1 GiB steps,
        calling ``progress(done, total)`` after each.
        """
        addr, nbytes, step = self.address, self.nbytes, 1 << 30
        for off in range(0, nbytes, step):
            n = min(step, nbytes - off)
            if _LIBC.madvise(ctypes.c_void_p(addr + off), ctypes.c_size_t(n), _MADV_POPULATE_WRITE) != 0:
                return
            if progress is not None:
                progress(off + n, nbytes)

    # -- teardown --------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap the pool from this process. Idempotent. Arrays still viewing it keep the mapping
        alive until they are dropped (it is never unmapped under them)."""
        mapping, self._mmap, self._buffer = self._mmap, None, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass  # views remain: the mapping goes when the last of them does

    def unlink(self) -> None:
        """Remove the pool's name (creator only; mappings stay valid until closed). Idempotent."""
        if not self.is_creator:
            raise PermissionError(f"only the process that created {self.name!r} may unlink it")
        if self._unlinked:
            return
        self._unlinked = True
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass

    def __enter__(self) -> SharedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self.is_creator:
            self.unlink()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"address=0x{self._address:x}"
        return f"SharedPool({self.name!r}, nbytes={self.nbytes}, {state})"


# ---------------------------------------------------------------------------------------------
# Several arrays in one pool


def host_array_layout(shapes: Sequence[Sequence[int]], dtype: npt.DTypeLike | DType) -> tuple[list[int], int]:
    """Byte offsets (each page aligned) of arrays of ``shapes`` laid out back to back, and the total."""
    itemsize = _numpy_dtype(dtype).itemsize
    offsets, total = [], 0
    for shape in shapes:
        if any(isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 0 for d in shape):
            raise ValueError(f"shape must be non-negative ints, got {tuple(shape)!r}")
        offsets.append(total)
        total += -(-math.prod(shape) * itemsize // PAGE_BYTES) * PAGE_BYTES
    return offsets, max(total, PAGE_BYTES)


def allocate_host_tensors(shapes: Sequence[Sequence[int]], dtype: npt.DTypeLike | DType,
                          tag: str = "host") -> tuple[SharedPool, list[npt.NDArray[np.generic]]]:
    """Create a pool holding one zeroed array per shape, each page aligned; the caller owns the pool.

    ``dtype`` is a numpy dtype or a :class:`DType`; types numpy lacks (bfloat16, float8) come as
    unsigned ints of the same size (view them with torch). Other processes map the same arrays
    with :func:`attach_arrays` given the pool name and the same shapes and dtype.
    """
    offsets, total = host_array_layout(shapes, dtype)
    pool = SharedPool.create(make_pool_name(tag), total)
    return pool, _arrays(pool, shapes, dtype, offsets)


def attach_arrays(name: str, shapes: Sequence[Sequence[int]],
                  dtype: npt.DTypeLike | DType) -> tuple[SharedPool, list[npt.NDArray[np.generic]]]:
    """Map the pool ``name`` made by :func:`allocate_host_tensors` and view its arrays (no copy)."""
    offsets, total = host_array_layout(shapes, dtype)
    pool = SharedPool.attach(name)
    if pool.nbytes < total:
        pool.close()
        raise ValueError(f"pool {name!r} holds {pool.nbytes} bytes, the shapes need {total}")
    return pool, _arrays(pool, shapes, dtype, offsets)


def _arrays(pool: SharedPool, shapes: Sequence[Sequence[int]], dtype: npt.DTypeLike | DType,
            offsets: list[int]) -> list[npt.NDArray[np.generic]]:
    np_dtype = _numpy_dtype(dtype)
    return [np.frombuffer(pool.buffer, dtype=np_dtype, count=math.prod(shape), offset=off).reshape(tuple(shape))
            for shape, off in zip(shapes, offsets, strict=True)]


def _numpy_dtype(dtype: npt.DTypeLike | DType) -> np.dtype:
    if isinstance(dtype, DType):
        try:
            return np.dtype(dtype.value)
        except TypeError:  # no numpy bfloat16/float8: same-size raw bits
            return np.dtype(f"u{dtype.itemsize}")
    return np.dtype(dtype)


# ---------------------------------------------------------------------------------------------
# Internals: names, stale segments, prefaulting


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.startswith("/") or "/" in name[1:] or not 2 <= len(name) <= 255:
        raise ValueError(f"pool name must look like '/flexkv-...' (one leading '/', 2..255 chars), got {name!r}")


def _create_segment(name: str, size: int) -> posix_ipc.SharedMemory:
    try:
        return posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
    except posix_ipc.ExistentialError:
        pass
    _remove_if_stale(name)
    try:
        return posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
    except posix_ipc.ExistentialError:
        raise PoolInUseError(f"shared-memory pool {name!r} was created by another process meanwhile") from None


def _remove_if_stale(name: str) -> bool:
    """Unlink ``name`` if its creator is dead (True); raise PoolInUseError if alive or not ours;
    False if it is gone already."""
    try:
        shm = posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError:
        return False  # removed meanwhile
    try:
        header = _read_header(shm)
    finally:
        shm.close_fd()
    if header is None:
        raise PoolInUseError(f"shared-memory segment {name!r} exists and is not a flexkv pool; "
                             f"remove {SHM_DIR}{name} if it is stale")
    pid, ticks = header[3], header[4]
    if _process_alive(pid, ticks):
        raise PoolInUseError(f"shared-memory pool {name!r} is in use: its creator pid {pid} is alive")
    log.warning("removing stale shared-memory pool %s (%d bytes) left by dead pid %d", name, header[5], pid)
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        return False
    return True


def _read_header(shm: posix_ipc.SharedMemory) -> tuple[bytes, int, int, int, int, int, int] | None:
    if shm.size < PAGE_BYTES:
        return None
    with mmap.mmap(shm.fd, PAGE_BYTES, prot=mmap.PROT_READ) as page:
        header = _HEADER.unpack_from(page, 0)
    if header[0] != _MAGIC or header[1] != _VERSION or header[2] != PAGE_BYTES:
        return None
    return header


def _start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), or None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return None if fields[0] == b"Z" else int(fields[19])


def process_exited(pid: int) -> bool:
    """Whether ``pid`` has exited on this host: gone, or a zombie (its memory and files are released)."""
    return _start_ticks(pid) is None


def _process_alive(pid: int, start_ticks: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    if not os.path.isdir("/proc/self"):
        return True  # no /proc: the pid check is all we have
    ticks = _start_ticks(pid)
    return ticks is not None and (start_ticks == 0 or ticks == start_ticks)  # else zombie or pid reused


_ROOM_HINT = "shrink the CPU pool (cpu_cache_gb, or num_cpu_blocks in CacheConfig) or grow /dev/shm"


def _check_room(nbytes: int) -> None:
    """Fail before allocating anything when /dev/shm cannot hold ``nbytes`` more."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise OSError(errno.ENOSPC, f"{SHM_DIR} has {free} bytes free, the shared-memory pool needs {nbytes}; "
                                    f"{_ROOM_HINT}")


def _prefault(fd: int, pool: SharedPool, progress: ProgressFn | None, num_threads: int) -> None:
    """Allocate the data pages now, in chunks, reporting progress."""
    done, nbytes = 0, pool.nbytes
    while done < nbytes:
        chunk = min(_PREFAULT_CHUNK_BYTES, nbytes - done)
        if not _fallocate(fd, pool.data_offset + done, chunk):
            _touch_pages(pool.buffer[done : done + chunk], num_threads)
        done += chunk
        if progress is not None:
            progress(done, nbytes)


def _fallocate(fd: int, offset: int, length: int) -> bool:
    """Allocate file pages with posix_fallocate; False where the OS or file system lacks it."""
    # On tmpfs this allocates and zeroes pages without mapping them: measured ~3x faster than
    # touching every page here, and a full /dev/shm fails now instead of with SIGBUS later.
    if not hasattr(os, "posix_fallocate"):
        return False
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"{SHM_DIR} has no room for {length} more bytes of shared-memory "
                                        f"pool; {_ROOM_HINT}") from None
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return False
        raise
    return True


def _touch_pages(region: npt.NDArray[np.uint8], num_threads: int) -> None:
    """Fallback: write one byte per page, split over threads (numpy releases the GIL)."""
    threads = num_threads or min(4, os.cpu_count() or 1)
    parts = np.array_split(region[::PAGE_BYTES], threads)

    def touch(part: npt.NDArray[np.uint8]) -> None:
        part[:] = 0

    workers = [threading.Thread(target=touch, args=(part,)) for part in parts[1:]]
    for w in workers:
        w.start()
    touch(parts[0])
    for w in workers:
        w.join()

"""Shared-filesystem backend of the remote tier (NFS, Lustre, CephFS, JuiceFS, ...).

One file per block: ``{path}/{key_prefix}[/{namespace_tag}]/{hex[:2]}/{hex}`` where ``hex`` is the
block hash's 16 hex digits. One file per block needs no shared index, lock or allocator between
nodes: a block is published by ``rename`` of a fully written temp file from the same directory,
which POSIX (and NFS close-to-open consistency) makes atomic, so concurrent writers of one block
from several nodes leave one complete file and readers never see a torn one. Slabs would save
inodes but need exactly the cross-node coordination a shared filesystem does not give. The 256
fan-out directories keep directory sizes bounded and spread metadata load (Lustre DNE, CephFS MDS).

Files hold ``block bytes || 16-byte trailer`` (see ``base``); there is no fsync: after a crash a
short or stale file fails verification and is a miss, which a cache can afford.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt

from flexkv.common.config import RemoteConfig

from .base import (
    TRAILER_BYTES,
    BlockBatch,
    RemoteStore,
    RemoteUnavailable,
    as_hash_list,
    block_name,
    check_trailer,
    make_trailer,
)

log = logging.getLogger(__name__)

# errnos that mean the filesystem itself is gone (dead FUSE daemon, stale NFS handle, network down),
# not a problem with one block: they raise RemoteUnavailable instead of failing one block.
_UNAVAILABLE_ERRNOS = frozenset({errno.ENOTCONN, errno.ESTALE, errno.ETIMEDOUT, errno.EHOSTDOWN,
                                 errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.ENODEV, errno.ENXIO})


class FilesystemStore(RemoteStore):
    """Blocks as files under a directory shared by every node (see the module docstring).

    ``ttl_s`` is not enforced here (no server to expire files); age out old blocks with a cleaner
    such as ``find ROOT -type f -mmin +N -delete``, which is safe while nodes run.
    ``num_threads`` blocks are in flight at once: network filesystems answer each open/read/rename
    after a round trip, and one block's I/O overlaps another's checksum (the GIL is released in I/O).
    """

    def __init__(self, config: RemoteConfig, namespace_tag: str = "", *, num_threads: int = 4) -> None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if os.sep in namespace_tag or namespace_tag in (".", ".."):
            raise ValueError(f"namespace_tag must be a plain directory name, got {namespace_tag!r}")
        self.root = os.path.join(config.path, config.key_prefix, *([namespace_tag] if namespace_tag else []))
        if not os.path.isdir(config.path):
            raise RemoteUnavailable(f"filesystem store at {config.path}: not a directory")
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise RemoteUnavailable(f"filesystem store at {self.root}: {e.strerror}") from e
        self._executor = ThreadPoolExecutor(num_threads, "flexkv-remote-fs") if num_threads > 1 else None

    def block_path(self, block_hash: int) -> str:
        """Where ``block_hash``'s file lives."""
        name = block_name(block_hash)
        return os.path.join(self.root, name[:2], name)

    def put_blocks(self, hashes: np.ndarray, pool_addr: int, pool_block_bytes: int, cpu_ids: np.ndarray,
                   block_bytes: int) -> npt.NDArray[np.bool_]:
        batch = BlockBatch.from_pool(hashes, pool_addr, pool_block_bytes, cpu_ids, block_bytes)
        return self._each_block(self._write_block, batch)

    def get_blocks(self, hashes: np.ndarray, pool_addr: int, pool_block_bytes: int, cpu_ids: np.ndarray,
                   block_bytes: int) -> npt.NDArray[np.bool_]:
        batch = BlockBatch.from_pool(hashes, pool_addr, pool_block_bytes, cpu_ids, block_bytes)
        return self._each_block(self._read_block, batch)

    def count_prefix(self, hashes: np.ndarray) -> int:
        """Exact leading run by one ``stat`` per block, stopping at the first miss.

        Linear rather than a binary search: it stays exact when a cleaner punched holes, and each
        stat precedes a multi-MiB read of that block, so the scan costs a few percent of the load.
        """
        for i, block_hash in enumerate(as_hash_list(hashes)):
            if not os.path.exists(self.block_path(block_hash)):
                return i
        return len(hashes)

    def ping(self) -> None:
        try:
            os.stat(self.root)
        except OSError as e:
            raise RemoteUnavailable(f"filesystem store at {self.root}: {e.strerror}") from e
        if not os.access(self.root, os.W_OK):
            raise RemoteUnavailable(f"filesystem store at {self.root}: not writable")

    def close(self) -> None:
        """Stop the I/O threads; no file stays open between calls."""
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    # -- one block --------------------------------------------------------------------------------

    def _each_block(self, op: Callable[[int, memoryview], bool], batch: BlockBatch) -> npt.NDArray[np.bool_]:
        """op(hash, view) for every block, ``num_threads`` at a time; RemoteUnavailable propagates."""
        if self._executor is None or len(batch.hashes) < 2:
            results = list(map(op, batch.hashes, batch.views))
        else:
            results = list(self._executor.map(op, batch.hashes, batch.views))
        return np.array(results, dtype=np.bool_).reshape(len(batch.hashes))

    def _write_block(self, block_hash: int, view: memoryview) -> bool:
        path = self.block_path(block_hash)
        tmp = f"{os.path.dirname(path)}/.{block_name(block_hash)}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = self._create(tmp)
            try:
                _write_all(fd, view)
                _write_all(fd, memoryview(make_trailer(view, block_hash)))
            finally:
                os.close(fd)
            os.rename(tmp, path)
            return True
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self._fail(e, f"write {path}")
            return False

    def _create(self, tmp: str) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            return os.open(tmp, flags, 0o644)
        except FileNotFoundError:  # first block of this fan-out directory
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            return os.open(tmp, flags, 0o644)

    def _read_block(self, block_hash: int, view: memoryview) -> bool:
        path = self.block_path(block_hash)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as e:
            self._fail(e, f"open {path}")
            return False
        trailer = bytearray(TRAILER_BYTES)
        try:
            size = os.fstat(fd).st_size
            if size != view.nbytes + TRAILER_BYTES:
                log.warning("remote block %s has %d bytes, expected %d: treated as a miss",
                            path, size, view.nbytes + TRAILER_BYTES)
                return False
            complete = _read_all(fd, view) and _read_all(fd, memoryview(trailer))
        except OSError as e:
            self._fail(e, f"read {path}")
            return False
        finally:
            os.close(fd)
        reason = check_trailer(view, trailer, block_hash) if complete else "file shorter than its size"
        if reason is not None:
            log.warning("remote block %s failed verification (%s): treated as a miss", path, reason)
        return reason is None

    def _fail(self, error: OSError, what: str) -> None:
        """Raise RemoteUnavailable if the filesystem is gone, else log the one block's failure."""
        if error.errno in _UNAVAILABLE_ERRNOS:
            raise RemoteUnavailable(f"filesystem store at {self.root}: {what}: {error.strerror}") from error
        log.warning("remote block %s failed: %s", what, error.strerror)


def _write_all(fd: int, data: memoryview) -> None:
    pos = 0
    while pos < data.nbytes:
        pos += os.write(fd, data[pos:])


def _read_all(fd: int, dst: memoryview) -> bool:
    """Fill ``dst`` from ``fd``; False if the file ended first."""
    pos = 0
    while pos < dst.nbytes:
        got = os.readv(fd, [dst[pos:]])
        if got == 0:
            return False
        pos += got
    return True

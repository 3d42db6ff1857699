"""Batched block I/O on io_uring (wraps ``c_src/uring.c``).

One :class:`UringEngine` owns one ring. Each call moves a whole batch of equal-length requests
between memory addresses and (file descriptor, offset) pairs and returns one result per request,
so a caller can fail exactly the requests concerned. Blocking; use an engine from one thread.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from flexkv.native._uring import ffi, lib

ResultArray = npt.NDArray[np.int32]

DEFAULT_DEPTH = 512
MAX_DEPTH: int = lib.FLEXKV_URING_MAX_DEPTH


def _engine_error(rc: int, what: str) -> OSError:
    return OSError(-rc, f"{what}: {os.strerror(-rc)}")


def _as_array(values: Any, dtype: type[np.generic], name: str, n: int | None) -> npt.NDArray[Any]:
    arr = np.ascontiguousarray(values, dtype=dtype)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries, expected {n}")
    return arr


class UringEngine:
    """An io_uring ring of ``depth`` entries with its I/O contexts, created in the calling process.

    Raises ``OSError`` when the kernel refuses io_uring (e.g. ENOSYS, EPERM) and ``ValueError`` for
    a depth outside 1..MAX_DEPTH. Not thread-safe: one engine per thread.
    """

    _handle: Any = None

    def __init__(self, depth: int = DEFAULT_DEPTH, setup_flags: int = 0) -> None:
        if not 1 <= depth <= MAX_DEPTH:
            raise ValueError(f"depth must be in 1..{MAX_DEPTH}, got {depth}")
        self.depth = depth
        self._num_files = 0
        handle_out = ffi.new("struct flexkv_uring **")
        rc = lib.flexkv_uring_create(depth, setup_flags, handle_out)
        if rc < 0:
            raise _engine_error(rc, f"io_uring setup (depth {depth})")
        self._handle = handle_out[0]

    @property
    def closed(self) -> bool:
        return self._handle is None

    def _live_handle(self) -> Any:
        if self._handle is None:
            raise ValueError("UringEngine is closed")
        return self._handle

    def register_files(self, fds: Any) -> None:
        """Register ``fds`` so ``fixed_files=True`` calls name them by index (replaces any table)."""
        arr = _as_array(fds, np.intc, "fds", None)
        if arr.size == 0:
            raise ValueError("register_files needs at least one fd")
        rc = lib.flexkv_uring_register_files(self._live_handle(), ffi.from_buffer("int[]", arr), arr.size)
        if rc < 0:
            raise _engine_error(rc, "io_uring register files")
        self._num_files = int(arr.size)

    def unregister_files(self) -> None:
        rc = lib.flexkv_uring_unregister_files(self._live_handle())
        if rc < 0:
            raise _engine_error(rc, "io_uring unregister files")
        self._num_files = 0

    def read(self, fds: Any, offsets: Any, addrs: Any, length: int, fixed_files: bool = False) -> ResultArray:
        """Read ``length`` bytes from ``fds[i]`` at ``offsets[i]`` into memory at ``addrs[i]``, for every i.

        Returns an int32 array: 0 per complete request, else a negative errno (-ENODATA: end of
        file). Raises ``OSError`` when the engine itself failed (then close it) and ``ValueError``
        for malformed arguments.
        """
        return self._rw(lib.FLEXKV_URING_READ, fds, offsets, addrs, length, fixed_files)

    def write(self, fds: Any, offsets: Any, addrs: Any, length: int, fixed_files: bool = False) -> ResultArray:
        """Write ``length`` bytes from memory at ``addrs[i]`` to ``fds[i]`` at ``offsets[i]``; see :meth:`read`."""
        return self._rw(lib.FLEXKV_URING_WRITE, fds, offsets, addrs, length, fixed_files)

    def _rw(self, op: int, fds: Any, offsets: Any, addrs: Any, length: int, fixed_files: bool) -> ResultArray:
        handle = self._live_handle()
        fd_arr = _as_array(fds, np.intc, "fds", None)
        n = int(fd_arr.shape[0])
        off_arr = _as_array(offsets, np.uint64, "offsets", n)
        addr_arr = _as_array(addrs, np.uint64, "addrs", n)
        if not 0 < length <= 0xFFFFFFFF:
            raise ValueError(f"length must be in 1..2**32-1 bytes, got {length}")
        if fixed_files:
            if self._num_files == 0:
                raise ValueError("fixed_files=True but no files are registered")
            op |= lib.FLEXKV_URING_FIXED_FILE
        results = np.zeros(n, dtype=np.int32)
        if n == 0:
            return results
        rc = lib.flexkv_uring_rw(
            handle, op, n,
            ffi.from_buffer("int[]", fd_arr),
            ffi.from_buffer("uint64_t[]", off_arr),
            ffi.from_buffer("uint64_t[]", addr_arr),
            length,
            ffi.from_buffer("int32_t[]", results, require_writable=True),
        )
        if rc < 0:
            raise _engine_error(rc, "io_uring batch")
        return results

    def close(self) -> None:
        """Destroy the ring. Idempotent."""
        if self._handle is not None:
            lib.flexkv_uring_destroy(self._handle)
            self._handle = None

    def __enter__(self) -> UringEngine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

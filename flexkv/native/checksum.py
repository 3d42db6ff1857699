"""Block checksums (wraps ``c_src/checksum.c``).

A block's checksum is XXH3-64 of its bytes seeded with the block's hash, so a slot that holds
another block's bytes (or the right bytes under another key) never verifies. Batches of at least
``PARALLEL_BYTES`` are split over up to ``num_threads`` threads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from flexkv.native._checksum import ffi, lib

MAX_THREADS: int = lib.FLEXKV_CHECKSUM_MAX_THREADS
PARALLEL_BYTES = 64 << 20  # below this a batch is hashed by the calling thread alone

U64Array = npt.NDArray[np.uint64]


def _u64(values: Any, name: str, n: int | None) -> U64Array:
    arr = np.ascontiguousarray(values, dtype=np.uint64)
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
        raise ValueError(f"{name} must be 1-D with {n if n is not None else 'any number of'} entries, "
                         f"got shape {arr.shape}")
    return arr


def _check(length: int, num_threads: int) -> None:
    if length < 1:
        raise ValueError(f"length must be >= 1 byte, got {length}")
    if not 1 <= num_threads <= MAX_THREADS:
        raise ValueError(f"num_threads must be in 1..{MAX_THREADS}, got {num_threads}")


def checksum_blocks(addrs: Any, length: int, seeds: Any, num_threads: int = 1) -> U64Array:
    """Checksums of the ``length`` bytes at each of ``addrs`` (raw addresses the caller keeps
    alive), block i seeded with ``seeds[i]``. Raises ValueError for malformed arguments."""
    addr_arr = _u64(addrs, "addrs", None)
    n = int(addr_arr.shape[0])
    seed_arr = _u64(seeds, "seeds", n)
    _check(length, num_threads)
    out = np.empty(n, dtype=np.uint64)
    rc = lib.flexkv_checksum_blocks(ffi.from_buffer("uint64_t[]", addr_arr), n, length,
                                    ffi.from_buffer("uint64_t[]", seed_arr),
                                    ffi.from_buffer("uint64_t[]", out, require_writable=True),
                                    num_threads, PARALLEL_BYTES)
    if rc < 0:
        raise ValueError(f"checksum_blocks: invalid arguments (rc {rc})")
    return out


def first_mismatch(addrs: Any, length: int, seeds: Any, expected: Any, num_threads: int = 1) -> int:
    """Index of the first block whose checksum differs from ``expected`` (``len(addrs)`` when all match)."""
    addr_arr = _u64(addrs, "addrs", None)
    n = int(addr_arr.shape[0])
    seed_arr = _u64(seeds, "seeds", n)
    exp_arr = _u64(expected, "expected", n)
    _check(length, num_threads)
    rc = lib.flexkv_checksum_verify(ffi.from_buffer("uint64_t[]", addr_arr), n, length,
                                    ffi.from_buffer("uint64_t[]", seed_arr),
                                    ffi.from_buffer("uint64_t[]", exp_arr), num_threads, PARALLEL_BYTES)
    if rc < 0:
        raise ValueError(f"first_mismatch: invalid arguments (rc {rc})")
    return int(rc)

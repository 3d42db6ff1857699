"""Host copy engine: KV chunks between engine tensors and the block-first pool (wraps ``c_src/hostcopy.c``).

The data path of the host-device worker (engine KV in host shared memory) and of CPU engines. The engine
side is a :class:`~flexkv.layout.ChunkTable`; the pool side is a base address, a block size and the
chunk offsets of one shard (:meth:`~flexkv.layout.BlockFirstLayout.shard_chunk_offsets`). The copy runs
in the calling process with the GIL released; it splits over threads only when each gets MIN_BYTES_PER_THREAD.
"""

from __future__ import annotations

import enum
import errno
import os
from typing import Any

import numpy as np
import numpy.typing as npt

from flexkv.layout import ChunkTable
from flexkv.native._hostcopy import ffi, lib
from flexkv.native.blockids import out_of_range
from flexkv.types import InvalidRequest, OpType

MIN_BYTES_PER_THREAD: int = lib.FLEXKV_HOSTCOPY_MIN_BYTES_PER_THREAD
MAX_THREADS: int = lib.FLEXKV_HOSTCOPY_MAX_THREADS
STREAM_MIN_BYTES: int = lib.FLEXKV_HOSTCOPY_STREAM_MIN_BYTES  # from here on, non-temporal stores (x86-64)


class CopyDirection(enum.IntEnum):
    """Which way bytes move. TO_POOL is a put (D2H), FROM_POOL a get (H2D)."""

    TO_POOL = lib.FLEXKV_COPY_TO_POOL
    FROM_POOL = lib.FLEXKV_COPY_FROM_POOL

    @classmethod
    def from_op(cls, op: OpType) -> CopyDirection:
        """D2H -> TO_POOL, H2D -> FROM_POOL; ValueError for any op that is not engine <-> CPU."""
        if op is OpType.D2H:
            return cls.TO_POOL
        if op is OpType.H2D:
            return cls.FROM_POOL
        raise ValueError(f"{op.name} is not a host copy (only D2H and H2D are)")


def buffer_address(obj: Any, writable: bool = True) -> int:
    """Address of the first byte of a contiguous buffer (numpy array, mmap, bytearray, memoryview).

    The address is valid only while ``obj`` is alive and not resized or closed; the caller keeps it so.
    Raises TypeError when ``obj`` has no contiguous buffer (or a read-only one while ``writable``).
    """
    try:
        ptr = ffi.from_buffer("uint8_t[]", obj, require_writable=writable)
    except (TypeError, ValueError, BufferError) as e:
        raise TypeError(f"buffer_address: {type(obj).__name__} gives no contiguous"
                        f"{' writable' if writable else ''} buffer: {e}") from None
    try:
        return int(ffi.cast("uintptr_t", ptr))
    finally:
        ffi.release(ptr)  # drop the buffer export now so an mmap can still be closed


def _ids(name: str, ids: Any) -> npt.NDArray[np.int64]:
    if not isinstance(ids, np.ndarray) or ids.dtype != np.int64 or ids.ndim != 1:
        desc = f"{ids.dtype} array of shape {ids.shape}" if isinstance(ids, np.ndarray) else type(ids).__name__
        raise InvalidRequest(f"{name} must be a 1-D int64 numpy array, got {desc}")
    return np.ascontiguousarray(ids)


def _check_table(table: ChunkTable, pool_chunk_offsets: Any) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    bases = table.bases
    if not isinstance(bases, np.ndarray) or bases.dtype != np.uint64 or bases.ndim != 1 or bases.size == 0:
        raise InvalidRequest("table.bases must be a non-empty 1-D uint64 numpy array")
    if table.chunk_bytes <= 0 or table.block_stride < table.chunk_bytes or table.num_blocks <= 0:
        raise InvalidRequest(f"table has chunk_bytes={table.chunk_bytes}, block_stride={table.block_stride}, "
                             f"num_blocks={table.num_blocks}; need 0 < chunk_bytes <= block_stride, num_blocks > 0")
    offs = pool_chunk_offsets
    if not isinstance(offs, np.ndarray) or offs.dtype != np.uint64 or offs.shape != bases.shape:
        got = f"{offs.dtype} {offs.shape}" if isinstance(offs, np.ndarray) else type(offs).__name__
        raise InvalidRequest(f"pool_chunk_offsets must be uint64 of shape {bases.shape} like table.bases, got {got}")
    return np.ascontiguousarray(bases), np.ascontiguousarray(offs)


def _check_pool(addr: int, block_bytes: int, num_blocks: int, offsets: npt.NDArray[np.uint64],
                chunk_bytes: int) -> None:
    if addr <= 0 or block_bytes <= 0 or num_blocks <= 0:
        raise ValueError(f"pool_addr={addr:#x}, pool_block_bytes={block_bytes}, pool_num_blocks={num_blocks} "
                         "must all be positive")
    last = int(offsets.max())
    if last + chunk_bytes > block_bytes:
        raise ValueError(f"pool chunk offset {last} + chunk_bytes {chunk_bytes} exceeds pool_block_bytes {block_bytes}")


def _range_error(engine_ids: npt.NDArray[np.int64], pool_ids: npt.NDArray[np.int64],
                 engine_num_blocks: int, pool_num_blocks: int) -> InvalidRequest:
    for name, ids, limit in (("engine_ids", engine_ids, engine_num_blocks), ("pool_ids", pool_ids, pool_num_blocks)):
        err = out_of_range(name, ids, limit)
        if err is not None:
            return err
    return InvalidRequest("block id out of range; nothing was copied")


def copy_blocks(
    direction: CopyDirection | OpType,
    table: ChunkTable,
    pool_addr: int,
    pool_block_bytes: int,
    pool_chunk_offsets: npt.NDArray[np.uint64],
    pool_num_blocks: int,
    engine_ids: npt.NDArray[np.int64],
    pool_ids: npt.NDArray[np.int64],
    num_threads: int = 4,
) -> None:
    """Copy every chunk of blocks ``engine_ids[i]`` <-> ``pool_ids[i]`` in ``direction``.

    Engine chunk c of block e is at ``table.bases[c] + e * table.block_stride``; pool chunk c of block p
    at ``pool_addr + p * pool_block_bytes + pool_chunk_offsets[c]``. Only those chunks are written.
    ``direction`` may also be OpType.D2H (= TO_POOL) or OpType.H2D (= FROM_POOL); never cast one enum to
    the other by value (D2H is 1, TO_POOL is 0).
    Blocks in one call must not overlap on the destination side (the split over threads does not order
    them). Raises InvalidRequest (a ValueError) for wrong dtypes/lengths or any out-of-range id (checked
    before anything is copied), ValueError for bad sizes or thread counts, OSError for other C errors.
    """
    direction = CopyDirection.from_op(direction) if isinstance(direction, OpType) else CopyDirection(direction)
    e_ids, p_ids = _ids("engine_ids", engine_ids), _ids("pool_ids", pool_ids)
    if e_ids.shape != p_ids.shape:
        raise InvalidRequest(f"engine_ids ({e_ids.size}) and pool_ids ({p_ids.size}) differ in length")
    bases, offsets = _check_table(table, pool_chunk_offsets)
    if not 1 <= num_threads <= MAX_THREADS:
        raise ValueError(f"num_threads must be in [1, {MAX_THREADS}], got {num_threads}")
    _check_pool(pool_addr, pool_block_bytes, pool_num_blocks, offsets, table.chunk_bytes)
    if e_ids.size == 0:
        return
    rc = lib.flexkv_host_copy(
        int(direction), ffi.from_buffer("uint64_t[]", bases), bases.size, table.block_stride,
        table.num_blocks, ffi.cast("uint8_t *", pool_addr), pool_block_bytes,
        ffi.from_buffer("uint64_t[]", offsets), pool_num_blocks, table.chunk_bytes,
        ffi.from_buffer("int64_t[]", e_ids), ffi.from_buffer("int64_t[]", p_ids), e_ids.size, num_threads)
    if rc == -errno.ERANGE:
        raise _range_error(e_ids, p_ids, table.num_blocks, pool_num_blocks)
    if rc < 0:
        raise OSError(-rc, f"flexkv_host_copy: {os.strerror(-rc)}")


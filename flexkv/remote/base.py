"""The remote-tier store interface, its error, and what every backend shares.

A remote store holds block-first KV blocks keyed by chained block hashes, shared by every flexkv
node that points at it. Every stored value is ``payload || trailer``; the 16-byte trailer carries an
XXH3-64 checksum of the payload seeded with the block's hash, so bytes read back are verified (and
bound to their key) before they are reported found -- corrupt KV is worse than a miss (DESIGN §7).
"""

from __future__ import annotations

import abc
import ctypes
import dataclasses
import struct
from types import TracebackType

import numpy as np
import numpy.typing as npt
import xxhash

from flexkv.types import FlexKVError, InvalidRequest

TRAILER = struct.Struct("<QII")  # xxh3_64(payload, seed=block hash), payload length, magic
TRAILER_BYTES = TRAILER.size
TRAILER_MAGIC = 0x31564B46  # b"FKV1" read little-endian


class RemoteUnavailable(FlexKVError):
    """The remote store cannot be reached: connection refused or lost, or an op timed out.

    The message names the store (``host:port`` or the filesystem path). Raised by every
    :class:`RemoteStore` method; the caller fails the whole op and may retry later.
    """


def make_trailer(payload: memoryview, block_hash: int) -> bytes:
    """The trailer stored after ``payload`` under ``block_hash``'s key."""
    checksum = xxhash.xxh3_64_intdigest(payload, seed=block_hash)
    return TRAILER.pack(checksum, payload.nbytes, TRAILER_MAGIC)


def check_trailer(payload: memoryview, trailer: bytes | bytearray | memoryview, block_hash: int) -> str | None:
    """None when ``trailer`` vouches for ``payload`` under ``block_hash``, else the reason it does not."""
    checksum, length, magic = TRAILER.unpack(trailer)
    if magic != TRAILER_MAGIC:
        return f"bad trailer magic {magic:#x}"
    if length != payload.nbytes:
        return f"stored length {length} != expected {payload.nbytes}"
    if checksum != xxhash.xxh3_64_intdigest(payload, seed=block_hash):
        return "checksum mismatch"
    return None


def block_name(block_hash: int) -> str:
    """The 16 lower-case hex digits naming a block in every backend."""
    return f"{block_hash:016x}"


@dataclasses.dataclass(frozen=True)
class BlockBatch:
    """One put/get request, validated: block i is ``hashes[i]`` <-> ``views[i]`` (a pool slice).

    The views alias the caller's shared-memory CPU pool; they are valid only while it stays mapped.
    """

    hashes: list[int]
    views: list[memoryview]

    @classmethod
    def from_pool(cls, hashes: np.ndarray, pool_addr: int, pool_block_bytes: int, cpu_ids: np.ndarray,
                  block_bytes: int) -> BlockBatch:
        """Validate the arguments of put_blocks/get_blocks; raise InvalidRequest naming the problem."""
        hash_list = as_hash_list(hashes)
        ids = _id_array(cpu_ids, len(hash_list))
        _check_sizes(pool_addr, pool_block_bytes, block_bytes)
        if not hash_list:
            return cls([], [])
        span = (int(ids.max()) + 1) * pool_block_bytes
        pool = memoryview((ctypes.c_char * span).from_address(pool_addr)).cast("B")
        views = [pool[i * pool_block_bytes: i * pool_block_bytes + block_bytes] for i in ids.tolist()]
        return cls(hash_list, views)


def as_hash_list(hashes: np.ndarray) -> list[int]:
    """``hashes`` (1-D uint64 ndarray) as Python ints; raise InvalidRequest otherwise."""
    if not isinstance(hashes, np.ndarray) or hashes.dtype != np.uint64 or hashes.ndim != 1:
        got = f"{hashes.dtype} {hashes.shape}" if isinstance(hashes, np.ndarray) else type(hashes).__name__
        raise InvalidRequest(f"hashes must be a 1-D uint64 ndarray, got {got}")
    return [int(h) for h in hashes.tolist()]


def _id_array(cpu_ids: np.ndarray, num_blocks: int) -> npt.NDArray[np.int64]:
    if not isinstance(cpu_ids, np.ndarray) or cpu_ids.ndim != 1 or cpu_ids.dtype.kind not in "iu":
        got = f"{cpu_ids.dtype} {cpu_ids.shape}" if isinstance(cpu_ids, np.ndarray) else type(cpu_ids).__name__
        raise InvalidRequest(f"cpu_ids must be a 1-D integer ndarray, got {got}")
    if cpu_ids.shape[0] != num_blocks:
        raise InvalidRequest(f"cpu_ids has {cpu_ids.shape[0]} entries for {num_blocks} hashes")
    ids = cpu_ids.astype(np.int64, copy=False)
    if ids.size and int(ids.min()) < 0:
        raise InvalidRequest(f"cpu_ids must be >= 0, got {int(ids.min())}")
    return ids


def _check_sizes(pool_addr: int, pool_block_bytes: int, block_bytes: int) -> None:
    if not isinstance(pool_addr, int) or pool_addr <= 0:
        raise InvalidRequest(f"pool_addr must be a positive address, got {pool_addr!r}")
    if not isinstance(block_bytes, int) or block_bytes <= 0:
        raise InvalidRequest(f"block_bytes must be a positive int, got {block_bytes!r}")
    if not isinstance(pool_block_bytes, int) or pool_block_bytes < block_bytes:
        raise InvalidRequest(f"pool_block_bytes must be an int >= block_bytes={block_bytes}, got {pool_block_bytes!r}")


class RemoteStore(abc.ABC):
    """A remote KV block store shared by many flexkv nodes.

    Runs inside a remote worker process; every call blocks until done. Not thread-safe: use one
    store per thread. Blocks are addressed by chained block hashes (uint64, namespace included)
    and copied to/from the shared-memory CPU pool, where block ``i`` lives at
    ``pool_addr + i * pool_block_bytes`` and its first ``block_bytes`` bytes are the block.
    The caller guarantees every ``cpu_ids`` slot lies inside the mapped pool. Every method raises
    :class:`RemoteUnavailable` when the store cannot be reached (a per-block problem never does;
    in a sharded store one unreachable shard makes only its blocks fail, as misses), and
    ``InvalidRequest`` for malformed arguments.
    """

    @abc.abstractmethod
    def put_blocks(self, hashes: np.ndarray, pool_addr: int, pool_block_bytes: int, cpu_ids: np.ndarray,
                   block_bytes: int) -> npt.NDArray[np.bool_]:
        """Store pool slots ``cpu_ids`` under ``hashes``; returns ok per block (False: that block
        was refused, e.g. store out of memory; logged). The pool is only read."""

    @abc.abstractmethod
    def get_blocks(self, hashes: np.ndarray, pool_addr: int, pool_block_bytes: int, cpu_ids: np.ndarray,
                   block_bytes: int) -> npt.NDArray[np.bool_]:
        """Load ``hashes`` into pool slots ``cpu_ids``; True per block found AND verified.

        Missing, wrong-sized or corrupt values are False (corrupt ones logged). A False slot's bytes
        are undefined (it may hold the unverified data) and must not be published.
        """

    def register_pool(self, pool_addr: int, pool_nbytes: int) -> None:  # noqa: B027 - optional hook
        """The CPU pool every later call names lives at ``[pool_addr, pool_addr + pool_nbytes)``:
        backends that must register memory for zero-copy transfers (Mooncake) do it once here."""

    @abc.abstractmethod
    def count_prefix(self, hashes: np.ndarray) -> int:
        """How many leading ``hashes`` exist in the store (exact even when eviction punched holes)."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Return if the store answers; raise RemoteUnavailable naming it otherwise."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections/handles. Idempotent; the store must not be used afterwards."""

    def __enter__(self) -> RemoteStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

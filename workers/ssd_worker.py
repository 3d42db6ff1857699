"""The SSD worker: DISK2H (SSD -> CPU pool) and H2DISK (CPU pool -> SSD) with io_uring and O_DIRECT.

Blocks are read and written whole (one block = one I/O in the block-first layout) straight between
the shared-memory pool and the preallocated cache files of ``workers/ssd_store.py``. Every block
written gets a checksum and a journal record; every block read is verified before the op is
reported done. An I/O error fails exactly the op it belongs to; a block whose bytes fail
verification is reported as that op's ``corrupt_at`` (the blocks before it are good), which the
server turns into a miss from that block on.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import numpy as np
import numpy.typing as npt

from flexkv.common.config import kv_fingerprint
from flexkv.types import OpType
from flexkv.workers.base import Op, Worker
from flexkv.workers.ssd_store import SSDStore


class SSDWorker(Worker):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        c = self.cache
        self.store = SSDStore(list(c.ssd_cache_dir), c.num_ssd_blocks, self.pool_block_bytes,
                              c.ssd_max_file_bytes, depth=c.io_uring_depth,
                              fingerprint=kv_fingerprint(self.model, c.tokens_per_block),
                              durable=c.ssd_durable_writes, persist_index=c.ssd_persist_index)

    def op_types(self) -> list[OpType]:
        return [OpType.DISK2H, OpType.H2DISK]

    def execute(self, ops: list[Op]) -> list[str]:
        # One io_uring batch for all ops of one direction keeps the queue deep; results are split per op.
        errors = [""] * len(ops)
        for op_type in (OpType.DISK2H, OpType.H2DISK):
            idx = [i for i, op in enumerate(ops) if op.op_type is op_type]
            if not idx:
                continue
            if op_type is OpType.DISK2H:
                ssd = np.concatenate([ops[i].src_ids for i in idx])
                results = self.store.read_blocks(ssd, self.pool.address, self.pool_block_bytes,
                                                 np.concatenate([ops[i].dst_ids for i in idx]),
                                                 _keys([ops[i] for i in idx]))
            else:
                ssd = np.concatenate([ops[i].dst_ids for i in idx])
                hashes, parents, depths = _journal_keys([ops[i] for i in idx])
                results = self.store.write_blocks(ssd, self.pool.address, self.pool_block_bytes,
                                                  np.concatenate([ops[i].src_ids for i in idx]), hashes, parents,
                                                  depths)
            start = 0
            for i in idx:
                n = ops[i].src_ids.size
                errors[i] = _op_error(ops[i], results[start: start + n], ssd[start: start + n])
                start += n
        for i, op in enumerate(ops):
            if op.op_type not in (OpType.DISK2H, OpType.H2DISK):
                errors[i] = f"SSD worker cannot run {op.op_type.name}"
        return errors

    def close(self) -> None:
        self.store.close()
        super().close()


def _op_error(op: Op, results: npt.NDArray[np.int32], ssd: npt.NDArray[np.int64]) -> str:
    """The op's error ("" if every block succeeded); a read whose first bad block is corrupt sets
    ``op.corrupt_at`` (the rest of the prompt is a miss, not a fault)."""
    bad = np.flatnonzero(results)
    if not bad.size:
        return ""
    first, code = int(bad[0]), int(-results[bad[0]])
    if op.op_type is OpType.DISK2H and code == errno.EBADMSG:
        op.corrupt_at = first
        return f"DISK2H: ssd block {int(ssd[first])} failed checksum verification (block {first} of {results.size})"
    return (f"{op.op_type.name}: {bad.size} of {results.size} blocks failed, first ssd block "
            f"{int(ssd[first])}: {os.strerror(code)}")


def _keys(ops: list[Op]) -> npt.NDArray[np.uint64] | None:
    """DISK2H: the keys the server expects in each slot (None if an op came without them)."""
    if any(op.block_hashes is None or op.block_hashes.size != op.src_ids.size for op in ops):
        return None
    return np.concatenate([op.block_hashes for op in ops if op.block_hashes is not None])


def _journal_keys(ops: list[Op]) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
    """H2DISK: (keys, parent keys, depths) of every block, from each op's path hashes (the whole
    prompt up to its last block). An op without a path is written keyed 0 at depth 0 (not findable
    after a restart)."""
    hashes, parents, depths = [], [], []
    for op in ops:
        n = op.dst_ids.size
        path = op.block_hashes
        if path is None or path.size < n:
            path, base = np.zeros(n, dtype=np.uint64), 0
        else:
            base = path.size - n
        hashes.append(path[base:])
        parents.append(np.concatenate([path[base - 1: base] if base else np.zeros(1, np.uint64), path[base:-1]]))
        depths.append(np.arange(base, base + n, dtype=np.int64) if op.block_hashes is not None else
                      np.zeros(n, dtype=np.int64))
    return np.concatenate(hashes), np.concatenate(parents), np.concatenate(depths)

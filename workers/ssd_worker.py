"""The SSD worker: DISK2H (SSD -> CPU pool) and H2DISK (CPU pool -> SSD) with io_uring and O_DIRECT.

Blocks are read and written whole (one block = one I/O in the block-first layout) straight between
the shared-memory pool and the preallocated cache files of ``workers/ssd_store.py``. An I/O error
fails exactly the op it belongs to; the server rolls that op's plan back.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from flexkv.types import OpType
from flexkv.workers.base import Op, Worker
from flexkv.workers.ssd_store import SSDStore


class SSDWorker(Worker):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        c = self.cache
        self.store = SSDStore(list(c.ssd_cache_dir), c.num_ssd_blocks, self.pool_block_bytes,
                              c.ssd_max_file_bytes, depth=c.io_uring_depth)

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
                cpu = np.concatenate([ops[i].dst_ids for i in idx])
                results = self.store.read_blocks(ssd, self.pool.address, self.pool_block_bytes, cpu)
            else:
                cpu = np.concatenate([ops[i].src_ids for i in idx])
                ssd = np.concatenate([ops[i].dst_ids for i in idx])
                results = self.store.write_blocks(ssd, self.pool.address, self.pool_block_bytes, cpu)
            start = 0
            for i in idx:
                n = ops[i].src_ids.size
                bad = np.flatnonzero(results[start: start + n])
                if bad.size:
                    code = int(-results[start + bad[0]])
                    errors[i] = (f"{op_type.name}: {bad.size} of {n} blocks failed, first ssd block "
                                 f"{int(ssd[start + bad[0]])}: {os.strerror(code)}")
                start += n
        for i, op in enumerate(ops):
            if op.op_type not in (OpType.DISK2H, OpType.H2DISK):
                errors[i] = f"SSD worker cannot run {op.op_type.name}"
        return errors

    def close(self) -> None:
        self.store.close()
        super().close()

"""The GPU copy backend of the device worker: engine KV in CUDA tensors shared by CUDA IPC.

The worker opens each tensor's allocation from its IPC handle, registers the shared-memory CPU pool
with cudaHostRegister (in pieces, with a progress line for large pools) and copies on the engine's
own non-blocking stream (``flexkv.native.cudacopy``, path chosen per copy, see docs/gpu.md). An op is
reported done only after its copy finished (the stream is synchronized), so a GET's blocks are in the
engine's tensors when ``wait`` returns SUCCESS. Ordering contract: the engine calls ``put_async`` /
``launch`` for a PUT only after its writes of those blocks are complete on the GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from flexkv.cuda_ipc import CudaIpcHandle, open_handle
from flexkv.layout import KVCacheLayout
from flexkv.native.cudacopy import CudaCopyEngine
from flexkv.types import OpType
from flexkv.workers.device_worker import CopyBackend

if TYPE_CHECKING:
    from flexkv.workers.device_worker import DeviceWorker

log = logging.getLogger("flexkv.worker")


class CudaCopyBackend(CopyBackend):
    def __init__(self, worker: DeviceWorker, layout: KVCacheLayout, reg: dict[str, Any]) -> None:
        self._worker = worker
        device_id = int(reg["device_id"])
        self._closers: list[Callable[[], None]] = []
        self._engine = CudaCopyEngine(device_id)
        try:
            ptrs = []
            for i, (hexhandle, offset) in enumerate(zip(reg["cuda_handles"], reg["tensor_offsets"], strict=True)):
                handle = CudaIpcHandle(bytes.fromhex(hexhandle), int(offset), layout.tensor_bytes(i), device_id,
                                       layout.tensor_shape(i), "uint8")
                ptr, closer = open_handle(handle)
                self._closers.append(closer)
                ptrs.append(ptr)
            self._table = layout.chunk_table(ptrs)
            pool = worker.pool
            self._engine.register_host(pool.address, pool.nbytes, block_bytes=worker.pool_block_bytes,
                                       progress=_progress if pool.nbytes >= 4 << 30 else None)
        except BaseException:
            self.close()
            raise
        log.info("%s: GPU %d, %d tensors opened, CPU pool registered (%.2f GiB)", worker.worker_id, device_id,
                 len(ptrs), worker.pool.nbytes / 2**30)

    def copy(self, op_type: OpType, engine_ids: npt.NDArray[np.int64], pool_ids: npt.NDArray[np.int64]) -> None:
        w = self._worker
        self._engine.copy_blocks(op_type, self._table, w.pool.address, w.pool_block_bytes, w.shard_offsets,
                                 w.pool_num_blocks, engine_ids, pool_ids)
        self._engine.synchronize()

    def close(self) -> None:
        self._engine.close()
        for closer in self._closers:
            closer()
        self._closers = []


def _progress(done: int, total: int) -> None:
    log.info("registering CPU pool with CUDA: %.1f / %.1f GiB", done / 2**30, total / 2**30)

"""The GPU copy backend of the device worker: engine KV in CUDA tensors shared by CUDA IPC.

The worker opens each tensor's allocation from its IPC handle, registers the shared-memory CPU pool
with cudaHostRegister (in pieces, with a progress line for large pools) and copies on the engine's
own non-blocking streams (``flexkv.native.cudacopy``, path chosen per copy, see docs/gpu.md): one
engine (stream + staging buffer) per direction, so a get and a put overlap. Copies are enqueued as
ops arrive and an event recorded after each batch; an op is reported done only once its event
completed, so a GET's blocks are in the engine's tensors when ``wait`` returns SUCCESS.

Ordering contract for a PUT: either the engine launches it only after its writes of those blocks
are complete on the GPU, or it registered with ``use_event=True`` and called
``KVTPClient.mark_kv_written()`` first; then every D2H copy waits on the GPU for that event.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from flexkv.cuda_ipc import CudaIpcEventHandle, CudaIpcHandle, open_event, open_handle
from flexkv.layerwise import layer_span_table
from flexkv.layout import ChunkTable, KVCacheLayout
from flexkv.native import cudacopy
from flexkv.native.cudacopy import CopyPath, CudaCopyEngine, prepare_copy
from flexkv.progress import Progress
from flexkv.types import OpType
from flexkv.workers.device_worker import CopyBackend

if TYPE_CHECKING:
    from flexkv.workers.device_worker import DeviceWorker

log = logging.getLogger("flexkv.worker")

# Device staging per direction for the STAGED path. It comes out of the engine's GPU memory: 32 MiB
# per direction was within 1-3 points of 128 MiB through the worker on an H200 (docs/benchmarks.md).
STAGING_BYTES = int(os.environ.get("FLEXKV_STAGING_MIB", "32")) << 20
# A layer-major H2D moves each block's layers of one call as one DMA piece. Enqueueing a piece costs the
# host about 1.2 us (H200 host, STAGED), as long as 64 KiB take at the pinned rate: one layer of
# Llama-3-8B at 16 tokens a block (K and V, 64 KiB) per call left the enqueue as slow as the copy, so a
# layer-wise 8K restore landed its last layer at 23-33 ms against 22 ms whole (restore_timeline.py).
# Calls of at least this many bytes per block keep the host well ahead of the copy engine.
LAYER_PIECE_BYTES = 256 << 10


class CudaCopyBackend(CopyBackend):
    def __init__(self, worker: DeviceWorker, layout: KVCacheLayout, reg: dict[str, Any]) -> None:
        self._worker = worker
        device_id = self._device_id = int(reg["device_id"])
        self._closers: list[Callable[[], None]] = []
        self._kv_written = 0  # the engine's interprocess "KV written" event, when it registered one
        self._engines: dict[OpType, CudaCopyEngine] = {}
        try:
            for op_type in (OpType.H2D, OpType.D2H):
                self._engines[op_type] = CudaCopyEngine(device_id, staging_bytes=STAGING_BYTES)
            if reg.get("cuda_event"):
                self._kv_written = open_event(CudaIpcEventHandle(bytes.fromhex(reg["cuda_event"]), device_id))
            ptrs = []
            if reg.get("engine_cuda"):  # an engine-side lane: the tensors of this very process, by address
                ptrs = [int(a) for a in reg["engine_addresses"]]
            else:
                for i, (hexhandle, offset) in enumerate(zip(reg["cuda_handles"], reg["tensor_offsets"], strict=True)):
                    handle = CudaIpcHandle(bytes.fromhex(hexhandle), int(offset), layout.tensor_bytes(i), device_id,
                                           layout.tensor_shape(i), "uint8")
                    ptr, closer = open_handle(handle)
                    self._closers.append(closer)
                    ptrs.append(ptr)
            self._table = layout.chunk_table(ptrs)
            self._kv_dim = layout.kv_dim
            self._spans: dict[tuple[int, int], tuple[ChunkTable, npt.NDArray[np.uint64]]] = {}
            layer_bytes = layout.kv_dim * layout.chunk_bytes
            self.layers_per_call = max(1, min(layout.num_layers, -(-LAYER_PIECE_BYTES // layer_bytes)))
            pool = worker.pool
            with Progress(f"{worker.worker_id}: cudaHostRegister CPU pool", pool.nbytes) as progress:
                self._engines[OpType.H2D].register_host(pool.address, pool.nbytes,
                                                        block_bytes=worker.pool_block_bytes, progress=progress)
            self._warm_up(layout)
        except BaseException:
            self.close()
            raise
        log.info("%s: GPU %d, %d tensors opened, CPU pool registered (%.2f GiB)", worker.worker_id, device_id,
                 len(ptrs), worker.pool.nbytes / 2**30)

    def _warm_up(self, layout: KVCacheLayout) -> None:
        """Copy one block each way between scratch buffers through every path the engines may take,
        so the first real op does not pay the process's first-call costs (descriptor slots, driver
        set-up: the first put after start-up took ~50 ms longer on an H200)."""
        w = self._worker
        n, chunk = layout.num_layers * layout.kv_dim, layout.chunk_bytes
        dev = cudacopy.device_alloc(self._device_id, 2 * n * chunk)
        host = mmap.mmap(-1, -(-w.pool_block_bytes // mmap.PAGESIZE) * mmap.PAGESIZE)
        arr = np.frombuffer(host, dtype=np.uint8)
        addr = int(arr.ctypes.data)
        # Chunks one chunk apart: not one contiguous block, so STAGED and KERNEL are eligible too.
        table = ChunkTable(np.uint64(dev) + np.arange(n, dtype=np.uint64) * np.uint64(2 * chunk), 2 * n * chunk,
                           chunk, 1)
        ids = np.zeros(1, dtype=np.int64)
        scratch_owner = self._engines[OpType.D2H]  # registers nothing else: unregister_host drops only this
        try:
            scratch_owner.register_host(addr, len(host))
            for op_type, engine in self._engines.items():
                req = prepare_copy(op_type, table, addr, w.pool_block_bytes, w.shard_offsets, 1, ids, ids)
                for path in (CopyPath.BATCH, CopyPath.STAGED, CopyPath.KERNEL):
                    if not engine.unavailable(path, req):
                        engine.copy_blocks(op_type, table, addr, w.pool_block_bytes, w.shard_offsets, 1, ids, ids,
                                           path=path)
                engine.synchronize()
        finally:
            scratch_owner.unregister_host()
            cudacopy.device_free(self._device_id, dev)
            del arr
            host.close()

    def copy(self, op_type: OpType, engine_ids: npt.NDArray[np.int64], pool_ids: npt.NDArray[np.int64]) -> None:
        w = self._worker
        wait = self._kv_written if op_type is OpType.D2H else None
        self._engines[op_type].copy_blocks(op_type, self._table, w.pool.address, w.pool_block_bytes,
                                           w.shard_offsets, w.pool_num_blocks, engine_ids, pool_ids,
                                           wait_event=wait)

    def copy_layers(self, op_type: OpType, engine_ids: npt.NDArray[np.int64], pool_ids: npt.NDArray[np.int64],
                    first: int, count: int) -> None:
        """Enqueue the chunks of layers ``[first, first + count)`` (layer-wise GET); :meth:`mark` after it
        fires once they landed."""
        w = self._worker
        span = self._spans.get((first, count))
        if span is None:
            span = self._spans[first, count] = layer_span_table(self._table, w.shard_offsets, self._kv_dim, first,
                                                                count)
        table, offsets = span
        wait = self._kv_written if op_type is OpType.D2H else None
        self._engines[op_type].copy_blocks(op_type, table, w.pool.address, w.pool_block_bytes, offsets,
                                           w.pool_num_blocks, engine_ids, pool_ids, wait_event=wait)

    def mark(self, op_type: OpType) -> Callable[[], None]:
        event = cudacopy.event_create(self._device_id)  # makes the device current in this thread too
        try:
            self._engines[op_type].record_event(event)
        except BaseException:
            cudacopy.event_destroy(event)
            raise

        def wait() -> None:  # runs in the lane's finisher thread
            try:
                cudacopy.set_device(self._device_id)
                cudacopy.event_synchronize(event)
            finally:
                cudacopy.event_destroy(event)
        return wait

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()  # the H2D engine also unregisters the pool
        self._engines = {}
        for closer in self._closers:
            closer()
        self._closers = []
        if self._kv_written:
            cudacopy.event_destroy(self._kv_written)
            self._kv_written = 0

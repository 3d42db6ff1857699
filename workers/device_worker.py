"""The device worker: moves KV between one TP rank's engine buffers and the shared-memory CPU pool.

One per (DP client, TP rank). The engine's buffers are either host shared memory registered by a
KVTPClient (CPU engines and CPU-only CI: the "host-device" path, C memcpy over threads), CUDA tensors
shared through CUDA IPC handles (the GPU path, see docs/gpu.md), or, for an engine-side lane (DESIGN
§7b: this worker running as a thread of the engine process), the engine's private host memory by
address. Either way it executes H2D (pool -> engine) and D2H (engine -> pool) ops for its rank's head
shard of each block.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from flexkv.fence import FenceSealed, KVFence
from flexkv.layerwise import LayerProgress, layer_span_table
from flexkv.layout import BlockFirstLayout, ChunkTable, KVCacheLayout
from flexkv.native import hostcopy
from flexkv.shm import SHM_DIR, SharedPool
from flexkv.types import OpType
from flexkv.workers.base import Op, Worker
from flexkv.workers.layerwise_copy import LAYER_MAJOR_MIN_BLOCKS, publish_task_words, start_layer_major

log = logging.getLogger("flexkv.worker")


class CopyBackend(abc.ABC):
    """Moves chunks of blocks between engine buffers and the pool, for one TP rank. H2D and D2H may
    be called from two threads at once (the worker's two lanes); one direction from one thread."""

    @abc.abstractmethod
    def copy(self, op_type: OpType, engine_ids: npt.NDArray[np.int64], pool_ids: npt.NDArray[np.int64]) -> None:
        """Start copying whole blocks (this rank's shard); raise if the copy cannot be started."""

    copies_synchronously = False  # True: copy() returns once the bytes are in place

    def copy_layers(self, op_type: OpType, engine_ids: npt.NDArray[np.int64], pool_ids: npt.NDArray[np.int64],
                    first: int, count: int) -> None:
        """Like copy() for the chunks of layers ``[first, first + count)`` only (layer-wise GET,
        ``workers/layerwise_copy.py``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot copy layer by layer")

    # How many layers a layer-major copy moves per call (workers/layerwise_copy.py): 1 unless one call
    # per layer would cost the backend more than that layer's bytes.
    layers_per_call = 1

    @abc.abstractmethod
    def mark(self, op_type: OpType) -> Callable[[], None]:
        """A function that waits until every copy of ``op_type`` started so far is complete (and
        raises if one failed); copies started later need not be done."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release buffers."""


class HostCopyBackend(CopyBackend):
    """Engine buffers in host memory: multi-threaded memcpy in C. Either a shared-memory segment
    (``host_segment`` + ``tensor_offsets``) or, in an engine-side lane, ``engine_addresses``: the
    tensors' addresses in this very process, kept alive by the registering KVTPClient."""

    def __init__(self, worker: DeviceWorker, layout: KVCacheLayout, reg: dict[str, Any]) -> None:
        self._segment: SharedPool | None = None
        if reg.get("engine_addresses"):
            ptrs = [int(a) for a in reg["engine_addresses"]]
        else:
            _check_owner(reg["host_segment"])
            self._segment = SharedPool.attach(reg["host_segment"])
            self._segment.populate()  # the engine's buffers: no page fault per 4 KiB on the first copies
            ptrs = [self._segment.address + off for off in reg["tensor_offsets"]]
        if len(ptrs) != layout.num_tensors:
            raise ValueError(f"registration has {len(ptrs)} tensors, layout needs {layout.num_tensors}")
        self._table: ChunkTable = layout.chunk_table(ptrs)
        self._worker = worker
        # Every rank's worker copies at once: share the cores instead of oversubscribing them.
        ranks = worker.model.tp_size * worker.model.dp_size
        self._threads = max(1, min(4, (os.cpu_count() or 2) // ranks))
        self._kv_dim = layout.kv_dim

    copies_synchronously = True

    def copy(self, op_type: OpType, engine_ids: npt.NDArray[np.int64], pool_ids: npt.NDArray[np.int64]) -> None:
        w = self._worker
        hostcopy.copy_blocks(hostcopy.CopyDirection.from_op(op_type), self._table, w.pool.address,
                             w.pool_block_bytes, w.shard_offsets, w.pool_num_blocks, engine_ids, pool_ids,
                             num_threads=self._threads)

    def copy_layers(self, op_type: OpType, engine_ids: npt.NDArray[np.int64], pool_ids: npt.NDArray[np.int64],
                    first: int, count: int) -> None:
        w = self._worker
        table, offsets = layer_span_table(self._table, w.shard_offsets, self._kv_dim, first, count)
        hostcopy.copy_blocks(hostcopy.CopyDirection.from_op(op_type), table, w.pool.address, w.pool_block_bytes,
                             offsets, w.pool_num_blocks, engine_ids, pool_ids, num_threads=self._threads)

    def mark(self, op_type: OpType) -> Callable[[], None]:
        return _nothing  # copy() returns when the bytes are in place

    def close(self) -> None:
        if self._segment is not None:
            self._segment.close()


class DeviceWorker(Worker):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        reg = spec["registration"]
        self.tp_rank: int = spec["tp_rank"]
        self.layout = KVCacheLayout.from_fields(reg)
        block_first = BlockFirstLayout(self.model, self.cache.tokens_per_block)
        block_first.check_engine_layout(self.layout)
        # One offset per entry of the layout's chunk table (per piece for the page-first host pools).
        self.shard_offsets = self.layout.pool_piece_offsets(
            block_first.shard_chunk_offsets(block_first.shard_of_rank(self.tp_rank)))
        self.backend: CopyBackend
        # Layer-wise GET: the rank's engine registered a progress table; an H2D of a layer-wise launch
        # (at least LAYER_MAJOR_MIN_BLOCKS) copies layer-major, any other whole; both publish their landing.
        self.layer_progress: LayerProgress | None = None
        if reg.get("layer_progress"):
            _check_owner(reg["layer_progress"])  # the worker writes into it: our own user's segments only
            self.layer_progress = LayerProgress.attach(reg["layer_progress"])
        # The engine's fence (flexkv/fence.py): every batch of copies holds it; once sealed, none runs.
        self.fence: KVFence | None = None
        if reg.get("fence"):
            _check_owner(reg["fence"])
            self.fence = KVFence.attach(reg["fence"])
        if reg.get("cuda_handles") or reg.get("engine_cuda"):
            from flexkv.workers.gpu_backend import CudaCopyBackend

            self.backend = CudaCopyBackend(self, self.layout, reg)
            self.pool_pinned = True  # cudaHostRegister mapped and pinned every page
            self.num_lanes = 2  # gets (H2D) and puts (D2H) at once, on two streams
        else:
            self.backend = HostCopyBackend(self, self.layout, reg)
            self.num_lanes = 2 if os.environ.get("FLEXKV_HOST_LANES") == "2" else 1

    def op_types(self) -> list[OpType]:
        return [OpType.H2D, OpType.D2H]

    def op_bytes(self, op: Op) -> int:
        """This rank's shard of each block (the whole block for MLA, where every rank holds the latent)."""
        return int(op.src_ids.size) * (self.pool_block_bytes // self.model.num_shards)

    # Two lanes for CUDA buffers (set in __init__). Host buffers: one lane by default (ops run in the
    # loop thread, no thread hop per op; the copy threads share the cores anyway), two with
    # FLEXKV_HOST_LANES=2 (gets and puts at once, for machines with cores to spare).
    num_lanes = 1

    def lane_of(self, op: Op) -> int:
        return int(op.op_type is OpType.D2H)

    def execute(self, ops: list[Op]) -> list[str]:
        return self.start(ops)()

    def start(self, ops: list[Op]) -> Callable[[], list[str]]:
        """Start every op's copy; the returned function waits once per direction. The lane starts
        the next batch meanwhile, so the GPU streams stay busy while ops keep arriving. The batch
        holds the engine's fence from before its first copy until ``finish`` saw the last complete."""
        if self.fence is None:
            return self._start(ops)
        try:
            held = self.fence.hold()
        except FenceSealed as e:
            errors = [self._error(op.op_type, e) for op in ops]
            self._publish_failed(ops)
            return lambda: errors
        try:
            finish = self._start(ops)
        except BaseException:
            KVFence.release(held)
            raise

        def finish_and_release() -> list[str]:
            try:
                return finish()
            finally:
                KVFence.release(held)
        return finish_and_release

    def _publish_failed(self, ops: list[Op]) -> None:
        """Layer waits of GETs that will not run end now (FAILED), not at their timeout."""
        if self.layer_progress is not None:
            for op in ops:
                if op.op_type is OpType.H2D:
                    publish_task_words(self.layer_progress, op, 0, failed=True)

    def _start(self, ops: list[Op]) -> Callable[[], list[str]]:
        progress = self.layer_progress
        if progress is None or not any(op.op_type is OpType.H2D for op in ops):
            return self._start_whole(ops)
        layered = [i for i, op in enumerate(ops)
                   if op.op_type is OpType.H2D and op.layer_major and op.src_ids.size >= LAYER_MAJOR_MIN_BLOCKS]
        whole = [i for i in range(len(ops)) if i not in layered]
        finishers = []
        if layered:
            finishers.append((layered, start_layer_major(self, [ops[i] for i in layered], progress)))
        if whole:
            finishers.append((whole, self._start_whole([ops[i] for i in whole])))
        num_layers = self.layout.num_layers

        def finish() -> list[str]:
            errors = [""] * len(ops)
            for idx, fin in finishers:
                for i, err in zip(idx, fin(), strict=True):
                    errors[i] = err
            for i in whole:  # an H2D copied whole landed (or failed): every layer's wait and the GET's wait see it
                if ops[i].op_type is OpType.H2D:
                    publish_task_words(progress, ops[i], 0 if errors[i] else num_layers, failed=bool(errors[i]))
            return errors
        return finish

    def _start_whole(self, ops: list[Op]) -> Callable[[], list[str]]:
        errors = [""] * len(ops)
        started: dict[OpType, list[int]] = {OpType.H2D: [], OpType.D2H: []}
        for i, op in enumerate(ops):
            try:
                if op.op_type is OpType.H2D:
                    self.backend.copy(op.op_type, engine_ids=op.dst_ids, pool_ids=op.src_ids)
                elif op.op_type is OpType.D2H:
                    self.backend.copy(op.op_type, engine_ids=op.src_ids, pool_ids=op.dst_ids)
                else:
                    raise ValueError(f"device worker cannot run {op.op_type.name}")
                started[op.op_type].append(i)
            except Exception as e:  # noqa: BLE001 - reported per op
                errors[i] = self._error(op.op_type, e)
        waits = [(op_type, idx, self.backend.mark(op_type)) for op_type, idx in started.items() if idx]

        def finish() -> list[str]:
            for op_type, idx, wait in waits:
                try:
                    wait()
                except Exception as e:  # noqa: BLE001 - every op of the batch may be incomplete
                    for i in idx:
                        errors[i] = self._error(op_type, e)
            return errors
        return finish

    def _error(self, op_type: OpType, e: Exception) -> str:
        return f"{op_type.name} on rank {self.tp_rank}: {type(e).__name__}: {e}"

    def close(self) -> None:
        self.backend.close()
        if self.layer_progress is not None:
            self.layer_progress.close()
        if self.fence is not None:
            self.fence.close()
        super().close()


def _nothing() -> None:
    pass


def _check_owner(segment: str) -> None:
    """Copy only to and from engine segments of our own user: a segment another user created (and made
    readable to us) would otherwise receive cached KV, or feed its bytes into the cache."""
    try:
        st = os.stat(os.path.join(SHM_DIR, segment.lstrip("/")))
    except FileNotFoundError:
        raise FileNotFoundError(f"no shared-memory segment {segment!r}") from None
    if st.st_uid != os.getuid():
        raise PermissionError(f"shared-memory segment {segment!r} belongs to uid {st.st_uid}, not to this server's "
                              f"uid {os.getuid()}: refused")

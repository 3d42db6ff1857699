"""Layer-wise GET progress (DESIGN.md §7b): how far an H2D op has landed, layer by layer.

One table per TP rank that registered with ``layerwise=True``: a small POSIX shared-memory segment
created by the rank's :class:`~flexkv.client.KVTPClient` (the engine process owns it) and attached by
that rank's device worker. It holds ``NUM_SLOTS`` 64-bit words; task ``t`` uses word ``t % NUM_SLOTS``:

    bits 16..63  task id          (which task the word describes; 0 = none yet)
    bit  15      failed           (the op failed: no more layers will land)
    bits  0..14  layers landed    (layers 0 .. n-1 of every block of the op are in the engine's memory)

The device worker is the only writer. For every H2D op of the rank it copies layer-major and, per op,
first stores ``(task, 0)``, then ``(task, n)`` once layer ``n - 1`` is in place (host buffers: after the
memcpy returns; CUDA buffers: after that layer's event completed), or ``(task, failed)``. Each store is
one aligned 8-byte word, so a reader never sees a torn value. The engine only reads: a word naming
another task (not started yet, or a slot shared with another live task) means "no news", never
"landed", so a collision can only make a waiter fall back to the task's final status.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from flexkv.layout import ChunkTable
from flexkv.shm import SharedPool, make_pool_name
from flexkv.types import InvalidRequest, KVResponse, TaskStatus

NUM_SLOTS = 4096
MAX_LAYERS = (1 << 15) - 1
_FAILED = 1 << 15
_TASK_SHIFT = 16
_LAYER_MASK = MAX_LAYERS
MAX_TASK_ID = (1 << 48) - 1


class LayerState(NamedTuple):
    """What the table says about one task: ``num_layers_landed`` layers in place, or ``failed``."""

    num_layers_landed: int
    failed: bool


def pack(task_id: int, num_layers_landed: int, failed: bool = False) -> int:
    """The word for ``task_id``; ValueError when a field does not fit."""
    if not 0 < task_id <= MAX_TASK_ID:
        raise ValueError(f"task id {task_id} out of range (1 .. {MAX_TASK_ID})")
    if not 0 <= num_layers_landed <= MAX_LAYERS:
        raise ValueError(f"{num_layers_landed} layers out of range (0 .. {MAX_LAYERS})")
    return (task_id << _TASK_SHIFT) | (_FAILED if failed else 0) | num_layers_landed


def unpack(word: int, task_id: int) -> LayerState | None:
    """The state of ``task_id`` in ``word``, or None when the word describes another task (or none)."""
    if word >> _TASK_SHIFT != task_id:
        return None
    return LayerState(word & _LAYER_MASK, bool(word & _FAILED))


class LayerProgress:
    """One rank's progress table. ``create`` in the engine (owner: unlinks at ``close``), ``attach``
    in the device worker."""

    def __init__(self, segment: SharedPool) -> None:
        self._segment = segment
        self.words: npt.NDArray[np.uint64] = np.frombuffer(segment.buffer, dtype=np.uint64, count=NUM_SLOTS)

    @classmethod
    def create(cls, tag: str = "layers") -> LayerProgress:
        """A fresh, zeroed table in a new segment (mode 0600, like every flexkv segment)."""
        return cls(SharedPool.create(make_pool_name(tag), NUM_SLOTS * 8, prefault=True))

    @classmethod
    def attach(cls, name: str) -> LayerProgress:
        """Map the table an engine created; FileNotFoundError if there is none, ValueError if too small."""
        return cls(SharedPool.attach_at_least(name, NUM_SLOTS * 8, "layer progress"))

    @property
    def name(self) -> str:
        return self._segment.name

    # -- writer (device worker) --------------------------------------------------------------------
    def store(self, task_id: int, num_layers_landed: int, failed: bool = False) -> None:
        """Publish the state of ``task_id`` (one 8-byte store)."""
        self.words[task_id % NUM_SLOTS] = np.uint64(pack(task_id, num_layers_landed, failed))

    # -- reader (engine) ---------------------------------------------------------------------------
    def read(self, task_id: int) -> LayerState | None:
        """The state of ``task_id``, or None when its slot holds no news of it (yet)."""
        return unpack(int(self.words[task_id % NUM_SLOTS]), task_id)

    def close(self) -> None:
        """Unmap; the creator also removes the segment (after its worker no longer uses it)."""
        if self._segment.closed:
            return
        creator = self._segment.is_creator
        self.words = np.zeros(0, dtype=np.uint64)
        self._segment.close()
        if creator:
            self._segment.unlink()


def layer_span_table(table: ChunkTable, pool_chunk_offsets: npt.NDArray[np.uint64], kv_dim: int, first: int,
                     count: int) -> tuple[ChunkTable, npt.NDArray[np.uint64]]:
    """The engine chunk table and pool chunk offsets of layers ``[first, first + count)`` only (chunk
    ``(layer, kv)`` is entry ``layer * kv_dim + kv`` of both), for copying a span of layers at a time."""
    sel = slice(first * kv_dim, (first + count) * kv_dim)
    return (ChunkTable(np.ascontiguousarray(table.bases[sel]), table.block_stride, table.chunk_bytes,
                       table.num_blocks), np.ascontiguousarray(pool_chunk_offsets[sel]))


def layer_groups(num_layers: int, group: int) -> list[tuple[int, int]]:
    """``(first, count)`` spans covering ``num_layers`` layers, copied one span per call: spans of ``group``
    layers, then the last ``group`` layers in halving spans (..., 2, 1, 1), so the engine's last layers
    wait for little more than their own bytes. ``group=1``: one layer per span."""
    group = max(1, min(group, num_layers))
    tail: list[int] = []
    left = group
    while left > 1:
        tail.append(left // 2)
        left -= left // 2
    tail.append(left)
    head = num_layers - group
    sizes = ([head % group] if head % group else []) + [group] * (head // group) + tail
    spans, first = [], 0
    for size in sizes:
        spans.append((first, size))
        first += size
    return spans


def check_layer_index(layer_index: object, num_layers: int) -> None:
    """InvalidRequest unless ``layer_index`` is an int in [0, num_layers)."""
    if isinstance(layer_index, bool) or not isinstance(layer_index, int) or not 0 <= layer_index < num_layers:
        raise InvalidRequest(f"layer_index must be an int in [0, {num_layers}), got {layer_index!r}")


def wait_for_layer(tables: Sequence[LayerProgress], task_id: int, layer: int, timeout_s: float,
                   final_status: Callable[[], KVResponse | None] | None = None,
                   status_every_s: float = 0.005) -> KVResponse:
    """Block until layer ``layer`` of task ``task_id`` landed on every rank of ``tables``.

    Returns SUCCESS once it did, FAILED as soon as a rank's word says its op failed, TIMEOUT after
    ``timeout_s``. ``final_status`` (called every ``status_every_s``) returns the task's final response or
    None while it runs: a final SUCCESS means every layer landed (e.g. a task with nothing to move), any
    other final status is returned as it is (a failure before the H2D ran, a cancel, a dead worker).
    Runs in the engine; reads shared memory only, with short sleeps between reads.
    """
    now = time.monotonic()
    deadline, next_status, nap = now + timeout_s, now + status_every_s, 0.0
    while True:
        landed, failed_rank = True, -1
        for rank, table in enumerate(tables):
            state = table.read(task_id)
            if state is not None and state.failed:
                failed_rank = rank
                break
            landed = landed and state is not None and state.num_layers_landed > layer
        if failed_rank >= 0:
            return KVResponse(TaskStatus.FAILED, task_id, None, f"layer-wise H2D of task {task_id} failed on the "
                              f"worker of table {failed_rank} before layer {layer} landed")
        if landed:
            return KVResponse(TaskStatus.SUCCESS, task_id, None, "")
        now = time.monotonic()
        if final_status is not None and now >= next_status:
            final = final_status()
            if final is not None:
                return final
            next_status = now + status_every_s
        if now >= deadline:
            return KVResponse(TaskStatus.TIMEOUT, task_id, None, f"layer {layer} of task {task_id} not landed "
                              f"after {timeout_s} s")
        time.sleep(nap)
        nap = min(2e-4, nap + 2e-5)  # spin first (a layer often lands within microseconds), then nap

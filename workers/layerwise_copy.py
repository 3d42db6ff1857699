"""Layer-major H2D for a device worker whose rank registered a layer progress table.

Runs in the device worker process (its H2D lane). Every H2D op of the batch copies the first span of
layers of all its blocks, then the next, ... (``flexkv.layerwise.layer_groups``: one layer per span for
host buffers, ``backend.layers_per_call`` on CUDA); after each span the op's word in the table
(:mod:`flexkv.layerwise`) says how many layers are in the engine's memory (a batched op of several
tasks: each task's word). Host buffers copy synchronously, so the word is stored as soon as a span's
memcpy returned; CUDA buffers record an event per span and a publisher thread stores the word once that
span's event completed, while later spans are still being enqueued. A failure stores ``failed`` for
every op it touches, so every waiter wakes with it, and the op reports the error as usual.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from flexkv import hoptrace
from flexkv.layerwise import MAX_TASK_ID, LayerProgress, layer_groups
from flexkv.types import OpType

if TYPE_CHECKING:
    from flexkv.workers.base import Op
    from flexkv.workers.device_worker import DeviceWorker


# Only the H2D of a layer-wise launch copies layer-major, and only from this many blocks on; any other copies
# whole and publishes every layer at once (its word says nothing until the whole op landed): one copy call
# per layer costs more than a small op's bytes (4 blocks: 32 calls of ~50-100 us on the GPU worker), and
# layer-major 256 MiB ops through the GPU worker ran at 74-76% of the pinned ceiling against 93-97% whole
# (H200, gpu_transfer.py --stack --landing before this rule).
LAYER_MAJOR_MIN_BLOCKS = 16


def publish_task_words(progress: LayerProgress, op: Op, num_layers: int, failed: bool = False) -> None:
    """Store ``num_layers`` landed (or ``failed``) in the word of every task ``op`` moves blocks for."""
    for task_id in op.task_ids:  # a batched op: each of its tasks' words
        if 0 < task_id <= MAX_TASK_ID:  # (a larger id has no word: its waiters ask the server)
            progress.store(task_id, num_layers, failed)


def start_layer_major(worker: DeviceWorker, ops: list[Op], progress: LayerProgress) -> Callable[[], list[str]]:
    """Start the H2D ``ops`` layer by layer; the returned function waits for them (errors per op).

    With CUDA buffers a publisher thread waits for each layer's event while later layers are still being
    enqueued: enqueueing one layer of a large op costs about as long as its copy, so publishing only after
    the last layer was enqueued would report layer 0 about when the whole op is done."""
    backend = worker.backend
    errors = [""] * len(ops)
    live = [i for i, op in enumerate(ops)]
    lock = threading.Lock()  # the enqueueing thread and the publisher both write errors and words

    def publish(i: int, num_layers: int, failed: bool = False) -> None:
        publish_task_words(progress, ops[i], num_layers, failed)
        if hoptrace.ENABLED and num_layers:
            hoptrace.mark(f"pub{num_layers - 1}", ops[i].task_id)

    def fail(i: int, e: Exception) -> None:
        with lock:
            if not errors[i]:
                errors[i] = worker._error(OpType.H2D, e)
                publish(i, 0, failed=True)

    for i in live:
        publish(i, 0)
    marks: queue.SimpleQueue[tuple[int, list[int], Callable[[], None]] | None] = queue.SimpleQueue()

    def publisher() -> None:
        while (item := marks.get()) is not None:
            layer, idx, wait = item
            try:
                wait()
            except Exception as e:  # noqa: BLE001 - this and later layers of these ops may be incomplete
                for i in idx:
                    fail(i, e)
                continue
            with lock:
                for i in idx:
                    if not errors[i]:
                        publish(i, layer + 1)

    thread = None
    if not backend.copies_synchronously:
        thread = threading.Thread(target=publisher, name=f"layers-{worker.worker_id}", daemon=True)
        thread.start()
    try:
        for first, count in layer_groups(worker.layout.num_layers, backend.layers_per_call):
            last = first + count - 1
            for i in list(live):
                try:
                    backend.copy_layers(OpType.H2D, ops[i].dst_ids, ops[i].src_ids, first, count)
                except Exception as e:  # noqa: BLE001 - reported per op
                    live.remove(i)
                    fail(i, e)
            if hoptrace.ENABLED:
                for i in live:
                    hoptrace.mark(f"enq{last}", ops[i].task_id)
            if backend.copies_synchronously:
                for i in live:
                    publish(i, last + 1)
            elif live:
                try:
                    marks.put((last, list(live), backend.mark(OpType.H2D)))
                except Exception as e:  # noqa: BLE001 - nothing more can be waited for
                    for i in live:
                        fail(i, e)
                    live = []
    finally:
        marks.put(None)

    def finish() -> list[str]:
        if thread is not None:
            thread.join()
        return errors
    return finish

"""KVTPClient: one per TP rank; registers that rank's KV buffers with the server.

Host buffers (CPU engines, tests) must live in shared memory so the device worker process can reach
them: allocate them with :func:`allocate_host_kv_buffers`. CUDA tensors are shared through CUDA IPC
handles (see docs/gpu.md). Host memory private to the engine process (torch CPU tensors, numpy arrays)
is registered with ``engine_side=True``: the rank's device worker then runs as a thread of this process
(an engine-side lane, DESIGN §7b). Registration returns once the rank's worker is running.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from flexkv.fence import KVFence
from flexkv.layerwise import LayerProgress, check_layer_index, wait_for_layer
from flexkv.layout import KVCacheLayout, LayoutKind, tensor_addresses
from flexkv.protocol import client_msgs as cm
from flexkv.shm import SharedPool, make_pool_name
from flexkv.transport import ServerConnection
from flexkv.types import DType, FlexKVError, InvalidRequest, KVResponse

if TYPE_CHECKING:
    from flexkv.workers.engine_lane import EngineLane

log = logging.getLogger("flexkv.client")

_NUMPY_DTYPES = {DType.FLOAT16: np.float16, DType.FLOAT32: np.float32, DType.UINT8: np.uint8}
_PAGE = 4096


@dataclasses.dataclass
class HostKVBuffers:
    """Engine-layout KV tensors of one TP rank in one shared-memory segment (owned by this process)."""

    segment: SharedPool
    arrays: list[np.ndarray]
    layout: KVCacheLayout
    dtype: DType
    creator_pid: int = dataclasses.field(default_factory=os.getpid)  # (a forked child never removes them)

    @property
    def offsets(self) -> list[int]:
        return [int(a.ctypes.data) - self.segment.address for a in self.arrays]

    def torch_tensors(self) -> list[Any]:
        """The same memory as torch tensors of the real dtype (bfloat16 included)."""
        import torch

        out = []
        for a in self.arrays:
            t = torch.from_numpy(a)
            out.append(t.view(getattr(torch, self.dtype.value)))
        return out

    def close(self) -> None:
        """Unmap and remove the segment (call after the server no longer uses it)."""
        with _LOCK:
            if self in _LIVE:
                _LIVE.remove(self)
        self.arrays = []
        self.segment.close()
        self.segment.unlink()


_LIVE: list[HostKVBuffers] = []
_LOCK = threading.Lock()


@atexit.register
def _remove_unclosed_buffers() -> None:
    """At interpreter exit, remove the segments of buffers nobody closed: a name in /dev/shm outlives its
    process otherwise. (Registered first, so it runs after every manager's and lane's own exit handler: a
    library-mode server has stopped by then; processes that mapped a segment keep their mapping.)"""
    with _LOCK:
        live = [b for b in _LIVE if b.creator_pid == os.getpid()]
    for bufs in live:
        bufs.close()


def allocate_host_kv_buffers(layout: KVCacheLayout, dtype: DType | str, tag: str = "kv") -> HostKVBuffers:
    """Allocate one rank's KV tensors (shapes from ``layout``) in a fresh shared-memory segment.

    The arrays hold raw elements (bfloat16 as uint16); ``torch_tensors()`` gives typed torch views.
    """
    dtype = DType.parse(dtype)
    if dtype.itemsize != layout.itemsize:
        raise InvalidRequest(f"dtype {dtype.value} has itemsize {dtype.itemsize}, layout says {layout.itemsize}")
    np_dtype = _NUMPY_DTYPES.get(dtype, {1: np.uint8, 2: np.uint16, 4: np.uint32}[dtype.itemsize])
    sizes = [layout.tensor_bytes(i) for i in range(layout.num_tensors)]
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-size // _PAGE) * _PAGE
    segment = SharedPool.create(make_pool_name(tag), total, prefault=True)
    arrays = []
    for i, off in enumerate(offsets):
        raw = np.frombuffer(segment.buffer, dtype=np.uint8, count=sizes[i], offset=off)
        arrays.append(raw.view(np_dtype).reshape(layout.tensor_shape(i)))
    bufs = HostKVBuffers(segment, arrays, layout, dtype)
    with _LOCK:
        _LIVE.append(bufs)
    return bufs


def _find_host_buffers(tensors: Sequence[Any]) -> tuple[HostKVBuffers, list[int]]:
    addrs = tensor_addresses(tensors)
    with _LOCK:
        for bufs in _LIVE:
            lo, hi = bufs.segment.address, bufs.segment.address + bufs.segment.nbytes
            if all(lo <= a < hi for a in addrs):
                return bufs, [a - lo for a in addrs]
    raise InvalidRequest("host KV tensors must live in shared memory allocated by "
                         "flexkv.allocate_host_kv_buffers() so the worker process can reach them")


def _is_cuda(t: Any) -> bool:
    return bool(getattr(t, "is_cuda", False))


def _check_lane_tensors(tensors: Sequence[Any], lay: KVCacheLayout, device_id: int) -> bool:
    """The engine-side lane copies by address: each tensor host memory (a torch CPU tensor or numpy
    array, writable) or, all of them, CUDA tensors on ``device_id``; contiguous and at least as large as
    the layout says. Returns whether they are CUDA tensors."""
    if len(tensors) != lay.num_tensors:
        raise InvalidRequest(f"register: {len(tensors)} KV tensors given, layout {lay.kind.value} needs "
                             f"{lay.num_tensors}")
    cuda = all(_is_cuda(t) for t in tensors)
    for i, t in enumerate(tensors):
        if cuda and int(t.device.index) != device_id:
            raise InvalidRequest(f"register(engine_side=True): tensor {i} is on cuda:{t.device.index}, this client "
                                 f"was created for device_id={device_id}")
        if not cuda and (_is_cuda(t) or (not isinstance(t, np.ndarray)
                                         and getattr(getattr(t, "device", None), "type", "") != "cpu")):
            raise InvalidRequest(f"register(engine_side=True): tensor {i} is not a host (CPU) tensor or numpy array")
        if isinstance(t, np.ndarray):
            ok, nbytes = bool(t.flags.c_contiguous and t.flags.writeable), int(t.nbytes)
        else:
            ok, nbytes = bool(t.is_contiguous()), int(t.numel() * t.element_size())
        if not ok:
            raise InvalidRequest(f"register(engine_side=True): tensor {i} is not contiguous and writable")
        if nbytes < lay.tensor_bytes(i):
            raise InvalidRequest(f"register(engine_side=True): tensor {i} has {nbytes} bytes, layout needs "
                                 f"{lay.tensor_bytes(i)}")
    return cuda


class KVTPClient:
    """Registers one TP rank's KV buffers with a running server (``server_address``)."""

    def __init__(self, server_address: str, dp_client_id: int = 0, tp_rank: int = 0, device_id: int = 0,
                 timeout_s: float = 60.0) -> None:
        self.dp_client_id, self.tp_rank, self.device_id = dp_client_id, tp_rank, device_id
        self._conn = ServerConnection(server_address, dp_client_id, "tp", timeout_s)
        self._conn.hello(timeout_s)
        self._keep: list[Any] = []
        self._event: int | None = None  # the "KV written" event (register(..., use_event=True))
        self._event_handle = b""
        self._lane: EngineLane | None = None  # register(..., engine_side=True)
        self.layer_progress: LayerProgress | None = None  # register(..., layerwise=True)
        self._fence: KVFence | None = None  # made by register; sealed by seal() / close()
        self._num_layers = 0

    def register(self, kv_tensors: Sequence[Any] | HostKVBuffers, layout: KVCacheLayout | LayoutKind | str,
                 timeout_s: float = 120.0, *, use_event: bool = False, engine_side: bool = False,
                 layerwise: bool = False) -> KVCacheLayout:
        """Register this rank's KV tensors laid out as ``layout`` (a KVCacheLayout, or a kind whose
        shape is read off the tensors). Returns the layout. Raises InvalidRequest naming the problem.

        ``use_event`` (CUDA tensors): the worker's D2H copies wait on the GPU for this rank's "KV
        written" event, so a put may be launched right after :meth:`mark_kv_written` without
        synchronizing the engine's stream (see docs/gpu.md, ordering contract).

        ``engine_side``: the rank's device worker runs here as a thread (DESIGN §7b) until :meth:`close`,
        copying by address; the tensors must stay alive until then (this client keeps a reference). Host
        tensors private to this process (torch CPU tensors or numpy arrays, each contiguous), or CUDA
        tensors on ``device_id``: then the copies run in this process's own CUDA context, on streams of
        their own, so they overlap the engine's kernels instead of time-slicing the GPU with a worker
        process's context (a worker process's GET ran 3x slower while the engine computed, H200).

        ``layerwise``: this rank's worker publishes each GET's landing in a progress table this client
        creates (and removes at :meth:`close`): layer by layer for a GET launched with ``layerwise=True``
        (copied layer-major; wait for a layer with :meth:`wait_layer` or ``KVManager.wait_layer``), all
        layers at once for any other. A manager that registered every rank this way ends GET waits from
        the tables. See docs/layerwise.md."""
        tensors: Sequence[Any] = kv_tensors.arrays if isinstance(kv_tensors, HostKVBuffers) else list(kv_tensors)
        if not tensors:
            raise InvalidRequest("register: no KV tensors given")
        tpb = int(self._conn.server_info["tokens_per_block"])
        if isinstance(layout, KVCacheLayout):
            lay = layout
        else:
            try:
                lay = KVCacheLayout.from_tensors(LayoutKind(layout), tensors, tpb)
            except ValueError as e:
                raise InvalidRequest(f"register: {e}") from None
        self._num_layers = lay.num_layers
        progress: dict[str, Any] = {}
        if layerwise:
            if self.layer_progress is None:
                self.layer_progress = LayerProgress.create("layers")
            progress["layer_progress"] = self.layer_progress.name
        fresh = self._fence is None or self._fence.sealed
        if fresh:
            if self._fence is not None:
                self._fence.close()
            self._fence = KVFence.create()
        assert self._fence is not None
        progress["fence"] = self._fence.name
        try:
            return self._register_rank(tensors, lay, timeout_s, use_event, engine_side, progress)
        except BaseException:
            if fresh:  # (a worker the server may have started meanwhile finds no fence: it copies nothing)
                self._fence.close()
                self._fence = None
            raise

    def _register_rank(self, tensors: Sequence[Any], lay: KVCacheLayout, timeout_s: float, use_event: bool,
                       engine_side: bool, progress: dict[str, Any]) -> KVCacheLayout:
        fields: dict[str, Any] = {}
        if engine_side:
            if use_event:
                raise InvalidRequest("register: use_event is for a device worker in another process; an engine-side "
                                     "lane copies in this process (synchronize the engine's writes before a put)")
            return self._register_engine_side(tensors, lay, timeout_s, **progress)
        if all(_is_cuda(t) for t in tensors):
            from flexkv.cuda_ipc import export_tensor

            devices = {int(t.device.index) for t in tensors}
            if devices != {self.device_id}:
                raise InvalidRequest(f"register: KV tensors are on CUDA device(s) {sorted(devices)}, "
                                     f"this client was created for device_id={self.device_id}")
            handles = [export_tensor(t) for t in tensors]
            fields = {"cuda_handles": [h.handle for h in handles], "tensor_offsets": [h.offset for h in handles]}
            if use_event:
                fields["cuda_event"] = self._kv_written_event()
            self._keep = list(tensors)
        elif any(_is_cuda(t) for t in tensors):
            raise InvalidRequest("register: all KV tensors must be on the same kind of device")
        elif use_event:
            raise InvalidRequest("register: use_event needs CUDA tensors (host buffers are copied synchronously)")
        else:
            bufs, offsets = _find_host_buffers(tensors)
            fields = {"host_segment": bufs.segment.name, "tensor_offsets": offsets}
        self._conn.request(lambda rid: self._register_msg(lay, rid, **fields, **progress), timeout_s=timeout_s)
        return lay

    def _register_msg(self, lay: KVCacheLayout, rid: int, **fields: Any) -> cm.RegisterKVMsg:
        return cm.RegisterKVMsg(
            client_id=self.dp_client_id, req_id=rid, tp_rank=self.tp_rank, device_id=self.device_id,
            layout_kind=lay.kind.value, num_blocks=lay.num_blocks, tokens_per_block=lay.tokens_per_block,
            num_heads=lay.num_heads, head_size=lay.head_size, itemsize=lay.itemsize, num_layers=lay.num_layers,
            **fields)

    def _register_engine_side(self, tensors: Sequence[Any], lay: KVCacheLayout, timeout_s: float,
                              **progress: Any) -> KVCacheLayout:
        from flexkv.workers.engine_lane import EngineLane

        cuda = _check_lane_tensors(tensors, lay, self.device_id)
        self._stop_lane()
        reply, _ = self._conn.request(lambda rid: self._register_msg(lay, rid, engine_side=True, **progress),
                                      timeout_s=timeout_s)
        assert isinstance(reply, cm.OkReplyMsg)
        self._keep = list(tensors)  # the lane copies into them by address
        self._lane = EngineLane.start(str(reply.info["lane_spec"]), tensor_addresses(tensors), timeout_s, cuda=cuda)
        atexit.register(self._stop_lane)  # a clean goodbye at interpreter exit, whoever forgot close()
        return lay

    def wait_layer(self, task_id: int, layer_index: int, timeout: float = 20.0) -> KVResponse:
        """Block until layer ``layer_index`` of GET ``task_id`` is in this rank's KV buffers.

        SUCCESS: landed; FAILED: this rank's H2D failed (every waiter wakes); TIMEOUT: not landed in
        ``timeout`` s. Sees only this rank's worker: a task that fails before its H2D starts (a failed
        SSD read, a cancel) shows up as TIMEOUT here; ``KVManager.wait_layer`` also watches the task.
        Needs ``register(..., layerwise=True)``; runs in the engine process, polling shared memory."""
        if self.layer_progress is None:
            raise InvalidRequest("wait_layer: register the KV buffers with layerwise=True first")
        check_layer_index(layer_index, self._num_layers)
        return wait_for_layer([self.layer_progress], task_id, layer_index, timeout)

    def _stop_lane(self) -> None:
        if self._lane is not None:
            self._lane.close()
            self._lane = None
        atexit.unregister(self._stop_lane)

    def _kv_written_event(self) -> bytes:
        if self._event is None:
            from flexkv.cuda_ipc import create_event

            self._event, handle = create_event(self.device_id)
            self._event_handle = handle.handle
        return self._event_handle

    def mark_kv_written(self, stream: Any = None) -> None:
        """Record this rank's "KV written" event on ``stream`` (a ``torch.cuda.Stream`` or a
        cudaStream_t as an int; default: torch's current stream on this rank's device).

        Call it after enqueueing the GPU work that writes the KV of the blocks about to be put, then
        launch the put: the worker's copy waits on the GPU for that work, and no host thread blocks.
        Needs ``register(..., use_event=True)``."""
        if self._event is None:
            raise InvalidRequest("mark_kv_written: register the KV tensors with use_event=True first")
        from flexkv.native import cudacopy

        if stream is None:
            import torch

            stream = torch.cuda.current_stream(self.device_id)
        cudacopy.event_record(self._event, int(getattr(stream, "cuda_stream", stream)))

    def seal(self, timeout_s: float = 10.0) -> None:
        """From now on no flexkv process reads or writes this rank's KV memory, whatever its server does
        later: the batch of copies running now ends first, every later copy fails (its task FAILED).
        Call it before handing blocks that a launched task may still touch back to the engine's own
        allocator when the server stopped answering; :meth:`close` calls it first. A device worker that
        holds the fence past ``timeout_s`` (stopped or hung mid-copy) is killed. See flexkv/fence.py."""
        if self._fence is not None:
            self._fence.seal(timeout_s)

    def close(self) -> None:
        """Seal this rank's KV memory (:meth:`seal`), stop its engine-side lane (if any; the server then
        treats the rank as gone) and disconnect."""
        try:
            self.seal()
        except FlexKVError as e:
            log.error("flexkv: rank %d: %s", self.tp_rank, e)
        self._stop_lane()
        self._keep = []
        self._conn.close()
        if self.layer_progress is not None:
            self.layer_progress.close()
            self.layer_progress = None
        if self._fence is not None:
            self._fence.close()
            self._fence = None
        if self._event is not None:
            from flexkv.native import cudacopy

            cudacopy.event_destroy(self._event)
            self._event = None

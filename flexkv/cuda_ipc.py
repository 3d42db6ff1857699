"""CUDA IPC: hand an engine's KV tensors (and its 'KV written' events) to the GPU worker process.

The engine process calls :func:`export_tensor` per KV tensor and sends the :class:`CudaIpcHandle`
(plain fields, msgspec-encodable; no pickled torch internals) over the wire. The GPU worker calls
:func:`open_handle` and gets the tensor's device address plus a closer. One allocation from torch's
caching allocator can back several tensors, and CUDA refuses to open one allocation twice in one
process, so opened bases are cached by handle bytes and reference-counted here; the last closer
calls cudaIpcCloseMemHandle. The exporting process must keep the tensors alive while any worker
has them open.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import msgspec

from flexkv.native import cudacopy
from flexkv.types import InvalidRequest


class CudaIpcHandle(msgspec.Struct, frozen=True):
    """Where one tensor lives: its allocation's IPC handle and the tensor's place inside it."""

    handle: bytes  # 64-byte cudaIpcMemHandle_t of the whole allocation
    offset: int  # tensor start - allocation base (cuMemGetAddressRange)
    nbytes: int
    device_id: int
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"


class CudaIpcEventHandle(msgspec.Struct, frozen=True):
    """An interprocess cudaEvent_t (created with cudaEventInterprocess | cudaEventDisableTiming)."""

    handle: bytes
    device_id: int


_lock = threading.Lock()
_opened: dict[tuple[int, bytes], list[int]] = {}  # (device, handle) -> [base address, open count]


def export_tensor(tensor: Any) -> CudaIpcHandle:
    """Describe a contiguous CUDA torch tensor for another process. Runs in the engine process.

    Raises InvalidRequest for a CPU or non-contiguous tensor, CudaError when CUDA refuses to export the
    allocation (for example memory from expandable segments or cudaMallocAsync pools).
    """
    if not getattr(tensor, "is_cuda", False):
        raise InvalidRequest(f"export_tensor needs a CUDA tensor, got one on {getattr(tensor, 'device', '?')}")
    if not tensor.is_contiguous():
        raise InvalidRequest("export_tensor needs a contiguous tensor")
    device_id = int(tensor.device.index)
    ptr, nbytes = int(tensor.data_ptr()), int(tensor.numel() * tensor.element_size())
    handle, base, size = cudacopy.ipc_get_mem_handle(device_id, ptr)
    if not (base <= ptr and ptr + nbytes <= base + size):
        raise InvalidRequest(f"tensor [{ptr:#x}, +{nbytes}) is not inside its allocation [{base:#x}, +{size})")
    dtype = str(tensor.dtype).removeprefix("torch.")
    return CudaIpcHandle(handle, ptr - base, nbytes, device_id, tuple(int(x) for x in tensor.shape), dtype)


def open_handle(h: CudaIpcHandle) -> tuple[int, Callable[[], None]]:
    """Map the tensor in this (worker) process: ``(device address of the tensor, closer)``.

    Each call must be paired with one call of its closer; the allocation is unmapped when the last
    tensor of it is closed. Calling a closer twice does nothing.
    """
    if len(h.handle) != 64:
        raise InvalidRequest(f"CUDA IPC handle must be 64 bytes, got {len(h.handle)}")
    key = (h.device_id, h.handle)
    with _lock:
        entry = _opened.get(key)
        if entry is None:
            entry = [cudacopy.ipc_open_mem_handle(h.device_id, h.handle), 0]
            _opened[key] = entry
        entry[1] += 1
        base = entry[0]
    closed = False

    def close() -> None:
        nonlocal closed
        with _lock:
            if closed:
                return
            closed = True
            entry[1] -= 1
            if entry[1] == 0:
                del _opened[key]
                cudacopy.ipc_close_mem_handle(h.device_id, base)

    return base + h.offset, close


def num_open_allocations() -> int:
    """How many distinct allocations this process has mapped through :func:`open_handle`."""
    with _lock:
        return len(_opened)


def create_event(device_id: int) -> tuple[int, CudaIpcEventHandle]:
    """An interprocess event for the engine's 'KV written' signal: ``(cudaEvent_t as int, handle)``.

    Runs in the engine process; it records the event on its compute stream after writing KV and sends
    the handle once. Destroy the event with :func:`flexkv.native.cudacopy.event_destroy`.
    """
    event = cudacopy.event_create(device_id, interprocess=True)
    return event, CudaIpcEventHandle(cudacopy.ipc_get_event_handle(device_id, event), device_id)


def open_event(h: CudaIpcEventHandle) -> int:
    """Open an engine's event in the worker; pass it as ``wait_event`` to ``copy_blocks``."""
    return cudacopy.ipc_open_event_handle(h.device_id, h.handle)

"""CUDA copy engine: KV blocks between an engine's GPU chunks and the block-first host pool.

Wraps ``c_src/cudacopy.h`` (the only module importing ``flexkv.native._cudacopy``). libcudart and
libcuda are loaded with dlopen on first use, so this module imports on machines without CUDA; there
:func:`cuda_available` is ``(False, reason)`` and :class:`CudaCopyEngine` raises :class:`GPUUnavailable`.
Runs in the GPU worker process; one engine is driven by one thread at a time. The ordering contract
(when the engine's KV writes must be complete, which stream a caller waits on) is in ``docs/gpu.md``.
"""

from __future__ import annotations

import enum
import errno
import glob
import importlib.util
import math
import mmap
import os
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from flexkv.native._cudacopy import ffi, lib
from flexkv.native.blockids import out_of_range
from flexkv.types import FlexKVError, InvalidRequest, OpType

PTX_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "copy_kernels.ptx")
NO_GPU_CODES = {3: "initialization error", 34: "stub library (no driver)", 35: "insufficient or missing driver",
                100: "no CUDA device", 101: "invalid device ordinal"}
DEFAULT_STAGING_BYTES = 128 << 20
IdArray = npt.NDArray[np.int64]


class GPUUnavailable(FlexKVError):
    """No usable CUDA: library missing, no driver (error 35), no device (error 100), bad device id."""


class CudaError(FlexKVError):
    """A CUDA call failed; ``call`` names it and ``code`` is its cudaError_t / CUresult."""

    def __init__(self, call: str, code: int, message: str) -> None:
        super().__init__(f"{call} failed: CUDA error {code} ({message})")
        self.call = call
        self.code = code


class CopyPath(enum.IntEnum):
    """How :meth:`CudaCopyEngine.copy_blocks` moves bytes (docs/gpu.md compares them)."""

    AUTO = 0
    BATCH = lib.FKV_PATH_BATCH  # coalesced runs through cudaMemcpyBatchAsync (copy engines only)
    STAGED = lib.FKV_PATH_STAGED  # gather kernel into device staging, whole blocks over PCIe
    KERNEL = lib.FKV_PATH_KERNEL  # SM kernel reading/writing the registered host pool


# ------------------------------------------------------------------ loading and errors

_load_lock = threading.Lock()
_load_state: tuple[bool, str] | None = None


def _cudart_candidates(cudart_dir: str | None) -> list[str]:
    dirs = [d for d in (os.environ.get("FLEXKV_CUDART_DIR"), cudart_dir) if d]
    spec = importlib.util.find_spec("nvidia")
    for root in list(spec.submodule_search_locations or []) if spec else []:
        dirs += [os.path.join(root, "cu13", "lib"), os.path.join(root, "cuda_runtime", "lib")]
    dirs += ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]
    found = [os.environ.get("FLEXKV_CUDART", "")]
    for d in dirs:
        found += sorted(glob.glob(os.path.join(d, "libcudart.so*")), reverse=True)
    return [f for f in found if f and os.path.isfile(f)]


def _load(cudart_dir: str | None = None) -> tuple[bool, str]:
    global _load_state
    with _load_lock:
        if _load_state is None or (not _load_state[0] and cudart_dir):
            why = ffi.new("char[512]")
            paths = _cudart_candidates(cudart_dir)
            rc = lib.fkv_cuda_load(paths[0].encode() if paths else ffi.NULL, why, 512)
            _load_state = (rc == 0, ffi.string(why).decode(errors="replace"))
        return _load_state


def _raise_for(rc: int, err: Any, what: str) -> None:
    if rc >= 0:
        return
    if rc == -errno.EIO and err.call != ffi.NULL:
        call = ffi.string(err.call).decode()
        code = int(err.cuda_code)
        msg = ffi.string(lib.fkv_cuda_error_string(code, err.driver_api)).decode(errors="replace")
        if not err.driver_api and code in NO_GPU_CODES:
            raise GPUUnavailable(f"{what}: {call} returned {code} ({msg}): {NO_GPU_CODES[code]}")
        raise CudaError(call, code, msg)
    if rc == -errno.ENODEV:
        raise GPUUnavailable(f"{what}: CUDA libraries are not loaded")
    raise OSError(-rc, f"{what}: {os.strerror(-rc)}")


def _call(what: str, fn: Callable[..., int], *args: Any) -> None:
    ok, why = _load()  # every entry point needs the libraries; loading is once per process
    if not ok:
        raise GPUUnavailable(f"{what}: CUDA libraries unavailable: {why}")
    err = ffi.new("struct fkv_err *")
    _raise_for(fn(*args, err), err, what)


def cuda_available(cudart_dir: str | None = None) -> tuple[bool, str]:
    """``(True, "N device(s), runtime X, driver Y")`` or ``(False, why)``; never raises.

    ``cudart_dir`` names an extra folder holding libcudart (for example torch's ``torch/lib``).
    """
    ok, why = _load(cudart_dir)
    if not ok:
        return False, f"CUDA libraries unavailable: {why}"
    num, rt, drv = ffi.new("int *"), ffi.new("int *"), ffi.new("int *")
    try:
        _call("cuda probe", lib.fkv_cuda_probe, num, rt, drv)
    except (GPUUnavailable, CudaError) as e:
        return False, str(e)
    if num[0] == 0:
        return False, "no CUDA device visible"
    return True, f"{num[0]} device(s), runtime {rt[0]}, driver {drv[0]}"


def require_cuda(cudart_dir: str | None = None) -> None:
    """Raise :class:`GPUUnavailable` with the reason unless :func:`cuda_available` says yes."""
    ok, why = cuda_available(cudart_dir)
    if not ok:
        raise GPUUnavailable(why)


# ------------------------------------------------------------------ low-level helpers (IPC, events, tests)

def ipc_get_mem_handle(device_id: int, ptr: int) -> tuple[bytes, int, int]:
    """(64-byte handle of the allocation holding ``ptr``, allocation base, allocation size)."""
    handle, base, size = ffi.new("uint8_t[64]"), ffi.new("uint64_t *"), ffi.new("uint64_t *")
    _call("ipc export", lib.fkv_ipc_get_mem_handle, device_id, ptr, handle, base, size)
    return bytes(ffi.buffer(handle, 64)), int(base[0]), int(size[0])


def ipc_open_mem_handle(device_id: int, handle: bytes) -> int:
    """Map another process's allocation (cudaIpcMemLazyEnablePeerAccess); returns its base address."""
    out = ffi.new("uint64_t *")
    _call("ipc open", lib.fkv_ipc_open_mem_handle, device_id, handle, out)
    return int(out[0])


def ipc_close_mem_handle(device_id: int, ptr: int) -> None:
    _call("ipc close", lib.fkv_ipc_close_mem_handle, device_id, ptr)


def event_create(device_id: int, interprocess: bool = False) -> int:
    """A timing-free cudaEvent_t (as an int); the caller destroys it with :func:`event_destroy`."""
    out = ffi.new("uintptr_t *")
    _call("event create", lib.fkv_event_create, device_id, int(interprocess), out)
    return int(out[0])


def event_destroy(event: int) -> None:
    _call("event destroy", lib.fkv_event_destroy, event)


def event_synchronize(event: int) -> None:
    _call("event synchronize", lib.fkv_event_synchronize, event)


def set_device(device_id: int) -> None:
    """cudaSetDevice for the calling thread. Every new thread starts on device 0; call this first in
    threads that use events or streams of another device, or the runtime creates a context on 0."""
    _call("set device", lib.fkv_set_device, device_id)


def event_record(event: int, stream: int) -> None:
    """cudaEventRecord(event, stream); ``stream`` is a cudaStream_t as an int (0: the legacy stream)."""
    _call("event record", lib.fkv_event_record, event, stream)


def ipc_get_event_handle(device_id: int, event: int) -> bytes:
    out = ffi.new("uint8_t[64]")
    _call("ipc event export", lib.fkv_ipc_get_event_handle, device_id, event, out)
    return bytes(ffi.buffer(out, 64))


def ipc_open_event_handle(device_id: int, handle: bytes) -> int:
    out = ffi.new("uintptr_t *")
    _call("ipc event open", lib.fkv_ipc_open_event_handle, device_id, handle, out)
    return int(out[0])


def device_alloc(device_id: int, nbytes: int) -> int:
    out = ffi.new("uint64_t *")
    _call("cudaMalloc", lib.fkv_device_alloc, device_id, nbytes, out)
    return int(out[0])


def device_free(device_id: int, ptr: int) -> None:
    _call("cudaFree", lib.fkv_device_free, device_id, ptr)


def memcpy_sync(device_id: int, dst: int, src: int, nbytes: int) -> None:
    """One cudaMemcpyAsync(kind=default) on the legacy stream, then synchronize (the ceiling copy)."""
    _call("memcpy", lib.fkv_memcpy_sync, device_id, dst, src, nbytes)


# ------------------------------------------------------------------ argument validation (no CUDA)

class CopyRequest(NamedTuple):
    """A validated :meth:`CudaCopyEngine.copy_blocks` call, ready for the C engine."""

    to_pool: bool
    bases: npt.NDArray[np.uint64]
    pool_offsets: npt.NDArray[np.uint64]
    block_stride: int
    chunk_bytes: int
    pool_addr: int
    pool_block_bytes: int
    pool_num_blocks: int
    engine_ids: IdArray
    pool_ids: IdArray
    shard_offset: int  # min(pool_offsets)
    shard_bytes: int  # num_chunks * chunk_bytes when the shard is one dense region, else 0
    aligned16: bool  # every address and size 16-byte aligned (kernel paths)
    block_runs: bool  # a block's chunks are contiguous on both sides: BATCH moves whole blocks

    @property
    def num_bytes(self) -> int:
        return int(self.engine_ids.size) * int(self.bases.size) * self.chunk_bytes


def _ids(name: str, ids: Any, limit: int) -> IdArray:
    if not isinstance(ids, np.ndarray) or ids.dtype != np.int64 or ids.ndim != 1:
        desc = f"{ids.dtype} array of shape {ids.shape}" if isinstance(ids, np.ndarray) else type(ids).__name__
        raise InvalidRequest(f"{name} must be a 1-D int64 numpy array, got {desc}")
    err = out_of_range(name, ids, limit)
    if err is not None:
        raise err
    return np.ascontiguousarray(ids)


def _check_pool(bases: Any, offs: Any, chunk_bytes: int, pool_addr: int, pool_block_bytes: int,
                pool_num_blocks: int) -> None:
    if not isinstance(bases, np.ndarray) or bases.dtype != np.uint64 or bases.ndim != 1 or bases.size == 0:
        raise InvalidRequest("table.bases must be a non-empty 1-D uint64 numpy array")
    if not isinstance(offs, np.ndarray) or offs.dtype != np.uint64 or offs.shape != bases.shape:
        got = f"{offs.dtype} {offs.shape}" if isinstance(offs, np.ndarray) else type(offs).__name__
        raise InvalidRequest(f"pool_chunk_offsets must be uint64 of shape {bases.shape} like table.bases, got {got}")
    if pool_addr <= 0 or pool_block_bytes <= 0 or pool_num_blocks <= 0:
        raise InvalidRequest(f"pool_addr={pool_addr}, pool_block_bytes={pool_block_bytes}, "
                             f"pool_num_blocks={pool_num_blocks}: all must be positive")
    if int(offs.max()) + chunk_bytes > pool_block_bytes:
        raise InvalidRequest(f"pool chunk at offset {int(offs.max())} + chunk_bytes {chunk_bytes} overruns "
                             f"pool_block_bytes {pool_block_bytes}")


def _dense_shard(offs: npt.NDArray[np.uint64], chunk_bytes: int) -> tuple[int, int]:
    lo = int(offs.min())
    expect = lo + np.arange(offs.size, dtype=np.uint64) * np.uint64(chunk_bytes)
    return lo, (int(offs.size) * chunk_bytes if np.array_equal(np.sort(offs), expect) else 0)


def prepare_copy(direction: OpType, table: Any, pool_addr: int, pool_block_bytes: int, pool_chunk_offsets: Any,
                 pool_num_blocks: int, engine_ids: Any, pool_ids: Any) -> CopyRequest:
    """Validate one copy without touching CUDA; raises :class:`InvalidRequest` naming the bad argument.

    ``table`` is a :class:`flexkv.layout.ChunkTable` (or anything with bases/block_stride/chunk_bytes/
    num_blocks). Destination ids must be unique (two writers to one block would race).
    """
    if direction not in (OpType.H2D, OpType.D2H):
        raise InvalidRequest(f"direction must be OpType.H2D or OpType.D2H, got {direction!r}")
    chunk_bytes, stride, num_blocks = int(table.chunk_bytes), int(table.block_stride), int(table.num_blocks)
    if chunk_bytes <= 0 or stride < chunk_bytes or num_blocks <= 0:
        raise InvalidRequest(f"table has chunk_bytes={chunk_bytes}, block_stride={stride}, num_blocks={num_blocks}; "
                             "need 0 < chunk_bytes <= block_stride and num_blocks > 0")
    _check_pool(table.bases, pool_chunk_offsets, chunk_bytes, pool_addr, pool_block_bytes, pool_num_blocks)
    eng = _ids("engine_ids", engine_ids, num_blocks)
    pool = _ids("pool_ids", pool_ids, pool_num_blocks)
    if eng.size != pool.size:
        raise InvalidRequest(f"engine_ids has {eng.size} entries but pool_ids has {pool.size}")
    dst_name, dst = ("pool_ids", pool) if direction is OpType.D2H else ("engine_ids", eng)
    if np.unique(dst).size != dst.size:
        raise InvalidRequest(f"{dst_name} (the destination) repeats a block id")
    bases = np.ascontiguousarray(table.bases)
    offs = np.ascontiguousarray(pool_chunk_offsets)
    lo, shard_bytes = _dense_shard(offs, chunk_bytes)
    sizes = [chunk_bytes, stride, pool_addr, pool_block_bytes]
    aligned = all(x % 16 == 0 for x in sizes) and not (bases % 16).any() and not (offs % 16).any()
    cb = np.uint64(chunk_bytes)
    block_runs = bool(np.all(np.diff(bases) == cb) and np.all(np.diff(offs) == cb))
    return CopyRequest(direction is OpType.D2H, bases, offs, stride, chunk_bytes, pool_addr, pool_block_bytes,
                       pool_num_blocks, eng, pool, lo, shard_bytes, aligned, block_runs)



# ------------------------------------------------------------------ the engine

_host_ranges: list[tuple[int, int, int]] = []  # process-wide registrations: (addr, nbytes, piece_bytes)

class EngineInfo(NamedTuple):
    device_id: int
    runtime_version: int
    driver_version: int
    num_sms: int
    compute_capability: tuple[int, int]
    host_ptr_registered: bool  # the GPU reaches registered host memory at the host address
    has_batch_api: bool  # cudaMemcpyBatchAsync present (runtime >= 12.8)
    has_kernels: bool  # copy_kernels.ptx loaded (STAGED and KERNEL possible)
    staging_bytes: int


class EngineStats(NamedTuple):
    """Counters since the last :meth:`CudaCopyEngine.stats` call; times only in profile mode."""

    num_kernel_launches: int
    num_ctas: int
    num_copies: int  # DMA copies after coalescing
    num_batch_calls: int
    kernel_ms: float
    cta_ms: float  # SM use: sum of CTAs x kernel time


class CudaCopyEngine:
    """Moves KV blocks between one GPU's engine tensors and a host pool, on the engine's OWN stream.

    ``path`` is the default :class:`CopyPath`; AUTO picks per copy (whole-block runs -> BATCH, else
    STAGED, else KERNEL, else BATCH). ``staging_bytes`` of device memory (rounded down to 8 KiB) are
    reserved at construction for STAGED (two page-aligned halves). Raises :class:`GPUUnavailable` when
    CUDA or the device is missing. Every copy is only enqueued: call :meth:`synchronize` (or record an
    event) before reading the result.
    """

    def __init__(self, device_id: int, path: CopyPath = CopyPath.AUTO, *, staging_bytes: int = DEFAULT_STAGING_BYTES,
                 kernel_ctas: int = 64, cudart_dir: str | None = None) -> None:
        if not isinstance(device_id, int) or device_id < 0:
            raise InvalidRequest(f"device_id must be a non-negative int, got {device_id!r}")
        if staging_bytes < 0 or kernel_ctas <= 0:
            raise InvalidRequest(f"staging_bytes={staging_bytes} must be >= 0, kernel_ctas={kernel_ctas} > 0")
        self.device_id = device_id
        self.path = CopyPath(path)
        self._eng: Any = None
        self._pools: list[tuple[int, int, list[int]]] = []  # (addr, nbytes, registered piece addresses)
        require_cuda(cudart_dir)
        out = ffi.new("struct fkv_engine **")
        _call(f"engine on device {device_id}", lib.fkv_engine_create, device_id, staging_bytes, out)
        self._eng = out[0]
        lib.fkv_engine_set_profile(self._eng, 0, kernel_ctas)
        self.kernel_reason = self._load_kernels()
        self.info = self._read_info()

    def _load_kernels(self) -> str:
        if not os.path.exists(PTX_PATH):
            return f"{PTX_PATH} missing (nvcc was not found at build time)"
        with open(PTX_PATH, "rb") as f:
            ptx = f.read() + b"\0"
        try:
            _call("load kernels", lib.fkv_engine_load_kernels, self._eng, ptx)
        except CudaError as e:
            return f"PTX did not load: {e}"
        return ""

    def _read_info(self) -> EngineInfo:
        i = ffi.new("struct fkv_engine_info *")
        lib.fkv_engine_get_info(self._eng, i)
        return EngineInfo(i.device, i.runtime_version, i.driver_version, i.num_sms, (i.cc_major, i.cc_minor),
                          bool(i.host_ptr_registered), bool(i.has_batch_api), bool(i.has_kernels),
                          int(i.staging_bytes))

    def _live(self) -> Any:
        if self._eng is None:
            raise FlexKVError("CudaCopyEngine is closed")
        return self._eng

    @property
    def stream(self) -> int:
        """The engine's cudaStream_t as an int (for torch.cuda.ExternalStream, events)."""
        return int(ffi.cast("uintptr_t", lib.fkv_engine_stream(self._live())))

    # -- host registration

    def register_host(self, addr: int, nbytes: int, chunk_bytes: int = 1 << 30,
                      progress: Callable[[int, int], None] | None = None, block_bytes: int = 0) -> None:
        """cudaHostRegister ``[addr, addr + nbytes)`` in pieces of ``chunk_bytes`` (rounded down to whole pages,
        and to whole ``block_bytes`` when given, so no pool block straddles two pieces); ``progress(done, total)`` after
        each. On failure the pieces this call registered are unregistered and the error raised. Every copy's
        pool must lie in one registered range; no single DMA spans two pieces (CUDA refuses that).
        """
        if addr <= 0 or nbytes <= 0 or chunk_bytes <= 0 or block_bytes < 0:
            raise InvalidRequest(f"register_host(addr={addr}, nbytes={nbytes}, chunk_bytes={chunk_bytes}, "
                                 f"block_bytes={block_bytes}): sizes must be positive")
        unit = math.lcm(block_bytes or 1, mmap.PAGESIZE)  # whole pages; whole blocks when block_bytes is given
        chunk_bytes = max(unit, chunk_bytes - chunk_bytes % unit)
        if any(addr < a + n and a < addr + nbytes for a, n, _ in _host_ranges):
            raise InvalidRequest(f"[{addr:#x}, +{nbytes}) overlaps a range already registered in this process")
        pieces: list[int] = []
        try:
            for start in range(addr, addr + nbytes, chunk_bytes):
                size = min(chunk_bytes, addr + nbytes - start)
                _call(f"register {size} bytes at {start:#x}", lib.fkv_host_register, self.device_id, start, size)
                pieces.append(start)
                if progress is not None:
                    progress(start + size - addr, nbytes)
        except BaseException:
            for start in pieces:
                lib.fkv_host_unregister(self.device_id, start, ffi.new("struct fkv_err *"))
            raise
        self._pools.append((addr, nbytes, pieces))
        _host_ranges.append((addr, nbytes, chunk_bytes if nbytes > chunk_bytes else 0))

    def unregister_host(self) -> None:
        """cudaHostUnregister every range :meth:`register_host` registered (after finishing queued copies)."""
        if self._pools:
            self.synchronize()
        pools, self._pools = self._pools, []
        for addr, _, pieces in pools:
            _host_ranges[:] = [r for r in _host_ranges if r[0] != addr]
            for start in pieces:
                _call("unregister", lib.fkv_host_unregister, self.device_id, start)

    def is_registered(self, addr: int, nbytes: int) -> bool:
        """Whether ``[addr, addr + nbytes)`` lies in one range registered by any engine of this process."""
        return self._registration(addr, nbytes) is not None

    @staticmethod
    def _registration(addr: int, nbytes: int) -> tuple[int, int] | None:
        """(base, piece_bytes) of the registered range holding ``[addr, addr + nbytes)``."""
        for a, n, piece in _host_ranges:
            if a <= addr and addr + nbytes <= a + n:
                return a, piece
        return None

    def _pool_pieces(self, req: CopyRequest) -> tuple[int, int]:
        reg = self._registration(req.pool_addr, req.pool_num_blocks * req.pool_block_bytes)
        if reg is None:
            raise InvalidRequest(f"the pool [{req.pool_addr:#x}, {req.pool_num_blocks} blocks) is not registered "
                                 "with register_host in this process")
        base, piece = reg
        if piece and (piece % req.pool_block_bytes or (req.pool_addr - base) % req.pool_block_bytes):
            raise InvalidRequest(f"pool blocks of {req.pool_block_bytes} B straddle registration pieces of {piece} B; "
                                 "register with block_bytes=pool_block_bytes")
        return reg

    # -- copies

    def unavailable(self, path: CopyPath, req: CopyRequest) -> str:
        """Why ``path`` cannot run ``req`` ("" when it can)."""
        if path in (CopyPath.BATCH, CopyPath.AUTO):
            return ""
        if not self.info.has_kernels:
            return f"no copy kernels: {self.kernel_reason}"
        if not req.aligned16:
            return "kernel paths need 16-byte aligned addresses, strides and chunk sizes"
        if path is CopyPath.STAGED:
            if req.shard_bytes == 0:
                return "the pool chunk offsets of this shard are not one dense region"
            if req.shard_bytes > self.info.staging_bytes // 2:
                return f"one shard block ({req.shard_bytes} B) exceeds half the staging buffer"
            return ""
        return ""

    def choose_path(self, req: CopyRequest, path: CopyPath | None = None) -> CopyPath:
        """The path a copy will take; raises InvalidRequest when an explicit path cannot run it."""
        path = self.path if path is None else CopyPath(path)
        self._pool_pieces(req)
        if path is not CopyPath.AUTO:
            why = self.unavailable(path, req)
            if why:
                raise InvalidRequest(f"path {path.name} unavailable: {why}")
            return path
        if req.block_runs or not req.aligned16:
            return CopyPath.BATCH
        for cand in (CopyPath.STAGED, CopyPath.KERNEL):
            if not self.unavailable(cand, req):
                return cand
        return CopyPath.BATCH

    def copy_blocks(self, direction: OpType, table: Any, pool_addr: int, pool_block_bytes: int,
                    pool_chunk_offsets: Any, pool_num_blocks: int, engine_ids: Any, pool_ids: Any,
                    wait_event: int | None = None, path: CopyPath | None = None) -> None:
        """Enqueue D2H (engine -> pool) or H2D (pool -> engine) of blocks ``engine_ids[i] <-> pool_ids[i]``.

        Validation (:func:`prepare_copy`) happens before any CUDA call. With ``wait_event`` (a cudaEvent_t
        as an int, e.g. opened with :func:`flexkv.cuda_ipc.open_event`) the engine's stream first waits on
        it. Returns once enqueued; the bytes are in place after :meth:`synchronize`. Raises CudaError.
        """
        req = prepare_copy(direction, table, pool_addr, pool_block_bytes, pool_chunk_offsets, pool_num_blocks,
                           engine_ids, pool_ids)
        chosen = self.choose_path(req, path)
        piece_base, piece_bytes = self._pool_pieces(req)
        eng = self._live()
        if wait_event:
            _call("wait event", lib.fkv_engine_wait_event, eng, wait_event)
        d = ffi.new("struct fkv_copy_desc *")
        keep = [ffi.from_buffer("uint64_t[]", req.bases), ffi.from_buffer("uint64_t[]", req.pool_offsets),
                ffi.from_buffer("int64_t[]", req.engine_ids), ffi.from_buffer("int64_t[]", req.pool_ids)]
        d.bases, d.pool_offsets, d.engine_ids, d.pool_ids = keep
        d.to_pool, d.num_chunks, d.num_pairs = int(req.to_pool), int(req.bases.size), int(req.engine_ids.size)
        d.block_stride, d.chunk_bytes = req.block_stride, req.chunk_bytes
        d.pool_addr, d.pool_block_bytes = req.pool_addr, req.pool_block_bytes
        d.shard_offset, d.shard_bytes = req.shard_offset, req.shard_bytes
        d.pool_piece_base, d.pool_piece_bytes = piece_base, piece_bytes
        _call(f"copy_blocks({direction.name}, {chosen.name})", lib.fkv_engine_copy, eng, d, int(chosen))

    def record_event(self, event: int) -> None:
        """Record ``event`` on the engine's stream: it fires when every copy enqueued so far is done."""
        _call("record event", lib.fkv_engine_record_event, self._live(), event)

    def wait_event(self, event: int) -> None:
        """Make later copies wait for ``event`` (e.g. the engine's 'KV written' event)."""
        _call("wait event", lib.fkv_engine_wait_event, self._live(), event)

    def synchronize(self) -> None:
        """Block until every enqueued copy finished; raises CudaError if one failed."""
        _call("synchronize", lib.fkv_engine_synchronize, self._live())

    def set_profile(self, on: bool) -> None:
        """Time every kernel launch with events (for :meth:`stats`' kernel_ms and cta_ms)."""
        lib.fkv_engine_set_profile(self._live(), int(on), 0)

    def stats(self) -> EngineStats:
        """Counters since the last call (waits for profiled kernels), then resets them."""
        s = ffi.new("struct fkv_engine_stats *")
        _call("stats", lib.fkv_engine_get_stats, self._live(), s)
        return EngineStats(s.num_kernel_launches, s.num_ctas, s.num_copies, s.num_batch_calls, s.kernel_ms, s.cta_ms)

    def close(self) -> None:
        """Finish queued copies, unregister host ranges, free the stream, staging and kernels. Idempotent."""
        if self._eng is None:
            return
        try:
            self.unregister_host()
        finally:
            eng, self._eng = self._eng, None
            _call("engine destroy", lib.fkv_engine_destroy, eng)

    def __enter__(self) -> CudaCopyEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["CopyPath", "CopyRequest", "CudaCopyEngine", "CudaError", "EngineInfo", "EngineStats",
           "GPUUnavailable", "cuda_available", "prepare_copy", "require_cuda"]

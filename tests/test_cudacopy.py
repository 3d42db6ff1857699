"""CUDA copy engine and CUDA IPC.

CPU part (runs everywhere): the module builds and imports without CUDA, reports why CUDA is missing,
refuses to build an engine with GPUUnavailable, and rejects bad copy arguments before touching CUDA.
GPU part (skipped with the reason where there is no CUDA device): byte-exact round trips GPU -> pool
-> GPU for every engine layout and every path, event ordering, a multi-GiB registration and CUDA
IPC across a spawned process. Each GPU test prints what it ran (device, path, bytes).
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import numpy as np
import pytest

from flexkv.common.config import ModelConfig
from flexkv.cuda_ipc import CudaIpcEventHandle, CudaIpcHandle
from flexkv.layout import BlockFirstLayout, ChunkTable, KVCacheLayout, LayoutKind
from flexkv.native import cudacopy
from flexkv.native.cudacopy import CopyPath, CudaCopyEngine, GPUUnavailable, prepare_copy
from flexkv.types import FlexKVError, InvalidRequest, OpType

CUDA_OK, CUDA_WHY = cudacopy.cuda_available()


def _torch_cuda() -> tuple[bool, str]:
    if not CUDA_OK:
        return False, f"no CUDA here: {CUDA_WHY}"
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    return (True, "") if torch.cuda.is_available() else (False, "torch has no CUDA")


GPU_OK, GPU_WHY = _torch_cuda()
gpu = pytest.mark.skipif(not GPU_OK, reason=GPU_WHY)


# ------------------------------------------------------------------ CPU: no CUDA needed

def _table(num_chunks: int = 4, chunk_bytes: int = 4096, num_blocks: int = 8) -> ChunkTable:
    stride = chunk_bytes
    bases = np.array([(1 << 32) + c * num_blocks * stride for c in range(num_chunks)], dtype=np.uint64)
    return ChunkTable(bases, stride, chunk_bytes, num_blocks)


def _offsets(num_chunks: int = 4, chunk_bytes: int = 4096, shard: int = 0) -> np.ndarray:
    return (np.arange(num_chunks, dtype=np.uint64) + np.uint64(shard * num_chunks)) * np.uint64(chunk_bytes)


def _args(**over: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(direction=OpType.D2H, table=_table(), pool_addr=1 << 40, pool_block_bytes=4 * 4096,
                                pool_chunk_offsets=_offsets(), pool_num_blocks=16,
                                engine_ids=np.array([0, 1, 5], dtype=np.int64),
                                pool_ids=np.array([3, 4, 9], dtype=np.int64))
    args.update(over)
    return args


def test_module_builds_and_imports_without_cuda() -> None:
    # The extension was compiled without any CUDA header or library and loads here.
    assert cudacopy.lib.FKV_PATH_BATCH == CopyPath.BATCH
    ok, why = cudacopy.cuda_available()
    assert isinstance(ok, bool) and why
    print(f"cuda_available() -> {ok}, {why!r}")


@pytest.mark.skipif(CUDA_OK, reason="this machine has CUDA; the no-GPU behaviour cannot be seen here")
def test_no_cuda_reports_reason_and_engine_refuses() -> None:
    ok, why = cudacopy.cuda_available()
    assert not ok and ("libcuda" in why or "driver" in why or "device" in why), why
    with pytest.raises(GPUUnavailable, match="CUDA") as exc:
        CudaCopyEngine(0)
    assert isinstance(exc.value, FlexKVError)
    with pytest.raises(GPUUnavailable):
        cudacopy.require_cuda()


def test_ptx_built_when_nvcc_exists() -> None:
    import shutil
    if not (shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")):
        pytest.skip("no nvcc: the kernel paths are expected to be unavailable")
    with open(cudacopy.PTX_PATH) as f:
        ptx = f.read()
    assert ".entry fkv_copy_chunks" in ptx


def test_prepare_copy_accepts_and_describes_a_valid_copy() -> None:
    req = prepare_copy(**_args())
    assert req.to_pool and req.num_bytes == 3 * 4 * 4096
    assert req.shard_offset == 0 and req.shard_bytes == 4 * 4096  # the shard is one dense region
    assert req.aligned16 and not req.block_runs  # chunks of one block are apart on the engine side


def test_prepare_copy_shard_of_second_rank_and_block_first_engine() -> None:
    # TP rank 1 of 2: its chunks start half-way into each pool block.
    req = prepare_copy(**_args(pool_block_bytes=8 * 4096, pool_chunk_offsets=_offsets(shard=1)))
    assert req.shard_offset == 4 * 4096 and req.shard_bytes == 4 * 4096
    # An engine whose block holds all its chunks back to back: BATCH can move whole blocks.
    bases = np.array([(1 << 32) + c * 4096 for c in range(4)], dtype=np.uint64)
    req = prepare_copy(**_args(table=ChunkTable(bases, 4 * 4096, 4096, 8)))
    assert req.block_runs


@pytest.mark.parametrize("over, match", [
    (dict(direction=OpType.H2DISK), "direction"),
    (dict(engine_ids=np.array([0, 1, 2], dtype=np.int32)), "engine_ids must be a 1-D int64"),
    (dict(pool_ids=[3, 4, 9]), "pool_ids must be a 1-D int64"),
    (dict(engine_ids=np.array([0, 1], dtype=np.int64)), "engine_ids has 2 entries but pool_ids has 3"),
    (dict(engine_ids=np.array([0, 8, 1], dtype=np.int64)),
     r"^engine_ids\[1\] = 8 out of range \[0, 8\); nothing was copied$"),
    (dict(pool_ids=np.array([3, -1, 2], dtype=np.int64)), r"^pool_ids\[1\] = -1 out of range \[0, "),
    (dict(pool_ids=np.array([3, 3, 2], dtype=np.int64)), "pool_ids .the destination. repeats"),
    (dict(direction=OpType.H2D, engine_ids=np.array([1, 1, 2], dtype=np.int64)), "engine_ids .the destination."),
    (dict(pool_chunk_offsets=_offsets()[:3]), "pool_chunk_offsets must be uint64 of shape"),
    (dict(pool_chunk_offsets=_offsets().astype(np.int64)), "pool_chunk_offsets must be uint64"),
    (dict(pool_block_bytes=3 * 4096), "overruns pool_block_bytes"),
    (dict(pool_addr=0), "pool_addr=0"),
    (dict(table=ChunkTable(_table().bases, 2048, 4096, 8)), "chunk_bytes <= block_stride"),
    (dict(table=ChunkTable(_table().bases.astype(np.int64), 4096, 4096, 8)), "table.bases must be"),
])
def test_prepare_copy_rejects_bad_arguments(over: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        prepare_copy(**_args(**over))


def test_prepare_copy_flags_unaligned_and_sparse_pools() -> None:
    req = prepare_copy(**_args(pool_addr=(1 << 40) + 8))
    assert not req.aligned16
    sparse = _offsets() * np.uint64(2)  # gaps between chunks: not one dense region
    req = prepare_copy(**_args(pool_block_bytes=8 * 4096, pool_chunk_offsets=sparse))
    assert req.shard_bytes == 0


def test_ipc_handles_round_trip_through_msgspec() -> None:
    h = CudaIpcHandle(bytes(range(64)), 4096, 1 << 20, 0, (2, 16, 16, 8, 128), "bfloat16")
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(h), type=CudaIpcHandle) == h
    e = CudaIpcEventHandle(b"\x01" * 64, 3)
    assert msgspec.json.decode(msgspec.json.encode(e), type=CudaIpcEventHandle) == e


# ------------------------------------------------------------------ GPU helpers

LAYOUTS: dict[str, tuple[LayoutKind, ModelConfig, int]] = {  # name -> (engine layout, model, tp_rank)
    "vllm_kv_first": (LayoutKind.VLLM_KV_FIRST, ModelConfig(4, 4, 64, "bfloat16"), 0),
    "vllm_kv_first_tp2_rank1": (LayoutKind.VLLM_KV_FIRST, ModelConfig(4, 4, 64, "bfloat16", tp_size=2), 1),
    "vllm_block_first": (LayoutKind.VLLM_BLOCK_FIRST, ModelConfig(4, 2, 64, "bfloat16"), 0),
    "sglang": (LayoutKind.SGLANG, ModelConfig(4, 2, 64, "float16"), 0),
    "mla": (LayoutKind.MLA, ModelConfig(3, 1, 576, "bfloat16", use_mla=True), 0),
}
T, ENGINE_BLOCKS, POOL_BLOCKS = 16, 40, 48


def _engine_tensors(kind: LayoutKind, model: ModelConfig) -> list[Any]:
    import torch
    dt = getattr(torch, str(model.dtype.value))  # type: ignore[union-attr]
    h, d, nb = model.heads_per_shard, model.head_size, ENGINE_BLOCKS
    table: dict[LayoutKind, list[tuple[int, ...]]] = {LayoutKind.VLLM_KV_FIRST: [(2, nb, T, h, d)] * model.num_layers,
              LayoutKind.VLLM_BLOCK_FIRST: [(nb, 2, T, h, d)] * model.num_layers,
              LayoutKind.SGLANG: [(nb * T, h, d)] * (2 * model.num_layers),
              LayoutKind.MLA: [(nb, T, d)] * model.num_layers}
    shapes = table[kind]
    gen = torch.Generator(device="cuda").manual_seed(1234)
    out = []
    for shape in shapes:
        t = torch.empty(shape, dtype=dt, device="cuda")
        t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape, generator=gen, device="cuda",
                                                dtype=torch.uint8))
        out.append(t)
    return out


def _host_bytes(tensors: list[Any]) -> list[np.ndarray]:
    import torch
    return [t.view(torch.uint8).cpu().numpy().reshape(-1) for t in tensors]


def _chunk(layout: KVCacheLayout, host: list[np.ndarray], chunk: int, block: int) -> np.ndarray:
    ti, off = layout.chunk_offset(chunk // layout.kv_dim, chunk % layout.kv_dim, block)
    return host[ti][off:off + layout.chunk_bytes]


class Pool:
    """A page-aligned anonymous mmap standing in for the shared-memory CPU pool."""

    def __init__(self, nbytes: int) -> None:
        self.mm = mmap.mmap(-1, nbytes)
        self.arr = np.frombuffer(self.mm, dtype=np.uint8)
        self.addr = self.arr.ctypes.data


class GpuCase(NamedTuple):
    """One LAYOUTS entry on the GPU: random engine tensors, their chunk table, and a pool for them."""
    tensors: list[Any]
    layout: KVCacheLayout
    pool_layout: BlockFirstLayout
    offs: np.ndarray  # the rank's shard chunk offsets in a pool block
    table: ChunkTable
    pool: Pool


def _gpu_case(name: str) -> GpuCase:
    kind, model, rank = LAYOUTS[name]
    tensors = _engine_tensors(kind, model)
    layout = KVCacheLayout.from_tensors(kind, tensors, T)
    pool_layout = BlockFirstLayout(model, T)
    return GpuCase(tensors, layout, pool_layout, pool_layout.shard_chunk_offsets(pool_layout.shard_of_rank(rank)),
                   layout.chunk_table([t.data_ptr() for t in tensors]), Pool(POOL_BLOCKS * pool_layout.block_bytes))


def _pairs(rng: np.random.Generator, n: int, limit: int) -> np.ndarray:
    # A run of consecutive ids (exercises coalescing) followed by random distinct ids.
    run = np.arange(5, 5 + n // 2, dtype=np.int64)
    rest = rng.choice(np.setdiff1d(np.arange(limit), run), n - run.size, replace=False).astype(np.int64)
    return np.concatenate([run, rest])


def _device_line(eng: CudaCopyEngine) -> str:
    i = eng.info
    return (f"device {i.device_id} cc {i.compute_capability} sms {i.num_sms} runtime {i.runtime_version} "
            f"driver {i.driver_version} batch_api {i.has_batch_api} kernels {i.has_kernels}")


# ------------------------------------------------------------------ GPU: round trips

@gpu
@pytest.mark.parametrize("path", [CopyPath.BATCH, CopyPath.STAGED, CopyPath.KERNEL, CopyPath.AUTO])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_round_trip_gpu_pool_gpu_is_byte_exact(name: str, path: CopyPath) -> None:
    import torch
    tensors, layout, pool_layout, offs, table, pool = _gpu_case(name)
    shard = pool_layout.shard_of_rank(LAYOUTS[name][2])
    pool.arr[:] = 0xA5
    original = _host_bytes(tensors)
    rng = np.random.default_rng(7)
    eng_ids, pool_ids = _pairs(rng, 12, ENGINE_BLOCKS), _pairs(rng, 12, POOL_BLOCKS)
    with CudaCopyEngine(0, path) as eng:
        # Pieces of 4 blocks: the consecutive ids 5..10 cross a registration boundary (DMA runs must split).
        eng.register_host(pool.addr, pool.arr.size, chunk_bytes=4 * pool_layout.block_bytes + 1,
                          block_bytes=pool_layout.block_bytes)
        req = prepare_copy(OpType.D2H, table, pool.addr, pool_layout.block_bytes, offs, POOL_BLOCKS, eng_ids, pool_ids)
        print(f"\n{name} path {path.name} -> {eng.choose_path(req).name}: {req.num_bytes} B each way; "
              f"{_device_line(eng)}")
        if path is CopyPath.KERNEL or path is CopyPath.STAGED:
            assert not eng.unavailable(path, req), eng.unavailable(path, req)
        eng.copy_blocks(OpType.D2H, table, pool.addr, pool_layout.block_bytes, offs, POOL_BLOCKS, eng_ids, pool_ids)
        eng.synchronize()
        blocks = pool.arr.reshape(POOL_BLOCKS, pool_layout.block_bytes)
        for e_id, p_id in zip(eng_ids, pool_ids, strict=True):
            for c in range(offs.size):
                got = blocks[p_id, int(offs[c]):int(offs[c]) + layout.chunk_bytes]
                assert np.array_equal(got, _chunk(layout, original, c, e_id)), (name, e_id, p_id, c)
        untouched = np.setdiff1d(np.arange(POOL_BLOCKS), pool_ids)
        assert (blocks[untouched] == 0xA5).all()
        if pool_layout.num_shards > 1:  # the other rank's part of each written block is untouched
            other = pool_layout.shard_chunk_offsets(1 - shard)
            lo = int(other.min())
            assert (blocks[pool_ids, lo:lo + pool_layout.shard_bytes] == 0xA5).all()
        # Poison the whole engine cache, bring the blocks back into other engine blocks.
        for t in tensors:
            t.view(torch.uint8).fill_(0x5A)
        back = rng.permutation(ENGINE_BLOCKS)[:12].astype(np.int64)
        eng.copy_blocks(OpType.H2D, table, pool.addr, pool_layout.block_bytes, offs, POOL_BLOCKS, back, pool_ids)
        eng.synchronize()
        eng.unregister_host()
    now = _host_bytes(tensors)
    for b_new, e_old in zip(back, eng_ids, strict=True):
        for c in range(offs.size):
            assert np.array_equal(_chunk(layout, now, c, b_new), _chunk(layout, original, c, e_old)), (b_new, c)
    for b in np.setdiff1d(np.arange(ENGINE_BLOCKS), back):
        assert (_chunk(layout, now, 0, b) == 0x5A).all()


@gpu
def test_copy_waits_for_the_engines_event() -> None:
    """Ordering contract: the engine records an event after writing KV; the copy waits on it."""
    import torch
    tensors, _, pool_layout, offs, table, pool = _gpu_case("vllm_kv_first")
    ids = np.arange(8, dtype=np.int64)
    with CudaCopyEngine(0, CopyPath.BATCH) as eng:
        eng.register_host(pool.addr, pool.arr.size)
        side = torch.cuda.Stream()
        done = torch.cuda.Event()
        with torch.cuda.stream(side):
            torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the KV write lands
            for t in tensors:
                t.view(torch.uint8).fill_(7)
            done.record(side)
        eng.copy_blocks(OpType.D2H, table, pool.addr, pool_layout.block_bytes, offs, POOL_BLOCKS, ids, ids,
                        wait_event=done.cuda_event)
        eng.synchronize()
        eng.unregister_host()
    assert (pool.arr[: 8 * pool_layout.block_bytes] == 7).all()
    print("\nD2H waited for the engine's event: pool holds the bytes written after a 0.1 s GPU sleep")


@gpu
def test_staged_calls_in_a_row_stay_byte_exact_and_ordered() -> None:
    """STAGED D2H calls in a row chain (the next call's gathers overlap the last one's DMA, halves keep
    alternating); an engine event, an H2D call or a BATCH copy in between must still order. Nothing is
    synchronized until the end. Staging holds 3 blocks a half, so calls take 1-3 rounds."""
    import torch
    tensors, layout, pool_layout, offs, table, pool = _gpu_case("vllm_kv_first")
    bb = pool_layout.block_bytes
    pool.arr[:] = 0xA5
    blocks = pool.arr.reshape(POOL_BLOCKS, bb)
    ids = np.arange  # engine and pool block ranges below never overlap within one direction
    with CudaCopyEngine(0, CopyPath.STAGED, staging_bytes=6 * bb) as eng:
        eng.register_host(pool.addr, pool.arr.size, block_bytes=bb)

        def copy(direction: OpType, e: np.ndarray, p: np.ndarray, **kw: Any) -> None:
            eng.copy_blocks(direction, table, pool.addr, bb, offs, POOL_BLOCKS, e.astype(np.int64),
                            p.astype(np.int64), **kw)

        original = _host_bytes(tensors)
        for e0, p0, n in ((0, 0, 5), (5, 5, 7), (12, 12, 1), (13, 13, 3)):  # 2, 3, 1, 1 rounds, chained
            copy(OpType.D2H, ids(e0, e0 + n), ids(p0, p0 + n))
        side, written = torch.cuda.Stream(), torch.cuda.Event()
        with torch.cuda.stream(side):
            torch.cuda._sleep(100_000_000)  # the engine's write lands ~50 ms after the copy is queued
            for t in tensors:
                t[:, 16:20].view(torch.uint8).fill_(9)
            written.record(side)
        copy(OpType.D2H, ids(16, 20), ids(16, 20), wait_event=written.cuda_event)  # chained, behind the event
        copy(OpType.H2D, ids(20, 25), ids(0, 5))  # engine 20..24 <- what engine 0..4 held
        copy(OpType.D2H, ids(20, 25), ids(20, 25))  # must see the H2D's bytes
        copy(OpType.H2D, ids(25, 28), ids(5, 8), path=CopyPath.BATCH)  # engine 25..27 <- engine 5..7
        copy(OpType.D2H, ids(25, 28), ids(25, 28))  # must see the BATCH copy's bytes
        eng.synchronize()
        eng.unregister_host()

    cb = layout.chunk_bytes
    for p_id, e_id in [*((i, i) for i in range(16)), *((20 + i, i) for i in range(5)),
                       *((25 + i, 5 + i) for i in range(3))]:
        for c in range(offs.size):
            got = blocks[p_id, int(offs[c]):int(offs[c]) + cb]
            assert np.array_equal(got, _chunk(layout, original, c, e_id)), (p_id, e_id, c)
    for c in range(offs.size):
        assert (blocks[16:20, int(offs[c]):int(offs[c]) + cb] == 9).all(), "a chained D2H did not wait for the event"
    assert (blocks[28:] == 0xA5).all()
    print("\nSTAGED D2H calls chained across 1-3 rounds, behind an event, after H2D STAGED and BATCH: byte-exact")


@gpu
def test_copy_refuses_an_unregistered_or_straddling_pool() -> None:
    _, _, pool_layout, offs, table, pool = _gpu_case("mla")
    ids = np.arange(4, dtype=np.int64)
    args = (OpType.D2H, table, pool.addr, pool_layout.block_bytes, offs, POOL_BLOCKS, ids, ids)
    with CudaCopyEngine(0, CopyPath.KERNEL) as eng:
        with pytest.raises(InvalidRequest, match="not registered"):  # a kernel would fault on it
            eng.copy_blocks(*args)
        eng.register_host(pool.addr, pool.arr.size, chunk_bytes=41 * 4096)  # not whole blocks
        with pytest.raises(InvalidRequest, match="straddle"):
            eng.copy_blocks(*args)


@gpu
def test_register_a_4_gib_pool_in_pieces_with_progress() -> None:
    nbytes, piece = 4 << 30, 1 << 30
    pool = Pool(nbytes)
    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        seen.append((done, total))
        print(f"registered {done >> 20} / {total >> 20} MiB")

    with CudaCopyEngine(0) as eng:
        eng.register_host(pool.addr, nbytes, chunk_bytes=piece, progress=progress)
        assert seen == [(k * piece, nbytes) for k in range(1, 5)]
        assert eng.is_registered(pool.addr + nbytes - 4096, 4096)
        # A copy into the last GiB lands: 1 MiB from device memory.
        src = cudacopy.device_alloc(0, 1 << 20)
        try:
            cudacopy.memcpy_sync(0, pool.addr + nbytes - (1 << 20), src, 1 << 20)
        finally:
            cudacopy.device_free(0, src)
        eng.unregister_host()
        assert not eng.is_registered(pool.addr, 4096)


# ------------------------------------------------------------------ GPU: CUDA IPC across processes

def _ipc_child(handles: list[bytes], pool_path: str, pool_bytes: int, result: Any) -> None:
    from flexkv import cuda_ipc
    try:
        kind, model, _ = LAYOUTS["vllm_kv_first"]
        hs = [msgspec.msgpack.decode(h, type=CudaIpcHandle) for h in handles]
        opened = [cuda_ipc.open_handle(h) for h in hs]
        num_allocs = cuda_ipc.num_open_allocations()
        layout = KVCacheLayout.from_shapes(kind, [h.shape for h in hs], 2, T)
        pool_layout = BlockFirstLayout(model, T)
        with open(pool_path, "r+b") as f:
            mm = mmap.mmap(f.fileno(), pool_bytes)
        arr = np.frombuffer(mm, dtype=np.uint8)
        ids = np.arange(ENGINE_BLOCKS, dtype=np.int64)
        with CudaCopyEngine(hs[0].device_id) as eng:
            eng.register_host(arr.ctypes.data, pool_bytes)
            eng.copy_blocks(OpType.D2H, layout.chunk_table([p for p, _ in opened]), arr.ctypes.data,
                            pool_layout.block_bytes, pool_layout.shard_chunk_offsets(0), POOL_BLOCKS, ids, ids)
            eng.synchronize()
        for _, close in opened:
            close()
        del arr
        mm.flush()
        mm.close()
        result.put(("ok", num_allocs, cuda_ipc.num_open_allocations()))
    except Exception as e:  # noqa: BLE001 - report any failure to the parent
        result.put(("error", repr(e), 0))


@gpu
def test_ipc_export_then_open_and_copy_in_a_spawned_process(request: pytest.FixtureRequest) -> None:
    import torch

    from flexkv.cuda_ipc import export_tensor
    kind, model, _ = LAYOUTS["vllm_kv_first"]
    # All layers carved out of ONE allocation: the worker must open it once.
    per_layer = 2 * ENGINE_BLOCKS * T * model.heads_per_shard * model.head_size
    big = torch.randint(-1000, 1000, (model.num_layers * per_layer,), dtype=torch.int16, device="cuda")
    shape = (2, ENGINE_BLOCKS, T, model.heads_per_shard, model.head_size)
    tensors = [big[i * per_layer:(i + 1) * per_layer].view(torch.bfloat16).view(shape)
               for i in range(model.num_layers)]
    handles = [export_tensor(t) for t in tensors]
    assert len({h.handle for h in handles}) == 1 and handles[1].offset - handles[0].offset == per_layer * 2
    pool_layout = BlockFirstLayout(model, T)
    pool_bytes = POOL_BLOCKS * pool_layout.block_bytes
    # tmpfs (POSIX shared memory): cudaHostRegister refuses mappings of files on disk filesystems.
    pool_path = Path(f"/dev/shm/flexkv_test_ipc_{os.getpid()}")
    request.addfinalizer(lambda: pool_path.unlink(missing_ok=True))
    pool_path.write_bytes(b"\xee" * pool_bytes)
    torch.cuda.synchronize()
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    child = ctx.Process(target=_ipc_child, args=([msgspec.msgpack.encode(h) for h in handles], str(pool_path),
                                                 pool_bytes, result))
    child.start()
    status, num_allocs, left = result.get(timeout=90)
    child.join(timeout=30)
    assert status == "ok", num_allocs
    assert num_allocs == 1 and left == 0
    layout = KVCacheLayout.from_tensors(kind, tensors, T)
    host = _host_bytes(tensors)
    blocks = np.frombuffer(pool_path.read_bytes(), dtype=np.uint8).reshape(POOL_BLOCKS, -1)
    offs = pool_layout.shard_chunk_offsets(0)
    for b in range(ENGINE_BLOCKS):
        for c in range(offs.size):
            got = blocks[b, int(offs[c]):int(offs[c]) + layout.chunk_bytes]
            assert np.array_equal(got, _chunk(layout, host, c, b)), (b, c)
    assert (blocks[ENGINE_BLOCKS:] == 0xEE).all()
    print(f"\nIPC: child opened {len(handles)} tensors from 1 allocation and copied {ENGINE_BLOCKS} blocks exactly")


# ------------------------------------------------------------------ GPU: every CUDA runtime on this machine

def _installed_cudarts() -> list[str]:
    """Every libcudart.so.<major>... found in the places flexkv looks (torch's, the nvidia wheels',
    /usr/local/cuda*) and in ``FLEXKV_TEST_CUDARTS`` (paths, os.pathsep-separated), one path per
    distinct file."""
    import glob
    import importlib.util

    dirs = ["/usr/local/cuda*/lib64", "/usr/local/cuda*/targets/*/lib", "/usr/lib/x86_64-linux-gnu"]
    for name in ("torch", "nvidia"):
        spec = importlib.util.find_spec(name)
        for root in list(spec.submodule_search_locations or []) if spec else []:
            dirs += [os.path.join(root, "lib"), os.path.join(root, "*", "lib")]
    seen: dict[str, str] = {}
    for path in filter(None, os.environ.get("FLEXKV_TEST_CUDARTS", "").split(os.pathsep)):
        seen.setdefault(os.path.realpath(path), path)  # extra runtimes (gpu_e2e_check.sh unpacks them)
    for d in dirs:
        for path in sorted(glob.glob(os.path.join(d, "libcudart.so.[0-9]*"))):
            seen.setdefault(os.path.realpath(path), path)
    return sorted(seen.values())


_RUNTIME_CHILD = r"""
import mmap, sys
import numpy as np
from flexkv.layout import ChunkTable
from flexkv.native import cudacopy
from flexkv.native.cudacopy import CopyPath, CudaCopyEngine
from flexkv.types import OpType

ok, why = cudacopy.cuda_available()
if not ok:
    print("UNAVAILABLE", why)
    sys.exit(0)
chunk, nblocks, nchunks = 32 << 10, 256, 2
total = chunk * nblocks * nchunks
rng = np.random.default_rng(3)
src = rng.integers(0, 256, total, dtype=np.uint8)
back = np.zeros(total, dtype=np.uint8)
pool_mm = mmap.mmap(-1, total)
pool = np.frombuffer(pool_mm, dtype=np.uint8)
dev = cudacopy.device_alloc(0, total)
with CudaCopyEngine(0, CopyPath.BATCH) as eng:
    eng.register_host(pool.ctypes.data, total)
    cudacopy.memcpy_sync(0, dev, src.ctypes.data, total)
    table = ChunkTable(np.array([dev, dev + chunk * nblocks], dtype=np.uint64), chunk, chunk, nblocks)
    offs = np.array([0, chunk], dtype=np.uint64)
    eng_ids = rng.permutation(nblocks).astype(np.int64)
    pool_ids = rng.permutation(nblocks).astype(np.int64)
    eng.stats()
    eng.copy_blocks(OpType.D2H, table, pool.ctypes.data, 2 * chunk, offs, nblocks, eng_ids, pool_ids)
    eng.synchronize()
    s = eng.stats()
    want = src.reshape(nchunks, nblocks, chunk)[:, eng_ids].transpose(1, 0, 2)
    d2h_ok = np.array_equal(pool.reshape(nblocks, nchunks, chunk)[pool_ids], want)
    cudacopy.memcpy_sync(0, dev, back.ctypes.data, total)  # zero the device copy
    eng.copy_blocks(OpType.H2D, table, pool.ctypes.data, 2 * chunk, offs, nblocks, eng_ids, pool_ids)
    eng.synchronize()
    cudacopy.memcpy_sync(0, back.ctypes.data, dev, total)
    h2d_ok = np.array_equal(back, src)
    i = eng.info
    print("RESULT", i.runtime_version, int(i.has_batch_api), s.num_batch_calls, s.num_copies, int(d2h_ok), int(h2d_ok))
    eng.unregister_host()
cudacopy.device_free(0, dev)
"""


@gpu
def test_batch_copies_are_byte_exact_with_every_cuda_runtime_installed() -> None:
    """cudaMemcpyBatchAsync has one ABI in 12.8/12.9 and another in 13.x: run the BATCH path with
    each libcudart found here, in a fresh process (no torch, so the runtime named is the one used)."""
    import subprocess
    import sys

    runtimes = _installed_cudarts()
    assert runtimes, "torch has CUDA but no libcudart file was found"
    tested = []
    for path in runtimes:
        env = {**os.environ, "FLEXKV_CUDART": path, "PYTHONPATH": os.pathsep.join(sys.path)}
        r = subprocess.run([sys.executable, "-c", _RUNTIME_CHILD], env=env, capture_output=True, text=True,
                           timeout=120)
        out = (r.stdout + r.stderr).strip()
        print(f"{path}: {out.splitlines()[-1] if out else r.returncode}")
        assert r.returncode == 0, out[-2000:]
        if out.startswith("UNAVAILABLE"):
            assert "35" in out or "driver" in out, out  # a runtime newer than the driver: refused cleanly
            continue
        rt, has_batch, calls, copies, d2h_ok, h2d_ok = (int(x) for x in out.split("RESULT")[1].split())
        assert d2h_ok and h2d_ok, f"{path} (runtime {rt}): bytes differ"
        assert rt >= 11000, f"{path}: runtime version {rt} not read"
        assert bool(has_batch) == (rt >= 12080) and (calls > 0) == bool(has_batch), out
        assert copies > 256, out  # 2 x 256 chunks that do not coalesce: many copies per batch call
        tested.append(rt)
    print(f"runtimes exercised: {sorted(set(tested))}; batch ABI: "
          f"{sorted({'v13' if v >= 13000 else 'v12.8' if v >= 12080 else 'none' for v in tested})}")
    assert tested, "no runtime could run here"

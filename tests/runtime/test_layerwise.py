"""Layer-wise GET (DESIGN.md §7b, docs/layerwise.md): an H2D lands layer by layer and the engine waits per layer.

The ordering test drives the real device-worker code (``start_layer_major`` with the real host copy
backend) in this process and checks the engine's buffers at every progress store; the others go
through the whole stack (KVManager -> server -> device worker process -> shared memory), with the
engine's KV in host shared memory and, where there is a GPU, in CUDA tensors (the GPU worker's
per-layer events; run by ``benchmarks/gpu_e2e_check.sh layerwise``).
"""

from __future__ import annotations

import glob
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from flexkv.client import HostKVBuffers, KVTPClient
from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.kvmanager import KVManager
from flexkv.layerwise import NUM_SLOTS, LayerProgress, LayerState, layer_groups, pack, unpack
from flexkv.layout import BlockFirstLayout, KVCacheLayout, LayoutKind
from flexkv.native import cudacopy
from flexkv.shm import SharedPool, make_pool_name
from flexkv.types import InvalidRequest, OpType, TaskStatus
from flexkv.workers.base import Op
from flexkv.workers.device_worker import HostCopyBackend
from flexkv.workers.layerwise_copy import LAYER_MAJOR_MIN_BLOCKS, start_layer_major
from tests.runtime.kvtest import T, host_buffers, needs_ssd_tier, poison, slots_for, tokens

pytestmark = pytest.mark.timeout(120)

MODEL = ModelConfig(num_layers=6, num_kv_heads=4, head_size=16, dtype="float16")  # 8 KiB blocks (O_DIRECT)
LAYOUT = LayoutKind.SGLANG
# flexkv.native.blockids: the one wording both copy backends use for a bad block id.
OUT_OF_RANGE = "engine_ids[{i}] = {v} out of range [0, {n}); nothing was copied"


def layer_bytes(bufs: HostKVBuffers, block_id: int, layer: int) -> bytes:
    lay = bufs.layout
    out = []
    for kv in range(lay.kv_dim):
        t, off = lay.chunk_offset(layer, kv, block_id)
        out.append(bufs.arrays[t].reshape(-1).view(np.uint8)[off: off + lay.chunk_bytes].tobytes())
    return b"".join(out)


def test_words_pack_and_never_describe_another_task() -> None:
    assert unpack(pack(7, 3), 7) == LayerState(3, False)
    assert unpack(pack(7, 0, failed=True), 7) == LayerState(0, True)
    assert unpack(pack(7 + NUM_SLOTS, 5), 7) is None, "a slot reused by another task is no news"
    assert unpack(0, 7) is None
    with pytest.raises(ValueError):
        pack(0, 1)


class _Rank:
    """What the copy code reads off a device worker: its pool, shard and backend (all real)."""

    def __init__(self, pool: SharedPool, bufs: HostKVBuffers) -> None:
        bf = BlockFirstLayout(MODEL, T)
        self.model, self.layout = MODEL, bufs.layout
        self.pool, self.pool_block_bytes, self.pool_num_blocks = pool, bf.block_bytes, 16
        self.shard_offsets = bf.shard_chunk_offsets(0)
        reg = {"host_segment": bufs.segment.name, "tensor_offsets": bufs.offsets}
        self.backend = HostCopyBackend(self, bufs.layout, reg)  # type: ignore[arg-type]

    def _error(self, op_type: OpType, e: Exception) -> str:
        return f"{op_type.name}: {type(e).__name__}: {e}"


class _Recording(LayerProgress):
    """A real table that also records, at every store, which layers of ``dst`` hold the pool's bytes."""

    def __init__(self, inner: LayerProgress, bufs: HostKVBuffers, dst: list[int], want: dict[tuple[int, int], bytes]):
        self.__dict__.update(inner.__dict__)
        self.bufs, self.dst, self.want = bufs, dst, want
        self.seen: list[tuple[int, LayerState, list[bool]]] = []

    def store(self, task_id: int, num_layers_landed: int, failed: bool = False) -> None:
        exact = [all(layer_bytes(self.bufs, d, layer) == self.want[d, layer] for d in self.dst)
                 for layer in range(MODEL.num_layers)]
        super().store(task_id, num_layers_landed, failed)
        self.seen.append((task_id, LayerState(num_layers_landed, failed), exact))


@pytest.mark.parametrize("layers_per_call", [1, 4])
def test_the_worker_copies_layer_major_and_publishes_each_layer_after_its_bytes(layers_per_call: int) -> None:
    bf = BlockFirstLayout(MODEL, T)
    pool = SharedPool.create(make_pool_name("test"), 16 * bf.block_bytes)
    bufs = host_buffers(MODEL, LAYOUT, 8, seed=3)
    table = LayerProgress.create("test")
    try:
        rank = _Rank(pool, bufs)
        rank.backend.layers_per_call = layers_per_call  # the CUDA backend's spans of several layers a call
        pool.buffer[:] = np.random.default_rng(4).integers(0, 256, pool.nbytes, dtype=np.uint8)
        src, dst = [5, 9, 2], [1, 6, 3]
        want = {}
        for s, d in zip(src, dst, strict=True):
            base = s * bf.block_bytes
            for layer in range(MODEL.num_layers):
                off = base + bf.chunk_offset(layer, 0, 0)
                want[d, layer] = pool.buffer[off: off + 2 * bf.chunk_bytes].tobytes()
        poison(bufs, dst)
        rec = _Recording(table, bufs, dst, want)
        op = Op(1, OpType.H2D, np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64), None, task_id=42)
        errors = start_layer_major(rank, [op], rec)()  # type: ignore[arg-type]
        assert errors == [""]
        spans = layer_groups(MODEL.num_layers, layers_per_call)
        assert [s.num_layers_landed for _, s, _ in rec.seen] == [0] + [first + count for first, count in spans]
        assert layers_per_call == 1 or len(spans) < MODEL.num_layers
        for _, state, exact in rec.seen:
            n = state.num_layers_landed
            assert exact == [layer < n for layer in range(MODEL.num_layers)], \
                f"at the store of {n} layers only layers < {n} may have landed: {exact}"
        assert table.read(42) == LayerState(MODEL.num_layers, False)

        bad = Op(2, OpType.H2D, np.array([1], dtype=np.int64), np.array([99], dtype=np.int64), None, task_id=43)
        errors = start_layer_major(rank, [bad], table)()  # type: ignore[arg-type]
        assert errors[0].endswith(OUT_OF_RANGE.format(i=0, v=99, n=8)), errors
        assert table.read(43) == LayerState(0, True)
    finally:
        table.close()
        bufs.close()
        pool.close()
        pool.unlink()


def _cuda_why() -> str:
    ok, why = cudacopy.cuda_available()
    if not ok:
        return f"no CUDA here: {why}"
    import torch

    return "" if torch.cuda.is_available() else "torch has no CUDA"


NO_CUDA_WHY = _cuda_why()
# "cuda-lane": CUDA tensors whose device worker runs as an engine-side lane in this process
DEVICES = ["cpu"] + [pytest.param(d, marks=pytest.mark.skipif(bool(NO_CUDA_WHY), reason=NO_CUDA_WHY or "-"))
                     for d in ("cuda", "cuda-lane")]


class _Engine:
    """One rank's KV as torch tensors: host shared memory (``cpu``), CUDA tensors registered by IPC
    (``cuda``) or CUDA tensors copied by an engine-side lane in this process (``cuda-lane``)."""

    def __init__(self, device: str, num_blocks: int) -> None:
        import torch

        self.torch = torch
        self.engine_side = device == "cuda-lane"
        self.host = host_buffers(MODEL, LAYOUT, num_blocks, seed=11) if device == "cpu" else None
        if self.host is not None:
            self.tensors = self.host.torch_tensors()
        else:
            lay = self.layout = host_layout(num_blocks)
            gen = torch.Generator(device="cuda").manual_seed(11)
            self.tensors = [torch.randint(0, 256, (lay.tensor_bytes(i),), dtype=torch.uint8, device="cuda",
                                          generator=gen).view(torch.float16).view(lay.tensor_shape(i))
                            for i in range(lay.num_tensors)]
            torch.cuda.synchronize()
        self.layout = self.host.layout if self.host is not None else self.layout

    def register(self, kvm: KVManager, layerwise: bool) -> None:
        kvm.register_kv_buffers(self.host if self.host is not None else self.tensors, self.layout, layerwise=layerwise,
                                engine_side=self.engine_side)

    def layer_bytes(self, block_id: int, layer: int) -> bytes:
        out = []
        for kv in (0, 1):
            rows = self.tensors[2 * layer + kv][block_id * T:(block_id + 1) * T]
            out.append(rows.contiguous().view(self.torch.uint8).cpu().numpy().tobytes())
        return b"".join(out)

    def poison(self, block_ids: list[int]) -> None:
        for t in self.tensors:
            for b in block_ids:
                t[b * T:(b + 1) * T].view(self.torch.uint8).fill_(0xAB)
        if self.host is None:
            self.torch.cuda.synchronize()

    def close(self) -> None:
        self.tensors = []
        if self.host is not None:
            self.host.close()


def host_layout(num_blocks: int) -> KVCacheLayout:
    return KVCacheLayout(LAYOUT, MODEL.num_layers, num_blocks, T, MODEL.num_kv_heads, MODEL.head_size,
                         MODEL.itemsize)


def _serve(cache: CacheConfig, device: str = "cpu", num_blocks: int = 32,
           layerwise: bool = True) -> tuple[KVManager, _Engine]:
    kvm = KVManager(MODEL, cache)
    kvm.start()
    eng = _Engine(device, num_blocks)
    eng.register(kvm, layerwise)
    return kvm, eng


def _put(kvm: KVManager, toks: np.ndarray, blocks: list[int]) -> None:
    tid = kvm.put_async(toks, slots_for(blocks, len(toks)))
    assert kvm.wait(tid, timeout=30, completely=True)[tid].status is TaskStatus.SUCCESS


@pytest.mark.parametrize("device", DEVICES)
def test_every_layer_wait_returns_with_that_layers_bytes_in_place(device: str) -> None:
    kvm, eng = _serve(CacheConfig(tokens_per_block=T, num_cpu_blocks=64), device, num_blocks=40)
    try:
        n = LAYER_MAJOR_MIN_BLOCKS  # (a smaller GET copies whole: every layer lands at once)
        toks = tokens(n * T, seed=1)
        src = list(range(n))
        _put(kvm, toks, src)
        want = {(s, layer): eng.layer_bytes(s, layer) for s in src for layer in range(MODEL.num_layers)}
        for round_ in range(3):
            dst = list(range(20 + round_, 20 + n + round_))
            eng.poison(dst)
            tid, mask = kvm.get_match(toks)
            assert mask.all()
            kvm.launch(tid, slots_for(dst, len(toks)), layerwise=True)
            for layer in range(MODEL.num_layers):
                res = kvm.wait_layer(tid, layer, timeout=30)
                assert res.status is TaskStatus.SUCCESS, res
                for s, d in zip(src, dst, strict=True):
                    assert eng.layer_bytes(d, layer) == want[s, layer], f"layer {layer} of block {d}"
            assert kvm.wait(tid, timeout=30)[tid].status is TaskStatus.SUCCESS
        # a miss moves nothing: every layer wait returns SUCCESS from the task's final status
        tid, mask = kvm.get_match(tokens(4 * T, seed=99))
        assert not mask.any()
        kvm.launch(tid, slots_for(list(range(4)), 4 * T), layerwise=True)
        assert kvm.wait_layer(tid, MODEL.num_layers - 1, timeout=30).status is TaskStatus.SUCCESS
        assert kvm.wait(tid)[tid].status is TaskStatus.SUCCESS
        kvm.check_invariants()
    finally:
        kvm.shutdown()
        eng.close()


@pytest.mark.parametrize("device", DEVICES)
def test_gets_launched_together_layer_wise_are_one_op_that_publishes_every_tasks_layers(device: str) -> None:
    """A batch of layer-wise GETs is one H2D per rank worker, copied layer-major over all its blocks;
    after each layer every task's own word says so (issue 17 §2: layer-wise batches are supported)."""
    kvm, eng = _serve(CacheConfig(tokens_per_block=T, num_cpu_blocks=64), device)
    try:
        prompts = [tokens(4 * T, seed=30 + i) for i in range(3)]
        src = [list(range(4 * i, 4 * i + 4)) for i in range(3)]
        for toks, blocks in zip(prompts, src, strict=True):
            _put(kvm, toks, blocks)
        want = {(s, layer): eng.layer_bytes(s, layer) for blocks in src for s in blocks
                for layer in range(MODEL.num_layers)}
        dst = [list(range(16 + 4 * i, 20 + 4 * i)) for i in range(3)]
        eng.poison([d for blocks in dst for d in blocks])
        ids = [kvm.get_match(p)[0] for p in prompts]
        ops_before = int(kvm.stats().get("ops:device-0-0", 0))
        kvm.launch(ids, [slots_for(d, 4 * T) for d in dst], layerwise=True)
        for layer in range(MODEL.num_layers):
            for tid, s_blocks, d_blocks in zip(ids, src, dst, strict=True):
                res = kvm.wait_layer(tid, layer, timeout=30)
                assert res.status is TaskStatus.SUCCESS, res
                for s, d in zip(s_blocks, d_blocks, strict=True):
                    assert eng.layer_bytes(d, layer) == want[s, layer], f"layer {layer} of block {d}"
        [table] = kvm._layer_tables()
        # Each task's own word was stored by the worker (not only the batch's first task's): wait_layer
        # did not fall back to the tasks' final status.
        assert [table.read(tid) for tid in ids] == [LayerState(MODEL.num_layers, False)] * 3
        assert all(r.status is TaskStatus.SUCCESS for r in kvm.wait(ids, timeout=30).values())
        # A layer-wise wait ends from the tables, before the server hears the worker's completion (CI saw
        # the count read one message early): count the ops once the server has none in flight.
        deadline = time.monotonic() + 30
        while (stats := kvm.stats())["in_flight_ops"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert int(stats["ops:device-0-0"]) - ops_before == 1, "one batched H2D for the three gets"
        kvm.check_invariants()
    finally:
        kvm.shutdown()
        eng.close()


def _wait_all_layers(kvm: KVManager, tid: int) -> list[tuple[TaskStatus, str]]:
    out: list[tuple[TaskStatus, str]] = [(TaskStatus.NOTFOUND, "")] * MODEL.num_layers

    def waiter(layer: int) -> None:
        res = kvm.wait_layer(tid, layer, timeout=60)
        out[layer] = (res.status, res.error)
    threads = [threading.Thread(target=waiter, args=(layer,)) for layer in range(MODEL.num_layers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_a_failed_copy_wakes_every_layer_waiter_with_the_error(device: str) -> None:
    kvm, eng = _serve(CacheConfig(tokens_per_block=T, num_cpu_blocks=64), device, num_blocks=16)
    try:
        toks = tokens(4 * T, seed=2)
        _put(kvm, toks, [0, 1, 2, 3])
        tid, _ = kvm.get_match(toks)
        kvm.launch(tid, slots_for([4, 5, 6, 400], len(toks)), layerwise=True)  # block 400 is past the buffers
        results = _wait_all_layers(kvm, tid)
        assert all(st is TaskStatus.FAILED for st, _ in results), results
        # One wording whichever backend (host or CUDA) rejected the id: index, value, range.
        assert all(err.endswith(OUT_OF_RANGE.format(i=3, v=400, n=16)) for _, err in results), results
        assert kvm.wait(tid)[tid].status is TaskStatus.FAILED
        kvm.check_invariants()
    finally:
        kvm.shutdown()
        eng.close()


def test_a_get_failing_before_its_copy_wakes_every_layer_waiter(tmp_path: Path) -> None:
    needs_ssd_tier()
    dirs = [tmp_path / "nvme0"]
    dirs[0].mkdir()
    cache = CacheConfig(tokens_per_block=T, num_cpu_blocks=8, enable_ssd=True, num_ssd_blocks=64,
                        ssd_cache_dir=tuple(str(d) for d in dirs))
    kvm, eng = _serve(cache)
    try:
        prompt = tokens(6 * T, seed=5)
        _put(kvm, prompt, list(range(6)))
        _put(kvm, tokens(6 * T, seed=6), list(range(6, 12)))  # evicts the first prompt from the CPU tier
        for f in glob.glob(str(tmp_path / "nvme*" / "*")):
            if not f.endswith(".json"):
                os.truncate(f, 0)  # the drive loses its data: the DISK2H read fails
        tid, mask = kvm.get_match(prompt)
        assert mask.any()
        kvm.launch(tid, slots_for(list(range(16, 22)), len(prompt)), layerwise=True)
        results = _wait_all_layers(kvm, tid)
        assert all(st is TaskStatus.FAILED and "DISK2H" in err for st, err in results), results
        kvm.check_invariants()
    finally:
        kvm.shutdown()
        eng.close()


def test_layerwise_misuse_is_a_clear_error() -> None:
    kvm, eng = _serve(CacheConfig(tokens_per_block=T, num_cpu_blocks=16), layerwise=False)
    try:
        toks = tokens(2 * T, seed=3)
        tid, _ = kvm.get_match(toks)
        with pytest.raises(InvalidRequest, match="layerwise=True"):
            kvm.launch(tid, slots_for([0, 1], len(toks)), layerwise=True)
        kvm.launch(tid, slots_for([0, 1], len(toks)))
        with pytest.raises(InvalidRequest, match="not launched with layerwise"):
            kvm.wait_layer(tid, 0)
        kvm.wait(tid)
    finally:
        kvm.shutdown()
        eng.close()
    kvm, eng = _serve(CacheConfig(tokens_per_block=T, num_cpu_blocks=16))
    try:
        tid, _ = kvm.get_match(tokens(2 * T, seed=3))
        kvm.launch(tid, slots_for([0, 1], 2 * T), layerwise=True)
        with pytest.raises(InvalidRequest, match="layer_index"):
            kvm.wait_layer(tid, MODEL.num_layers)
        kvm.wait(tid)
    finally:
        kvm.shutdown()
        eng.close()


def test_a_tp_client_waits_for_its_own_rank_layer_by_layer() -> None:
    """Ranks in other processes than the manager (vLLM's workers) wait on their own KVTPClient."""
    kvm = KVManager(MODEL, CacheConfig(tokens_per_block=T, num_cpu_blocks=64))
    kvm.start()
    eng = _Engine("cpu", 32)
    tp = KVTPClient(kvm.server_address)
    try:
        tp.register(eng.host, eng.layout, layerwise=True)  # type: ignore[arg-type]
        toks = tokens(6 * T, seed=8)
        src, dst = list(range(6)), list(range(10, 16))
        _put(kvm, toks, src)
        want = {(s, layer): eng.layer_bytes(s, layer) for s in src for layer in range(MODEL.num_layers)}
        eng.poison(dst)
        tid, _ = kvm.get_match(toks)
        kvm.launch(tid, slots_for(dst, len(toks)), layerwise=True)  # copied layer by layer for the rank's waits
        with pytest.raises(InvalidRequest, match="every TP rank"):
            kvm.wait_layer(tid, 0)  # this manager cannot watch the rank
        for layer in range(MODEL.num_layers):
            assert tp.wait_layer(tid, layer, timeout=30).status is TaskStatus.SUCCESS
            assert all(eng.layer_bytes(d, layer) == want[s, layer] for s, d in zip(src, dst, strict=True))
        assert kvm.wait(tid)[tid].status is TaskStatus.SUCCESS
        assert tp.wait_layer(tid + 1000, 0, timeout=0.2).status is TaskStatus.TIMEOUT, "no news is not SUCCESS"
    finally:
        tp.close()
        kvm.shutdown()
        eng.close()


def test_an_engine_side_lane_publishes_layers_too() -> None:
    """KV memory private to the engine (its device worker runs as a thread here) lands layer by layer."""
    import torch

    kvm = KVManager(MODEL, CacheConfig(tokens_per_block=T, num_cpu_blocks=64))
    kvm.start()
    lay = host_layout(32)
    gen = torch.Generator().manual_seed(12)
    tensors = [torch.randint(-2**15, 2**15, lay.tensor_shape(i), dtype=torch.int16, generator=gen).view(torch.float16)
               for i in range(lay.num_tensors)]
    tp = KVTPClient(kvm.server_address)
    try:
        tp.register(tensors, lay, engine_side=True, layerwise=True)

        def layer(b: int, i: int) -> bytes:
            return b"".join(tensors[2 * i + kv][b * T:(b + 1) * T].view(torch.uint8).numpy().tobytes() for kv in (0, 1))
        toks = tokens(5 * T, seed=13)
        src, dst = list(range(5)), list(range(20, 25))
        _put(kvm, toks, src)
        want = {(s, i): layer(s, i) for s in src for i in range(MODEL.num_layers)}
        for t in tensors:
            t[20 * T:25 * T].view(torch.uint8).fill_(0xAB)
        tid, _ = kvm.get_match(toks)
        kvm.launch(tid, slots_for(dst, len(toks)))
        for i in range(MODEL.num_layers):
            assert tp.wait_layer(tid, i, timeout=30).status is TaskStatus.SUCCESS
            assert all(layer(d, i) == want[s, i] for s, d in zip(src, dst, strict=True)), f"layer {i}"
        assert kvm.wait(tid)[tid].status is TaskStatus.SUCCESS
    finally:
        tp.close()
        kvm.shutdown()


def test_a_later_manager_session_reusing_task_ids_never_reads_an_earlier_sessions_landing() -> None:
    """Task ids start over in every KVManager session, while a rank's KVTPClient (and its progress table)
    may outlive a session (server mode: the engine's manager reconnects). A new session's GET must not be
    reported landed from the word an earlier session's task of the same id left: its bytes are not there."""
    host = KVManager(MODEL, CacheConfig(tokens_per_block=T, num_cpu_blocks=64))
    host.start()  # owns the server; the managers below connect to it as an engine's would
    eng = _Engine("cpu", 32)
    tp = KVTPClient(host.server_address)
    try:
        tp.register(eng.host, eng.layout, layerwise=True)  # type: ignore[arg-type]
        src, dst = list(range(4)), list(range(10, 14))
        for session in range(3):
            kvm = KVManager(MODEL, CacheConfig(tokens_per_block=T, num_cpu_blocks=64),
                            server_address=host.server_address)
            kvm.start()
            try:
                toks = tokens(4 * T, seed=40 + session)  # a new prompt each session: new bytes to land
                _put(kvm, toks, src)
                want = {(s, layer): eng.layer_bytes(s, layer) for s in src for layer in range(MODEL.num_layers)}
                eng.poison(dst)
                tid, mask = kvm.get_match(toks)
                assert mask.all()
                kvm.launch(tid, slots_for(dst, len(toks)))
                last = MODEL.num_layers - 1
                assert tp.wait_layer(tid, last, timeout=30).status is TaskStatus.SUCCESS
                assert all(eng.layer_bytes(d, layer) == want[s, layer] for s, d in zip(src, dst, strict=True)
                           for layer in range(MODEL.num_layers)), \
                    f"session {session}: task {tid} reported landed before its bytes were in place"
                assert kvm.wait(tid)[tid].status is TaskStatus.SUCCESS
                # the next session's put/get reuse these task ids; its get must not land from this word
                for s in src:
                    for t in eng.tensors:
                        t[s * T:(s + 1) * T].view(eng.torch.uint8).fill_(session + 1)
            finally:
                kvm.shutdown()
    finally:
        tp.close()
        host.shutdown()
        eng.close()


@pytest.mark.parametrize("num_layers", [1, 2, 5, 6, 32, 33, 80])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_layer_groups_cover_every_layer_once_in_order_and_end_one_layer_at_a_time(num_layers: int, group: int) -> None:
    spans = layer_groups(num_layers, group)
    covered = [layer for first, count in spans for layer in range(first, first + count)]
    assert covered == list(range(num_layers))
    assert all(1 <= count <= group for _, count in spans)
    assert spans[-1][1] == 1, "the last layer is its own call: the engine's last layer waits for its bytes only"
    if num_layers >= 2 * group:
        assert len(spans) <= num_layers // group + group, spans

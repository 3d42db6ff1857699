"""Host copy engine: real bytes from engine tensors into block-first pool blocks and back.

Destinations are poisoned with 0xAB first; after each copy the whole destination is compared with an
expected array built by numpy indexing alone, so a byte written outside the target chunks fails the test.
"""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from flexkv.common.config import ModelConfig
from flexkv.layout import BlockFirstLayout, KVCacheLayout, LayoutKind, tensor_addresses
from flexkv.native.hostcopy import (
    MIN_BYTES_PER_THREAD,
    STREAM_MIN_BYTES,
    CopyDirection,
    buffer_address,
    copy_blocks,
)
from flexkv.types import InvalidRequest, OpType
from tests.test_layout import T, make_tensors

POISON = 0xABAB  # 0xAB in every byte of a uint16
ENGINE_KINDS = [LayoutKind.VLLM_KV_FIRST, LayoutKind.VLLM_BLOCK_FIRST, LayoutKind.SGLANG, LayoutKind.MLA,
                LayoutKind.BLOCK_FIRST]


class Engine:
    """One TP rank's KV tensors (uint16 stands in for bf16) and the numpy view of each chunk."""

    def __init__(self, kind: LayoutKind, num_layers: int, num_blocks: int, heads: int, head_size: int,
                 rng: np.random.Generator | None = None) -> None:
        self.kind, self.num_layers = kind, num_layers
        self.tensors = make_tensors(kind, num_layers, num_blocks, heads, head_size, rng or np.random.default_rng(0))
        if rng is None:
            for t in self.tensors:
                t.fill(POISON)
        self.layout = KVCacheLayout.from_tensors(kind, self.tensors, T)
        self.table = self.layout.chunk_table(tensor_addresses(self.tensors))

    def chunk(self, layer: int, kv: int, b: int) -> np.ndarray:
        """Writable numpy view of chunk (layer, kv, block b), by the engine's own indexing."""
        if self.kind is LayoutKind.VLLM_KV_FIRST:
            return self.tensors[layer][kv, b]
        if self.kind is LayoutKind.VLLM_BLOCK_FIRST:
            return self.tensors[layer][b, kv]
        if self.kind is LayoutKind.SGLANG:
            return self.tensors[2 * layer + kv][b * T:(b + 1) * T]
        if self.kind is LayoutKind.MLA:
            return self.tensors[layer][b]
        return self.tensors[0][b, layer, kv]

    def copy(self) -> list[np.ndarray]:
        return [t.copy() for t in self.tensors]


class Pool:
    """Block-first pool blocks in a numpy buffer, seen as [NB, shard, layer, kv, T, H_shard, D]."""

    def __init__(self, model: ModelConfig, num_blocks: int, buf: np.ndarray | None = None) -> None:
        self.layout = BlockFirstLayout(model, T)
        self.num_blocks = num_blocks
        raw = np.empty((num_blocks, self.layout.block_bytes), np.uint8) if buf is None else buf
        raw.view(np.uint16)[...] = POISON
        self.raw = raw
        self.blocks = raw.view(np.uint16).reshape(num_blocks, model.num_shards, model.num_layers, model.kv_dim, T,
                                                  model.heads_per_shard, model.head_size)

    def put(self, engine: Engine, shard: int, engine_ids: list[int], pool_ids: list[int], threads: int = 2) -> None:
        copy_blocks(CopyDirection.TO_POOL, engine.table, buffer_address(self.raw), self.layout.block_bytes,
                    self.layout.shard_chunk_offsets(shard), self.num_blocks, np.array(engine_ids, np.int64),
                    np.array(pool_ids, np.int64), threads)

    def get(self, engine: Engine, shard: int, engine_ids: list[int], pool_ids: list[int], threads: int = 2) -> None:
        copy_blocks(CopyDirection.FROM_POOL, engine.table, buffer_address(self.raw), self.layout.block_bytes,
                    self.layout.shard_chunk_offsets(shard), self.num_blocks, np.array(engine_ids, np.int64),
                    np.array(pool_ids, np.int64), threads)


def model_for(kind: LayoutKind, tp_size: int = 1, num_layers: int = 3, heads: int = 4) -> ModelConfig:
    mla = kind is LayoutKind.MLA
    return ModelConfig(num_layers=num_layers, num_kv_heads=1 if mla else heads, head_size=8, dtype="bfloat16",
                       use_mla=mla, tp_size=tp_size)


def expect_pool_after_put(pool: Pool, engine: Engine, shard: int, engine_ids: list[int],
                          pool_ids: list[int], before: np.ndarray) -> np.ndarray:
    want = before.copy()
    for e, p in zip(engine_ids, pool_ids, strict=True):
        for layer in range(engine.num_layers):
            for kv in range(engine.layout.kv_dim):
                want[p, shard, layer, kv] = engine.chunk(layer, kv, e).reshape(want.shape[4:])
    return want


@pytest.mark.parametrize("kind", ENGINE_KINDS, ids=lambda k: k.value)
def test_round_trip_engine_to_pool_to_other_engine_slots(kind: LayoutKind) -> None:
    rng = np.random.default_rng(10)
    model = model_for(kind)
    src = Engine(kind, 3, 8, model.heads_per_shard, 8, rng)
    pool = Pool(model, 6)
    pool.layout.check_engine_layout(src.layout)

    # PUT: engine blocks 5, 0, 6 land in pool blocks 2, 4, 1; blocks 0, 3, 5 of the pool stay poisoned.
    before = pool.blocks.copy()
    pool.put(src, 0, [5, 0, 6], [2, 4, 1])
    assert np.array_equal(pool.blocks, expect_pool_after_put(pool, src, 0, [5, 0, 6], [2, 4, 1], before))
    assert np.all(pool.blocks[[0, 3, 5]] == POISON)

    # GET into another engine's slots 1, 7, 3: exactly those chunks change, each equal to its source chunk.
    dst = Engine(kind, 3, 8, model.heads_per_shard, 8)
    want = dst.copy()
    pool.get(dst, 0, [1, 7, 3], [2, 4, 1])
    expected = Engine.__new__(Engine)
    expected.kind, expected.num_layers, expected.tensors = kind, 3, want
    for e_src, e_dst in [(5, 1), (0, 7), (6, 3)]:
        for layer in range(3):
            for kv in range(src.layout.kv_dim):
                expected.chunk(layer, kv, e_dst)[...] = src.chunk(layer, kv, e_src)
    for got, exp in zip(dst.tensors, want, strict=True):
        assert np.array_equal(got, exp)


def test_tp2_ranks_fill_the_two_shards_of_the_same_pool_blocks() -> None:
    rng = np.random.default_rng(11)
    model = model_for(LayoutKind.VLLM_KV_FIRST, tp_size=2, heads=4)
    pool = Pool(model, 5)
    # Rank 0 has 6 GPU blocks, rank 1 has 9: num_blocks is per rank, the pool blocks are shared.
    ranks = [Engine(LayoutKind.VLLM_KV_FIRST, 3, nb, 2, 8, rng) for nb in (6, 9)]
    engine_ids = [[0, 5, 2], [8, 1, 4]]
    pool_ids = [3, 0, 4]
    before = pool.blocks.copy()
    for rank, engine in enumerate(ranks):
        pool.put(engine, rank, engine_ids[rank], pool_ids)
        before = expect_pool_after_put(pool, engine, rank, engine_ids[rank], pool_ids, before)
        assert np.array_equal(pool.blocks, before)
    assert np.all(pool.blocks[[1, 2]] == POISON)

    # One pool block now holds the whole model: rank 0's heads then rank 1's heads.
    full = np.concatenate([pool.blocks[3, 0, 2, 1], pool.blocks[3, 1, 2, 1]], axis=1)  # layer 2, V, [T, 4, D]
    assert np.array_equal(full, np.concatenate([ranks[0].chunk(2, 1, 0), ranks[1].chunk(2, 1, 8)], axis=1))

    # Reading back, each rank gets its own heads into fresh slots.
    for rank, nb in enumerate((6, 9)):
        fresh = Engine(LayoutKind.VLLM_KV_FIRST, 3, nb, 2, 8)
        pool.get(fresh, rank, [nb - 1, 0, 1], pool_ids)
        for e_src, e_dst in zip(engine_ids[rank], [nb - 1, 0, 1], strict=True):
            for layer in range(3):
                for kv in range(2):
                    assert np.array_equal(fresh.chunk(layer, kv, e_dst), ranks[rank].chunk(layer, kv, e_src))
        untouched = [b for b in range(nb) if b not in (nb - 1, 0, 1)]
        assert all(np.all(fresh.chunk(layer, kv, b) == POISON)
                   for b in untouched for layer in range(3) for kv in range(2))


def test_mla_ranks_share_one_latent_shard() -> None:
    rng = np.random.default_rng(12)
    model = model_for(LayoutKind.MLA, tp_size=2)
    pool = Pool(model, 4)
    assert pool.layout.num_shards == 1 and pool.layout.shard_of_rank(1) == 0
    writer = Engine(LayoutKind.MLA, 3, 5, 1, 8, rng)
    pool.put(writer, pool.layout.shard_of_rank(0), [4, 2], [1, 3])  # only rank 0 writes
    reader = Engine(LayoutKind.MLA, 3, 7, 1, 8)
    pool.get(reader, pool.layout.shard_of_rank(1), [6, 0], [1, 3])
    for layer in range(3):
        assert np.array_equal(reader.chunk(layer, 0, 6), writer.chunk(layer, 0, 4))
        assert np.array_equal(reader.chunk(layer, 0, 0), writer.chunk(layer, 0, 2))
        assert all(np.all(reader.chunk(layer, 0, b) == POISON) for b in range(1, 6))


@pytest.mark.parametrize("kind", [LayoutKind.VLLM_BLOCK_FIRST, LayoutKind.BLOCK_FIRST, LayoutKind.SGLANG],
                         ids=lambda k: k.value)
def test_threads_and_coalesced_runs_give_the_same_bytes(kind: LayoutKind) -> None:
    """Enough bytes for 8 threads of MIN_BYTES_PER_THREAD; consecutive ids merge chunks into long copies."""
    rng = np.random.default_rng(13)
    model = ModelConfig(num_layers=4, num_kv_heads=8, head_size=128, dtype="bfloat16")  # 8 KiB chunks
    nb, n = 140, 128
    assert n * BlockFirstLayout(model, T).block_bytes >= 8 * MIN_BYTES_PER_THREAD
    src = Engine(kind, 4, nb, 8, 128, rng)
    engine_ids = list(range(nb - n, nb))  # one run: block-first engines copy it as one region per shard
    pool_ids = list(range(n))
    pools = []
    for threads in (1, 3, 8):
        pool = Pool(model, n + 2)
        pool.put(src, 0, engine_ids, pool_ids, threads=threads)
        pools.append(pool.blocks)
    assert np.array_equal(pools[0], pools[1]) and np.array_equal(pools[0], pools[2])
    want = np.stack([np.stack([np.stack([src.chunk(layer, kv, e).reshape(-1) for kv in range(2)])
                               for layer in range(4)]) for e in engine_ids])
    assert np.array_equal(pools[0][:n].reshape(want.shape), want)
    assert np.all(pools[0][n:] == POISON)
    # Back into reversed slots with 4 threads: no run merges across blocks, every block lands right.
    dst = Engine(kind, 4, nb, 8, 128)
    pool.blocks[...] = pools[0]
    pool.get(dst, 0, engine_ids[::-1], pool_ids, threads=4)
    got = np.stack([np.stack([np.stack([dst.chunk(layer, kv, e).reshape(-1) for kv in range(2)])
                              for layer in range(4)]) for e in engine_ids[::-1]])
    assert np.array_equal(got, want)
    assert all(np.all(dst.chunk(layer, kv, b) == POISON) for b in range(nb - n) for layer in range(4)
               for kv in range(2))


def test_streaming_copies_handle_unaligned_pools_and_odd_chunk_sizes() -> None:
    """Over STREAM_MIN_BYTES the engine writes with non-temporal stores; misaligned ends must still be exact."""
    rng = np.random.default_rng(17)
    model = ModelConfig(num_layers=2, num_kv_heads=3, head_size=180, dtype="bfloat16")  # 4320-byte chunks
    layout = BlockFirstLayout(model, T)
    n = 80
    assert layout.chunk_bytes % 64 == 32 and n * layout.block_bytes >= STREAM_MIN_BYTES
    backing = np.empty(n * layout.block_bytes + 3, np.uint8)
    pool = Pool(model, n, backing[3:].reshape(n, -1))  # the pool starts 3 bytes past an aligned address
    src = Engine(LayoutKind.VLLM_KV_FIRST, 2, n, 3, 180, rng)
    engine_ids = list(rng.permutation(n)[:70])
    pool_ids = list(rng.permutation(n)[:70])
    before = pool.blocks.copy()
    pool.put(src, 0, engine_ids, pool_ids, threads=2)
    assert np.array_equal(pool.blocks, expect_pool_after_put(pool, src, 0, engine_ids, pool_ids, before))
    dst = Engine(LayoutKind.VLLM_KV_FIRST, 2, n, 3, 180)
    pool.get(dst, 0, pool_ids, pool_ids, threads=1)  # engine slot = pool slot, so data moved e -> p
    for e, p in zip(engine_ids, pool_ids, strict=True):
        assert np.array_equal(dst.chunk(1, 1, p), src.chunk(1, 1, e))
    assert all(np.all(dst.tensors[layer][:, b] == POISON) for b in set(range(n)) - set(pool_ids) for layer in range(2))


def test_out_of_range_ids_raise_and_copy_nothing() -> None:
    rng = np.random.default_rng(14)
    model = model_for(LayoutKind.VLLM_KV_FIRST)
    src = Engine(LayoutKind.VLLM_KV_FIRST, 3, 8, 4, 8, rng)
    pool = Pool(model, 4)
    with pytest.raises(InvalidRequest, match=r"engine_ids\[2\] = 8 out of range \[0, 8\)"):
        pool.put(src, 0, [0, 1, 8], [0, 1, 2])
    with pytest.raises(InvalidRequest, match=r"pool_ids\[0\] = -1 out of range \[0, 4\)"):
        pool.put(src, 0, [0, 1], [-1, 1])
    with pytest.raises(InvalidRequest, match=r"pool_ids\[1\] = 4 out of range"):
        pool.get(src, 0, [0, 1], [0, 4])
    assert np.all(pool.blocks == POISON)  # the valid ids before the bad one were not copied either


def test_bad_arguments_name_the_problem() -> None:
    model = model_for(LayoutKind.VLLM_KV_FIRST)
    src = Engine(LayoutKind.VLLM_KV_FIRST, 3, 8, 4, 8)
    pool = Pool(model, 4)
    addr, bb, offs = buffer_address(pool.raw), pool.layout.block_bytes, pool.layout.shard_chunk_offsets(0)
    ids = np.arange(2, dtype=np.int64)
    with pytest.raises(InvalidRequest, match="engine_ids must be a 1-D int64 numpy array, got int32"):
        copy_blocks(CopyDirection.TO_POOL, src.table, addr, bb, offs, 4, ids.astype(np.int32), ids)
    with pytest.raises(InvalidRequest, match="pool_ids must be a 1-D int64 numpy array, got list"):
        copy_blocks(CopyDirection.TO_POOL, src.table, addr, bb, offs, 4, ids, [0, 1])  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match=r"engine_ids \(2\) and pool_ids \(3\) differ in length"):
        copy_blocks(CopyDirection.TO_POOL, src.table, addr, bb, offs, 4, ids, np.arange(3, dtype=np.int64))
    with pytest.raises(InvalidRequest, match="pool_chunk_offsets must be uint64 of shape"):
        copy_blocks(CopyDirection.TO_POOL, src.table, addr, bb, offs[:-1], 4, ids, ids)
    last = 2 * bb - src.layout.chunk_bytes
    with pytest.raises(ValueError, match=rf"pool chunk offset {last} \+ chunk_bytes .* exceeds pool_block_bytes"):
        copy_blocks(CopyDirection.TO_POOL, src.table, addr, bb, offs + np.uint64(bb), 4, ids, ids)
    with pytest.raises(ValueError, match="num_threads must be in"):
        copy_blocks(CopyDirection.TO_POOL, src.table, addr, bb, offs, 4, ids, ids, num_threads=0)
    with pytest.raises(ValueError, match="must all be positive"):
        copy_blocks(CopyDirection.TO_POOL, src.table, 0, bb, offs, 4, ids, ids)
    assert np.all(pool.blocks == POISON)
    empty = np.empty(0, np.int64)
    copy_blocks(CopyDirection.TO_POOL, src.table, addr, bb, offs, 4, empty, empty)  # nothing to do is fine
    assert CopyDirection.from_op(OpType.D2H) is CopyDirection.TO_POOL
    assert CopyDirection.from_op(OpType.H2D) is CopyDirection.FROM_POOL
    with pytest.raises(ValueError, match="DISK2H is not a host copy"):
        CopyDirection.from_op(OpType.DISK2H)
    with pytest.raises(ValueError, match="H2DISK is not a host copy"):
        copy_blocks(OpType.H2DISK, src.table, addr, bb, offs, 4, ids, ids)


def test_op_types_name_the_same_directions() -> None:
    """OpType.D2H is 1 and CopyDirection.TO_POOL is 0: the op type must be translated, not cast."""
    rng = np.random.default_rng(16)
    model = model_for(LayoutKind.VLLM_BLOCK_FIRST)
    src = Engine(LayoutKind.VLLM_BLOCK_FIRST, 3, 4, 4, 8, rng)
    pool = Pool(model, 2)
    args = (buffer_address(pool.raw), pool.layout.block_bytes, pool.layout.shard_chunk_offsets(0), 2)
    copy_blocks(OpType.D2H, src.table, *args, np.array([3], np.int64), np.array([1], np.int64))
    assert np.array_equal(pool.blocks[1, 0, 2, 1], src.chunk(2, 1, 3))
    dst = Engine(LayoutKind.VLLM_BLOCK_FIRST, 3, 4, 4, 8)
    copy_blocks(OpType.H2D, dst.table, *args, np.array([0], np.int64), np.array([1], np.int64))
    assert np.array_equal(dst.tensors[2][0], src.tensors[2][3]) and np.all(dst.tensors[2][1:] == POISON)


def test_buffer_address_of_arrays_mmaps_and_read_only_buffers() -> None:
    arr = np.zeros(64, np.uint8)
    assert buffer_address(arr) == arr.ctypes.data
    assert buffer_address(arr[8:]) == arr.ctypes.data + 8
    with pytest.raises(TypeError, match="no contiguous writable buffer"):
        buffer_address(b"read only")
    assert buffer_address(b"read only", writable=False) > 0
    with pytest.raises(TypeError, match="no contiguous"):
        buffer_address(np.zeros((4, 4))[:, 1])
    m = mmap.mmap(-1, 4096)
    assert buffer_address(m) > 0
    m.close()  # the address lookup left no buffer export behind


def test_pool_in_posix_shared_memory_is_seen_by_a_second_mapping() -> None:
    """The real CPU tier: a POSIX shm segment; a put through one mapping is read through another."""
    posix_ipc = pytest.importorskip("posix_ipc")  # a dependency of flexkv; absent only on bare GPU images
    rng = np.random.default_rng(15)
    model = model_for(LayoutKind.SGLANG)
    layout = BlockFirstLayout(model, T)
    shm = posix_ipc.SharedMemory(None, posix_ipc.O_CREX, size=3 * layout.block_bytes)
    try:
        maps = [mmap.mmap(shm.fd, shm.size) for _ in range(2)]
        shm.close_fd()
        writer_view = np.frombuffer(maps[0], np.uint8).reshape(3, -1)
        reader_view = np.frombuffer(maps[1], np.uint8).reshape(3, -1)
        src = Engine(LayoutKind.SGLANG, 3, 5, 4, 8, rng)
        Pool(model, 3, writer_view).put(src, 0, [4, 3], [2, 0])
        dst = Engine(LayoutKind.SGLANG, 3, 5, 4, 8)
        copy_blocks(CopyDirection.FROM_POOL, dst.table, buffer_address(reader_view), layout.block_bytes,
                    layout.shard_chunk_offsets(0), 3, np.array([0, 1], np.int64), np.array([2, 0], np.int64))
        for layer in range(3):
            for kv in range(2):
                assert np.array_equal(dst.chunk(layer, kv, 0), src.chunk(layer, kv, 4))
                assert np.array_equal(dst.chunk(layer, kv, 1), src.chunk(layer, kv, 3))
        del writer_view, reader_view
        for m in maps:
            m.close()
    finally:
        shm.unlink()

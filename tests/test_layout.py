"""Layouts: every offset the layout computes points at the bytes numpy says belong to that chunk.

Each scenario builds real arrays in the engine's shape filled with random data, asks the layout where
chunk (layer, kv, block) lives, and compares the bytes found there with the numpy slice of that chunk.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexkv.common.config import ModelConfig
from flexkv.layout import BlockFirstLayout, ChunkTable, KVCacheLayout, LayoutKind, tensor_addresses

T = 4
ENGINE_KINDS = [LayoutKind.VLLM_KV_FIRST, LayoutKind.VLLM_BLOCK_FIRST, LayoutKind.SGLANG, LayoutKind.MLA,
                LayoutKind.BLOCK_FIRST]


def make_tensors(kind: LayoutKind, num_layers: int, num_blocks: int, heads: int, head_size: int,
                 rng: np.random.Generator) -> list[np.ndarray]:
    """Random uint16 tensors in the shape an engine of ``kind`` allocates (written out by hand, not by the layout)."""
    nb, h, d = num_blocks, heads, head_size
    shape, count = {
        LayoutKind.VLLM_KV_FIRST: ((2, nb, T, h, d), num_layers),
        LayoutKind.VLLM_BLOCK_FIRST: ((nb, 2, T, h, d), num_layers),
        LayoutKind.SGLANG: ((nb * T, h, d), 2 * num_layers),
        LayoutKind.MLA: ((nb, T, d), num_layers),
        LayoutKind.BLOCK_FIRST: ((nb, num_layers, 2, T, h, d), 1),
    }[kind]
    return [rng.integers(0, 1 << 16, size=shape, dtype=np.uint16) for _ in range(count)]


def ref_chunk(kind: LayoutKind, tensors: list[np.ndarray], layer: int, kv: int, b: int) -> np.ndarray:
    """The numpy slice that IS chunk (layer, kv, block b) in the engine's own indexing."""
    if kind is LayoutKind.VLLM_KV_FIRST:
        return tensors[layer][kv, b]
    if kind is LayoutKind.VLLM_BLOCK_FIRST:
        return tensors[layer][b, kv]
    if kind is LayoutKind.SGLANG:
        return tensors[2 * layer + kv][b * T:(b + 1) * T]
    if kind is LayoutKind.MLA:
        return tensors[layer][b]
    return tensors[0][b, layer, kv]


def bytes_at(tensor: np.ndarray, offset: int, length: int) -> bytes:
    return tensor.reshape(-1).view(np.uint8)[offset:offset + length].tobytes()


def bytes_at_address(tensors: list[np.ndarray], address: int, length: int) -> bytes:
    """Read ``length`` bytes at a raw address that must fall inside one of ``tensors``."""
    for t in tensors:
        start = t.ctypes.data
        if start <= address and address + length <= start + t.nbytes:
            return bytes_at(t, address - start, length)
    raise AssertionError(f"address {address:#x} (+{length}) is outside every tensor")


@pytest.mark.parametrize("kind", ENGINE_KINDS, ids=lambda k: k.value)
def test_every_chunk_offset_points_at_the_numpy_slice(kind: LayoutKind) -> None:
    rng = np.random.default_rng(1)
    heads = 1 if kind is LayoutKind.MLA else 3
    tensors = make_tensors(kind, num_layers=3, num_blocks=5, heads=heads, head_size=8, rng=rng)
    layout = KVCacheLayout.from_tensors(kind, tensors, tokens_per_block=T)
    assert (layout.num_layers, layout.num_blocks, layout.num_heads, layout.head_size) == (3, 5, heads, 8)
    assert layout.num_tensors == len(tensors) and layout.itemsize == 2
    assert layout.chunk_bytes == T * heads * 8 * 2
    assert all(layout.tensor_shape(i) == t.shape and layout.tensor_bytes(i) == t.nbytes
               for i, t in enumerate(tensors))

    # The engine registers its tensors; the table alone must locate every chunk by address.
    table = layout.chunk_table(tensor_addresses(tensors))
    assert table.bases.shape == (3 * layout.kv_dim,) and table.num_blocks == 5
    for layer in range(3):
        for kv in range(layout.kv_dim):
            for b in range(5):
                want = ref_chunk(kind, tensors, layer, kv, b)
                assert want.nbytes == layout.chunk_bytes
                ti, off = layout.chunk_offset(layer, kv, b)
                assert bytes_at(tensors[ti], off, layout.chunk_bytes) == want.tobytes()
                addr = int(table.bases[layer * layout.kv_dim + kv]) + b * table.block_stride
                assert bytes_at_address(tensors, addr, table.chunk_bytes) == want.tobytes()


def test_tp_ranks_may_own_different_block_counts_and_share_one_pool_layout() -> None:
    model = ModelConfig(num_layers=2, num_kv_heads=4, head_size=8, dtype="float16", tp_size=2)
    pool = BlockFirstLayout(model, T)
    rng = np.random.default_rng(2)
    rank_blocks = [6, 9]  # rank 1 was given more GPU memory
    for rank, nb in enumerate(rank_blocks):
        tensors = make_tensors(LayoutKind.VLLM_KV_FIRST, 2, nb, heads=2, head_size=8, rng=rng)
        layout = KVCacheLayout.from_tensors(LayoutKind.VLLM_KV_FIRST, tensors, T)
        assert layout.num_blocks == nb and layout.num_heads == model.heads_per_shard
        pool.check_engine_layout(layout)  # both ranks fit the same pool
        assert pool.shard_of_rank(rank) == rank
        ti, off = layout.chunk_offset(1, 1, nb - 1)
        assert bytes_at(tensors[ti], off, layout.chunk_bytes) == tensors[1][1, nb - 1].tobytes()


@pytest.mark.parametrize("use_mla,tp_size", [(False, 1), (False, 2), (False, 4), (True, 2)])
def test_block_first_offsets_match_a_numpy_block_array(use_mla: bool, tp_size: int) -> None:
    heads = 1 if use_mla else 4
    model = ModelConfig(num_layers=3, num_kv_heads=heads, head_size=8, dtype="bfloat16", use_mla=use_mla,
                        tp_size=tp_size)
    layout = BlockFirstLayout(model, T)
    shards, kv_dim, hs = model.num_shards, model.kv_dim, model.heads_per_shard
    assert layout.num_shards == (1 if use_mla else tp_size)
    assert layout.block_bytes == model.block_bytes(T) and layout.chunk_bytes == model.chunk_bytes(T)
    nb = 3
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 1 << 16, size=(nb, shards, 3, kv_dim, T, hs, 8), dtype=np.uint16)
    raw = ref.reshape(nb, -1).view(np.uint8)
    assert raw.shape == (nb, layout.block_bytes)
    for shard in range(shards):
        offsets = layout.shard_chunk_offsets(shard)
        assert offsets.dtype == np.uint64 and offsets.shape == (3 * kv_dim,)
        for layer in range(3):
            for kv in range(kv_dim):
                off = layout.chunk_offset(layer, kv, shard)
                assert int(offsets[layer * kv_dim + kv]) == off
                for b in range(nb):
                    got = raw[b, off:off + layout.chunk_bytes].tobytes()
                    assert got == ref[b, shard, layer, kv].tobytes()
    # Each shard's part of a block is one contiguous region: its chunks tile [shard*S, (shard+1)*S).
    for shard in range(shards):
        offs = np.sort(layout.shard_chunk_offsets(shard))
        assert int(offs[0]) == shard * layout.shard_bytes
        assert np.all(np.diff(offs) == layout.chunk_bytes)


def test_from_shapes_names_the_tensor_and_the_expected_shape() -> None:
    good = [(2, 5, T, 2, 8)] * 3
    layout = KVCacheLayout.from_shapes(LayoutKind.VLLM_KV_FIRST, good, 2, T)
    assert layout.num_layers == 3

    with pytest.raises(ValueError, match=r"tensor 2 has shape \(2, 6, 4, 2, 8\), expected \(2, 5, 4, 2, 8\)"):
        KVCacheLayout.from_shapes(LayoutKind.VLLM_KV_FIRST, [*good[:2], (2, 6, T, 2, 8)], 2, T)
    with pytest.raises(ValueError, match=r"tensor 0 has shape .* expected vllm_block_first shape"):
        KVCacheLayout.from_shapes(LayoutKind.VLLM_BLOCK_FIRST, good, 2, T)  # kv-first shapes, wrong kind
    with pytest.raises(ValueError, match="with T=8"):
        KVCacheLayout.from_shapes(LayoutKind.VLLM_KV_FIRST, good, 2, 8)  # tokens per block disagree
    with pytest.raises(ValueError, match=r"needs K and V per layer .*got 3 tensors"):
        KVCacheLayout.from_shapes(LayoutKind.SGLANG, [(5 * T, 2, 8)] * 3, 2, T)  # a V tensor is missing
    with pytest.raises(ValueError, match=r"expected sglang shape \[num_blocks\*T, H, D\]"):
        KVCacheLayout.from_shapes(LayoutKind.SGLANG, [(5 * T + 1, 2, 8)] * 2, 2, T)  # not whole pages
    with pytest.raises(ValueError, match="at least one tensor"):
        KVCacheLayout.from_shapes(LayoutKind.MLA, [], 2, T)
    with pytest.raises(ValueError, match="one latent head"):
        KVCacheLayout(LayoutKind.MLA, 2, 5, T, 4, 8, 2)
    with pytest.raises(ValueError, match="num_blocks must be a positive integer"):
        KVCacheLayout(LayoutKind.VLLM_KV_FIRST, 2, 0, T, 4, 8, 2)


def test_from_tensors_takes_torch_tensors_and_refuses_non_contiguous_or_mixed() -> None:
    kv = [torch.zeros(5, 2, T, 2, 8, dtype=torch.bfloat16) for _ in range(2)]
    layout = KVCacheLayout.from_tensors(LayoutKind.VLLM_BLOCK_FIRST, kv, T)
    assert layout.itemsize == 2 and layout.num_blocks == 5
    table = layout.chunk_table(tensor_addresses(kv))
    assert int(table.bases[3]) == kv[1].data_ptr() + layout.chunk_bytes  # layer 1, V of block 0

    transposed = [t.transpose(0, 1) for t in kv]  # [2, 5, ...] view, not contiguous
    with pytest.raises(ValueError, match="tensor 0 is not contiguous"):
        KVCacheLayout.from_tensors(LayoutKind.VLLM_KV_FIRST, transposed, T)
    with pytest.raises(ValueError, match=r"tensor 1 has dtype torch.float32"):
        KVCacheLayout.from_tensors(LayoutKind.VLLM_BLOCK_FIRST, [kv[0], kv[1].float()], T)
    with pytest.raises(ValueError, match="no KV tensors"):
        KVCacheLayout.from_tensors(LayoutKind.VLLM_BLOCK_FIRST, [], T)


def test_out_of_range_coordinates_and_wrong_address_counts_raise() -> None:
    layout = KVCacheLayout(LayoutKind.SGLANG, 2, 5, T, 2, 8, 2)
    assert layout.tensor_index(1, 1) == 3
    for bad in [(2, 0, 0), (0, 2, 0), (0, 0, 5), (0, 0, -1)]:
        with pytest.raises(IndexError, match="out of range"):
            layout.chunk_offset(*bad)
    with pytest.raises(ValueError, match="has 4 tensors, got 2 addresses"):
        layout.chunk_table([4096, 8192])
    mla = KVCacheLayout(LayoutKind.MLA, 2, 5, T, 1, 8, 2)
    with pytest.raises(IndexError, match="kv 1 out of range"):
        mla.chunk_offset(0, 1, 0)
    assert isinstance(mla.chunk_table([4096, 8192]), ChunkTable)


def test_check_engine_layout_names_the_field_that_disagrees() -> None:
    model = ModelConfig(num_layers=2, num_kv_heads=8, head_size=16, dtype="bfloat16", tp_size=2)
    pool = BlockFirstLayout(model, T)
    pool.check_engine_layout(KVCacheLayout(LayoutKind.SGLANG, 2, 7, T, 4, 16, 2))
    cases = {
        "num_heads=8": KVCacheLayout(LayoutKind.SGLANG, 2, 7, T, 8, 16, 2),  # all heads on one rank
        "head_size=32": KVCacheLayout(LayoutKind.SGLANG, 2, 7, T, 4, 32, 2),
        "itemsize=4": KVCacheLayout(LayoutKind.SGLANG, 2, 7, T, 4, 16, 4),
        "tokens_per_block=8": KVCacheLayout(LayoutKind.SGLANG, 2, 7, 8, 4, 16, 2),
        "num_layers=3": KVCacheLayout(LayoutKind.SGLANG, 3, 7, T, 4, 16, 2),
    }
    for field, engine in cases.items():
        with pytest.raises(ValueError, match=f"engine layout {field} does not match"):
            pool.check_engine_layout(engine)
    mla_pool = BlockFirstLayout(ModelConfig(2, 1, 16, "bfloat16", use_mla=True, tp_size=2), T)
    with pytest.raises(ValueError, match="kv_dim=2"):
        mla_pool.check_engine_layout(KVCacheLayout(LayoutKind.VLLM_KV_FIRST, 2, 7, T, 1, 16, 2))
    assert mla_pool.shard_of_rank(1) == 0  # every MLA rank shares shard 0

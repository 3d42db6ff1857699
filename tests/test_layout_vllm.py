"""vLLM (>= 0.26) layouts: packed K|V per layer (LBHNC, LBNHC) and MLA views.

Every offset is checked against a numpy slice of the engine's own tensor; the host copy engine moves
real blocks through a real pool and back; vLLM-shaped strided views are classified (and refused) the
way vLLM builds them (``torch.as_strided`` over one buffer).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexkv.common.config import ModelConfig, kv_fingerprint
from flexkv.layout import BlockFirstLayout, KVCacheLayout, LayoutKind, tensor_addresses, vllm_layer_view
from flexkv.native import hostcopy
from flexkv.types import BlockFormat, ConfigError, OpType

T = 4
PACKED = [LayoutKind.VLLM_PACKED_HND, LayoutKind.VLLM_PACKED_NHD]


def packed_tensors(kind: LayoutKind, num_layers: int, nb: int, h: int, d: int,
                   rng: np.random.Generator) -> list[np.ndarray]:
    shape = (nb, h, T, 2 * d) if kind is LayoutKind.VLLM_PACKED_HND else (nb, T, h, 2 * d)
    return [rng.integers(0, 1 << 16, size=shape, dtype=np.uint16) for _ in range(num_layers)]


def block_bytes(t: np.ndarray, b: int) -> bytes:
    return t[b].tobytes()


@pytest.mark.parametrize("kind", PACKED)
def test_packed_chunks_are_the_two_halves_of_the_engines_block(kind: LayoutKind) -> None:
    rng = np.random.default_rng(1)
    tensors = packed_tensors(kind, 3, 5, 2, 8, rng)
    layout = KVCacheLayout.from_tensors(kind, tensors, T)
    assert (layout.num_layers, layout.num_blocks, layout.num_heads, layout.head_size) == (3, 5, 2, 8)
    assert layout.kind.block_format is BlockFormat(kind.value.removeprefix("vllm_"))
    assert layout.chunk_bytes * 2 == tensors[0][0].nbytes
    table = layout.chunk_table(tensor_addresses(tensors))
    for layer in range(3):
        for kv in range(2):
            for b in range(5):
                tensor, off = layout.chunk_offset(layer, kv, b)
                assert tensor == layer
                half = block_bytes(tensors[layer], b)[kv * layout.chunk_bytes:(kv + 1) * layout.chunk_bytes]
                raw = tensors[layer].reshape(-1).view(np.uint8)
                assert raw[off:off + layout.chunk_bytes].tobytes() == half
                addr = int(table.bases[layer * 2 + kv]) + b * table.block_stride
                assert addr - tensors[layer].ctypes.data == off


@pytest.mark.parametrize("kind", PACKED)
@pytest.mark.parametrize("tp_size", [1, 2])
def test_host_copy_moves_packed_blocks_through_a_pool_byte_exact(kind: LayoutKind, tp_size: int) -> None:
    """D2H into a poisoned pool then H2D into a poisoned engine: every byte lands where numpy says."""
    fmt = kind.block_format
    model = ModelConfig(num_layers=2, num_kv_heads=2 * tp_size, head_size=8, dtype="bfloat16", tp_size=tp_size,
                        block_format=fmt)
    pool_layout = BlockFirstLayout(model, T)
    rng = np.random.default_rng(2)
    pool = np.full((6, pool_layout.block_bytes), 0xAB, dtype=np.uint8)
    ranks = [packed_tensors(kind, 2, 4, 2, 8, rng) for _ in range(tp_size)]
    engine_ids, pool_ids = np.array([3, 0, 2], dtype=np.int64), np.array([5, 1, 2], dtype=np.int64)
    for rank, tensors in enumerate(ranks):
        layout = KVCacheLayout.from_tensors(kind, tensors, T)
        pool_layout.check_engine_layout(layout)
        offsets = pool_layout.shard_chunk_offsets(pool_layout.shard_of_rank(rank))
        hostcopy.copy_blocks(OpType.D2H, layout.chunk_table(tensor_addresses(tensors)), pool.ctypes.data,
                             pool_layout.block_bytes, offsets, 6, engine_ids, pool_ids, num_threads=2)
    for e, p in zip(engine_ids, pool_ids, strict=True):
        for rank, tensors in enumerate(ranks):
            shard = pool[p, rank * pool_layout.shard_bytes:(rank + 1) * pool_layout.shard_bytes]
            want = b"".join(block_bytes(t, int(e)) for t in tensors)  # [layer][engine block as it is]
            assert shard.tobytes() == want
    untouched = np.setdiff1d(np.arange(6), pool_ids)
    assert (pool[untouched] == 0xAB).all()
    for rank, tensors in enumerate(ranks):
        back = [np.full_like(t, 0x5A5A) for t in tensors]
        layout = KVCacheLayout.from_tensors(kind, back, T)
        offsets = pool_layout.shard_chunk_offsets(rank)
        hostcopy.copy_blocks(OpType.H2D, layout.chunk_table(tensor_addresses(back)), pool.ctypes.data,
                             pool_layout.block_bytes, offsets, 6, engine_ids, pool_ids, num_threads=2)
        for layer in range(2):
            for b in range(4):
                if b in engine_ids:
                    assert np.array_equal(back[layer][b], tensors[layer][b])
                else:
                    assert (back[layer][b] == 0x5A5A).all()


def test_a_server_holds_one_block_format_and_the_fingerprint_names_it() -> None:
    split = ModelConfig(num_layers=2, num_kv_heads=2, head_size=8)
    hnd = ModelConfig(num_layers=2, num_kv_heads=2, head_size=8, block_format="packed_hnd")
    nhd = ModelConfig(num_layers=2, num_kv_heads=2, head_size=8, block_format=BlockFormat.PACKED_NHD)
    prints = {kv_fingerprint(m, T) for m in (split, hnd, nhd)}
    assert len(prints) == 3
    # The split format's fingerprint is the one it always had (existing remote keys stay valid).
    import xxhash
    assert kv_fingerprint(split, T) == xxhash.xxh3_64_hexdigest(f"L2H2D8bfloat16M0TP1T{T}".encode())[:8]
    packed = KVCacheLayout(LayoutKind.VLLM_PACKED_HND, 2, 4, T, 2, 8, 2)
    with pytest.raises(ValueError, match="stores blocks as packed_hnd, this server holds split blocks"):
        BlockFirstLayout(split, T).check_engine_layout(packed)
    with pytest.raises(ValueError, match="packed_hnd, this server holds packed_nhd"):
        BlockFirstLayout(nhd, T).check_engine_layout(packed)
    BlockFirstLayout(hnd, T).check_engine_layout(packed)
    with pytest.raises(ValueError, match="split, this server holds packed_hnd"):
        BlockFirstLayout(hnd, T).check_engine_layout(KVCacheLayout(LayoutKind.VLLM_KV_FIRST, 2, 4, T, 2, 8, 2))
    with pytest.raises(ConfigError, match="block_format"):
        ModelConfig(num_layers=2, num_kv_heads=1, head_size=8, use_mla=True, block_format="packed_nhd")
    with pytest.raises(ConfigError, match="block_format: unsupported 'interleaved'"):
        ModelConfig(num_layers=2, num_kv_heads=2, head_size=8, block_format="interleaved")


def test_from_shapes_refuses_an_odd_packed_content_dim() -> None:
    with pytest.raises(ValueError, match=r"\[num_blocks, T, H, 2\*D\]"):
        KVCacheLayout.from_shapes(LayoutKind.VLLM_PACKED_NHD, [(4, T, 2, 15)], 2, T)
    with pytest.raises(ValueError, match="T=4"):
        KVCacheLayout.from_shapes(LayoutKind.VLLM_PACKED_HND, [(4, 2, 8, 16)], 2, T)


def vllm_views(order: tuple[int, int, int, int], num_layers: int, nb: int, h: int, n: int, c: int,
               layer_outer: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-layer logical [B, H, N, C] views over one buffer, built as vLLM's create_kv_cache_views does:
    ``order`` is the physical order of the logical axes [L, B, H, N, C] minus L (L outermost unless
    ``layer_outer`` is False, the cross-layer BLHNC kind)."""
    logical = (num_layers, nb, h, n, c)
    phys = (0, *(i + 1 for i in order)) if layer_outer else (1, 0, *(i + 1 for i in order[1:]))
    strides = [0] * 5
    cur = 1
    for dim in reversed(phys):
        strides[dim] = cur
        cur *= logical[dim]
    buf = torch.arange(cur, dtype=torch.int32).to(torch.bfloat16)
    view5 = torch.as_strided(buf, logical, strides)
    return buf, [view5[i] for i in range(num_layers)]


def test_vllm_lbnhc_views_split_into_flexkv_blocks_whose_tokens_numpy_agrees_on() -> None:
    _, views = vllm_views((0, 2, 1, 3), 2, 3, 2, 8, 6)  # LBNHC, block_size 8 = 2 flexkv blocks of 4
    v = vllm_layer_view(views[0].shape, views[0].stride(), False, T)
    assert v.kind is LayoutKind.VLLM_PACKED_NHD and v.shape == (6, T, 2, 6)
    flex = views[1].permute(*v.order).reshape(v.shape)
    assert flex.is_contiguous() and flex.data_ptr() == views[1].data_ptr()
    for b in range(3):
        for j in range(2):
            for tok in range(T):
                # flexkv block b*2+j, token tok is vLLM block b, token j*T+tok (slot b*8 + j*4 + tok)
                assert torch.equal(flex[b * 2 + j, tok], views[1][b, :, j * T + tok, :])


def test_vllm_lbhnc_and_mla_views_and_what_is_refused() -> None:
    _, views = vllm_views((0, 1, 2, 3), 2, 3, 2, T, 6)
    v = vllm_layer_view(views[0].shape, views[0].stride(), False, T)
    assert v.kind is LayoutKind.VLLM_PACKED_HND and v.shape == (3, 2, T, 6)
    with pytest.raises(ValueError, match="set flexkv tokens_per_block=8 or VLLM_KV_CACHE_LAYOUT=LBNHC"):
        _, v8 = vllm_views((0, 1, 2, 3), 2, 3, 2, 8, 6)
        vllm_layer_view(v8[0].shape, v8[0].stride(), False, T)
    _, mla = vllm_views((0, 1, 2, 3), 2, 3, 1, 8, 10)  # MLA: one "head", C = latent + rope
    m = vllm_layer_view(mla[0].shape, mla[0].stride(), True, T)
    assert m.kind is LayoutKind.MLA and m.shape == (6, T, 10)
    flat = mla[0].permute(*m.order).reshape(m.shape)
    assert torch.equal(flat[3], mla[0][1, 0, T:2 * T])
    _, cross = vllm_views((0, 1, 2, 3), 2, 3, 2, T, 6, layer_outer=False)
    with pytest.raises(ValueError, match="cross-layer or padded"):
        vllm_layer_view(cross[0].shape, cross[0].stride(), False, T)
    with pytest.raises(ValueError, match="not a multiple of flexkv tokens_per_block"):
        vllm_layer_view((3, 2, 6, 6), (72, 36, 6, 1), False, T)
    with pytest.raises(ValueError, match="one head"):
        vllm_layer_view((3, 2, 8, 6), (96, 48, 6, 1), True, T)
    with pytest.raises(ValueError, match="2\\*head_size"):
        vllm_layer_view((3, 2, 4, 5), (40, 20, 5, 1), False, T)
    with pytest.raises(ValueError, match="4-D"):
        vllm_layer_view((3, 4, 5), (20, 5, 1), False, T)

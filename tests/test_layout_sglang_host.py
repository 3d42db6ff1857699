"""SGLang HiCache host-pool layouts: the host copy engine moves exactly the bytes SGLang's own indexing
names as page p's (layer, kv) rows, into flexkv's block-first order and back.

Reference slices are written out by hand from SGLang 0.5.23's ``pool_host/mha.py`` / ``mla.py`` shapes,
not taken from the layout under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from flexkv.common.config import ModelConfig
from flexkv.layout import BlockFirstLayout, KVCacheLayout, LayoutKind
from flexkv.native import hostcopy

P, L, H, D = 4, 3, 2, 8  # page size, layers, heads, head size
NUM_PAGES = 6
MHA = [LayoutKind.SGLANG_HOST_LAYER_FIRST, LayoutKind.SGLANG_HOST_PAGE_FIRST, LayoutKind.SGLANG_HOST_PAGE_FIRST_DIRECT]
MLA = [LayoutKind.SGLANG_HOST_MLA_LAYER_FIRST, LayoutKind.SGLANG_HOST_MLA_PAGE_FIRST]


def host_shape(kind: LayoutKind) -> tuple[int, ...]:
    n = NUM_PAGES * P
    return {LayoutKind.SGLANG_HOST_LAYER_FIRST: (2, L, n, H, D), LayoutKind.SGLANG_HOST_PAGE_FIRST: (2, n, L, H, D),
            LayoutKind.SGLANG_HOST_PAGE_FIRST_DIRECT: (2, NUM_PAGES, L, P, H, D),
            LayoutKind.SGLANG_HOST_MLA_LAYER_FIRST: (L, n, 1, D),
            LayoutKind.SGLANG_HOST_MLA_PAGE_FIRST: (n, L, 1, D)}[kind]


def page_rows(kind: LayoutKind, buf: np.ndarray, page: int, layer: int, kv: int) -> np.ndarray:
    """SGLang's rows of (page, layer, kv): [P, heads, D] in token order."""
    s = slice(page * P, (page + 1) * P)
    if kind is LayoutKind.SGLANG_HOST_LAYER_FIRST:
        return buf[kv, layer, s]
    if kind is LayoutKind.SGLANG_HOST_PAGE_FIRST:
        return buf[kv, s, layer]
    if kind is LayoutKind.SGLANG_HOST_PAGE_FIRST_DIRECT:
        return buf[kv, page, layer]
    if kind is LayoutKind.SGLANG_HOST_MLA_LAYER_FIRST:
        return buf[layer, s]
    return buf[s, layer]


def setup(kind: LayoutKind) -> tuple[KVCacheLayout, BlockFirstLayout, np.ndarray]:
    mla = kind in MLA
    buf = np.random.default_rng(7).integers(0, 1 << 16, size=host_shape(kind), dtype=np.uint16)
    layout = KVCacheLayout.from_shapes(kind, [buf.shape], 2, P)
    model = ModelConfig(num_layers=L, num_kv_heads=1 if mla else H, head_size=D, dtype="float16", use_mla=mla)
    return layout, BlockFirstLayout(model, P), buf


@pytest.mark.parametrize("kind", MHA + MLA, ids=lambda k: k.value)
def test_pages_go_to_block_first_order_and_back_byte_exact(kind: LayoutKind) -> None:
    layout, bf, buf = setup(kind)
    assert (layout.num_layers, layout.num_blocks, layout.num_heads) == (L, NUM_PAGES, 1 if kind in MLA else H)
    table = layout.chunk_table([buf.ctypes.data])
    offsets = layout.pool_piece_offsets(bf.shard_chunk_offsets(0))
    pool = np.full((4, bf.block_bytes), 0xAB, dtype=np.uint8)
    pages, blocks = np.array([4, 1, 2], dtype=np.int64), np.array([0, 3, 1], dtype=np.int64)
    hostcopy.copy_blocks(hostcopy.CopyDirection.TO_POOL, table, pool.ctypes.data, bf.block_bytes, offsets, 4,
                         pages, blocks, num_threads=2)
    for page, block in zip(pages, blocks, strict=True):
        for layer in range(L):
            for kv in range(layout.kv_dim):
                off = bf.chunk_offset(layer, kv, 0)
                got = pool[block, off:off + bf.chunk_bytes]
                assert got.tobytes() == page_rows(kind, buf, int(page), layer, kv).tobytes(), (page, layer, kv)
    assert (pool[2] == 0xAB).all()  # an untouched pool block stays as it was

    back = np.full_like(buf, 0xABAB)
    back_table = layout.chunk_table([back.ctypes.data])
    hostcopy.copy_blocks(hostcopy.CopyDirection.FROM_POOL, back_table, pool.ctypes.data, bf.block_bytes, offsets, 4,
                         np.array([5, 0], dtype=np.int64), np.array([0, 3], dtype=np.int64), num_threads=1)
    for page, src in ((5, 4), (0, 1)):
        for layer in range(L):
            for kv in range(layout.kv_dim):
                want = page_rows(kind, buf, src, layer, kv).tobytes()
                assert page_rows(kind, back, page, layer, kv).tobytes() == want
    for page in (1, 2, 3, 4):  # pages not loaded keep the poison
        for layer in range(L):
            for kv in range(layout.kv_dim):
                assert (page_rows(kind, back, page, layer, kv) == 0xABAB).all()


def test_page_first_needs_one_piece_per_token_and_the_others_none() -> None:
    for kind in MHA + MLA:
        layout, _, _ = setup(kind)
        want = P if kind in (LayoutKind.SGLANG_HOST_PAGE_FIRST, LayoutKind.SGLANG_HOST_MLA_PAGE_FIRST) else 1
        assert layout.pieces_per_chunk == want
        assert layout.chunk_table([4096]).bases.size == L * layout.kv_dim * want


@pytest.mark.parametrize("shape, why", [((2, 23, L, H, D), "not a whole number of pages"),
                                        ((3, 24, L, H, D), "K and V"), ((2, 24, L, H), "dimensions")])
def test_a_wrong_host_pool_shape_is_a_clear_error(shape: tuple[int, ...], why: str) -> None:
    with pytest.raises(ValueError, match="sglang_host_page_first shape"):
        KVCacheLayout.from_shapes(LayoutKind.SGLANG_HOST_PAGE_FIRST, [shape], 2, P)


def test_mla_host_pool_with_more_than_one_head_is_rejected() -> None:
    with pytest.raises(ValueError, match="one latent head"):
        KVCacheLayout(LayoutKind.SGLANG_HOST_MLA_PAGE_FIRST, L, NUM_PAGES, P, 2, D, 2)

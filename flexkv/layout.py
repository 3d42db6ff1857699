"""KV layouts: where each chunk's bytes live, computed in one place.

A *chunk* is one block of one layer's K (or V) for one TP shard: ``T x heads x head_size x itemsize``
bytes, contiguous in every layout here. :class:`KVCacheLayout` describes what one TP rank of an engine
registers (vLLM, SGLang, MLA or block-first tensors); :class:`BlockFirstLayout` describes flexkv's own
CPU/SSD/remote blocks, where one block is one contiguous region holding every layer, K and V, and every
shard. A copy engine needs only a :class:`ChunkTable` from the engine side and
:meth:`BlockFirstLayout.shard_chunk_offsets` from the pool side. Pure arithmetic; runs in any process.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from flexkv.common.config import ModelConfig
from flexkv.types import BlockFormat


class LayoutKind(enum.Enum):
    """How an engine lays out its KV tensors (``T`` tokens per block, ``H`` heads, ``D`` head size)."""

    VLLM_KV_FIRST = "vllm_kv_first"  # one tensor per layer [2, num_blocks, T, H, D]
    VLLM_BLOCK_FIRST = "vllm_block_first"  # one tensor per layer [num_blocks, 2, T, H, D]
    SGLANG = "sglang"  # K and V tensors per layer [num_blocks*T, H, D], ordered K0, V0, K1, V1, ...
    MLA = "mla"  # one tensor per layer [num_blocks, T, D] (kv_dim 1, one latent "head")
    BLOCK_FIRST = "block_first"  # one tensor [num_blocks, num_layers, 2, T, H, D] (flexkv's own order)
    # SGLang's HiCache host pool (mem_cache/pool_host/mha.py, mla.py); N = num_blocks * T host tokens.
    SGLANG_HOST_LAYER_FIRST = "sglang_host_layer_first"  # one tensor [2, L, N, H, D]
    SGLANG_HOST_PAGE_FIRST = "sglang_host_page_first"  # one tensor [2, N, L, H, D] (chunks strided by token)
    SGLANG_HOST_PAGE_FIRST_DIRECT = "sglang_host_page_first_direct"  # one tensor [2, num_blocks, L, T, H, D]
    SGLANG_HOST_MLA_LAYER_FIRST = "sglang_host_mla_layer_first"  # one tensor [L, N, 1, D]
    SGLANG_HOST_MLA_PAGE_FIRST = "sglang_host_mla_page_first"  # one tensor [N, L, 1, D] (chunks strided by token)

    # vLLM >= 0.26: one tensor per layer with K and V packed in the last dim (LBHNC / LBNHC). The two
    # halves of a layer's block are its (layer, 0) and (layer, 1) chunks, stored as they are.
    VLLM_PACKED_HND = "vllm_packed_hnd"  # [num_blocks, H, T, 2*D]
    VLLM_PACKED_NHD = "vllm_packed_nhd"  # [num_blocks, T, H, 2*D]

    @property
    def block_format(self) -> BlockFormat:
        """The byte order this kind gives a pool block; a server holds blocks of one format only."""
        return _BLOCK_FORMATS.get(self, BlockFormat.SPLIT)


_BLOCK_FORMATS = {LayoutKind.VLLM_PACKED_HND: BlockFormat.PACKED_HND,
                  LayoutKind.VLLM_PACKED_NHD: BlockFormat.PACKED_NHD}
_PACKED = frozenset(_BLOCK_FORMATS)
_MLA_KINDS = frozenset({LayoutKind.MLA, LayoutKind.SGLANG_HOST_MLA_LAYER_FIRST, LayoutKind.SGLANG_HOST_MLA_PAGE_FIRST})
_SINGLE_TENSOR_KINDS = frozenset({LayoutKind.BLOCK_FIRST, LayoutKind.SGLANG_HOST_LAYER_FIRST,
                                  LayoutKind.SGLANG_HOST_PAGE_FIRST, LayoutKind.SGLANG_HOST_PAGE_FIRST_DIRECT,
                                  LayoutKind.SGLANG_HOST_MLA_LAYER_FIRST, LayoutKind.SGLANG_HOST_MLA_PAGE_FIRST})
# Kinds whose (layer, kv) chunk of a block is not contiguous: each token's H x D row is its own piece,
# one block's token rows ``_token_stride`` bytes apart.
_PER_TOKEN_KINDS = frozenset({LayoutKind.SGLANG_HOST_PAGE_FIRST, LayoutKind.SGLANG_HOST_MLA_PAGE_FIRST})


class ChunkTable(NamedTuple):
    """Everything a copy engine needs about the engine side of a copy.

    Chunk ``(layer, kv)`` of block ``b`` starts at ``bases[layer * kv_dim + kv] + b * block_stride``.
    For a layout whose chunks are not contiguous (:attr:`KVCacheLayout.pieces_per_chunk` > 1) each
    entry is one piece instead: piece ``j`` of chunk ``c`` is entry ``c * pieces_per_chunk + j`` and
    ``chunk_bytes`` is the piece's size; pair it with :meth:`KVCacheLayout.pool_piece_offsets`.
    """

    bases: npt.NDArray[np.uint64]  # [num_layers * kv_dim (* pieces)]: address of chunk (layer, kv, block 0)
    block_stride: int  # bytes from one block's chunk to the next block's chunk (same layer, kv)
    chunk_bytes: int
    num_blocks: int


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_index(name: str, value: int, limit: int) -> None:
    if not 0 <= value < limit:
        raise IndexError(f"{name} {value} out of range [0, {limit})")


@dataclasses.dataclass(frozen=True)
class KVCacheLayout:
    """The KV tensors ONE TP rank of an engine registers; ``num_blocks`` is this rank's count.

    Tensors are numbered as the engine passes them: per layer for the vLLM kinds and MLA, K0, V0, K1,
    V1, ... for SGLang, a single tensor for BLOCK_FIRST. ``head_size`` is D, also for the packed kinds
    (whose last dim is 2*D). Raises ValueError on a non-positive field or an MLA layout with more than
    one head.
    """

    kind: LayoutKind
    num_layers: int
    num_blocks: int
    tokens_per_block: int
    num_heads: int  # heads this rank holds (1 for MLA)
    head_size: int
    itemsize: int

    def __post_init__(self) -> None:
        if not isinstance(self.kind, LayoutKind):
            object.__setattr__(self, "kind", LayoutKind(self.kind))
        for name in ("num_layers", "num_blocks", "tokens_per_block", "num_heads", "head_size", "itemsize"):
            _check_positive(name, getattr(self, name))
        if self.kind in _MLA_KINDS and self.num_heads != 1:
            raise ValueError(f"{self.kind.value} layout holds one latent head, got num_heads={self.num_heads}")

    @property
    def kv_dim(self) -> int:
        """1 for MLA (one latent per token), else 2 (K and V)."""
        return 1 if self.kind in _MLA_KINDS else 2

    @property
    def num_tensors(self) -> int:
        if self.kind is LayoutKind.SGLANG:
            return 2 * self.num_layers
        if self.kind in _SINGLE_TENSOR_KINDS:
            return 1
        return self.num_layers

    @property
    def chunk_bytes(self) -> int:
        return self.tokens_per_block * self.num_heads * self.head_size * self.itemsize

    @property
    def row_bytes(self) -> int:
        """One token's row of one (layer, kv): ``num_heads * head_size * itemsize``."""
        return self.num_heads * self.head_size * self.itemsize

    @property
    def pieces_per_chunk(self) -> int:
        """Contiguous pieces of one chunk in this layout: 1, or ``tokens_per_block`` for the page-first
        host pools (where a token's rows of all layers sit together)."""
        return self.tokens_per_block if self.kind in _PER_TOKEN_KINDS else 1

    @property
    def block_stride(self) -> int:
        """Bytes between chunk (layer, kv) of block b and of block b + 1; the same for every chunk."""
        page_rows = self.num_layers * self.chunk_bytes  # one block's rows of every layer (one of K, V)
        if self.kind is LayoutKind.VLLM_BLOCK_FIRST or self.kind in _PACKED:
            return 2 * self.chunk_bytes
        if self.kind is LayoutKind.BLOCK_FIRST:
            return self.num_layers * 2 * self.chunk_bytes
        if self.kind in (LayoutKind.SGLANG_HOST_PAGE_FIRST, LayoutKind.SGLANG_HOST_PAGE_FIRST_DIRECT,
                         LayoutKind.SGLANG_HOST_MLA_PAGE_FIRST):
            return page_rows
        return self.chunk_bytes

    def tensor_shape(self, i: int) -> tuple[int, ...]:
        """Shape (in elements) of tensor ``i``; every tensor of a layout has the same shape."""
        _check_index("tensor index", i, self.num_tensors)
        nb, t, h, d = self.num_blocks, self.tokens_per_block, self.num_heads, self.head_size
        shapes: dict[LayoutKind, tuple[int, ...]] = {
            LayoutKind.VLLM_KV_FIRST: (2, nb, t, h, d),
            LayoutKind.VLLM_BLOCK_FIRST: (nb, 2, t, h, d),
            LayoutKind.SGLANG: (nb * t, h, d),
            LayoutKind.MLA: (nb, t, d),
            LayoutKind.BLOCK_FIRST: (nb, self.num_layers, 2, t, h, d),
            LayoutKind.VLLM_PACKED_HND: (nb, h, t, 2 * d),
            LayoutKind.VLLM_PACKED_NHD: (nb, t, h, 2 * d),
            LayoutKind.SGLANG_HOST_LAYER_FIRST: (2, self.num_layers, nb * t, h, d),
            LayoutKind.SGLANG_HOST_PAGE_FIRST: (2, nb * t, self.num_layers, h, d),
            LayoutKind.SGLANG_HOST_PAGE_FIRST_DIRECT: (2, nb, self.num_layers, t, h, d),
            LayoutKind.SGLANG_HOST_MLA_LAYER_FIRST: (self.num_layers, nb * t, 1, d),
            LayoutKind.SGLANG_HOST_MLA_PAGE_FIRST: (nb * t, self.num_layers, 1, d),
        }
        return shapes[self.kind]

    def tensor_bytes(self, i: int) -> int:
        return int(np.prod(self.tensor_shape(i))) * self.itemsize

    def tensor_index(self, layer: int, kv: int) -> int:
        """Which registered tensor holds (layer, kv). Raises IndexError when either is out of range."""
        _check_index("layer", layer, self.num_layers)
        _check_index("kv", kv, self.kv_dim)
        if self.kind is LayoutKind.SGLANG:
            return 2 * layer + kv
        if self.kind in _SINGLE_TENSOR_KINDS:
            return 0
        return layer

    def _chunk_base(self, layer: int, kv: int) -> int:
        """Byte offset of chunk (layer, kv, block 0) (its first piece) inside its tensor."""
        k = self.kind
        half = self.num_blocks * self.num_layers * self.chunk_bytes  # all of K (or V) of a host pool
        if k is LayoutKind.VLLM_KV_FIRST:
            return kv * self.num_blocks * self.chunk_bytes
        if k is LayoutKind.VLLM_BLOCK_FIRST or k in _PACKED:
            return kv * self.chunk_bytes
        if k is LayoutKind.BLOCK_FIRST:
            return (layer * 2 + kv) * self.chunk_bytes
        if k in (LayoutKind.SGLANG_HOST_LAYER_FIRST, LayoutKind.SGLANG_HOST_MLA_LAYER_FIRST):
            return kv * half + layer * self.num_blocks * self.chunk_bytes
        if k in (LayoutKind.SGLANG_HOST_PAGE_FIRST, LayoutKind.SGLANG_HOST_MLA_PAGE_FIRST):
            return kv * half + layer * self.row_bytes
        if k is LayoutKind.SGLANG_HOST_PAGE_FIRST_DIRECT:
            return kv * half + layer * self.chunk_bytes
        return 0

    def pool_piece_offsets(self, chunk_offsets: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        """The pool side matching :meth:`chunk_table`: ``chunk_offsets`` (one per (layer, kv), e.g.
        :meth:`BlockFirstLayout.shard_chunk_offsets`) itself, or, for a layout of several pieces per
        chunk, each chunk's offset plus ``j * row_bytes`` for piece ``j``."""
        n = self.pieces_per_chunk
        if n == 1:
            return chunk_offsets
        rows = np.arange(n, dtype=np.uint64) * np.uint64(self.row_bytes)
        return (chunk_offsets.astype(np.uint64)[:, None] + rows[None, :]).reshape(-1)

    def chunk_offset(self, layer: int, kv: int, block_id: int) -> tuple[int, int]:
        """(tensor index, byte offset inside that tensor) of one chunk. Raises IndexError when out of range."""
        tensor = self.tensor_index(layer, kv)
        _check_index("block_id", block_id, self.num_blocks)
        return tensor, self._chunk_base(layer, kv) + block_id * self.block_stride

    def chunk_table(self, tensor_ptrs: Sequence[int]) -> ChunkTable:
        """The engine side of a copy, given each tensor's address (see :func:`tensor_addresses`)."""
        if len(tensor_ptrs) != self.num_tensors:
            raise ValueError(f"{self.kind.value} layout has {self.num_tensors} tensors, "
                             f"got {len(tensor_ptrs)} addresses")
        bases = np.empty(self.num_layers * self.kv_dim, dtype=np.uint64)
        for layer in range(self.num_layers):
            for kv in range(self.kv_dim):
                ptr = int(tensor_ptrs[self.tensor_index(layer, kv)])
                if ptr <= 0:
                    raise ValueError(f"address of tensor {self.tensor_index(layer, kv)} must be positive, got {ptr}")
                bases[layer * self.kv_dim + kv] = ptr + self._chunk_base(layer, kv)
        n = self.pieces_per_chunk
        if n == 1:
            return ChunkTable(bases, self.block_stride, self.chunk_bytes, self.num_blocks)
        # Piece j of a chunk is token j's row: the next token's rows of every layer lie between them.
        token_stride = np.arange(n, dtype=np.uint64) * np.uint64(self.num_layers * self.row_bytes)
        pieces = (bases[:, None] + token_stride[None, :]).reshape(-1)
        return ChunkTable(pieces, self.block_stride, self.row_bytes, self.num_blocks)

    @classmethod
    def from_shapes(
        cls, kind: LayoutKind, shapes: Sequence[tuple[int, ...]], itemsize: int, tokens_per_block: int
    ) -> KVCacheLayout:
        """Infer the layout from the tensors' shapes (in elements).

        Raises ValueError naming the tensor and the expected shape when the count or any shape disagrees.
        """
        kind = LayoutKind(kind)
        if not shapes:
            raise ValueError(f"{kind.value} layout needs at least one tensor, got none")
        if kind is LayoutKind.SGLANG and len(shapes) % 2:
            raise ValueError(f"sglang layout needs K and V per layer (K0, V0, K1, V1, ...), got {len(shapes)} tensors")
        first = tuple(int(x) for x in shapes[0])
        layout = cls._from_first_shape(kind, first, len(shapes), itemsize, tokens_per_block)
        if len(shapes) != layout.num_tensors:
            raise ValueError(f"{kind.value} layout needs {layout.num_tensors} tensors, got {len(shapes)}")
        for i, shape in enumerate(shapes):
            if tuple(int(x) for x in shape) != layout.tensor_shape(i):
                raise ValueError(f"tensor {i} has shape {tuple(shape)}, expected {layout.tensor_shape(i)} "
                                 f"({kind.value}, like tensor 0)")
        return layout

    @classmethod
    def _from_first_shape(
        cls, kind: LayoutKind, shape: tuple[int, ...], num_shapes: int, itemsize: int, t: int
    ) -> KVCacheLayout:
        _check_positive("tokens_per_block", t)
        expect = {LayoutKind.VLLM_KV_FIRST: "[2, num_blocks, T, H, D]",
                  LayoutKind.VLLM_BLOCK_FIRST: "[num_blocks, 2, T, H, D]",
                  LayoutKind.SGLANG: "[num_blocks*T, H, D]", LayoutKind.MLA: "[num_blocks, T, D]",
                  LayoutKind.BLOCK_FIRST: "[num_blocks, num_layers, 2, T, H, D]",
                  LayoutKind.SGLANG_HOST_LAYER_FIRST: "[2, num_layers, num_blocks*T, H, D]",
                  LayoutKind.SGLANG_HOST_PAGE_FIRST: "[2, num_blocks*T, num_layers, H, D]",
                  LayoutKind.SGLANG_HOST_PAGE_FIRST_DIRECT: "[2, num_blocks, num_layers, T, H, D]",
                  LayoutKind.SGLANG_HOST_MLA_LAYER_FIRST: "[num_layers, num_blocks*T, 1, D]",
                  LayoutKind.SGLANG_HOST_MLA_PAGE_FIRST: "[num_blocks*T, num_layers, 1, D]",
                  LayoutKind.VLLM_PACKED_HND: "[num_blocks, H, T, 2*D]",
                  LayoutKind.VLLM_PACKED_NHD: "[num_blocks, T, H, 2*D]"}[kind]
        bad = ValueError(f"tensor 0 has shape {shape}, expected {kind.value} shape {expect} with T={t}")
        if len(shape) != expect.count(",") + 1 or min(shape) <= 0:
            raise bad
        parsed = _parse_shape(kind, shape, num_shapes, t)
        if parsed is None:
            raise bad
        layers, nb, tt, kv, h, d = parsed
        if tt != t or kv != (1 if kind in _MLA_KINDS else 2):
            raise bad
        return cls(kind, max(layers, 1), nb, t, h, d, itemsize)

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> KVCacheLayout:
        """The layout named by a mapping with this class's field names (e.g. a registration message's)."""
        return cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls)})

    @classmethod
    def from_tensors(cls, kind: LayoutKind, tensors: Sequence[Any], tokens_per_block: int) -> KVCacheLayout:
        """Infer the layout from torch tensors or numpy arrays (contiguous, one dtype).

        Raises ValueError naming the tensor that is not contiguous, has another dtype, or has the wrong shape.
        """
        if not tensors:
            raise ValueError("no KV tensors given")
        itemsizes = [_itemsize(t) for t in tensors]
        for i, t in enumerate(tensors):
            if not _is_contiguous(t):
                raise ValueError(f"tensor {i} is not contiguous; register contiguous KV tensors")
            if str(t.dtype) != str(tensors[0].dtype):
                raise ValueError(f"tensor {i} has dtype {t.dtype}, tensor 0 has {tensors[0].dtype}")
        return cls.from_shapes(kind, [tuple(t.shape) for t in tensors], itemsizes[0], tokens_per_block)


def _parse_shape(kind: LayoutKind, shape: tuple[int, ...], num_shapes: int,
                 t: int) -> tuple[int, int, int, int, int, int] | None:
    """(layers, num_blocks, T, kv_dim, heads, head_size) read off tensor 0's shape; None if impossible."""
    if kind is LayoutKind.VLLM_KV_FIRST:
        kv, nb, tt, h, d = shape
        return num_shapes, nb, tt, kv, h, d
    if kind is LayoutKind.VLLM_BLOCK_FIRST:
        nb, kv, tt, h, d = shape
        return num_shapes, nb, tt, kv, h, d
    if kind is LayoutKind.MLA:
        nb, tt, d = shape
        return num_shapes, nb, tt, 1, 1, d
    if kind is LayoutKind.BLOCK_FIRST:
        nb, layers, kv, tt, h, d = shape
        return layers, nb, tt, kv, h, d
    if kind is LayoutKind.SGLANG_HOST_PAGE_FIRST_DIRECT:
        kv, nb, layers, tt, h, d = shape
        return layers, nb, tt, kv, h, d
    if kind in _PACKED:
        if shape[3] % 2:
            return None
        if kind is LayoutKind.VLLM_PACKED_HND:
            nb, h, tt, d2 = shape
        else:
            nb, tt, h, d2 = shape
        return num_shapes, nb, tt, 2, h, d2 // 2
    if kind is LayoutKind.SGLANG:
        (tokens, h, d), layers, kv = shape, num_shapes // 2, 2
    elif kind is LayoutKind.SGLANG_HOST_LAYER_FIRST:
        kv, layers, tokens, h, d = shape
    elif kind is LayoutKind.SGLANG_HOST_PAGE_FIRST:
        kv, tokens, layers, h, d = shape
    elif kind is LayoutKind.SGLANG_HOST_MLA_LAYER_FIRST:
        (layers, tokens, h, d), kv = shape, 1
    else:
        (tokens, layers, h, d), kv = shape, 1
    if tokens % t:
        return None
    return max(layers, 1), tokens // t, t, kv, h, d


def _itemsize(t: Any) -> int:
    if isinstance(t, np.ndarray):
        return int(t.itemsize)
    return int(t.element_size())  # torch.Tensor


def _is_contiguous(t: Any) -> bool:
    if isinstance(t, np.ndarray):
        return bool(t.flags.c_contiguous)
    return bool(t.is_contiguous())


def tensor_addresses(tensors: Sequence[Any]) -> list[int]:
    """Start address of each numpy array (``ctypes.data``) or torch tensor (``data_ptr()``).

    The addresses stay valid only while the tensors are alive; the caller keeps them alive.
    """
    return [int(t.ctypes.data) if isinstance(t, np.ndarray) else int(t.data_ptr()) for t in tensors]


class VllmLayerView(NamedTuple):
    """How to register one vLLM (>= 0.26) layer view: permute its logical axes by ``order`` (then the
    tensor is contiguous) and reshape it to ``shape``, the flexkv tensor of layout ``kind``."""

    kind: LayoutKind
    order: tuple[int, int, int, int]
    shape: tuple[int, ...]


def vllm_layer_view(shape: Sequence[int], strides: Sequence[int], use_mla: bool,
                    tokens_per_block: int) -> VllmLayerView:
    """Classify one vLLM layer view: logical shape ``[blocks, heads, block_size, content]`` with the
    element ``strides`` vLLM gave it (the physical order is LBHNC or LBNHC; MLA has one head).

    A vLLM block of N tokens becomes N / T flexkv blocks (T = ``tokens_per_block``). Raises ValueError
    naming the problem for anything else: another rank, cross-layer or padded pages (a block not one
    dense region), N not a multiple of T, or LBHNC with N != T (its T-token slices are not contiguous).
    """
    if len(shape) != 4 or len(strides) != 4 or min(shape) <= 0:
        raise ValueError(f"vLLM layer view must be 4-D [blocks, heads, block_size, content], got shape {tuple(shape)}")
    nb, h, n, c = (int(x) for x in shape)
    st = tuple(int(x) for x in strides)
    _check_positive("tokens_per_block", tokens_per_block)
    if n % tokens_per_block:
        raise ValueError(f"vLLM block_size {n} is not a multiple of flexkv tokens_per_block {tokens_per_block}")
    k, t = n // tokens_per_block, tokens_per_block
    dense = "each block must be one dense region (cross-layer or padded KV layouts are not supported)"
    if use_mla:
        if h != 1:
            raise ValueError(f"MLA layer view must have one head, got {h}")
        if (st[0], st[2], st[3]) != (n * c, c, 1):
            raise ValueError(f"MLA layer view strides {st} for shape {tuple(shape)}: {dense}")
        return VllmLayerView(LayoutKind.MLA, (0, 1, 2, 3), (nb * k, t, c))
    if c % 2:
        raise ValueError(f"vLLM layer view content dim {c} is not 2*head_size (K and V packed)")
    if st == (h * n * c, n * c, c, 1):
        if k != 1:
            raise ValueError(f"vLLM layout LBHNC keeps each head's {n} tokens together, so a {t}-token flexkv "
                             f"block is not contiguous: set flexkv tokens_per_block={n} or VLLM_KV_CACHE_LAYOUT=LBNHC")
        return VllmLayerView(LayoutKind.VLLM_PACKED_HND, (0, 1, 2, 3), (nb, h, t, c))
    if st == (n * h * c, c, h * c, 1):
        return VllmLayerView(LayoutKind.VLLM_PACKED_NHD, (0, 2, 1, 3), (nb * k, t, h, c))
    raise ValueError(f"vLLM layer view strides {st} for shape {tuple(shape)} are neither LBHNC nor LBNHC: {dense}")


class BlockFirstLayout:
    """flexkv's CPU/SSD/remote block: one contiguous region holding the whole model's KV for T tokens.

    Order inside a block is ``[shard][layer][kv][T][H_shard][D]``: each TP rank's part of a block is one
    contiguous region of ``shard_bytes`` and each (layer, kv) chunk is contiguous. MLA has one shard that
    every rank shares.
    """

    def __init__(self, model: ModelConfig, tokens_per_block: int) -> None:
        _check_positive("tokens_per_block", tokens_per_block)
        self.model = model
        self.tokens_per_block = tokens_per_block
        self.num_layers = model.num_layers
        self.kv_dim = model.kv_dim
        self.num_shards = model.num_shards
        self.heads_per_shard = model.heads_per_shard
        self.chunk_bytes = model.chunk_bytes(tokens_per_block)
        self.shard_bytes = self.num_layers * self.kv_dim * self.chunk_bytes
        self.block_bytes = self.num_shards * self.shard_bytes

    def __repr__(self) -> str:
        return (f"BlockFirstLayout(layers={self.num_layers}, kv_dim={self.kv_dim}, shards={self.num_shards}, "
                f"chunk_bytes={self.chunk_bytes}, block_bytes={self.block_bytes})")

    def chunk_offset(self, layer: int, kv: int, shard: int) -> int:
        """Byte offset of chunk (layer, kv) of ``shard`` inside one block. Raises IndexError when out of range."""
        _check_index("layer", layer, self.num_layers)
        _check_index("kv", kv, self.kv_dim)
        _check_index("shard", shard, self.num_shards)
        return shard * self.shard_bytes + (layer * self.kv_dim + kv) * self.chunk_bytes

    def shard_chunk_offsets(self, shard: int) -> npt.NDArray[np.uint64]:
        """uint64 [num_layers * kv_dim]: offset of chunk (layer, kv) of ``shard``, index layer * kv_dim + kv."""
        _check_index("shard", shard, self.num_shards)
        idx = np.arange(self.num_layers * self.kv_dim, dtype=np.uint64)
        return np.uint64(shard * self.shard_bytes) + idx * np.uint64(self.chunk_bytes)

    def shard_of_rank(self, tp_rank: int) -> int:
        """Which shard TP rank ``tp_rank`` reads and writes (0 for MLA, where all ranks share one)."""
        _check_index("tp_rank", tp_rank, self.model.tp_size)
        return 0 if self.model.use_mla else tp_rank

    def check_engine_layout(self, engine: KVCacheLayout) -> None:
        """Raise ValueError naming the first field where one engine rank's layout disagrees with this one."""
        fmt = self.model.block_format
        if engine.kind.block_format is not fmt:
            assert isinstance(fmt, BlockFormat)
            raise ValueError(f"engine layout {engine.kind.value} stores blocks as {engine.kind.block_format.value}, "
                             f"this server holds {fmt.value} blocks (start it with "
                             f"ModelConfig(block_format={engine.kind.block_format.value!r}))")
        want = {"num_layers": self.num_layers, "kv_dim": self.kv_dim, "tokens_per_block": self.tokens_per_block,
                "num_heads": self.heads_per_shard, "head_size": self.model.head_size,
                "itemsize": self.model.itemsize}
        for name, value in want.items():
            got = getattr(engine, name)
            if got != value:
                raise ValueError(f"engine layout {name}={got} does not match the model's {value} "
                                 f"({engine.kind.value} layout vs {self!r})")

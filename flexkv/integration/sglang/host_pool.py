"""SGLang's HiCache host pool as a flexkv engine layout (pure geometry; no SGLang import).

SGLang 0.5.23's host pools (``sglang/srt/mem_cache/pool_host/mha.py`` and ``mla.py``) keep one
``kv_buffer`` tensor whose shape depends on ``layout``; a page of ``page_size`` host tokens is one flexkv
block. This module reads the pool's public attributes (``layout``, ``page_size``, ``kv_buffer``,
``layer_num``, ``head_num``, ``head_dim``; ``kv_cache_dim`` for MLA) and names the matching
:class:`~flexkv.layout.LayoutKind`, so the engine-side lane can copy pages by host index.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flexkv.common.config import ModelConfig
from flexkv.layout import KVCacheLayout, LayoutKind
from flexkv.types import DType

_MHA_KINDS = {"layer_first": LayoutKind.SGLANG_HOST_LAYER_FIRST, "page_first": LayoutKind.SGLANG_HOST_PAGE_FIRST,
              "page_first_direct": LayoutKind.SGLANG_HOST_PAGE_FIRST_DIRECT}
_MLA_KINDS = {"layer_first": LayoutKind.SGLANG_HOST_MLA_LAYER_FIRST,
              "page_first": LayoutKind.SGLANG_HOST_MLA_PAGE_FIRST}


class UnsupportedHostPool(ValueError):
    """The host pool's layout or shape is one flexkv cannot copy (the message says which and what is)."""


@dataclasses.dataclass(frozen=True)
class HostPoolView:
    """One SGLang rank's host pool as flexkv sees it: the layout, the tensor and the model shape."""

    layout: KVCacheLayout
    tensor: Any  # the pool's kv_buffer (torch, CPU)
    dtype: DType
    is_mla: bool

    @property
    def page_size(self) -> int:
        return self.layout.tokens_per_block

    def model_config(self) -> ModelConfig:
        """This rank's share of the model as one flexkv DP client of tp_size 1 (see docs/sglang.md)."""
        return ModelConfig(num_layers=self.layout.num_layers, num_kv_heads=self.layout.num_heads,
                           head_size=self.layout.head_size, dtype=self.dtype, use_mla=self.is_mla)


def describe_host_pool(pool: Any, is_mla: bool) -> HostPoolView:
    """The flexkv view of ``pool`` (an SGLang ``HostKVCache``). Raises UnsupportedHostPool naming the layout
    (supported: layer_first, page_first, page_first_direct; MLA: layer_first, page_first), a tensor that is
    not contiguous, or K and V head sizes that differ."""
    name = str(getattr(pool, "layout", ""))
    kinds = _MLA_KINDS if is_mla else _MHA_KINDS
    if name not in kinds:
        raise UnsupportedHostPool(f"host pool layout {name!r} is not supported for {'MLA' if is_mla else 'MHA'} "
                                  f"models; use --hicache-mem-layout {' or '.join(kinds)}")
    tensor = pool.kv_buffer
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise UnsupportedHostPool(f"host pool kv_buffer must be a contiguous CPU tensor, got {tensor.device} "
                                  f"contiguous={tensor.is_contiguous()}")
    if not is_mla and getattr(pool, "v_head_dim", pool.head_dim) != pool.head_dim:
        raise UnsupportedHostPool(f"K head size {pool.head_dim} != V head size {pool.v_head_dim}")
    try:
        layout = KVCacheLayout.from_shapes(kinds[name], [tuple(tensor.shape)], tensor.element_size(),
                                           int(pool.page_size))
    except ValueError as e:
        raise UnsupportedHostPool(f"host pool kv_buffer: {e}") from None
    return HostPoolView(layout, tensor, DType.parse(tensor.dtype), is_mla)


def page_slice(tensor: Any, layout_name: str, is_mla: bool, page: int, page_size: int) -> Any:
    """The view of host page ``page`` that SGLang's ``get_data_page`` flattens (same element order)."""
    s = slice(page * page_size, (page + 1) * page_size)
    if layout_name == "page_first_direct":
        return tensor[:, page:page + 1]
    if layout_name == "layer_first":
        return tensor[:, s] if is_mla else tensor[:, :, s]
    return tensor[s] if is_mla else tensor[:, s]


class StagingPages:
    """A small private pool in the host pool's layout for SGLang's generic (tensor) interface: pages are
    copied between SGLang's flat page tensors and here, and flexkv moves them from here. Two halves,
    one for gets and one for puts, each guarded by its own lock."""

    def __init__(self, host: HostPoolView, layout_name: str, pages_per_direction: int) -> None:
        import threading

        import torch

        self.layout_name, self.per_direction = layout_name, pages_per_direction
        lay = dataclasses.replace(host.layout, num_blocks=2 * pages_per_direction)
        tensor = torch.empty(lay.tensor_shape(0), dtype=host.tensor.dtype)
        self.view = HostPoolView(lay, tensor, host.dtype, host.is_mla)
        self.locks = (threading.Lock(), threading.Lock())  # gets, puts

    def first_page(self, is_get: bool) -> int:
        return 0 if is_get else self.per_direction

    def page(self, page: int) -> Any:
        return page_slice(self.view.tensor, self.layout_name, self.view.is_mla, page, self.view.page_size)

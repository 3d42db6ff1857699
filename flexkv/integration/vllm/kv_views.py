"""vLLM's per-layer KV views -> the tensors and layout one TP rank registers with flexkv.

vLLM (>= 0.26) hands the connector one logical ``[blocks, heads, block_size, content]`` view per
attention layer over one buffer; the physical order (LBHNC or LBNHC; MLA has one head) shows in the
strides. flexkv.layout.vllm_layer_view classifies them; here they are permuted into contiguous
tensors of flexkv-sized blocks (no copy: the same memory). Runs in the worker process.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flexkv.layout import KVCacheLayout, LayoutKind, vllm_layer_view
from flexkv.types import DType, InvalidRequest


def engine_tensors(kv_caches: Mapping[str, Any], use_mla: bool,
                   tokens_per_block: int) -> tuple[list[Any], KVCacheLayout]:
    """The flexkv tensors (one per layer, in vLLM's layer order) and their layout.

    Raises InvalidRequest naming the layer and the problem: views of different layouts, shapes or
    dtypes, a layout flexkv does not support (cross-layer, padded, LBHNC split into smaller blocks).
    """
    if not kv_caches:
        raise InvalidRequest("register_kv_caches: vLLM passed no KV cache tensors")
    tensors, kinds = [], set()
    for name, view in kv_caches.items():
        if isinstance(view, (list, tuple)):
            raise InvalidRequest(f"layer {name}: a list of tensors (a pre-0.26 vLLM layout) is not supported")
        try:
            info = vllm_layer_view(tuple(view.shape), tuple(view.stride()), use_mla, tokens_per_block)
            DType.parse(view.dtype)
        except ValueError as e:
            raise InvalidRequest(f"layer {name}: {e}") from None
        kinds.add(info.kind)
        flat = view.permute(*info.order).reshape(info.shape)
        if flat.data_ptr() != view.data_ptr() or not flat.is_contiguous():
            raise InvalidRequest(f"layer {name}: the {info.kind.value} view is not one dense region")
        tensors.append(flat)
    if len(kinds) != 1:
        raise InvalidRequest(f"register_kv_caches: layers have different layouts {sorted(k.value for k in kinds)}")
    kind: LayoutKind = kinds.pop()
    try:
        layout = KVCacheLayout.from_tensors(kind, tensors, tokens_per_block)
    except ValueError as e:
        raise InvalidRequest(f"register_kv_caches: {e}") from None
    return tensors, layout

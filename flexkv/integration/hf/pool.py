"""The HF engine's paged KV pool: the memory flexkv restores into and stores from.

Per layer one K and one V buffer ``[num_pages * T, kv_heads, head_dim]`` (flexkv's SGLang layout), on
the CPU in host shared memory (so the device worker process can reach it) or on a CUDA device (shared
with the GPU worker through CUDA IPC at registration). A page holds one flexkv block (T tokens). The
model itself computes with a DynamicCache; pages are where a request's whole blocks live while flexkv
copies them in (GET) or out (PUT).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from flexkv.client import HostKVBuffers, allocate_host_kv_buffers
from flexkv.layout import KVCacheLayout, LayoutKind
from flexkv.types import DType


def cache_layout(rows: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V rows ``[tokens, kv_heads, head_dim]`` (the pool's layout) seen as a cache layer's
    ``[1, kv_heads, tokens, head_dim]``: views, no copy (the layer's first forward concatenates them)."""
    return rows[0].permute(1, 0, 2).unsqueeze(0), rows[1].permute(1, 0, 2).unsqueeze(0)


class PagedKVPool:
    """Pages of KV for ``num_layers`` layers; ``alloc``/``free`` hand out page ids (one owner thread)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int, tokens_per_page: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokens_per_page = tokens_per_page
        itemsize = torch.empty(0, dtype=dtype).element_size()
        self.layout = KVCacheLayout(LayoutKind.SGLANG, num_layers, num_pages, tokens_per_page, num_kv_heads,
                                    head_dim, itemsize)
        self.host: HostKVBuffers | None = None
        if self.device.type == "cpu":
            self.host = allocate_host_kv_buffers(self.layout, DType.parse(str(dtype).removeprefix("torch.")),
                                                 tag="hfkv")
            self.tensors: list[torch.Tensor] = self.host.torch_tensors()
            weakref.finalize(self, self.host.close)  # a pool never closed still leaves no segment at exit
        else:
            shape = self.layout.tensor_shape(0)
            self.tensors = [torch.zeros(shape, dtype=dtype, device=self.device)
                            for _ in range(self.layout.num_tensors)]
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_pages(self) -> int:
        return self.layout.num_blocks

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def register_with(self) -> Sequence[torch.Tensor] | HostKVBuffers:
        """What to pass to ``register_kv_buffers``: the shared-memory buffers, or the CUDA tensors."""
        return self.host if self.host is not None else self.tensors

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= len(self._free)

    def allocate(self, num_pages: int) -> list[int]:
        """``num_pages`` free page ids; ValueError when there are fewer."""
        if not self.can_allocate(num_pages):
            raise ValueError(f"{num_pages} pages wanted, {len(self._free)} free")
        if num_pages <= 0:
            return []
        taken = self._free[-num_pages:][::-1]  # the order pop() would give, without a call per page
        del self._free[-num_pages:]
        return taken

    def free(self, pages: Sequence[int]) -> None:
        self._free.extend(reversed(pages))

    def slot_mapping(self, pages: Sequence[int], num_tokens: int) -> npt.NDArray[np.int64]:
        """Token-level slots of the first ``num_tokens`` tokens held in ``pages`` (page p, token j: p*T + j)."""
        t = self.tokens_per_page
        if num_tokens > len(pages) * t:
            raise ValueError(f"{num_tokens} tokens do not fit in {len(pages)} pages of {t}")
        rows = np.asarray(pages, dtype=np.int64)[:, None] * t + np.arange(t, dtype=np.int64)
        return rows.reshape(-1)[:num_tokens]

    def _page_view(self, layer: int, kv: int) -> torch.Tensor:
        t = self.tensors[2 * layer + kv]
        return t.view(self.num_pages, self.tokens_per_page, *t.shape[1:])

    def page_index(self, pages: Sequence[int]) -> torch.Tensor | slice:
        """How :meth:`row_index` and :meth:`write_layer` find ``pages`` fastest: consecutive pages as a
        slice (read as a view, no copy), any others as an index tensor on the pool's device. Make it once
        per request: building the tensor on a GPU is a host -> device copy behind the queued work."""
        ids = list(pages)
        if ids and ids == list(range(ids[0], ids[0] + len(ids))):
            return slice(ids[0], ids[0] + len(ids))
        idx = torch.as_tensor(ids, dtype=torch.long)
        if self.device.type != "cuda":
            return idx
        return idx.pin_memory().to(self.device, non_blocking=True)

    def row_index(self, pages: Sequence[int], num_tokens: int) -> torch.Tensor | slice:
        """How :meth:`read_rows` finds the first ``num_tokens`` tokens of ``pages``: one slice of rows for
        consecutive pages, else a token index on the pool's device (make it once per request)."""
        if not 0 <= num_tokens <= len(pages) * self.tokens_per_page:
            raise ValueError(f"{num_tokens} tokens are not within {len(pages)} pages of {self.tokens_per_page}")
        ref = self.page_index(pages)
        if isinstance(ref, slice):
            start = ref.start * self.tokens_per_page
            return slice(start, start + num_tokens)
        t = self.tokens_per_page
        rows = (ref.unsqueeze(1) * t + torch.arange(t, device=ref.device)).flatten()[:num_tokens]
        return rows

    def read_rows(self, layer: int, rows: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of layer ``layer`` at ``rows`` (:meth:`row_index`) in the pool's own layout, ``[tokens,
        kv_heads, head_dim]``: views of the pool for a slice (valid until the pages are written again), one
        gather per tensor otherwise."""
        k, v = self.tensors[2 * layer], self.tensors[2 * layer + 1]
        if isinstance(rows, slice):
            return k[rows], v[rows]
        return k.index_select(0, rows), v.index_select(0, rows)

    def read_layer(self, layer: int, pages: Sequence[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the first ``num_tokens`` tokens in ``pages`` as ``[1, kv_heads, num_tokens, head_dim]``
        (:meth:`read_rows`, seen in the cache's layout: :func:`cache_layout`)."""
        return cache_layout(self.read_rows(layer, self.row_index(pages, num_tokens)))

    def write_layer(self, layer: int, pages: Sequence[int] | torch.Tensor | slice, key: torch.Tensor,
                    value: torch.Tensor) -> None:
        """Store ``[1, kv_heads, len(pages) * T, head_dim]`` K and V into ``pages`` (whole pages only)."""
        t = self.tokens_per_page
        ref = pages if isinstance(pages, (torch.Tensor, slice)) else self.page_index(pages)
        count = ref.stop - ref.start if isinstance(ref, slice) else len(ref)
        if key.shape[2] != count * t:
            raise ValueError(f"{key.shape[2]} tokens do not fill {count} pages of {t}")
        for kv, src in ((0, key), (1, value)):
            rows = src[0].transpose(0, 1).reshape(count, t, src.shape[1], src.shape[3]).to(self.dtype)
            if isinstance(ref, slice):
                self._page_view(layer, kv)[ref].copy_(rows)
            else:
                self._page_view(layer, kv).index_copy_(0, ref, rows)

    def close(self) -> None:
        """Release the buffers (after the flexkv server stopped using them)."""
        self.tensors = []
        if self.host is not None:
            self.host.close()
            self.host = None

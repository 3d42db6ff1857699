"""Test helpers for the SGLang backend: a flexkv server process, an SGLang-shaped host pool, the backend
built by SGLang's own StorageBackendFactory, and SGLang's own page keys."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.layout import KVCacheLayout, LayoutKind
from tests.runtime.kvtest import start_server

P, L, H, D = 4, 3, 2, 8  # SGLang page size, layers, KV heads (this rank), head size
HOST_PAGES = 24
_KINDS = {"layer_first": LayoutKind.SGLANG_HOST_LAYER_FIRST, "page_first": LayoutKind.SGLANG_HOST_PAGE_FIRST,
          "page_first_direct": LayoutKind.SGLANG_HOST_PAGE_FIRST_DIRECT}
_MLA_KINDS = {"layer_first": LayoutKind.SGLANG_HOST_MLA_LAYER_FIRST,
              "page_first": LayoutKind.SGLANG_HOST_MLA_PAGE_FIRST}


OUR_PIDS: set[int] = set()  # processes these tests started (their segments are checked for leaks)


def server_model(mla: bool = False, dp_size: int = 4) -> ModelConfig:
    return ModelConfig(num_layers=L, num_kv_heads=1 if mla else H, head_size=D, dtype="float16", use_mla=mla,
                       dp_size=dp_size)


class HostPool:
    """The attributes of SGLang 0.5.23's MHATokenToKVPoolHost / MLATokenToKVPoolHost that a storage backend
    reads, with ``kv_buffer`` in SGLang's shape for ``layout``. (SGLang's own class needs transformers
    and a device pool, which the --no-deps install lacks.)"""

    def __init__(self, layout: str, mla: bool = False, pages: int = HOST_PAGES, seed: int = 0) -> None:
        self.layout, self.page_size, self.size = layout, P, pages * P
        self.layer_num, self.head_num, self.head_dim, self.v_head_dim = L, 1 if mla else H, D, D
        self.dtype = torch.float16
        kind = (_MLA_KINDS if mla else _KINDS)[layout]
        lay = KVCacheLayout(kind, L, pages, P, self.head_num, D, 2)
        # Private memory of this process, as SGLang allocates it: only the engine-side lane can reach it.
        self.kv_buffer = torch.empty(lay.tensor_shape(0), dtype=torch.float16)
        self.mla = mla
        gen = torch.Generator().manual_seed(seed)
        self.kv_buffer.view(torch.int16).copy_(torch.randint(-32768, 32767, self.kv_buffer.shape,
                                                             dtype=torch.int16, generator=gen))

    def page(self, page: int) -> bytes:
        """Every byte SGLang's indexing assigns to host page ``page`` (all layers, K and V)."""
        s = slice(page * P, (page + 1) * P)
        b = self.kv_buffer
        if self.layout == "page_first_direct":
            return b[:, page].contiguous().numpy().tobytes()
        if self.mla:
            return (b[:, s] if self.layout == "layer_first" else b[s]).contiguous().numpy().tobytes()
        return (b[:, :, s] if self.layout == "layer_first" else b[:, s]).contiguous().numpy().tobytes()

    def flat_page(self, page: int) -> torch.Tensor:
        """What SGLang's ``get_data_page(page * page_size, flat=True)`` returns (a copy)."""
        s = slice(page * P, (page + 1) * P)
        b = self.kv_buffer
        if self.layout == "page_first_direct":
            return b[:, page:page + 1].flatten()
        if self.mla:
            return (b[:, s] if self.layout == "layer_first" else b[s]).flatten()
        return (b[:, :, s] if self.layout == "layer_first" else b[:, s]).flatten().clone()

    def poison(self, pages: list[int]) -> None:
        for p in pages:
            s = slice(p * P, (p + 1) * P)
            b = self.kv_buffer.view(torch.int16)
            if self.layout == "page_first_direct":
                b[:, p] = 0x5A5A
            elif self.mla:
                (b[:, s] if self.layout == "layer_first" else b[s]).fill_(0x5A5A)
            else:
                (b[:, :, s] if self.layout == "layer_first" else b[:, s]).fill_(0x5A5A)



def host_indices(pages: list[int]) -> torch.Tensor:
    return torch.tensor([p * P + j for p in pages for j in range(P)], dtype=torch.int64)


def page_keys(num_pages: int, seed: int) -> list[str]:
    """SGLang's own chained storage keys for random token pages."""
    from sglang.srt.mem_cache.utils import get_storage_hash_str

    toks = np.random.default_rng(seed).integers(0, 50_000, num_pages * P).tolist()
    return list(get_storage_hash_str(toks, None, page_size=P))


def make_backend(address: str, pool: HostPool, tp_rank: int = 0, tp_size: int = 1, client_id_base: int = 0,
                 **extra: Any) -> Any:
    """The backend as SGLang builds it: StorageBackendFactory "dynamic", then register_mem_pool_host."""
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    cfg = HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=pool.mla, enable_storage_metrics=False, is_page_first_layout=pool.layout != "layer_first",
        model_name="test-model",
        extra_config={"backend_name": "flexkv", "module_path": "flexkv.integration.sglang.storage",
                      "class_name": "FlexKVHiCacheStorage", "interface_v1": 1,
                      "hicache_storage_pass_prefix_keys": True, "flexkv_server_address": address,
                      "flexkv_client_id_base": client_id_base, "flexkv_timeout_s": 20.0,
                      "flexkv_retry_interval_s": 0.5, **extra})
    backend = StorageBackendFactory.create_backend("dynamic", cfg, pool)
    backend.register_mem_pool_host(pool)
    return backend


@contextlib.contextmanager
def flexkv_server(address: str, model: ModelConfig, num_cpu_blocks: int = 256,
                  cache: CacheConfig | None = None) -> Iterator[list[Any]]:
    """A flexkv server process at ``address`` (``cache``: its whole cache config instead); the yielded list
    holds it (tests may replace it)."""
    procs = [launch_server(model, address, num_cpu_blocks, cache)]
    try:
        yield procs
    finally:
        for proc in procs:
            stop_server(proc)


def launch_server(model: ModelConfig, address: str, num_cpu_blocks: int = 256, cache: CacheConfig | None = None) -> Any:
    proc = start_server(model, cache or CacheConfig(tokens_per_block=P, num_cpu_blocks=num_cpu_blocks), address)
    OUR_PIDS.add(proc.pid)  # type: ignore[attr-defined]
    return proc


def our_segments(names: set[str]) -> set[str]:
    """Segments created by this process or one these tests started (names are /flexkv-<tag>-<pid>-<rand>)."""
    import os

    pids = OUR_PIDS | {os.getpid()}
    return {n for n in names if n.split("-")[-2].isdigit() and int(n.split("-")[-2]) in pids}


def stop_server(proc: Any) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

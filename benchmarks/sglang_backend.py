"""flexkv as SGLang's HiCache storage backend: batch_set_v1 / batch_get_v1 throughput through the whole
stack (SGLang's StorageBackendFactory, key hashing, a flexkv server process, the engine-side lane's C host
copy in this process) beside a plain memcpy (np.copyto) of the same bytes measured in the same run.

Default: Llama-3-8B KV (32 layers, 8 KV heads, head 128, bf16) at SGLang page size 64 (8 MiB per page),
8 pages per call, a host pool of 16 pages in each of SGLang's host layouts. Each set uses fresh keys
(a real store of new pages); each get loads pages stored just before into other host pages. Goal: >= 80%
of the memcpy.

    python benchmarks/sglang_backend.py                      # ~1 min on a 2-core sandbox
    python benchmarks/sglang_backend.py --layouts page_first --pages-per-call 16 --repeat 5
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from flexkv.common.config import CacheConfig, ModelConfig, configs_to_json


class HostPool:
    """The attributes of SGLang's MHATokenToKVPoolHost a storage backend reads (private CPU memory)."""

    def __init__(self, layout: str, pages: int, page_size: int, layers: int, heads: int, head_dim: int) -> None:
        self.layout, self.page_size, self.size = layout, page_size, pages * page_size
        self.layer_num, self.head_num, self.head_dim, self.v_head_dim = layers, heads, head_dim, head_dim
        self.dtype = torch.bfloat16
        shape = {"layer_first": (2, layers, self.size, heads, head_dim),
                 "page_first": (2, self.size, layers, heads, head_dim),
                 "page_first_direct": (2, pages, layers, page_size, heads, head_dim)}[layout]
        self.kv_buffer = torch.ones(shape, dtype=torch.bfloat16)  # touched: no page faults in the timing


def make_backend(address: str, pool: HostPool) -> Any:
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    cfg = HiCacheStorageConfig(
        tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1, is_mla_model=False,
        enable_storage_metrics=False, is_page_first_layout=pool.layout != "layer_first", model_name="bench",
        extra_config={"backend_name": "flexkv", "module_path": "flexkv.integration.sglang.storage",
                      "class_name": "FlexKVHiCacheStorage", "interface_v1": 1,
                      "hicache_storage_pass_prefix_keys": True, "flexkv_server_address": address})
    backend = StorageBackendFactory.create_backend("dynamic", cfg, pool)
    backend.register_mem_pool_host(pool)
    return backend


@contextlib.contextmanager
def server(model: ModelConfig, cache: CacheConfig, address: str) -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, "-m", "flexkv.scheduler.main", "--configs-json",
                             configs_to_json(model, cache), "--address", address])
    try:
        from flexkv.kvmanager import KVManager

        probe = KVManager(model, cache, address, start_timeout_s=300)  # the pool is pre-faulted first
        probe.start()
        probe.shutdown()
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def best(fns: list[Callable[[], None]], repeat: int) -> list[float]:
    """Best seconds of each function, runs interleaved so a noisy neighbour hits them alike."""
    out = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            out[i] = min(out[i], time.perf_counter() - t0)
    return out


def run_layout(address: str, layout: str, seed: int, args: argparse.Namespace) -> None:
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageExtraInfo

    n, p = args.pages_per_call, args.page_size
    pool = HostPool(layout, 2 * n, p, args.layers, args.heads, args.head_size)
    backend = make_backend(address, pool)
    rng = np.random.default_rng(seed)  # fresh keys per layout: every set stores new pages
    idx_set = torch.arange(n * p, dtype=torch.int64)
    idx_get = torch.arange(n * p, 2 * n * p, dtype=torch.int64)
    stored: list[list[str]] = []

    def do_set() -> None:
        keys = [f"{x:032x}" for x in rng.integers(0, 2**62, n)]
        ok = backend.batch_set_v1(keys, idx_set, HiCacheStorageExtraInfo(prefix_keys=[]))
        assert all(ok), f"batch_set_v1 stored only {sum(ok)} of {n} pages"
        stored.append(keys)

    def do_get() -> None:
        ok = backend.batch_get_v1(stored[-1], idx_get, HiCacheStorageExtraInfo(prefix_keys=[]))
        assert all(ok), f"batch_get_v1 loaded only {sum(ok)} of {n} pages"

    total = n * p * args.layers * 2 * args.heads * args.head_size * 2
    src, dst = np.ones(total, dtype=np.uint8), np.zeros(total, dtype=np.uint8)

    def memcpy() -> None:
        np.copyto(dst, src)

    for warm_up in (do_set, do_get, memcpy):  # first-call costs, page faults
        warm_up()
    t_set, t_get, t_mem = best([do_set, do_get, memcpy], args.repeat)
    base = total / t_mem / 1e9
    for name, sec in (("batch_set_v1", t_set), ("batch_get_v1", t_get)):
        gbps = total / sec / 1e9
        print(f"{layout:<18} {name:<13} {total / 2**20:>8.0f} {gbps:>8.2f} {base:>12.2f} {gbps / base:>7.0%}")
    backend.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-size", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--pages-per-call", type=int, default=8)
    ap.add_argument("--layouts", nargs="+", default=["layer_first", "page_first", "page_first_direct"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model = ModelConfig(args.layers, args.heads, args.head_size, "bfloat16")
    # Room for every stored page: a get never meets an evicted page.
    blocks = args.pages_per_call * (args.repeat + 2) * len(args.layouts) + 8
    cache = CacheConfig(tokens_per_block=args.page_size, num_cpu_blocks=blocks)
    page_mib = args.page_size * args.layers * 2 * args.heads * args.head_size * 2 / 2**20
    print(f"page {args.page_size} tokens = {page_mib:.0f} MiB, {args.pages_per_call} pages per call, "
          f"flexkv CPU pool {blocks} blocks ({blocks * page_mib / 1024:.1f} GiB)")
    print(f"{'host layout':<18} {'call':<13} {'MiB':>8} {'GB/s':>8} {'memcpy GB/s':>12} {'ratio':>7}")
    with tempfile.TemporaryDirectory(prefix="flexkv-bench-") as tmp:
        address = f"ipc://{tmp}/server.sock"
        with server(model, cache, address):
            for seed, layout in enumerate(args.layouts):
                run_layout(address, layout, seed, args)


if __name__ == "__main__":
    main()

"""Helpers for end-to-end tests: small models, host KV buffers, block-level byte checks."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pytest

from flexkv import native
from flexkv.client import HostKVBuffers, allocate_host_kv_buffers
from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.layout import KVCacheLayout, LayoutKind

if TYPE_CHECKING:
    from flexkv.kvmanager import KVManager

T = 4  # tokens per block in these tests: small blocks, many of them


def small_model(tp_size: int = 1, use_mla: bool = False, dp_size: int = 1) -> ModelConfig:
    heads = 1 if use_mla else 4
    return ModelConfig(num_layers=3, num_kv_heads=heads, head_size=8, dtype="float16", use_mla=use_mla,
                       tp_size=tp_size, dp_size=dp_size)


def small_cache(num_cpu_blocks: int = 64, **kw: object) -> CacheConfig:
    return CacheConfig(tokens_per_block=T, num_cpu_blocks=num_cpu_blocks, **kw)  # type: ignore[arg-type]


def needs_ssd_tier() -> None:
    """Call first in a test that starts a server with an SSD tier. Where the build skipped the io_uring
    extension on purpose (``FLEXKV_SKIP_EXTENSIONS=uring``, as ``benchmarks/gpu_e2e_check.sh`` does on a
    machine without liburing) the test skips, saying so; anywhere else a missing extension fails it."""
    skipped = {n.strip() for n in os.environ.get("FLEXKV_SKIP_EXTENSIONS", "").split(",")}
    if "uring" in skipped and not native.built("uring"):
        pytest.skip("the SSD tier needs the io_uring extension, which this build skipped "
                    "(FLEXKV_SKIP_EXTENSIONS=uring)")


def rank_layout(model: ModelConfig, kind: LayoutKind, num_blocks: int) -> KVCacheLayout:
    heads = 1 if model.use_mla else model.num_kv_heads // model.tp_size
    if kind is not LayoutKind.MLA and model.use_mla:
        kind = LayoutKind.MLA
    return KVCacheLayout(kind=kind, num_layers=model.num_layers, num_blocks=num_blocks, tokens_per_block=T,
                         num_heads=heads, head_size=model.head_size, itemsize=model.itemsize)


def host_buffers(model: ModelConfig, kind: LayoutKind, num_blocks: int, seed: int) -> HostKVBuffers:
    bufs = allocate_host_kv_buffers(rank_layout(model, kind, num_blocks), model.dtype, tag="test")
    rng = np.random.default_rng(seed)
    for a in bufs.arrays:
        a.view(np.uint8)[...] = rng.integers(0, 256, a.nbytes, dtype=np.uint8).reshape(a.view(np.uint8).shape)
    return bufs


def block_bytes(bufs: HostKVBuffers, block_id: int) -> bytes:
    """All bytes of engine block ``block_id`` across every tensor, in a fixed order."""
    lay = bufs.layout
    out = []
    for layer in range(lay.num_layers):
        for kv in range(lay.kv_dim):
            t, off = lay.chunk_offset(layer, kv, block_id)
            raw = bufs.arrays[t].reshape(-1).view(np.uint8)
            out.append(raw[off: off + lay.chunk_bytes].tobytes())
    return b"".join(out)


def poison(bufs: HostKVBuffers, block_ids: list[int]) -> None:
    lay = bufs.layout
    for b in block_ids:
        for layer in range(lay.num_layers):
            for kv in range(lay.kv_dim):
                t, off = lay.chunk_offset(layer, kv, b)
                bufs.arrays[t].reshape(-1).view(np.uint8)[off: off + lay.chunk_bytes] = 0xAB


def slots_for(block_ids: list[int], num_tokens: int) -> np.ndarray:
    """Token-level slot mapping putting token i into block block_ids[i // T]."""
    i = np.arange(num_tokens)
    return (np.asarray(block_ids, dtype=np.int64)[i // T] * T + i % T).astype(np.int64)


def tokens(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, n, dtype=np.int64)


def tp_rank_process(address: str, model: ModelConfig, kind: str, num_blocks: int, rank: int, dp_client_id: int,
                    conn: object) -> None:
    """A TP rank in its own process: allocate, fill, register; answer ("block", id) / ("poison", ids) / "stop"."""
    from flexkv.client import KVTPClient

    bufs = host_buffers(model, LayoutKind(kind), num_blocks, seed=100 if model.use_mla else 100 + rank)
    client = KVTPClient(address, dp_client_id=dp_client_id, tp_rank=rank)
    client.register(bufs, bufs.layout)
    conn.send("registered")  # type: ignore[attr-defined]
    while True:
        req = conn.recv()  # type: ignore[attr-defined]
        if req == "stop":
            break
        if req[0] == "block":
            conn.send(block_bytes(bufs, req[1]))  # type: ignore[attr-defined]
        elif req[0] == "poison":
            poison(bufs, req[1])
            conn.send("ok")  # type: ignore[attr-defined]
    client.close()
    bufs.close()


def start_server(model: ModelConfig, cache: CacheConfig, address: str) -> object:
    """A server process in server mode (what examples/run_server.py runs)."""
    import subprocess
    import sys

    from flexkv.common.config import configs_to_json

    return subprocess.Popen([sys.executable, "-m", "flexkv.scheduler.main", "--configs-json",
                             configs_to_json(model, cache), "--address", address])


@contextlib.contextmanager
def serving(model: ModelConfig, cache: CacheConfig, kind: LayoutKind, num_blocks: int,
            seed: int) -> Iterator[tuple[KVManager, HostKVBuffers]]:
    """A library-mode KVManager with one rank's random host KV buffers registered; both cleaned up."""
    from flexkv.kvmanager import KVManager

    bufs = host_buffers(model, kind, num_blocks, seed)
    kvm = KVManager(model, cache)
    try:
        kvm.start()
        kvm.register_kv_buffers(bufs, bufs.layout)
        yield kvm, bufs
    finally:
        kvm.shutdown()
        bufs.close()


def ssd_slot(cache: CacheConfig, model: ModelConfig, block_hash: int, tokens_per_block: int = T) -> tuple[str, int]:
    """(data file, byte offset) of the SSD slot holding ``block_hash``, found in the tier's journal."""
    import os

    from flexkv.common.config import kv_fingerprint
    from flexkv.ssd_journal import journal_path, scan
    from flexkv.workers.ssd_store import SLOT_ALIGN, SSDLayout

    found = scan(journal_path(cache.ssd_cache_dir[0]), kv_fingerprint(model, tokens_per_block), None,
                 cache.num_ssd_blocks)
    rows = np.flatnonzero(found.records["block_hash"] == np.uint64(block_hash))
    assert rows.size == 1, "every block written has one journal record"
    block = model.block_bytes(tokens_per_block)
    slot = -(-block // SLOT_ALIGN) * SLOT_ALIGN
    layout = SSDLayout(len(cache.ssd_cache_dir), cache.num_ssd_blocks, block, slot, cache.ssd_max_file_bytes // slot)
    d, f, off = layout.locate(found.records["ssd_id"][rows].astype(np.int64))
    return os.path.join(cache.ssd_cache_dir[int(d[0])], f"flexkv_ssd_{int(f[0]):04d}.data"), int(off[0])


def flip_byte(path: str, offset: int) -> None:
    """Corrupt one byte on disk (its block then fails its checksum)."""
    import os

    fd = os.open(path, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([byte[0] ^ 0x5A]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)

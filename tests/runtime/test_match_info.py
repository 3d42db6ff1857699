"""get_match_info on a real server with a real SSD tier (O_DIRECT files): the per-tier split of a
matched prefix is exact, the read rates are the priors until a tier is read and then measured, and
the match reserves exactly what get_match reserves (launch it or cancel it; nothing leaks)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flexkv.cli.stats import fetch_snapshot
from flexkv.client import HostKVBuffers
from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.kvmanager import KVManager
from flexkv.layout import LayoutKind
from flexkv.types import Medium, TaskStatus
from tests.runtime.kvtest import T, block_bytes, host_buffers, needs_ssd_tier, poison, slots_for, tokens

pytestmark = pytest.mark.timeout(120)

# 4 KiB blocks (4 layers x K,V x 4 tokens x 4 heads x 16 dims x fp16): aligned, so O_DIRECT is used
MODEL = ModelConfig(num_layers=4, num_kv_heads=4, head_size=16, dtype="float16")
CPU_BLOCKS = 16
BB = 4096


def cache(tmp_path: Path, **kw: object) -> CacheConfig:
    needs_ssd_tier()
    d = tmp_path / "nvme0"
    d.mkdir(exist_ok=True)
    return CacheConfig(tokens_per_block=T, num_cpu_blocks=CPU_BLOCKS, enable_ssd=True, num_ssd_blocks=256,
                       ssd_cache_dir=(str(d),), **kw)  # type: ignore[arg-type]


@pytest.fixture
def kvm(tmp_path: Path) -> Iterator[tuple[KVManager, HostKVBuffers]]:
    m = KVManager(MODEL, cache(tmp_path, ssd_read_gbps=0.5))
    m.start()
    bufs = host_buffers(MODEL, LayoutKind.VLLM_KV_FIRST, num_blocks=64, seed=31)
    try:
        m.register_kv_buffers(bufs, bufs.layout)
        yield m, bufs
    finally:
        m.shutdown()
        bufs.close()


def _put(kvm: KVManager, toks: object, blocks: list[int]) -> None:
    tid = kvm.put_async(toks, slots_for(blocks, len(toks)))  # type: ignore[arg-type]
    assert kvm.wait(tid, timeout=30, completely=True)[tid].status is TaskStatus.SUCCESS


def test_the_split_of_a_mixed_cpu_ssd_prefix_is_exact_and_its_bytes_too(
        kvm: tuple[KVManager, HostKVBuffers]) -> None:
    m, bufs = kvm
    a = tokens(12 * T, seed=1)
    _put(m, a, list(range(12)))  # 12 blocks in CPU and (write-through) on SSD
    _put(m, tokens(8 * T, seed=2), list(range(12, 20)))  # 20 > 16: a's last 4 blocks (LRU leaves) leave CPU
    stats = m.stats()
    assert stats["cpu_evicted_blocks"] == 4 and stats["ssd_used_blocks"] == 20
    assert (stats["read_bps_ssd"], stats["read_samples_ssd"]) == (0.5e9, 0), "the prior, before any SSD read"

    info = m.get_match_info(a)
    assert info.mask.all() and info.num_tokens == 12 * T
    assert (info.num_cpu_blocks, info.num_ssd_blocks, info.num_remote_blocks) == (8, 4, 0)
    assert info.num_cpu_tokens == 8 * T and info.block_bytes == MODEL.block_bytes(T) == BB
    assert info.read_bps[Medium.SSD] == 0.5e9 and info.read_bps[Medium.CPU] == 20e9
    assert info.load_s == pytest.approx(4 * BB / 0.5e9 + 12 * BB / 20e9)
    dst = list(range(40, 52))
    poison(bufs, dst)
    m.launch(info.task_id, slots_for(dst, len(a)))
    assert m.wait(info.task_id, timeout=30)[info.task_id].status is TaskStatus.SUCCESS
    assert all(block_bytes(bufs, d) == block_bytes(bufs, s) for s, d in zip(range(12), dst, strict=True))
    # what the workers report moving agrees: the SSD worker read exactly the 4 blocks of the split
    snap = fetch_snapshot(m.server_address, 10)
    assert snap["counters"]["op_bytes"]["DISK2H"] == 4 * BB
    assert snap["counters"]["op_counts"]["DISK2H|ok"] == 1
    assert snap["read_rates"]["read_samples_ssd"] == 1 and snap["read_rates"]["read_samples_cpu"] >= 1
    measured = m.stats()["read_bps_ssd"]
    assert measured != 0.5e9 and measured > 0, "one DISK2H measured moves the rate off the prior"

    # promoted back: all 12 in CPU now; a token mask's split counts only what is loaded
    again = m.get_match_info(a)
    assert (again.num_cpu_blocks, again.num_ssd_blocks, again.num_remote_blocks) == (12, 0, 0)
    assert again.read_bps[Medium.SSD] == measured
    m.cancel(again.task_id)
    miss = m.get_match_info(tokens(6 * T, seed=9))
    assert miss.num_tokens == 0 and (miss.num_cpu_blocks, miss.num_ssd_blocks) == (0, 0)
    m.cancel(miss.task_id)
    m.check_invariants()
    assert m.stats()["num_unlaunched_matches"] == 0


def test_a_prefix_wholly_on_ssd_and_a_cancelled_info_match_leaks_nothing(
        kvm: tuple[KVManager, HostKVBuffers]) -> None:
    m, _ = kvm
    a = tokens(8 * T, seed=3)
    _put(m, a, list(range(8)))
    _put(m, tokens(16 * T, seed=4), list(range(8, 24)))  # the CPU tier now holds only the second prompt
    before = m.stats()
    info = m.get_match_info(a)
    assert (info.num_cpu_blocks, info.num_ssd_blocks, info.num_tokens) == (0, 8, 8 * T)
    assert info.cpu_load_s == 0.0
    m.check_invariants()  # the reservation holds: 8 promotion blocks allocated, unready, locked
    m.cancel(info.task_id)  # what an engine does when loading costs more than recomputing
    assert m.wait(info.task_id)[info.task_id].status is TaskStatus.CANCELLED
    after = m.stats()
    m.check_invariants()
    assert after["num_unlaunched_matches"] == 0 and after["num_tasks"] == 0
    assert after["ssd_used_blocks"] == before["ssd_used_blocks"]
    assert after["cpu_used_blocks"] <= before["cpu_used_blocks"], "the promotion blocks went back"
    assert after["read_samples_ssd"] == 0, "nothing was read"

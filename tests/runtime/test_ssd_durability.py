"""The SSD tier fails closed on corrupt bytes and survives a server restart (SIGTERM or SIGKILL).

Real files with O_DIRECT, real server processes and signals; destinations poisoned before every
get and compared byte for byte.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flexkv.client import HostKVBuffers
from flexkv.common.config import CacheConfig, ModelConfig, configs_to_json, kv_fingerprint
from flexkv.kvmanager import KVManager
from flexkv.layout import LayoutKind
from flexkv.native.hasher import hash_blocks
from flexkv.ssd_journal import HEADER_BYTES, RECORD, RECORD_BYTES, journal_path
from flexkv.types import TaskStatus
from tests.runtime.kvtest import (
    T,
    block_bytes,
    flip_byte,
    host_buffers,
    needs_ssd_tier,
    poison,
    slots_for,
    ssd_slot,
    start_server,
    tokens,
)

pytestmark = pytest.mark.timeout(180)

# 8 KiB blocks (4 layers x K,V x 4 tokens x 4 heads x 16 dims x 2 bytes): 4 KiB aligned, so O_DIRECT is used.
MODEL = ModelConfig(num_layers=4, num_kv_heads=4, head_size=16, dtype="float16")
BLOCK = MODEL.block_bytes(T)


def ssd_cache(tmp_path: Path, num_cpu_blocks: int = 8) -> CacheConfig:
    needs_ssd_tier()
    dirs = [tmp_path / "nvme0", tmp_path / "nvme1"]
    for d in dirs:
        d.mkdir(exist_ok=True)
    return CacheConfig(tokens_per_block=T, num_cpu_blocks=num_cpu_blocks, enable_ssd=True, num_ssd_blocks=64,
                       ssd_cache_dir=tuple(str(d) for d in dirs))


def put(kvm: KVManager, toks: np.ndarray, blocks: list[int]) -> None:
    tid = kvm.put_async(toks, slots_for(blocks, len(toks)))
    assert kvm.wait(tid, timeout=30, completely=True)[tid].status is TaskStatus.SUCCESS


def get(kvm: KVManager, toks: np.ndarray, dst: list[int]) -> tuple[int, np.ndarray]:
    """(blocks the match promised, the return mask) of a get into ``dst``."""
    tid, mask = kvm.get_match(toks)
    kvm.launch(tid, slots_for(dst, len(toks)))
    resp = kvm.wait(tid, timeout=30)[tid]
    assert resp.status is TaskStatus.SUCCESS, resp.error
    assert resp.return_mask is not None
    return int(mask.sum()) // T, resp.return_mask


def slot_of(cache: CacheConfig, block_hash: int) -> tuple[str, int]:
    """(data file, offset) of the SSD slot holding ``block_hash``, from the journal."""
    return ssd_slot(cache, MODEL, block_hash)


@pytest.mark.parametrize("landing", [False, True])
def test_corrupt_ssd_blocks_are_a_miss_never_promoted_or_served_again(tmp_path: Path, landing: bool) -> None:
    """``landing``: the rank has a progress table, so each get's wait ends from it (docs/layerwise.md): the
    server's early answer must carry the mask the corrupt block shrank, and only the verified bytes land."""
    cache = ssd_cache(tmp_path)
    kvm = KVManager(MODEL, cache)
    kvm.start()
    bufs = host_buffers(MODEL, LayoutKind.VLLM_KV_FIRST, num_blocks=48, seed=3)
    try:
        kvm.register_kv_buffers(bufs, bufs.layout, layerwise=landing)
        prompt = tokens(8 * T, seed=1)
        put(kvm, prompt, list(range(8)))
        put(kvm, tokens(8 * T, seed=2), list(range(8, 16)))  # pushes the prompt out of the 8-block CPU pool
        assert kvm.stats()["cpu_evicted_blocks"] >= 8
        hashes = hash_blocks(prompt, T)
        for i in range(3, 8):  # one byte in every slot from block 3 on, in the middle of the block
            path, off = slot_of(cache, int(hashes[i]))
            flip_byte(path, off + BLOCK // 2 + i)
        dst = list(range(24, 32))
        poison(bufs, dst)
        promised, mask = get(kvm, prompt, dst)
        assert promised == 8, "the SSD index still listed all 8 blocks"
        assert mask.sum() == 3 * T and mask[:3 * T].all(), "only the verified prefix is reported loaded"
        for s, d in zip(range(3), dst[:3], strict=True):
            assert block_bytes(bufs, d) == block_bytes(bufs, s)
        for d in dst[3:]:
            assert set(block_bytes(bufs, d)) == {0xAB}, "a corrupt block must never reach the engine"
        st = kvm.stats()
        assert st["ssd_corrupt_blocks"] == 1 and st["ssd_discarded_blocks"] == 5
        assert st["ssd_used_blocks"] == 16 - 5
        kvm.check_invariants()
        # Not served again: the SSD index lost them, CPU holds only the 3 verified blocks.
        poison(bufs, dst)
        promised, mask = get(kvm, prompt, dst)
        assert promised == 3 and mask.sum() == 3 * T
        assert all(block_bytes(bufs, d) == block_bytes(bufs, s) for s, d in zip(range(3), dst[:3], strict=True))
        assert kvm.stats()["ssd_corrupt_blocks"] == 1, "nothing corrupt was read again"
        # A new put of the prompt rewrites the lost blocks; then the whole prompt is found again.
        put(kvm, prompt, list(range(8)))
        put(kvm, tokens(8 * T, seed=4), list(range(8, 16)))
        poison(bufs, dst)
        promised, mask = get(kvm, prompt, dst)
        assert promised == 8 and mask.all()
        assert all(block_bytes(bufs, d) == block_bytes(bufs, s) for s, d in zip(range(8), dst, strict=True))
        kvm.check_invariants()
        assert (kvm.num_waits_landed > 0) == landing
    finally:
        kvm.shutdown()
        bufs.close()


def test_every_ssd_slot_corrupt_gives_success_with_nothing_loaded(tmp_path: Path) -> None:
    cache = ssd_cache(tmp_path)
    kvm = KVManager(MODEL, cache)
    kvm.start()
    bufs = host_buffers(MODEL, LayoutKind.VLLM_KV_FIRST, num_blocks=48, seed=5)
    try:
        kvm.register_kv_buffers(bufs, bufs.layout)
        prompt = tokens(8 * T, seed=7)
        put(kvm, prompt, list(range(8)))
        put(kvm, tokens(8 * T, seed=8), list(range(8, 16)))
        for h in hash_blocks(prompt, T).tolist():
            path, off = slot_of(cache, h)
            flip_byte(path, off)  # the first byte of every slot
        dst = list(range(24, 32))
        poison(bufs, dst)
        promised, mask = get(kvm, prompt, dst)
        assert promised == 8 and not mask.any()
        assert all(set(block_bytes(bufs, d)) == {0xAB} for d in dst)
        st = kvm.stats()
        # the promotion evicted the other prompt from CPU, then rolled back: nothing corrupt was promoted
        assert st["ssd_discarded_blocks"] == 8 and st["cpu_used_blocks"] == 0
        assert get(kvm, prompt, dst)[0] == 0, "the prompt is a miss now"
        kvm.check_invariants()
    finally:
        kvm.shutdown()
        bufs.close()


# ---- restart (server mode) ------------------------------------------------------------------------


def _wait_gone(pids: list[int], timeout_s: float = 10.0) -> None:
    """Wait for the old server's workers to exit (they notice their parent died); kill stragglers."""
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of a process we did not start is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def _client(address: str, bufs: HostKVBuffers, cache: CacheConfig) -> KVManager:
    kvm = KVManager(MODEL, cache, address)
    kvm.start()
    kvm.register_kv_buffers(bufs, bufs.layout)
    kvm.wait_ready(30)
    return kvm


def _tamper_journal(cache: CacheConfig, lost_hash: int) -> None:
    """Flip a byte in the record of ``lost_hash`` and leave a torn record at the journal's end."""
    path = journal_path(cache.ssd_cache_dir[0])
    with open(path, "r+b") as f:
        body = np.frombuffer(f.read()[HEADER_BYTES:], dtype=np.uint8)
        whole = body.size // RECORD_BYTES
        recs = body[:whole * RECORD_BYTES].view(RECORD)
        [row] = np.flatnonzero(recs["block_hash"] == np.uint64(lost_hash))
        f.seek(HEADER_BYTES + int(row) * RECORD_BYTES + 9)
        f.write(b"\xee")
        f.seek(0, os.SEEK_END)
        f.write(b"\x07" * 40)


@pytest.mark.parametrize("sig,tamper", [(signal.SIGTERM, False), (signal.SIGKILL, False), (signal.SIGKILL, True)],
                         ids=["sigterm", "sigkill", "sigkill-torn-records"])
def test_a_restarted_server_finds_every_ssd_block_byte_exact(tmp_path: Path, sig: signal.Signals,
                                                            tamper: bool) -> None:
    cache = ssd_cache(tmp_path)
    address = f"ipc://{tmp_path}/server.sock"
    bufs = host_buffers(MODEL, LayoutKind.VLLM_KV_FIRST, num_blocks=48, seed=9)
    prompts = [tokens(n * T, seed=20 + n) for n in (8, 5, 3)]
    shared = np.concatenate([prompts[0][:4 * T], tokens(2 * T, seed=40)])  # branches off prompt 0
    servers: list[Any] = []
    try:
        servers.append(start_server(MODEL, cache, address))
        kvm = _client(address, bufs, cache)
        # engine blocks holding each prompt (the shared prefix has the same KV as prompt 0's)
        sources = [list(range(0, 8)), list(range(8, 13)), list(range(13, 16)), [0, 1, 2, 3, 16, 17]]
        for p, src in zip([*prompts, shared], sources, strict=True):
            put(kvm, p, src)
        stats = kvm.stats()
        assert stats["ssd_used_blocks"] == 8 + 5 + 3 + 2
        workers = [int(v) for k, v in stats.items() if k.startswith("pid:")]
        servers[0].send_signal(sig)
        assert servers[0].wait(20) == (0 if sig is signal.SIGTERM else -signal.SIGKILL)
        _wait_gone(workers)
        kvm.shutdown()
        _unlink_pool_of(servers[0].pid)
        if tamper:  # the last block of the 3-block prompt loses its record; a torn record at the end
            _tamper_journal(cache, int(hash_blocks(prompts[2], T)[2]))

        servers.append(start_server(MODEL, cache, address))
        kvm = _client(address, bufs, cache)
        assert kvm.stats()["ssd_restored_blocks"] == 18 - int(tamper)
        assert kvm.stats()["cpu_used_blocks"] == 0, "the CPU tier starts empty: every hit below is an SSD read"
        for p, src in zip([*prompts, shared], sources, strict=True):
            n = len(p) // T
            dst = list(range(40, 40 + n))
            poison(bufs, dst)
            promised, mask = get(kvm, p, dst)
            found = n - 1 if tamper and p is prompts[2] else n
            assert promised == found and mask.sum() == found * T, f"prompt of {n} blocks found again"
            assert all(block_bytes(bufs, d) == block_bytes(bufs, s)
                       for s, d in zip(src[:found], dst[:found], strict=True))
        assert kvm.stats()["ssd_corrupt_blocks"] == 0
        kvm.check_invariants()
        kvm.shutdown()
    finally:
        _stop(servers)
        bufs.close()


def _stop(servers: list[Any]) -> None:
    for server in servers:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            server.wait(20)
        _unlink_pool_of(server.pid)


def _unlink_pool_of(pid: int) -> None:
    """A SIGKILLed server leaves its CPU pool segment behind (issue 12 item 5, not ours): remove it."""
    for path in glob.glob(f"/dev/shm/flexkv-cpu-{pid}-*"):
        os.unlink(path)


def test_a_different_model_starts_the_ssd_tier_cold(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = ssd_cache(tmp_path)
    address = f"ipc://{tmp_path}/server.sock"
    bufs = host_buffers(MODEL, LayoutKind.VLLM_KV_FIRST, num_blocks=16, seed=11)
    server = start_server(MODEL, cache, address)
    try:
        kvm = _client(address, bufs, cache)
        put(kvm, tokens(4 * T, seed=1), [0, 1, 2, 3])
        kvm.shutdown()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(20)
        bufs.close()
    assert server.returncode == 0
    # Same block size, other fingerprint (16 heads x 4 dims instead of 4 x 16).
    other = ModelConfig(num_layers=4, num_kv_heads=16, head_size=4, dtype="float16")
    assert other.block_bytes(T) == BLOCK and kv_fingerprint(other, T) != kv_fingerprint(MODEL, T)
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flexkv.scheduler.main", "--configs-json",
                                 configs_to_json(other, cache), "--address", address], stdout=out, stderr=out)
    kvm = KVManager(other, cache, address)
    try:
        kvm.start()
        assert kvm.stats()["ssd_restored_blocks"] == 0 and kvm.stats()["ssd_used_blocks"] == 0
        kvm.shutdown()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert proc.returncode == 0
    text = log.read_text()
    assert text.count("starting the SSD tier cold") == 1, text


def test_a_reset_survives_a_restart_of_the_server(tmp_path: Path) -> None:
    """After reset() (a weight update) a restarted server must not find the blocks stored before it on
    its durable SSD tier again, and must still find those stored after it."""
    cache = ssd_cache(tmp_path)
    address = f"ipc://{tmp_path}/server.sock"
    bufs = host_buffers(MODEL, LayoutKind.VLLM_KV_FIRST, num_blocks=48, seed=11)
    old, new = tokens(6 * T, seed=50), tokens(5 * T, seed=51)
    servers: list[Any] = []
    try:
        servers.append(start_server(MODEL, cache, address))
        kvm = _client(address, bufs, cache)
        put(kvm, old, list(range(0, 6)))
        assert kvm.reset() == 0
        put(kvm, new, list(range(8, 13)))
        workers = [int(v) for k, v in kvm.stats().items() if k.startswith("pid:")]
        servers[0].send_signal(signal.SIGKILL)
        servers[0].wait(20)
        _wait_gone(workers)
        kvm.shutdown()
        servers.append(start_server(MODEL, cache, address))
        kvm = _client(address, bufs, cache)
        dst = list(range(30, 36))
        poison(bufs, dst)
        assert get(kvm, old, dst)[0] == 0, "a block from before the reset is never matched"
        assert all(set(block_bytes(bufs, d)) == {0xAB} for d in dst)
        promised, mask = get(kvm, new, dst[:5])
        assert promised == 5 and mask.sum() == 5 * T, "what was stored after the reset is found again"
        assert all(block_bytes(bufs, d) == block_bytes(bufs, s) for s, d in zip(range(8, 13), dst[:5], strict=True))
        assert kvm.stats()["reset_generation"] == 1
        kvm.check_invariants()
        kvm.shutdown()
    finally:
        _stop(servers)
        bufs.close()

"""The SSD tier end to end: write-through on put, promotion on get, completely=True, I/O errors."""

from __future__ import annotations

import glob
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from flexkv.client import HostKVBuffers
from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.kvmanager import KVManager
from flexkv.layout import LayoutKind
from flexkv.types import ConfigError, FlexKVError, TaskStatus
from tests.runtime.kvtest import T, block_bytes, host_buffers, needs_ssd_tier, poison, slots_for, tokens

pytestmark = pytest.mark.timeout(120)

# 4 layers x K,V x 4 tokens x 4 heads x 16 dims x 2 bytes = 8 KiB blocks: 4 KiB aligned, so O_DIRECT is used.
MODEL = ModelConfig(num_layers=4, num_kv_heads=4, head_size=16, dtype="float16")


def ssd_cache(tmp_path: Path, num_cpu_blocks: int = 16) -> CacheConfig:
    needs_ssd_tier()
    dirs = [tmp_path / "nvme0", tmp_path / "nvme1"]
    for d in dirs:
        d.mkdir(exist_ok=True)
    return CacheConfig(tokens_per_block=T, num_cpu_blocks=num_cpu_blocks, enable_ssd=True, num_ssd_blocks=256,
                       ssd_cache_dir=tuple(str(d) for d in dirs))


@pytest.fixture
def ssd_kvm(tmp_path: Path) -> Iterator[tuple[KVManager, HostKVBuffers]]:
    kvm = KVManager(MODEL, ssd_cache(tmp_path))
    kvm.start()
    bufs = host_buffers(MODEL, LayoutKind.VLLM_KV_FIRST, num_blocks=64, seed=21)
    try:
        kvm.register_kv_buffers(bufs, bufs.layout)
        yield kvm, bufs
    finally:
        kvm.shutdown()
        bufs.close()


def _put(kvm: KVManager, toks: object, blocks: list[int], completely: bool = True) -> None:
    tid = kvm.put_async(toks, slots_for(blocks, len(toks)))  # type: ignore[arg-type]
    assert kvm.wait(tid, timeout=30, completely=completely)[tid].status is TaskStatus.SUCCESS


def test_blocks_evicted_from_cpu_are_served_from_ssd_byte_exact(ssd_kvm: tuple[KVManager, HostKVBuffers]) -> None:
    kvm, bufs = ssd_kvm
    prompt = tokens(8 * T, seed=1)
    _put(kvm, prompt, list(range(8)))
    assert kvm.stats()["ssd_used_blocks"] == 8, "write-through stored every block on SSD"
    # two more prompts push the first one out of the 16-block CPU pool
    _put(kvm, tokens(8 * T, seed=2), list(range(8, 16)))
    _put(kvm, tokens(8 * T, seed=3), list(range(16, 24)))
    assert kvm.stats()["cpu_evicted_blocks"] >= 8
    dst = list(range(40, 48))
    poison(bufs, dst)
    tid, mask = kvm.get_match(prompt)
    assert mask.all(), "the whole prompt is found, on SSD"
    kvm.launch(tid, slots_for(dst, len(prompt)))
    assert kvm.wait(tid, timeout=30)[tid].status is TaskStatus.SUCCESS
    for s, d in zip(range(8), dst, strict=True):
        assert block_bytes(bufs, d) == block_bytes(bufs, s)
    # promoted back into CPU: a second get needs no SSD read and is still exact
    poison(bufs, dst)
    tid = kvm.get_async(prompt, slots_for(dst, len(prompt)))
    assert kvm.wait(tid)[tid].status is TaskStatus.SUCCESS
    assert all(block_bytes(bufs, d) == block_bytes(bufs, s) for s, d in zip(range(8), dst, strict=True))
    kvm.check_invariants()


def test_completely_true_returns_only_after_the_ssd_copy_landed(ssd_kvm: tuple[KVManager, HostKVBuffers]) -> None:
    kvm, _ = ssd_kvm
    ssd_pid = int(kvm.stats()["pid:ssd-0"])
    os.kill(ssd_pid, signal.SIGSTOP)
    try:
        prompt = tokens(4 * T, seed=4)
        tid = kvm.put_async(prompt, slots_for([0, 1, 2, 3], len(prompt)))
        assert kvm.wait(tid, timeout=10)[tid].status is TaskStatus.SUCCESS, "the engine part (D2H) is done"
        assert kvm.wait(tid, timeout=0.3, completely=True)[tid].status is TaskStatus.TIMEOUT
        assert kvm.stats()["ssd_used_blocks"] == 4 and kvm.try_wait(tid, completely=True)[tid].status is \
            TaskStatus.UNREADY
    finally:
        os.kill(ssd_pid, signal.SIGCONT)
    assert kvm.wait(tid, timeout=10, completely=True)[tid].status is TaskStatus.SUCCESS
    kvm.check_invariants()


def test_an_ssd_read_error_fails_the_get_and_never_publishes_bad_blocks(
        ssd_kvm: tuple[KVManager, HostKVBuffers], tmp_path: Path) -> None:
    kvm, bufs = ssd_kvm
    prompt = tokens(8 * T, seed=5)
    _put(kvm, prompt, list(range(8)))
    _put(kvm, tokens(8 * T, seed=6), list(range(8, 16)))
    _put(kvm, tokens(8 * T, seed=7), list(range(16, 24)))
    for f in glob.glob(str(tmp_path / "nvme*" / "*")):
        if not f.endswith(".json"):
            os.truncate(f, 0)  # the drive "loses" its data: reads now hit end of file
    dst = list(range(40, 48))
    poison(bufs, dst)
    tid = kvm.get_async(prompt, slots_for(dst, len(prompt)))
    res = kvm.wait(tid, timeout=30)[tid]
    assert res.status is TaskStatus.FAILED and "DISK2H" in res.error
    assert all(set(block_bytes(bufs, d)) == {0xAB} for d in dst), "nothing reached the engine"
    kvm.check_invariants()
    tid, _ = kvm.get_match(prompt)  # the failed promotion left no ready CPU copy behind
    assert kvm.stats()["cpu_used_blocks"] <= 16
    kvm.cancel(tid)
    kvm.check_invariants()


def test_a_missing_ssd_directory_is_a_clear_error_at_start(tmp_path: Path) -> None:
    cache = CacheConfig(tokens_per_block=T, num_cpu_blocks=8, enable_ssd=True, num_ssd_blocks=8,
                        ssd_cache_dir=(str(tmp_path / "does-not-exist"),))
    kvm = KVManager(MODEL, cache, start_timeout_s=30)
    with pytest.raises(FlexKVError, match=r"does-not-exist.* is not a writable directory"):
        kvm.start()
    kvm.shutdown()


def test_an_ssd_tier_without_the_io_uring_extension_is_a_clear_error_at_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build that skipped the io_uring extension (no liburing) must not start an SSD worker that dies on
    an import error: the server refuses to start, naming the extension and the fix, and leaves nothing."""
    from flexkv import native
    from flexkv.cli.check import check_io_uring
    from flexkv.scheduler.server import SchedulerServer
    from flexkv.shm import list_flexkv_segments

    monkeypatch.setattr(native, "built", lambda name: name != "uring")
    segments = set(list_flexkv_segments())
    (tmp_path / "nvme0").mkdir()
    cache = CacheConfig(tokens_per_block=T, num_cpu_blocks=8, enable_ssd=True, num_ssd_blocks=8,
                        ssd_cache_dir=(str(tmp_path / "nvme0"),))
    with pytest.raises(ConfigError, match=r"enable_ssd: .*io_uring extension .* not built.*liburing-dev"):
        SchedulerServer(MODEL, cache, f"ipc://{tmp_path}/server.sock")
    assert set(list_flexkv_segments()) == segments, "the refused server left its CPU pool behind"
    assert not os.listdir(tmp_path / "nvme0"), "nothing was written to the SSD directory"
    line = check_io_uring(required=True).line()
    assert line.startswith("missing") and "not built -- fix: install liburing" in line, line

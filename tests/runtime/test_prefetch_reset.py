"""prefetch_async and reset() through the whole stack, with real workers, signals and bytes."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from flexkv.client import HostKVBuffers
from flexkv.kvmanager import KVManager
from flexkv.types import TaskStatus
from tests.runtime import test_ssd_tier
from tests.runtime.kvtest import T, block_bytes, poison, slots_for, tokens

pytestmark = pytest.mark.timeout(120)

ssd_kvm = test_ssd_tier.ssd_kvm  # the fixture: library mode, CPU + SSD, host buffers registered


def _put(kvm: KVManager, toks: np.ndarray, blocks: list[int]) -> None:
    tid = kvm.put_async(toks, slots_for(blocks, len(toks)))
    assert kvm.wait(tid, timeout=30, completely=True)[tid].status is TaskStatus.SUCCESS


def _get_into(kvm: KVManager, bufs: HostKVBuffers, toks: np.ndarray, dst: list[int]) -> np.ndarray:
    poison(bufs, dst)
    tid = kvm.get_async(toks, slots_for(dst, len(toks)))
    res = kvm.wait(tid, timeout=30)[tid]
    assert res.status is TaskStatus.SUCCESS and res.return_mask is not None
    return res.return_mask


def test_prefetch_stages_ssd_blocks_into_cpu_so_a_get_needs_no_ssd(ssd_kvm: tuple[KVManager, HostKVBuffers]) -> None:
    kvm, bufs = ssd_kvm
    prompt = tokens(8 * T, seed=1)
    _put(kvm, prompt, list(range(8)))
    _put(kvm, tokens(8 * T, seed=2), list(range(8, 16)))  # two more prompts push it out of the
    _put(kvm, tokens(8 * T, seed=3), list(range(16, 24)))  # 16-block CPU pool: it is on SSD only
    tid = kvm.prefetch_async(prompt)
    res = kvm.wait(tid, timeout=30)[tid]
    assert res.status is TaskStatus.SUCCESS and res.return_mask is not None and res.return_mask.all()
    kvm.check_invariants()
    ssd_pid = int(kvm.stats()["pid:ssd-0"])
    os.kill(ssd_pid, signal.SIGSTOP)  # a get that needed the SSD would now hang until TIMEOUT
    try:
        dst = list(range(40, 48))
        assert _get_into(kvm, bufs, prompt, dst).all()
        assert all(block_bytes(bufs, d) == block_bytes(bufs, s) for s, d in zip(range(8), dst, strict=True))
    finally:
        os.kill(ssd_pid, signal.SIGCONT)
    kvm.check_invariants()


def test_prefetch_of_an_uncached_prompt_is_success_with_nothing_usable(
        ssd_kvm: tuple[KVManager, HostKVBuffers]) -> None:
    kvm, _ = ssd_kvm
    tid = kvm.prefetch_async(tokens(8 * T, seed=9))
    res = kvm.wait(tid, timeout=30)[tid]
    assert res.status is TaskStatus.SUCCESS and res.return_mask is not None and not res.return_mask.any()
    kvm.check_invariants()


def test_reset_forgets_every_tier_and_cancels_what_was_not_launched(
        ssd_kvm: tuple[KVManager, HostKVBuffers]) -> None:
    kvm, bufs = ssd_kvm
    prompt = tokens(8 * T, seed=4)
    _put(kvm, prompt, list(range(8)))
    pending, mask = kvm.get_match(prompt)
    assert mask.all()
    assert kvm.reset() == 1
    assert kvm.wait(pending, timeout=5)[pending].status is TaskStatus.CANCELLED
    stats = kvm.stats()
    assert stats["cpu_used_blocks"] == 0 and stats["ssd_used_blocks"] == 0 and stats["num_resets"] == 1
    dst = list(range(40, 48))
    assert not _get_into(kvm, bufs, prompt, dst).any(), "nothing from before the reset is matched"
    assert all(set(block_bytes(bufs, d)) == {0xAB} for d in dst), "and nothing was written"
    _put(kvm, prompt, list(range(8)))  # the new generation caches again
    assert _get_into(kvm, bufs, prompt, dst).all()
    assert all(block_bytes(bufs, d) == block_bytes(bufs, s) for s, d in zip(range(8), dst, strict=True))
    kvm.check_invariants()


def test_a_get_running_during_reset_finishes_byte_exact_and_its_blocks_are_never_matched(
        ssd_kvm: tuple[KVManager, HostKVBuffers]) -> None:
    kvm, bufs = ssd_kvm
    prompt = tokens(8 * T, seed=5)
    _put(kvm, prompt, list(range(8)))
    dev_pid = int(kvm.stats()["pid:device-0-0"])
    dst = list(range(40, 48))
    poison(bufs, dst)
    os.kill(dev_pid, signal.SIGSTOP)
    try:
        tid = kvm.get_async(prompt, slots_for(dst, len(prompt)))
        assert kvm.wait(tid, timeout=0.3)[tid].status is TaskStatus.TIMEOUT, "the copy is held up"
        assert kvm.reset() == 0, "a launched get is not cancelled"
        assert kvm.stats()["cpu_used_blocks"] == 8, "its locked blocks stay until it ends"
    finally:
        os.kill(dev_pid, signal.SIGCONT)
    res = kvm.wait(tid, timeout=30)[tid]
    assert res.status is TaskStatus.SUCCESS and res.return_mask is not None and res.return_mask.all()
    assert all(block_bytes(bufs, d) == block_bytes(bufs, s) for s, d in zip(range(8), dst, strict=True))
    kvm.check_invariants()
    other = list(range(48, 56))
    assert not _get_into(kvm, bufs, prompt, other).any(), "the old generation is never matched again"
    kvm.check_invariants()

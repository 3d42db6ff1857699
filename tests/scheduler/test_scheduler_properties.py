"""Property tests: random sequences of match / launch / complete (ok or failed) / cancel / release
against a small ControlPlane under eviction pressure, with a fake data plane that moves "bytes".

Each block's bytes are modelled as the block hash the engine would have written. Workers copy
values between fake tiers when an op succeeds and scribble garbage into the destination when it
fails. Properties, after every step: check_invariants() holds, and every H2D reads exactly the
bytes of the blocks the GET asked for (nothing was visible before its bytes landed, nothing was
evicted or overwritten while a transfer used it). A "batch" step launches every open task together
and merges the device ops in flight (``ControlPlane.coalesce``), so batched ops complete and fail
among single ones.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.native.hasher import hash_blocks
from flexkv.scheduler.control import ControlPlane
from flexkv.scheduler.graph import TransferOp
from flexkv.types import EvictionPolicy, Medium, OpType, TaskStatus

T = 4
MODEL = ModelConfig(num_layers=2, num_kv_heads=2, head_size=4, dtype="float16")
GARBAGE = -1

# A few prompts sharing prefixes: trunk, trunk+branch, other trunk.
_TRUNK = np.arange(24, dtype=np.int64)
PROMPTS = [
    _TRUNK[:10], _TRUNK, np.concatenate([_TRUNK[:12], np.arange(500, 516)]),
    np.concatenate([_TRUNK[:8], np.arange(900, 920)]), np.arange(1000, 1030, dtype=np.int64),
    np.arange(2000, 2017, dtype=np.int64),
]
HASHES = [hash_blocks(p, T) for p in PROMPTS]


class FakeDataPlane:
    """Moves 'bytes' (block hashes) between tiers as workers would."""

    def __init__(self) -> None:
        self.tiers: dict[Medium, dict[int, int]] = {m: {} for m in (Medium.CPU, Medium.SSD, Medium.REMOTE)}

    def run(self, op: TransferOp, prompt: int, ok: bool) -> None:
        src_tier, dst_tier = op.op_type.src, op.op_type.dst
        hashes = HASHES[prompt]
        for src, dst in zip(op.src_block_ids.tolist(), op.dst_block_ids.tolist(), strict=True):
            value = int(hashes[src % GPU_SPAN]) if src_tier is Medium.GPU else self.tiers[src_tier].get(src, GARBAGE)
            if dst_tier is Medium.GPU:
                assert not ok or value == int(hashes[dst % GPU_SPAN]), f"H2D read wrong bytes into GPU block {dst}"
            else:
                self.tiers[dst_tier][dst] = value if ok else GARBAGE
        if op.block_hashes is not None:  # H2DISK carries its whole path (the SSD journal's parents)
            n, num_hashes = op.src_block_ids.size, op.block_hashes.size
            assert num_hashes >= n if op.op_type is OpType.H2DISK else num_hashes == n


actions = st.lists(
    st.tuples(st.sampled_from(["get", "get", "put", "put", "launch", "ok", "ok", "ok", "fail", "drain", "drain",
                               "cancel", "release", "batch"]),
              st.integers(0, len(PROMPTS) - 1), st.integers(0, 3)),
    min_size=25, max_size=80)


GPU_SPAN = 64  # GPU block id = task's base + block position: the fake data plane checks by position


def _slots(num_tokens: int, task_id: int) -> np.ndarray:
    # Four bases: tasks on different bases can be batched, tasks on the same base overlap (never merged)
    return np.arange(num_tokens, dtype=np.int64) + (task_id % 4) * GPU_SPAN * T


class Driver:
    """Applies actions to a ControlPlane and the fake data plane."""

    def __init__(self, ssd_blocks: int, remote_blocks: int, policy: EvictionPolicy = EvictionPolicy.LRU,
                 evict_start_threshold: float = 1.0) -> None:
        cache = CacheConfig(tokens_per_block=T, num_cpu_blocks=8, enable_ssd=True, num_ssd_blocks=ssd_blocks,
                            ssd_cache_dir=("/tmp/unused",), enable_remote=True, num_remote_blocks=remote_blocks,
                            eviction_policy=policy, evict_start_threshold=evict_start_threshold, evict_ratio=0.25,
                            hit_reward_seconds=0.5, slru_protected_ratio=0.5)
        self.cp = ControlPlane(MODEL, cache, clock=self._tick)
        self._now = 0.0
        self.data = FakeDataPlane()
        self.prompt_of: dict[tuple[int, int], int] = {}  # every task ever matched (ops may outlive release)
        self.open_keys: list[tuple[int, int]] = []  # matched and not released
        self.in_flight: list[TransferOp] = []
        self.next_id = 0

    def _tick(self) -> float:
        self._now += 0.25  # a logical clock: runs replay exactly, and FLRU's reward spans a few steps
        return self._now

    def match(self, kind: str, prompt: int, mode: int) -> None:
        self.next_id += 1
        key = (self.next_id % 2, self.next_id)
        tokens = PROMPTS[prompt]
        token_mask = np.arange(tokens.size) >= 2 * T if mode >= 2 else None
        mask = (self.cp.get_match if kind == "get" else self.cp.put_match)(key, tokens, token_mask)
        assert mask.size == tokens.size and not mask[tokens.size // T * T:].any()
        self.prompt_of[key] = prompt
        self.open_keys.append(key)
        if mode % 2:
            self.launch(key)

    def launch(self, key: tuple[int, int]) -> None:
        self.in_flight += self._launch_ops(key)

    def _launch_ops(self, key: tuple[int, int]) -> list[TransferOp]:
        if self.cp.poll(key).status is TaskStatus.CANCELLED:
            return []
        return self.cp.launch(key, _slots(PROMPTS[self.prompt_of[key]].size, key[1]))  # [] if launched

    def complete(self, index: int, ok: bool) -> None:
        op = self.in_flight.pop(index % len(self.in_flight))
        for part, key in split(op):
            self.data.run(part, self.prompt_of[key], ok)
        self.in_flight += self.cp.complete_op(op.op_id, ok)
        event(f"{op.op_type.name}{' batch' if op.members else ''} {'ok' if ok else 'failed'}")

    def step(self, action: str, prompt: int, mode: int) -> None:
        keys = self.open_keys
        if action in ("get", "put"):
            self.match(action, prompt, mode)
        elif action == "launch" and keys:
            self.launch(keys[prompt % len(keys)])
        elif action in ("ok", "fail") and self.in_flight:
            self.complete(prompt, action == "ok")
        elif action == "drain":
            while self.in_flight:
                self.complete(0, True)
        elif action == "cancel" and keys:
            self.cp.cancel(keys[prompt % len(keys)])
        elif action == "release" and keys:
            self.cp.release(keys.pop(prompt % len(keys)))
        elif action == "evict":
            self.cp.evict_proactively()
        elif action == "batch":  # every open task launched together (and what is in flight), as the server does
            launched = [op for key in keys for op in self._launch_ops(key)]
            self.in_flight = self.cp.coalesce(self.in_flight + launched)


def split(op: TransferOp) -> list[tuple[TransferOp, tuple[int, int]]]:
    """A batched op as its members' ops (each with its task), for the fake data plane; else the op."""
    if not op.members:
        return [(op, op.task_key)]
    out, at = [], 0
    for m in op.members:
        part = TransferOp(m.op_id, m.task_key, op.op_type, op.src_block_ids[at:at + m.num_blocks],
                          op.dst_block_ids[at:at + m.num_blocks], None)
        out.append((part, m.task_key))
        at += m.num_blocks
    assert at == op.src_block_ids.size, "members cover the batched op's blocks exactly"
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=actions, ssd_blocks=st.sampled_from([6, 24]), remote_blocks=st.sampled_from([0, 12]))
def test_random_operation_sequences_keep_invariants_and_bytes_right(steps: list[tuple[str, int, int]],
                                                                    ssd_blocks: int, remote_blocks: int) -> None:
    event(f"steps {len(steps) // 10 * 10}+")
    run_and_drain(Driver(ssd_blocks, remote_blocks), steps)


def run_and_drain(driver: Driver, steps: list[tuple[str, int, int]]) -> None:
    """Apply ``steps`` with the invariants checked after each; then every op completes and releasing
    every task must return every lock."""
    cp = driver.cp
    for step in steps:
        driver.step(*step)
        cp.check_invariants()
    driver.step("drain", 0, 0)
    while driver.open_keys:
        driver.step("release", 0, 0)
        cp.check_invariants()
    for index in cp.tiers.all():
        assert not index.lock_count.any(), f"{index.name}: locks left after every task ended"


policy_actions = st.lists(
    st.tuples(st.sampled_from(["get", "get", "put", "put", "launch", "ok", "ok", "ok", "fail", "drain", "cancel",
                               "release", "evict"]),
              st.integers(0, len(PROMPTS) - 1), st.integers(0, 3)),
    min_size=25, max_size=80)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=policy_actions, policy=st.sampled_from(list(EvictionPolicy)), threshold=st.sampled_from([1.0, 0.5]))
def test_every_eviction_policy_keeps_invariants_and_bytes_right(steps: list[tuple[str, int, int]],
                                                                policy: EvictionPolicy, threshold: float) -> None:
    """The same random scenarios under every policy, with proactive eviction on or off: invariants
    (the policy's own bookkeeping included) after every step, H2D bytes right, every lock returned."""
    event(f"policy {policy.value}")
    run_and_drain(Driver(6, 12, policy, threshold), steps)

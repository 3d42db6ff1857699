"""Narrated scenarios for the control plane (flexkv.scheduler.control.ControlPlane).

A tiny model, 4-token blocks, small pools. Ops are "executed" by completing them in order (no
bytes move here); every step is followed by check_invariants().
"""

from __future__ import annotations

import numpy as np
import pytest

from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.native.hasher import encode_namespace, hash_blocks
from flexkv.scheduler.control import ControlPlane
from flexkv.scheduler.graph import TransferOp
from flexkv.types import InvalidRequest, OpType, TaskStatus

T = 4
MODEL = ModelConfig(num_layers=2, num_kv_heads=2, head_size=4, dtype="float16")


def make_cp(cpu: int = 16, ssd: int = 0, remote: int | None = None) -> ControlPlane:
    cache = CacheConfig(tokens_per_block=T, num_cpu_blocks=cpu, enable_ssd=ssd > 0, num_ssd_blocks=ssd,
                        ssd_cache_dir=("/tmp/unused",) if ssd else (), enable_remote=remote is not None,
                        num_remote_blocks=remote or 0)
    return ControlPlane(MODEL, cache)


def toks(num_tokens: int, seed: int = 0) -> np.ndarray:
    return np.arange(num_tokens, dtype=np.int64) + seed * 100_000


def slots(num_tokens: int, first_gpu_block: int = 0) -> np.ndarray:
    return np.arange(num_tokens, dtype=np.int64) + first_gpu_block * T


def drain(cp: ControlPlane, ops: list[TransferOp], fail: tuple[OpType, ...] = ()) -> list[TransferOp]:
    """Complete ops (and the ops they unlock) in order; returns every op seen."""
    seen, pending = [], list(ops)
    while pending:
        op = pending.pop(0)
        seen.append(op)
        pending += cp.complete_op(op.op_id, op.op_type not in fail)
        cp.check_invariants()
    return seen


def put(cp: ControlPlane, key: tuple[int, int], tokens: np.ndarray, **kw: object) -> np.ndarray:
    mask = cp.put_match(key, tokens, **kw)
    drain(cp, cp.launch(key, slots(tokens.size)))
    assert cp.poll(key, completely=True).status is TaskStatus.SUCCESS
    cp.release(key)
    cp.check_invariants()
    return mask


def get(cp: ControlPlane, key: tuple[int, int], tokens: np.ndarray, **kw: object) -> tuple[np.ndarray, list]:
    mask = cp.get_match(key, tokens, **kw)
    ops = drain(cp, cp.launch(key, slots(tokens.size)))
    assert cp.poll(key).status is TaskStatus.SUCCESS
    cp.release(key)
    cp.check_invariants()
    return mask, ops


def only(ops: list[TransferOp], op_type: OpType) -> TransferOp:
    found = [op for op in ops if op.op_type is op_type]
    assert len(found) == 1, f"expected one {op_type.name}, got {[o.op_type.name for o in ops]}"
    return found[0]


def test_store_then_match_moves_whole_blocks_with_the_right_ids() -> None:
    cp = make_cp()
    tokens = toks(22)  # 5 whole blocks + 2 trailing tokens that are never cached
    mask = cp.put_match((1, 1), tokens)
    assert mask.tolist() == [True] * 20 + [False] * 2
    [d2h] = cp.launch((1, 1), slots(22, first_gpu_block=7))
    assert d2h.op_type is OpType.D2H and d2h.src_block_ids.tolist() == [7, 8, 9, 10, 11]
    assert cp.poll((1, 1)).status is TaskStatus.UNREADY
    assert cp.get_match((1, 2), tokens).sum() == 0, "unready blocks must not be visible to a GET"
    cp.release((1, 2))
    assert drain(cp, [d2h]) == [d2h]
    assert cp.poll((1, 1)).status is TaskStatus.SUCCESS
    cp.release((1, 1))

    mask = cp.get_match((1, 3), tokens)
    assert mask.tolist() == [True] * 20 + [False] * 2
    [h2d] = cp.launch((1, 3), slots(22, first_gpu_block=3))
    assert h2d.src_block_ids.tolist() == d2h.dst_block_ids.tolist()
    assert h2d.dst_block_ids.tolist() == [3, 4, 5, 6, 7]
    drain(cp, [h2d])
    assert cp.poll((1, 3), completely=True).return_mask is mask
    assert cp.stats()["cpu_used_blocks"] == 5


def test_partial_block_and_empty_prompts_cache_nothing() -> None:
    cp = make_cp()
    assert put(cp, (1, 1), toks(3)).tolist() == [False] * 3
    assert put(cp, (1, 2), toks(0)).size == 0
    assert cp.stats()["cpu_used_blocks"] == 0
    mask = put(cp, (1, 3), toks(9))
    assert mask.sum() == 8 and cp.stats()["cpu_used_blocks"] == 2


def test_concurrent_puts_of_one_prefix_write_each_block_once() -> None:
    cp = make_cp()
    first = cp.put_match((1, 1), toks(16))
    d2h_first = cp.launch((1, 1), slots(16))
    second = cp.put_match((2, 1), toks(24))  # same prefix, two more blocks
    assert first.sum() == 16
    assert second.tolist() == [False] * 16 + [True] * 8, "the second put skips blocks being written"
    cp.check_invariants()
    d2h_second = cp.launch((2, 1), slots(24))
    assert d2h_second[0].src_block_ids.tolist() == [4, 5]
    drain(cp, d2h_second)  # finishes first: its blocks are ready, but the prefix is not
    assert cp.get_match((3, 1), toks(24)).sum() == 0
    cp.release((3, 1))
    drain(cp, d2h_first)
    mask, _ = get(cp, (3, 2), toks(24))
    assert mask.sum() == 24


def test_eviction_is_lru_over_leaves_and_spares_locked_blocks() -> None:
    cp = make_cp(cpu=6)
    prefix = toks(8)
    px, py = np.concatenate([prefix, toks(8, 1)]), np.concatenate([prefix, toks(8, 2)])
    put(cp, (1, 1), px)  # P(2 blocks) + X(2)
    put(cp, (1, 2), py)  # Y(2) hangs under P: the pool is full
    get(cp, (1, 3), px)  # refresh P and X: Y is now the least recently used leaf
    assert put(cp, (1, 4), toks(8, 3)).sum() == 8
    assert get(cp, (1, 5), py)[0].sum() == 8, "Y's leaf went; P (internal) stayed"
    assert get(cp, (1, 6), px)[0].sum() == 16

    # lock X and P by a GET that is matched but not launched: a new put finds nothing evictable but Z
    assert cp.get_match((2, 1), px).sum() == 16
    assert put(cp, (1, 7), toks(16, 4)).sum() == 8, "only Z's 2 blocks could be evicted"
    assert cp.stats()["cpu_free_blocks"] == 0
    assert cp.get_match((2, 2), toks(8, 4)).sum() == 8  # lock the 2 blocks just stored, too
    assert put(cp, (1, 8), toks(8, 5)).sum() == 0, "every block is locked now"
    cp.cancel((2, 1))
    cp.check_invariants()
    assert put(cp, (1, 9), toks(8, 5)).sum() == 8
    assert get(cp, (1, 10), toks(8, 4))[0].sum() == 8, "still locked when the put evicted"
    assert get(cp, (1, 11), px)[0].sum() == 8, "X (a leaf, unlocked by the cancel) was evicted, P was not"


def test_cancel_after_match_returns_every_reservation() -> None:
    cp = make_cp(cpu=8, ssd=16, remote=0)
    put(cp, (1, 1), toks(16))
    before = cp.stats()
    cp.put_match((1, 2), toks(32))
    cp.get_match((1, 3), toks(16))
    cp.check_invariants()
    assert cp.stats()["cpu_used_blocks"] == before["cpu_used_blocks"] + 4
    cp.cancel((1, 2))
    cp.cancel((1, 3))
    cp.check_invariants()
    after = cp.stats()
    for tier in ("cpu", "ssd", "remote"):
        assert after[f"{tier}_used_blocks"] == before[f"{tier}_used_blocks"]
    assert cp.poll((1, 2)).status is TaskStatus.CANCELLED
    with pytest.raises(InvalidRequest, match="cancelled"):
        cp.launch((1, 2), slots(32))
    cp.cancel((1, 2))  # cancelling a finished task is a no-op
    cp.release((1, 2))
    assert cp.poll((1, 2)).status is TaskStatus.NOTFOUND


def test_d2h_failure_rolls_back_cpu_and_write_through() -> None:
    cp = make_cp(cpu=8, ssd=16)
    cp.put_match((1, 1), toks(16))
    ops = drain(cp, cp.launch((1, 1), slots(16)), fail=(OpType.D2H,))
    assert [op.op_type for op in ops] == [OpType.D2H], "H2DISK never dispatched"
    assert cp.poll((1, 1)).status is TaskStatus.FAILED
    assert "D2H" in cp.poll((1, 1), completely=True).error
    stats = cp.stats()
    assert stats["cpu_used_blocks"] == 0 and stats["ssd_used_blocks"] == 0
    assert put(cp, (1, 2), toks(16)).sum() == 16, "the prefix can be stored again"


def test_h2disk_failure_after_d2h_keeps_cpu_and_rolls_back_ssd() -> None:
    cp = make_cp(cpu=8, ssd=16)
    cp.put_match((1, 1), toks(16))
    drain(cp, cp.launch((1, 1), slots(16)), fail=(OpType.H2DISK,))
    assert cp.poll((1, 1)).status is TaskStatus.SUCCESS
    assert cp.poll((1, 1), completely=True).status is TaskStatus.FAILED
    assert cp.stats()["ssd_used_blocks"] == 0 and cp.stats()["cpu_used_blocks"] == 4
    mask, ops = get(cp, (1, 2), toks(16))
    assert mask.sum() == 16 and [op.op_type for op in ops] == [OpType.H2D]


def _ssd_only(cp: ControlPlane, tokens: np.ndarray, filler_seed: int) -> TransferOp:
    """Store ``tokens`` through to SSD, then push them out of the (4-block) CPU tier."""
    cp.put_match((9, filler_seed), tokens)
    ops = drain(cp, cp.launch((9, filler_seed), slots(tokens.size)))
    cp.release((9, filler_seed))
    put(cp, (9, filler_seed + 1), toks(16, filler_seed))
    return only(ops, OpType.H2DISK)


def test_get_promotes_ssd_hits_into_cpu_before_h2d() -> None:
    cp = make_cp(cpu=4, ssd=32)
    h2disk = _ssd_only(cp, toks(16), filler_seed=50)
    mask = cp.get_match((1, 1), toks(16))
    assert mask.sum() == 16
    [disk2h] = cp.launch((1, 1), slots(16, first_gpu_block=20))
    assert disk2h.op_type is OpType.DISK2H
    assert disk2h.src_block_ids.tolist() == h2disk.dst_block_ids.tolist()
    assert cp.poll((1, 1)).status is TaskStatus.UNREADY
    [h2d] = cp.complete_op(disk2h.op_id, True)
    cp.check_invariants()
    assert h2d.src_block_ids.tolist() == disk2h.dst_block_ids.tolist()
    assert h2d.dst_block_ids.tolist() == [20, 21, 22, 23]
    drain(cp, [h2d])
    cp.release((1, 1))
    mask, ops = get(cp, (1, 2), toks(16))
    assert mask.sum() == 16 and [op.op_type for op in ops] == [OpType.H2D], "now served from CPU"


def test_get_reads_cpu_prefix_and_promotes_only_the_rest() -> None:
    cp = make_cp(cpu=6, ssd=32)
    h2disk = _ssd_only(cp, toks(16), filler_seed=60)  # CPU: filler (4 blocks) ; SSD: 4 blocks
    put(cp, (1, 1), toks(8))  # CPU gets blocks 0-1 back (evicting filler)
    cp.get_match((1, 2), toks(16))
    [disk2h] = cp.launch((1, 2), slots(16))
    assert disk2h.src_block_ids.tolist() == h2disk.dst_block_ids[2:].tolist()
    [h2d] = cp.complete_op(disk2h.op_id, True)
    assert h2d.src_block_ids[2:].tolist() == disk2h.dst_block_ids.tolist()
    assert h2d.dst_block_ids.tolist() == [0, 1, 2, 3]
    drain(cp, [h2d])


def test_disk2h_failure_drops_h2d_and_frees_promoted_blocks() -> None:
    cp = make_cp(cpu=4, ssd=32)
    _ssd_only(cp, toks(16), filler_seed=70)
    used = cp.stats()["cpu_used_blocks"]
    cp.get_match((1, 1), toks(16))
    ops = drain(cp, cp.launch((1, 1), slots(16)), fail=(OpType.DISK2H,))
    assert [op.op_type for op in ops] == [OpType.DISK2H]
    assert cp.poll((1, 1)).status is TaskStatus.FAILED
    assert cp.stats()["cpu_used_blocks"] == used - 4, "promotion evicted 4 blocks, then rolled them back"
    cp.release((1, 1))
    assert get(cp, (1, 2), toks(16))[0].sum() == 16, "the SSD copy is intact"


def test_corrupt_ssd_block_is_a_miss_from_there_on_and_leaves_the_ssd_index() -> None:
    cp = make_cp(cpu=4, ssd=32)
    h2disk = _ssd_only(cp, toks(16), filler_seed=80)
    assert h2disk.block_hashes is not None and h2disk.block_hashes.size == 4, "H2DISK carries its whole path"
    assert cp.get_match((1, 1), toks(16)).sum() == 16
    [disk2h] = cp.launch((1, 1), slots(16, first_gpu_block=20))
    assert disk2h.block_hashes is not None and disk2h.block_hashes.tolist() == h2disk.block_hashes.tolist()
    # the worker verified blocks 0 and 1; block 2's bytes were corrupt
    [h2d] = cp.complete_op(disk2h.op_id, False, "checksum", corrupt_at=2)
    cp.check_invariants()
    assert h2d.src_block_ids.tolist() == disk2h.dst_block_ids[:2].tolist()
    assert h2d.dst_block_ids.tolist() == [20, 21]
    drain(cp, [h2d])
    resp = cp.poll((1, 1))
    assert resp.status is TaskStatus.SUCCESS and resp.return_mask is not None
    assert resp.return_mask.sum() == 2 * T and resp.return_mask[:2 * T].all()
    cp.release((1, 1))
    st = cp.stats()
    assert st["ssd_corrupt_blocks"] == 1 and st["ssd_discarded_blocks"] == 2 and st["get_lost_blocks"] == 2
    assert st["ssd_used_blocks"] == 6, "4 filler + blocks 0-1 of the prompt"
    assert st["cpu_used_blocks"] == 2, "the 2 verified blocks were promoted, the corrupt ones were not"
    mask, ops = get(cp, (1, 2), toks(16))
    assert mask.sum() == 2 * T and [op.op_type for op in ops] == [OpType.H2D], "the corrupt blocks are gone"
    # an I/O error (no corrupt_at) still fails the GET
    put(cp, (1, 3), toks(16))
    put(cp, (9, 90), toks(16, 91))
    cp.get_match((1, 4), toks(16))
    assert drain(cp, cp.launch((1, 4), slots(16)), fail=(OpType.DISK2H,))
    assert cp.poll((1, 4)).status is TaskStatus.FAILED


def test_put_write_through_starts_at_each_tiers_own_prefix() -> None:
    cp = make_cp(cpu=16, ssd=16, remote=0)
    tokens = toks(24)
    cp.put_match((1, 1), tokens[:8])
    first = drain(cp, cp.launch((1, 1), slots(8)), fail=(OpType.H2REMOTE,))  # remote misses blocks 0-1
    cp.release((1, 1))
    cp.put_match((1, 2), tokens)
    [d2h] = cp.launch((1, 2), slots(24))
    later = cp.complete_op(d2h.op_id, True)
    assert cp.poll((1, 2)).status is TaskStatus.SUCCESS and cp.poll((1, 2), True).status is TaskStatus.UNREADY
    h2disk, h2remote = only(later, OpType.H2DISK), only(later, OpType.H2REMOTE)
    assert h2disk.src_block_ids.tolist() == d2h.dst_block_ids.tolist(), "SSD already had blocks 0-1"
    cpu_ids = np.concatenate([only(first, OpType.D2H).dst_block_ids, d2h.dst_block_ids])
    assert h2remote.src_block_ids.tolist() == cpu_ids.tolist(), "remote gets all 6 blocks"
    assert h2remote.block_hashes is not None
    assert h2remote.block_hashes.tolist() == hash_blocks(tokens, T).tolist()
    assert h2disk.block_hashes is not None, "H2DISK names its whole path (the SSD journal's parents and depths)"
    assert h2disk.block_hashes.tolist() == hash_blocks(tokens, T).tolist()
    drain(cp, later)
    assert cp.poll((1, 2), completely=True).status is TaskStatus.SUCCESS


def test_namespaces_never_share_blocks() -> None:
    cp = make_cp()
    lora_a, lora_b = encode_namespace(["lora-a"]), encode_namespace(["lora-b"])
    put(cp, (1, 1), toks(16), namespace=lora_a)
    assert get(cp, (1, 2), toks(16), namespace=lora_b)[0].sum() == 0
    assert get(cp, (1, 3), toks(16))[0].sum() == 0
    assert get(cp, (1, 4), toks(16), namespace=lora_a)[0].sum() == 16
    assert put(cp, (1, 5), toks(16), namespace=lora_b).sum() == 16


def test_token_mask_limits_what_moves_and_compact_slot_mappings() -> None:
    cp = make_cp()
    put(cp, (1, 1), toks(20))
    engine_has = np.arange(20) >= 8  # the engine holds tokens 0-7 already
    mask = cp.get_match((1, 2), toks(22), token_mask=np.concatenate([engine_has, [True, True]]))
    assert mask.tolist() == [False] * 8 + [True] * 12 + [False] * 2
    compact = slots(12, first_gpu_block=40)  # starts at token 8
    [h2d] = cp.launch((1, 2), compact)
    assert h2d.dst_block_ids.tolist() == [40, 41, 42]
    drain(cp, [h2d])
    # PUT: blocks before the first True must already be cached, else nothing is stored
    skip_first = np.arange(32) >= 24
    assert cp.put_match((1, 3), toks(32), token_mask=skip_first).sum() == 0
    mask = cp.put_match((1, 4), toks(32), token_mask=np.arange(32) >= 16)
    assert mask.tolist() == [False] * 20 + [True] * 12, "blocks 4-7 are new; 4 lies after the first True"
    [d2h] = cp.launch((1, 4), slots(16, first_gpu_block=60))  # compact from token 16
    assert d2h.src_block_ids.tolist() == [61, 62, 63]
    drain(cp, [d2h])


def test_bad_input_raises_and_changes_nothing() -> None:
    cp = make_cp(cpu=8, ssd=8)
    put(cp, (1, 1), toks(16))
    cp.put_match((1, 2), toks(24))
    before = cp.stats()
    bad_matches = [
        (toks(16).astype(np.int32), None, b""),
        (toks(16).reshape(4, 4), None, b""),
        ([1, 2, 3], None, b""),
        (toks(16), np.ones(15, dtype=np.bool_), b""),
        (toks(16), np.ones(16, dtype=np.int64), b""),
        (toks(16), np.arange(16) < 8, b""),  # True then False
        (toks(16), np.arange(16) >= 6, b""),  # first True not block aligned
        (toks(16), None, "ns"),
    ]
    for tokens, token_mask, ns in bad_matches:
        with pytest.raises(InvalidRequest):
            cp.get_match((1, 3), tokens, token_mask, ns)
        cp.check_invariants()
    with pytest.raises(InvalidRequest, match="already exists"):
        cp.put_match((1, 2), toks(24))
    misaligned = slots(24)
    misaligned[18] += 1
    bad_launches = [misaligned, slots(24) + 1, slots(24).astype(np.int32), slots(10), slots(24)[::-1].copy(),
                    -slots(24)]
    for slot_mapping in bad_launches:
        with pytest.raises(InvalidRequest):
            cp.launch((1, 2), slot_mapping)
        cp.check_invariants()
    for call in (lambda: cp.launch((5, 5), slots(4)), lambda: cp.cancel((5, 5)), lambda: cp.release((5, 5)),
                 lambda: cp.complete_op(12345, True), lambda: cp.launch("nope", slots(4))):
        with pytest.raises(InvalidRequest):
            call()
    assert cp.stats() == before
    ops = cp.launch((1, 2), slots(24))  # the plan is still launchable
    assert cp.launch((1, 2), slots(24)) == [], "same mapping again: no-op"
    with pytest.raises(InvalidRequest, match="different slot mapping"):
        cp.launch((1, 2), slots(24, first_gpu_block=1))
    drain(cp, ops)
    with pytest.raises(InvalidRequest):
        cp.complete_op(ops[0].op_id, True)  # completed twice


def test_all_false_mask_finishes_at_launch_without_ops() -> None:
    cp = make_cp(ssd=8)
    put(cp, (1, 1), toks(8))
    assert cp.put_match((1, 2), toks(8)).sum() == 0
    assert cp.launch((1, 2), slots(8)) == []
    assert cp.poll((1, 2), completely=True).status is TaskStatus.SUCCESS
    assert cp.get_match((1, 3), toks(8), token_mask=np.zeros(8, dtype=np.bool_)).sum() == 0
    assert cp.launch((1, 3), np.empty(0, dtype=np.int64)) == []
    assert cp.poll((1, 3)).status is TaskStatus.SUCCESS


def test_cancel_after_launch_is_a_no_op_and_the_task_ends_on_its_own() -> None:
    """FlexKV's rule: cancel applies to tasks not yet launched. A running task keeps reporting its
    real state (no final status while a worker may still write the engine's memory)."""
    cp = make_cp(cpu=8, ssd=8)
    cp.put_match((1, 1), toks(16))
    [d2h] = cp.launch((1, 1), slots(16))
    assert cp.cancel((1, 1)) is False
    assert cp.poll((1, 1)).status is TaskStatus.UNREADY, "D2H still in flight"
    [h2disk] = cp.complete_op(d2h.op_id, True)
    assert cp.poll((1, 1)).status is TaskStatus.SUCCESS
    assert cp.cancel((1, 1)) is False
    assert cp.complete_op(h2disk.op_id, True) == []
    assert cp.poll((1, 1), completely=True).status is TaskStatus.SUCCESS, "write-through was not cut"
    cp.release((1, 1))
    cp.check_invariants()
    assert cp.stats()["ssd_used_blocks"] == 4


def test_release_after_launch_rolls_back_when_in_flight_ops_complete() -> None:
    cp = make_cp(cpu=8, ssd=8)
    cp.put_match((1, 1), toks(16))
    [d2h] = cp.launch((1, 1), slots(16))
    cp.release((1, 1))
    assert cp.stats()["cpu_used_blocks"] == 4, "the worker may still write into them"
    assert cp.complete_op(d2h.op_id, True) == [], "no write-through after release"
    cp.check_invariants()
    assert cp.stats()["cpu_used_blocks"] == 0 and cp.stats()["ssd_used_blocks"] == 0


def test_release_lets_write_through_finish_and_publish() -> None:
    cp = make_cp(cpu=8, ssd=8)
    cp.put_match((1, 1), toks(16))
    [d2h] = cp.launch((1, 1), slots(16))
    [h2disk] = cp.complete_op(d2h.op_id, True)
    cp.release((1, 1))
    assert cp.poll((1, 1)).status is TaskStatus.NOTFOUND
    assert cp.complete_op(h2disk.op_id, True) == []
    cp.check_invariants()
    assert cp.stats()["ssd_used_blocks"] == 4 and cp.stats()["num_ops_in_flight"] == 0


def test_drop_client_releases_everything_and_reports_in_flight_ops() -> None:
    cp = make_cp(cpu=8)
    put(cp, (2, 1), toks(8, 9))
    base = cp.stats()
    cp.put_match((1, 1), toks(16))
    [d2h] = cp.launch((1, 1), slots(16))
    cp.get_match((1, 2), toks(8, 9))
    cp.put_match((2, 2), toks(8, 7))
    assert cp.drop_client(1) == [d2h.op_id]
    cp.check_invariants()
    assert cp.poll((1, 2)).status is TaskStatus.NOTFOUND
    assert cp.poll((2, 2)).status is TaskStatus.UNREADY, "other clients are untouched"
    cp.complete_op(d2h.op_id, True)
    cp.release((2, 2))
    cp.check_invariants()
    assert cp.stats()["cpu_used_blocks"] == base["cpu_used_blocks"]


def test_get_reads_ssd_then_remote_in_parallel_before_h2d() -> None:
    cp = make_cp(cpu=4, ssd=6, remote=0)
    cp.put_match((1, 1), toks(16))
    stored = drain(cp, cp.launch((1, 1), slots(16)))
    cp.release((1, 1))
    put(cp, (1, 2), toks(16, 1))  # pushes the prompt out of CPU and half of it out of SSD (tail first);
    assert cp.stats()["ssd_used_blocks"] == 6  # the remote store keeps all 4 blocks
    cp.get_match((1, 3), toks(16))
    ops = cp.launch((1, 3), slots(16))
    assert sorted(op.op_type.name for op in ops) == ["DISK2H", "REMOTE2H"]
    disk2h, remote2h = only(ops, OpType.DISK2H), only(ops, OpType.REMOTE2H)
    assert disk2h.dst_block_ids.size == 2 and remote2h.dst_block_ids.size == 2
    assert remote2h.src_block_ids.tolist() == only(stored, OpType.H2REMOTE).dst_block_ids[2:].tolist()
    assert remote2h.block_hashes is not None
    assert remote2h.block_hashes.tolist() == hash_blocks(toks(16), T)[2:].tolist()
    assert cp.complete_op(remote2h.op_id, True) == [], "H2D waits for both"
    [h2d] = cp.complete_op(disk2h.op_id, True)
    assert h2d.src_block_ids.tolist() == [*disk2h.dst_block_ids.tolist(), *remote2h.dst_block_ids.tolist()]
    drain(cp, [h2d])
    assert cp.poll((1, 3)).status is TaskStatus.SUCCESS

"""Block checksums, the SSD journal (torn/corrupt records, fingerprints) and the SSD index rebuild."""

from __future__ import annotations

import errno
import logging
import mmap
import os
from pathlib import Path

import numpy as np
import pytest
import xxhash

from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.native.checksum import checksum_blocks, first_mismatch
from flexkv.scheduler.control import ControlPlane
from flexkv.ssd_journal import HEADER_BYTES, RECORD, RECORD_BYTES, journal_path, record_checks, scan
from flexkv.types import TaskType
from flexkv.workers.ssd_store import SSDStore

pytestmark = pytest.mark.timeout(60)

BLOCK = 8192


class Pool:
    def __init__(self, num_blocks: int, seed: int | None = None) -> None:
        self.mem = mmap.mmap(-1, num_blocks * BLOCK)
        self.arr = np.frombuffer(self.mem, dtype=np.uint8).reshape(num_blocks, BLOCK)
        if seed is not None:
            self.arr[:] = np.random.default_rng(seed).integers(0, 256, self.arr.shape, dtype=np.uint8)
        self.addr = self.arr.ctypes.data


def test_checksums_are_xxh3_seeded_by_the_block_hash() -> None:
    pool = Pool(16, seed=1)
    addrs = pool.addr + np.arange(16, dtype=np.uint64) * BLOCK
    seeds = np.random.default_rng(2).integers(0, 2**63, 16, dtype=np.uint64)
    sums = checksum_blocks(addrs, BLOCK, seeds, num_threads=3)
    for i in range(16):
        assert int(sums[i]) == xxhash.xxh3_64_intdigest(pool.arr[i].tobytes(), seed=int(seeds[i]))
    assert first_mismatch(addrs, BLOCK, seeds, sums) == 16
    pool.arr[9, 100] ^= 1
    assert first_mismatch(addrs, BLOCK, seeds, sums, num_threads=2) == 9
    with pytest.raises(ValueError, match="num_threads"):
        checksum_blocks(addrs, BLOCK, seeds, num_threads=0)
    with pytest.raises(ValueError, match="seeds"):
        checksum_blocks(addrs, BLOCK, seeds[:3])


def _write_prompt(store: SSDStore, pool: Pool, slots: list[int], hashes: np.ndarray) -> None:
    n = len(slots)
    parents = np.concatenate([np.zeros(1, dtype=np.uint64), hashes[:-1]])
    res = store.write_blocks(np.array(slots), pool.addr, BLOCK, np.arange(n), hashes, parents, np.arange(n))
    assert not res.any()


def test_torn_and_corrupt_records_are_skipped_and_their_slots_never_verify(tmp_path: Path) -> None:
    hashes = np.random.default_rng(3).integers(1, 2**63, 8, dtype=np.uint64)
    src, dst = Pool(8, seed=4), Pool(8)
    slots = [3, 1, 4, 0, 5, 7, 2, 6]
    with SSDStore([str(tmp_path)], 8, BLOCK, 1 << 20, fingerprint="fp") as store:
        _write_prompt(store, src, slots, hashes)
    path = journal_path(str(tmp_path))
    with open(path, "r+b") as f:
        f.seek(HEADER_BYTES + 5 * RECORD_BYTES + 17)  # record of block 5: one byte flipped
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
        f.seek(0, os.SEEK_END)
        f.write(b"\x01" * 30)  # a torn record at the tail
    found = scan(path, "fp", None, 8)
    assert found.num_skipped == 2 and sorted(found.records["ssd_id"].tolist()) == sorted(set(slots) - {7})

    with SSDStore([str(tmp_path)], 8, BLOCK, 1 << 20, fingerprint="fp") as store:
        assert store.journal.num_known == 7
        res = store.read_blocks(np.array(slots), dst.addr, BLOCK, np.arange(8), hashes)
        assert res.tolist() == [0] * 5 + [-errno.EBADMSG] + [0] * 2, "the slot whose record was lost never verifies"
        assert all(dst.arr[i].tobytes() == src.arr[i].tobytes() for i in (0, 1, 2, 3, 4, 6, 7))
        # a slot read under another key fails too (the index and the slot disagree)
        res = store.read_blocks(np.array([slots[0]]), dst.addr, BLOCK, np.array([0]), hashes[1:2])
        assert res.tolist() == [-errno.EBADMSG]
    compacted = scan(path, "fp", None, 8)
    assert compacted.num_skipped == 0 and compacted.records.shape[0] == 7, "opening compacted the journal"

    # The rebuild indexes blocks 0..4: block 5's record is gone, so 6 and 7 have no parent.
    cp = _control(8)
    assert cp.restore_ssd_index(compacted.records) == 5
    cp.check_invariants()
    mask = cp.match_hashes(TaskType.GET, (0, 1), hashes, 8 * 4)
    assert mask.sum() == 5 * 4
    assert cp.stats()["ssd_used_blocks"] == 5


def test_another_fingerprint_starts_cold_with_one_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hashes = np.arange(1, 5, dtype=np.uint64)
    src = Pool(4, seed=5)
    with SSDStore([str(tmp_path)], 4, BLOCK, 1 << 20, fingerprint="model-a") as store:
        _write_prompt(store, src, [0, 1, 2, 3], hashes)
    caplog.set_level(logging.INFO, logger="flexkv.ssd")
    with SSDStore([str(tmp_path)], 4, BLOCK, 1 << 20, fingerprint="model-b") as store:
        assert store.journal.num_known == 0
    assert caplog.text.count("starting the SSD tier cold") == 1
    assert scan(journal_path(str(tmp_path)), "model-a", None, 4).records.size == 0
    with SSDStore([str(tmp_path)], 4, BLOCK, 1 << 20, fingerprint="model-b", persist_index=True) as store:
        assert store.journal.num_known == 0


def test_persist_index_false_forgets_the_journal(tmp_path: Path) -> None:
    src = Pool(2, seed=6)
    with SSDStore([str(tmp_path)], 2, BLOCK, 1 << 20) as store:
        _write_prompt(store, src, [0, 1], np.array([7, 8], dtype=np.uint64))
    with SSDStore([str(tmp_path)], 2, BLOCK, 1 << 20, persist_index=False) as store:
        assert store.journal.num_known == 0


def test_the_journal_is_compacted_once_it_outgrows_the_slots(tmp_path: Path) -> None:
    src = Pool(4, seed=7)
    path = journal_path(str(tmp_path))
    with SSDStore([str(tmp_path)], 4, BLOCK, 1 << 20) as store:
        for rnd in range(400):  # 1600 records for 4 slots
            _write_prompt(store, src, [0, 1, 2, 3], np.arange(1, 5, dtype=np.uint64) + np.uint64(10 * rnd))
        assert os.path.getsize(path) <= HEADER_BYTES + (2 * 4 + 1024 + 4) * RECORD_BYTES
    found = scan(path, "", None, 4)
    assert found.records["block_hash"].tolist() == [3991, 3992, 3993, 3994], "the latest write of each slot wins"


def _control(num_ssd_blocks: int) -> ControlPlane:
    model = ModelConfig(num_layers=1, num_kv_heads=1, head_size=8, dtype="float16")
    cache = CacheConfig(tokens_per_block=4, num_cpu_blocks=16, enable_ssd=True, num_ssd_blocks=num_ssd_blocks,
                        ssd_cache_dir=("/nonexistent",))
    return ControlPlane(model, cache)


def _records(rows: list[tuple[int, int, int, int, int]]) -> np.ndarray:
    """(seq, ssd_id, hash, parent, depth) -> journal records."""
    recs = np.zeros(len(rows), dtype=RECORD)
    for i, (seq, ssd_id, h, parent, depth) in enumerate(rows):
        recs[i] = (seq, ssd_id, h, parent, depth, int(depth > 0), 0, 1, 0)
    recs["check"] = record_checks(recs)
    return recs


def test_rebuild_keeps_branches_drops_orphans_and_prefers_the_latest_copy() -> None:
    # prompt A = 10, 11, 12, 13; prompt B shares 10, 11 then 21, 22; 12 is recorded twice (slot 9 newer);
    # 31 hangs below a block nobody recorded (an orphan).
    rows = [(1, 0, 10, 0, 0), (2, 1, 11, 10, 1), (3, 2, 12, 11, 2), (4, 3, 13, 12, 3), (5, 4, 21, 11, 2),
            (6, 5, 22, 21, 3), (7, 9, 12, 11, 2), (8, 6, 31, 99, 4)]
    cp = _control(16)
    assert cp.restore_ssd_index(_records(rows)) == 6
    cp.check_invariants()
    ssd = cp.tiers.ssd
    assert ssd is not None
    a = np.array([10, 11, 12, 13], dtype=np.uint64)
    b = np.array([10, 11, 21, 22], dtype=np.uint64)
    assert ssd.match(a).block_ids().tolist() == [0, 1, 9, 3]
    assert ssd.match(b).block_ids().tolist() == [0, 1, 4, 5]
    assert ssd.ready_prefix(ssd.match(a).block_ids()) == 4
    assert not ssd.pool.is_used(np.array([2, 6])).any(), "the older copy and the orphan stay free"
    # a rebuilt block can be evicted like any other
    assert ssd.evict(16) == 6
    cp.check_invariants()


def test_reads_verified_in_chunks_beside_the_next_read_flag_exactly_the_corrupt_blocks(tmp_path: Path) -> None:
    n = 40
    hashes = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(7919)
    src, dst = Pool(n, seed=8), Pool(n)
    with SSDStore([str(tmp_path)], n, BLOCK, 1 << 20, depth=4) as store:
        store.verify_chunk_bytes = 8 * BLOCK  # 5 chunks of 8 blocks
        _write_prompt(store, src, list(range(n)), hashes)
        fd = os.open(os.path.join(str(tmp_path), "flexkv_ssd_0000.data"), os.O_RDWR)
        try:
            for slot in (3, 17, 18, 39):
                os.pwrite(fd, b"\x00\xff", slot * BLOCK + 1000)
            os.fsync(fd)
        finally:
            os.close(fd)
        res = store.read_blocks(np.arange(n), dst.addr, BLOCK, np.arange(n), hashes)
        assert np.flatnonzero(res).tolist() == [3, 17, 18, 39] and (res[res != 0] == -errno.EBADMSG).all()
        assert all(dst.arr[i].tobytes() == src.arr[i].tobytes() for i in range(n) if i not in (3, 17, 18, 39))
        assert store.num_checksum_failures == 4


def test_rebuild_matches_a_reference_walk_on_random_forests() -> None:
    rng = np.random.default_rng(11)
    for _ in range(20):
        rows: list[tuple[int, int, int, int, int]] = []
        known: dict[int, int] = {}  # hash -> depth of the blocks written
        for _p in range(int(rng.integers(1, 12))):
            parent, depth = 0, 0
            if known and rng.random() < 0.6:  # branch off an existing block
                parent = int(rng.choice(list(known)))
                depth = known[parent] + 1
            for _b in range(int(rng.integers(1, 9))):
                h = int(rng.integers(1, 2**62))
                rows.append((len(rows) + 1, len(rows), h, parent, depth))
                known[h] = depth
                parent, depth = h, depth + 1
        recs = _records(rows)
        keep = rng.random(len(rows)) > 0.15  # some records lost
        recs = recs[keep]
        present = {int(r["block_hash"]): (int(r["parent_hash"]), int(r["depth"])) for r in recs}

        def reachable(h: int, present: dict[int, tuple[int, int]] = present) -> bool:
            while True:
                parent, depth = present[h]
                if depth == 0:
                    return True
                if parent not in present or present[parent][1] != depth - 1:
                    return False
                h = parent
        expected = sorted(int(r["ssd_id"]) for r in recs if reachable(int(r["block_hash"])))
        cp = _control(len(rows) + 1)
        assert cp.restore_ssd_index(recs) == len(expected)
        cp.check_invariants()
        ssd = cp.tiers.ssd
        assert ssd is not None
        assert sorted(np.concatenate([n.block_ids for n in ssd.iter_nodes()] or [np.empty(0, np.int64)]).tolist()) \
            == expected
        assert ssd.ready[expected].all()
        for r in recs:  # every restored block sits at the end of its own prompt's path
            h = int(r["block_hash"])
            if not reachable(h):
                continue
            path = [h]
            while present[path[-1]][1] > 0:
                path.append(present[path[-1]][0])
            ids = ssd.match(np.array(path[::-1], dtype=np.uint64)).block_ids()
            assert ids.size == len(path) and int(ids[-1]) == int(r["ssd_id"])

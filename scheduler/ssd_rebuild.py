"""Rebuild the SSD tier's radix index at server start from the SSD journal (``flexkv.ssd_journal``).

Each journal record names a slot, the block (chained hash) it holds, the block before it in its
prompt and its depth. Blocks are inserted ready, as runs along their prompts, starting from
depth-0 blocks; a block whose parent is not found (evicted and overwritten, or its record torn)
is left out, so the tier stays prefix-closed. When one block is recorded in several slots the
latest record wins and the other slots stay free. Server process only, before it serves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from flexkv.scheduler.index import RadixIndex
from flexkv.ssd_journal import Records

log = logging.getLogger("flexkv.server")

Progress = Callable[[int, int], None]


def restore(index: RadixIndex, records: Records, now: int, progress: Progress | None = None) -> int:
    """Insert the reachable blocks of ``records`` (latest per slot) into the empty ``index`` as
    ready; returns how many. ``progress(done, total)`` is called as runs are inserted."""
    assert index.pool.num_used_blocks == 0, "restore needs an empty index"
    records = _latest_per_block(records)
    runs = _runs(records)
    ids = np.concatenate([records["ssd_id"][r] for _, r in runs]) if runs else np.empty(0, np.int64)
    index.pool.take(ids.astype(np.int64))
    hashes = records["block_hash"]
    paths: dict[int, np.ndarray] = {-1: np.empty(0, dtype=np.uint64)}  # run index -> path through it
    done = 0
    for i, (parent_run, rows) in enumerate(runs):
        parent_path = paths[parent_run]
        run_hashes = hashes[rows].astype(np.uint64)
        run_ids = records["ssd_id"][rows].astype(np.int64)
        index.insert(index.match(parent_path), run_hashes, run_ids, now)
        index.publish(run_ids)
        paths[i] = np.concatenate([parent_path, run_hashes])
        done += rows.shape[0]
        if progress is not None:
            progress(done, ids.shape[0])
    return done


def _latest_per_block(records: Records) -> Records:
    """One record per block hash (and depth): the latest by seq."""
    order = np.argsort(records["seq"])[::-1]
    newest_first = records[order]
    keys = np.stack([newest_first["block_hash"], newest_first["depth"].astype(np.uint64)], axis=1)
    _, first = np.unique(keys, axis=0, return_index=True)
    return newest_first[np.sort(first)]


def _runs(records: Records) -> list[tuple[int, np.ndarray]]:
    """Runs of blocks in insertion order: (index of the parent's run or -1, record rows along the
    run). A run ends where a block has zero or several children; children follow their parent."""
    children: dict[tuple[int, int], list[int]] = {}
    for row, (parent, depth) in enumerate(zip(records["parent_hash"].tolist(), records["depth"].tolist(),
                                              strict=True)):
        if depth > 0:
            children.setdefault((parent, depth - 1), []).append(row)
    hashes, depths = records["block_hash"].tolist(), records["depth"].tolist()
    runs: list[tuple[int, np.ndarray]] = []
    stack = [(-1, row) for row in np.flatnonzero(records["depth"] == 0).tolist()]
    while stack:
        parent_run, row = stack.pop()
        rows = [row]
        while len(kids := children.get((hashes[rows[-1]], depths[rows[-1]]), [])) == 1:
            rows.append(kids[0])
        runs.append((parent_run, np.array(rows, dtype=np.int64)))
        stack.extend((len(runs) - 1, kid) for kid in kids)
    return runs


def progress_logger(every_s: float = 5.0) -> Progress:
    """A progress callback logging 'rebuilding the SSD index' at most every ``every_s`` seconds."""
    last = [time.monotonic()]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            log.info("rebuilding the SSD index: %d / %d blocks", done, total)
    return report

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


def restore(index: RadixIndex, records: Records, now: float, progress: Progress | None = None) -> int:
    """Insert the reachable blocks of ``records`` (latest per slot) into the empty ``index`` as
    ready; returns how many. ``progress(done, total)`` is called as runs are inserted."""
    assert index.pool.num_used_blocks == 0, "restore needs an empty index"
    records = _latest_per_block(records)
    rows, run_of, run_parent = _runs(records)
    ids = records["ssd_id"][rows].astype(np.int64)
    hashes = records["block_hash"][rows].astype(np.uint64)
    index.pool.take(ids)
    bounds = np.flatnonzero(np.diff(run_of, prepend=-1, append=-2))
    paths: list[np.ndarray] = []  # run -> the path through it (its parent's path, then its blocks)
    for run, (lo, hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)):
        parent_path = paths[run_parent[run]] if run_parent[run] >= 0 else hashes[:0]
        index.insert(index.match(parent_path), hashes[lo:hi], ids[lo:hi], now)
        index.publish(ids[lo:hi])
        paths.append(np.concatenate([parent_path, hashes[lo:hi]]))
        if progress is not None:
            progress(hi, ids.shape[0])
    return int(ids.shape[0])


def _latest_per_block(records: Records) -> Records:
    """One record per block hash: the latest by seq."""
    newest_first = records[np.argsort(records["seq"])[::-1]]
    _, first = np.unique(newest_first["block_hash"], return_index=True)
    return newest_first[np.sort(first)]


def _runs(records: Records) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group the reachable records into runs along prompts, vectorised by depth level.

    Returns (record rows ordered by run then depth, the run of each of those rows, each run's parent
    run or -1). A run starts at a depth-0 block or below a block with several children; runs are
    numbered so that a parent run comes before its children."""
    n = records.shape[0]
    depth = records["depth"].astype(np.int64)
    order = np.argsort(records["block_hash"])
    pos = np.minimum(np.searchsorted(records["block_hash"][order], records["parent_hash"]), max(n - 1, 0))
    parent = order[pos] if n else pos
    has_parent = (depth > 0) & (records["block_hash"][parent] == records["parent_hash"])
    has_parent &= depth[parent] == depth - 1
    parent = np.where(has_parent, parent, -1)
    reachable = depth == 0
    by_depth = np.argsort(depth, kind="stable")
    levels = np.split(by_depth, np.flatnonzero(np.diff(depth[by_depth])) + 1) if n else []
    for level in levels[1:]:  # parents are one level up, already decided
        p = parent[level]
        reachable[level] = (p >= 0) & reachable[np.maximum(p, 0)]
    kids = np.bincount(parent[reachable & (parent >= 0)], minlength=n)
    starts = reachable & ((parent < 0) | (kids[np.maximum(parent, 0)] != 1))
    run = np.full(n, -1, dtype=np.int64)
    start_rows = by_depth[starts[by_depth]]  # run ids in depth order: parents first
    run[start_rows] = np.arange(start_rows.shape[0])
    for level in levels[1:]:
        inherit = level[reachable[level] & ~starts[level]]
        run[inherit] = run[parent[inherit]]
    rows = np.flatnonzero(reachable)
    rows = rows[np.lexsort((depth[rows], run[rows]))]
    run_parent = np.where(parent[start_rows] >= 0, run[np.maximum(parent[start_rows], 0)], -1)
    return rows, run[rows], run_parent


def progress_logger(every_s: float = 5.0) -> Progress:
    """A progress callback logging 'rebuilding the SSD index' at most every ``every_s`` seconds."""
    last = [time.monotonic()]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            log.info("rebuilding the SSD index: %d / %d blocks", done, total)
    return report

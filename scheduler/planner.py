"""Planner: turns a match request into a Plan, the first phase of the two-phase protocol.

``plan_get`` / ``plan_put`` reserve everything the task will need (locks on blocks read, new
blocks allocated and inserted unready, locked for their writer) and describe the ops in a
``TaskGraph``. Nothing becomes visible as ready here; ``Task`` commits or rolls back each op's
reservations as the ops finish. Server process only.

Decisions beyond the brief, in one place:

* GET promotes SSD/REMOTE hits into CPU from the end of the CPU ready prefix, even blocks before
  the token mask's first True (the CPU tier must stay prefix-closed); H2D moves only masked blocks.
* GET promotes nothing when the CPU tier holds an unready block where promotion would start
  (another task is writing it): the match stops at the CPU ready prefix.
* PUT write-through sources only ready CPU blocks or blocks this PUT writes; it stops before a
  CPU block still being written by another task.
* A match whose mask is all False reserves nothing: no ops, not even write-through.

The remote tier has two modes. Without a lookup it is a ``RadixIndex`` of what this server stored.
With one (``Tiers.remote_store``, a ``RemoteTier``) the store itself is the index, shared by every
node using it:

* GET: the blocks beyond CPU and SSD that the store holds (``RemoteTier.readable_prefix``: cached
  positives + one batched existence check, never a key this server is still writing) are remote
  hits, promoted into CPU by one REMOTE2H keyed by their hashes. Nothing is locked in the store: it
  may evict a key before the read. Then the REMOTE2H fails and the GET still delivers the local
  prefix (see ``Task``): its H2D is cut before the remote part and its mask shrinks to match.
* PUT: write-through covers the blocks the store lacks from its known prefix to the end of the
  new CPU range, minus keys this server is already writing (the store is prefix-closed as far as
  we know; a hole after the known prefix is rewritten, which is harmless). While the store is
  unavailable PUTs plan no H2REMOTE at all; ``wait(completely=True)`` then reports FAILED naming
  the skipped blocks (counted in ``remote_skipped_write_blocks``). The store evicts by itself:
  ``num_remote_blocks`` is not enforced in this mode.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from flexkv.scheduler.graph import OpNode, Reservation, TaskGraph
from flexkv.scheduler.index import HashArray, PathMatch, RadixIndex
from flexkv.scheduler.pool import BlockIds
from flexkv.scheduler.remote_lookup import RemoteTier
from flexkv.types import Medium, OpType, TaskType


@dataclass(frozen=True)
class Tiers:
    """The cache tiers of one server; SSD and REMOTE are optional. REMOTE is either a local index
    (``remote``) or the shared store itself (``remote_store``), never both."""

    cpu: RadixIndex
    ssd: RadixIndex | None = None
    remote: RadixIndex | None = None
    remote_store: RemoteTier | None = None

    def all(self) -> list[RadixIndex]:
        """The radix indexes (a store-indexed remote tier has none)."""
        return [t for t in (self.cpu, self.ssd, self.remote) if t is not None]


@dataclass
class Plan:
    """What a match reserved: the graph, the engine-facing mask and the moved block range."""

    task_type: TaskType
    graph: TaskGraph
    mask: npt.NDArray[np.bool_]
    first_block: int  # blocks [first_block, end_block) move between GPU and CPU
    end_block: int
    num_hit_blocks: int = 0  # GET: cached ready prefix (all tiers); PUT: blocks already in CPU
    tokens_per_block: int = 1
    write_through_skipped: str = ""  # PUT: why a write-through could not even be planned (completely=True fails)

    @property
    def num_moved_blocks(self) -> int:
        return self.end_block - self.first_block


def _mask(num_tokens: int, tokens_per_block: int, first: int, end: int) -> npt.NDArray[np.bool_]:
    mask = np.zeros(num_tokens, dtype=np.bool_)
    mask[first * tokens_per_block:end * tokens_per_block] = True
    return mask


def _empty(task_type: TaskType, num_tokens: int, num_hit_blocks: int = 0) -> Plan:
    return Plan(task_type, TaskGraph(), np.zeros(num_tokens, dtype=np.bool_), 0, 0, num_hit_blocks)


@dataclass
class _LowerHit:
    """A ready prefix of SSD or REMOTE that extends beyond the faster tiers: blocks [start, stop).
    ``index`` None: the remote store itself (no local ids, nothing to lock)."""

    index: RadixIndex | None
    match: PathMatch | None
    block_ids: BlockIds | None
    start: int
    stop: int


def _lower_hits(tiers: Tiers, hashes: HashArray, start: int) -> list[_LowerHit]:
    hits = []
    for index in (tiers.ssd, tiers.remote):
        if index is None:
            continue
        match = index.match(hashes)
        ids = match.block_ids()
        stop = index.ready_prefix(ids)
        if stop > start:
            hits.append(_LowerHit(index, match, ids, start, stop))
            start = stop
    if tiers.remote_store is not None and start < hashes.size:
        stop = start + tiers.remote_store.readable_prefix(hashes[start:])
        if stop > start:
            hits.append(_LowerHit(None, None, None, start, stop))
    return hits


def plan_get(tiers: Tiers, hashes: HashArray, num_tokens: int, tokens_per_block: int, first_block: int,
             now: float) -> Plan:
    """Reserve a GET of blocks [first_block, end) where end is the longest ready prefix over all tiers.

    Locks the CPU blocks H2D reads and the SSD/REMOTE blocks promotion reads; allocates CPU blocks
    for the promotion (evicting unlocked CPU leaves, shortening the match if CPU runs out) and
    inserts them unready. Refreshes recency of every path it reads.
    """
    cpu = tiers.cpu
    cpu_match = cpu.match(hashes)
    cpu_ids = cpu_match.block_ids()
    num_cpu = cpu.ready_prefix(cpu_ids)
    hits = _lower_hits(tiers, hashes, num_cpu) if cpu_match.num_blocks == num_cpu else []
    end = hits[-1].stop if hits else num_cpu
    if end <= first_block:
        cpu.touch(cpu_match, num_cpu, now)
        return _empty(TaskType.GET, num_tokens, end)
    h2d_cpu = cpu_ids[first_block:num_cpu]
    cpu.lock(h2d_cpu)
    new_ids = cpu.allocate(end - num_cpu, cpu_match) if hits else cpu_ids[:0]
    end = num_cpu + new_ids.size
    if end <= first_block:
        cpu.unlock(h2d_cpu)
        cpu.pool.free(new_ids)
        cpu.touch(cpu_match, num_cpu, now)
        return _empty(TaskType.GET, num_tokens, end)
    graph = TaskGraph()
    promotions = tuple(_promote(graph, hit, hashes, new_ids, num_cpu, end, cpu, now) for hit in hits
                       if hit.start < end)
    cpu.insert(cpu_match, hashes[num_cpu:end], new_ids, now)
    cpu.lock(new_ids)  # their writers (promotion ops)
    new_read = new_ids[max(first_block - num_cpu, 0):]
    cpu.lock(new_read)  # H2D reads them too
    h2d_src = np.concatenate([h2d_cpu, new_read]) if new_read.size else h2d_cpu
    h2d = graph.add(OpType.H2D, h2d_src, h2d_src, reads=(Reservation(cpu, h2d_src),), deps=promotions)
    graph.depend(graph.end, (h2d,))
    mask = _mask(num_tokens, tokens_per_block, first_block, end)
    return Plan(TaskType.GET, graph, mask, first_block, end, end, tokens_per_block)


def _promote(graph: TaskGraph, hit: _LowerHit, hashes: HashArray, new_ids: BlockIds, num_cpu: int, end: int,
             cpu: RadixIndex, now: float) -> OpNode:
    """Add the DISK2H/REMOTE2H op filling new CPU blocks [hit.start, min(hit.stop, end))."""
    stop = min(hit.stop, end)
    dst = new_ids[hit.start - num_cpu:stop - num_cpu]
    writes = (Reservation(cpu, dst, hashes[:stop]),)
    if hit.index is None:  # the store itself: keyed by hashes, nothing local to lock
        return graph.add(OpType.REMOTE2H, np.full(dst.shape, -1, dtype=np.int64), dst, writes=writes,
                         block_hashes=hashes[hit.start:stop])
    assert hit.block_ids is not None and hit.match is not None
    src = hit.block_ids[hit.start:stop]
    hit.index.lock(src)
    hit.index.touch(hit.match, stop, now)
    is_remote = hit.index.medium is Medium.REMOTE
    return graph.add(OpType.REMOTE2H if is_remote else OpType.DISK2H, src, dst,
                     reads=(Reservation(hit.index, src),), writes=writes, block_hashes=hashes[hit.start:stop])


def plan_put(tiers: Tiers, hashes: HashArray, num_tokens: int, tokens_per_block: int, first_block: int,
             now: float) -> Plan:
    """Reserve a PUT of the blocks past the CPU tier's path (ready or being written), from
    ``first_block`` on, as far as CPU capacity allows (evicting unlocked CPU leaves), plus
    write-through of each lower tier from its own matched prefix to the end of the new CPU range.

    Inserts the new CPU/SSD/REMOTE blocks unready and locked for their writers; locks the CPU
    sources of write-through. Stores nothing if the CPU path ends before ``first_block``.
    """
    cpu = tiers.cpu
    cpu_match = cpu.match(hashes)
    start = cpu_match.num_blocks
    if start < first_block or start == hashes.size:
        cpu.touch(cpu_match, start, now)
        return _empty(TaskType.PUT, num_tokens, start)
    store = tiers.remote_store
    store_known = store.lookup.known_prefix(hashes) if store is not None else 0  # I/O before reserving anything
    new_ids = cpu.allocate(hashes.size - start, cpu_match)
    if new_ids.size == 0:
        cpu.touch(cpu_match, start, now)
        return _empty(TaskType.PUT, num_tokens, start)
    end = start + new_ids.size
    write_through = tiers.ssd is not None or tiers.remote is not None or tiers.remote_store is not None
    cpu_ids = np.concatenate([cpu_match.block_ids(), new_ids]) if write_through else new_ids
    cpu.insert(cpu_match, hashes[start:end], new_ids, now)
    cpu.lock(new_ids)
    graph = TaskGraph()
    d2h = graph.add(OpType.D2H, new_ids, new_ids, writes=(Reservation(cpu, new_ids, hashes[:end]),))
    graph.depend(graph.end, (d2h,))
    for index, op_type in ((tiers.ssd, OpType.H2DISK), (tiers.remote, OpType.H2REMOTE)):
        if index is not None:
            _write_through(graph, index, op_type, cpu, cpu_ids, start, hashes[:end], d2h, now)
    skipped = ""
    if store is not None and store.available:
        _write_through_store(graph, store, min(store_known, end), cpu, cpu_ids, start, hashes[:end], d2h)
    elif store is not None and end > store_known:  # the store is down: blocks stay local, completely=True says so
        store.lookup.note_skipped_write(end - store_known)
        skipped = f"remote store unavailable: {end - store_known} blocks not written through"
    mask = _mask(num_tokens, tokens_per_block, start, end)
    return Plan(TaskType.PUT, graph, mask, start, end, start, tokens_per_block, skipped)


def _ready_sources_stop(cpu: RadixIndex, cpu_ids: BlockIds, begin: int, num_old: int, stop: int) -> int:
    """Cut [begin, stop) before the first existing CPU source still being written by another task."""
    if begin < num_old:
        ready = cpu.ready_prefix(cpu_ids[begin:num_old])
        if begin + ready < num_old:
            return begin + ready
    return stop


def _write_through(graph: TaskGraph, index: RadixIndex, op_type: OpType, cpu: RadixIndex, cpu_ids: BlockIds,
                   num_old: int, hashes: HashArray, d2h: OpNode, now: float) -> None:
    """Reserve copying CPU blocks [tier prefix, end) into ``index`` (fewer if it lacks room)."""
    match = index.match(hashes)
    begin = match.num_blocks
    stop = _ready_sources_stop(cpu, cpu_ids, begin, num_old, hashes.size)
    if stop <= begin:
        index.touch(match, begin, now)
        return
    new_ids = index.allocate(stop - begin, match)
    if new_ids.size == 0:
        index.touch(match, begin, now)
        return
    stop = begin + new_ids.size
    index.insert(match, hashes[begin:stop], new_ids, now)
    index.lock(new_ids)
    src = cpu_ids[begin:stop]
    cpu.lock(src)
    graph.add(op_type, src, new_ids, reads=(Reservation(cpu, src),),
              writes=(Reservation(index, new_ids, hashes[:stop]),), deps=(d2h,) if stop > num_old else (),
              block_hashes=hashes[begin:stop] if op_type is OpType.H2REMOTE else hashes[:stop])


def _write_through_store(graph: TaskGraph, store: RemoteTier, begin: int, cpu: RadixIndex, cpu_ids: BlockIds,
                         num_old: int, hashes: HashArray, d2h: OpNode) -> None:
    """Reserve an H2REMOTE of the CPU blocks the shared store lacks (lookup mode): from its known
    prefix ``begin`` to the end, minus keys this server already writes, minus a tail whose CPU
    source another task still writes. Locks the CPU sources; the keys count as being written until
    the op ends."""
    stop = _ready_sources_stop(cpu, cpu_ids, begin, num_old, hashes.size)
    positions = store.unwritten(hashes[:stop], begin)
    if positions.size == 0:
        return
    src = cpu_ids[positions]
    keys = hashes[positions]
    cpu.lock(src)
    store.begin_write(keys)
    graph.add(OpType.H2REMOTE, src, np.full(src.shape, -1, dtype=np.int64), reads=(Reservation(cpu, src),),
              deps=(d2h,) if positions[-1] >= num_old else (), block_hashes=keys,
              on_finish=functools.partial(store.end_write, keys))

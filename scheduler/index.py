"""Radix index of one cache tier over chained block hashes.

A compressed radix tree: each node holds a run of (hash, block id) pairs as numpy arrays and its
children keyed by their first hash. Because block hash i names the whole prefix up to block i,
a node's run matches a query exactly when its last hash does, so a lookup compares one integer per
node and only searches inside the node where the query diverges.

Per-block state lives in arrays indexed by block id, not in nodes, so plans hold plain id arrays
that stay valid when nodes split, grow or shrink:

* ``ready[b]``: the block's bytes have landed (GETs use ready blocks only).
* ``lock_count[b]``: pending ops reading or writing it. An unready block with locks is being
  written (exactly one writer op); an unready block without locks is *dead* (its write was rolled
  back while other blocks hung below it) and is freed as soon as it is a leaf tail.

Only leaf tails with no locks are evicted, so the tier stays prefix-closed. Server process only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from flexkv.scheduler.eviction import Evictor
from flexkv.scheduler.pool import BlockIds, BlockPool
from flexkv.types import Medium

HashArray = npt.NDArray[np.uint64]
_NO_IDS: BlockIds = np.empty(0, dtype=np.int64)


class RadixNode:
    """A run of consecutive blocks of one path. The root is empty and never evicted."""

    __slots__ = ("alive", "block_ids", "children", "hashes", "inserted", "last_access", "num_hits", "parent",
                 "policy_state", "tail_hash")

    def __init__(self, hashes: HashArray, block_ids: BlockIds, parent: RadixNode | None, now: float) -> None:
        self.hashes = hashes
        self.block_ids = block_ids
        self.tail_hash = int(hashes[-1]) if hashes.size else -1
        self.children: dict[int, RadixNode] = {}
        self.parent = parent
        self.last_access = now
        self.inserted = now
        self.num_hits = 0
        self.alive = True
        self.policy_state: object = None  # the eviction policy's own per-node data (None for most)

    @property
    def is_evictable_leaf(self) -> bool:
        return self.alive and not self.children and self.parent is not None

    @property
    def num_blocks(self) -> int:
        return int(self.block_ids.shape[0])

    def set_run(self, hashes: HashArray, block_ids: BlockIds) -> None:
        self.hashes = hashes
        self.block_ids = block_ids
        self.tail_hash = int(hashes[-1])


@dataclass(slots=True)
class PathMatch:
    """Where a query's hashes lead in one tree. Valid until the tree changes (except by eviction
    while the last matched block is locked, which ``RadixIndex.allocate`` guarantees)."""

    num_blocks: int  # leading query blocks present in the tree, in any state
    nodes: list[RadixNode]  # nodes on the path (root excluded); the last may be matched in part
    last_offset: int  # blocks of nodes[-1] matched

    def block_ids(self) -> BlockIds:
        """Ids of the matched blocks, in path order (a fresh array)."""
        nodes = self.nodes
        if not nodes:
            return _NO_IDS
        parts = [n.block_ids for n in nodes]
        parts[-1] = parts[-1][:self.last_offset]
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)

    def tail_block_id(self) -> int:
        return int(self.nodes[-1].block_ids[self.last_offset - 1])


class RadixIndex:
    """The index of one tier: tree + per-block ready/lock state + pool + eviction policy."""

    def __init__(self, medium: Medium, pool: BlockPool, evictor: Evictor) -> None:
        self.medium = medium
        self.name = medium.name.lower()
        self.pool = pool
        self.evictor = evictor
        self.root = RadixNode(np.empty(0, dtype=np.uint64), _NO_IDS, None, 0)
        self.ready = np.zeros(pool.num_blocks, dtype=np.bool_)
        self.lock_count = np.zeros(pool.num_blocks, dtype=np.int32)
        self.num_nodes = 0
        self.num_evicted_blocks = 0

    # ---- lookup --------------------------------------------------------------------------

    def match(self, hashes: HashArray) -> PathMatch:
        """Follow ``hashes`` (uint64, contiguous) from the root as far as the tree holds them."""
        q = memoryview(hashes.data).cast("B").cast("Q")  # native "Q" whatever buffer the array came from
        num = len(q)
        node, pos, nodes, offset = self.root, 0, [], 0
        while pos < num:
            child = node.children.get(q[pos])
            if child is None:
                break
            run = child.block_ids.shape[0]
            end = pos + run
            nodes.append(child)
            if end <= num and q[end - 1] == child.tail_hash:
                node, pos, offset = child, end, run
                continue
            offset = self._diverge(child, hashes, pos)
            pos += offset
            break
        return PathMatch(pos, nodes, offset)

    @staticmethod
    def _diverge(node: RadixNode, hashes: HashArray, pos: int) -> int:
        """Blocks of ``node`` equal to ``hashes[pos:]`` (equality of chained hashes is a prefix)."""
        width = min(node.block_ids.shape[0], hashes.shape[0] - pos)
        if node.hashes[width - 1] == hashes[pos + width - 1]:
            return width
        return int(np.argmin(node.hashes[:width] == hashes[pos:pos + width]))

    def ready_prefix(self, block_ids: BlockIds) -> int:
        """Number of leading blocks of ``block_ids`` that are ready."""
        flags = self.ready[block_ids]
        return flags.shape[0] if flags.all() else int(np.argmin(flags))

    # ---- recency -------------------------------------------------------------------------

    def touch(self, match: PathMatch, num_blocks: int, now: float) -> None:
        """Refresh recency of the first ``num_blocks`` matched blocks (splitting a node matched in
        part so the unread rest keeps its age). Invalidates ``match``."""
        for node in match.nodes:
            if num_blocks <= 0:
                break
            run = node.block_ids.shape[0]
            if num_blocks < run:
                self._split(node, num_blocks)
            node.last_access = now
            node.num_hits += 1
            self.evictor.accessed(node, now)
            num_blocks -= run
            if not node.children:
                self.evictor.offer(node)
        self._maybe_rebuild_queue()

    # ---- block state ---------------------------------------------------------------------

    def lock(self, block_ids: BlockIds) -> None:
        """One more pending op uses these blocks (ids must be distinct): they cannot be evicted."""
        self.lock_count[block_ids] += 1

    def unlock(self, block_ids: BlockIds) -> None:
        self.lock_count[block_ids] -= 1

    def publish(self, block_ids: BlockIds) -> None:
        """The bytes of these blocks landed: GETs may now read them."""
        self.ready[block_ids] = True

    # ---- allocation, insertion, eviction ---------------------------------------------------

    def allocate(self, num_blocks: int, protect: PathMatch | None) -> BlockIds:
        """Allocate up to ``num_blocks`` ids, evicting unlocked leaf tails as needed; may return fewer.

        The blocks of ``protect`` (a path about to be extended) survive. The caller inserts the ids
        (``insert``) or frees them (``pool.free``) before the call that invoked it returns.
        """
        pool = self.pool
        if not pool.can_allocate(num_blocks):
            guard = protect.tail_block_id() if protect is not None and protect.num_blocks else -1
            if guard >= 0:
                self.lock_count[guard] += 1
            self.evict(num_blocks - pool.num_free_blocks)
            if guard >= 0:
                self.lock_count[guard] -= 1
            num_blocks = min(num_blocks, pool.num_free_blocks)
        ids = pool.allocate(num_blocks)
        if pool.num_blocks > self.ready.shape[0]:
            self._grow_state(pool.num_blocks)
        return ids

    def insert(self, match: PathMatch, hashes: HashArray, block_ids: BlockIds, now: float) -> None:
        """Append unready blocks (``hashes[i]`` held in ``block_ids[i]``) where ``match`` ended and
        refresh the path. The caller locks them for their writer. Invalidates ``match``."""
        if block_ids.size == 0:
            self.touch(match, match.num_blocks, now)
            return
        node = match.nodes[-1] if match.nodes else self.root
        if match.nodes and match.last_offset < node.block_ids.shape[0]:
            self._split(node, match.last_offset)
        for n in match.nodes:
            n.last_access = now
            n.num_hits += 1
            self.evictor.accessed(n, now)
        if node.parent is not None and not node.children:
            node.set_run(np.concatenate([node.hashes, hashes]), np.concatenate([node.block_ids, block_ids]))
        else:
            parent, node = node, RadixNode(hashes.copy(), block_ids.copy(), node, now)
            if not parent.children:
                self.evictor.discard(parent)
            parent.children[int(hashes[0])] = node
            self.num_nodes += 1
        self.evictor.offer(node)
        self._maybe_rebuild_queue()

    def evict(self, num_blocks: int) -> int:
        """Free up to ``num_blocks`` unlocked leaf-tail blocks in policy order; returns how many."""
        freed: list[BlockIds] = []
        stuck: list[RadixNode] = []
        total = 0
        while total < num_blocks:
            node = self.evictor.pop()
            if node is None:
                break
            assert isinstance(node, RadixNode)
            keep = self._locked_len(node)
            run = node.block_ids.shape[0]
            take = min(run - keep, num_blocks - total)
            if take <= 0:
                stuck.append(node)
                continue
            self.evictor.evicting(node, run - take)
            freed.append(self._cut_tail(node, run - take))
            total += take
            if node.alive:  # cut in part: requeue, as a candidate again or as stuck behind a lock
                if keep < run - take:
                    self.evictor.offer(node)
                else:
                    stuck.append(node)
        for node in stuck:
            self.evictor.offer(node)
        self._release(freed)
        self.num_evicted_blocks += total
        self._maybe_rebuild_queue()
        return total

    def prune(self, hashes: HashArray) -> int:
        """Free dead blocks (unready, unlocked: a rolled-back write) at leaf tails along the path of
        ``hashes``; returns how many. Dead blocks with live blocks below them stay until evicted."""
        match = self.match(hashes)
        freed: list[BlockIds] = []
        for node in reversed(match.nodes):
            if node.children or not node.alive:
                break
            ids = node.block_ids
            live = np.flatnonzero(self.ready[ids] | (self.lock_count[ids] > 0))
            cut = int(live[-1]) + 1 if live.size else 0
            if cut == ids.shape[0]:
                break
            freed.append(self._cut_tail(node, cut))
            if node.alive:
                self.evictor.offer(node)
                break
        self._release(freed)
        return sum(f.size for f in freed)

    def discard(self, hashes: HashArray) -> int:
        """Remove the block at the end of the path ``hashes`` and everything below it (its bytes are
        known bad), unless one of those blocks is locked (then nothing changes: a later reader finds
        it bad again). Returns how many blocks were freed; 0 if the path is not indexed."""
        match = self.match(hashes)
        if not match.nodes or match.num_blocks != hashes.shape[0]:
            return 0
        node, cut = match.nodes[-1], match.last_offset - 1
        below = self._subtree(node)
        ids = np.concatenate([node.block_ids[cut:], *(n.block_ids for n in below)])
        if self.lock_count[ids].any():
            return 0
        for n in below:
            n.alive = False
        self.num_nodes -= len(below)
        node.children = {}
        self._cut_tail(node, cut)
        if node.alive:
            self.evictor.offer(node)
        self._release([ids])
        return int(ids.shape[0])

    @staticmethod
    def _subtree(node: RadixNode) -> list[RadixNode]:
        out: list[RadixNode] = []
        stack = list(node.children.values())
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out

    # ---- internals -----------------------------------------------------------------------

    def _locked_len(self, node: RadixNode) -> int:
        """Length of the node's head that cannot be evicted (up to its last locked block)."""
        locks = self.lock_count[node.block_ids]
        if not locks.any():
            return 0
        return int(np.flatnonzero(locks)[-1]) + 1

    def _cut_tail(self, node: RadixNode, cut: int) -> BlockIds:
        """Detach blocks ``cut:`` of leaf ``node`` (removing it when ``cut == 0``); returns their ids."""
        tail = node.block_ids[cut:]
        if cut > 0:
            node.set_run(node.hashes[:cut], node.block_ids[:cut])
            return tail
        parent = node.parent
        assert parent is not None
        del parent.children[int(node.hashes[0])]
        node.alive = False
        self.evictor.discard(node)
        self.num_nodes -= 1
        if parent.parent is not None and not parent.children:
            self.evictor.offer(parent)
        return tail

    def _release(self, freed: list[BlockIds]) -> None:
        if not freed:
            return
        ids = freed[0] if len(freed) == 1 else np.concatenate(freed)
        self.ready[ids] = False
        self.pool.free(ids)

    def _split(self, node: RadixNode, at: int) -> None:
        """Keep blocks ``:at`` in ``node``; move the rest (and the children) to a new child."""
        tail = RadixNode(node.hashes[at:], node.block_ids[at:], node, node.last_access)
        tail.num_hits = node.num_hits
        tail.inserted = node.inserted
        if not node.children:
            self.evictor.discard(node)
        tail.children = node.children
        for child in tail.children.values():
            child.parent = tail
        node.set_run(node.hashes[:at], node.block_ids[:at])
        node.children = {int(tail.hashes[0]): tail}
        self.num_nodes += 1
        self.evictor.split(node, tail)
        if not tail.children:
            self.evictor.offer(tail)

    def _grow_state(self, num_blocks: int) -> None:
        extra = num_blocks - self.ready.shape[0]
        self.ready = np.concatenate([self.ready, np.zeros(extra, dtype=np.bool_)])
        self.lock_count = np.concatenate([self.lock_count, np.zeros(extra, dtype=np.int32)])

    def _maybe_rebuild_queue(self) -> None:
        """Every access queues an entry; drop the stale ones before they outnumber the nodes."""
        if len(self.evictor) > 4 * self.num_nodes + 4096:
            self.evictor.rebuild(n for n in self.iter_nodes() if not n.children)

    def iter_nodes(self) -> list[RadixNode]:
        """Every node but the root (depth first)."""
        out: list[RadixNode] = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    @property
    def num_indexed_blocks(self) -> int:
        return self.pool.num_used_blocks

    def check_invariants(self) -> None:
        """Tree shape (every node reachable from the root by its first hash, so the tier is
        prefix-closed), every leaf queued for eviction, indexed ids == allocated ids (no leak, no
        double use), lock counts >= 0, free blocks neither locked nor ready. Raises AssertionError
        naming the problem. (Lock counts against live reservations: ``ControlPlane.check_invariants``.)"""
        self.pool.check_invariants()
        self.evictor.check_invariants()
        nodes = self.iter_nodes()
        queued = self.evictor.queued()
        for node in nodes:
            run = node.block_ids.shape[0]
            assert node.alive and run > 0 and node.hashes.shape[0] == run, f"{self.name}: bad node run {run}"
            assert node.tail_hash == int(node.hashes[-1]), f"{self.name}: stale tail hash"
            assert node.parent is not None and node.parent.children.get(int(node.hashes[0])) is node, (
                f"{self.name}: node not reachable from its parent by its first hash")
            assert node.children or id(node) in queued, f"{self.name}: leaf missing from the eviction queue"
        assert len(nodes) == self.num_nodes, f"{self.name}: num_nodes {self.num_nodes} != {len(nodes)}"
        ids = np.concatenate([n.block_ids for n in nodes]) if nodes else _NO_IDS
        assert np.unique(ids).size == ids.size, f"{self.name}: a block id is indexed twice"
        assert self.pool.is_used(ids).all(), f"{self.name}: an indexed block is not allocated"
        assert ids.size == self.pool.num_used_blocks, (
            f"{self.name}: {self.pool.num_used_blocks} blocks allocated but {ids.size} indexed (leak)")
        assert (self.lock_count >= 0).all(), f"{self.name}: negative lock count"
        unused = ~self.pool.is_used(np.arange(self.pool.num_blocks))
        assert not (self.lock_count[unused].any() or self.ready[unused].any()), (
            f"{self.name}: a free block is locked or ready")

"""Eviction policies: which leaf of a radix index gives up its tail blocks first.

The index offers every node that is (or just became) a leaf, and after each access; the policy
keeps them in a heap ordered by ``priority`` and hands back the lowest valid one. Entries go
stale when a node is touched again, gains a child or leaves the tree; ``pop`` skips those.
A policy is one subclass with its own ``priority`` (SLRU also splits the heap in two segments).
Times are the control plane's clock in seconds. Runs in the server process only.

* LRU: least recently used first.
* FIFO: inserted longest ago first (accesses do not refresh).
* LFU: fewest hits first, then least recently used.
* FLRU: smallest ``last_access + hit_reward_s * hits`` first: each hit buys grace time (FlexKV's
  frequency-aware LRU).
* SLRU: probation (fewer than ``promote_hits`` hits) before protected, LRU in each; while protected
  holds more than ``protected_ratio`` of the queued blocks, its LRU nodes go first (demotion).
"""

from __future__ import annotations

import abc
import dataclasses
import heapq
import itertools
from collections.abc import Iterable
from typing import Protocol

from flexkv.types import EvictionPolicy

Priority = tuple[float, float]


class EvictableNode(Protocol):
    """What a policy may read from an index node."""

    last_access: float  # clock (seconds) of the latest access
    inserted: float  # clock when the node's first block was inserted
    num_hits: int  # accesses since insertion

    @property
    def is_evictable_leaf(self) -> bool: ...

    @property
    def num_blocks(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class EvictionParams:
    """Knobs of the policies that have any (config keys of the same names)."""

    hit_reward_s: float = 30.0  # FLRU: grace time one hit buys
    promote_hits: int = 2  # SLRU: hits that move a node from probation to protected
    protected_ratio: float = 0.2  # SLRU: largest share of the queued blocks held by the protected segment


_Entry = tuple[float, float, int, EvictableNode]


class Evictor(abc.ABC):
    """Orders leaves for eviction; lowest ``priority`` goes first."""

    def __init__(self) -> None:
        self._heap: list[_Entry] = []
        self._seq = itertools.count()

    @abc.abstractmethod
    def priority(self, node: EvictableNode) -> Priority:
        """Sort key of ``node`` now; lower is evicted first."""

    def offer(self, node: EvictableNode) -> None:
        """``node`` is a leaf whose priority may have changed: (re)queue it."""
        first, second = self.priority(node)
        heapq.heappush(self._heap, (first, second, next(self._seq), node))

    def pop(self) -> EvictableNode | None:
        """The lowest-priority live leaf (removed from the queue), or None when none is left."""
        return _pop_live(self._heap, self.priority)

    def discard(self, node: EvictableNode) -> None:
        """``node`` stopped being a leaf (it gained a child or left the tree). Its heap entries go
        stale by themselves; policies that account per node forget it here."""
        return None

    def __len__(self) -> int:
        return len(self._heap)

    def rebuild(self, leaves: Iterable[EvictableNode]) -> None:
        """Drop stale entries: requeue exactly ``leaves`` (called when the heap grew too large)."""
        self._heap = []
        for node in leaves:
            self.offer(node)

    def queued(self) -> set[int]:
        """ids (``id(node)``) of the nodes with an entry matching their current priority (for invariants)."""
        return _live_ids(self._heap, self.priority)

    def check_invariants(self) -> None:
        """The policy's own bookkeeping is consistent (raises AssertionError naming the problem)."""
        return None


def _pop_live(heap: list[_Entry], priority: object) -> EvictableNode | None:
    while heap:
        first, second, _, node = heapq.heappop(heap)
        if node.is_evictable_leaf and (first, second) == priority(node):  # type: ignore[operator]
            return node
    return None


def _live_ids(heap: list[_Entry], priority: object) -> set[int]:
    return {id(n) for first, second, _, n in heap if (first, second) == priority(n)}  # type: ignore[operator]


class LRUEvictor(Evictor):
    """Least recently used leaf first."""

    def priority(self, node: EvictableNode) -> Priority:
        return node.last_access, 0.0


class FIFOEvictor(Evictor):
    """Oldest insertion first; hits do not refresh a node."""

    def priority(self, node: EvictableNode) -> Priority:
        return node.inserted, 0.0


class LFUEvictor(Evictor):
    """Fewest hits first, least recently used among equals."""

    def priority(self, node: EvictableNode) -> Priority:
        return float(node.num_hits), node.last_access


class FrequencyLRUEvictor(Evictor):
    """LRU where every hit adds ``hit_reward_s`` seconds of grace to the node."""

    def __init__(self, hit_reward_s: float) -> None:
        super().__init__()
        self.hit_reward_s = hit_reward_s

    def priority(self, node: EvictableNode) -> Priority:
        return node.last_access + self.hit_reward_s * node.num_hits, 0.0


class SLRUEvictor(Evictor):
    """Segmented LRU: a probation and a protected heap. A node with ``promote_hits`` hits or more
    is protected; while the protected segment holds more than ``protected_ratio`` of the queued
    blocks, its least recently used nodes are evicted (demoted) before probation's."""

    def __init__(self, promote_hits: int, protected_ratio: float) -> None:
        super().__init__()
        self.promote_hits = promote_hits
        self.protected_ratio = protected_ratio
        self._protected: list[_Entry] = []
        # Blocks per queued node when last offered, by segment (an estimate between offers: the index
        # re-offers a node after every change of its run, so it is exact whenever a pop decides).
        self._sizes: tuple[dict[int, int], dict[int, int]] = ({}, {})
        self._num_blocks = [0, 0]

    def is_protected(self, node: EvictableNode) -> bool:
        return node.num_hits >= self.promote_hits

    def priority(self, node: EvictableNode) -> Priority:
        return float(self.is_protected(node)), node.last_access

    def offer(self, node: EvictableNode) -> None:
        segment = int(self.is_protected(node))
        self._forget(node)
        self._sizes[segment][id(node)] = node.num_blocks
        self._num_blocks[segment] += node.num_blocks
        heap = self._protected if segment else self._heap
        heapq.heappush(heap, (float(segment), node.last_access, next(self._seq), node))

    def discard(self, node: EvictableNode) -> None:
        self._forget(node)

    def _forget(self, node: EvictableNode) -> None:
        for segment in (0, 1):
            size = self._sizes[segment].pop(id(node), None)
            if size is not None:
                self._num_blocks[segment] -= size

    def pop(self) -> EvictableNode | None:
        total = self._num_blocks[0] + self._num_blocks[1]
        over = self._num_blocks[1] > self.protected_ratio * total
        order = (self._protected, self._heap) if over else (self._heap, self._protected)
        for heap in order:
            node = _pop_live(heap, self.priority)
            if node is not None:
                self._forget(node)
                return node
        return None

    def __len__(self) -> int:
        return len(self._heap) + len(self._protected)

    def rebuild(self, leaves: Iterable[EvictableNode]) -> None:
        self._heap, self._protected = [], []
        self._sizes = ({}, {})
        self._num_blocks = [0, 0]
        for node in leaves:
            self.offer(node)

    def queued(self) -> set[int]:
        return _live_ids(self._heap, self.priority) | _live_ids(self._protected, self.priority)

    def check_invariants(self) -> None:
        """Each segment's block count is the sum of its nodes' recorded sizes; each recorded node is
        a leaf of the recorded size, in one segment only, queued in that segment's heap."""
        nodes = {id(n): n for heap in (self._heap, self._protected) for *_, n in heap}
        for segment, sizes in enumerate(self._sizes):
            assert self._num_blocks[segment] == sum(sizes.values()), f"slru: segment {segment} count drifted"
            for node_id, size in sizes.items():
                node = nodes.get(node_id)
                assert node is not None and node.is_evictable_leaf, "slru: a counted node is not a queued leaf"
                assert node.num_blocks == size, f"slru: node counted as {size} blocks has {node.num_blocks}"
        assert not set(self._sizes[0]) & set(self._sizes[1]), "slru: a node is counted in both segments"


def make_evictor(policy: EvictionPolicy, params: EvictionParams | None = None) -> Evictor:
    """The evictor for ``policy``; raises ValueError for a policy not implemented here."""
    p = params or EvictionParams()
    if policy is EvictionPolicy.LRU:
        return LRUEvictor()
    if policy is EvictionPolicy.FIFO:
        return FIFOEvictor()
    if policy is EvictionPolicy.LFU:
        return LFUEvictor()
    if policy is EvictionPolicy.FLRU:
        return FrequencyLRUEvictor(p.hit_reward_s)
    if policy is EvictionPolicy.SLRU:
        return SLRUEvictor(p.promote_hits, p.protected_ratio)
    raise ValueError(f"eviction policy {policy!r} is not implemented")

"""Eviction policies: which leaf of a radix index gives up its tail blocks first.

The index offers every node that is (or just became) a leaf, and after each access; the policy
keeps them in a heap ordered by ``priority`` and hands back the lowest valid one. Entries go
stale when a node is touched again, gains a child or leaves the tree; ``pop`` skips those.
Adding LFU/SLRU = one subclass with its own ``priority``. Runs in the server process only.
"""

from __future__ import annotations

import abc
import heapq
import itertools
from collections.abc import Iterable
from typing import Protocol

from flexkv.types import EvictionPolicy


class EvictableNode(Protocol):
    """What a policy may read from an index node."""

    last_access: int  # logical clock of the latest access
    num_hits: int  # accesses since insertion

    @property
    def is_evictable_leaf(self) -> bool: ...


class Evictor(abc.ABC):
    """Orders leaves for eviction; lowest ``priority`` goes first."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, int, EvictableNode]] = []
        self._seq = itertools.count()

    @abc.abstractmethod
    def priority(self, node: EvictableNode) -> tuple[int, int]:
        """Sort key of ``node`` now; lower is evicted first."""

    def offer(self, node: EvictableNode) -> None:
        """``node`` is a leaf whose priority may have changed: (re)queue it."""
        first, second = self.priority(node)
        heapq.heappush(self._heap, (first, second, next(self._seq), node))

    def pop(self) -> EvictableNode | None:
        """The lowest-priority live leaf (removed from the queue), or None when none is left."""
        heap = self._heap
        while heap:
            first, second, _, node = heapq.heappop(heap)
            if node.is_evictable_leaf and (first, second) == self.priority(node):
                return node
        return None

    def __len__(self) -> int:
        return len(self._heap)

    def rebuild(self, leaves: Iterable[EvictableNode]) -> None:
        """Drop stale entries: requeue exactly ``leaves`` (called when the heap grew too large)."""
        seq = self._seq
        self._heap = [(*self.priority(n), next(seq), n) for n in leaves]
        heapq.heapify(self._heap)

    def queued(self) -> set[int]:
        """ids (``id(node)``) of the nodes with an entry matching their current priority (for invariants)."""
        return {id(n) for first, second, _, n in self._heap if (first, second) == self.priority(n)}


class LRUEvictor(Evictor):
    """Least recently used leaf first."""

    def priority(self, node: EvictableNode) -> tuple[int, int]:
        return node.last_access, 0


def make_evictor(policy: EvictionPolicy) -> Evictor:
    """The evictor for ``policy``; raises ValueError for a policy not implemented here."""
    if policy is EvictionPolicy.LRU:
        return LRUEvictor()
    raise ValueError(f"eviction policy {policy!r} is not implemented")

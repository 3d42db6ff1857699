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
* HAZARD: the lowest learned reuse rate per block-second held (``HazardEvictor``): each leaf's life
  gets a class (fresh prompt by length, continued conversation by depth, new run and pace, split
  remainder, re-hit); per class the chance of reuse by age is learned online from the past and
  turned into a Gittins-style index; LRU within a class. Needs the index's hooks (``accessed``,
  ``split``, ``evicting``) and keeps its data in each node's ``policy_state``.
"""

from __future__ import annotations

import abc
import bisect
import collections
import dataclasses
import enum
import heapq
import itertools
import math
from collections.abc import Iterable, Mapping
from typing import Protocol

import numpy as np
import numpy.typing as npt

from flexkv.types import EvictionPolicy

Priority = tuple[float, float]


class EvictableNode(Protocol):
    """What a policy may read from an index node (``policy_state`` is the policy's to write)."""

    last_access: float  # clock (seconds) of the latest access
    inserted: float  # clock when the node's first block was inserted
    num_hits: int  # accesses since insertion
    policy_state: object  # the policy's own per-node data; None until the policy sets it

    @property
    def parent(self) -> EvictableNode | None: ...

    @property
    def hashes(self) -> npt.NDArray[np.uint64]: ...

    @property
    def children(self) -> Mapping[int, EvictableNode]: ...

    @property
    def is_evictable_leaf(self) -> bool: ...

    @property
    def num_blocks(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class EvictionParams:
    """Knobs of the policies that have any (config keys of the same names)."""

    hit_reward_s: float = 30.0  # FLRU and HAZARD: grace time one hit buys
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

    def accessed(self, node: EvictableNode, now: float) -> None:
        """``node`` (a leaf or not) was just hit or refreshed at ``now`` (its ``last_access`` is set)."""
        return None

    def split(self, head: EvictableNode, tail: EvictableNode) -> None:
        """``head`` was cut in two: ``tail`` is the new node holding its back part (offered next if a leaf)."""
        return None

    def evicting(self, node: EvictableNode, keep: int) -> None:
        """Blocks ``keep:`` of leaf ``node`` are about to be evicted (not called for dead or bad blocks)."""
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


# ---- hazard: online-learned reuse hazard per conversation class ------------------------------

HAZARD_EDGES_S = (0.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 240.0, 360.0, 480.0, 720.0, 1200.0)
"""Ages (seconds since a node's last access) at which the hazard policy estimates reuse; past the
last one a node is worth nothing."""


class HazardClass(enum.IntEnum):
    """What a leaf's current life looks like when it starts (a life = from an access to the next)."""

    REMAINDER = 0  # the unread back of a node a hit split (often a prompt's last, partial chunk)
    FRESH_SHORT = 1  # a put's new run starting a conversation, whole prompt < 128 blocks
    FRESH_MEDIUM = 2  # ... < 512 blocks
    FRESH_LONG = 3  # ... >= 512 blocks
    CONTINUED = 4  # a put continuing a leaf that was just hit (or was evicted, by the ghost list): 4..11,
    # + 4 if the conversation was continued twice or more, + 2 if the new run has >= 128 blocks,
    # + 1 if the previous turn came >= 90 s after the one before
    REHIT = 12  # a leaf hit again without being extended


NUM_HAZARD_CLASSES = 13
_CONT_BIG_RUN_BLOCKS = 128
_CONT_SLOW_GAP_S = 90.0
_FRESH_BLOCKS = (128, 512)


class _Life:
    """One life of one leaf: class, start (= its last_access then) and, once reused, the gap."""

    __slots__ = ("cls", "created", "gap", "start", "turns")

    def __init__(self, cls: int, start: float, created: float, turns: int) -> None:
        self.cls = cls
        self.start = start
        self.created = created
        self.turns = turns  # continuations of the conversation before this life
        self.gap = math.nan  # seconds from start to the reuse; NaN while not reused

    def resolve(self, now: float) -> float:
        if math.isnan(self.gap):
            self.gap = max(0.0, now - self.start)
        return self.gap


class _HazardState:
    """The hazard policy's data on one node (``node.policy_state``)."""

    __slots__ = ("blocks", "cls", "gap", "life", "resolved_at", "start", "turns")

    def __init__(self, cls: int, start: float, turns: int, life: _Life | None, blocks: int) -> None:
        self.cls = cls
        self.start = start  # last_access when classified; a different last_access means a new life
        self.turns = turns
        self.life = life  # the open (not yet reused) life while the node is a leaf
        self.blocks = blocks
        self.resolved_at = -math.inf  # clock of the latest reuse of this node as a leaf
        self.gap = math.nan  # that reuse's gap


class HazardEvictor(Evictor):
    """Evict the leaf whose expected reuse per block-second is lowest, learned online.

    Each leaf life gets a class when it starts (``HazardClass``: a fresh prompt by length, a
    continued conversation by depth, new run and pace, a remainder, a re-hit). For each class the
    policy estimates, from the lives of the last ``window_s`` seconds (censored at their age; a
    life whose blocks were evicted stays at risk, and a later put that re-inserts them resolves it
    through a ghost list), the chance ``F(a)`` of reuse within age ``a`` on ``HAZARD_EDGES_S``,
    shrunk toward all classes pooled. A leaf of age ``a`` is worth the Gittins-style index
    ``max_b (F(b) - F(a)) / integral_a^b (1 - F)``: the best reuse rate per second held from now on.
    Leaves wait in one heap per class, oldest first, where as in FLRU each hit of a node adds
    ``hit_reward_s`` to its last access (its age is counted from there); ``pop`` takes the class head
    with the lowest index (oldest first on ties, so with nothing learned yet it is FLRU, and LRU with
    no reward). Uses only the past.

    Fixed choices (not fitted per class): ``HAZARD_EDGES_S``, the class boundaries of ``HazardClass``,
    ``window_s`` 1200, ``refit_s`` 10, ``prior_lives`` 20, ``smoothing`` 0.1 (each refit moves the
    index a tenth of the way to the new estimate), ``ghost_entries`` 65536; ``hit_reward_s`` is the
    config's ``hit_reward_seconds`` (30, chosen on the first half of the conversation trace).
    """

    def __init__(self, window_s: float = 1200.0, refit_s: float = 10.0, prior_lives: float = 20.0,
                 ghost_entries: int = 1 << 16, smoothing: float = 0.1, hit_reward_s: float = 0.0) -> None:
        super().__init__()
        self.hit_reward_s = hit_reward_s
        self.smoothing = smoothing
        self._fits = 0
        self.window_s = window_s
        self.refit_s = refit_s
        self.prior_lives = prior_lives
        self.ghost_entries = ghost_entries
        self._heaps: list[list[_Entry]] = [[] for _ in range(NUM_HAZARD_CLASSES)]
        self._lives: collections.deque[_Life] = collections.deque()
        self._ghost: collections.OrderedDict[int, _Life] = collections.OrderedDict()
        self.index_table = np.zeros((NUM_HAZARD_CLASSES, len(HAZARD_EDGES_S)))
        self._rows: list[list[float]] = self.index_table.tolist()
        self._now = -math.inf
        self._fitted_at = -math.inf

    # ---- classification ----------------------------------------------------------------------

    @staticmethod
    def _state(node: EvictableNode) -> _HazardState | None:
        state = node.policy_state
        return state if isinstance(state, _HazardState) else None

    def _new_life(self, node: EvictableNode, cls: int, turns: int) -> _HazardState:
        life = _Life(cls, node.last_access, self._now, turns)
        self._lives.append(life)
        state = _HazardState(cls, node.last_access, turns, life, node.num_blocks)
        node.policy_state = state
        return state

    @staticmethod
    def _continued_class(turns: int, new_blocks: int, gap: float) -> int:
        return (HazardClass.CONTINUED + 4 * (turns >= 2) + 2 * (new_blocks >= _CONT_BIG_RUN_BLOCKS)
                + int(gap >= _CONT_SLOW_GAP_S))

    def _classify_new(self, node: EvictableNode) -> None:
        """A node a put just created: a continuation of its parent, of an evicted prompt (ghost), or fresh."""
        parent = node.parent
        up = self._state(parent) if parent is not None else None
        if up is not None and up.resolved_at == node.last_access:
            turns = up.turns + 1
            cls = self._continued_class(turns, node.num_blocks, up.gap)
        else:
            ghost = self._ghost.pop(int(node.hashes[0]), None) if node.num_blocks else None
            if ghost is not None:
                gap = ghost.resolve(node.last_access)
                turns = ghost.turns + 1
                cls = self._continued_class(turns, node.num_blocks, gap)
            else:
                turns = 0
                blocks = node.num_blocks
                p = parent
                while p is not None:
                    blocks += p.num_blocks
                    p = p.parent
                cls = HazardClass.FRESH_SHORT + sum(blocks >= b for b in _FRESH_BLOCKS)
        self._new_life(node, cls, turns)

    # ---- index hooks -------------------------------------------------------------------------

    def accessed(self, node: EvictableNode, now: float) -> None:
        self._now = max(self._now, now)
        state = self._state(node)
        # an access at the instant its life began is the same request (a get, then its put): no reuse
        if state is not None and state.life is not None and now != state.life.start:
            state.gap = state.life.resolve(now)
            state.resolved_at = now
            state.life = None

    def split(self, head: EvictableNode, tail: EvictableNode) -> None:
        up = self._state(head)
        turns = up.turns if up is not None else 0
        if tail.is_evictable_leaf:
            self._new_life(tail, HazardClass.REMAINDER, turns)
        else:
            tail.policy_state = _HazardState(HazardClass.REMAINDER, tail.last_access, turns, None, tail.num_blocks)

    def evicting(self, node: EvictableNode, keep: int) -> None:
        state = self._state(node)
        if state is None or state.life is None:
            return
        self._ghost[int(node.hashes[keep])] = state.life
        while len(self._ghost) > self.ghost_entries:
            self._ghost.popitem(last=False)
        parent = node.parent
        if keep == 0 and parent is not None and parent.parent is not None and len(parent.children) == 1:
            # the parent becomes a leaf holding the same conversation's earlier turns: it carries on
            # this life, so a later hit on those turns (or their ghost) resolves it
            up = self._state(parent)
            if up is None or up.life is None:
                adopted = _HazardState(state.life.cls, parent.last_access, state.turns, state.life,
                                       parent.num_blocks)
                if up is not None:
                    adopted.resolved_at, adopted.gap = up.resolved_at, up.gap
                parent.policy_state = adopted

    def offer(self, node: EvictableNode) -> None:
        self._now = max(self._now, node.last_access)
        state = self._state(node)
        if state is None:
            self._classify_new(node)
        elif node.last_access != state.start:  # accessed since it was classified: a new life
            if state.resolved_at == node.last_access and node.num_blocks > state.blocks:  # extended in place
                turns = state.turns + 1
                cls = self._continued_class(turns, node.num_blocks - state.blocks, state.gap)
            else:
                turns, cls = state.turns, HazardClass.REHIT
            resolved_at, gap = state.resolved_at, state.gap
            state = self._new_life(node, cls, turns)
            state.resolved_at, state.gap = resolved_at, gap
        elif (node.num_blocks > state.blocks and state.resolved_at == node.last_access
              and state.life is not None and state.life.start == node.last_access):
            # extended at the instant its life began (a get hit it, then the put grew it): a continuation
            turns = state.turns + 1
            state.cls = state.life.cls = self._continued_class(turns, node.num_blocks - state.blocks, state.gap)
            state.turns = state.life.turns = turns
            state.blocks = node.num_blocks
        st = self._state(node)
        assert st is not None
        heapq.heappush(self._heaps[st.cls], (*self.priority(node), next(self._seq), node))

    def priority(self, node: EvictableNode) -> Priority:
        state = self._state(node)
        return ((float(state.cls) if state is not None else -1.0),
                node.last_access + self.hit_reward_s * node.num_hits)

    # ---- eviction ----------------------------------------------------------------------------

    def pop(self) -> EvictableNode | None:
        if self._now >= self._fitted_at + self.refit_s:
            self.refit()
        best: tuple[float, float, int] | None = None
        for cls, heap in enumerate(self._heaps):
            while heap:
                first, second, _, node = heap[0]
                if node.is_evictable_leaf and (first, second) == self.priority(node):
                    break
                heapq.heappop(heap)
            if not heap:
                continue
            last_access = heap[0][1]  # with the hits' grace time added
            value = self.value(cls, self._now - last_access)
            if best is None or (value, last_access) < best[:2]:
                best = (value, last_access, cls)
        if best is None:
            return None
        return heapq.heappop(self._heaps[best[2]])[3]

    def class_of(self, node: EvictableNode) -> tuple[HazardClass, int] | None:
        """(class, continuations of its conversation so far) of ``node``'s current life; None if unseen."""
        state = self._state(node)
        return None if state is None else (HazardClass(state.cls) if state.cls < HazardClass.CONTINUED
                                            or state.cls == HazardClass.REHIT else HazardClass.CONTINUED,
                                            state.turns)

    def lives(self) -> list[_Life]:
        """The lives the next refit learns from (oldest first)."""
        return list(self._lives)

    def value(self, cls: int, age: float) -> float:
        """The learned index of a ``cls`` leaf last accessed ``age`` seconds ago (0 past the last edge)."""
        return self._rows[cls][max(bisect.bisect_right(HAZARD_EDGES_S, age) - 1, 0)]

    def refit(self) -> None:
        """Re-estimate every class's reuse curve and index from the lives of the last ``window_s``."""
        now = self._now
        self._fitted_at = now
        lives = self._lives
        while lives and lives[0].created < now - self.window_s:
            lives.popleft()
        while self._ghost:
            oldest = next(iter(self._ghost.values()))
            if oldest.created >= now - self.window_s:
                break
            self._ghost.popitem(last=False)
        if not lives:
            return
        cls = np.fromiter((life.cls for life in lives), dtype=np.int64, count=len(lives))
        age = now - np.fromiter((life.start for life in lives), dtype=np.float64, count=len(lives))
        gap = np.fromiter((life.gap for life in lives), dtype=np.float64, count=len(lives))
        gap = np.where(np.isnan(gap), np.inf, gap)
        edges = np.asarray(HAZARD_EDGES_S)
        at_risk = age[None, :] >= edges[:, None]  # (edges, lives): old enough to know about edge e
        reused = at_risk & (gap[None, :] <= edges[:, None])
        n = np.stack([np.bincount(cls[r], minlength=NUM_HAZARD_CLASSES) for r in at_risk], axis=1)
        h = np.stack([np.bincount(cls[r], minlength=NUM_HAZARD_CLASSES) for r in reused], axis=1)
        pooled = h.sum(axis=0) / np.maximum(n.sum(axis=0), 1)
        cdf = (h + self.prior_lives * pooled) / (n + self.prior_lives)
        cdf = np.maximum.accumulate(np.clip(cdf, 0.0, 1.0), axis=1)
        fresh = _gittins(cdf, edges)
        keep = 0.0 if self._fits == 0 else 1.0 - self.smoothing
        self.index_table = keep * self.index_table + (1.0 - keep) * fresh
        self._fits += 1
        self._rows = self.index_table.tolist()

    def discard(self, node: EvictableNode) -> None:
        return None

    def __len__(self) -> int:
        return sum(len(h) for h in self._heaps)

    def rebuild(self, leaves: Iterable[EvictableNode]) -> None:
        self._heaps = [[] for _ in range(NUM_HAZARD_CLASSES)]
        for node in leaves:
            self.offer(node)

    def queued(self) -> set[int]:
        return set().union(*(_live_ids(h, self.priority) for h in self._heaps))

    def check_invariants(self) -> None:
        """Every heap holds only its class; every live queued node carries hazard state of that class;
        lives and ghosts are within the window and well formed; the index table is finite and >= 0."""
        for cls, heap in enumerate(self._heaps):
            for first, second, _, node in heap:
                assert first == cls, f"hazard: an entry of class {first} in heap {cls}"
                if node.is_evictable_leaf and (first, second) == self.priority(node):
                    state = self._state(node)
                    assert state is not None and state.cls == cls and state.start == node.last_access, (
                        "hazard: a queued leaf's state does not match its entry")
        for life in self._lives:
            assert 0 <= life.cls < NUM_HAZARD_CLASSES, f"hazard: life of class {life.cls}"
            assert math.isnan(life.gap) or life.gap >= 0, f"hazard: negative reuse gap {life.gap}"
        assert len(self._ghost) <= self.ghost_entries, "hazard: ghost list over its bound"
        table = self.index_table
        assert table.shape == (NUM_HAZARD_CLASSES, len(HAZARD_EDGES_S)), "hazard: index table shape"
        assert np.isfinite(table).all() and (table >= 0).all(), "hazard: index table not finite and >= 0"


def _gittins(cdf: npt.NDArray[np.float64], edges: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Per row and edge i: max over j > i of (F_j - F_i) / sum_{k=i}^{j-1} (1 - F_k) (e_{k+1} - e_k);
    0 at the last edge."""
    held = (1.0 - cdf[:, :-1]) * np.diff(edges)[None, :]
    cum = np.concatenate([np.zeros((cdf.shape[0], 1)), np.cumsum(held, axis=1)], axis=1)
    num = cdf[:, None, :] - cdf[:, :, None]  # [c, i, j] = F_j - F_i
    den = cum[:, None, :] - cum[:, :, None]
    later = np.triu(np.ones((edges.size, edges.size), dtype=bool), k=1)[None, :, :]
    rate = np.where(later & (den > 0), num / np.where(den > 0, den, 1.0), 0.0)
    return np.maximum(rate.max(axis=2), 0.0)


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
    if policy is EvictionPolicy.HAZARD:
        return HazardEvictor(hit_reward_s=p.hit_reward_s)
    raise ValueError(f"eviction policy {policy!r} is not implemented")

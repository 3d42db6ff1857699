"""Block pools: per-tier allocators of block ids over a preallocated free-id stack.

A pool only hands out and takes back ids; what a block holds, who locks it and whether it is
indexed is the index's business (``flexkv.scheduler.index``). Runs in the server process only.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from flexkv.types import CapacityError

BlockIds = npt.NDArray[np.int64]


class BlockPool:
    """A fixed (or, for ``growable``, doubling) set of block ids ``0 .. num_blocks - 1``.

    ``allocate`` pops ids from a numpy stack, ``free`` pushes them back; both are O(n) numpy
    copies with no Python object per block. A used-flag array catches double frees.
    """

    def __init__(self, num_blocks: int, growable: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.growable = growable
        self._free_ids: BlockIds = np.arange(num_blocks - 1, -1, -1, dtype=np.int64)
        self._num_free = num_blocks
        self._used = np.zeros(num_blocks, dtype=np.bool_)

    @property
    def num_blocks(self) -> int:
        return int(self._used.shape[0])

    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self._num_free

    def can_allocate(self, num_blocks: int) -> bool:
        """True if ``allocate(num_blocks)`` would succeed without eviction."""
        return self.growable or num_blocks <= self._num_free

    def allocate(self, num_blocks: int) -> BlockIds:
        """Reserve ``num_blocks`` ids (the caller owns them until ``free``).

        Raises CapacityError when a fixed pool has fewer free ids; a growable pool doubles instead.
        """
        if num_blocks > self._num_free:
            if not self.growable:
                raise CapacityError(f"pool has {self._num_free} free blocks, {num_blocks} requested")
            self.grow(max(2 * self.num_blocks, self.num_used_blocks + num_blocks))
        top = self._num_free
        ids = self._free_ids[top - num_blocks:top].copy()
        self._num_free = top - num_blocks
        self._used[ids] = True
        return ids

    def take(self, block_ids: BlockIds) -> None:
        """Reserve exactly these ids (distinct, free), e.g. blocks found again at start. ValueError
        (nothing changed) if one is out of range, repeated or already used."""
        if block_ids.size == 0:
            return
        if (block_ids.min() < 0 or block_ids.max() >= self.num_blocks or np.unique(block_ids).size != block_ids.size
                or self._used[block_ids].any()):
            raise ValueError("take: block ids must be distinct, in range and free")
        self._used[block_ids] = True
        free = self._free_ids[:self._num_free]
        keep = free[~self._used[free]]
        self._free_ids[:keep.size] = keep
        self._num_free = int(keep.size)

    def free(self, block_ids: BlockIds) -> None:
        """Return ids to the pool. Raises ValueError (and changes nothing) on a double free."""
        if block_ids.size == 0:
            return
        if not self._used[block_ids].all():
            raise ValueError(f"free of blocks that are not allocated: {block_ids[~self._used[block_ids]][:8]}")
        self._used[block_ids] = False
        top = self._num_free
        self._free_ids[top:top + block_ids.size] = block_ids
        self._num_free = top + block_ids.size

    def grow(self, num_blocks: int) -> None:
        """Raise capacity to ``num_blocks`` (new ids are free). Only growable pools call this."""
        old = self.num_blocks
        if num_blocks <= old:
            return
        free_ids = np.empty(num_blocks, dtype=np.int64)
        free_ids[:self._num_free] = self._free_ids[:self._num_free]
        free_ids[self._num_free:self._num_free + num_blocks - old] = np.arange(num_blocks - 1, old - 1, -1)
        self._free_ids = free_ids
        self._num_free += num_blocks - old
        self._used = np.concatenate([self._used, np.zeros(num_blocks - old, dtype=np.bool_)])

    def is_used(self, block_ids: BlockIds) -> npt.NDArray[np.bool_]:
        return self._used[block_ids]

    def check_invariants(self) -> None:
        """Free and used ids partition the pool; raises AssertionError naming the problem."""
        free = self._free_ids[:self._num_free]
        assert 0 <= self._num_free <= self.num_blocks, f"pool: num_free {self._num_free} out of range"
        assert np.unique(free).size == free.size, "pool: an id is on the free stack twice"
        assert not self._used[free].any(), "pool: an id is both free and used"
        assert int(self._used.sum()) == self.num_used_blocks, (
            f"pool: {int(self._used.sum())} used flags but {self.num_used_blocks} ids off the free stack")

"""Per-request transfer state of the scheduler-side connector (plain data, no I/O).

A request's load goes MatchedLoad (get_match reserved it) -> LaunchedLoad (slots bound, bytes moving)
-> reported in a step's metadata. A finished request's save is one LaunchedSave until reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from flexkv.integration.vllm.metadata import FlexKVConnectorMetadata


@dataclasses.dataclass
class MatchedLoad:
    """A reserved GET of tokens ``[num_computed, num_computed + num_tokens)`` of ``token_ids``."""

    task_id: int
    token_ids: npt.NDArray[np.int64]  # the whole-block prefix that was matched
    num_computed: int  # tokens vLLM had already (not loaded)
    num_tokens: int  # tokens flexkv will load
    asked: tuple[int, int] = (0, 0)  # (begin, end) vLLM asked about: the same question gets this answer


@dataclasses.dataclass
class LaunchedLoad:
    task_id: int
    num_tokens: int
    block_ids: list[int]  # vLLM blocks the load writes (reported as failed if it does not complete)


@dataclasses.dataclass
class LaunchedSave:
    task_id: int
    num_tokens: int
    token_ids: npt.NDArray[np.int64]  # what is being stored (a request sharing its prefix waits for it)

    def extends_hit(self, tokens: npt.NDArray[np.int64], begin: int, block_size: int) -> bool:
        """Would this save, once done, let ``tokens`` load at least one more vLLM block than ``begin``?"""
        need = begin + block_size
        if self.num_tokens < need or tokens.shape[0] < need:
            return False
        return bool(np.array_equal(self.token_ids[:need], tokens[:need]))


@dataclasses.dataclass
class StepReport:
    """What the next metadata carries; emptied when it is taken."""

    finished_loads: set[str] = dataclasses.field(default_factory=set)
    failed_loads: set[str] = dataclasses.field(default_factory=set)
    failed_block_ids: set[int] = dataclasses.field(default_factory=set)
    finished_saves: set[str] = dataclasses.field(default_factory=set)

    def load_done(self, req_id: str, failed_block_ids: Sequence[int] = ()) -> None:
        self.finished_loads.add(req_id)
        if failed_block_ids:
            self.failed_loads.add(req_id)
            self.failed_block_ids.update(failed_block_ids)

    def take(self, server_address: str | None, server_lost: bool) -> FlexKVConnectorMetadata:
        meta = FlexKVConnectorMetadata(server_address, self.finished_loads, self.failed_loads,
                                       self.failed_block_ids, self.finished_saves, server_lost)
        self.finished_loads, self.failed_loads, self.failed_block_ids, self.finished_saves = set(), set(), set(), set()
        return meta


def slot_mapping(block_ids: Sequence[int], block_size: int, num_tokens: int) -> npt.NDArray[np.int64]:
    """Token-level slots of the first ``num_tokens`` tokens of a request holding vLLM ``block_ids``.

    Token i sits in slot ``block_ids[i // block_size] * block_size + i % block_size``; with flexkv's
    tokens_per_block T dividing block_size that is flexkv block ``slot // T`` of the engine tensor
    registered with block_size / T flexkv blocks per vLLM block. Tokens past the blocks get -1 (never moved).
    """
    out = np.full(num_tokens, -1, dtype=np.int64)
    covered = min(num_tokens, len(block_ids) * block_size)
    if covered:
        idx = np.arange(covered, dtype=np.int64)
        blocks = np.asarray(block_ids, dtype=np.int64)[idx // block_size]
        out[:covered] = blocks * block_size + idx % block_size
    return out


def blocks_of_tokens(block_ids: Sequence[int], block_size: int, begin: int, end: int) -> list[int]:
    """vLLM blocks holding tokens ``[begin, end)``."""
    if end <= begin:
        return []
    return list(block_ids[begin // block_size:-(-end // block_size)])

"""Client sessions (incarnations) and the bounded cache of finished results. Server thread only.

Every connection that says hello gets a session: a server-unique id, never reused. Its task ids
live in the session's own space: the control plane keys a task ``(dp_client_id, session_id << 64 |
task_id)``, so a restarted engine with the same dp_client_id can never meet its predecessor's tasks
or results, while GPU ops still route by ``key[0]``, the dp client (DESIGN §7).

Results are kept small (status, error and the returned token range, not the mask) and the cache is
bounded by bytes: the oldest results go first, and a session's results go with it.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import OrderedDict
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from flexkv.protocol.codec import mask_to_range
from flexkv.scheduler.graph import TaskKey
from flexkv.types import InvalidRequest, KVResponse, TaskStatus

TASK_ID_BITS = 64  # the session id sits above them in the key
_TASK_ID_LIMIT = 1 << 63  # task ids travel as msgpack int64
# Bytes one cached result is counted for beyond its error text and mask: the key tuple, the NamedTuple,
# its ints and the OrderedDict slot. tracemalloc measured ~540 bytes per entry of two results
# (CPython 3.11); counting 400 + sizeof(error) per result over-counts, so the bound holds.
RESULT_OVERHEAD_BYTES = 400


@dataclasses.dataclass
class Session:
    """One connection that said hello. ``role``: "manager" (a KVManager) or "tp" (a KVTPClient)."""

    session_id: int
    identity: bytes
    client_id: int
    role: str
    pid: int
    host: str

    def key(self, task_id: object) -> TaskKey:
        """The control plane's key of this session's ``task_id``; InvalidRequest if out of range."""
        if isinstance(task_id, bool) or not isinstance(task_id, int) or not 0 <= task_id < _TASK_ID_LIMIT:
            raise InvalidRequest(f"task id {task_id!r} out of range [0, 2**63)")
        return self.client_id, self.session_id << TASK_ID_BITS | task_id

    def owns(self, key: TaskKey) -> bool:
        return key[0] == self.client_id and session_of(key) == self.session_id


def session_of(key: TaskKey) -> int:
    """The session id inside a control-plane task key."""
    return key[1] >> TASK_ID_BITS


def task_of(key: TaskKey) -> int:
    """The client's task id inside a control-plane task key."""
    return key[1] & ((1 << TASK_ID_BITS) - 1)


class TaskResult(NamedTuple):
    """What a wait reports for one task: status, error, and the mask as a token range
    (``codec.mask_to_range``; ``mask`` only when it is not one run, which flexkv never produces)."""

    status: TaskStatus
    error: str
    num_tokens: int
    begin: int
    end: int
    mask: npt.NDArray[np.bool_] | None

    @classmethod
    def of(cls, resp: KVResponse) -> TaskResult:
        n, begin, end, mask = mask_to_range(resp.return_mask)
        return cls(resp.status, resp.error, n, begin, end, mask)

    @property
    def nbytes(self) -> int:
        mask_bytes = self.mask.nbytes if self.mask is not None else 0
        return RESULT_OVERHEAD_BYTES + sys.getsizeof(self.error) + mask_bytes


class ResultCache:
    """Final results of retired tasks, ``(engine part, every op)`` per key, bounded by ``max_bytes``
    (the oldest go first; a single result larger than the bound is not kept)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[TaskKey, tuple[TaskResult, TaskResult]] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: TaskKey) -> tuple[TaskResult, TaskResult] | None:
        return self._entries.get(key)

    def put(self, key: TaskKey, engine: KVResponse, full: KVResponse) -> None:
        self.pop(key)
        first = TaskResult.of(engine)
        entry = (first, first if full is engine else TaskResult.of(full))
        size = _entry_bytes(entry)
        if size > self.max_bytes:
            return
        self._entries[key] = entry
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= _entry_bytes(old)

    def pop(self, key: TaskKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= _entry_bytes(entry)

    def drop_session(self, session: Session) -> int:
        """Forget every result of ``session``; returns how many went."""
        keys = [k for k in self._entries if session.owns(k)]
        for k in keys:
            self.pop(k)
        return len(keys)

    def keys(self) -> Iterator[TaskKey]:
        return iter(self._entries)

    def check_invariants(self) -> None:
        total = sum(_entry_bytes(e) for e in self._entries.values())
        assert total == self.nbytes, f"result cache: counted {self.nbytes} bytes, holds {total}"
        assert self.nbytes <= self.max_bytes, f"result cache: {self.nbytes} bytes over its bound {self.max_bytes}"


def _entry_bytes(entry: tuple[TaskResult, TaskResult]) -> int:
    engine, full = entry
    return engine.nbytes if engine is full else engine.nbytes + full.nbytes

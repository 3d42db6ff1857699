"""Sessions' task keys and the result cache: results are small (a token range, not a mask) and the
cache is bounded by bytes, oldest first; a session's results go with it."""

from __future__ import annotations

import numpy as np
import pytest

from flexkv.scheduler.sessions import RESULT_OVERHEAD_BYTES, ResultCache, Session, TaskResult
from flexkv.types import InvalidRequest, KVResponse, TaskStatus


def _session(session_id: int, client_id: int = 0) -> Session:
    return Session(session_id, f"id{session_id}".encode(), client_id, "manager", 1, "h")


def _loaded(num_tokens: int, begin: int, end: int, task_id: int = 1) -> KVResponse:
    mask = np.zeros(num_tokens, dtype=np.bool_)
    mask[begin:end] = True
    return KVResponse(TaskStatus.SUCCESS, task_id, mask, "")


def test_task_keys_of_two_sessions_of_one_dp_client_never_meet() -> None:
    a, b = _session(1), _session(2)
    assert a.key(1) != b.key(1) and a.key(1)[0] == b.key(1)[0] == 0, "same dp client (GPU routing), own ids"
    assert a.owns(a.key(7)) and not b.owns(a.key(7))
    for bad in (-1, 2**63, True, "1", 1.0):
        with pytest.raises(InvalidRequest, match="task id"):
            a.key(bad)


def test_a_128k_token_result_costs_a_range_not_a_mask() -> None:
    result = TaskResult.of(_loaded(128 * 1024, 0, 100 * 1024))
    assert result.mask is None and (result.num_tokens, result.begin, result.end) == (131072, 0, 102400)
    assert result.nbytes < 1024, "not ~128 KB of mask"
    holes = _loaded(64, 0, 8)._replace(return_mask=np.tile([True, False], 32))
    kept = TaskResult.of(holes)
    assert kept.mask is not None and kept.nbytes >= RESULT_OVERHEAD_BYTES + 64, "an odd mask is kept and counted"


def test_the_cache_is_bounded_by_bytes_oldest_first() -> None:
    cache = ResultCache(max_bytes=64 << 10)
    s = _session(3)
    for tid in range(10_000):
        resp = _loaded(128 * 1024, 0, 16 * (tid % 100))
        cache.put(s.key(tid), resp, resp)
        assert cache.nbytes <= cache.max_bytes
    cache.check_invariants()
    assert 50 < len(cache) < 10_000
    assert s.key(9_999) in cache and s.key(0) not in cache
    cached = cache.get(s.key(9_999))
    assert cached is not None and cached[0].end == 16 * 99
    long_error = KVResponse(TaskStatus.FAILED, 1, None, "x" * (128 << 10))
    cache.put(s.key(10_000), long_error, long_error)
    assert s.key(10_000) not in cache, "a result larger than the bound is not kept"
    cache.check_invariants()


def test_a_sessions_results_go_with_it() -> None:
    cache = ResultCache(max_bytes=1 << 20)
    a, b = _session(4), _session(5)
    for tid in range(10):
        cache.put(a.key(tid), _loaded(64, 0, 16), _loaded(64, 0, 32))
        cache.put(b.key(tid), _loaded(64, 0, 16), _loaded(64, 0, 16))
    assert cache.drop_session(a) == 10
    assert all(b.owns(k) for k in cache.keys()) and len(cache) == 10
    cache.check_invariants()
    assert cache.drop_session(b) == 10 and cache.nbytes == 0

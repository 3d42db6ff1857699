"""The remote tier indexed by the store itself: what any node put there, this node finds.

Several flexkv servers (nodes) pointed at one remote store share their prefixes, so the remote
tier's index for a request cannot be a tree of what *this* server stored: it is the store, asked
with one batched existence check of the request's block keys (``RemoteStore.count_prefix``; the
store stops at the first missing key, so an evicted key in the middle ends the prefix there).

* ``RemoteLookup`` caches positive answers (hash -> expiry) for ``ttl_s`` so a hot prefix costs no
  round trip, and survives outages: the tier then reads as empty, one warning is logged, and the
  store is not asked again before ``retry_after_s``.
* ``RemoteTier`` adds what the store cannot know: the keys this server is still writing
  (H2REMOTE planned, not finished). GETs stop before them; PUTs do not write them twice.

Both run in the server process, on the thread that owns the control plane. A lookup makes at most
one store call, none during an outage's retry delay. With ``wait_s`` set (the server's mode) that
call runs on a helper thread and the loop waits for it at most ``wait_s``: a hung store (SIGSTOPped,
a dead link that has not timed out yet) holds that thread, never the loop. An answer later than
``wait_s`` is a miss for that request; when it lands its positives are cached, so the next request
for the prefix hits. While the helper is still busy with a late call, lookups do not queue behind
it: they answer from the cache at once. Without ``wait_s`` the call runs inline (tests)::

    store = open_remote_store(cache.remote, namespace_tag)  # the tag the remote workers use
    control = ControlPlane(model, cache, RemoteLookup(store.count_prefix, wait_s=0.005))
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import numpy.typing as npt

from flexkv.types import FlexKVError, InvalidRequest

__all__ = ["RemoteLookup", "RemoteTier"]

log = logging.getLogger("flexkv.remote")

HashArray = npt.NDArray[np.uint64]


class RemoteLookup:
    """How many leading block hashes of a request the shared remote store holds.

    ``count_prefix(hashes) -> int`` is the store's batched check (leading hashes present). It may
    raise one of ``unavailable`` (default ``OSError``, ``FlexKVError``; ``RemoteUnavailable`` is a
    ``FlexKVError``) when the store is unreachable; ``InvalidRequest`` is a bug and propagates.
    Not thread-safe: one owner thread.
    """

    def __init__(self, count_prefix: Callable[[np.ndarray], int], ttl_s: float = 2.0, retry_after_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 unavailable: tuple[type[BaseException], ...] = (OSError, FlexKVError),
                 max_cached_hashes: int = 1 << 18, wait_s: float | None = None) -> None:
        if not ttl_s >= 0 or not retry_after_s >= 0 or max_cached_hashes < 0 or not (wait_s is None or wait_s >= 0):
            raise ValueError(f"RemoteLookup: ttl_s={ttl_s}, retry_after_s={retry_after_s}, wait_s={wait_s} and "
                             f"max_cached_hashes={max_cached_hashes} must be >= 0")
        self._count_prefix = count_prefix
        self.ttl_s = ttl_s
        self.retry_after_s = retry_after_s
        self._clock = clock
        self._unavailable = unavailable
        self._max_cached = max_cached_hashes
        self._expiry: OrderedDict[int, float] = OrderedDict()  # insertion order == expiry order
        self._down_since: float | None = None  # when the current outage began
        self._retry_at = 0.0
        self._counters = dict.fromkeys(("lookups", "store_calls", "cache_hit_blocks", "store_hit_blocks", "outages",
                                        "late_lookups", "busy_lookups", "skipped_write_blocks"), 0)
        self.wait_s = wait_s
        self._thread = _StoreThread(count_prefix) if wait_s is not None else None
        self._pending: Future[int] | None = None  # the helper thread's call, once it outlived wait_s
        self._pending_tail: HashArray | None = None

    @property
    def available(self) -> bool:
        """False from a failed store call until a later call succeeds."""
        return self._down_since is None

    def known_prefix(self, hashes: HashArray) -> int:
        """Leading ``hashes`` present in the store: cached positives first, then ONE ``count_prefix``
        call on the uncached tail (whose positives are cached for ``ttl_s``). During an outage
        returns 0 without calling the store until ``retry_after_s`` after the failed call."""
        hashes = _check_hashes(hashes)
        self._harvest()
        now = self._clock()
        self._expire(now)
        self._counters["lookups"] += 1
        if self._down_since is not None and now < self._retry_at:
            return 0
        if self._pending is not None:  # the helper is stuck in a late call: do not queue behind it
            self._counters["busy_lookups"] += 1
            return self._cached_prefix(hashes)
        num_cached = self._cached_prefix(hashes)
        if num_cached == hashes.size:
            self._counters["cache_hit_blocks"] += num_cached
            return num_cached
        tail = hashes[num_cached:]
        num_found = self._ask_store(tail, now)
        if num_found is None:  # unreachable (the cache was just cleared) or late: what is cached
            return self._cached_prefix(hashes)
        self._remember(tail[:num_found], now)
        self._counters["cache_hit_blocks"] += num_cached
        self._counters["store_hit_blocks"] += num_found
        return num_cached + num_found

    def note_skipped_write(self, num_blocks: int) -> None:
        """A PUT planned no write-through of ``num_blocks`` blocks because the store is unavailable."""
        self._counters["skipped_write_blocks"] += num_blocks

    def close(self) -> None:
        """Stop the helper thread (a call hung in the store ends with the store's timeout). Idempotent."""
        if self._thread is not None:
            self._thread.close()
            self._thread = None

    def note_stored(self, hashes: HashArray) -> None:
        """This server's H2REMOTE of ``hashes`` succeeded: cache them as present for ``ttl_s``."""
        now = self._clock()
        self._expire(now)
        self._remember(_check_hashes(hashes), now)

    def note_missing(self, hashes: HashArray) -> None:
        """A REMOTE2H of ``hashes`` failed (evicted key, store gone): forget them, ask the store next time."""
        for h in _check_hashes(hashes).tolist():
            self._expiry.pop(h, None)

    def stats(self) -> dict[str, int]:
        """Counters (``remote_`` prefixed): lookups, store calls, blocks answered from the cache and
        from the store, outages, cached hashes now, and 1 while in an outage."""
        out = {f"remote_{k}": v for k, v in self._counters.items()}
        out["remote_cached_hashes"] = len(self._expiry)
        out["remote_unavailable"] = int(not self.available)
        return out

    def check_invariants(self) -> None:
        """Cache bounded and ordered by expiry; raises AssertionError naming the problem."""
        expiries = list(self._expiry.values())
        assert len(expiries) <= self._max_cached, f"remote lookup: {len(expiries)} cached > {self._max_cached}"
        assert all(a <= b for a, b in itertools.pairwise(expiries)), (
            "remote lookup: cache entries out of expiry order")

    # ---- internals -------------------------------------------------------------------------

    def _ask_store(self, tail: HashArray, now: float) -> int | None:
        """One store call; None when it is unreachable (outage bookkeeping) or, with ``wait_s``,
        did not answer within it (then it stays pending and ``_harvest`` takes its answer later)."""
        self._counters["store_calls"] += 1
        if self._thread is None:
            try:
                num_found: int | BaseException = int(self._count_prefix(tail))
            except InvalidRequest:
                raise
            except self._unavailable as e:
                num_found = e
            return self._take_answer(tail, num_found, now)
        future = self._thread.submit(tail)
        concurrent.futures.wait([future], timeout=self.wait_s)
        if not future.done():
            self._counters["late_lookups"] += 1
            self._pending, self._pending_tail = future, tail
            return None
        return self._take_answer(tail, _outcome(future), now)

    def _harvest(self) -> None:
        """Take a late answer that has landed: cache its positives (or enter the outage it reports)."""
        future, tail = self._pending, self._pending_tail
        if future is None or tail is None or not future.done():
            return
        self._pending = self._pending_tail = None
        now = self._clock()
        num_found = self._take_answer(tail, _outcome(future), now)
        if num_found:
            self._remember(tail[:num_found], now)

    def _take_answer(self, tail: HashArray, answer: int | BaseException, now: float) -> int | None:
        if isinstance(answer, InvalidRequest):
            raise answer
        if isinstance(answer, self._unavailable):
            self._enter_outage(now, answer)
            return None
        if isinstance(answer, BaseException):
            raise answer
        if self._down_since is not None:
            log.warning("remote store is back after %.1f s; remote lookups resume", now - self._down_since)
            self._down_since = None
        return min(max(int(answer), 0), tail.size)

    def _enter_outage(self, now: float, error: BaseException) -> None:
        self._retry_at = now + self.retry_after_s
        if self._down_since is None:
            self._down_since = now
            self._counters["outages"] += 1
            self._expiry.clear()  # a store that comes back may have lost everything
            log.warning("remote store unavailable (%s): the remote tier reads as empty; retrying every %.1f s",
                        error, self.retry_after_s)

    def _cached_prefix(self, hashes: HashArray) -> int:
        expiry = self._expiry
        if not expiry:
            return 0
        count = 0
        for h in hashes.tolist():
            if h not in expiry:
                break
            count += 1
        return count

    def _remember(self, hashes: HashArray, now: float) -> None:
        if self.ttl_s <= 0 or self._max_cached == 0:
            return
        until = now + self.ttl_s
        expiry = self._expiry
        for h in hashes.tolist():
            expiry[h] = until
            expiry.move_to_end(h)
        while len(expiry) > self._max_cached:
            expiry.popitem(last=False)

    def _expire(self, now: float) -> None:
        expiry = self._expiry
        while expiry:
            h, until = next(iter(expiry.items()))
            if until > now:
                break
            del expiry[h]


def _outcome(future: Future[int]) -> int | BaseException:
    error = future.exception()
    return error if error is not None else future.result()


class _StoreThread:
    """One daemon thread making ``count_prefix`` calls one at a time, so that a store that hangs
    holds this thread and not the server loop. The store object is used by this thread only."""

    def __init__(self, count_prefix: Callable[[np.ndarray], int]) -> None:
        self._count_prefix = count_prefix
        self._requests: queue.SimpleQueue[tuple[HashArray, Future[int]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="flexkv-remote-lookup", daemon=True)
        self._thread.start()

    def submit(self, hashes: HashArray) -> Future[int]:
        future: Future[int] = Future()
        self._requests.put((hashes, future))
        return future

    def _run(self) -> None:
        while (request := self._requests.get()) is not None:
            hashes, future = request
            try:
                future.set_result(int(self._count_prefix(hashes)))
            except BaseException as e:  # noqa: BLE001 - handed to the loop thread, which decides
                future.set_exception(e)

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join(timeout=0.2)  # a call hung in the store is not waited for


class RemoteTier:
    """The remote tier of one server in lookup mode: the store (through ``lookup``) plus the keys
    this server has planned to write and not finished (one count per live H2REMOTE holding them).

    ``begin_write`` is called when an H2REMOTE is planned, ``end_write`` exactly once when it stops
    being live (done, failed, or dropped). Server process only.
    """

    def __init__(self, lookup: RemoteLookup) -> None:
        self.lookup = lookup
        self._writing: dict[int, int] = {}

    @property
    def available(self) -> bool:
        return self.lookup.available

    def readable_prefix(self, hashes: HashArray) -> int:
        """Leading ``hashes`` a GET may read: present in the store and not being written by us."""
        stop = self._first_writing(hashes)
        return self.lookup.known_prefix(hashes[:stop]) if stop else 0

    def unwritten(self, hashes: HashArray, start: int) -> npt.NDArray[np.int64]:
        """Positions in ``[start, len(hashes))`` of hashes nobody here is writing (sorted)."""
        pos = np.arange(start, hashes.size, dtype=np.int64)
        if not self._writing or not pos.size:
            return pos
        busy = np.fromiter((h in self._writing for h in hashes[start:].tolist()), dtype=np.bool_, count=pos.size)
        return pos[~busy]

    def begin_write(self, hashes: HashArray) -> None:
        for h in hashes.tolist():
            self._writing[h] = self._writing.get(h, 0) + 1

    def end_write(self, hashes: HashArray, stored: bool) -> None:
        """The H2REMOTE of ``hashes`` is over; ``stored``: it succeeded (cached as present)."""
        for h in hashes.tolist():
            left = self._writing[h] - 1
            if left:
                self._writing[h] = left
            else:
                del self._writing[h]
        if stored:
            self.lookup.note_stored(hashes)

    def writing_counts(self) -> dict[int, int]:
        """hash -> live H2REMOTE ops writing it (a copy, for invariant checks)."""
        return dict(self._writing)

    def stats(self) -> dict[str, int]:
        return {**self.lookup.stats(), "remote_writing_blocks": len(self._writing)}

    def _first_writing(self, hashes: HashArray) -> int:
        if not self._writing:
            return int(hashes.size)
        for i, h in enumerate(hashes.tolist()):
            if h in self._writing:
                return i
        return int(hashes.size)


def _check_hashes(hashes: object) -> HashArray:
    if not isinstance(hashes, np.ndarray) or hashes.dtype != np.uint64 or hashes.ndim != 1:
        got = f"{hashes.dtype} {hashes.shape}" if isinstance(hashes, np.ndarray) else type(hashes).__name__
        raise InvalidRequest(f"block hashes must be a 1-D uint64 ndarray, got {got}")
    return hashes

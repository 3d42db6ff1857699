"""One SGLang rank's link to the flexkv server: a KVManager (this rank's DP client) plus the
engine-side lane over the rank's host pool, rebuilt after an outage.

Every public call of the backend goes through :meth:`ServerLink.run`, which turns any failure into
the caller's default (False / 0 hits: SGLang recomputes), warns once per outage, and while the server
is down retries at most every ``retry_interval_s`` so SGLang's threads never wait on a dead server
more than once per interval. Runs in the SGLang process; thread-safe (prefetch and backup threads).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from flexkv.client import KVTPClient
from flexkv.common.config import CacheConfig
from flexkv.integration.sglang.host_pool import HostPoolView
from flexkv.integration.sglang.settings import BackendSettings
from flexkv.kvmanager import KVManager
from flexkv.transport import ServerUnavailable
from flexkv.types import InvalidRequest

log = logging.getLogger("flexkv.sglang")
T = TypeVar("T")



def _fresh_task_id() -> int:
    """Task ids above any this client id used before (this link's earlier connections, or an SGLang
    process before a restart): microseconds since the epoch, far more than one link issues per second."""
    return time.time_ns() // 1000


class ServerLink:
    """Connection state of one rank. ``connect`` raises configuration errors (wrong page size, layout
    the server's model does not match); ``run`` never raises."""

    def __init__(self, settings: BackendSettings, client_id: int, view: HostPoolView, namespace: Sequence[str]):
        self.settings, self.client_id, self.view = settings, client_id, view
        self.namespace = list(namespace)
        self._cond = threading.Condition()
        self._manager: KVManager | None = None
        self._tp: KVTPClient | None = None
        self._users = 0  # calls using _manager now
        self._broken = False  # a call failed; closing once the others are done
        self._healthy = True  # no outage since the last success (one warning per outage)
        self._next_try = 0.0

    def connect(self) -> KVManager:
        """Connect, check the page size and register the host pool. Raises FlexKVError (server
        unreachable: ServerUnavailable) or InvalidRequest (mismatch), leaving nothing half open."""
        s, view = self.settings, self.view
        manager = KVManager(view.model_config(), CacheConfig(tokens_per_block=view.page_size), s.server_address,
                            dp_client_id=self.client_id, start_timeout_s=min(5.0, s.timeout_s),
                            request_timeout_s=min(5.0, s.timeout_s), first_task_id=_fresh_task_id())
        tp: KVTPClient | None = None
        try:
            manager.start()
            if manager.tokens_per_block != view.page_size:
                raise InvalidRequest(f"flexkv server has tokens_per_block={manager.tokens_per_block}, SGLang's "
                                     f"page size is {view.page_size}: start the server with tokens_per_block "
                                     f"{view.page_size} or SGLang with --page-size {manager.tokens_per_block}")
            tp = KVTPClient(s.server_address, self.client_id, 0, 0, timeout_s=min(5.0, s.timeout_s))
            tp.register([view.tensor], view.layout, engine_side=True)
        except BaseException:
            if tp is not None:
                tp.close()
            manager.shutdown()
            raise
        self._manager, self._tp = manager, tp
        return manager

    def open(self) -> None:
        """Connect now. An unreachable server is logged (calls retry later); any other error (the
        server's model or page size does not match this pool) is raised."""
        with self._cond:
            if self._manager is not None:
                return
            try:
                self.connect()
            except ServerUnavailable as e:
                self._note_outage("connect", e)

    def run(self, what: str, fn: Callable[[KVManager], T], default: T) -> T:
        """``fn(manager)``, or ``default`` when the server is down or anything fails (logged).

        A failed call returns only after the link is closed, and closing stops the engine-side worker:
        no copy of a failed call can touch the host pool after SGLang got False and freed its pages.
        """
        manager = self._acquire()
        if manager is None:
            return default
        try:
            out = fn(manager)
        except Exception as e:  # noqa: BLE001 - nothing may escape into SGLang's threads
            self._release(broken_by=(what, e))
            return default
        self._release(broken_by=None)
        return out

    def _acquire(self) -> KVManager | None:
        with self._cond:
            if self._broken:
                return None
            if self._manager is None:
                if time.monotonic() < self._next_try:
                    return None
                try:
                    self.connect()
                except Exception as e:  # noqa: BLE001
                    self._note_outage("connect", e)
                    return None
            self._users += 1
            return self._manager

    def _release(self, broken_by: tuple[str, Exception] | None) -> None:
        with self._cond:
            self._users -= 1
            if broken_by is None:
                if not self._healthy and not self._broken:
                    self._healthy = True
                    log.info("flexkv server at %s answers again", self.settings.server_address)
                if self._broken and self._users == 0:
                    self._close_locked()
                return
            if not self._broken:
                self._broken = True
                self._note_outage(*broken_by)
            # Wait for the calls still using the connection (they end within their timeouts), then close.
            self._cond.wait_for(lambda: self._users == 0)
            self._close_locked()

    def _note_outage(self, what: str, e: Exception) -> None:
        self._next_try = time.monotonic() + self.settings.retry_interval_s
        if self._healthy:
            self._healthy = False
            log.warning("flexkv server at %s failed (%s: %s: %s); HiCache storage reports misses until it "
                        "answers again", self.settings.server_address, what, type(e).__name__, e)
        else:
            log.debug("flexkv still down (%s: %s)", what, e)

    def _close_locked(self) -> None:
        # Closing the TP client stops this rank's engine-side worker, so no copy touches the host pool
        # after a failed call returned.
        if self._tp is not None:
            try:
                self._tp.close()
            except Exception:
                log.debug("closing the flexkv TP client failed", exc_info=True)
            self._tp = None
        if self._manager is not None:
            try:
                self._manager.shutdown()
            except Exception:
                log.debug("closing the flexkv manager failed", exc_info=True)
            self._manager = None
        self._broken = False
        self._cond.notify_all()

    def close(self) -> None:
        """Close once no call uses the link (SGLang's detach); later calls reconnect."""
        with self._cond:
            self._cond.wait_for(lambda: self._users == 0)
            self._close_locked()

"""The scheduler side's one connection to flexkv: a KVManager that never raises into vLLM.

A server that stops answering (killed, restarted, unreachable) marks the link lost: every later
call returns its default at once, so vLLM recomputes instead of waiting. A request the server
refuses (capacity, a bad mask) is a miss for that request only. Runs in vLLM's scheduler process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from flexkv.integration.vllm.settings import ConnectorSettings, ServerMode
from flexkv.kvmanager import KVManager
from flexkv.transport import ServerUnavailable
from flexkv.types import FlexKVError

log = logging.getLogger("flexkv.vllm")
R = TypeVar("R")


class ServerLink:
    def __init__(self, settings: ConnectorSettings) -> None:
        self.settings = settings
        self.kvm = KVManager(settings.model, settings.cache, server_address=settings.server_address,
                             dp_client_id=settings.dp_client_id, request_timeout_s=settings.request_timeout_s)
        self.lost = False
        self._ready = False
        self.kvm.start()  # library mode: spawns the server (raises FlexKVError naming why it could not)
        log.info("flexkv connector: %s mode, server %s, dp_client_id %d, tokens_per_block %d",
                 settings.mode.value, self.kvm.server_address, settings.dp_client_id, self.tokens_per_block)

    @property
    def address(self) -> str:
        return self.kvm.server_address

    @property
    def tokens_per_block(self) -> int:
        return int(self.kvm._tokens_per_block)  # the server's (hello), which wins over ours

    def call(self, fn: Callable[..., R], *args: Any, default: R, **kwargs: Any) -> R:
        """``fn(*args, **kwargs)``, or ``default`` when the link is lost or the server refuses the call."""
        if self.lost:
            return default
        try:
            return fn(*args, **kwargs)
        except ServerUnavailable as e:
            log.error("flexkv server lost (%s): vLLM computes everything from now on", e)
            self.lost = True
        except FlexKVError as e:
            log.warning("flexkv refused %s: %s", getattr(fn, "__name__", fn), e)
        return default

    def is_ready(self) -> bool:
        """True once every TP rank registered its KV memory (server mode: they did before we started)."""
        if not self._ready and not self.lost:
            self._ready = self.settings.mode is ServerMode.SERVER or self.call(self.kvm.is_ready, default=False)
        return self._ready and not self.lost

    def close(self) -> None:
        try:
            self.kvm.shutdown()
        except FlexKVError as e:  # a lost server: nothing left to stop but our side
            log.warning("flexkv shutdown: %s", e)

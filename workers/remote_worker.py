"""The remote worker: REMOTE2H (store -> CPU pool) and H2REMOTE (CPU pool -> store).

Keys are the blocks' chained hashes (they already include the request's namespace). Data read back
is verified against its checksum by the store; a missing or corrupt block fails its op, which the
server treats as a miss (the GET returns the local prefix), never as data.
"""

from __future__ import annotations

import logging
from typing import Any

from flexkv.common.config import kv_fingerprint
from flexkv.remote import RemoteUnavailable, open_remote_store
from flexkv.types import OpType
from flexkv.workers.base import Op, Worker

log = logging.getLogger("flexkv.remote")


class RemoteWorker(Worker):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        tag = kv_fingerprint(self.model, self.cache.tokens_per_block)
        self.store = open_remote_store(self.cache.remote, namespace_tag=tag)
        self.store.register_pool(self.pool.address, self.pool.nbytes)  # once: zero-copy where the store needs it
        self._outage = False

    def op_types(self) -> list[OpType]:
        return [OpType.REMOTE2H, OpType.H2REMOTE]

    def execute(self, ops: list[Op]) -> list[str]:
        return [self._run(op) for op in ops]

    def _run(self, op: Op) -> str:
        if op.block_hashes is None or op.op_type not in (OpType.REMOTE2H, OpType.H2REMOTE):
            return f"remote worker cannot run {op.op_type.name} without block hashes"
        try:
            if op.op_type is OpType.REMOTE2H:
                ok = self.store.get_blocks(op.block_hashes, self.pool.address, self.pool_block_bytes, op.dst_ids,
                                           self.pool_block_bytes)
            else:
                ok = self.store.put_blocks(op.block_hashes, self.pool.address, self.pool_block_bytes, op.src_ids,
                                           self.pool_block_bytes)
        except RemoteUnavailable as e:
            if not self._outage:
                log.warning("remote store unavailable: %s (ops fail until it is back)", e)
            self._outage = True
            return f"{op.op_type.name}: remote store unavailable: {e}"
        if self._outage:
            log.warning("remote store is back")
            self._outage = False
        missing = int((~ok).sum())
        if missing and op.op_type is OpType.H2REMOTE:
            return f"H2REMOTE: {missing} of {ok.size} blocks not written (refused, or their shard is down)"
        if missing:
            return f"REMOTE2H: {missing} of {ok.size} blocks missing or corrupt in the remote store"
        return ""

    def close(self) -> None:
        self.store.close()
        super().close()

"""The worker-side connector: registers this rank's KV memory and reports the scheduler side's news.

Runs in each vLLM worker process (one per TP rank; the engine core itself on CPU). CUDA KV memory is
registered by CUDA IPC (the server's GPU worker copies); host KV memory is private to this process,
so it is registered as an engine-side lane (the device worker runs here as a thread, DESIGN §7b).
Server mode registers in register_kv_caches; library mode when the first metadata names the server
the scheduler side started. No transfer is started here: the per-layer hooks have nothing to do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from flexkv.client import KVTPClient
from flexkv.integration.vllm.kv_views import engine_tensors
from flexkv.integration.vllm.metadata import FlexKVConnectorMetadata
from flexkv.integration.vllm.settings import ConnectorSettings, ServerMode
from flexkv.layout import KVCacheLayout
from flexkv.types import FlexKVError

log = logging.getLogger("flexkv.vllm")
MetadataSource = Callable[[], "FlexKVConnectorMetadata | None"]


class WorkerSide:
    def __init__(self, settings: ConnectorSettings, metadata: MetadataSource) -> None:
        self.settings = settings
        self._metadata = metadata  # the metadata vLLM bound for this step, or None
        self._kv_caches: Mapping[str, Any] | None = None
        self.client: KVTPClient | None = None
        self.layout: KVCacheLayout | None = None
        self._seen: FlexKVConnectorMetadata | None = None
        self._lost = False

    def register_kv_caches(self, kv_caches: Mapping[str, Any]) -> None:
        self._kv_caches = dict(kv_caches)
        if self.settings.mode is ServerMode.SERVER:
            assert self.settings.server_address is not None
            self._register(self.settings.server_address)

    def _register(self, address: str) -> None:
        """Register this rank with the server at ``address``. Raises FlexKVError naming the problem."""
        assert self._kv_caches is not None
        client = KVTPClient(address, self.settings.dp_client_id, _tp_rank(), _device_id(self._kv_caches),
                            timeout_s=self.settings.request_timeout_s)
        try:
            tpb = int(client._conn.server_info["tokens_per_block"])  # the server's block size wins
            tensors, layout = engine_tensors(self._kv_caches, self.settings.model.use_mla, tpb)
            on_host = not bool(getattr(tensors[0], "is_cuda", False))
            self.layout = client.register(tensors, layout, engine_side=True) if on_host \
                else client.register(tensors, layout)
        except BaseException:
            client.close()
            raise
        self.client = client
        log.info("flexkv: rank %d registered %d %s layers (%d flexkv blocks each) with %s", _tp_rank(),
                 layout.num_layers, layout.kind.value, layout.num_blocks, address)

    def current(self) -> FlexKVConnectorMetadata | None:
        """This step's metadata, acted on once: register (library mode) or stop on a lost server."""
        meta = self._metadata()
        if meta is None or meta is self._seen:
            return meta
        self._seen = meta
        if meta.server_lost and not self._lost:
            self._lost = True
            self.close()  # sealed (flexkv/fence.py), lane stopped: no flexkv copy touches these blocks again
            # (not even one a stalled server dispatches when it resumes) before vLLM recomputes into them
        elif meta.server_address and self.client is None and self._kv_caches is not None and not self._lost:
            try:
                self._register(meta.server_address)
            except FlexKVError as e:
                log.error("flexkv: registration with %s failed (%s); vLLM runs without flexkv", meta.server_address, e)
                self._lost = True
        return meta

    def get_finished(self) -> tuple[set[str] | None, set[str] | None]:
        meta = self.current()
        if meta is None:
            return None, None
        return (set(meta.finished_saves) or None), (set(meta.finished_loads) or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        meta = self.current()
        return set(meta.failed_block_ids) if meta is not None else set()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def _tp_rank() -> int:
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    try:
        return int(get_tensor_model_parallel_rank())
    except AssertionError:  # no TP group (a single-process test of the worker side)
        return 0


def _device_id(kv_caches: Mapping[str, Any]) -> int:
    first = next(iter(kv_caches.values()))
    return int(first.device.index) if getattr(first, "is_cuda", False) else 0

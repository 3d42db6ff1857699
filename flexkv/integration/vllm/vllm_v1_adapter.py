"""``FlexKVConnectorV1Impl``: the object vLLM's in-tree ``FlexKVConnectorV1`` wraps.

vLLM constructs it as ``FlexKVConnectorV1Impl(vllm_config, role)`` in both roles and forwards the
KV connector v1 hooks to it (see docs/vllm.md for what the wrapper does not forward). It only routes
each hook to the scheduler side or the worker side; our own connector class (connector.py) wraps it
the same way, so both paths run the same code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from flexkv.integration.vllm.metadata import FlexKVConnectorMetadata
from flexkv.integration.vllm.scheduler_side import SchedulerSide
from flexkv.integration.vllm.settings import ConnectorSettings
from flexkv.integration.vllm.worker_side import WorkerSide

log = logging.getLogger("flexkv.vllm")


class FlexKVConnectorV1Impl:
    def __init__(self, vllm_config: Any, role: KVConnectorRole,
                 metadata_source: Callable[[], FlexKVConnectorMetadata | None] | None = None) -> None:
        self.role = role
        self.settings = ConnectorSettings.from_vllm(vllm_config, scheduler=role is KVConnectorRole.SCHEDULER)
        self.scheduler: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        if role is KVConnectorRole.SCHEDULER:
            self.scheduler = SchedulerSide(self.settings)
        else:
            self.worker = WorkerSide(self.settings, metadata_source or _bound_metadata)

    def _sched(self) -> SchedulerSide:
        if self.scheduler is None:
            raise RuntimeError("scheduler-side hook called on the worker-side flexkv connector")
        return self.scheduler

    def _work(self) -> WorkerSide:
        if self.worker is None:
            raise RuntimeError("worker-side hook called on the scheduler-side flexkv connector")
        return self.worker

    # -- scheduler side --------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._sched().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        block_ids = blocks.get_block_ids()
        self._sched().update_state_after_alloc(request, list(block_ids[0]) if block_ids else [], num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> FlexKVConnectorMetadata:
        return self._sched().build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        return None  # completions are polled when the next step's metadata is built

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._sched().request_finished(request, list(block_ids))

    def reset_cache(self) -> bool:
        return self._sched().reset_cache()

    def take_events(self) -> Iterable[Any]:
        return ()

    def get_kv_connector_stats(self) -> None:
        return None

    # -- worker side -------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self._work().register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self._work().current()  # loads ran before the request was scheduled; act on the metadata

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # a request runs only after its whole load ended (see docs/vllm.md)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return None  # saves run when a request finishes, from the scheduler side

    def wait_for_save(self) -> None:
        return None

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._work().get_finished()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._work().get_block_ids_with_load_errors()

    # -- both ---------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
        if self.worker is not None:
            self.worker.close()


def _bound_metadata() -> FlexKVConnectorMetadata | None:
    """The metadata vLLM bound to this process's worker-side connector. The in-tree wrapper keeps it
    (it does not forward bind_connector_metadata), so read it from vLLM's global connector."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return None
    connector = get_kv_transfer_group()
    if not connector.has_connector_metadata():
        return None
    meta = connector._get_connector_metadata()
    return meta if isinstance(meta, FlexKVConnectorMetadata) else None

"""``FlexKVConnector``: flexkv's KV connector class for vLLM's ``kv_connector_module_path``.

    --kv-transfer-config '{"kv_connector": "FlexKVConnector",
                           "kv_connector_module_path": "flexkv.integration.vllm.connector",
                           "kv_role": "kv_both"}'

It forwards every hook to FlexKVConnectorV1Impl (the object vLLM's in-tree FlexKVConnectorV1 wraps)
plus the ones that wrapper leaves out: bind_connector_metadata and reset_cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from flexkv.integration.vllm.metadata import FlexKVConnectorMetadata
from flexkv.integration.vllm.vllm_v1_adapter import FlexKVConnectorV1Impl


class FlexKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.impl = FlexKVConnectorV1Impl(vllm_config, role, metadata_source=self._bound)

    def _bound(self) -> FlexKVConnectorMetadata | None:
        meta = self._connector_metadata
        return meta if isinstance(meta, FlexKVConnectorMetadata) else None

    # worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.impl.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self.impl.start_load_kv(forward_context, **kwargs)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.impl.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        self.impl.save_kv_layer(layer_name, kv_layer, attn_metadata, **kwargs)

    def wait_for_save(self) -> None:
        self.impl.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self.impl.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.impl.get_block_ids_with_load_errors()

    # scheduler side
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.impl.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self.impl.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return self.impl.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        self.impl.update_connector_output(connector_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.impl.request_finished(request, block_ids)

    def reset_cache(self) -> bool | None:
        return self.impl.reset_cache()

    def take_events(self) -> Iterable[Any]:
        return self.impl.take_events()

    def shutdown(self) -> None:
        self.impl.shutdown()

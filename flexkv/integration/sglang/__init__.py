"""SGLang HiCache storage backend (docs/sglang.md). Importing the backend needs sglang installed:

``--hicache-storage-backend dynamic --hicache-storage-backend-extra-config
'{"backend_name": "flexkv", "module_path": "flexkv.integration.sglang.storage",
"class_name": "FlexKVHiCacheStorage", "interface_v1": 1, "hicache_storage_pass_prefix_keys": true,
"flexkv_server_address": "ipc:///run/flexkv/server.sock"}'``
"""

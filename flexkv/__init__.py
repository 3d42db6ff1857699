"""flexkv: a KV-cache manager for LLM inference engines (CPU, SSD and remote tiers)."""

from flexkv.common.config import CacheConfig, ModelConfig, RemoteBackend, RemoteConfig, load_cache_config
from flexkv.types import DType, KVResponse, Medium, OpType, TaskStatus

__all__ = [
    "CacheConfig",
    "DType",
    "KVResponse",
    "Medium",
    "ModelConfig",
    "OpType",
    "RemoteBackend",
    "RemoteConfig",
    "TaskStatus",
    "load_cache_config",
]

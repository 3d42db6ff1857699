"""What the connector needs to know, read once from vLLM's config (both roles, any process).

The KV shape comes from vLLM's model and parallel configs, the block format from the KV cache layout
vLLM resolved, the cache sizes from flexkv's user config (``FLEXKV_CONFIG_PATH`` or ``FLEXKV_*``,
docs/config.md), and the connector's own options from ``kv_connector_extra_config`` (keys below) or
environment variables. Every error names the setting and what is allowed.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Mapping
from typing import Any

from flexkv.common.config import CacheConfig, ModelConfig, cache_config_from_user, read_user_config
from flexkv.types import BlockFormat, ConfigError, DType

# kv_connector_extra_config keys (all optional)
SERVER_ADDRESS_KEY = "flexkv_server_address"  # else FLEXKV_SERVER_ADDRESS, else library mode
DP_CLIENT_ID_KEY = "flexkv_dp_client_id"  # else FLEXKV_DP_CLIENT_ID, else vLLM's data-parallel rank
REQUEST_TIMEOUT_KEY = "flexkv_request_timeout_s"  # one request to the server; then flexkv is marked lost
NAMESPACE_KEY = "flexkv_namespace"  # strings every key is salted with; default ["model:<vLLM's model name>"]

# vLLM's KV cache layout names -> how their blocks are ordered (LBHNC = [blocks, heads, tokens, 2*D]).
_FORMATS = {"LBHNC": BlockFormat.PACKED_HND, "LBNHC": BlockFormat.PACKED_NHD}


class ServerMode(enum.Enum):
    LIBRARY = "library"  # the scheduler-side connector starts (and stops) the server
    SERVER = "server"  # connect to a running server (several vLLM instances may share it)


@dataclasses.dataclass(frozen=True)
class ConnectorSettings:
    model: ModelConfig  # the whole model's KV (every TP rank), as the server must be configured
    cache: CacheConfig
    mode: ServerMode
    server_address: str | None  # None in library mode until the server runs
    dp_client_id: int  # 0 in library mode (the server has one client)
    block_size: int  # vLLM's tokens per block (a multiple of cache.tokens_per_block)
    request_timeout_s: float
    recompute_failed_loads: bool  # kv_load_failure_policy == "recompute"
    namespace: tuple[str, ...]  # fed first into every key (then the request's LoRA and cache_salt)

    @property
    def tokens_per_block(self) -> int:
        return self.cache.tokens_per_block

    @classmethod
    def from_vllm(cls, vllm_config: Any, env: Mapping[str, str] | None = None,
                  scheduler: bool = True) -> ConnectorSettings:
        """Read the settings from a ``vllm.config.VllmConfig``. Raises ConfigError naming the problem.

        ``scheduler=False`` (worker side): vLLM may not have resolved its KV cache layout yet, and the
        worker needs no block format (registration reads the layout off the tensors)."""
        env = os.environ if env is None else env
        kv = vllm_config.kv_transfer_config
        extra: Mapping[str, Any] = dict(kv.kv_connector_extra_config or {})
        model = model_config_from_vllm(vllm_config, with_block_format=scheduler)
        block_size = int(vllm_config.cache_config.block_size)
        cache = _cache_config(model, block_size, env)
        address = extra.get(SERVER_ADDRESS_KEY) or env.get("FLEXKV_SERVER_ADDRESS") or None
        dp_default = int(getattr(vllm_config.parallel_config, "data_parallel_rank", 0) or 0)
        dp = _int_setting(extra.get(DP_CLIENT_ID_KEY, env.get("FLEXKV_DP_CLIENT_ID", dp_default)), DP_CLIENT_ID_KEY)
        timeout = float(extra.get(REQUEST_TIMEOUT_KEY, 10.0))
        if timeout <= 0:
            raise ConfigError(f"{REQUEST_TIMEOUT_KEY}: must be > 0, got {timeout}")
        namespace = extra.get(NAMESPACE_KEY)
        if namespace is not None and (isinstance(namespace, str) or not all(isinstance(p, str) for p in namespace)):
            raise ConfigError(f"{NAMESPACE_KEY}: must be a list of strings, got {namespace!r}")
        return cls(model=model, cache=cache, mode=ServerMode.SERVER if address else ServerMode.LIBRARY,
                   server_address=str(address) if address else None, dp_client_id=dp if address else 0,
                   block_size=block_size, request_timeout_s=timeout,
                   recompute_failed_loads=kv.kv_load_failure_policy == "recompute",
                   namespace=tuple(namespace) if namespace is not None
                   else (f"model:{vllm_config.model_config.model}",))


def model_config_from_vllm(vllm_config: Any, with_block_format: bool = True) -> ModelConfig:
    """flexkv's ModelConfig for vLLM's model: layers of this pipeline stage, every TP rank's heads
    (the block format of vLLM's resolved KV cache layout, or split without ``with_block_format``)."""
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    if int(pc.pipeline_parallel_size) != 1:
        raise ConfigError(f"pipeline_parallel_size={pc.pipeline_parallel_size}: the flexkv connector supports 1")
    tp = int(pc.tensor_parallel_size)
    use_mla = bool(mc.use_mla)
    heads_per_rank = int(mc.get_num_kv_heads(pc))
    cache_dtype = vllm_config.cache_config.cache_dtype
    try:
        dtype = DType.parse(mc.dtype if cache_dtype == "auto" else cache_dtype)
    except ValueError as e:
        raise ConfigError(f"KV cache dtype: {e}") from None
    return ModelConfig(num_layers=int(mc.get_num_layers(pc)), num_kv_heads=1 if use_mla else heads_per_rank * tp,
                       head_size=int(mc.get_head_size()), dtype=dtype, use_mla=use_mla, tp_size=tp,
                       block_format=block_format_of(vllm_config.cache_config.kv_cache_layout, use_mla)
                       if with_block_format else BlockFormat.SPLIT)


def block_format_of(layout_name: str | None, use_mla: bool) -> BlockFormat:
    """The flexkv block format of vLLM's resolved KV cache layout (``cache_config.kv_cache_layout``)."""
    if use_mla:
        return BlockFormat.SPLIT  # one latent per token: nothing is packed
    if layout_name is None:
        raise ConfigError("vLLM has not resolved its KV cache layout yet (cache_config.kv_cache_layout is None)")
    fmt = _FORMATS.get(str(layout_name).upper())
    if fmt is None:
        raise ConfigError(f"vLLM KV cache layout {layout_name}: the flexkv connector supports "
                          f"{sorted(_FORMATS)} (set VLLM_KV_CACHE_LAYOUT to one of them)")
    return fmt


def _cache_config(model: ModelConfig, block_size: int, env: Mapping[str, str]) -> CacheConfig:
    values, source = read_user_config(env)
    values.setdefault("tokens_per_block", block_size)
    cache = cache_config_from_user(model, values)
    if block_size % cache.tokens_per_block:
        raise ConfigError(f"tokens_per_block (from {source}): vLLM's block_size {block_size} is not a multiple "
                          f"of flexkv's tokens_per_block {cache.tokens_per_block}")
    return cache


def _int_setting(value: object, name: str) -> int:
    try:
        out = int(str(value))
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if out < 0:
        raise ConfigError(f"{name}: must be >= 0, got {out}")
    return out

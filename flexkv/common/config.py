"""Model and cache configuration, validated at construction, plus the user config in gigabytes.

``ModelConfig`` describes the KV the engine produces; ``CacheConfig`` sizes flexkv's tiers in
blocks. Users usually write a small config in gigabytes (a YAML/JSON file named by
``FLEXKV_CONFIG_PATH``, else ``FLEXKV_*`` environment variables); :func:`load_cache_config`
converts it to a ``CacheConfig``. Every error names the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from flexkv.types import BlockFormat, ConfigError, DType, EvictionPolicy

GIB = 1 << 30


def _require(ok: bool, field: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {msg}")


def _require_fraction(value: object, field: str, low_open: bool) -> None:
    """A number in (0, 1] (``low_open``) or [0, 1]."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (0 < value <= 1 if low_open
                                                                             else 0 <= value <= 1)
    _require(ok, field, f"must be a number in {'(0' if low_open else '[0'}, 1], got {value!r}")


MAX_BUSY_POLL_US = 10_000  # a spin is bounded: longer waits sleep


def _require_int(value: object, field: str, minimum: int) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool), field,
             f"must be an integer, got {value!r}")
    assert isinstance(value, int)
    _require(value >= minimum, field, f"must be >= {minimum}, got {value}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the KV cache the engine produces (all TP ranks together)."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: DType | str = DType.BFLOAT16
    use_mla: bool = False
    tp_size: int = 1
    dp_size: int = 1
    block_format: BlockFormat | str = BlockFormat.SPLIT  # how the engine's layout orders K and V in a block

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "dtype", DType.parse(self.dtype))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        try:
            object.__setattr__(self, "block_format", BlockFormat(self.block_format))
        except ValueError:
            allowed = ", ".join(f.value for f in BlockFormat)
            raise ConfigError(f"block_format: unsupported {self.block_format!r}; allowed: {allowed}") from None
        _require_int(self.num_layers, "num_layers", 1)
        _require_int(self.num_kv_heads, "num_kv_heads", 1)
        _require_int(self.head_size, "head_size", 1)
        _require_int(self.tp_size, "tp_size", 1)
        _require_int(self.dp_size, "dp_size", 1)
        _require(isinstance(self.use_mla, bool), "use_mla", f"must be a bool, got {self.use_mla!r}")
        if self.use_mla:
            _require(self.num_kv_heads == 1, "num_kv_heads", f"must be 1 with use_mla, got {self.num_kv_heads}")
            _require(self.block_format is BlockFormat.SPLIT, "block_format",
                     f"MLA has one latent per token, nothing to pack; got {self.block_format}")
        else:
            _require(self.num_kv_heads % self.tp_size == 0, "num_kv_heads",
                     f"{self.num_kv_heads} heads do not split over tp_size={self.tp_size}")

    @property
    def kv_dim(self) -> int:
        """2 (K and V) for multi-head attention, 1 for MLA's single latent."""
        return 1 if self.use_mla else 2

    @property
    def num_shards(self) -> int:
        """Head shards per block in the CPU/SSD/remote tiers: tp_size, or 1 for MLA (ranks share)."""
        return 1 if self.use_mla else self.tp_size

    @property
    def heads_per_shard(self) -> int:
        return self.num_kv_heads // self.num_shards

    @property
    def itemsize(self) -> int:
        assert isinstance(self.dtype, DType)
        return self.dtype.itemsize

    def chunk_bytes(self, tokens_per_block: int) -> int:
        """Bytes of one block of one layer's K (or V) for one shard: T x heads_per_shard x D."""
        return tokens_per_block * self.heads_per_shard * self.head_size * self.itemsize

    def block_bytes(self, tokens_per_block: int) -> int:
        """Bytes of one block-first block: every layer, K and V, every shard."""
        return self.num_layers * self.kv_dim * self.num_shards * self.chunk_bytes(tokens_per_block)


class RemoteBackend(enum.Enum):
    REDIS = "redis"
    FILESYSTEM = "filesystem"
    MOONCAKE = "mooncake"  # Mooncake Store: host/port name its master (docs/remote.md)


@dataclasses.dataclass(frozen=True)
class RemoteConfig:
    """Where the remote tier lives: Redis/Valkey by host/port, a shared filesystem path, or a
    Mooncake Store master by host/port. docs/remote.md describes every field."""

    backend: RemoteBackend | str = RemoteBackend.REDIS
    host: str = "127.0.0.1"
    port: int = 6379
    password: str | None = None
    username: str | None = None  # Redis ACL user (AUTH username password); None = the default user
    db: int = 0
    tls: bool = False
    tls_ca_file: str = ""  # CA bundle that signed the server's certificate; "" = the system CAs
    tls_cert_file: str = ""  # client certificate + key for servers that verify clients ("" = none)
    tls_key_file: str = ""
    path: str = ""
    key_prefix: str = "flexkv"
    ttl_s: int = 0  # 0 = keys never expire
    required: bool = True  # unreachable at start: error (True) or warn and disable the tier (False)
    lookup_timeout_ms: int = 5  # the server loop waits at most this long for an existence check
    mooncake_local_hostname: str = "127.0.0.1"  # address other Mooncake clients reach this one at
    mooncake_protocol: str = "tcp"  # "tcp" or "rdma"
    mooncake_device: str = ""  # RDMA device(s), e.g. "mlx5_0"; "" for tcp
    mooncake_segment_mb: int = 0  # DRAM each remote worker contributes to the store (0 = none)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "backend", RemoteBackend(self.backend))
        except ValueError:
            allowed = ", ".join(b.value for b in RemoteBackend)
            raise ConfigError(f"remote.backend: unsupported {self.backend!r}; allowed: {allowed}") from None
        _require_int(self.port, "remote.port", 1)
        _require(self.port <= 65535, "remote.port", f"must be <= 65535, got {self.port}")
        _require_int(self.db, "remote.db", 0)
        _require_int(self.ttl_s, "remote.ttl_s", 0)
        _require_int(self.lookup_timeout_ms, "remote.lookup_timeout_ms", 0)
        _require_int(self.mooncake_segment_mb, "remote.mooncake_segment_mb", 0)
        _require(self.mooncake_protocol in ("tcp", "rdma"), "remote.mooncake_protocol",
                 f"must be tcp or rdma, got {self.mooncake_protocol!r}")
        _require(bool(self.tls_cert_file) == bool(self.tls_key_file), "remote.tls_cert_file",
                 "tls_cert_file and tls_key_file go together")
        _require(bool(self.key_prefix) and "{" not in self.key_prefix and "}" not in self.key_prefix,
                 "remote.key_prefix", f"must be non-empty without braces, got {self.key_prefix!r}")
        if self.backend is RemoteBackend.FILESYSTEM:
            _require(bool(self.path), "remote.path", "is required for the filesystem backend")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Sizes and switches of flexkv's tiers, in blocks of ``tokens_per_block`` tokens."""

    tokens_per_block: int = 16
    enable_cpu: bool = True
    num_cpu_blocks: int = 1024
    enable_ssd: bool = False
    num_ssd_blocks: int = 0
    ssd_cache_dir: tuple[str, ...] | str = ()  # a list or a ";"-separated string is accepted too
    ssd_max_file_bytes: int = 64 * GIB
    io_uring_depth: int = 512
    ssd_persist_index: bool = True  # find the SSD tier's blocks again after a restart (the journal)
    ssd_durable_writes: bool = True  # fdatasync SSD data, then its journal records, before a write is done
    enable_remote: bool = False
    num_remote_blocks: int = 0  # remote capacity we account for; 0 = the store decides (unbounded)
    remote: RemoteConfig = dataclasses.field(default_factory=RemoteConfig)
    eviction_policy: EvictionPolicy | str = EvictionPolicy.LRU  # every tier's, unless overridden below
    eviction_policy_cpu: EvictionPolicy | str | None = None
    eviction_policy_ssd: EvictionPolicy | str | None = None
    eviction_policy_remote: EvictionPolicy | str | None = None
    # Policy knobs; defaults are the best of those tried on the conversation trace (docs/benchmarks.md).
    hit_reward_seconds: float = 30.0  # flru and hazard: grace time one hit adds to a node
    slru_promote_hits: int = 2  # slru: hits that move a node into the protected segment
    slru_protected_ratio: float = 0.2  # slru: largest share of a tier's evictable blocks kept protected
    # Proactive eviction: once a tier is fuller than evict_start_threshold (a fraction of its blocks),
    # the server's idle tick evicts evict_ratio of the tier, so puts under pressure find free blocks
    # instead of evicting while they match. 1.0 = evict only when an allocation needs room.
    evict_start_threshold: float = 1.0
    evict_ratio: float = 0.05
    # Operations (docs/operations.md): Prometheus /metrics (0 = off) and the request trace ("" = off).
    metrics_port: int = 0
    metrics_address: str = "127.0.0.1"
    trace_path: str = ""
    trace_max_mb: float = 64.0
    trace_backups: int = 3
    match_ttl_s: float = 600.0  # a get_match/put_match never launched is released after this long
    result_cache_bytes: int = 32 << 20  # bound of the server's cache of finished results
    # Spin this long (polling without sleeping) before a wait for a reply or a completion sleeps, and
    # only while one is outstanding: an idle process never spins (docs/config.md, busy_poll_us).
    busy_poll_us: int = 0
    # Read rates (GB/s, 1e9 bytes/s) before the server measured any op of a tier (scheduler/read_rates.py);
    # engines weigh a restore's load time against recomputing with them (MatchInfo.load_s). Optimistic on
    # purpose: a tier believed fast is read, and so measured; one believed slow might never be.
    cpu_read_gbps: float = 20.0  # CPU tier -> engine memory (H2D)
    ssd_read_gbps: float = 3.0  # SSD -> CPU tier (DISK2H)
    remote_read_gbps: float = 1.25  # remote store -> CPU tier (REMOTE2H; 10 GbE)
    measure_read_rates: bool = True  # False: the rates above stand for good (a known disk; tests)

    def policy_of(self, tier: str) -> EvictionPolicy:
        """The eviction policy of ``tier`` ("cpu", "ssd", "remote")."""
        override = getattr(self, f"eviction_policy_{tier}")
        policy = self.eviction_policy if override is None else override
        assert isinstance(policy, EvictionPolicy)
        return policy

    def __post_init__(self) -> None:
        dirs = self.ssd_cache_dir
        if isinstance(dirs, str):
            dirs = tuple(d.strip() for d in dirs.split(";") if d.strip())
        _require(all(isinstance(d, str) and d for d in dirs), "ssd_cache_dir",
                 f"must be non-empty directory paths, got {dirs!r}")
        object.__setattr__(self, "ssd_cache_dir", tuple(dirs))
        for flag in ("enable_cpu", "enable_ssd", "enable_remote", "ssd_persist_index", "ssd_durable_writes",
                     "measure_read_rates"):
            _require(isinstance(getattr(self, flag), bool), flag, f"must be a bool, got {getattr(self, flag)!r}")
        for name in ("eviction_policy", "eviction_policy_cpu", "eviction_policy_ssd", "eviction_policy_remote"):
            value = getattr(self, name)
            if value is None and name != "eviction_policy":
                continue
            try:
                object.__setattr__(self, name, EvictionPolicy(value))
            except ValueError:
                allowed = ", ".join(p.value for p in EvictionPolicy)
                raise ConfigError(f"{name}: unsupported {value!r}; allowed: {allowed}") from None
        _require_fraction(self.slru_protected_ratio, "slru_protected_ratio", low_open=True)
        _require_fraction(self.evict_start_threshold, "evict_start_threshold", low_open=True)
        _require_fraction(self.evict_ratio, "evict_ratio", low_open=True)
        _require_int(self.slru_promote_hits, "slru_promote_hits", 1)
        _require(isinstance(self.hit_reward_seconds, (int, float)) and not isinstance(self.hit_reward_seconds, bool)
                 and 0 <= self.hit_reward_seconds < float("inf"), "hit_reward_seconds",
                 f"must be a finite number >= 0, got {self.hit_reward_seconds!r}")
        t = self.tokens_per_block
        _require_int(t, "tokens_per_block", 1)
        _require(t & (t - 1) == 0, "tokens_per_block", f"must be a power of two, got {t}")
        _require(self.enable_cpu, "enable_cpu", "the CPU tier is required (SSD and remote stage through it)")
        _require_int(self.num_cpu_blocks, "num_cpu_blocks", 1)
        _require_int(self.num_ssd_blocks, "num_ssd_blocks", 0)
        _require_int(self.num_remote_blocks, "num_remote_blocks", 0)
        _require_int(self.ssd_max_file_bytes, "ssd_max_file_bytes", 4096)
        _require_int(self.io_uring_depth, "io_uring_depth", 1)
        _require(self.io_uring_depth <= 32768, "io_uring_depth", f"must be <= 32768, got {self.io_uring_depth}")
        if self.enable_ssd:
            _require(self.num_ssd_blocks > 0, "num_ssd_blocks", "must be > 0 when enable_ssd is set")
            _require(len(self.ssd_cache_dir) > 0, "ssd_cache_dir",
                     "needs at least one directory when enable_ssd is set")
        _require(isinstance(self.remote, RemoteConfig), "remote", "must be a RemoteConfig")
        ttl = self.match_ttl_s
        _require(isinstance(ttl, int | float) and not isinstance(ttl, bool) and math.isfinite(ttl) and ttl > 0,
                 "match_ttl_s", f"must be a finite number of seconds > 0, got {ttl!r}")
        _require_int(self.result_cache_bytes, "result_cache_bytes", 1 << 16)
        _require_int(self.busy_poll_us, "busy_poll_us", 0)
        _require(self.busy_poll_us <= MAX_BUSY_POLL_US, "busy_poll_us",
                 f"must be <= {MAX_BUSY_POLL_US} (microseconds), got {self.busy_poll_us}")
        for name in ("cpu_read_gbps", "ssd_read_gbps", "remote_read_gbps"):
            rate = getattr(self, name)
            _require(isinstance(rate, int | float) and not isinstance(rate, bool) and math.isfinite(rate) and rate > 0,
                     name, f"must be a finite rate in GB/s > 0, got {rate!r}")

        self._check_operations()

    def _check_operations(self) -> None:
        _require_int(self.metrics_port, "metrics_port", 0)
        _require(self.metrics_port <= 65535, "metrics_port", f"must be <= 65535, got {self.metrics_port}")
        _require(isinstance(self.metrics_address, str) and bool(self.metrics_address), "metrics_address",
                 f"must be a host address, got {self.metrics_address!r}")
        _require(isinstance(self.trace_path, str), "trace_path", f"must be a file path, got {self.trace_path!r}")
        _require(isinstance(self.trace_max_mb, (int, float)) and not isinstance(self.trace_max_mb, bool)
                 and math.isfinite(self.trace_max_mb) and self.trace_max_mb > 0, "trace_max_mb",
                 f"must be > 0, got {self.trace_max_mb!r}")
        _require_int(self.trace_backups, "trace_backups", 0)


# ---------------------------------------------------------------------------------------------
# User config in gigabytes


_USER_KEYS: dict[str, type] = {
    "cpu_cache_gb": float,
    "ssd_cache_gb": float,
    "ssd_cache_dir": str,
    "ssd_max_file_gb": float,
    "tokens_per_block": int,
    "io_uring_depth": int,
    "ssd_persist_index": bool,
    "ssd_durable_writes": bool,
    "eviction_policy": str,
    "eviction_policy_cpu": str,
    "eviction_policy_ssd": str,
    "eviction_policy_remote": str,
    "hit_reward_seconds": float,
    "slru_promote_hits": int,
    "slru_protected_ratio": float,
    "evict_start_threshold": float,
    "evict_ratio": float,
    "match_ttl_s": float,
    "busy_poll_us": int,
    "enable_remote": bool,
    "remote_cache_gb": float,
    "remote_backend": str,
    "remote_host": str,
    "remote_port": int,
    "remote_password": str,
    "remote_username": str,
    "remote_db": int,
    "remote_tls": bool,
    "remote_tls_ca_file": str,
    "remote_tls_cert_file": str,
    "remote_tls_key_file": str,
    "remote_lookup_timeout_ms": int,
    "remote_mooncake_local_hostname": str,
    "remote_mooncake_protocol": str,
    "remote_mooncake_device": str,
    "remote_mooncake_segment_mb": int,
    "remote_path": str,
    "remote_key_prefix": str,
    "remote_ttl_s": int,
    "remote_required": bool,
    "metrics_port": int,
    "metrics_address": str,
    "trace_path": str,
    "trace_max_mb": float,
    "trace_backups": int,
    "cpu_read_gbps": float,
    "ssd_read_gbps": float,
    "remote_read_gbps": float,
    "measure_read_rates": bool,
}
# FLEXKV_* variables that are not config keys (read elsewhere; docs/config.md lists them).
_NON_CONFIG_ENV = {
    "FLEXKV_CONFIG_PATH", "FLEXKV_LOG_LEVEL", "FLEXKV_RUNTIME_DIR", "FLEXKV_SERVER_ADDRESS",  # run time
    "FLEXKV_DP_CLIENT_ID",  # the vLLM connector in server mode (docs/vllm.md)
    "FLEXKV_CUDART", "FLEXKV_CUDART_DIR", "FLEXKV_SSD_NO_DIRECT",  # where CUDA is; no O_DIRECT
    "FLEXKV_LANE_DEPTH", "FLEXKV_STAGING_MIB", "FLEXKV_HOST_LANES",  # worker tuning (docs/gpu.md)
    "FLEXKV_WORKER_RESTARTS", "FLEXKV_WORKER_RESTART_WINDOW_S",  # restart budget (scheduler/supervisor.py)
    "FLEXKV_CURVE_SERVER_SECRET", "FLEXKV_CURVE_AUTHORIZED_KEYS",  # CurveZMQ, server (flexkv/security.py)
    "FLEXKV_CURVE_SERVER_KEY", "FLEXKV_CURVE_CLIENT_SECRET",  # CurveZMQ, client
    "FLEXKV_NVCC", "FLEXKV_SKIP_EXTENSIONS", "FLEXKV_SKIP_APT", "FLEXKV_TORCH_SPEC", "FLEXKV_SKIP_TORCH",  # build
    "FLEXKV_SKIP_MOONCAKE",  # build: no Mooncake client
    "FLEXKV_TEST_CUDARTS",  # tests: extra libcudart files to run the BATCH ABI test under
    "FLEXKV_PROGRESS",  # progress reports: bar, lines or off (flexkv/progress.py)
    "FLEXKV_HOP_TRACE",  # per-hop timestamps for latency breakdowns (flexkv/hoptrace.py)
}


def _coerce(key: str, value: Any, source: str) -> Any:
    kind = _USER_KEYS[key]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{key} (from {source}): expected a boolean, got {value!r}")
    if kind is str and isinstance(value, list):  # YAML list of SSD dirs
        return ";".join(str(v) for v in value)
    try:
        if isinstance(value, bool) and kind is not str:
            raise ValueError
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        result = kind(value)
        if kind is float and not math.isfinite(result):
            raise ValueError
        return result
    except (TypeError, ValueError):
        raise ConfigError(f"{key} (from {source}): expected {kind.__name__}, got {value!r}") from None


def read_user_config(env: Mapping[str, str] | None = None) -> tuple[dict[str, Any], str]:
    """Read the user config: the file named by FLEXKV_CONFIG_PATH, else FLEXKV_* variables.

    Returns (values, source description). Unknown keys are errors.
    """
    env = os.environ if env is None else env
    path = env.get("FLEXKV_CONFIG_PATH")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"FLEXKV_CONFIG_PATH: cannot read {path}: {e.strerror}") from None
        raw = _parse_config_text(text, path)
        source = path
    else:
        raw = {}
        for name, value in env.items():
            if name.startswith("FLEXKV_") and name not in _NON_CONFIG_ENV:
                raw[name.removeprefix("FLEXKV_").lower()] = value
        source = "FLEXKV_* environment"
    unknown = sorted(set(raw) - set(_USER_KEYS), key=str)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown} in {source}; allowed: {sorted(_USER_KEYS)}")
    return {k: _coerce(k, v, source) for k, v in raw.items()}, source


def _parse_config_text(text: str, path: str) -> dict[str, Any]:
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes a ConfigError naming the file
        raise ConfigError(f"FLEXKV_CONFIG_PATH: cannot parse {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"FLEXKV_CONFIG_PATH: {path} must hold a mapping, got {type(data).__name__}")
    return data


def _gb_to_blocks(key: str, gb: float, block_bytes: int) -> int:
    if gb < 0:
        raise ConfigError(f"{key}: must be >= 0, got {gb}")
    return int(gb * GIB) // block_bytes


def cache_config_from_user(model: ModelConfig, values: Mapping[str, Any]) -> CacheConfig:
    """Convert user values in gigabytes (GiB, 2**30 bytes) into a CacheConfig for ``model``."""
    tokens_per_block = int(values.get("tokens_per_block", 16))
    if tokens_per_block <= 0 or tokens_per_block & (tokens_per_block - 1):
        raise ConfigError(f"tokens_per_block: must be a power of two, got {tokens_per_block}")
    block_bytes = model.block_bytes(tokens_per_block)
    kw: dict[str, Any] = {"tokens_per_block": tokens_per_block}
    if "cpu_cache_gb" in values:
        kw["num_cpu_blocks"] = _gb_to_blocks("cpu_cache_gb", values["cpu_cache_gb"], block_bytes)
        if kw["num_cpu_blocks"] < 1:
            raise ConfigError(f"cpu_cache_gb: {values['cpu_cache_gb']} GiB holds no {block_bytes}-byte block")
    if values.get("ssd_cache_gb", 0) < 0:
        raise ConfigError(f"ssd_cache_gb: must be >= 0 (0 = no SSD tier), got {values['ssd_cache_gb']}")
    if values.get("ssd_cache_gb", 0) > 0:
        kw["enable_ssd"] = True
        kw["num_ssd_blocks"] = _gb_to_blocks("ssd_cache_gb", values["ssd_cache_gb"], block_bytes)
        if kw["num_ssd_blocks"] < 1:
            raise ConfigError(f"ssd_cache_gb: {values['ssd_cache_gb']} GiB holds no {block_bytes}-byte block")
        kw["ssd_cache_dir"] = values.get("ssd_cache_dir", "")
    if "ssd_max_file_gb" in values:
        if values["ssd_max_file_gb"] <= 0:
            raise ConfigError(f"ssd_max_file_gb: must be > 0, got {values['ssd_max_file_gb']}")
        kw["ssd_max_file_bytes"] = int(values["ssd_max_file_gb"] * GIB)
    for key in ("io_uring_depth", "eviction_policy", "enable_remote", "eviction_policy_cpu", "eviction_policy_ssd",
                "eviction_policy_remote", "hit_reward_seconds", "slru_promote_hits", "slru_protected_ratio",
                "evict_start_threshold", "evict_ratio", "ssd_persist_index", "ssd_durable_writes", "metrics_port",
                "metrics_address", "trace_path", "trace_max_mb", "trace_backups", "match_ttl_s",
                "result_cache_bytes", "busy_poll_us", "cpu_read_gbps", "ssd_read_gbps", "remote_read_gbps",
                "measure_read_rates"):
        if key in values:
            kw[key] = values[key]
    if "remote_cache_gb" in values:
        kw["num_remote_blocks"] = _gb_to_blocks("remote_cache_gb", values["remote_cache_gb"], block_bytes)
    remote = {k.removeprefix("remote_"): v for k, v in values.items()
              if k.startswith("remote_") and k != "remote_cache_gb"}
    if remote:
        kw["remote"] = RemoteConfig(**remote)
    return CacheConfig(**kw)


def load_cache_config(model: ModelConfig, env: Mapping[str, str] | None = None) -> CacheConfig:
    """The CacheConfig the user asked for (FLEXKV_CONFIG_PATH file, else FLEXKV_* variables)."""
    values, _ = read_user_config(env)
    return cache_config_from_user(model, values)


# ---------------------------------------------------------------------------------------------
# Passing configs to child processes (JSON; enums by value)


def configs_to_json(model: ModelConfig, cache: CacheConfig) -> str:
    import msgspec

    return msgspec.json.encode({"model": model, "cache": cache}).decode()


def configs_from_json(text: str) -> tuple[ModelConfig, CacheConfig]:
    data = json.loads(text)
    cache = dict(data["cache"])
    cache["remote"] = RemoteConfig(**cache["remote"])
    return ModelConfig(**data["model"]), CacheConfig(**cache)


def kv_fingerprint(model: ModelConfig, tokens_per_block: int) -> str:
    """A short tag naming the byte layout of a block (shape, dtype, TP sharding, block size).

    Servers whose blocks are laid out differently must never read each other's blocks from a shared
    remote store, so it is part of every remote key. A packed block format (vLLM >= 0.26's layouts)
    adds its name; the split format adds nothing, so existing keys stay valid.
    """
    import xxhash

    assert isinstance(model.dtype, DType) and isinstance(model.block_format, BlockFormat)
    desc = (f"L{model.num_layers}H{model.num_kv_heads}D{model.head_size}{model.dtype.value}"
            f"M{int(model.use_mla)}TP{model.num_shards}T{tokens_per_block}")
    if model.block_format is not BlockFormat.SPLIT:
        desc += f"F{model.block_format.value}"
    return xxhash.xxh3_64_hexdigest(desc.encode())[:8]

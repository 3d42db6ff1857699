"""Model and cache configuration: validation messages, block sizes, and the user config in GiB.

Every validation error must name the field (or the user's key) and say what is allowed, so a user
can fix a config without reading flexkv's source.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flexkv.common.config import (
    GIB,
    CacheConfig,
    ModelConfig,
    RemoteBackend,
    RemoteConfig,
    cache_config_from_user,
    load_cache_config,
    read_user_config,
)
from flexkv.types import ConfigError, DType, EvictionPolicy

# Llama-3-8B-like: 32 layers, 8 KV heads of 128, bf16 -> 2 MiB per 16-token block (all layers, K and V)
LLAMA = ModelConfig(num_layers=32, num_kv_heads=8, head_size=128, dtype="bfloat16")
LLAMA_BLOCK_BYTES = 32 * 2 * 8 * 128 * 2 * 16


# ---------------------------------------------------------------------------------------------
# ModelConfig


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_layers": 0}, r"num_layers: must be >= 1, got 0"),
        ({"num_layers": "32"}, r"num_layers: must be an integer, got '32'"),
        ({"num_layers": True}, r"num_layers: must be an integer, got True"),
        ({"num_kv_heads": 0}, r"num_kv_heads: must be >= 1, got 0"),
        ({"head_size": 64.0}, r"head_size: must be an integer, got 64.0"),
        ({"tp_size": 0}, r"tp_size: must be >= 1, got 0"),
        ({"dp_size": -1}, r"dp_size: must be >= 1, got -1"),
        ({"tp_size": 3}, r"num_kv_heads: 8 heads do not split over tp_size=3"),
        ({"use_mla": 1}, r"use_mla: must be a bool, got 1"),
        ({"use_mla": True}, r"num_kv_heads: must be 1 with use_mla, got 8"),
        ({"dtype": "int4"}, r"dtype: unsupported 'int4'; allowed: float16, bfloat16, float32, float8_e4m3fn"),
    ],
)
def test_model_config_errors_name_the_field_and_what_is_allowed(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"num_layers": 32, "num_kv_heads": 8, "head_size": 128, **kwargs}
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**args)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("bf16", DType.BFLOAT16), ("fp16", DType.FLOAT16), ("half", DType.FLOAT16), (torch.float8_e4m3fn,
     DType.FLOAT8_E4M3FN), (torch.bfloat16, DType.BFLOAT16), (np.dtype("float32"), DType.FLOAT32),
     ("FLOAT32", DType.FLOAT32), (DType.UINT8, DType.UINT8)],
)
def test_model_dtype_accepts_names_and_torch_or_numpy_dtypes(dtype: object, expected: DType) -> None:
    assert ModelConfig(1, 1, 64, dtype=dtype).dtype is expected  # type: ignore[arg-type]


def test_block_bytes_hold_every_head_of_every_tp_rank() -> None:
    # TP splits the heads over ranks, but a CPU/SSD/remote block still holds the full model's heads
    assert LLAMA.block_bytes(16) == LLAMA_BLOCK_BYTES == 2 * 2**20
    tp4 = ModelConfig(num_layers=32, num_kv_heads=8, head_size=128, dtype="bfloat16", tp_size=4)
    assert (tp4.num_shards, tp4.heads_per_shard, tp4.kv_dim) == (4, 2, 2)
    assert tp4.chunk_bytes(16) == 16 * 2 * 128 * 2
    assert tp4.block_bytes(16) == LLAMA_BLOCK_BYTES
    assert LLAMA.block_bytes(64) == 4 * LLAMA_BLOCK_BYTES
    fp8 = ModelConfig(num_layers=32, num_kv_heads=8, head_size=128, dtype="fp8")
    assert fp8.block_bytes(16) == LLAMA_BLOCK_BYTES // 2


def test_mla_blocks_hold_one_latent_shared_by_all_ranks() -> None:
    # DeepSeek-style MLA: one 576-wide latent per token and layer, no separate V, same on every rank
    mla = ModelConfig(num_layers=61, num_kv_heads=1, head_size=576, dtype="bf16", use_mla=True, tp_size=8)
    assert (mla.kv_dim, mla.num_shards, mla.heads_per_shard) == (1, 1, 1)
    assert mla.chunk_bytes(64) == 64 * 576 * 2
    assert mla.block_bytes(64) == 61 * 64 * 576 * 2


# ---------------------------------------------------------------------------------------------
# CacheConfig and RemoteConfig


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tokens_per_block": 0}, r"tokens_per_block: must be >= 1, got 0"),
        ({"tokens_per_block": 24}, r"tokens_per_block: must be a power of two, got 24"),
        ({"enable_cpu": False}, r"enable_cpu: the CPU tier is required"),
        ({"enable_ssd": "yes"}, r"enable_ssd: must be a bool, got 'yes'"),
        ({"enable_remote": 1}, r"enable_remote: must be a bool, got 1"),
        ({"num_cpu_blocks": 0}, r"num_cpu_blocks: must be >= 1, got 0"),
        ({"num_ssd_blocks": -1}, r"num_ssd_blocks: must be >= 0, got -1"),
        ({"enable_ssd": True, "ssd_cache_dir": "/tmp"}, r"num_ssd_blocks: must be > 0 when enable_ssd is set"),
        ({"enable_ssd": True, "num_ssd_blocks": 8}, r"ssd_cache_dir: needs at least one directory"),
        ({"ssd_cache_dir": ["/a", ""]}, r"ssd_cache_dir: must be non-empty directory paths"),
        ({"ssd_max_file_bytes": 100}, r"ssd_max_file_bytes: must be >= 4096, got 100"),
        ({"io_uring_depth": 0}, r"io_uring_depth: must be >= 1, got 0"),
        ({"io_uring_depth": 65536}, r"io_uring_depth: must be <= 32768, got 65536"),
        ({"eviction_policy": "mru"}, r"eviction_policy: unsupported 'mru'; allowed: lru, lfu, slru, flru, fifo"),
        ({"eviction_policy_ssd": "arc"}, r"eviction_policy_ssd: unsupported 'arc'"),
        ({"slru_protected_ratio": 1.5}, r"slru_protected_ratio: must be a number in \(0, 1\]"),
        ({"evict_ratio": 0}, r"evict_ratio: must be a number in \(0, 1\]"),
        ({"hit_reward_seconds": float("nan")}, r"hit_reward_seconds: must be a finite number"),
        ({"remote": {"host": "x"}}, r"remote: must be a RemoteConfig"),
        ({"match_ttl_s": -1.0}, r"match_ttl_s: must be a finite number of seconds > 0, got -1.0"),
        ({"match_ttl_s": float("nan")}, r"match_ttl_s: must be a finite number"),
        ({"result_cache_bytes": 100}, r"result_cache_bytes: must be >= 65536, got 100"),
        ({"busy_poll_us": -1}, r"busy_poll_us: must be >= 0, got -1"),
        ({"busy_poll_us": 10_001}, r"busy_poll_us: must be <= 10000 \(microseconds\), got 10001"),
        ({"busy_poll_us": True}, r"busy_poll_us: must be an integer, got True"),
    ],
)
def test_cache_config_errors_name_the_field_and_what_is_allowed(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CacheConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "memcached"}, r"remote.backend: unsupported 'memcached'; allowed: redis, filesystem"),
        ({"port": 0}, r"remote.port: must be >= 1, got 0"),
        ({"port": 70000}, r"remote.port: must be <= 65535, got 70000"),
        ({"db": -1}, r"remote.db: must be >= 0, got -1"),
        ({"ttl_s": -5}, r"remote.ttl_s: must be >= 0, got -5"),
        ({"key_prefix": "{flexkv}"}, r"remote.key_prefix: must be non-empty without braces"),
        ({"backend": "filesystem"}, r"remote.path: is required for the filesystem backend"),
    ],
)
def test_remote_config_errors_name_the_field_and_what_is_allowed(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RemoteConfig(**kwargs)


def test_ssd_dirs_come_as_a_list_or_a_semicolon_separated_string() -> None:
    as_string = CacheConfig(enable_ssd=True, num_ssd_blocks=8, ssd_cache_dir="/nvme0/kv; /nvme1/kv;")
    as_list = CacheConfig(enable_ssd=True, num_ssd_blocks=8, ssd_cache_dir=["/nvme0/kv", "/nvme1/kv"])  # type: ignore[arg-type]
    assert as_string.ssd_cache_dir == as_list.ssd_cache_dir == ("/nvme0/kv", "/nvme1/kv")
    assert CacheConfig().ssd_cache_dir == ()
    assert CacheConfig().eviction_policy is EvictionPolicy.LRU
    assert RemoteConfig(backend="filesystem", path="/mnt/shared").backend is RemoteBackend.FILESYSTEM


# ---------------------------------------------------------------------------------------------
# User config in GiB: YAML file, JSON file, FLEXKV_* environment


def write(tmp_path: Path, name: str, text: str) -> dict[str, str]:
    path = tmp_path / name
    path.write_text(text)
    return {"FLEXKV_CONFIG_PATH": str(path)}


def test_yaml_file_in_gib_becomes_blocks(tmp_path: Path) -> None:
    env = write(tmp_path, "flexkv.yaml", (
        "cpu_cache_gb: 1.5\n"
        "ssd_cache_gb: 4\n"
        "ssd_cache_dir: [/nvme0/flexkv, /nvme1/flexkv]\n"
        "tokens_per_block: 16\n"
        "eviction_policy: lru\n"
    ))
    cache = load_cache_config(LLAMA, env)
    assert cache.num_cpu_blocks == int(1.5 * GIB) // LLAMA_BLOCK_BYTES == 768
    assert cache.enable_ssd and cache.num_ssd_blocks == 4 * GIB // LLAMA_BLOCK_BYTES == 2048
    assert cache.ssd_cache_dir == ("/nvme0/flexkv", "/nvme1/flexkv")
    assert not cache.enable_remote


def test_json_file_named_by_flexkv_config_path(tmp_path: Path) -> None:
    env = write(tmp_path, "flexkv.json", json.dumps({
        "cpu_cache_gb": 2, "tokens_per_block": 64, "ssd_cache_gb": 1, "ssd_cache_dir": "/a;/b",
        "enable_remote": True, "remote_backend": "redis", "remote_port": 6380, "remote_cache_gb": 8,
    }))
    env["FLEXKV_CPU_CACHE_GB"] = "999"  # ignored: the file wins over the environment
    cache = load_cache_config(LLAMA, env)
    block_bytes = LLAMA.block_bytes(64)
    assert cache.tokens_per_block == 64
    assert cache.num_cpu_blocks == 2 * GIB // block_bytes == 256
    assert cache.num_ssd_blocks == GIB // block_bytes and cache.ssd_cache_dir == ("/a", "/b")
    assert cache.enable_remote and cache.remote.port == 6380 and cache.num_remote_blocks == 8 * GIB // block_bytes


def test_environment_variables_when_no_file_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("FLEXKV_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FLEXKV_CPU_CACHE_GB", "0.25")
    monkeypatch.setenv("FLEXKV_SSD_CACHE_GB", "1")
    monkeypatch.setenv("FLEXKV_SSD_CACHE_DIR", "/nvme0/kv;/nvme1/kv")
    monkeypatch.setenv("FLEXKV_ENABLE_REMOTE", "yes")
    monkeypatch.setenv("FLEXKV_REMOTE_BACKEND", "filesystem")
    monkeypatch.setenv("FLEXKV_REMOTE_PATH", "/mnt/shared/kv")
    monkeypatch.setenv("FLEXKV_LOG_LEVEL", "debug")  # read elsewhere, not a config key
    cache = load_cache_config(LLAMA)
    assert cache.num_cpu_blocks == 128
    assert cache.num_ssd_blocks == 512 and cache.ssd_cache_dir == ("/nvme0/kv", "/nvme1/kv")
    assert cache.enable_remote and cache.remote.backend is RemoteBackend.FILESYSTEM
    assert cache.remote.path == "/mnt/shared/kv"
    values, source = read_user_config()
    assert source == "FLEXKV_* environment" and values["enable_remote"] is True


def test_every_flexkv_variable_the_code_reads_is_a_config_key_or_known_to_be_none() -> None:
    """Otherwise setting it (FLEXKV_CUDART=...) would make load_cache_config fail with 'unknown key'."""
    import re

    from flexkv.common.config import _NON_CONFIG_ENV, _USER_KEYS

    root = Path(__file__).resolve().parent.parent
    files = [root / "setup.py", root / "build.sh", *root.glob("c_src/build_*.py")]
    for folder in ("flexkv", "scheduler", "workers"):
        files += (root / folder).rglob("*.py")
    # string literals ("FLEXKV_X") and shell variables ($FLEXKV_X, ${FLEXKV_X}); C constants are bare names
    found = (re.findall(r"""["'](FLEXKV_[A-Z_]+)["']|\$\{?(FLEXKV_[A-Z_]+)""", f.read_text()) for f in files)
    names = {a or b for matches in found for a, b in matches}
    assert "FLEXKV_CUDART" in names and "FLEXKV_SKIP_APT" in names, names  # the scan sees both kinds
    unknown = {n for n in names if n not in _NON_CONFIG_ENV and n.removeprefix("FLEXKV_").lower() not in _USER_KEYS}
    assert not unknown, f"add to _NON_CONFIG_ENV (and docs/config.md): {sorted(unknown)}"


def test_empty_file_or_environment_gives_the_defaults(tmp_path: Path) -> None:
    assert load_cache_config(LLAMA, write(tmp_path, "empty.yaml", "")) == CacheConfig()
    assert load_cache_config(LLAMA, {}) == CacheConfig()


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"FLEXKV_CPU_CACHE": "4"}, r"unknown config key\(s\) \['cpu_cache'\] in FLEXKV_\* environment; allowed: \["),
        ({"FLEXKV_CPU_CACHE_GB": "lots"}, r"cpu_cache_gb \(from FLEXKV_\* environment\): expected float, got 'lots'"),
        ({"FLEXKV_CPU_CACHE_GB": "nan"}, r"cpu_cache_gb .*expected float, got 'nan'"),
        ({"FLEXKV_CPU_CACHE_GB": "inf"}, r"cpu_cache_gb .*expected float, got 'inf'"),
        ({"FLEXKV_CPU_CACHE_GB": "-1"}, r"cpu_cache_gb: must be >= 0, got -1.0"),
        ({"FLEXKV_CPU_CACHE_GB": "0.001"}, r"cpu_cache_gb: 0.001 GiB holds no 2097152-byte block"),
        ({"FLEXKV_SSD_CACHE_GB": "0.001", "FLEXKV_SSD_CACHE_DIR": "/x"}, r"ssd_cache_gb: 0.001 GiB holds no"),
        ({"FLEXKV_SSD_CACHE_GB": "1"}, r"ssd_cache_dir: needs at least one directory"),
        ({"FLEXKV_SSD_CACHE_GB": "-2", "FLEXKV_SSD_CACHE_DIR": "/x"}, r"ssd_cache_gb: must be >= 0 .*got -2.0"),
        ({"FLEXKV_MATCH_TTL_S": "0"}, r"match_ttl_s: must be a finite number of seconds > 0, got 0.0"),
        ({"FLEXKV_MATCH_TTL_S": "inf"}, r"match_ttl_s .*expected float, got 'inf'"),
        ({"FLEXKV_SSD_MAX_FILE_GB": "0"}, r"ssd_max_file_gb: must be > 0, got 0.0"),
        ({"FLEXKV_TOKENS_PER_BLOCK": "16.5"}, r"tokens_per_block .*expected int, got '16.5'"),
        ({"FLEXKV_TOKENS_PER_BLOCK": "12"}, r"tokens_per_block: must be a power of two, got 12"),
        ({"FLEXKV_ENABLE_REMOTE": "maybe"}, r"enable_remote .*expected a boolean, got 'maybe'"),
        ({"FLEXKV_EVICTION_POLICY": "mru"}, r"eviction_policy: unsupported 'mru'; allowed: lru"),
        ({"FLEXKV_REMOTE_PORT": "99999"}, r"remote.port: must be <= 65535, got 99999"),
        ({"FLEXKV_REMOTE_BACKEND": "s3"}, r"remote.backend: unsupported 's3'; allowed: redis, filesystem"),
        ({"FLEXKV_CONFIG_PATH": "/nonexistent/flexkv.yaml"}, r"FLEXKV_CONFIG_PATH: cannot read /nonexistent"),
        ({"FLEXKV_BUSY_POLL_US": "20000"}, r"busy_poll_us: must be <= 10000"),
    ],
)
def test_bad_environment_values_are_errors_naming_the_key(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_cache_config(LLAMA, env)


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("bad.yaml", "cpu_cache_gb: [1, 2\n", r"FLEXKV_CONFIG_PATH: cannot parse .*bad.yaml"),
        ("bad.json", "{'cpu_cache_gb': 1}", r"FLEXKV_CONFIG_PATH: cannot parse .*bad.json"),
        ("list.yaml", "- 1\n- 2\n", r"list.yaml must hold a mapping, got list"),
        ("keys.yaml", "cpu_cache_gb: 1\n1: 2\nssd_gb: 3\n", r"unknown config key\(s\) \[1, 'ssd_gb'\] in .*keys.yaml"),
        ("bool.yaml", "tokens_per_block: true\n", r"tokens_per_block \(from .*bool.yaml\): expected int, got True"),
        ("gb.yaml", "cpu_cache_gb: yes\n", r"cpu_cache_gb \(from .*gb.yaml\): expected float, got True"),
        ("tls.json", '{"remote_tls": 1}', r"remote_tls \(from .*tls.json\): expected a boolean, got 1"),
    ],
)
def test_bad_files_are_errors_naming_the_file_or_key(tmp_path: Path, name: str, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_cache_config(LLAMA, write(tmp_path, name, text))


def test_values_from_code_skip_the_parsing_step() -> None:
    cache = cache_config_from_user(LLAMA, {"cpu_cache_gb": 1, "tokens_per_block": 32})
    assert cache.tokens_per_block == 32 and cache.num_cpu_blocks == GIB // LLAMA.block_bytes(32)

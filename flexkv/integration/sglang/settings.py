"""The backend's settings, read from SGLang's ``--hicache-storage-backend-extra-config`` JSON.

Keys (all optional except the server address, which may come from ``FLEXKV_SERVER_ADDRESS``):
``flexkv_server_address``, ``flexkv_client_id_base`` (first flexkv DP client id of this SGLang
instance), ``flexkv_namespace`` (default: the model name), ``flexkv_timeout_s`` (longest wait for one
batch), ``flexkv_retry_interval_s`` (how often a lost server is tried again). SGLang's own keys
(``backend_name``, ``module_path``, ``class_name``, ``interface_v1``, ...) are ignored here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from flexkv.types import ConfigError

_PREFIX = "flexkv_"


@dataclasses.dataclass(frozen=True)
class BackendSettings:
    server_address: str
    client_id_base: int = 0
    namespace: str = ""
    timeout_s: float = 30.0
    retry_interval_s: float = 2.0

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None, model_name: str | None) -> BackendSettings:
        """Raises ConfigError naming an unknown ``flexkv_*`` key, a value of the wrong type, or a missing
        server address."""
        extra = dict(extra or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in extra.items():
            if not key.startswith(_PREFIX):
                continue
            name = key.removeprefix(_PREFIX)
            if name not in fields:
                allowed = ", ".join(_PREFIX + n for n in fields)
                raise ConfigError(f"unknown extra-config key {key!r}; flexkv keys: {allowed}")
            values[name] = _coerce(key, value, fields[name].type)
        values.setdefault("server_address", os.environ.get("FLEXKV_SERVER_ADDRESS", ""))
        if not values["server_address"]:
            raise ConfigError("flexkv backend: set flexkv_server_address in --hicache-storage-backend-extra-config "
                              "or FLEXKV_SERVER_ADDRESS (e.g. ipc:///run/flexkv/server.sock)")
        values.setdefault("namespace", model_name or "")
        settings = cls(**values)
        if settings.client_id_base < 0 or settings.timeout_s <= 0 or settings.retry_interval_s < 0:
            raise ConfigError(f"flexkv backend: client_id_base >= 0, timeout_s > 0 and retry_interval_s >= 0 "
                              f"needed, got {settings}")
        return settings


def _coerce(key: str, value: Any, kind: Any) -> Any:
    want = {"str": str, "int": int, "float": float}[str(kind)]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, want) or isinstance(value, bool):
        raise ConfigError(f"extra-config {key!r} must be {want.__name__}, got {value!r}")
    return value

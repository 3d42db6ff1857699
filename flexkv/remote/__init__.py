"""The remote tier's stores: Redis/Valkey (standalone or cluster), a shared filesystem path, Mooncake Store.

Used by remote worker processes (bytes) and by the server (existence checks for the remote index).
``open_remote_store`` picks the backend from the config and
checks the store answers; the worker then calls ``put_blocks``/``get_blocks``/``count_prefix``.
"""

from __future__ import annotations

from flexkv.common.config import RemoteBackend, RemoteConfig

from .base import RemoteStore, RemoteUnavailable
from .fs_store import FilesystemStore
from .redis_store import RedisStore

__all__ = ["FilesystemStore", "RedisStore", "RemoteStore", "RemoteUnavailable", "open_remote_store"]
# MooncakeStore (flexkv.remote.mooncake_store) is imported only when configured: its package is optional.


def open_remote_store(config: RemoteConfig, namespace_tag: str = "", *, connect_timeout_s: float = 1.0,
                      op_timeout_s: float = 5.0) -> RemoteStore:
    """Open the store ``config`` names and check it answers.

    ``namespace_tag`` (e.g. a model/layout fingerprint) is appended to ``config.key_prefix`` so
    deployments whose blocks differ never read each other's bytes; it must not contain braces or
    ``/``. The timeouts bound every Redis call (the server's existence checks use short ones so a
    hung store cannot stall its loop). Raises RemoteUnavailable naming ``host:port`` (or the path)
    when the store cannot be reached; whether that is fatal (``config.required``) is the caller's decision.
    """
    store: RemoteStore
    if config.backend is RemoteBackend.FILESYSTEM:
        store = FilesystemStore(config, namespace_tag)
    elif config.backend is RemoteBackend.MOONCAKE:
        from .mooncake_store import MooncakeStore

        store = MooncakeStore(config, namespace_tag, connect_timeout_s=connect_timeout_s)
    else:
        store = RedisStore(config, namespace_tag, connect_timeout_s=connect_timeout_s, op_timeout_s=op_timeout_s)
    try:
        store.ping()
    except RemoteUnavailable:
        store.close()
        raise
    return store

"""Key-based block keys (KVManager.hash_page_keys) and the SGLang backend's settings: no server needed."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash

from flexkv.integration.sglang.settings import BackendSettings
from flexkv.kvmanager import hash_page_keys
from flexkv.native.hasher import encode_namespace
from flexkv.types import ConfigError

KEYS = [f"{i:064x}" for i in range(1, 9)]


def test_block_keys_chain_the_page_keys_as_written_by_hand() -> None:
    seed = xxhash.xxh3_64_intdigest(encode_namespace(["m"]), seed=xxhash.xxh3_64_intdigest(b"flexkv page keys v1"))
    want = []
    for key in KEYS:
        seed = xxhash.xxh3_64_intdigest(key.encode(), seed=seed)
        want.append(seed)
    got = hash_page_keys(KEYS, ["m"])
    assert got.dtype == np.uint64 and got.tolist() == want


def test_a_block_key_names_its_whole_prefix() -> None:
    full = hash_page_keys(KEYS)
    assert hash_page_keys(KEYS[:3]).tolist() == full[:3].tolist(), "a prefix of the chain keys the same"
    assert hash_page_keys(KEYS[3:])[0] != full[3], "the same page after another prefix is another block"
    assert hash_page_keys([k.encode() for k in KEYS]).tolist() == full.tolist()
    assert not set(hash_page_keys(KEYS, ["other"]).tolist()) & set(full.tolist()), "namespaces never share"
    assert hash_page_keys([]).shape == (0,)


def test_a_key_that_is_not_text_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="page key 1 must be str or bytes"):
        hash_page_keys(["a", 3])  # type: ignore[list-item]


def test_settings_from_sglang_extra_config() -> None:
    s = BackendSettings.from_extra_config({"backend_name": "flexkv", "interface_v1": 1,
                                           "flexkv_server_address": "ipc:///x", "flexkv_timeout_s": 5,
                                           "flexkv_client_id_base": 2}, "llama")
    assert (s.server_address, s.timeout_s, s.client_id_base, s.namespace) == ("ipc:///x", 5.0, 2, "llama")


@pytest.mark.parametrize("extra, match", [
    ({"flexkv_server_adress": "ipc:///x"}, "unknown extra-config key 'flexkv_server_adress'"),
    ({"flexkv_server_address": "ipc:///x", "flexkv_timeout_s": "5"}, "must be float"),
    ({"flexkv_server_address": "ipc:///x", "flexkv_client_id_base": -1}, "client_id_base >= 0"),
    ({}, "set flexkv_server_address"),
])
def test_bad_settings_name_the_problem(extra: dict[str, object], match: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEXKV_SERVER_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match=match):
        BackendSettings.from_extra_config(extra, None)

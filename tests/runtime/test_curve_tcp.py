"""TCP between nodes (issue 13 §3), tested on loopback: with CurveZMQ keys the right client works end
to end (put/get bytes); a client with an unauthorized key, a plain client and one with the wrong server
key are refused and logged, and the server keeps serving. Off loopback, keys are required."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flexkv.common.config import configs_to_json
from flexkv.kvmanager import KVManager
from flexkv.layout import LayoutKind
from flexkv.scheduler.server import SchedulerServer
from flexkv.security import keygen
from flexkv.security import main as security_main
from flexkv.transport import ServerUnavailable
from flexkv.types import ConfigError, FlexKVError, TaskStatus
from tests.runtime.kvtest import T, block_bytes, host_buffers, poison, slots_for, small_cache, small_model, tokens

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    assert security_main(["keygen", str(tmp_path / "server")]) == 0  # the CLI entry point
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    keygen(tmp_path / "clients", "engine1")
    keygen(tmp_path / "clients", "rogue")
    (authorized / "engine1.key").write_bytes((tmp_path / "clients" / "engine1.key").read_bytes())
    assert (tmp_path / "server" / "server.key_secret").stat().st_mode & 0o077 == 0, "secret keys are private"
    return tmp_path


@pytest.fixture
def curve_server(keys: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    address = f"tcp://127.0.0.1:{_free_port()}"
    log_path = tmp_path / "server.log"
    env = {**os.environ, "FLEXKV_CURVE_SERVER_SECRET": str(keys / "server" / "server.key_secret"),
           "FLEXKV_CURVE_AUTHORIZED_KEYS": str(keys / "authorized")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flexkv.scheduler.main", "--configs-json",
                                 configs_to_json(small_model(), small_cache()), "--address", address],
                                env=env, stderr=log)
    try:
        yield address, log_path
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def _use_keys(monkeypatch: pytest.MonkeyPatch, keys: Path, client: str | None, server_key: str = "server/server.key",
              ) -> None:
    if client is None:
        monkeypatch.delenv("FLEXKV_CURVE_SERVER_KEY", raising=False)
        monkeypatch.delenv("FLEXKV_CURVE_CLIENT_SECRET", raising=False)
        return
    monkeypatch.setenv("FLEXKV_CURVE_SERVER_KEY", str(keys / server_key))
    monkeypatch.setenv("FLEXKV_CURVE_CLIENT_SECRET", str(keys / "clients" / f"{client}.key_secret"))


def _refused(address: str) -> None:
    kvm = KVManager(small_model(), small_cache(), server_address=address, start_timeout_s=3, request_timeout_s=3)
    with pytest.raises(ServerUnavailable):
        kvm.start()


def test_right_key_works_end_to_end_and_wrong_or_no_key_is_refused_and_logged(
        curve_server: tuple[str, Path], keys: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    address, log_path = curve_server
    model = small_model()
    _use_keys(monkeypatch, keys, "engine1")
    bufs = host_buffers(model, LayoutKind.VLLM_BLOCK_FIRST, 16, seed=2)
    kvm = KVManager(model, small_cache(), server_address=address)
    try:
        kvm.start()
        kvm.register_kv_buffers(bufs, bufs.layout)  # the TP client connects with the same keys
        toks = tokens(3 * T, seed=1)
        put = kvm.put_async(toks, slots_for([0, 1, 2], len(toks)))
        assert kvm.wait(put)[put].status is TaskStatus.SUCCESS
        poison(bufs, [8, 9, 10])
        get = kvm.get_async(toks, slots_for([8, 9, 10], len(toks)))
        assert kvm.wait(get)[get].status is TaskStatus.SUCCESS
        assert [block_bytes(bufs, b) for b in (8, 9, 10)] == [block_bytes(bufs, b) for b in (0, 1, 2)]
        for client, server_key in (("rogue", "server/server.key"), (None, ""), ("engine1", "clients/rogue.key")):
            _use_keys(monkeypatch, keys, client, server_key)
            _refused(address)
        assert kvm.stats()["clients_refused"] >= 3, "the first client's connection still works"
        kvm.check_invariants()
    finally:
        kvm.shutdown()
        bufs.close()
    log = log_path.read_text()
    assert "refused a CURVE client from 127.0.0.1" in log and "client key not authorized" in log
    assert "handshake failed" in log, "a plain client and a wrong server key are logged too"


def test_keygen_command_line(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "flexkv.security", "keygen", str(tmp_path), "--name", "node7"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "node7.key_secret" in done.stdout, done.stderr
    assert (tmp_path / "node7.key_secret").stat().st_mode & 0o777 == 0o600
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr


def test_binding_a_non_loopback_address_needs_curve_keys() -> None:
    with pytest.raises(ConfigError, match="not a loopback address: binding it needs CurveZMQ"):
        SchedulerServer(small_model(), small_cache(), f"tcp://0.0.0.0:{_free_port()}")


def test_curve_settings_that_cannot_work_are_clear_errors(keys: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXKV_CURVE_SERVER_SECRET", str(keys / "server" / "server.key"))  # the public file
    monkeypatch.setenv("FLEXKV_CURVE_AUTHORIZED_KEYS", str(keys / "authorized"))
    with pytest.raises(ConfigError, match="holds no secret key"):
        SchedulerServer(small_model(), small_cache(), f"tcp://127.0.0.1:{_free_port()}")
    monkeypatch.delenv("FLEXKV_CURVE_AUTHORIZED_KEYS")
    with pytest.raises(ConfigError, match="needs both"):
        SchedulerServer(small_model(), small_cache(), f"tcp://127.0.0.1:{_free_port()}")
    with pytest.raises(ConfigError, match="exists"):
        keygen(keys / "server", "server")
    monkeypatch.setenv("FLEXKV_CURVE_SERVER_KEY", str(keys / "server" / "server.key"))
    with pytest.raises(FlexKVError, match="FLEXKV_CURVE_CLIENT_SECRET"):
        KVManager(small_model(), small_cache(), server_address="tcp://127.0.0.1:1").start()

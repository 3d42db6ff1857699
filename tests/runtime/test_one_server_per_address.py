"""One server per address (issue 13 §2): a second server on a taken ipc path or tcp port fails at start
with one clear line and leaves the first one serving; a crashed server's leftover files never block."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

from flexkv.common.config import configs_to_json
from flexkv.kvmanager import KVManager
from flexkv.scheduler.endpoint import AddressInUse
from flexkv.scheduler.server import SchedulerServer
from tests.runtime.kvtest import small_cache, small_model

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def sock_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="fkv-addr-")  # short: ipc paths are limited to ~107 bytes
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _server_cmd(address: str) -> list[str]:
    return [sys.executable, "-m", "flexkv.scheduler.main", "--configs-json",
            configs_to_json(small_model(), small_cache()), "--address", address]


@contextlib.contextmanager
def _first_server(address: str) -> Iterator[KVManager]:
    proc = subprocess.Popen(_server_cmd(address))
    kvm = KVManager(small_model(), small_cache(), server_address=address)
    try:
        kvm.start()
        yield kvm
    finally:
        kvm.shutdown()
        proc.terminate()
        proc.wait(30)


def _second_server_fails(address: str) -> str:
    """Start a second server on ``address``; it must exit 2 with one error line and no traceback."""
    done = subprocess.run(_server_cmd(address), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    return errors[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_a_second_server_on_the_same_ipc_path_fails_at_start_and_the_first_keeps_serving(sock_dir: str) -> None:
    address = f"ipc://{sock_dir}/server.sock"
    with _first_server(address) as kvm:
        line = _second_server_fails(address)
        assert "already served by another flexkv server" in line and address in line
        assert kvm.stats()["num_workers"] == 0, "the first server still answers on its socket"
        late = KVManager(small_model(), small_cache(), server_address=address)  # a new client reaches the first
        late.start()
        assert late.stats()["server_pid"] == kvm.stats()["server_pid"]
        late.shutdown()
    # stopped: the path is free again, and a new server takes it
    with _first_server(address) as kvm:
        kvm.check_invariants()


def test_files_left_by_a_crashed_server_do_not_block_a_new_one(sock_dir: str) -> None:
    path = f"{sock_dir}/server.sock"
    for leftover in (path, f"{path}.lock"):  # what a SIGKILLed server leaves: its lock died with it
        with open(leftover, "w", encoding="utf-8") as f:
            f.write("12345\n")
    with _first_server(f"ipc://{path}") as kvm:
        kvm.check_invariants()


def test_a_second_server_on_a_taken_tcp_port_fails_with_one_line(sock_dir: str) -> None:
    address = f"tcp://127.0.0.1:{_free_port()}"
    with _first_server(address) as kvm:
        line = _second_server_fails(address)
        assert "already in use" in line and address in line
        kvm.check_invariants()


def test_in_process_a_taken_ipc_path_raises_address_in_use_and_leaves_the_owner_intact(sock_dir: str) -> None:
    address = f"ipc://{sock_dir}/server.sock"
    first = SchedulerServer(small_model(), small_cache(), address)
    try:
        with pytest.raises(AddressInUse, match="already served"):
            SchedulerServer(small_model(), small_cache(), address)
        assert os.path.exists(f"{sock_dir}/server.sock"), "the failed server removed the owner's socket file"
    finally:
        first.close()
    assert not any(n.startswith("server.sock") for n in os.listdir(sock_dir)), "close() removes what it bound"


def test_a_stop_before_serve_forever_began_is_not_lost(sock_dir: str) -> None:
    """`flexkv serve` prints its banner, then serves: a SIGTERM in between must still stop it."""
    server = SchedulerServer(small_model(), small_cache(), f"ipc://{sock_dir}/server.sock")
    try:
        server.stop()  # what the SIGTERM handler does
        t0 = time.monotonic()
        server.serve_forever()
        assert time.monotonic() - t0 < 5, "serve_forever ran on after a stop"
    finally:
        server.close()

"""Start and stop a real Mooncake Store on loopback for tests and benchmarks: ``mooncake_master``
plus one "segment holder" process, a Mooncake client that contributes DRAM and does nothing else
(the P2P handshake: no metadata server). Every wait is bounded; what does not come up raises
RuntimeError with its log tail. ``available()`` says whether the mooncake package is installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from types import TracebackType

from tests.redis_server import free_port

_HOLDER = """
import sys
from mooncake.store import MooncakeDistributedStore
store = MooncakeDistributedStore()
code = store.setup("127.0.0.1", "P2PHANDSHAKE", int(sys.argv[2]), 16 << 20, "tcp", "", sys.argv[1])
print("ready" if code == 0 else f"setup failed: {code}", flush=True)
if code == 0:
    sys.stdin.read()  # until the test closes our stdin
    store.close()
"""


def available() -> bool:
    try:
        import mooncake.store  # noqa: F401
    except ImportError:
        return False
    return True


def master_binary() -> str:
    import mooncake

    return os.path.join(os.path.dirname(mooncake.__file__), "mooncake_master")


class MooncakeStoreProcesses:
    """A master on 127.0.0.1:``port`` and one holder contributing ``segment_mb`` MiB."""

    def __init__(self, segment_mb: int = 256) -> None:
        self.workdir = tempfile.mkdtemp(prefix="flexkv-mooncake-")
        self.port = free_port()
        self.segment_mb = segment_mb
        self.master: subprocess.Popen[bytes] | None = None
        self.holder: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> MooncakeStoreProcesses:
        try:
            self.start_master(timeout_s)
            self.start_holder(timeout_s)
            return self
        except BaseException:
            self.close()
            raise

    def start_master(self, timeout_s: float = 30.0) -> None:
        log = open(os.path.join(self.workdir, "master.log"), "wb")
        self.master = subprocess.Popen(
            [master_binary(), "--rpc_address=127.0.0.1", f"--rpc_port={self.port}", "--metrics_host=127.0.0.1",
             f"--metrics_port={free_port()}", "--enable_http_metadata_server=false", "--client_ttl=3"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.master.poll() is not None:
                break
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            time.sleep(0.05)
        raise RuntimeError(f"mooncake_master on port {self.port} did not start: {self._tail('master.log')}")

    def start_holder(self, timeout_s: float = 30.0) -> None:
        log = open(os.path.join(self.workdir, "holder.log"), "wb")
        self.holder = subprocess.Popen([sys.executable, "-c", _HOLDER, self.address, str(self.segment_mb << 20)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        log.close()
        assert self.holder.stdout is not None
        deadline = time.monotonic() + timeout_s
        line = b""
        os.set_blocking(self.holder.stdout.fileno(), False)
        while time.monotonic() < deadline and self.holder.poll() is None and not line.endswith(b"\n"):
            line += self.holder.stdout.read() or b""
            time.sleep(0.05)
        if line.strip() != b"ready":
            raise RuntimeError(f"mooncake segment holder did not start ({line!r}): {self._tail('holder.log')}")

    def _tail(self, name: str) -> str:
        try:
            with open(os.path.join(self.workdir, name), encoding="utf-8", errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return "(no log)"

    def stop_holder(self) -> None:
        if self.holder is not None:
            with contextlib.suppress(OSError):
                if self.holder.stdin is not None:
                    self.holder.stdin.close()
            _end(self.holder)
            if self.holder.stdout is not None:
                self.holder.stdout.close()
            self.holder = None

    def stop_master(self) -> None:
        if self.master is not None:
            _end(self.master)
            self.master = None

    def close(self) -> None:
        self.stop_holder()
        self.stop_master()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MooncakeStoreProcesses:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _end(proc: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)

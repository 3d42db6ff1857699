"""Start and stop real redis-server processes on loopback for tests and benchmarks.

``RedisServer`` runs one server (no persistence) on a free 127.0.0.1 port in its own directory;
``stop()``/``start()`` keep the port, so a test can take the store away and bring it back.
``RedisCluster`` runs several cluster-enabled servers and joins them with ``redis-cli --cluster create``.
Every wait is bounded; a server that does not come up raises RuntimeError with its log tail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from types import TracebackType

import redis

REDIS_SERVER = shutil.which("redis-server") or "redis-server"
REDIS_CLI = shutil.which("redis-cli") or "redis-cli"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too, as cluster mode needs."""
    for _ in range(100):
        port = random.randrange(20000, 55000)
        if all(_is_free(p) for p in (port, port + 10000)):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """A private CA and, signed by it, a server certificate for 127.0.0.1 and a client certificate."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str

    @classmethod
    def make(cls, directory: str) -> TlsFiles:
        """Create the files with openssl (EC P-256 keys, valid 1 day) in ``directory``."""
        def path(name: str) -> str:
            return os.path.join(directory, name)

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

        openssl("req", "-x509", *_EC_KEY, "-nodes", "-days", "1", "-subj", "/CN=flexkv-test-ca",
                "-keyout", path("ca.key"), "-out", path("ca.crt"))
        exts = {"server": "subjectAltName=IP:127.0.0.1,DNS:localhost", "client": "extendedKeyUsage=clientAuth"}
        for name, ext in exts.items():
            openssl("req", *_EC_KEY, "-nodes", "-subj", f"/CN=flexkv-test-{name}",
                    "-keyout", path(f"{name}.key"), "-out", path(f"{name}.csr"))
            with open(path(f"{name}.ext"), "w") as f:
                f.write(ext + "\n")
            openssl("x509", "-req", "-in", path(f"{name}.csr"), "-CA", path("ca.crt"), "-CAkey", path("ca.key"),
                    "-CAcreateserial", "-days", "1", "-extfile", path(f"{name}.ext"), "-out", path(f"{name}.crt"))
        return cls(path("ca.crt"), path("server.crt"), path("server.key"), path("client.crt"), path("client.key"))


class RedisServer:
    """One redis-server child process on 127.0.0.1:``port`` with its files in ``workdir``.
    With ``tls`` it listens with TLS only on ``port`` and requires client certificates."""

    def __init__(self, workdir: str | None = None, port: int | None = None,
                 extra_args: tuple[str, ...] = (), password: str | None = None, tls: TlsFiles | None = None) -> None:
        self._own_dir = workdir is None
        self.password = password
        self.tls = tls
        self.workdir = workdir or tempfile.mkdtemp(prefix="flexkv-redis-")
        self.port = port or free_port()
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, f"redis-{self.port}.log")

    def start(self, timeout_s: float = 5.0) -> RedisServer:
        """Start the server (same port as before) and wait until it answers PING."""
        if self.proc is not None:
            return self
        ports = ["--port", str(self.port)]
        if self.tls is not None:
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls.server_cert,
                     "--tls-key-file", self.tls.server_key, "--tls-ca-cert-file", self.tls.ca,
                     "--tls-auth-clients", "yes"]
        args = [REDIS_SERVER, *ports, "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self.workdir, "--logfile", self.log_path, *self.extra_args]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(redis.RedisError), self.client() as client:
                if client.ping():
                    return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not start: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return "(no log)"

    def client(self, db: int = 0) -> redis.Redis:
        """A plain redis-py client for checking and tampering with the server's keys."""
        tls: dict[str, object] = {}
        if self.tls is not None:
            tls = {"ssl": True, "ssl_ca_certs": self.tls.ca, "ssl_certfile": self.tls.client_cert,
                   "ssl_keyfile": self.tls.client_key}
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, password=self.password, protocol=2,
                           socket_timeout=2, socket_connect_timeout=1, **tls)  # type: ignore[arg-type]

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL); its data is gone (no persistence)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)  # a paused server cannot handle SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open but nothing answers (a hung store)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class RedisCluster:
    """``num_nodes`` cluster-enabled redis-servers (primaries only) joined into one cluster."""

    def __init__(self, num_nodes: int = 3) -> None:
        self.workdir = tempfile.mkdtemp(prefix="flexkv-redis-cluster-")
        self.servers = [RedisServer(self.workdir, port=free_cluster_port(), extra_args=self._cluster_args(i))
                        for i in range(num_nodes)]

    def _cluster_args(self, index: int) -> tuple[str, ...]:
        # full coverage off: when a primary dies the others keep serving their slots (docs/remote.md)
        return ("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{index}.conf",
                "--cluster-node-timeout", "2000", "--cluster-require-full-coverage", "no")

    def node_id(self, index: int) -> str:
        with self.servers[index].client() as client:
            return str(client.execute_command("CLUSTER", "MYID").decode())

    def owner_of(self, slot: int) -> int:
        """Index of the server that serves ``slot`` (asked of a live node)."""
        live = next(s for s in self.servers if s.proc is not None)
        with live.client() as client:
            for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return self.ports.index(int(primary[1]))
        raise RuntimeError(f"slot {slot} unserved")

    def begin_migration(self, slot: int, src: int, dst: int, keys: list[bytes]) -> None:
        """Mark ``slot`` MIGRATING on ``src`` / IMPORTING on ``dst`` and move ``keys`` (of that slot)
        over: from now on ``src`` answers ASK for them (and for keys it does not hold)."""
        src_client, dst_client = self.servers[src].client(), self.servers[dst].client()
        with src_client, dst_client:
            dst_client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(src))
            src_client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(dst))
            if keys:
                src_client.execute_command("MIGRATE", "127.0.0.1", self.ports[dst], "", 0, 5000, "KEYS", *keys)

    def finish_migration(self, slot: int, src: int, dst: int) -> None:
        """Move the rest of ``slot``'s keys and assign it to ``dst`` everywhere: ``src`` answers MOVED."""
        with self.servers[src].client() as src_client:
            while keys := src_client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                src_client.execute_command("MIGRATE", "127.0.0.1", self.ports[dst], "", 0, 5000, "KEYS", *keys)
        owner = self.node_id(dst)
        for server in self.servers:
            if server.proc is not None:
                with server.client() as client:
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", owner)

    def kill(self, index: int) -> None:
        """SIGKILL one primary (no replicas: its slots' keys are gone until it returns)."""
        proc = self.servers[index].proc
        assert proc is not None
        proc.kill()
        proc.wait(5)
        self.servers[index].proc = None

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    def start(self, timeout_s: float = 30.0) -> RedisCluster:
        """Start every node, assign the slots and wait until every node reports cluster_state:ok.
        (``redis-cli --cluster create`` polls the join once a second; it once took over 10 s here.)"""
        try:
            for server in self.servers:
                server.start()
            addrs = [f"127.0.0.1:{p}" for p in self.ports]
            subprocess.run([REDIS_CLI, "--cluster", "create", *addrs, "--cluster-yes"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout_s)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if all(self._state_ok(s) for s in self.servers):
                    return self
                time.sleep(0.05)
            raise RuntimeError(f"redis cluster on ports {self.ports} did not become ready")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _state_ok(server: RedisServer) -> bool:
        with server.client() as client:
            return bool(client.execute_command("CLUSTER", "INFO").decode().count("cluster_state:ok"))

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

"""CurveZMQ for the client socket over TCP (DESIGN §7, trust; docs/security.md).

The server binds loopback by default; binding any other TCP address needs CurveZMQ: the server's
key pair, and a directory of the client public keys it accepts (a ZAP handler checks every
handshake; refusals are logged). Clients name the server's public key and their own key pair. Keys are
ZeroMQ certificate files (``NAME.key`` public, ``NAME.key_secret`` secret, mode 0600), made by
``python -m flexkv.security keygen DIR [--name NAME]``.

Environment (documented in docs/config.md):

* server: ``FLEXKV_CURVE_SERVER_SECRET`` (its ``.key_secret`` file), ``FLEXKV_CURVE_AUTHORIZED_KEYS``
  (directory of accepted clients' ``.key`` files; re-read when it changes);
* client: ``FLEXKV_CURVE_SERVER_KEY`` (the server's ``.key`` file), ``FLEXKV_CURVE_CLIENT_SECRET`` (its
  own ``.key_secret`` file).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from flexkv.types import ConfigError

log = logging.getLogger("flexkv.security")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks for handshake decisions
ZAP_DOMAIN = b"flexkv"
_ENV_SERVER_SECRET = "FLEXKV_CURVE_SERVER_SECRET"
_ENV_AUTHORIZED = "FLEXKV_CURVE_AUTHORIZED_KEYS"
_ENV_SERVER_KEY = "FLEXKV_CURVE_SERVER_KEY"
_ENV_CLIENT_SECRET = "FLEXKV_CURVE_CLIENT_SECRET"


# -- keys -------------------------------------------------------------------------------------------
def keygen(directory: str | os.PathLike[str], name: str = "server") -> tuple[Path, Path]:
    """Write a new CURVE key pair ``DIR/NAME.key`` (public, 0644) and ``DIR/NAME.key_secret`` (0600,
    created exclusively: an existing key is never overwritten). Returns (public file, secret file)."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"keygen: bad key name {name!r}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    pub_path, sec_path = d / f"{name}.key", d / f"{name}.key_secret"
    for path, keys, mode in ((sec_path, (public, secret), 0o600), (pub_path, (public, None), 0o644)):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            raise ConfigError(f"keygen: {path} exists; remove it first or pick another --name") from None
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(_cert_text(*keys))
    return pub_path, sec_path


def _cert_text(public: bytes, secret: bytes | None) -> str:
    """ZeroMQ's certificate format (ZPL), as ``zmq.auth.load_certificate`` reads it."""
    lines = ["#   flexkv CURVE certificate", "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """The Z85 public key of a ``.key`` (or ``.key_secret``) file; ConfigError naming the file."""
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read CURVE key {path}: {e}") from None
    return public


def load_key_pair(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file; ConfigError if it holds no secret key."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read CURVE key {path}: {e}") from None
    if not secret:
        raise ConfigError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret


# -- addresses --------------------------------------------------------------------------------------
def is_loopback(address: str) -> bool:
    """True for ipc/inproc and TCP on a loopback host (127.0.0.0/8, ::1, localhost)."""
    if not address.startswith("tcp://"):
        return True
    host = address.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name, a host name: not provably loopback
        return False


# -- server -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CurveServerKeys:
    public: bytes
    secret: bytes
    authorized_dir: Path

    @classmethod
    def from_env(cls) -> CurveServerKeys | None:
        """From FLEXKV_CURVE_SERVER_SECRET and FLEXKV_CURVE_AUTHORIZED_KEYS; None if neither is set."""
        secret_file, authorized = os.environ.get(_ENV_SERVER_SECRET), os.environ.get(_ENV_AUTHORIZED)
        if not secret_file and not authorized:
            return None
        if not secret_file or not authorized:
            raise ConfigError(f"CurveZMQ needs both {_ENV_SERVER_SECRET} and {_ENV_AUTHORIZED}")
        if not os.path.isdir(authorized):
            raise ConfigError(f"{_ENV_AUTHORIZED}: {authorized!r} is not a directory")
        public, secret = load_key_pair(secret_file)
        return cls(public, secret, Path(authorized))


def check_bind(address: str, keys: CurveServerKeys | None) -> None:
    """Binding a non-loopback TCP address requires CurveZMQ keys; ConfigError naming what to set."""
    if keys is None and not is_loopback(address):
        raise ConfigError(f"{address} is not a loopback address: binding it needs CurveZMQ (set {_ENV_SERVER_SECRET} "
                          f"and {_ENV_AUTHORIZED}; keys from `python -m flexkv.security keygen DIR`; "
                          "see docs/security.md)")


def make_curve_server(sock: zmq.Socket[Any], keys: CurveServerKeys) -> None:
    """Make ``sock`` (before its bind) a CURVE server whose handshakes the ZAP handler decides."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN


class CurveAuthenticator:
    """A ZAP handler thread in the server's context: accepts CURVE clients whose public key is in the
    authorized directory, refuses and logs the rest; also logs handshakes that failed before ZAP (a
    plain client, or one with the wrong server key). Touches no server state. ``start`` before binding."""

    _MONITOR = "inproc://flexkv-curve-monitor"
    _EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
               | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

    def __init__(self, ctx: zmq.Context[Any], keys: CurveServerKeys) -> None:
        self._ctx = ctx
        self._dir = keys.authorized_dir
        self._stamp: float = -1.0
        self._allowed: set[bytes] = set()
        self._stop = threading.Event()
        self._zap: zmq.Socket[bytes] = ctx.socket(zmq.REP)
        self._zap.linger = 0
        self._zap.bind(ZAP_ENDPOINT)
        self._monitored: zmq.Socket[Any] | None = None
        self._thread = threading.Thread(target=self._run, name="flexkv-zap", daemon=True)
        self.num_refused = 0
        self._reload()
        log.info("CurveZMQ on: %d authorized client key(s) in %s", len(self._allowed), self._dir)

    def watch(self, sock: zmq.Socket[Any]) -> None:
        """Log failed handshakes on ``sock`` too (call before ``start``)."""
        sock.monitor(self._MONITOR, self._EVENTS)
        self._monitored = sock

    def start(self) -> None:
        self._thread.start()

    def _reload(self) -> None:
        try:
            stamp = self._dir.stat().st_mtime
        except OSError as e:
            log.error("CurveZMQ: cannot read %s: %s; refusing every client", self._dir, e)
            self._allowed = set()
            return
        if stamp == self._stamp:
            return
        allowed = set()
        for path in sorted(self._dir.glob("*.key")):
            try:
                allowed.add(load_public_key(path))
            except ConfigError as e:
                log.warning("CurveZMQ: %s", e)
        self._stamp, self._allowed = stamp, allowed

    def _run(self) -> None:
        monitor: zmq.Socket[Any] | None = None
        if self._monitored is not None:
            monitor = self._ctx.socket(zmq.PAIR)
            monitor.linger = 0
            monitor.connect(self._MONITOR)
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(100))
                if self._zap in events:
                    self._answer(self._zap.recv_multipart())
                if monitor is not None and monitor in events:
                    self._log_failed_handshake(recv_monitor_message(monitor))
        finally:
            self._zap.close(linger=0)
            if monitor is not None:
                monitor.close(linger=0)

    def _answer(self, req: list[bytes]) -> None:
        """ZAP 1.0: version, request id, domain, address, identity, mechanism, credentials."""
        if len(req) < 6:
            return
        version, request_id, _, address, _, mechanism, *creds = req
        ok, text = False, "CURVE required"
        if mechanism == b"CURVE" and creds:
            self._reload()
            key = z85.encode(creds[0])
            ok = key in self._allowed
            text = "OK" if ok else "client key not authorized"
        if not ok:
            self.num_refused += 1
            log.warning("refused a %s client from %s: %s", mechanism.decode(errors="replace"),
                        address.decode(errors="replace"), text)
        self._zap.send_multipart([version, request_id, b"200" if ok else b"400", text.encode(), b"", b""])

    def _log_failed_handshake(self, event: Mapping[str, Any]) -> None:
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return  # logged by _answer with the peer's address
        self.num_refused += 1
        log.warning("refused a client on %s: handshake failed (%s; a client without CurveZMQ or with the wrong "
                    "server key)", event.get("endpoint", b"?").decode(errors="replace"),
                    zmq.Event(event["event"]).name)

    def close(self) -> None:
        """Stop the thread (before the context is destroyed)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        elif not self._zap.closed:
            self._zap.close(linger=0)
        if self._monitored is not None and not self._monitored.closed:
            self._monitored.disable_monitor()


# -- client -----------------------------------------------------------------------------------------
def configure_client(sock: zmq.Socket[Any], address: str) -> bool:
    """Before ``connect``: make ``sock`` a CURVE client of ``address`` when FLEXKV_CURVE_SERVER_KEY is
    set (its own key pair from FLEXKV_CURVE_CLIENT_SECRET). Only TCP; returns whether CURVE is on."""
    server_key = os.environ.get(_ENV_SERVER_KEY)
    if not address.startswith("tcp://") or not server_key:
        return False
    client_secret = os.environ.get(_ENV_CLIENT_SECRET)
    if not client_secret:
        raise ConfigError(f"{_ENV_SERVER_KEY} is set: {_ENV_CLIENT_SECRET} must name this client's .key_secret file")
    public, secret = load_key_pair(client_secret)
    sock.curve_serverkey = load_public_key(server_key)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flexkv.security", description="flexkv CurveZMQ keys")
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("keygen", help="write DIR/NAME.key (public) and DIR/NAME.key_secret (0600)")
    k.add_argument("dir")
    k.add_argument("--name", default="server", help="key name (default: server; one per client, e.g. its host)")
    args = p.parse_args(argv)
    try:
        pub, sec = keygen(args.dir, args.name)
    except ConfigError as e:
        print(f"flexkv keygen: {e}", file=sys.stderr)
        return 2
    print(f"public key: {pub}\nsecret key: {sec}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

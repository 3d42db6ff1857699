"""The engine side of the client socket: a DEALER with request ids, timeouts and typed errors."""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy.typing as npt
import zmq

from flexkv import security
from flexkv.protocol import client_msgs as cm
from flexkv.protocol.codec import CLIENT_REQUESTS, SERVER_REPLIES
from flexkv.types import CapacityError, ConfigError, FlexKVError, InvalidRequest

_ERRORS: dict[str, type[FlexKVError]] = {
    "InvalidRequest": InvalidRequest,
    "ProtocolError": InvalidRequest,
    "CapacityError": CapacityError,
    "ConfigError": ConfigError,
}


class ServerUnavailable(FlexKVError):
    """The server did not answer in time (not started, crashed, or wrong address)."""


class ServerConnection:
    """One DEALER connection to the server, one session on it. Thread-safe: one request at a time.

    ``hello`` opens the session; every later message is sent with its ``session_id`` (whatever the
    caller put there), ``close`` ends it (``ByeMsg``) and the server drops what the session owned.

    ``busy_poll_us``: a request polls for its reply this long without sleeping before it blocks
    (saves the wake-up of a reply that comes soon; the config key of the same name)."""

    def __init__(self, address: str, client_id: int, role: str, timeout_s: float = 30.0,
                 busy_poll_us: int = 0) -> None:
        self.address, self.client_id, self.role, self.timeout_s = address, client_id, role, timeout_s
        self._spin_ns = busy_poll_us * 1000
        self._ctx = zmq.Context()
        self._sock: zmq.Socket[bytes] = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 2000)
        security.configure_client(self._sock, address)  # CurveZMQ over TCP when keys are configured
        self._sock.connect(address)
        self._req_ids = itertools.count(1)
        self._lock = threading.Lock()
        self.server_info: dict[str, Any] = {}
        self.session_id = 0  # 0: no session yet (the server never gives 0)

    def hello(self, timeout_s: float) -> dict[str, Any]:
        """Open a session; returns the server's info (session_id, tokens_per_block, pool name, ...)."""
        reply, _ = self.request(lambda rid: cm.HelloMsg(client_id=self.client_id, req_id=rid, pid=os.getpid(),
                                                        host=socket.gethostname(), role=self.role),
                                timeout_s=timeout_s)
        assert isinstance(reply, cm.OkReplyMsg)
        self.server_info = dict(reply.info)
        self.session_id = int(self.server_info["session_id"])
        return self.server_info

    def _encode(self, msg: msgspec.Struct, arrays: Sequence[npt.NDArray[Any] | bytes]) -> list[Any]:
        if isinstance(msg, cm.ClientMsg) and not isinstance(msg, cm.HelloMsg):
            msg = msgspec.structs.replace(msg, session_id=self.session_id)
        return CLIENT_REQUESTS.encode(msg, arrays)

    def send(self, msg: msgspec.Struct, arrays: Sequence[npt.NDArray[Any] | bytes] = ()) -> None:
        """Fire and forget."""
        with self._lock:
            self._send_within(self._encode(msg, arrays), self.timeout_s)

    def request(self, make_msg: Any, arrays: Sequence[npt.NDArray[Any] | bytes] = (),
                timeout_s: float | None = None) -> tuple[cm.ServerReply, list[memoryview]]:
        """Send ``make_msg(req_id)`` and wait for its reply; raises the error the server named."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        with self._lock:
            req_id = next(self._req_ids)
            self._send_within(self._encode(make_msg(req_id), arrays), timeout)
            deadline = time.monotonic() + timeout
            spin_until = time.monotonic_ns() + self._spin_ns
            while True:
                if not self._poll_reply(deadline, spin_until):
                    raise ServerUnavailable(f"server at {self.address} did not answer within {timeout:.1f} s")
                reply, frames = SERVER_REPLIES.decode(self._sock.recv_multipart(copy=False))
                if reply.req_id == req_id:
                    break
                if isinstance(reply, cm.ErrorReplyMsg) and reply.req_id < 0:
                    raise InvalidRequest(f"server rejected a message: {reply.error}")
        if isinstance(reply, cm.ErrorReplyMsg):
            raise _ERRORS.get(reply.kind, FlexKVError)(reply.error)
        return reply, frames

    def _poll_reply(self, deadline: float, spin_until: int) -> bool:
        """Whether a reply arrived before ``deadline``: polled without sleeping until ``spin_until``
        (monotonic ns), then blocking."""
        while time.monotonic_ns() < spin_until:
            if self._sock.poll(0):
                return True
        return bool(self._sock.poll(int(max(0.0, deadline - time.monotonic()) * 1000)))

    def _send_within(self, frames: list[Any], timeout_s: float) -> None:
        """A DEALER with no connection (e.g. its CurveZMQ handshake was refused) blocks on send: bound it."""
        if not self._sock.poll(int(timeout_s * 1000), zmq.POLLOUT):
            raise ServerUnavailable(f"no connection to the server at {self.address} within {timeout_s:.1f} s "
                                    "(not running, or it refused this client's CurveZMQ key)")
        self._sock.send_multipart(frames, copy=False)

    def bye(self, timeout_s: float = 2.0) -> None:
        """End the session (the server drops what it owned). A server that is gone is not an error."""
        if not self.session_id:
            return
        try:
            self.request(lambda rid: cm.ByeMsg(client_id=self.client_id, req_id=rid), timeout_s=timeout_s)
        except FlexKVError:
            pass  # gone, or it already dropped the session
        self.session_id = 0

    def close(self, bye: bool = True) -> None:
        """``bye``: end the session first (skip it when the server is known to be stopping)."""
        if bye and not self._sock.closed:
            self.bye()
        self._ctx.destroy(linger=0)

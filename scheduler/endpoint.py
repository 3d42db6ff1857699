"""The server's listening sockets: one server per address, and who may bind where.

* ``ipc://`` paths are claimed with an exclusive ``flock`` on ``<path>.lock`` before the bind, so a
  second server on the same path fails at start with one clear line instead of taking the socket
  over (ZeroMQ would unlink the first server's socket file). The kernel drops the lock when the
  process dies, so a crashed server's leftover socket file never blocks a new start.
* ``tcp://`` binds report EADDRINUSE (and any other bind error) as one ConfigError line.
"""

from __future__ import annotations

import errno
import fcntl
import os

import zmq

from flexkv.types import ConfigError


class AddressInUse(ConfigError):
    """Another process (a flexkv server) already serves this address."""


class IpcClaim:
    """An exclusive claim on one ipc socket path (``<path>.lock``, flock'ed), held until ``release``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock_path = f"{path}.lock"
        self._fd = -1
        while True:  # the lock file may be replaced between open and flock by a stopping server
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise AddressInUse(f"ipc://{path} is already served by another flexkv server (it holds "
                                   f"{self.lock_path}); stop it or choose another address") from None
            try:
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                os.write(fd, f"{os.getpid()}\n".encode())
                return
            os.close(fd)

    def release(self) -> None:
        """Remove the socket file and the lock file, then drop the lock. Idempotent."""
        if self._fd < 0:
            return
        for p in (self.path, self.lock_path):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        os.close(self._fd)
        self._fd = -1


def bind(sock: zmq.Socket[bytes], address: str) -> IpcClaim | None:
    """Bind ``sock`` to ``address``, claiming ipc paths first. Returns the claim (release it after the
    socket is closed) or None for other transports. Raises AddressInUse / ConfigError in one line."""
    claim = IpcClaim(address.removeprefix("ipc://")) if address.startswith("ipc://") else None
    try:
        sock.bind(address)
    except zmq.ZMQError as e:
        if claim is not None:
            claim.release()
        if e.errno == errno.EADDRINUSE:
            raise AddressInUse(f"{address} is already in use (another flexkv server or another program); "
                               "stop it or choose another address") from None
        raise ConfigError(f"cannot bind {address}: {e.strerror}") from None
    return claim

"""Minimal RESP2 I/O on a connected socket: block values go straight between the socket and the pool.

redis-py (with hiredis) packs a value by copying it and parses a bulk reply through two more
buffers. For multi-MiB KV blocks those copies cost as much as the transfer, so the data path
writes commands as scatter lists (header, pool memoryview, trailer) and reads a bulk reply's
payload with ``recv_into`` directly into the destination pool slot. Connection set-up (AUTH,
SELECT, TLS) stays with redis-py.
"""

from __future__ import annotations

import socket

CRLF = b"\r\n"
_BUF_BYTES = 64 * 1024


class RespError(Exception):
    """An error reply (``-ERR ...``) to one command; the connection stays usable."""


class ProtocolError(Exception):
    """The byte stream is not the RESP2 reply expected; the connection must be dropped."""


def pack_command(*args: bytes) -> bytes:
    """A RESP2 array of bulk strings for small arguments."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


def pack_set_header(key: bytes, value_bytes: int, ttl_s: int) -> tuple[bytes, bytes]:
    """(prefix, suffix) around a SET's value of ``value_bytes``: send prefix, the value, then suffix."""
    argc = 5 if ttl_s > 0 else 3
    prefix = b"*%d\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (argc, len(key), key, value_bytes)
    suffix = CRLF + (b"$2\r\nEX\r\n$%d\r\n%d\r\n" % (len(b"%d" % ttl_s), ttl_s) if ttl_s > 0 else b"")
    return prefix, suffix


class RespSocket:
    """Buffered reader/writer over one connected (possibly TLS) socket, used by one thread.

    Socket errors and timeouts propagate as ``OSError`` (``TimeoutError`` included); after any of
    them, or a ``ProtocolError``, the connection is in an unknown state and must be dropped.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray(_BUF_BYTES)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    @property
    def num_buffered(self) -> int:
        return self._end - self._start

    def send(self, *parts: bytes | memoryview) -> None:
        for part in parts:
            self._sock.sendall(part)

    def _fill(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):  # compact: a line never spans the whole buffer
            if self._start == 0:
                raise ProtocolError(f"reply line longer than {len(self._buf)} bytes")
            num = self._end - self._start
            self._buf[:num] = self._buf[self._start:self._end]
            self._start, self._end = 0, num
        got = self._sock.recv_into(self._view[self._end:])
        if got == 0:
            raise ConnectionResetError("server closed the connection")
        self._end += got

    def read_line(self) -> bytes:
        """The next reply line without its CRLF."""
        while True:
            pos = self._buf.find(CRLF, self._start, self._end)
            if pos >= 0:
                line = bytes(self._buf[self._start:pos])
                self._start = pos + 2
                return line
            self._fill()

    def read_into(self, dst: memoryview) -> None:
        """Fill ``dst`` exactly: buffered bytes first, the rest straight from the socket."""
        take = min(self.num_buffered, dst.nbytes)
        dst[:take] = self._view[self._start:self._start + take]
        self._start += take
        pos = take
        while pos < dst.nbytes:
            got = self._sock.recv_into(dst[pos:])
            if got == 0:
                raise ConnectionResetError("server closed the connection")
            pos += got

    def skip(self, num_bytes: int) -> None:
        """Discard the next ``num_bytes`` bytes of the stream."""
        while num_bytes > 0:
            if self.num_buffered == 0:
                self._fill()
            take = min(self.num_buffered, num_bytes)
            self._start += take
            num_bytes -= take

    def read_simple(self) -> bytes | int:
        """A status (``+OK`` -> b"OK") or integer reply; an error reply raises RespError."""
        line = self.read_line()
        kind, body = line[:1], line[1:]
        if kind == b"+":
            return body
        if kind == b":":
            return _parse_int(body)
        if kind == b"-":
            raise RespError(body.decode("utf-8", "replace"))
        raise ProtocolError(f"expected a status or integer reply, got {line[:40]!r}")

    def read_bulk_header(self) -> int:
        """Length of the bulk string that follows (-1 for nil); an error reply raises RespError."""
        line = self.read_line()
        kind, body = line[:1], line[1:]
        if kind == b"$":
            return _parse_int(body)
        if kind == b"-":
            raise RespError(body.decode("utf-8", "replace"))
        raise ProtocolError(f"expected a bulk reply, got {line[:40]!r}")


def _parse_int(body: bytes) -> int:
    try:
        return int(body)
    except ValueError:
        raise ProtocolError(f"bad integer in reply: {body[:40]!r}") from None

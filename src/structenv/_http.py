"""A lean HTTP/1.1 server on raw non-blocking sockets (the sandbox server's transport).

The sandbox protocol has a dozen routes, JSON or raw-byte bodies of known length and one
streamed (chunked) NDJSON answer. A general HTTP stack (h11 over anyio streams) cost about half
a millisecond per request here, more than the command it carried, so this module speaks the
subset the protocol needs by hand, strictly:

- requests: ``METHOD SP target SP HTTP/1.x``, headers without obsolete line folding, a body
  only by ``content-length`` (a chunked request is refused with 413, a second differing
  ``content-length`` with 400); ``expect: 100-continue`` is answered; HTTP/1.0 and
  ``connection: close`` end the connection after the answer;
- answers: ``content-length`` bodies, or ``transfer-encoding: chunked`` for streams;
- keep-alive, with requests pipelined by a client answered in order.

Each connection has two tasks: a reader, always waiting for bytes (so it notices at once when
the client goes away), and the request loop running the handler. A client that closes its
connection before its answer has cancelled its request: the handler's work is cancelled (the
sandbox server then kills the command's process tree).

Sockets are used directly with ``anyio.wait_readable``/``wait_writable``, which works the same
on asyncio and trio; closing one first calls ``anyio.notify_closing`` so no waiter is left on a
dead descriptor.
"""

from __future__ import annotations

import errno
import functools
import hmac
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

import anyio

__all__ = ["HTTPError", "Listener", "Request", "Responder", "open_listener"]

logger = logging.getLogger("structenv.http")

_MAX_HEAD = 64 * 1024
_RECEIVE = 1 << 16
_STREAM_ERRORS = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)
_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_TOKEN_CHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)


class HTTPError(Exception):
    """An error answer: status, a short machine-readable kind and a message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


class Request:
    """A fully received request."""

    __slots__ = ("body", "headers", "method", "path", "query")

    def __init__(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: bytes
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body

    def json(self) -> dict[str, Any]:
        """The body as a JSON object (``HTTPError(400)`` otherwise)."""
        try:
            value = json.loads(self.body or b"{}")
        except ValueError as exc:
            raise HTTPError(400, "bad_request", f"invalid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise HTTPError(400, "bad_request", "body must be a JSON object")
        return value


class _Head:
    """A parsed request head."""

    __slots__ = ("close", "continue_", "headers", "length", "method", "target")

    def __init__(self, method: str, target: str, headers: dict[str, str], close: bool) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.close = close
        self.continue_ = headers.get("expect", "").lower() == "100-continue"
        self.length = 0


def parse_head(data: bytes) -> _Head:
    """Parse a request head (request line and header lines, without the blank line).

    Raises:
        HTTPError: 400 for anything malformed, 505 for an HTTP version other than 1.x.
    """
    lines = data.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not set(parts[0]) <= _TOKEN_CHARS or not parts[1]:
        raise HTTPError(400, "bad_request", "malformed request line")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version.startswith(b"HTTP/"):
            raise HTTPError(505, "bad_request", "only HTTP/1.x is spoken here")
        raise HTTPError(400, "bad_request", "malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or not set(name) <= _TOKEN_CHARS:
            raise HTTPError(400, "bad_request", "malformed header line")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key == "content-length" and headers[key] != text:
                raise HTTPError(400, "bad_request", "conflicting content-length headers")
            if key != "content-length":
                headers[key] = f"{headers[key]}, {text}"
            continue
        headers[key] = text
    tokens = {t.strip() for t in headers.get("connection", "").lower().split(",")}
    close = "close" in tokens or (version == b"HTTP/1.0" and "keep-alive" not in tokens)
    return _Head(method.decode("ascii"), target.decode("latin-1"), headers, close)


class Connection:
    """One client connection: its socket, a receive buffer and the reader task's state."""

    __slots__ = ("_arrived", "_drained", "buf", "eof", "limit", "sock", "watching")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False
        #: The reader stops reading while the buffer holds this much (bounds what a
        #: pipelining client can make the server hold).
        self.limit = _MAX_HEAD
        self.watching: anyio.CancelScope | None = None
        self._arrived = anyio.Event()
        self._drained = anyio.Event()

    async def read_loop(self) -> None:
        """Read until end of file; on EOF cancel the request being watched."""
        sock = self.sock
        while True:
            if len(self.buf) >= self.limit:
                self._drained = anyio.Event()
                await self._drained.wait()
                continue
            try:
                data = sock.recv(_RECEIVE)
            except BlockingIOError:
                await anyio.wait_readable(sock)
                continue
            except OSError:
                data = b""
            if not data:
                self.eof = True
                if self.watching is not None:
                    self.watching.cancel()
                self._arrived.set()
                return
            self.buf += data
            self._arrived.set()

    async def wait_data(self) -> None:
        """Wait until the reader added bytes to the buffer or saw end of file."""
        self._arrived = anyio.Event()
        if len(self.buf) >= self.limit:
            self._drained.set()
        await self._arrived.wait()

    def consume(self, n: int) -> bytes:
        data = bytes(self.buf[:n])
        del self.buf[:n]
        self._drained.set()
        return data

    async def linger(self) -> None:
        """Half-close, then discard what the client still sends (bounded) before closing.

        Closing a socket with unread bytes makes the kernel send a reset, which can destroy
        the error answer just written before the client reads it.
        """
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        with anyio.move_on_after(1):
            while not self.eof:
                self.consume(len(self.buf))
                await self.wait_data()

    async def send(self, data: bytes) -> None:
        """Write everything (a non-blocking try first: small answers never wait)."""
        view = memoryview(data)
        sock = self.sock
        while view:
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                await anyio.wait_writable(sock)


class Responder:
    """Writes the answer to one request; knows when the client went away."""

    __slots__ = ("_c", "_close", "disconnected", "started")

    def __init__(self, connection: Connection, close: bool) -> None:
        self._c = connection
        self._close = close
        self.started = False
        self.disconnected = False

    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
        lines += [f"{k}: {v}" for k, v in headers]
        if self._close:
            lines.append("connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        *,
        close: bool = False,
    ) -> None:
        """Send a complete answer (``close``: tell the client the connection ends here).

        Cancellation: the answer may be partly written; the connection is then dropped.
        """
        self.started = True
        self._close = self._close or close
        head = self._head(
            status, [("content-type", content_type), ("content-length", str(len(body)))]
        )
        await self._c.send(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            await self._c.send(body)

    async def send_json(self, status: int, value: Any) -> None:
        """Send ``value`` as a JSON answer.

        Cancellation: as :meth:`send`.
        """
        await self.send(status, json.dumps(value, separators=(",", ":")).encode())

    async def start_stream(self, content_type: str = "application/x-ndjson") -> None:
        """Start a chunked answer; follow with :meth:`send_chunk` and :meth:`end_stream`.

        Cancellation: as :meth:`send`.
        """
        self.started = True
        await self._c.send(
            self._head(200, [("content-type", content_type), ("transfer-encoding", "chunked")])
        )

    async def send_chunk(self, data: bytes) -> None:
        """Send one chunk of a streamed answer (an empty one sends nothing).

        Cancellation: as :meth:`send`.
        """
        if data:
            await self._c.send(b"%x\r\n%b\r\n" % (len(data), data))

    async def end_stream(self) -> None:
        """Finish a streamed answer.

        Cancellation: as :meth:`send`.
        """
        await self._c.send(b"0\r\n\r\n")

    async def run_watched(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` and cancel it if the client disconnects meanwhile.

        A client that closes its connection before the answer is a client that cancelled its
        request: the work's own cancellation handling (kill the command's process tree) runs.

        Cancellation: ``work`` is cancelled with the caller (outer cancellation propagates).
        """
        c = self._c
        with anyio.CancelScope() as scope:
            c.watching = scope
            try:
                if c.eof:
                    scope.cancel()
                await work()
            finally:
                c.watching = None
        if scope.cancelled_caught:
            self.disconnected = True


Handler = Callable[[Request, Responder], Awaitable[None]]


async def serve_connection(
    sock: socket.socket, handler: Handler, *, max_body: int, token: str | None
) -> None:
    """Serve keep-alive requests on one accepted (non-blocking) socket until it closes.

    Cancellation: the connection is closed; a request in progress is cancelled with it.
    """
    connection = Connection(sock)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(connection.read_loop)
            try:
                await _serve_requests(connection, handler, max_body=max_body, token=token)
            except _STREAM_ERRORS:
                pass  # the peer went away: drop the connection
            tg.cancel_scope.cancel()
    finally:
        anyio.notify_closing(sock)
        sock.close()


async def _read_head(connection: Connection) -> _Head | None:
    """The next request head, or ``None`` at a clean end of file between requests."""
    start = 0
    while True:
        end = connection.buf.find(b"\r\n\r\n", start)
        if end >= 0:
            if end > _MAX_HEAD:
                raise HTTPError(431, "bad_request", "request head too large")
            raw = connection.consume(end + 4)
            # Tolerate empty lines before a request line (RFC 9112 section 2.2).
            return parse_head(raw[:-4].lstrip(b"\r\n"))
        if len(connection.buf) >= _MAX_HEAD:
            raise HTTPError(431, "bad_request", "request head too large")
        if connection.eof:
            if connection.buf.strip():
                raise anyio.EndOfStream  # a truncated request: nobody to answer
            return None
        start = max(0, len(connection.buf) - 3)
        await connection.wait_data()


async def _serve_requests(
    connection: Connection, handler: Handler, *, max_body: int, token: str | None
) -> None:
    expected = f"Bearer {token}".encode() if token else None
    while True:
        try:
            head = await _read_head(connection)
        except HTTPError as exc:
            await _refuse(Responder(connection, True), exc.status, exc.kind, exc.message)
            return
        if head is None:
            return
        respond = Responder(connection, head.close)
        headers = head.headers
        if expected is not None and not hmac.compare_digest(
            headers.get("authorization", "").encode("latin-1"), expected
        ):
            await _refuse(respond, 401, "unauthorized", "missing or wrong bearer token")
            return
        if "transfer-encoding" in headers:
            await _refuse(respond, 413, "too_large", "chunked request bodies are not accepted")
            return
        length = headers.get("content-length", "0")
        if not length.isdigit() or not length.isascii():
            await _refuse(respond, 400, "bad_request", "invalid content-length")
            return
        size = int(length)
        if size > max_body:
            await _refuse(respond, 413, "too_large", f"request body over {max_body} bytes")
            return
        if size and head.continue_ and len(connection.buf) < size:
            await connection.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        connection.limit = max(_MAX_HEAD, size + _MAX_HEAD)
        while len(connection.buf) < size:
            if connection.eof:
                return  # the body was cut short: the client is gone
            await connection.wait_data()
        body = connection.consume(size)
        connection.limit = _MAX_HEAD
        path, _, query = head.target.partition("?")
        request = Request(head.method, path, dict(parse_qsl(query)) if query else {}, headers, body)
        try:
            await handler(request, respond)
        except HTTPError as exc:
            if respond.started:
                return
            await respond.send_json(exc.status, {"error": exc.kind, "message": exc.message})
        if respond.disconnected or head.close:
            return


async def _refuse(respond: Responder, status: int, kind: str, message: str) -> None:
    # The rest of the request was not read, so the connection cannot be reused.
    body = json.dumps({"error": kind, "message": message}).encode()
    await respond.send(status, body, close=True)
    await respond._c.linger()


class Listener:
    """A listening socket (unix, mode 0600, or TCP) and the accept loop serving it."""

    def __init__(self, sock: socket.socket, *, path: str | None = None) -> None:
        self.sock = sock
        self.path = path
        self.port = 0 if path else int(sock.getsockname()[1])

    async def serve(self, handler: Handler, *, max_body: int, token: str | None) -> None:
        """Accept connections and serve each in its own task until cancelled.

        Cancellation: the listening socket stays open (:meth:`aclose` closes it); every
        connection is closed and its request in progress cancelled.
        """
        sock = self.sock
        tcp = self.path is None
        serve = functools.partial(serve_connection, handler=handler, max_body=max_body, token=token)
        async with anyio.create_task_group() as tg:
            while True:
                try:
                    client, _ = sock.accept()
                except BlockingIOError:
                    await anyio.wait_readable(sock)
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        raise
                    # Out of descriptors: connections in the backlog wait; the clients' own
                    # deadlines bound that.
                    logger.warning("accept failed: %s", exc)
                    await anyio.sleep(0.05)
                    continue
                client.setblocking(False)
                if tcp:
                    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tg.start_soon(serve, client)

    async def __aenter__(self) -> Listener:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the listening socket (and remove a unix socket's path). Idempotent.

        Cancellation: not affected (nothing awaits).
        """
        if self.sock.fileno() >= 0:
            anyio.notify_closing(self.sock)
            self.sock.close()
            if self.path:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass


def open_listener(
    *, path: str | None = None, host: str = "127.0.0.1", port: int = 0, backlog: int = 1024
) -> Listener:
    """Listen on a unix socket ``path`` (mode 0600, a stale socket file replaced) or on TCP."""
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)  # before listen(): nobody can connect in between
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
    else:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
    sock.setblocking(False)
    return Listener(sock, path=path)

"""A lean HTTP/1.1 server on raw non-blocking sockets (the sandbox server's transport).

The sandbox protocol has a dozen routes, JSON or raw-byte bodies of known length and one
streamed (chunked) NDJSON answer. A general HTTP stack (h11 over anyio streams) cost about half
a millisecond per request here, more than the command it carried, so this module speaks the
subset the protocol needs by hand, strictly:

- requests: ``METHOD SP target SP HTTP/1.x``, every line ending in CRLF (a bare CR or LF is
  refused with 400, not read as a line end: a request-smuggling precondition), header names
  that are RFC 9110 tokens, header values of visible characters, SP and HTAB only (no NUL or
  other control character), no obsolete line folding, a body only by ``content-length`` (a
  chunked request is refused with 413, a second differing ``content-length`` with 400);
  ``expect: 100-continue`` is answered; HTTP/1.0 and ``connection: close`` end the connection
  after the answer;
- answers: ``content-length`` bodies, or ``transfer-encoding: chunked`` for streams;
- keep-alive, with requests pipelined by a client answered in order.

httptools (llhttp) installs here and parses a head faster, but using it means one parser for
server and client alike, and the client's response parsing (``sandbox/_client.py``) is outside
this module, so the hand-written parser stays, made strict.

The server may listen on TCP reachable by untrusted parties, so what a client that has not
shown the bearer token can hold is bounded (:class:`ConnectionLimits`): a request head must be
complete within ``head_timeout`` of the connection's accept (or of its first byte after an
earlier request); a keep-alive connection idle for ``idle_timeout`` is closed; at most
``max_unauthenticated`` connections may be waiting to present a valid token (a new one pushes
the oldest out, so a client with the token always gets in) and ``max_connections`` in all. Out
of file descriptors, the accept loop sheds the oldest unauthenticated connection, or else backs
off, rather than fail or spin.

Each connection has two tasks: a reader, always waiting for bytes (so it notices at once when
the client goes away), and the request loop running the handler. A client that closes its
connection before its answer has cancelled its request: the handler's work is cancelled (the
sandbox server then kills the command's process tree).

Sockets are used directly with ``anyio.wait_readable``/``wait_writable``, which works the same
on asyncio and trio; closing one first calls ``anyio.notify_closing`` so no waiter is left on a
dead descriptor.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hmac
import json
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

import anyio
import anyio.lowlevel

__all__ = [
    "ConnectionLimits",
    "HTTPError",
    "Listener",
    "ListenerStatistics",
    "Request",
    "Responder",
    "open_listener",
]

logger = logging.getLogger("structenv.http")

_MAX_HEAD = 64 * 1024
_RECEIVE = 1 << 16
#: How long an error answer may take to leave, and the client's unread bytes to be discarded.
_LINGER = 1.0
#: Pause before accepting again when out of descriptors and nothing can be shed.
_ACCEPT_BACKOFF = 0.1
_STREAM_ERRORS = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)
_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
#: ``method SP request-target SP HTTP-version``; the target is visible ASCII (RFC 9112 3.2).
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([!-~]+) (HTTP/[0-9]\.[0-9])")
_FIELD_NAME = re.compile(_TOKEN)
#: field-value (RFC 9110 5.5): VCHAR, obs-text, SP and HTAB. No NUL, CR, LF or other control.
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
#: A CR not followed by LF (once the next byte is there) or an LF not preceded by CR.
_BARE_CR_OR_LF = re.compile(rb"\r(?=[^\n])|(?<!\r)\n")
_OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
#: accept() errors about the one pending connection (Linux passes its network errors on).
_PEER_GONE = frozenset(
    getattr(errno, name, errno.ECONNABORTED)
    for name in [
        "ECONNABORTED",
        "EPROTO",
        "EPERM",
        "ENETDOWN",
        "ENETUNREACH",
        "EHOSTDOWN",
        "EHOSTUNREACH",
        "ENONET",
        "ENOPROTOOPT",
        "EOPNOTSUPP",
        "ETIMEDOUT",
    ]
)


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one listener lets clients hold (defaults suit a server reachable by anyone).

    Attributes:
        head_timeout: Seconds to receive a whole request head, from the connection's accept
            (first request) or from the first byte of a later one (or the end of the previous
            request when the next one's bytes are already there). A connection that misses
            it gets a 408 and is closed.
        idle_timeout: Seconds a keep-alive connection may wait for the next request's first
            byte (and a request body for its next byte) before it is closed.
        max_unauthenticated: Connections that have not yet presented a valid bearer token;
            one more pushes the oldest out. Unused when the server has no token.
        max_connections: Connections in all; over it, a new connection pushes out the oldest
            unauthenticated one, or is closed at once when there is none.
    """

    head_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_unauthenticated: int = 64
    max_connections: int = 1024

    def __post_init__(self) -> None:
        if self.head_timeout <= 0 or self.idle_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if self.max_unauthenticated < 1 or self.max_connections < 1:
            raise ValueError("connection caps must be at least 1")


DEFAULT_LIMITS = ConnectionLimits()


@dataclasses.dataclass(frozen=True, slots=True)
class ListenerStatistics:
    """A snapshot of a listener's connections.

    Attributes:
        connections: Connections open now.
        unauthenticated: Of those, the ones that have not presented a valid token yet.
        shed: Unauthenticated connections closed so far to make room for newer ones.
        refused: Connections closed at once so far because ``max_connections`` were open.
    """

    connections: int
    unauthenticated: int
    shed: int
    refused: int


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
        HTTPError: 400 for anything malformed (a bare CR or LF, a control character, a header
            name that is not a token, obsolete line folding), 505 for an HTTP version other
            than 1.x.
    """
    lines = data.split(b"\r\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise HTTPError(400, "bad_request", "malformed request line")
    method, target, version = match.groups()
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HTTPError(505, "bad_request", "only HTTP/1.x is spoken here")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        # A folded line starts with whitespace, which no token holds.
        if not sep or _FIELD_NAME.fullmatch(name) is None:
            raise HTTPError(400, "bad_request", "malformed header line")
        if _FIELD_VALUE.fullmatch(value) is None:
            raise HTTPError(400, "bad_request", "control character in a header value")
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
    return _Head(method.decode("ascii"), target.decode("ascii"), headers, close)


class Connection:
    """One client connection: its socket, a receive buffer and the reader task's state."""

    __slots__ = (
        "_arrived",
        "_drained",
        "accepted",
        "buf",
        "eof",
        "limit",
        "scope",
        "sock",
        "watching",
    )

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False
        #: The reader stops reading while the buffer holds this much (bounds what a
        #: pipelining client can make the server hold).
        self.limit = _MAX_HEAD
        self.watching: anyio.CancelScope | None = None
        #: When the connection was accepted (the first request head's deadline counts from it).
        self.accepted = anyio.current_time()
        #: Encloses everything done for the connection; cancelled to shed it.
        self.scope = anyio.CancelScope()
        self._arrived = anyio.Event()
        self._drained = anyio.Event()

    def close(self) -> None:
        """Close the socket now (synchronous, idempotent): its descriptor is free at once."""
        if self.sock.fileno() >= 0:
            anyio.notify_closing(self.sock)
            self.sock.close()

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
                try:
                    await anyio.wait_readable(sock)
                except (anyio.ClosedResourceError, OSError):
                    data = b""  # shed: closed under us
                else:
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
        with anyio.move_on_after(_LINGER):
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


class _Registry:
    """The open connections of one listener, the unauthenticated ones oldest first.

    Bookkeeping only, all synchronous: a connection is added when accepted, moved out of
    ``unauthenticated`` when it shows a valid token, and removed when its task ends or when it
    is shed (its socket closed at once, its task cancelled).
    """

    __slots__ = ("open", "refused", "shed", "unauthenticated")

    def __init__(self) -> None:
        self.open: set[Connection] = set()
        self.unauthenticated: dict[Connection, None] = {}  # insertion order: oldest first
        self.shed = 0
        self.refused = 0

    def add(self, connection: Connection, *, authenticated: bool) -> None:
        self.open.add(connection)
        if not authenticated:
            self.unauthenticated[connection] = None

    def authenticate(self, connection: Connection) -> None:
        self.unauthenticated.pop(connection, None)

    def remove(self, connection: Connection) -> None:
        self.open.discard(connection)
        self.unauthenticated.pop(connection, None)

    def shed_oldest(self) -> bool:
        """Close the oldest unauthenticated connection (its descriptor is free on return)."""
        if not self.unauthenticated:
            return False
        oldest = next(iter(self.unauthenticated))
        self.remove(oldest)
        self.shed += 1
        oldest.close()
        oldest.scope.cancel()
        return True


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


async def _serve_connection(
    connection: Connection,
    handler: Handler,
    *,
    max_body: int,
    token: str | None,
    limits: ConnectionLimits,
    registry: _Registry,
) -> None:
    """Serve keep-alive requests on one accepted connection until it closes (or is shed).

    Cancellation: the connection is closed; a request in progress is cancelled with it.
    """
    try:
        with connection.scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(connection.read_loop)
                try:
                    await _serve_requests(
                        connection,
                        handler,
                        max_body=max_body,
                        token=token,
                        limits=limits,
                        registry=registry,
                    )
                except _STREAM_ERRORS:
                    pass  # the peer went away: drop the connection
                tg.cancel_scope.cancel()
    finally:
        registry.remove(connection)
        connection.close()


async def _read_head(
    connection: Connection, limits: ConnectionLimits, *, first: bool
) -> _Head | None:
    """The next request head, or ``None`` at a clean end of file or idle timeout between
    requests.

    Raises:
        HTTPError: 400/505 for a malformed head, 431 for one too large, 408 when it is not
            complete within ``limits.head_timeout``.
    """
    buf = connection.buf
    # The head deadline runs from the accept for a first request, from the end of the
    # previous one when the next one's bytes are already there, else from their first byte.
    deadline: float | None = None
    if first:
        deadline = connection.accepted + limits.head_timeout
    elif buf:
        deadline = anyio.current_time() + limits.head_timeout
    start = 0
    while True:
        # Tolerate empty lines before a request line (RFC 9112 section 2.2).
        while buf[:2] == b"\r\n":
            connection.consume(2)
        end = buf.find(b"\r\n\r\n", start)
        if end >= 0:
            if end > _MAX_HEAD:
                raise HTTPError(431, "bad_request", "request head too large")
            raw = connection.consume(end + 4)
            return parse_head(raw[:-4])
        if _BARE_CR_OR_LF.search(buf, start) is not None:
            # Refused as soon as seen: a client ending lines with LF alone never sends CRLFCRLF.
            raise HTTPError(400, "bad_request", "a line must end with CRLF")
        if len(buf) >= _MAX_HEAD:
            raise HTTPError(431, "bad_request", "request head too large")
        if connection.eof:
            if buf:
                raise anyio.EndOfStream  # a truncated request: nobody to answer
            return None
        if buf and deadline is None:
            deadline = anyio.current_time() + limits.head_timeout
        start = max(0, len(buf) - 3)
        idle = deadline is None
        wait_until = anyio.current_time() + limits.idle_timeout if deadline is None else deadline
        with anyio.CancelScope(deadline=wait_until) as scope:
            await connection.wait_data()
        if scope.cancelled_caught:
            if idle:
                return None  # an idle keep-alive connection: close it without a word
            raise HTTPError(408, "timeout", "the request head was not received in time")


async def _serve_requests(
    connection: Connection,
    handler: Handler,
    *,
    max_body: int,
    token: str | None,
    limits: ConnectionLimits,
    registry: _Registry,
) -> None:
    expected = f"Bearer {token}".encode() if token else None
    first = True
    while True:
        try:
            head = await _read_head(connection, limits, first=first)
        except HTTPError as exc:
            await _refuse(Responder(connection, True), exc.status, exc.kind, exc.message)
            return
        first = False
        if head is None:
            return
        respond = Responder(connection, head.close)
        headers = head.headers
        if expected is not None:
            if not hmac.compare_digest(
                headers.get("authorization", "").encode("latin-1"), expected
            ):
                await _refuse(respond, 401, "unauthorized", "missing or wrong bearer token")
                return
            registry.authenticate(connection)
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
            with anyio.move_on_after(limits.idle_timeout) as scope:
                await connection.wait_data()
            if scope.cancelled_caught:
                return  # the body stalled: drop the connection
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
    # The rest of the request was not read, so the connection cannot be reused. Bounded: the
    # client may be one that does not read.
    body = json.dumps({"error": kind, "message": message}).encode()
    with anyio.move_on_after(_LINGER):
        await respond.send(status, body, close=True)
        await respond._c.linger()


class Listener:
    """A listening socket (unix, mode 0600, or TCP) and the accept loop serving it."""

    def __init__(self, sock: socket.socket, *, path: str | None = None) -> None:
        self.sock = sock
        self.path = path
        self.port = 0 if path else int(sock.getsockname()[1])
        self._registry = _Registry()

    def statistics(self) -> ListenerStatistics:
        """Counts of the connections being served (see :class:`ListenerStatistics`)."""
        registry = self._registry
        return ListenerStatistics(
            connections=len(registry.open),
            unauthenticated=len(registry.unauthenticated),
            shed=registry.shed,
            refused=registry.refused,
        )

    async def serve(
        self,
        handler: Handler,
        *,
        max_body: int,
        token: str | None,
        limits: ConnectionLimits = DEFAULT_LIMITS,
    ) -> None:
        """Accept connections and serve each in its own task until cancelled.

        Every connection counts as unauthenticated until one of its requests carries
        ``token`` (without a token, every connection counts as authenticated);
        ``limits`` bounds them.

        Cancellation: the listening socket stays open (:meth:`aclose` closes it); every
        connection is closed and its request in progress cancelled.
        """
        sock = self.sock
        tcp = self.path is None
        registry = self._registry
        serve = functools.partial(
            _serve_connection,
            handler=handler,
            max_body=max_body,
            token=token,
            limits=limits,
            registry=registry,
        )
        starved = False
        async with anyio.create_task_group() as tg:
            while True:
                try:
                    client, _ = sock.accept()
                except BlockingIOError:
                    await anyio.wait_readable(sock)
                    continue
                except OSError as exc:
                    if exc.errno in _PEER_GONE:
                        continue  # that client's problem, not the listener's
                    if exc.errno not in _OUT_OF_RESOURCES:
                        raise
                    if not starved:
                        logger.warning("accept failed (%s): shedding or backing off", exc)
                        starved = True
                    # Out of descriptors: free one held by a client without the token, else
                    # wait a little (the backlog holds new clients meanwhile).
                    if registry.shed_oldest():
                        await anyio.lowlevel.checkpoint()
                    else:
                        await anyio.sleep(_ACCEPT_BACKOFF)
                    continue
                starved = False
                connection = self._admit(client, limits, authenticated=not token, tcp=tcp)
                if connection is not None:
                    tg.start_soon(serve, connection)
                # A flood of connections must not starve the connections' own tasks.
                await anyio.lowlevel.checkpoint()

    def _admit(
        self, client: socket.socket, limits: ConnectionLimits, *, authenticated: bool, tcp: bool
    ) -> Connection | None:
        """Register an accepted socket, making room first; ``None`` if it was closed instead."""
        registry = self._registry
        if len(registry.open) >= limits.max_connections and not registry.shed_oldest():
            registry.refused += 1
            client.close()
            return None
        if not authenticated and len(registry.unauthenticated) >= limits.max_unauthenticated:
            registry.shed_oldest()
        try:
            client.setblocking(False)
            if tcp:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            client.close()  # reset before we got to it
            return None
        connection = Connection(client)
        registry.add(connection, authenticated=authenticated)
        return connection

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

"""Minimal HTTP/1.1 server on h11 and anyio streams (the sandbox server, the ToolServer).

Both ends are deliberately small: the protocol has a dozen routes, JSON or raw-byte bodies and
one streamed NDJSON response, and a full HTTP stack costs several hundred microseconds per
request, which is most of an exec round trip. Keep-alive connections are reused by the client
pool; a connection whose request was cancelled is closed, never reused, and the server treats
that disconnect as cancellation of the work it was doing for it.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import anyio
import anyio.abc
import h11

__all__ = ["HTTPError", "Request", "Responder", "serve_connection"]

_MAX_HEAD = 64 * 1024
_RECEIVE = 1 << 16
_STREAM_ERRORS = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


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


class _Connection:
    """One client connection: h11 state plus a long-lived reader task.

    Reading happens in one task per *connection* (not per request): it feeds h11 whenever
    the request loop wants data or a running request wants to hear about a disconnect, and on
    end-of-file it cancels that request. Spawning a watcher task per request cost a
    noticeable share of an exec round trip.
    """

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        self.want = anyio.Event()
        self.arrived = anyio.Event()
        self.eof = False
        self.watching: anyio.CancelScope | None = None

    async def read_loop(self) -> None:
        while True:
            await self.want.wait()
            try:
                data = await self.stream.receive(_RECEIVE)
            except _STREAM_ERRORS:
                data = b""
            # Stop reading until asked again (bounds what a pipelining client can buffer).
            self.want = anyio.Event()
            self.h11.receive_data(data)
            if not data:
                self.eof = True
                if self.watching is not None:
                    self.watching.cancel()
            self.arrived.set()
            if not data:
                return

    async def next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.arrived = anyio.Event()
            self.want.set()
            await self.arrived.wait()


class Responder:
    """Writes the response of one request; knows when the client went away."""

    __slots__ = ("_c", "_conn", "_stream", "disconnected", "started")

    def __init__(self, connection: _Connection) -> None:
        self._c = connection
        self._conn = connection.h11
        self._stream = connection.stream
        self.started = False
        self.disconnected = False

    async def send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        *,
        close: bool = False,
    ) -> None:
        """Send a complete response (``close``: tell the client the connection ends here).

        Cancellation: the response may be partly written; the connection is then dropped.
        """
        self.started = True
        headers = [("content-type", content_type), ("content-length", str(len(body)))]
        if close:
            headers.append(("connection", "close"))
        data = self._conn.send(h11.Response(status_code=status, headers=headers)) or b""
        if body:
            data += self._conn.send(h11.Data(data=body)) or b""
        data += self._conn.send(h11.EndOfMessage()) or b""
        await self._stream.send(data)

    async def send_json(self, status: int, value: Any) -> None:
        """Send ``value`` as a JSON response.

        Cancellation: as :meth:`send`.
        """
        await self.send(status, json.dumps(value, separators=(",", ":")).encode())

    async def start_stream(self, content_type: str = "application/x-ndjson") -> None:
        """Start a chunked response; follow with :meth:`send_chunk` and :meth:`end_stream`.

        Cancellation: as :meth:`send`.
        """
        self.started = True
        headers = [("content-type", content_type), ("transfer-encoding", "chunked")]
        await self._stream.send(self._conn.send(h11.Response(status_code=200, headers=headers)))

    async def send_chunk(self, data: bytes) -> None:
        """Send one chunk of a streamed response.

        Cancellation: as :meth:`send`.
        """
        await self._stream.send(self._conn.send(h11.Data(data=data)) or b"")

    async def end_stream(self) -> None:
        """Finish a streamed response.

        Cancellation: as :meth:`send`.
        """
        await self._stream.send(self._conn.send(h11.EndOfMessage()) or b"")

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
                c.want.set()  # make sure the reader listens for end-of-file meanwhile
                await work()
            finally:
                c.watching = None
        if scope.cancelled_caught:
            self.disconnected = True


Handler = Callable[[Request, Responder], Awaitable[None]]


async def serve_connection(
    stream: anyio.abc.ByteStream, handler: Handler, *, max_body: int, token: str | None
) -> None:
    """Serve keep-alive requests on one connection until it closes.

    Cancellation: the connection is closed; a request in progress is cancelled with it.
    """
    connection = _Connection(stream)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(connection.read_loop)
            try:
                await _serve_requests(connection, handler, max_body=max_body, token=token)
            except (*_STREAM_ERRORS, h11.ProtocolError):
                pass  # the peer went away or spoke nonsense: drop the connection
            tg.cancel_scope.cancel()
    finally:
        with anyio.move_on_after(1, shield=True):
            await stream.aclose()


async def _serve_requests(
    connection: _Connection, handler: Handler, *, max_body: int, token: str | None
) -> None:
    conn = connection.h11
    expected = f"Bearer {token}".encode() if token else None
    while True:
        event = await connection.next_event()
        if not isinstance(event, h11.Request):
            return
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
        respond = Responder(connection)
        split = urlsplit(event.target.decode("latin-1"))
        size = int(headers.get("content-length", "0") or 0)
        if expected is not None and not hmac.compare_digest(
            headers.get("authorization", "").encode("latin-1"), expected
        ):
            await _refuse(respond, 401, "unauthorized", "missing or wrong bearer token")
            return
        if size > max_body or "transfer-encoding" in headers:
            await _refuse(respond, 413, "too_large", f"request body over {max_body} bytes")
            return
        body = bytearray()
        while True:
            part = await connection.next_event()
            if isinstance(part, h11.Data):
                body += part.data
            elif isinstance(part, h11.EndOfMessage):
                break
            else:
                return
        request = Request(
            event.method.decode(),
            split.path,
            dict(parse_qsl(split.query)),
            headers,
            bytes(body),
        )
        try:
            await handler(request, respond)
        except HTTPError as exc:
            if respond.started:
                return
            await respond.send_json(exc.status, {"error": exc.kind, "message": exc.message})
        if respond.disconnected or conn.our_state is not h11.DONE:
            return
        if conn.their_state is not h11.DONE:
            return
        conn.start_next_cycle()


async def _refuse(respond: Responder, status: int, kind: str, message: str) -> None:
    # The request body was not read, so the connection cannot be reused.
    body = json.dumps({"error": kind, "message": message}).encode()
    await respond.send(status, body, close=True)

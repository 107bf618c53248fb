"""Client side of the sandbox protocol: a lean pooled HTTP/1.1 client and the remote slot.

An exec of a small program costs about a millisecond, so the client is kept to the bone: a
hand-written HTTP/1.1 codec (request heads formatted in one go, responses parsed from one
buffer; bodies framed by ``content-length`` or ``transfer-encoding: chunked``) over raw
non-blocking sockets, with a pool of idle keep-alive connections. Socket calls are tried first
and the event loop is only asked to wait when they would block. TLS connections (tunnels) use
an anyio TLS stream behind the same small transport interface.

A request that is cancelled or fails half-way closes its connection (never returned to the
pool), which is also how the server learns that the caller gave up and kills the command.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
import socket
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote, urlencode

import anyio
import anyio.abc
import anyio.lowlevel

from .._exceptions import (
    ProtocolError,
    SandboxUnavailableError,
    SlotBrokenError,
    StaleLeaseError,
)
from .._types import ExecRequest, ExecResult
from ..abc import FileEntry, Slot

__all__ = ["HostClient", "RemoteSlot", "error_from_response", "stream_batch"]

_RECEIVE = 1 << 16
#: Largest response head (status line and headers), and largest chunk-size or trailer line.
_MAX_HEAD = 64 * 1024
#: Bodies up to this size are sent in the same write as the request head.
_COALESCE = 1 << 16
_STREAM_ERRORS = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)
#: Compact JSON, with the encoder built once (``json.dumps`` with options builds one per call).
_dumps = json.JSONEncoder(separators=(",", ":")).encode

_STATUS = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [\t !-~\x80-\xff]*)?")
_HEADER = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*"
    rb"((?:[!-~\x80-\xff](?:[ \t]*[!-~\x80-\xff])*)?)[ \t]*"
)
_LENGTH = re.compile(rb"[0-9]{1,18}")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;.*)?", re.DOTALL)
_TARGET = re.compile(r"[!-~]+")
_METHOD = re.compile(r"[A-Z]+")
_VALUE = re.compile(r"[!-~](?:[ !-~]*[!-~])?")


def _broken(message: str) -> anyio.BrokenResourceError:
    return anyio.BrokenResourceError(f"bad answer from sandbox host: {message}")


#: Seconds an idle pooled connection is reused for: half the servers' idle timeout
#: (``_http.ConnectionLimits.idle_timeout``), so the server never closes one under a request.
_MAX_IDLE_AGE = 30.0

# -- transports ---------------------------------------------------------------------------


class _Conn:
    """One connection: a transport plus the bytes received beyond the current response.

    ``send``/``receive`` are the transport (``receive`` returns ``b""`` at end of file);
    ``kill`` is synchronous and makes an operation waiting on the connection fail at once
    with ``anyio.ClosedResourceError`` (:meth:`HostClient.abort`).
    """

    __slots__ = ("buf", "closed", "idle_since", "waited")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.closed = False
        #: When the connection went back to the pool (event-loop clock).
        self.idle_since = 0.0
        #: Whether an operation of the current request waited on the event loop (see
        #: :meth:`HostClient._exchange`).
        self.waited = False

    async def send(self, data: bytes | memoryview) -> None:
        raise NotImplementedError

    async def receive(self) -> bytes:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def dropped(self) -> bool:
        """Whether the idle connection was closed by the server (or sent unasked bytes)."""
        return False

    async def aclose(self) -> None:
        raise NotImplementedError


class _SocketConn(_Conn):
    """A raw non-blocking socket (unix or plain TCP)."""

    __slots__ = ("sock",)

    def __init__(self, family: int) -> None:
        super().__init__()
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    async def connect(self, address: Any) -> None:
        sock = self.sock
        while True:
            err = sock.connect_ex(address)
            if err == 0 or err == errno.EISCONN:
                return
            if err == errno.EINPROGRESS:
                self.waited = True
                await anyio.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
                return
            if err != errno.EAGAIN:  # EAGAIN: a unix listener's backlog is full, retry
                raise OSError(err, os.strerror(err))
            self.waited = True
            await anyio.wait_writable(sock)

    async def send(self, data: bytes | memoryview) -> None:
        sock = self.sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        while view:
            self.waited = True
            await anyio.wait_writable(sock)
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                pass

    async def receive(self) -> bytes:
        sock = self.sock
        while True:
            try:
                return sock.recv(_RECEIVE)
            except BlockingIOError:
                pass
            self.waited = True
            await anyio.wait_readable(sock)

    def kill(self) -> None:
        if not self.closed:
            self.closed = True
            anyio.notify_closing(self.sock)
            self.sock.close()

    def dropped(self) -> bool:
        try:
            return len(self.sock.recv(1, socket.MSG_PEEK)) >= 0  # EOF, or bytes nobody asked
        except BlockingIOError:
            return False
        except OSError:
            return True

    async def aclose(self) -> None:
        self.kill()


class _TLSConn(_Conn):
    """An anyio TLS stream; :meth:`kill` cancels the operation waiting on it."""

    __slots__ = ("scope", "stream")

    def __init__(self) -> None:
        super().__init__()
        self.stream: anyio.abc.ByteStream | None = None
        self.scope: anyio.CancelScope | None = None

    async def connect(self, host: str, port: int) -> None:
        self.waited = True
        with anyio.CancelScope() as self.scope:
            if self.closed:
                raise anyio.ClosedResourceError
            self.stream = await anyio.connect_tcp(host, port, tls=True, tls_hostname=host)
            return
        raise anyio.ClosedResourceError

    async def send(self, data: bytes | memoryview) -> None:
        self.waited = True
        with anyio.CancelScope() as self.scope:
            if self.closed or self.stream is None:
                raise anyio.ClosedResourceError
            await self.stream.send(bytes(data))
            return
        raise anyio.ClosedResourceError

    async def receive(self) -> bytes:
        self.waited = True
        with anyio.CancelScope() as self.scope:
            if self.closed or self.stream is None:
                raise anyio.ClosedResourceError
            try:
                return await self.stream.receive(_RECEIVE)
            except anyio.EndOfStream:
                return b""
        raise anyio.ClosedResourceError

    def kill(self) -> None:
        self.closed = True
        if self.scope is not None:
            self.scope.cancel()

    async def aclose(self) -> None:
        self.kill()
        stream, self.stream = self.stream, None
        if stream is not None:
            with anyio.move_on_after(1, shield=True):
                await anyio.aclose_forcefully(stream)


# -- response codec -----------------------------------------------------------------------


async def _read_until(conn: _Conn, sep: bytes, limit: int, what: str) -> int:
    """Receive until ``sep`` is in ``conn.buf``; return its offset (at most ``limit``)."""
    buf = conn.buf
    end = buf.find(sep)
    while end < 0:
        if len(buf) > limit:
            raise _broken(f"{what} over {limit} bytes")
        data = await conn.receive()
        if not data:
            raise _broken(f"connection closed in the {what}")
        start = max(len(buf) - len(sep) + 1, 0)
        buf += data
        end = buf.find(sep, start)
    if end > limit:
        raise _broken(f"{what} over {limit} bytes")
    return end


async def _read_head(conn: _Conn) -> tuple[bool, int, dict[bytes, bytes]]:
    """One response head: ``(http/1.1, status, headers by lower-case name)``."""
    buf = conn.buf
    end = await _read_until(conn, b"\r\n\r\n", _MAX_HEAD, "response head")
    lines = buf[:end].split(b"\r\n")
    del buf[: end + 4]
    status = _STATUS.fullmatch(lines[0])
    if status is None:
        raise _broken(f"malformed status line {bytes(lines[0][:100])!r}")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        field = _HEADER.fullmatch(line)
        if field is None:
            raise _broken(f"malformed header line {bytes(line[:100])!r}")
        name = field[1].lower()
        value = field[2]
        old = headers.get(name)
        if old is None:
            headers[name] = value
        elif name == b"content-length":
            if old != value:
                raise _broken("conflicting content-length headers")
        else:
            headers[name] = old + b", " + value
    return status[1] == b"1", int(status[2]), headers


async def _read_exact(conn: _Conn, size: int, on_data: Callable[[bytes], None]) -> None:
    """Feed the next ``size`` bytes to ``on_data`` as they arrive."""
    buf = conn.buf
    if buf:
        if len(buf) >= size:
            if size:
                on_data(bytes(buf[:size]))
                del buf[:size]
            return
        size -= len(buf)
        on_data(bytes(buf))
        buf.clear()
    while size:
        data = await conn.receive()
        if not data:
            raise _broken("connection closed in the body")
        if len(data) > size:
            buf += data[size:]
            data = data[:size]
        size -= len(data)
        on_data(data)


async def _read_chunked(conn: _Conn, on_data: Callable[[bytes], None]) -> None:
    buf = conn.buf
    while True:
        end = await _read_until(conn, b"\r\n", _MAX_HEAD, "chunk header")
        match = _CHUNK_SIZE.fullmatch(buf, 0, end)
        if match is None:
            raise _broken(f"malformed chunk header {bytes(buf[: min(end, 100)])!r}")
        size = int(match[1], 16)
        del buf[: end + 2]
        if not size:
            break
        await _read_exact(conn, size, on_data)
        while len(buf) < 2:
            data = await conn.receive()
            if not data:
                raise _broken("connection closed in the body")
            buf += data
        if buf[:2] != b"\r\n":
            raise _broken("chunk longer than its size")
        del buf[:2]
    # Trailers (ignored) up to an empty line.
    total = 0
    while end := await _read_until(conn, b"\r\n", _MAX_HEAD - total, "trailers"):
        total += end + 2
        del buf[: end + 2]
    del buf[:2]


async def _read_response(
    conn: _Conn, on_data: Callable[[bytes], None], on_status: Callable[[bool], None] | None
) -> tuple[int, bool]:
    """Read one response, body to ``on_data``; return ``(status, connection reusable)``."""
    while True:
        http11, status, headers = await _read_head(conn)
        if status >= 200:
            break
        if status == 101 or status < 100:
            raise _broken(f"unexpected status {status}")
        # 1xx: an interim answer (100 Continue), the real one follows.
    keep = http11
    connection = headers.get(b"connection")
    if connection is not None and b"close" in (t.strip() for t in connection.lower().split(b",")):
        keep = False
    if on_status is not None:
        on_status(status == 200)
    coding = headers.get(b"transfer-encoding")
    length = headers.get(b"content-length")
    if coding is not None:
        if coding.lower() != b"chunked":
            raise _broken(f"unsupported transfer-encoding {coding[:100]!r}")
        await _read_chunked(conn, on_data)
    elif length is not None:
        if _LENGTH.fullmatch(length) is None:
            raise _broken(f"bad content-length {length[:100]!r}")
        await _read_exact(conn, int(length), on_data)
    elif status not in (204, 304):
        # No framing: the body runs to the end of the connection.
        keep = False
        if conn.buf:
            on_data(bytes(conn.buf))
            conn.buf.clear()
        while data := await conn.receive():
            on_data(data)
    return status, keep


async def _resolve(host: str, port: int) -> list[tuple[int, Any]]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [(family, address) for family, _, _, _, address in infos]
    return [(socket.AF_INET if ip.version == 4 else socket.AF_INET6, (host, port))]


# -- the client ---------------------------------------------------------------------------


class HostClient:
    """A connection pool to one sandbox server (unix socket or TCP + bearer token).

    Raises ``anyio.BrokenResourceError`` when the server cannot be reached, the connection
    dies mid-request, the server's answer is malformed or the client was :meth:`abort` ed;
    callers map that to :class:`~structenv.SlotBrokenError`.

    Args:
        uds: Unix socket path of the server (else TCP ``host``:``port``).
        token: Bearer token the server requires.
        tls: Speak TLS over TCP (a TLS-terminating tunnel in front of the server).
        max_idle: Idle keep-alive connections kept.
    """

    def __init__(
        self,
        *,
        uds: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        tls: bool = False,
        max_idle: int = 128,
    ) -> None:
        self._uds = uds
        self._host = host
        self._port = port
        self._tls = tls
        self._idle: list[_Conn] = []
        self._max_idle = max_idle
        self._closed = False
        self._aborted = False
        self._inflight: set[_Conn] = set()
        base = " HTTP/1.1\r\nhost: sandbox\r\n"
        if token:
            if _VALUE.fullmatch(token) is None:
                raise ValueError("the bearer token must be printable ASCII")
            base += f"authorization: Bearer {token}\r\n"
        self._base = base

    @property
    def address(self) -> tuple[str, int] | str:
        """The server's unix socket path or ``(host, port)``."""
        return self._uds if self._uds is not None else (self._host, self._port)

    def _check_open(self) -> None:
        if self._aborted:
            raise anyio.BrokenResourceError("sandbox host was declared dead")
        if self._closed:
            raise anyio.ClosedResourceError

    async def _connect(self) -> _Conn:
        """A new connection, registered in flight (removed again if connecting fails)."""
        self._check_open()
        if self._uds is not None:
            targets: list[tuple[int, Any]] = [(socket.AF_UNIX, self._uds)]
        elif self._tls:
            tls = _TLSConn()
            await self._attempt(tls, tls.connect(self._host, self._port))
            return tls
        else:
            try:
                targets = await _resolve(self._host, self._port)
            except OSError as exc:
                raise anyio.BrokenResourceError(f"cannot resolve sandbox host: {exc}") from exc
            self._check_open()
        error: anyio.BrokenResourceError | None = None
        for family, address in targets:  # in order: addresses of one host, rarely several
            try:
                conn = _SocketConn(family)
            except OSError as exc:
                error = anyio.BrokenResourceError(f"cannot connect to sandbox host: {exc}")
                error.__cause__ = exc
                continue
            try:
                await self._attempt(conn, conn.connect(address))
            except anyio.BrokenResourceError as exc:
                if self._aborted:
                    raise
                error = exc
                continue
            return conn
        raise error or anyio.BrokenResourceError("sandbox host has no address")

    async def _attempt(self, conn: _Conn, connecting: Any) -> None:
        self._inflight.add(conn)
        try:
            await connecting
        except BaseException as exc:
            self._inflight.discard(conn)
            await conn.aclose()
            if isinstance(exc, _STREAM_ERRORS):
                if self._aborted:
                    raise anyio.BrokenResourceError("sandbox host was declared dead") from exc
                raise anyio.BrokenResourceError(f"cannot connect to sandbox host: {exc}") from exc
            raise

    def _head(self, method: str, target: str, size: int, ctype: str) -> bytes:
        if not (
            _METHOD.fullmatch(method) and _TARGET.fullmatch(target) and _VALUE.fullmatch(ctype)
        ):
            raise ValueError(f"invalid request line or content type: {method} {target} {ctype}")
        return (
            f"{method} {target}{self._base}content-type: {ctype}\r\ncontent-length: {size}\r\n\r\n"
        ).encode()

    async def request(
        self, method: str, target: str, body: bytes = b"", *, ctype: str = "application/json"
    ) -> tuple[int, bytes]:
        """One request/response; returns ``(status, body)``.

        Cancellation: the connection is closed (the server cancels the work it was doing).
        """
        chunks: list[bytes] = []
        status = await self._exchange(method, target, body, ctype, chunks.append)
        return status, b"".join(chunks)

    async def request_lines(
        self, target: str, body: bytes, on_line: Callable[[bytes], None]
    ) -> tuple[int, bytes]:
        """POST and call ``on_line`` for each NDJSON line as it arrives (200 answers only).

        Returns ``(status, error_body)``; the body is empty for a 200.

        Cancellation: the connection is closed; lines not yet received are never delivered.
        """
        pending = b""
        other: list[bytes] = []
        ok: list[bool] = []

        def on_data(data: bytes) -> None:
            nonlocal pending
            if not ok[0]:
                other.append(data)
                return
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line:
                    on_line(line)

        status = await self._exchange(
            "POST", target, body, "application/json", on_data, on_status=ok.append
        )
        return status, b"".join(other)

    async def _exchange(
        self,
        method: str,
        target: str,
        body: bytes,
        ctype: str,
        on_data: Callable[[bytes], None],
        *,
        on_status: Callable[[bool], None] | None = None,
    ) -> int:
        """Send one request on a pooled connection and feed the response body to ``on_data``.

        The connection is registered in flight meanwhile, so :meth:`abort` can close it.
        """
        head = self._head(method, target, len(body), ctype)
        conn = None
        while self._idle and not self._closed:
            conn = self._idle.pop()
            # A connection the server closed (its idle timeout) would fail this request as
            # if the host were gone: check it (one non-blocking peek), and retire it before
            # the server's timeout comes near.
            if conn.dropped() or anyio.current_time() - conn.idle_since > _MAX_IDLE_AGE:
                await conn.aclose()
                conn = None
                continue
            conn.waited = False
            self._inflight.add(conn)
            break
        if conn is None:
            conn = await self._connect()
        try:
            if len(body) <= _COALESCE:
                await conn.send(head + body)
            else:
                await conn.send(head)
                await conn.send(body)
            status, keep = await _read_response(conn, on_data, on_status)
        except BaseException as exc:
            self._inflight.discard(conn)
            # Closing without a goodbye is the point: the server reads it as "caller cancelled".
            await conn.aclose()
            if isinstance(exc, _STREAM_ERRORS):
                if self._aborted:
                    raise anyio.BrokenResourceError(
                        "sandbox host was declared dead mid-request"
                    ) from exc
                if not isinstance(exc, anyio.BrokenResourceError):
                    raise anyio.BrokenResourceError(
                        f"sandbox host connection lost: {exc!r}"
                    ) from exc
            raise
        self._inflight.discard(conn)
        if keep and not conn.buf and not self._closed and len(self._idle) < self._max_idle:
            conn.idle_since = anyio.current_time()
            self._idle.append(conn)
        else:
            await conn.aclose()
        if not conn.waited:
            # The answer was there before we asked: still be a checkpoint, as every anyio
            # operation is (the connection is back in the pool, nothing is lost if cancelled).
            await anyio.lowlevel.checkpoint()
        return status

    def abort(self) -> None:
        """Declare the host dead: every request in flight fails at once with
        ``anyio.BrokenResourceError`` (its connection is closed), and so does every later one.

        For a host that stopped answering without closing its connections (a hung container,
        a lost cluster node): waiting for the socket to break could take forever. Synchronous,
        so a backend can call it from its bookkeeping. Call :meth:`aclose` afterwards to close
        the idle connections.
        """
        self._aborted = True
        self._closed = True
        for conn in list(self._inflight):
            conn.kill()

    async def aclose(self) -> None:
        """Close idle connections; later requests fail. Idempotent.

        Cancellation: connections are closed forcefully, nothing is left open.
        """
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()


def error_from_response(status: int, body: bytes) -> Exception:
    """Map an error answer of the sandbox server to the exception structenv raises."""
    try:
        info = json.loads(body)
        kind, message = str(info.get("error")), str(info.get("message"))
    except (ValueError, AttributeError):
        kind, message = "unknown", body[:200].decode(errors="replace")
    return _error(status, kind, message)


def _error(status: int, kind: str, message: str) -> Exception:
    if kind == "stale_lease":
        return StaleLeaseError(message)
    if kind in ("slot_broken", "no_slot"):
        return SlotBrokenError(message)
    if kind == "unsandboxed":
        return SandboxUnavailableError(message)
    if kind == "permission_denied":
        return PermissionError(message)
    if kind == "not_found":
        return FileNotFoundError(message)
    if kind == "is_a_directory":
        return IsADirectoryError(message)
    if kind == "too_large":
        return ValueError(message)
    return ProtocolError(f"sandbox host answered {status} {kind}: {message}")


async def stream_batch(
    client: HostClient,
    calls: Sequence[tuple[int, int, int, ExecRequest]],
    on_result: Callable[[int, ExecResult | Exception], None],
) -> None:
    """Run ``(index, slot, lease, request)`` calls on one host in one streamed request.

    ``on_result(index, ...)`` is called for each call as its line arrives; if the host dies,
    every call without a result gets a :class:`~structenv.SlotBrokenError`.

    Cancellation: the connection is closed, the host kills every command of the batch, and
    ``on_result`` is not called for calls without a result.
    """
    wire = [{"slot": s, "lease": lease, "request": r.to_wire()} for _, s, lease, r in calls]
    body = _dumps({"calls": wire}).encode()
    done = [False] * len(calls)

    def on_line(line: bytes) -> None:
        try:
            item = json.loads(line)
            pos = int(item["index"])
            if done[pos]:
                return
            value: ExecResult | Exception
            if "result" in item:
                value = ExecResult.from_wire(item["result"])
            else:
                err = item.get("error") or {}
                value = _error(
                    int(err.get("status", 0)), str(err.get("kind")), str(err.get("message"))
                )
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise ProtocolError(f"bad batch line from sandbox host: {line[:200]!r}") from exc
        done[pos] = True
        on_result(calls[pos][0], value)

    failure: Exception | None = None
    try:
        status, err_body = await client.request_lines("/v1/exec_batch", body, on_line)
        if status != 200:
            failure = error_from_response(status, err_body)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
        failure = SlotBrokenError(f"sandbox host lost or closed: {exc!r}")
    for pos, finished in enumerate(done):
        if not finished:
            on_result(calls[pos][0], failure or SlotBrokenError("no result from sandbox host"))


class RemoteSlot(Slot):
    """A slot on a sandbox server, reached through a :class:`HostClient`.

    Beyond the :class:`~structenv.abc.Slot` protocol it offers :meth:`archive` and the
    stateful terminal (:meth:`terminal`).
    """

    __slots__ = ("client", "index")

    def __init__(
        self, *, client: HostClient, index: int, id: str, host_id: str, lease: int, sandboxed: bool
    ) -> None:
        super().__init__(id=id, host_id=host_id, lease=lease, sandboxed=sandboxed)
        self.client = client
        self.index = index

    async def _call(
        self, method: str, target: str, body: bytes = b"", ctype: str = "application/json"
    ) -> bytes:
        try:
            status, data = await self.client.request(method, target, body, ctype=ctype)
        except anyio.BrokenResourceError as exc:
            raise SlotBrokenError(f"sandbox host of {self.id} is unreachable: {exc}") from exc
        except anyio.ClosedResourceError as exc:
            raise SlotBrokenError(f"the backend of {self.id} was closed") from exc
        if status != 200:
            raise error_from_response(status, data)
        return data

    def _json(self, **fields: Any) -> bytes:
        return _dumps({"slot": self.index, "lease": self.lease, **fields}).encode()

    def _query(self, **fields: Any) -> str:
        return urlencode({"slot": self.index, "lease": self.lease, **fields}, quote_via=quote)

    async def exec(self, request: ExecRequest) -> ExecResult:
        """Run one command (see :meth:`structenv.abc.Slot.exec`).

        Cancellation: the connection is dropped and the host kills the command's process
        tree; the caller must mark the slot ``reusable = False``.
        """
        data = await self._call("POST", "/v1/exec", self._json(request=request.to_wire()))
        return ExecResult.from_wire(json.loads(data))

    async def reset(self) -> None:
        """Kill everything in the slot, empty it and move this handle to the new lease.

        Cancellation: the reset may or may not have happened; the slot must be treated as
        quarantined (the pool destroys it).
        """
        data = await self._call("POST", "/v1/reset", self._json(hard=False))
        self.lease = int(json.loads(data)["lease"])

    async def end_processes(self) -> list[int]:
        """Have the slot's worker kill every other process of the slot (see
        :meth:`structenv.abc.Slot.end_processes`); return the pids that survived.

        Cancellation: the processes may or may not have been ended; the slot stays usable.
        """
        data = await self._call("POST", "/v1/end_processes", self._json())
        answer = json.loads(data)
        left = answer.get("left") if isinstance(answer, dict) else None
        if not isinstance(left, list) or not all(type(p) is int for p in left):
            raise ProtocolError(f"bad end_processes answer from sandbox host: {data[:200]!r}")
        return left

    async def read_file(self, path: str, *, max_bytes: int = 1 << 20) -> bytes:
        """Read a workspace file (binary-safe, symlinks refused).

        Cancellation: no state changes.
        """
        return await self._call(
            "POST", "/v1/files/read?" + self._query(path=path, max_bytes=max_bytes)
        )

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Atomically create or replace a workspace file.

        Cancellation: the file is absent, old, or complete.
        """
        target = "/v1/files/write?" + self._query(path=path, mode=mode)
        await self._call("POST", target, bytes(data), "application/octet-stream")

    async def list_files(self, path: str = ".") -> list[FileEntry]:
        """List a workspace directory recursively.

        Cancellation: no state changes.
        """
        data = await self._call("POST", "/v1/files/list", self._json(path=path))
        return [
            FileEntry(e["path"], int(e["size"]), bool(e["is_dir"]))
            for e in json.loads(data)["entries"]
        ]

    async def archive(self) -> bytes:
        """A tar archive of the whole workspace.

        Cancellation: no state changes.
        """
        return await self._call("POST", "/v1/archive?" + self._query())

    async def terminal(self, action: str, **arguments: Any) -> dict[str, Any]:
        """Drive the slot's tmux terminal.

        ``action`` is ``start`` (``width``, ``height``), ``send_keys`` (``keys``, ``enter``,
        ``literal``), ``capture``, ``stop`` or ``run`` (``command``, ``timeout``: type a
        command into the persistent shell and wait for it). Every answer has ``output``: the
        terminal text produced since the previous call; ``run`` adds ``exit_code`` and
        ``timed_out``.

        Cancellation: the tmux client command is killed; the terminal keeps running (a
        ``run`` command may still be executing in it).
        """
        data = await self._call("POST", "/v1/terminal", self._json(action=action, **arguments))
        value = json.loads(data)
        if not isinstance(value, dict):
            raise ProtocolError("terminal answer is not an object")
        return value

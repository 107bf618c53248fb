"""Client side of the sandbox protocol: a lean pooled HTTP/1.1 client and the remote slot.

A general-purpose HTTP client costs a few hundred microseconds per request; an exec of a small
program costs well under a millisecond, so the client is a thin h11 layer over anyio streams
with a pool of idle keep-alive connections. A request that is cancelled or fails half-way
closes its connection (never returned to the pool), which is also how the server learns that
the caller gave up and kills the command.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote, urlencode

import anyio
import anyio.abc
import h11

from .._exceptions import ProtocolError, SlotBrokenError, StaleLeaseError
from .._types import ExecRequest, ExecResult
from ..abc import FileEntry, Slot

__all__ = ["HostClient", "RemoteSlot", "error_from_response", "stream_batch"]

_RECEIVE = 1 << 16
_STREAM_ERRORS = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class _Conn:
    __slots__ = ("h11", "stream")

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)


class HostClient:
    """A connection pool to one sandbox server (unix socket or TCP + bearer token).

    Raises ``anyio.BrokenResourceError`` when the server cannot be reached, the connection
    dies mid-request or the client was :meth:`abort` ed; callers map that to
    :class:`~structenv.SlotBrokenError`.

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
        self._inflight: set[anyio.CancelScope] = set()
        base = [(b"host", b"sandbox")]
        if token:
            base.append((b"authorization", f"Bearer {token}".encode()))
        self._base_headers = base

    @property
    def address(self) -> tuple[str, int] | str:
        """The server's unix socket path or ``(host, port)``."""
        return self._uds if self._uds is not None else (self._host, self._port)

    async def _connect(self) -> _Conn:
        if self._aborted:
            raise anyio.BrokenResourceError("sandbox host was declared dead")
        if self._closed:
            raise anyio.ClosedResourceError
        try:
            if self._uds is not None:
                stream: anyio.abc.ByteStream = await anyio.connect_unix(self._uds)
            elif self._tls:
                stream = await anyio.connect_tcp(
                    self._host, self._port, tls=True, tls_hostname=self._host
                )
            else:
                stream = await anyio.connect_tcp(self._host, self._port)
        except OSError as exc:
            raise anyio.BrokenResourceError(f"cannot connect to sandbox host: {exc}") from exc
        return _Conn(stream)

    def _head(self, method: str, target: str, size: int, ctype: str) -> h11.Request:
        headers = [
            *self._base_headers,
            (b"content-length", str(size).encode()),
            (b"content-type", ctype.encode()),
        ]
        return h11.Request(method=method, target=target, headers=headers)

    async def _send(self, conn: _Conn, method: str, target: str, body: bytes, ctype: str) -> int:
        c = conn.h11
        data = c.send(self._head(method, target, len(body), ctype)) or b""
        if body:
            data += c.send(h11.Data(data=body)) or b""
        data += c.send(h11.EndOfMessage()) or b""
        await conn.stream.send(data)
        event = await _next(conn)
        if not isinstance(event, h11.Response):
            raise anyio.BrokenResourceError(f"unexpected {type(event).__name__}")
        return event.status_code

    def _release(self, conn: _Conn) -> bool:
        c = conn.h11
        if c.our_state is h11.DONE and c.their_state is h11.DONE and not self._closed:
            c.start_next_cycle()
            if len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return True
        return False

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

        Every request runs in its own cancel scope so :meth:`abort` can cut it off.
        """
        with anyio.CancelScope() as scope:
            self._inflight.add(scope)
            try:
                return await self._exchange_on_conn(method, target, body, ctype, on_data, on_status)
            finally:
                self._inflight.discard(scope)
        raise anyio.BrokenResourceError("sandbox host was declared dead mid-request")

    async def _exchange_on_conn(
        self,
        method: str,
        target: str,
        body: bytes,
        ctype: str,
        on_data: Callable[[bytes], None],
        on_status: Callable[[bool], None] | None,
    ) -> int:
        conn = self._idle.pop() if self._idle and not self._closed else await self._connect()
        try:
            status = await self._send(conn, method, target, body, ctype)
            if on_status is not None:
                on_status(status == 200)
            while True:
                event = await _next(conn)
                if isinstance(event, h11.Data):
                    on_data(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    raise anyio.BrokenResourceError(f"unexpected {type(event).__name__}")
        except BaseException as exc:
            await _drop(conn)
            if isinstance(exc, (*_STREAM_ERRORS, h11.ProtocolError)) and not isinstance(
                exc, anyio.BrokenResourceError
            ):
                raise anyio.BrokenResourceError(f"sandbox host connection lost: {exc!r}") from exc
            raise
        if not self._release(conn):
            await _drop(conn)
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
        for scope in list(self._inflight):
            scope.cancel()

    async def aclose(self) -> None:
        """Close idle connections; later requests fail. Idempotent.

        Cancellation: connections are closed forcefully, nothing is left open.
        """
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await _drop(conn)


async def _drop(conn: _Conn) -> None:
    # Closing without a goodbye is the point: the server reads it as "caller cancelled".
    with anyio.move_on_after(1, shield=True):
        await anyio.aclose_forcefully(conn.stream)


async def _next(conn: _Conn) -> Any:
    c = conn.h11
    while True:
        event = c.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await conn.stream.receive(_RECEIVE)
        except anyio.EndOfStream:
            data = b""
        c.receive_data(data)


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
    body = json.dumps({"calls": wire}, separators=(",", ":")).encode()
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
        return json.dumps({"slot": self.index, "lease": self.lease, **fields}).encode()

    def _query(self, **fields: Any) -> str:
        return urlencode({"slot": self.index, "lease": self.lease, **fields}, quote_via=quote)

    async def exec(self, request: ExecRequest) -> ExecResult:
        """Run one command (see :meth:`structenv.abc.Slot.exec`).

        Cancellation: the connection is dropped and the host kills the command's process
        tree; the caller must mark the slot ``reusable = False``.
        """
        data = await self._call("POST", "/v1/exec", self._json(request=request.to_wire()))
        return ExecResult.from_wire(json.loads(data))

    async def exec_batch(self, requests: Sequence[ExecRequest]) -> list[ExecResult]:
        """Run several commands in this slot concurrently, in one round trip.

        Raises the first per-call error (stale lease, broken slot), if any.

        Cancellation: as :meth:`exec`, for every request of the batch.
        """
        results: list[ExecResult | Exception | None] = [None] * len(requests)

        def on_result(i: int, value: ExecResult | Exception) -> None:
            results[i] = value

        calls = [(i, self.index, self.lease, r) for i, r in enumerate(requests)]
        await stream_batch(self.client, calls, on_result)
        out: list[ExecResult] = []
        for value in results:
            if not isinstance(value, ExecResult):
                raise value or SlotBrokenError("missing result")
            out.append(value)
        return out

    async def reset(self) -> None:
        """Kill everything in the slot, empty it and move this handle to the new lease.

        Cancellation: the reset may or may not have happened; the slot must be treated as
        quarantined (the pool destroys it).
        """
        data = await self._call("POST", "/v1/reset", self._json(hard=False))
        self.lease = int(json.loads(data)["lease"])

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

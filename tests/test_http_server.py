"""The lean HTTP/1.1 server (structenv._http) spoken to with raw bytes over real sockets."""

from __future__ import annotations

import functools
import os
import socket
import stat
from collections.abc import AsyncIterator

import anyio
import pytest

from structenv._http import HTTPError, Listener, Request, Responder, open_listener, parse_head

pytestmark = pytest.mark.anyio

TOKEN = "t" * 24


class App:
    """Routes: /echo (body back), /stream (three chunks), /block (waits until cancelled)."""

    def __init__(self) -> None:
        self.blocked = anyio.Event()
        self.cancelled = anyio.Event()
        self.seen: list[Request] = []

    async def __call__(self, request: Request, respond: Responder) -> None:
        self.seen.append(request)
        if request.path == "/echo":
            await respond.send(200, request.body, "application/octet-stream")
        elif request.path == "/json":
            await respond.send_json(200, {"query": request.query, "body": request.json()})
        elif request.path == "/stream":
            await respond.start_stream()
            for part in (b"a\n", b"", b"bc\n", b"d" * 70_000):
                await respond.send_chunk(part)
            await respond.end_stream()
        elif request.path == "/block":

            async def work() -> None:
                try:
                    self.blocked.set()
                    await anyio.sleep_forever()
                except anyio.get_cancelled_exc_class():
                    self.cancelled.set()
                    raise

            await respond.run_watched(work)
            assert respond.disconnected
        else:
            raise HTTPError(404, "not_found", request.path)


@pytest.fixture
async def server(tmp_path: object) -> AsyncIterator[tuple[Listener, App]]:
    app = App()
    async with open_listener(host="127.0.0.1", port=0) as listener, anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(listener.serve, app, max_body=100_000, token=TOKEN))
        yield listener, app
        tg.cancel_scope.cancel()


class Peer:
    """A raw client socket with a receive buffer."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def _fill(self) -> bool:
        try:
            data = await self.stream.receive()
        except anyio.EndOfStream:
            return False
        self.buf += data
        return True

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        """One whole response (content-length or chunked)."""
        with anyio.fail_after(10):
            while b"\r\n\r\n" not in self.buf:
                assert await self._fill(), self.buf
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers = {k.lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
            if headers.get("transfer-encoding") == "chunked":
                body = b""
                while True:
                    while b"\r\n" not in self.buf:
                        assert await self._fill()
                    size_line, self.buf = self.buf.split(b"\r\n", 1)
                    size = int(size_line, 16)
                    while len(self.buf) < size + 2:
                        assert await self._fill()
                    body += self.buf[:size]
                    self.buf = self.buf[size + 2 :]
                    if size == 0:
                        return status, headers, body
            size = int(headers.get("content-length", "0"))
            while len(self.buf) < size:
                assert await self._fill()
            body, self.buf = self.buf[:size], self.buf[size:]
            return status, headers, body

    async def closed(self) -> bool:
        """Whether the server closed the connection (after any buffered bytes)."""
        with anyio.fail_after(10):
            while await self._fill():
                pass
        return True


@pytest.fixture
async def peer(server: tuple[Listener, App]) -> AsyncIterator[Peer]:
    async with await anyio.connect_tcp("127.0.0.1", server[0].port) as stream:
        yield Peer(stream)


def _req(method: str, target: str, body: bytes = b"", extra: str = "") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n{extra}"
    if body:
        head += f"content-length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def test_sequential_and_pipelined_requests_share_one_connection(
    peer: Peer, server: tuple[Listener, App]
) -> None:
    await peer.send(_req("POST", "/echo", b"one"))
    status, headers, body = await peer.response()
    assert (status, body) == (200, b"one")
    assert headers["content-type"] == "application/octet-stream"
    # Two requests in one write: answered in order.
    await peer.send(_req("POST", "/echo", b"two") + _req("POST", "/echo", b"three"))
    assert (await peer.response())[2] == b"two"
    assert (await peer.response())[2] == b"three"
    assert [r.body for r in server[1].seen] == [b"one", b"two", b"three"]


async def test_request_split_into_single_bytes(peer: Peer) -> None:
    for byte in _req("POST", "/json?a=1&b=x%20y", b'{"k": [1, 2]}'):
        await peer.send(bytes([byte]))
    status, _, body = await peer.response()
    assert status == 200
    assert body == b'{"query":{"a":"1","b":"x y"},"body":{"k":[1,2]}}'


async def test_chunked_answer(peer: Peer) -> None:
    await peer.send(_req("GET", "/stream"))
    status, headers, body = await peer.response()
    assert status == 200
    assert headers["transfer-encoding"] == "chunked"
    assert body == b"a\nbc\n" + b"d" * 70_000


async def test_error_answer_keeps_the_connection(peer: Peer) -> None:
    await peer.send(_req("GET", "/nowhere"))
    status, _, body = await peer.response()
    assert status == 404
    assert b'"not_found"' in body
    await peer.send(_req("POST", "/echo", b"still here"))
    assert (await peer.response())[2] == b"still here"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /echo HTTP/2.0\r\nhost: x\r\n\r\n", 505),
        (b"GET /echo FTP/1.1\r\n\r\n", 400),
        (b"G(T /echo HTTP/1.1\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\n folded: value\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\nx: " + b"y" * 70_000 + b"\r\n\r\n", 431),
    ],
)
async def test_malformed_requests_are_refused_and_closed(
    peer: Peer, raw: bytes, status: int
) -> None:
    await peer.send(raw)
    got, headers, _ = await peer.response()
    assert got == status
    assert headers["connection"] == "close"
    assert await peer.closed()


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ("transfer-encoding: chunked\r\n", 413),
        ("content-length: 100001\r\n", 413),
        ("content-length: -1\r\n", 400),
        ("content-length: 1e3\r\n", 400),
        ("content-length: 3\r\ncontent-length: 4\r\n", 400),
        ("authorization: Bearer wrong\r\n", 401),
    ],
)
async def test_bad_bodies_and_tokens_are_refused(peer: Peer, extra: str, status: int) -> None:
    raw = f"POST /echo HTTP/1.1\r\nhost: x\r\n{extra}".encode()
    if "authorization" not in extra:
        raw += f"authorization: Bearer {TOKEN}\r\n".encode()
    await peer.send(raw + b"\r\n")
    assert (await peer.response())[0] == status
    assert await peer.closed()


async def test_repeated_equal_content_length_is_accepted(peer: Peer) -> None:
    await peer.send(_req("POST", "/echo", b"abc", "content-length: 3\r\n"))
    assert (await peer.response())[2] == b"abc"


async def test_expect_100_continue(peer: Peer) -> None:
    head = _req("POST", "/echo", b"body", "expect: 100-continue\r\n")[: -len(b"body")]
    await peer.send(head)
    status, _, _ = await peer.response()
    assert status == 100
    await peer.send(b"body")
    assert (await peer.response())[2] == b"body"


async def test_http10_and_connection_close_end_the_connection(peer: Peer) -> None:
    await peer.send(
        b"POST /echo HTTP/1.0\r\nauthorization: Bearer " + TOKEN.encode() + b"\r\n"
        b"content-length: 2\r\n\r\nhi"
    )
    status, headers, body = await peer.response()
    assert (status, body, headers["connection"]) == (200, b"hi", "close")
    assert await peer.closed()


async def test_connection_close_header(server: tuple[Listener, App]) -> None:
    async with await anyio.connect_tcp("127.0.0.1", server[0].port) as stream:
        peer = Peer(stream)
        await peer.send(_req("POST", "/echo", b"x", "connection: close\r\n"))
        assert (await peer.response())[2] == b"x"
        assert await peer.closed()


async def test_disconnect_cancels_the_running_request(server: tuple[Listener, App]) -> None:
    listener, app = server
    async with await anyio.connect_tcp("127.0.0.1", listener.port) as stream:
        await stream.send(_req("POST", "/block"))
        with anyio.fail_after(10):
            await app.blocked.wait()
    with anyio.fail_after(10):
        await app.cancelled.wait()


async def test_truncated_body_then_eof_is_dropped(server: tuple[Listener, App]) -> None:
    listener, app = server
    async with await anyio.connect_tcp("127.0.0.1", listener.port) as stream:
        await stream.send(_req("POST", "/echo", b"0123456789")[:-5])
        await stream.send_eof()
        with anyio.fail_after(10):
            with pytest.raises(anyio.EndOfStream):
                await stream.receive()
    assert app.seen == []


async def test_unix_listener_is_private_and_cleaned_up(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "s.sock")
    await anyio.Path(path).touch()  # a stale file where the socket goes is replaced
    app = App()
    async with open_listener(path=path) as listener, anyio.create_task_group() as tg:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        tg.start_soon(functools.partial(listener.serve, app, max_body=10, token=None))
        async with await anyio.connect_unix(path) as stream:
            peer = Peer(stream)
            await peer.send(b"POST /echo HTTP/1.1\r\ncontent-length: 2\r\n\r\nok")
            assert (await peer.response())[2] == b"ok"
        tg.cancel_scope.cancel()
    assert not await anyio.Path(path).exists()
    assert listener.sock.fileno() == -1


async def test_cancelling_the_server_closes_open_connections(tmp_path: object) -> None:
    app = App()
    async with open_listener(host="127.0.0.1", port=0) as listener:
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(listener.serve, app, max_body=10, token=None))
            client = socket.create_connection(("127.0.0.1", listener.port))
            client.sendall(b"POST /block HTTP/1.1\r\n\r\n")
            with anyio.fail_after(10):
                await app.blocked.wait()
            tg.cancel_scope.cancel()
        assert app.cancelled.is_set()
        client.settimeout(10)
        assert client.recv(100) == b""  # the server side was closed
        client.close()


def test_parse_head_joins_repeated_headers_and_reads_connection_tokens() -> None:
    head = parse_head(b"GET / HTTP/1.1\r\nX-A: 1\r\nx-a: 2\r\nConnection: keep-alive, Close")
    assert head.headers["x-a"] == "1, 2"
    assert head.close
    assert not parse_head(b"GET / HTTP/1.0\r\nconnection: keep-alive").close
    assert parse_head(b"GET / HTTP/1.0").close

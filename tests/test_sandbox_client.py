"""The sandbox client's HTTP/1.1 codec and connection pool, against a scripted raw server.

Each test runs a tiny anyio listener whose per-connection script reads requests and writes
exactly the bytes it wants (split, truncated, malformed), and watches for the client closing
the connection: a closed connection is how the sandbox server learns a caller gave up.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress

import anyio
import anyio.abc
import pytest
from anyio.streams.tls import TLSListener

from structenv.sandbox import HostClient
from structenv.sandbox._client import _Conn, _read_response

pytestmark = pytest.mark.anyio

TOKEN = "tok-" + "y" * 30
_GONE = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError)


class Peer:
    """The server's end of one connection."""

    def __init__(self, stream: anyio.abc.ByteStream, number: int) -> None:
        self.stream = stream
        self.number = number
        self.buf = b""

    async def _receive(self) -> bytes:
        try:
            return await self.stream.receive()
        except _GONE:
            return b""

    async def request(self) -> tuple[bytes, dict[bytes, bytes], bytes] | None:
        """The next request (line, headers, body), or ``None`` once the client closed."""
        while b"\r\n\r\n" not in self.buf:
            data = await self._receive()
            if not data:
                return None
            self.buf += data
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        line, *fields = head.split(b"\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (f.partition(b":") for f in fields)}
        size = int(headers.get(b"content-length", b"0"))
        while len(self.buf) < size:
            data = await self._receive()
            assert data, "client closed mid-request"
            self.buf += data
        body, self.buf = self.buf[:size], self.buf[size:]
        return line, headers, body

    async def send(self, data: bytes) -> None:
        with suppress(*_GONE):
            await self.stream.send(data)

    async def eof(self) -> None:
        """Wait until the client closes the connection."""
        while await self._receive():
            pass


Script = Callable[[Peer], Awaitable[None]]


class Server:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.closed_by_client = 0
        self.eof = anyio.Event()

    async def handle(self, stream: anyio.abc.ByteStream) -> None:
        self.connections += 1
        async with stream:
            await self.script(Peer(stream, self.connections))

    async def wait_closed(self, peer: Peer) -> None:
        """Script step: wait for the client to close this connection, and count it."""
        await peer.eof()
        self.closed_by_client += 1
        self.eof.set()


def answer(status: int, body: bytes = b"", *headers: bytes) -> bytes:
    head = [b"HTTP/1.1 %d OK" % status, b"content-length: %d" % len(body), *headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def chunked(*parts: bytes, trailer: bytes = b"") -> bytes:
    out = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n"
    out += b"transfer-encoding: chunked\r\n\r\n"
    for i, part in enumerate(parts):
        ext = b";ext=1" if i == 1 else b""
        out += b"%x%s\r\n%s\r\n" % (len(part), ext, part)
    return out + b"0\r\n" + trailer + b"\r\n"


async def echo(peer: Peer) -> None:
    """Answer every request with its own body reversed."""
    while (req := await peer.request()) is not None:
        await peer.send(answer(200, req[2][::-1]))


def _tls_contexts(tmp: str) -> tuple[ssl.SSLContext, str]:
    # openssl is installed with ca-certificates on Debian; .ci/run installs it explicitly.
    assert shutil.which("openssl"), "the TLS tests need openssl (apt-get install openssl)"
    key, cert = os.path.join(tmp, "key.pem"), os.path.join(tmp, "cert.pem")
    subprocess.run(
        [
            *(
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ),
            *("-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context, cert


@asynccontextmanager
async def serving(
    script: Script, transport: str = "unix", monkeypatch: pytest.MonkeyPatch | None = None
) -> AsyncIterator[tuple[Server, HostClient]]:
    server = Server(script)
    with tempfile.TemporaryDirectory(prefix="sc") as tmp:
        listener: anyio.abc.Listener[anyio.abc.ByteStream]
        if transport == "unix":
            path = os.path.join(tmp, "s.sock")
            listener = await anyio.create_unix_listener(path)
            client = HostClient(uds=path, token=TOKEN)
        else:
            tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
            port = tcp.extra(anyio.abc.SocketAttribute.local_port)
            listener = tcp
            if transport == "tls":
                assert monkeypatch is not None
                context, cert = _tls_contexts(tmp)
                monkeypatch.setenv("SSL_CERT_FILE", cert)  # the client's default context
                listener = TLSListener(tcp, context, standard_compatible=False)
            client = HostClient(port=port, token=TOKEN, tls=transport == "tls")
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, server.handle)
            try:
                with anyio.fail_after(20):  # a client bug must fail the test, not hang it
                    yield server, client
            finally:
                await client.aclose()
                tg.cancel_scope.cancel()


# -- keep-alive and framing ---------------------------------------------------------------


@pytest.mark.parametrize("transport", ["unix", "tcp", "tls"])
async def test_keep_alive_one_connection_for_many_requests(
    transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[bytes, dict[bytes, bytes], bytes]] = []

    async def script(peer: Peer) -> None:
        while (req := await peer.request()) is not None:
            seen.append(req)
            await peer.send(answer(200, req[2][::-1], b"Content-Type: text/plain"))

    async with serving(script, transport, monkeypatch) as (server, client):
        for i in range(20):
            status, body = await client.request(
                "POST", f"/v1/x?i={i}&p=a%20b", b"body-%d" % i, ctype="text/plain"
            )
            assert (status, body) == (200, (b"body-%d" % i)[::-1])
        status, body = await client.request("GET", "/v1/health")
        assert (status, body) == (200, b"")
        assert server.connections == 1
    line, headers, body = seen[3]
    assert line == b"POST /v1/x?i=3&p=a%20b HTTP/1.1"
    assert headers == {
        b"host": b"sandbox",
        b"authorization": b"Bearer " + TOKEN.encode(),
        b"content-type": b"text/plain",
        b"content-length": b"6",
    }
    assert body == b"body-3"


async def test_large_bodies_both_ways() -> None:
    big = os.urandom(3 << 20)

    async def script(peer: Peer) -> None:
        while (req := await peer.request()) is not None:
            await peer.send(answer(200, req[2] + req[2][:12345]))

    async with serving(script) as (server, client):
        for _ in range(2):
            status, body = await client.request("POST", "/v1/files/write", big)
            assert status == 200
            assert body == big + big[:12345]
        assert server.connections == 1


@pytest.mark.parametrize("split", [5, 17, 40, 62, 70])
async def test_content_length_body_split(split: int) -> None:
    wire = answer(200, b"0123456789" * 3, b"x-extra:  spaced value  ")

    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(wire[:split])
            await peer.send(wire[split:])

    async with serving(script) as (server, client):
        for _ in range(3):
            assert await client.request("POST", "/v1/exec", b"{}") == (200, b"0123456789" * 3)
        assert server.connections == 1


async def test_chunked_answer_in_tiny_writes() -> None:
    lines = [b'{"index":%d,"pad":"%s"}' % (i, b"p" * i) for i in range(12)]
    # One line per chunk, two lines in one chunk, a line split across chunks, a trailer.
    parts = [lines[0] + b"\n", lines[1] + b"\n" + lines[2] + b"\n", lines[3][:5]]
    parts += [lines[3][5:] + b"\n"] + [line + b"\n" for line in lines[4:]]
    wire = chunked(*parts, trailer=b"x-trailer: 1\r\n")

    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            for i in range(len(wire)):
                await peer.send(wire[i : i + 1])

    async with serving(script) as (server, client):
        for _ in range(2):
            got: list[bytes] = []
            assert await client.request_lines("/v1/exec_batch", b"{}", got.append) == (200, b"")
            assert got == lines
        assert server.connections == 1


async def test_chunked_lines_delivered_as_they_arrive() -> None:
    first_seen = anyio.Event()

    async def script(peer: Peer) -> None:
        assert await peer.request() is not None
        whole = chunked(b'{"a":1}\n', b'{"b":2}\n')
        cut = whole.index(b'{"b"')
        await peer.send(whole[:cut])
        await first_seen.wait()  # the client got line 1 while line 2 is not even sent
        await peer.send(whole[cut:])
        await server.wait_closed(peer)

    got: list[bytes] = []

    def on_line(line: bytes) -> None:
        got.append(line)
        first_seen.set()

    async with serving(script) as (server, client):
        with anyio.fail_after(10):
            assert await client.request_lines("/v1/exec_batch", b"{}", on_line) == (200, b"")
        assert got == [b'{"a":1}', b'{"b":2}']


async def test_error_answer_of_a_streamed_request() -> None:
    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(answer(409, b'{"error":"stale_lease","message":"m"}'))

    async with serving(script) as (_, client):
        got: list[bytes] = []
        status, body = await client.request_lines("/v1/exec_batch", b"{}", got.append)
        assert (status, got) == (409, [])
        assert body == b'{"error":"stale_lease","message":"m"}'


async def test_interim_100_continue_is_skipped() -> None:
    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\nx: y\r\n\r\n")
            await peer.send(answer(200, b"done"))

    async with serving(script) as (server, client):
        for _ in range(2):
            assert await client.request("POST", "/v1/exec", b"{}") == (200, b"done")
        assert server.connections == 1


async def test_connection_close_is_not_reused() -> None:
    async def script(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.send(answer(200, b"one", b"Connection: keep-alive, Close"))
        await server.wait_closed(peer)  # the server keeps it open: the client must close it

    async with serving(script) as (server, client):
        for _ in range(3):
            assert await client.request("GET", "/v1/health") == (200, b"one")
        with anyio.fail_after(10):
            while server.closed_by_client < 3:
                await server.eof.wait()
                server.eof = anyio.Event()
        assert server.connections == 3


async def test_http10_and_unframed_answers_are_not_reused() -> None:
    async def script(peer: Peer) -> None:
        assert await peer.request() is not None
        if peer.number == 1:
            await peer.send(b"HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\nold")
            await server.wait_closed(peer)
        else:  # no content-length: the body runs to the end of the connection
            await peer.send(b"HTTP/1.1 200 OK\r\n\r\nuntil")
            await peer.send(b" the end")

    async with serving(script) as (server, client):
        assert await client.request("GET", "/a") == (200, b"old")
        assert await client.request("GET", "/b") == (200, b"until the end")
        assert server.connections == 2
        assert not client._idle


async def test_codec_every_split_of_a_chunked_answer() -> None:
    wire = chunked(b"hello ", b"world\n", trailer=b"t: 1\r\n") + answer(200, b"next")

    class Pieces(_Conn):
        __slots__ = ("pieces",)

        def __init__(self, pieces: list[bytes]) -> None:
            super().__init__()
            self.pieces = pieces

        async def receive(self) -> bytes:
            return self.pieces.pop(0) if self.pieces else b""

    splits = [[wire[:k], wire[k:]] for k in range(1, len(wire))]
    splits.append([wire[i : i + 1] for i in range(len(wire))])
    for pieces in splits:
        conn = Pieces(pieces)
        for expected in (b"hello world\n", b"next"):
            got: list[bytes] = []
            assert await _read_response(conn, got.append, None) == (200, True)
            assert b"".join(got) == expected
        assert not conn.buf
        assert not conn.pieces


# -- failures -----------------------------------------------------------------------------

_BAD = {
    "status-code": b"HTTP/1.1 2000 OK\r\ncontent-length: 0\r\n\r\n",
    "version": b"HTTP/2 200\r\ncontent-length: 0\r\n\r\n",
    "garbage": b"hello there\r\n\r\n",
    "header": b"HTTP/1.1 200 OK\r\nno colon\r\ncontent-length: 0\r\n\r\n",
    "folded-header": b"HTTP/1.1 200 OK\r\nx: a\r\n  folded\r\ncontent-length: 0\r\n\r\n",
    "length": b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
    "two-lengths": b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
    "coding": b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
    "chunk-size": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0x2\r\nab\r\n0\r\n\r\n",
    "chunk-long": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
    "switching": b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
    "huge-head": b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * (70 << 10) + b"\r\n\r\n",
    "endless-head": b"HTTP/1.1 200 OK\r\n" + b"x-h: 1\r\n" * (20 << 10),
    "endless-chunk-line": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    + b"1" * (70 << 10),
}


@pytest.mark.parametrize("name", list(_BAD))
async def test_malformed_answer_breaks_and_drops_the_connection(name: str) -> None:
    async def script(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.send(_BAD[name])
        await server.wait_closed(peer)

    async with serving(script) as (server, client):
        with pytest.raises(anyio.BrokenResourceError):
            await client.request("POST", "/v1/exec", b"{}")
        with anyio.fail_after(10):
            await server.eof.wait()
        assert not client._idle


@pytest.mark.parametrize("framing", ["length", "chunked", "head"])
async def test_server_closing_mid_answer(framing: str) -> None:
    partial = {
        "length": answer(200, b"x" * 100)[:-60],
        "chunked": chunked(b"y" * 100)[:-40],
        "head": b"HTTP/1.1 200 OK\r\ncontent-le",
    }[framing]

    async def script(peer: Peer) -> None:
        assert await peer.request() is not None
        if peer.number == 1:
            await peer.send(partial)
            return  # closes the connection
        await peer.send(answer(200, b"fine"))
        await server.wait_closed(peer)

    async with serving(script) as (server, client):
        with pytest.raises(anyio.BrokenResourceError):
            await client.request("POST", "/v1/exec", b"{}")
        assert not client._idle
        assert await client.request("POST", "/v1/exec", b"{}") == (200, b"fine")
        assert server.connections == 2


async def test_stale_pooled_connection_is_not_reused() -> None:
    # A pooled connection the server has closed (its idle timeout, say) is discarded when the
    # next request takes it: that request goes out on a new connection instead of failing as
    # if the host were gone.
    async def script(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.send(answer(200, b"ok"))  # then close: the pooled connection is dead

    async with serving(script) as (server, client):
        assert await client.request("GET", "/a") == (200, b"ok")
        (idle,) = client._idle
        with anyio.fail_after(10):
            await anyio.wait_readable(idle.sock)  # type: ignore[attr-defined]
        assert await client.request("GET", "/a") == (200, b"ok")
        assert server.connections == 2


async def test_unreachable_server_is_broken() -> None:
    with tempfile.TemporaryDirectory(prefix="sc") as tmp:
        client = HostClient(uds=os.path.join(tmp, "missing.sock"))
        with pytest.raises(anyio.BrokenResourceError, match="cannot connect"):
            await client.request("GET", "/v1/health")
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()
    client = HostClient(port=port, token=TOKEN)
    with pytest.raises(anyio.BrokenResourceError, match="cannot connect"):
        await client.request("GET", "/v1/health")


async def test_invalid_request_line_is_refused() -> None:
    client = HostClient(uds="/nonexistent")
    with pytest.raises(ValueError, match="invalid"):
        await client.request("GET", "/v1/a b")
    with pytest.raises(ValueError, match="invalid"):
        await client.request("POST", "/v1/a", ctype="text/plain\r\nx: 1")
    with pytest.raises(ValueError, match="token"):
        HostClient(uds="/nonexistent", token="a\r\nx: 1")


# -- cancellation and abort ---------------------------------------------------------------


@pytest.mark.parametrize("stage", ["waiting", "mid-body", "mid-stream"])
async def test_cancellation_closes_the_connection(stage: str) -> None:
    sent = anyio.Event()

    async def script(peer: Peer) -> None:
        assert await peer.request() is not None
        if stage == "mid-stream":
            await peer.send(chunked(b"line\n", b"never\n")[:-20])  # on_line sets `sent`
        else:
            if stage == "mid-body":
                await peer.send(answer(200, b"z" * 100)[:-50])
            sent.set()
        await server.wait_closed(peer)

    lines: list[bytes] = []

    def on_line(line: bytes) -> None:
        lines.append(line)
        sent.set()  # cancel once the client is surely in the middle of the stream

    async with serving(script) as (server, client):
        async with anyio.create_task_group() as tg:
            if stage == "mid-stream":
                tg.start_soon(client.request_lines, "/v1/exec_batch", b"{}", on_line)
            else:
                tg.start_soon(client.request, "POST", "/v1/exec", b"{}")
            await sent.wait()
            tg.cancel_scope.cancel()
        with anyio.fail_after(10):
            await server.eof.wait()  # the server learns the caller gave up
        assert not client._idle
        assert not client._inflight
    if stage == "mid-stream":
        assert lines == [b"line"]


@pytest.mark.parametrize("transport", ["unix", "tcp", "tls"])
async def test_abort_fails_requests_in_flight_at_once(
    transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    received = 0
    all_received = anyio.Event()

    async def script(peer: Peer) -> None:
        nonlocal received
        while (req := await peer.request()) is not None:
            if req[2] == b"ab":
                await peer.send(answer(200, b"ba"))
                continue
            received += 1
            if received == 4:
                all_received.set()
            await server.wait_closed(peer)  # never answers: a hung host
            return

    failures: list[BaseException] = []

    async def call() -> None:
        try:
            await client.request("POST", "/v1/exec", b"{}")
        except anyio.BrokenResourceError as exc:
            failures.append(exc)

    async with serving(script, transport, monkeypatch) as (server, client):
        assert await client.request("POST", "/v1/exec", b"ab") == (200, b"ba")
        assert len(client._idle) == 1
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)  # takes the pooled connection; the server ignores it
                tg.start_soon(call)
                tg.start_soon(call)
                tg.start_soon(call)
                await all_received.wait()
                client.abort()
            assert len(failures) == 4
            assert all("declared dead" in str(exc) for exc in failures)
            while server.closed_by_client < 4:
                await server.eof.wait()
                server.eof = anyio.Event()
        with pytest.raises(anyio.BrokenResourceError, match="declared dead"):
            await client.request("GET", "/v1/health")
        assert not client._inflight


async def test_aclose_closes_idle_connections_and_refuses_later_requests() -> None:
    async def script(peer: Peer) -> None:
        await echo(peer)
        server.closed_by_client += 1
        server.eof.set()

    async with serving(script) as (server, client):
        assert await client.request("POST", "/v1/exec", b"ab") == (200, b"ba")
        await client.aclose()
        await server.eof.wait()
        with pytest.raises(anyio.ClosedResourceError):
            await client.request("POST", "/v1/exec", b"ab")
        assert server.connections == 1

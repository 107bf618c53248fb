"""The lean HTTP server (structenv._http) against abuse, over real sockets: slow or idle
clients, floods of connections without the token, descriptor exhaustion and header bytes that
make request smuggling possible."""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import socket
from collections.abc import AsyncIterator, Iterator

import anyio
import anyio.abc
import pytest

from structenv._http import (
    ConnectionLimits,
    HTTPError,
    Listener,
    Request,
    Responder,
    open_listener,
    parse_head,
)
from test_http_server import TOKEN, App, Peer, _req


async def _connect(port: int) -> anyio.abc.SocketStream:
    return await anyio.connect_tcp("127.0.0.1", port)


pytestmark = pytest.mark.anyio

#: Deadlines long enough never to fire in a test that is not about them.
RELAXED = ConnectionLimits(head_timeout=60, idle_timeout=60)
HALF_HEAD = b"POST /echo HTTP/1.1\r\nhost: x\r\n"


class SlowApp(App):
    """Adds /slow: answers after a (real) pause, longer than the head deadline it is run with."""

    async def __call__(self, request: Request, respond: Responder) -> None:
        if request.path == "/slow":
            await anyio.sleep(0.4)
            await respond.send(200, b"slow", "application/octet-stream")
        else:
            await super().__call__(request, respond)


@contextlib.asynccontextmanager
async def serving(
    limits: ConnectionLimits, *, token: str | None = TOKEN
) -> AsyncIterator[tuple[Listener, App]]:
    app = SlowApp()
    async with open_listener(host="127.0.0.1", port=0) as listener, anyio.create_task_group() as tg:
        serve = functools.partial(listener.serve, app, max_body=100_000, token=token, limits=limits)
        tg.start_soon(serve)
        yield listener, app
        tg.cancel_scope.cancel()


async def closed_by_server(stream: anyio.abc.SocketStream) -> bool:
    """Wait until the server closed ``stream`` (end of file or reset), discarding what it sent."""
    with anyio.fail_after(10):
        while True:
            try:
                await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return True


# -- deadlines ------------------------------------------------------------------------------


async def test_half_sent_head_gets_408_and_is_closed_at_the_head_deadline() -> None:
    async with serving(ConnectionLimits(head_timeout=0.2)) as (listener, _):
        start = anyio.current_time()  # before the accept the deadline counts from
        async with await anyio.connect_tcp("127.0.0.1", listener.port) as stream:
            peer = Peer(stream)
            await peer.send(HALF_HEAD)
            status, headers, _ = await peer.response()
            assert (status, headers["connection"]) == (408, "close")
            assert await peer.closed()
            assert anyio.current_time() - start >= 0.19
        # A connection that never sends a byte is bounded the same way.
        async with await anyio.connect_tcp("127.0.0.1", listener.port) as stream:
            assert await closed_by_server(stream)


async def test_trickled_head_does_not_extend_the_head_deadline() -> None:
    async with serving(ConnectionLimits(head_timeout=0.3)) as (listener, _):
        async with await anyio.connect_tcp("127.0.0.1", listener.port) as stream:

            async def trickle() -> None:
                # A slowloris: one byte of an endless header every 20 ms.
                with contextlib.suppress(anyio.BrokenResourceError, OSError):
                    await stream.send(HALF_HEAD + b"x-pad: ")
                    while True:
                        await stream.send(b"a")
                        await anyio.sleep(0.02)

            async with anyio.create_task_group() as tg:
                tg.start_soon(trickle)
                assert (await Peer(stream).response())[0] == 408
                assert await closed_by_server(stream)
                tg.cancel_scope.cancel()


async def test_idle_keep_alive_connection_is_closed_after_the_idle_timeout() -> None:
    async with serving(ConnectionLimits(head_timeout=60, idle_timeout=0.2)) as (listener, _):
        async with await anyio.connect_tcp("127.0.0.1", listener.port) as stream:
            peer = Peer(stream)
            await peer.send(_req("POST", "/echo", b"hi"))
            assert (await peer.response())[2] == b"hi"
            assert await peer.closed()  # closed without a word: nothing was asked
            assert peer.buf == b""


async def test_deadlines_do_not_cover_the_handler_or_a_keep_alive_pause() -> None:
    async with serving(ConnectionLimits(head_timeout=0.2, idle_timeout=2)) as (listener, _):
        async with await anyio.connect_tcp("127.0.0.1", listener.port) as stream:
            peer = Peer(stream)
            # The answer takes longer than the head deadline; the next request arrives at once
            # after it and is pipelined behind it: both fine.
            await peer.send(_req("POST", "/slow") + _req("POST", "/echo", b"next"))
            assert (await peer.response())[2] == b"slow"
            assert (await peer.response())[2] == b"next"
            await peer.send(_req("POST", "/slow"))
            assert (await peer.response())[2] == b"slow"


# -- connection caps ------------------------------------------------------------------------


async def test_flood_of_unauthenticated_connections_does_not_lock_out_the_token_holder() -> None:
    async with serving(RELAXED) as (listener, _), contextlib.AsyncExitStack() as stack:
        flood: list[anyio.abc.SocketStream] = []
        for _ in range(100):
            stream = await stack.enter_async_context(
                await anyio.connect_tcp("127.0.0.1", listener.port)
            )
            await stream.send(HALF_HEAD)
            flood.append(stream)
        async with await anyio.connect_tcp("127.0.0.1", listener.port) as stream:
            peer = Peer(stream)
            await peer.send(_req("POST", "/echo", b"still served"))
            assert (await peer.response())[2] == b"still served"
            # Connections are accepted in order: the 64 newest unauthenticated ones remain,
            # the authorised one pushed out one more, then left the unauthenticated count.
            stats = listener.statistics()
            assert (stats.connections, stats.unauthenticated, stats.shed) == (64, 63, 37)
            for old in flood[:37]:
                assert await closed_by_server(old)


async def test_connection_cap_sheds_unauthenticated_then_refuses() -> None:
    limits = ConnectionLimits(head_timeout=60, idle_timeout=60, max_connections=2)
    async with serving(limits) as (listener, _), contextlib.AsyncExitStack() as stack:
        connect = functools.partial(_connect, listener.port)
        a = Peer(await stack.enter_async_context(await connect()))
        await a.send(_req("POST", "/echo", b"a"))
        assert (await a.response())[2] == b"a"
        b = await stack.enter_async_context(await connect())
        await b.send(HALF_HEAD)
        # At the cap, the unauthenticated connection makes room for the newcomer...
        c = Peer(await stack.enter_async_context(await connect()))
        await c.send(_req("POST", "/echo", b"c"))
        assert (await c.response())[2] == b"c"
        assert await closed_by_server(b)
        # ... and with every connection authenticated, a newcomer is closed at once.
        d = await stack.enter_async_context(await connect())
        assert await closed_by_server(d)
        stats = listener.statistics()
        assert (stats.connections, stats.shed, stats.refused) == (2, 1, 1)
        await a.send(_req("POST", "/echo", b"a again"))
        assert (await a.response())[2] == b"a again"


async def test_without_a_token_every_connection_counts_as_authenticated() -> None:
    limits = ConnectionLimits(head_timeout=60, idle_timeout=60, max_unauthenticated=1)
    async with serving(limits, token=None) as (listener, _), contextlib.AsyncExitStack() as stack:
        connect = functools.partial(_connect, listener.port)
        a = Peer(await stack.enter_async_context(await connect()))
        await a.send(HALF_HEAD)
        b = Peer(await stack.enter_async_context(await connect()))
        await b.send(b"POST /echo HTTP/1.1\r\ncontent-length: 1\r\n\r\nb")
        assert (await b.response())[2] == b"b"
        await a.send(b"content-length: 1\r\n\r\na")
        assert (await a.response())[2] == b"a"
        stats = listener.statistics()
        assert (stats.unauthenticated, stats.shed) == (0, 0)


def _fd_limit_leaving(free: int) -> int:
    """The descriptor limit that leaves this process exactly ``free`` more descriptors."""
    used = {int(name) for name in os.listdir("/proc/self/fd")}
    limit = 0
    while limit - len({fd for fd in used if fd < limit}) < free:
        limit += 1
    return limit


@contextlib.contextmanager
def _fd_limit(soft: int) -> Iterator[None]:
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


async def test_out_of_descriptors_the_server_sheds_unauthenticated_clients() -> None:
    # Server and clients share this process: every descriptor the test needs is opened before
    # the limit is lowered, so only the server's accept() can run out.
    async with serving(RELAXED) as (listener, _):
        flood: list[socket.socket] = []
        authorised = socket.socket()
        try:
            for _ in range(100):
                flood.append(socket.create_connection(("127.0.0.1", listener.port)))
                flood[-1].sendall(HALF_HEAD)
            # Room for 16 accepted connections: far below max_unauthenticated (64), so the
            # server hits EMFILE with the flood still queued ahead of the authorised client.
            with _fd_limit(_fd_limit_leaving(16)):
                authorised.connect(("127.0.0.1", listener.port))
                authorised.setblocking(False)
                authorised.sendall(_req("POST", "/echo", b"in"))
                answer = b""
                with anyio.fail_after(10):
                    while not answer.endswith(b"\r\n\r\nin"):
                        await anyio.wait_readable(authorised)
                        data = authorised.recv(65536)
                        assert data, answer
                        answer += data
            assert answer.startswith(b"HTTP/1.1 200 ")
            stats = listener.statistics()
            assert stats.shed >= 100 - 16
            assert stats.refused == 0
        finally:
            for sock in [authorised, *flood]:
                sock.close()


# -- strict header bytes --------------------------------------------------------------------

AUTH = f"authorization: Bearer {TOKEN}\r\n".encode()


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"POST /echo HTTP/1.1\r\n" + AUTH + b"x-a: 1\nx-b: 2\r\n\r\n", id="bare-LF"),
        pytest.param(b"POST /echo HTTP/1.1\r\n" + AUTH + b"x-a: 1\rx-b: 2\r\n\r\n", id="bare-CR"),
        pytest.param(b"POST /echo HTTP/1.1\r\n" + AUTH + b"x-a: 1\n\r\n", id="LF-then-CRLF"),
        pytest.param(b"POST /echo HTTP/1.1\r\n" + AUTH + b"x-a: 1\x002\r\n\r\n", id="NUL"),
        pytest.param(b"POST /echo HTTP/1.1\r\n" + AUTH + b"x-a: 1\x01\r\n\r\n", id="SOH"),
        pytest.param(b"POST /echo HTTP/1.1\r\n" + AUTH + b"x-a: 1\x7f\r\n\r\n", id="DEL"),
        pytest.param(b"POST /echo HTTP/1.1\r\n" + AUTH + b"x@a: 1\r\n\r\n", id="name-not-token"),
        pytest.param(b"POST /echo HTTP/1.1\r\n" + AUTH + b"x-a : 1\r\n\r\n", id="space-in-name"),
        pytest.param(b"POST /ec\x01ho HTTP/1.1\r\n" + AUTH + b"\r\n", id="control-in-target"),
        pytest.param(b"POST /echo HTTP/1.1\n" + AUTH + b"\r\n", id="request-line-LF"),
        pytest.param(b"POST /echo HTTP/1.1\nhost: x\n\n", id="LF-only-head"),
    ],
)
async def test_bare_cr_lf_and_control_characters_are_refused(raw: bytes) -> None:
    async with serving(RELAXED) as (listener, app):
        async with await anyio.connect_tcp("127.0.0.1", listener.port) as stream:
            peer = Peer(stream)
            await peer.send(raw)
            status, headers, _ = await peer.response()
            assert (status, headers["connection"]) == (400, "close")
            assert await peer.closed()
        assert app.seen == []


async def test_htab_and_obs_text_in_values_are_accepted() -> None:
    async with serving(RELAXED) as (listener, app):
        async with await anyio.connect_tcp("127.0.0.1", listener.port) as stream:
            peer = Peer(stream)
            raw = _req("POST", "/echo", b"ok")
            await peer.send(raw.replace(b"host: x\r\n", b"host: x\r\nx-a: \t1\t2\xff \r\n"))
            status, _, body = await peer.response()
            assert (status, body) == (200, b"ok")
        assert app.seen[0].headers["x-a"] == "1\t2\xff"


def test_parse_head_is_strict_about_line_ends_and_characters() -> None:
    for raw in (
        b"GET / HTTP/1.1\nx: 1",
        b"GET / HTTP/1.1\r\nx: 1\r2",
        b"GET / HTTP/1.1\r\nx: \x00",
    ):
        with pytest.raises(HTTPError, match=r"malformed|control"):
            parse_head(raw)
    assert parse_head(b"GET / HTTP/1.1\r\nx-a:\t1 2\t").headers == {"x-a": "1 2"}


# -- cancellation ---------------------------------------------------------------------------


async def test_cancelling_serve_leaves_no_connection_behind() -> None:
    app = App()
    async with contextlib.AsyncExitStack() as stack:
        async with open_listener(host="127.0.0.1", port=0) as listener:
            connect = functools.partial(_connect, listener.port)
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    functools.partial(
                        listener.serve, app, max_body=100, token=TOKEN, limits=RELAXED
                    )
                )
                half = await stack.enter_async_context(await connect())
                await half.send(HALF_HEAD)
                idle = Peer(await stack.enter_async_context(await connect()))
                await idle.send(_req("POST", "/echo", b"i"))
                assert (await idle.response())[2] == b"i"
                busy = await stack.enter_async_context(await connect())
                await busy.send(_req("POST", "/block"))
                with anyio.fail_after(10):
                    await app.blocked.wait()
                stats = listener.statistics()
                assert (stats.connections, stats.unauthenticated) == (3, 1)
                # One more, maybe still in the backlog when serving stops.
                silent = await stack.enter_async_context(await connect())
                tg.cancel_scope.cancel()
            # The task group joined every connection task; each closed its socket and left
            # the books.
            assert app.cancelled.is_set()
            stats = listener.statistics()
            assert (stats.connections, stats.unauthenticated) == (0, 0)
        for stream in (half, idle.stream, busy, silent):
            assert await closed_by_server(stream)

"""Shared test configuration: every async test runs on asyncio and trio; a hang guard."""

from __future__ import annotations

import faulthandler
import os
import sys
from collections.abc import Callable, Iterator

import pytest

# Ray (tests/test_ray_backend.py): nothing may leave the machine, and the test cluster stays on
# loopback (without this, Ray rewrites 127.0.0.1 to the machine's eth0 address). Both are read
# when ray is imported and inherited by the cluster's processes, so they are set here, first.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

#: A test that runs longer than this dumps every thread's stack and kills the run, so a hang
#: shows where it hangs instead of eating CI's budget.
HANG_GUARD_SECONDS = float(os.environ.get("STRUCTENV_HANG_GUARD", "300"))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    faulthandler.dump_traceback_later(HANG_GUARD_SECONDS, exit=True, file=sys.__stderr__ or 2)
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()


#: What the background prefetches run (``tests/prefetch_support.py``).
_PREFETCH_VLLM = "import vllm_support as v; v.build_model(v.ensure_venv())"
_PREFETCH_IMAGE = (
    "import os; from structenv._image import DEFAULT_TAG, build_image; "
    "build_image(os.environ.get('STRUCTENV_TEST_IMAGE', DEFAULT_TAG))"
)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the slow builds the selected tests need, in the background, at once."""
    import prefetch_support

    if session.config.option.collectonly:
        return
    needs = set()
    for item in session.items:
        names = getattr(item, "fixturenames", ())
        if "docker_image" in names:
            needs.add("image")
        if item.nodeid.startswith("tests/test_vllm_real.py"):
            needs.add("vllm")
    if "image" in needs:
        prefetch_support.start("image", _PREFETCH_IMAGE)
    if "vllm" in needs and not os.environ.get("STRUCTENV_TEST_VLLM_URL"):
        prefetch_support.start("vllm", _PREFETCH_VLLM)


def pytest_sessionfinish(session: pytest.Session) -> None:
    import prefetch_support

    prefetch_support.stop()


#: The testing kit's plugin is opt-in (docs/testing.md); this suite uses its fixtures.
pytest_plugins = ["pytester", "structenv.testing.pytest_plugin"]


class ErrorServer:
    """A real HTTP server on 127.0.0.1 (a thread) answering each path with a fixed reply,
    counting requests: the misbehaving inference servers of the failure tests.

    ``routes`` maps a path (``/generate``, ``/v1/chat/completions``) to ``(status, body)``;
    any other path is a 404 as stock vLLM answers it.
    """

    def __init__(self) -> None:
        import http.server
        import threading

        self.routes: dict[str, tuple[int, bytes]] = {}
        self.requests: list[str] = []
        #: Called (in the server's thread) after each request is recorded.
        self.on_request: Callable[[], object] | None = None
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _reply(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                server.requests.append(self.path)
                if server.on_request is not None:
                    server.on_request()
                status, body = server.routes.get(self.path, (404, b'{"detail":"Not Found"}'))
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _reply

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


@pytest.fixture
def error_server() -> Iterator[ErrorServer]:
    server = ErrorServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def closed_port_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens (connections are refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"

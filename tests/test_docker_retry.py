"""The Docker SDK boundary: which errors are retried (no engine needed: fake SDK callables)."""

from __future__ import annotations

import anyio
import docker.errors
import pytest
import requests

from structenv.backends._docker import _Engine, _is_transient

pytestmark = pytest.mark.anyio


def _api_error(status: int, message: str = "boom") -> docker.errors.APIError:
    response = requests.Response()
    response.status_code = status
    return docker.errors.APIError(message, response=response, explanation=message)


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (requests.exceptions.ConnectionError("refused"), True),
        (_api_error(503), True),
        (_api_error(502), True),
        (_api_error(409, "removal of container x is already in progress"), True),
        (_api_error(409, "Conflict. The container name is already in use"), False),
        (_api_error(500, "invalid --security-opt"), False),
        (docker.errors.NotFound("no such container"), False),
        (docker.errors.ImageNotFound("no such image"), False),
        (TimeoutError(), False),
        (ValueError("bad"), False),
    ],
)
def test_transient_errors_are_an_explicit_list(exc: BaseException, transient: bool) -> None:
    assert _is_transient(exc) is transient


def test_cancellation_is_never_transient() -> None:
    import asyncio

    assert not _is_transient(asyncio.CancelledError())
    assert not _is_transient(KeyboardInterrupt())


async def test_transient_errors_are_retried_then_succeed() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise _api_error(503)
        return "ok"

    engine = _Engine(object(), concurrency=2, attempts=4)
    assert await engine.call(flaky) == "ok"
    assert len(calls) == 3


async def test_retries_are_bounded() -> None:
    calls: list[int] = []

    def down() -> None:
        calls.append(1)
        raise requests.exceptions.ConnectionError("engine down")

    engine = _Engine(object(), concurrency=2, attempts=3)
    with pytest.raises(requests.exceptions.ConnectionError):
        await engine.call(down)
    assert len(calls) == 3


@pytest.mark.parametrize("exc", [TimeoutError(), _api_error(404), _api_error(500)])
async def test_other_errors_are_not_retried(exc: Exception) -> None:
    calls: list[int] = []

    def fails() -> None:
        calls.append(1)
        raise exc

    engine = _Engine(object(), concurrency=2, attempts=4)
    with pytest.raises(type(exc)):
        await engine.call(fails)
    assert len(calls) == 1


async def test_cancelled_call_is_not_retried() -> None:
    calls: list[int] = []
    started = anyio.Event()

    def slow() -> None:
        calls.append(1)
        anyio.from_thread.run_sync(started.set)
        import time

        time.sleep(0.2)

    engine = _Engine(object(), concurrency=2, attempts=4)
    with anyio.move_on_after(5) as outer:
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.call, slow)
            await started.wait()
            tg.cancel_scope.cancel()
    assert not outer.cancelled_caught
    assert len(calls) == 1

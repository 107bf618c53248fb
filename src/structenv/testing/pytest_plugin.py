"""The testing kit's pytest plugin: opt in with ``-p structenv.testing.pytest_plugin``.

Installing structenv does not load it (no ``pytest11`` entry point): a library should not
change the test sessions of every project in the environment. Enable it in the project that
wants it, with ``addopts = "-p structenv.testing.pytest_plugin"`` in the pytest configuration
or ``pytest_plugins = ["structenv.testing.pytest_plugin"]`` in the root ``conftest.py``.

Fixtures (every name starts with ``structenv_``):

- ``structenv_leak_check``: a :class:`~structenv.testing.LeakChecker`; the test fails with a
  :class:`~structenv.testing.LeakError` if it leaves a slot leased, a trajectory open, an
  executor or backend running, a task or a child process behind.
- ``structenv_fake_backend``: an unstarted :class:`~structenv.testing.FakeBackend`, watched.
- ``structenv_fake_executor``: a running :class:`~structenv.ToolExecutor` on it, watched.

They work under pytest-trio (``trio_mode = true`` or ``@pytest.mark.trio``) and under anyio's
plugin (``@pytest.mark.anyio``). The leak check of an async test runs inside its event loop, in
the test's own task, the moment the test function returns (see :mod:`._leaks`); a sync test is
checked at the fixture's teardown.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Generator, Iterator
from inspect import iscoroutinefunction
from typing import Any

import pytest

from .._config import ExecutorConfig
from .._executor import ToolExecutor
from ._fake import FakeBackend
from ._leaks import LeakChecker, assert_no_leaks

__all__ = [
    "pytest_runtest_call",
    "structenv_fake_backend",
    "structenv_fake_executor",
    "structenv_leak_check",
]

_FIXTURE = "structenv_leak_check"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Run a leak-checked async test through :class:`LeakChecker` inside its event loop.

    ``tryfirst`` puts this wrapper outside pytest-trio's, which wraps whatever ``item.obj``
    is into its ``trio.run``; anyio's plugin calls ``item.obj`` in its runner.
    """
    __tracebackhide__ = True
    original = getattr(item, "obj", None)
    checker = getattr(item, "funcargs", {}).get(_FIXTURE)
    if (
        not isinstance(checker, LeakChecker)
        or not iscoroutinefunction(original)
        or hasattr(original, "hypothesis")
    ):
        return (yield)
    test = original

    @functools.wraps(test)
    async def leak_checked(**kwargs: Any) -> None:
        __tracebackhide__ = True
        await checker._run_test(test, kwargs)

    checker._in_loop = True
    item.obj = leak_checked  # type: ignore[attr-defined]
    try:
        return (yield)
    finally:
        item.obj = original  # type: ignore[attr-defined]


@pytest.fixture
def structenv_leak_check() -> Iterator[LeakChecker]:
    """Fails the test if it leaks a slot, trajectory, backend, task or child process."""
    checker = LeakChecker()
    yield checker
    if not checker._in_loop:
        checker.check()


@pytest.fixture
def structenv_fake_backend(structenv_leak_check: LeakChecker) -> FakeBackend:
    """An unstarted :class:`~structenv.testing.FakeBackend` (2 hosts x 4 slots), watched:
    the test must close it again if it starts it, and release every slot it leases."""
    backend = FakeBackend(hosts=2, slots_per_host=4)
    structenv_leak_check.watch(backend)
    return backend


@pytest.fixture
async def structenv_fake_executor(
    structenv_fake_backend: FakeBackend, structenv_leak_check: LeakChecker
) -> AsyncIterator[ToolExecutor]:
    """A running :class:`~structenv.ToolExecutor` on ``structenv_fake_backend``, watched;
    after shutdown, every slot must be back."""
    backend = structenv_fake_backend
    async with backend, ToolExecutor(backend, config=ExecutorConfig()) as executor:
        structenv_leak_check.watch(executor)
        yield executor
    assert_no_leaks(executors=[executor], backends=[backend])

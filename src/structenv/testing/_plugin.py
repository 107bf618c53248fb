"""pytest fixtures of the testing kit (registered through the ``pytest11`` entry point).

They work under anyio's pytest plugin (``@pytest.mark.anyio``) and under pytest-trio
(``@pytest.mark.trio``): sync fixtures work everywhere, and the async one is a plain async
generator that each plugin runs for the tests it owns.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from .._config import ExecutorConfig
from .._executor import ToolExecutor
from .._pool import SlotPool
from ..abc import SandboxBackend
from ._fake import FakeBackend
from ._leaks import assert_no_leaks

__all__ = ["LeakChecker"]


class LeakChecker:
    """Collects objects to check for leaks when the test ends."""

    def __init__(self) -> None:
        self.pools: list[SlotPool] = []
        self.backends: list[SandboxBackend] = []
        self.executors: list[ToolExecutor] = []
        self.processes = False

    def watch(self, *objs: SlotPool | SandboxBackend | ToolExecutor) -> None:
        """Check these at teardown."""
        for obj in objs:
            if isinstance(obj, SlotPool):
                self.pools.append(obj)
            elif isinstance(obj, SandboxBackend):
                self.backends.append(obj)
            else:
                self.executors.append(obj)

    def check(self) -> None:
        """Raise :class:`~structenv.testing.LeakError` now if anything leaked."""
        assert_no_leaks(
            pools=self.pools,
            backends=self.backends,
            executors=self.executors,
            processes=self.processes,
        )


@pytest.fixture
def structenv_leak_check() -> Iterator[LeakChecker]:
    """Fails the test at teardown if a watched pool/backend/executor leaked a slot.

    Set ``checker.processes = True`` to also require no child process left.
    """
    checker = LeakChecker()
    yield checker
    checker.check()


@pytest.fixture
def fake_backend() -> FakeBackend:
    """An unstarted :class:`~structenv.testing.FakeBackend` (2 hosts x 4 slots)."""
    return FakeBackend(hosts=2, slots_per_host=4)


@pytest.fixture
async def fake_executor(fake_backend: FakeBackend) -> AsyncIterator[ToolExecutor]:
    """A running :class:`~structenv.ToolExecutor` on :func:`fake_backend`; leak-checked."""
    async with fake_backend, ToolExecutor(fake_backend, config=ExecutorConfig()) as executor:
        yield executor
    assert_no_leaks(executors=[executor], backends=[fake_backend])

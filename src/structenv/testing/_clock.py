"""Virtual time for tests on both backends: trio's MockClock and an asyncio equivalent.

With virtual time a test about windows, deadlines or backoff runs in microseconds and is
exact: whenever every task is blocked, the clock jumps to the next deadline.
"""

from __future__ import annotations

import asyncio
import selectors
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

__all__ = ["VirtualTimeEventLoop", "virtual_time_backend"]


class _JumpingSelector(selectors.BaseSelector):
    """Wraps the real selector: when nothing is ready, jump the clock instead of sleeping."""

    def __init__(self, loop: VirtualTimeEventLoop) -> None:
        self._loop = loop
        self._inner = selectors.DefaultSelector()

    def register(
        self, fileobj: FileDescriptorLike, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(
        self, fileobj: FileDescriptorLike, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def get_map(self) -> Any:
        return self._inner.get_map()

    def close(self) -> None:
        self._inner.close()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._inner.select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            # Nothing scheduled: only real I/O can wake us.
            return self._inner.select(None)
        self._loop._now += timeout
        return []


class VirtualTimeEventLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose clock starts at 0 and jumps whenever every task is blocked.

    Use it as anyio's ``loop_factory`` (see :func:`virtual_time_backend`). Real I/O still
    works, but a pending timer wins over waiting for I/O, as with trio's autojump clock.
    """

    def __init__(self) -> None:
        self._now = 0.0
        super().__init__(selector=_JumpingSelector(self))

    def time(self) -> float:
        return self._now


def virtual_time_backend(name: str) -> tuple[str, dict[str, Any]]:
    """An ``anyio_backend`` value with an autojumping virtual clock for ``name``.

    Example::

        @pytest.fixture(params=["asyncio", "trio"])
        def anyio_backend(request):
            return virtual_time_backend(request.param)
    """
    if name == "trio":
        import trio.testing

        return "trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}
    if name == "asyncio":
        return "asyncio", {"loop_factory": VirtualTimeEventLoop}
    raise ValueError(f"unknown backend {name!r}")

"""The one seam for event-loop specifics: a clock and a one-shot wake-up, per event loop.

The batcher answers each caller through a one-shot on the caller's own task: an asyncio future,
or on trio the task itself parked with ``wait_task_rescheduled``. Each layer of
``anyio.Event`` costs three objects and two coroutine frames per call, and with 10,000 live
trajectories the garbage collector's cost of walking them grew the per-call overhead 1.6x.

As anyio keeps ``_backends/_asyncio.py`` and ``_backends/_trio.py`` behind
``get_async_backend()``, this module keeps both loops' code behind :func:`current_loop`, bound
once per batcher; the batcher itself imports neither loop. ``trio`` is imported only when trio
is the running loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import anyio
import sniffio

__all__ = ["LoopKit", "OneShot", "current_loop"]

#: ``OneShot.waiter`` once woken before its owner parked (trio).
_WOKEN: Any = object()


class _Ready:
    """An awaitable that is done at once, without a checkpoint (a wake-up came first)."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        yield from ()


_READY = _Ready()


class OneShot:
    """Something one task waits on and another wakes, exactly once (synchronously).

    Subclasses add their own slots; ``waiter`` belongs to the :class:`LoopKit`.
    """

    __slots__ = ("waiter",)

    def __init__(self) -> None:
        self.waiter: Any = None

    def _trio_abort(self, raise_cancel: object) -> Any:
        """trio's abort callback: the parked owner is being cancelled."""
        import trio

        self.waiter = None
        return trio.lowlevel.Abort.SUCCEEDED


class LoopKit:
    """The running loop's clock, ``Event`` class and one-shot wake-up.

    Attributes:
        now: The loop's clock (cheaper than ``anyio.current_time``).
        event_cls: The concrete ``anyio.Event`` class of the loop (skips a factory call).
        name: ``"asyncio"`` or ``"trio"``.
        new_waiter: What :meth:`arm` sets ``shot.waiter`` to (a C callable: an owner that
            makes its shot can arm it in its constructor, without a Python call of its own).
    """

    __slots__ = ("event_cls", "name", "new_waiter", "now")

    name: str
    now: Callable[[], float]
    event_cls: Callable[[], anyio.Event]
    new_waiter: Callable[[], Any]

    def arm(self, shot: OneShot) -> None:
        """Prepare ``shot`` before it can be woken (called by its owner, before parking)."""
        shot.waiter = self.new_waiter()

    def park(self, shot: OneShot) -> Awaitable[Any]:
        """An awaitable that waits until :meth:`wake`; done at once if it already happened.

        Not a coroutine itself: on asyncio it is the armed future (awaited directly, one
        coroutine object fewer per call, which at thousands of waiting callers is garbage the
        collector walks).

        Cancellation: propagates; a later :meth:`wake` is then a no-op.
        """
        raise NotImplementedError

    def wake(self, shot: OneShot) -> None:
        """Wake ``shot``'s owner (synchronous, idempotent, a no-op once it was cancelled)."""
        raise NotImplementedError


class _AsyncioKit(LoopKit):
    __slots__ = ("_loop",)

    def __init__(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self.name = "asyncio"
        # BaseEventLoop.time() is time.monotonic(): call that directly (one Python frame
        # fewer, read four times per tool call), unless the loop brings its own clock.
        base_time = asyncio.BaseEventLoop.time
        self.now = time.monotonic if type(loop).time is base_time else loop.time
        self.event_cls = type(anyio.Event())
        # BaseEventLoop.create_future() is Future(loop=self); Future() takes the running
        # loop (this one: a kit is used on its own loop only) from a C cache, without the
        # Python frame and at half the cost of passing loop=.
        base_future = asyncio.BaseEventLoop.create_future
        self.new_waiter = (
            asyncio.Future if type(loop).create_future is base_future else loop.create_future
        )

    def park(self, shot: OneShot) -> Awaitable[Any]:
        waiter: asyncio.Future[None] = shot.waiter
        return waiter

    def wake(self, shot: OneShot) -> None:
        waiter = shot.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _TrioKit(LoopKit):
    __slots__ = ("_current_task", "_reschedule", "_wait")

    def __init__(self) -> None:
        import trio

        self.name = "trio"
        self.now = trio.current_time
        self.event_cls = type(anyio.Event())
        self._current_task = trio.lowlevel.current_task
        self._wait = trio.lowlevel.wait_task_rescheduled
        self._reschedule = trio.lowlevel.reschedule
        self.new_waiter = type(None)  # NoneType() is None: not parked yet

    def park(self, shot: OneShot) -> Awaitable[Any]:
        if shot.waiter is _WOKEN:
            return _READY
        shot.waiter = self._current_task()
        return self._wait(shot._trio_abort)

    def wake(self, shot: OneShot) -> None:
        waiter = shot.waiter
        if waiter is _WOKEN:
            return
        shot.waiter = _WOKEN
        if waiter is not None:
            self._reschedule(waiter)


def current_loop() -> LoopKit:
    """The kit of the running event loop (asyncio or trio)."""
    if sniffio.current_async_library() == "trio":
        return _TrioKit()
    return _AsyncioKit()

"""The channel batcher: every trajectory's exec calls fan in over one bounded memory channel.

The consumer drains the channel, closes a batch on ``window`` or ``max_batch_size``, groups it
per sandbox host and starts each group as its own child task, so a slow command never delays
anyone else's call. Replies go back through a one-shot slot on the call object and an
:class:`anyio.Event`: a new memory stream per reply would cost ~4x more per call.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Final

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._exceptions import ConfigError
from ._types import ExecRequest, ExecResult
from .abc import SandboxBackend, Slot

__all__ = ["Batcher", "BatcherStatistics"]

_PENDING: Final = 0
_DISPATCHED: Final = 1
_DONE: Final = 2
_ABANDONED: Final = 3


@dataclasses.dataclass(frozen=True, slots=True)
class BatcherStatistics:
    """A snapshot of a :class:`Batcher`.

    Attributes:
        queued: Calls waiting in the channel.
        in_flight: Calls dispatched and not yet answered.
        batches: Batches dispatched so far (one per host per drain).
        dispatched: Calls dispatched so far.
        dropped: Calls dropped because their caller was cancelled before dispatch.
        max_batch: Largest batch seen.
    """

    queued: int
    in_flight: int
    batches: int
    dispatched: int
    dropped: int
    max_batch: int


class _Batch:
    """A dispatched group; cancelled as soon as every caller in it has gone away."""

    __slots__ = ("live", "scope")

    def __init__(self, size: int) -> None:
        self.live = size
        self.scope = anyio.CancelScope()


class _Call:
    __slots__ = ("batch", "event", "request", "result", "slot", "state")

    def __init__(self, slot: Slot, request: ExecRequest) -> None:
        self.slot = slot
        self.request = request
        self.state = _PENDING
        self.result: ExecResult | Exception | None = None
        self.event = anyio.Event()
        self.batch: _Batch | None = None


class Batcher:
    """Fans exec calls from many trajectories into per-host batches.

    Run :meth:`serve` in a task group (``await tg.start(batcher.serve)``), then call
    :meth:`exec` from any task. :meth:`close` stops accepting calls; calls already queued are
    still dispatched.

    Args:
        backend: Where batches are executed (:meth:`SandboxBackend.exec_batch`).
        window: Seconds a batch stays open after its first call (0: dispatch whatever is
            queued at once; batches then form naturally under load).
        max_batch_size: A batch closes early when it reaches this many calls.
        max_pending: Capacity of the channel; callers beyond it wait (back-pressure).
    """

    def __init__(
        self,
        backend: SandboxBackend,
        *,
        window: float = 0.0,
        max_batch_size: int = 256,
        max_pending: int = 4096,
    ) -> None:
        if window < 0 or math.isnan(window):
            raise ConfigError(f"batch window must be >= 0, got {window}")
        if max_batch_size < 1 or max_pending < 1:
            raise ConfigError("max_batch_size and max_pending must be >= 1")
        self._backend = backend
        self._window = window
        self._max_batch = max_batch_size
        send, recv = anyio.create_memory_object_stream[_Call](max_pending)
        self._send: MemoryObjectSendStream[_Call] = send
        self._recv: MemoryObjectReceiveStream[_Call] = recv
        self._in_flight = 0
        self._batches = 0
        self._dispatched = 0
        self._dropped = 0
        self._largest = 0

    def statistics(self) -> BatcherStatistics:
        """A snapshot of the batcher's counters."""
        return BatcherStatistics(
            queued=self._recv.statistics().current_buffer_used,
            in_flight=self._in_flight,
            batches=self._batches,
            dispatched=self._dispatched,
            dropped=self._dropped,
            max_batch=self._largest,
        )

    def close(self) -> None:
        """Stop accepting calls; :meth:`serve` returns once the queue is drained."""
        self._send.close()

    async def exec(self, slot: Slot, request: ExecRequest) -> ExecResult:
        """Run ``request`` in ``slot`` through the next batch for the slot's host.

        Raises:
            anyio.ClosedResourceError: The batcher was closed, or it stopped before this call
                was answered.
            StaleLeaseError, SlotBrokenError: As raised by the backend for this call.

        Cancellation: before dispatch, the call is dropped and never executed; after
        dispatch, the command may still run, so the slot is marked ``reusable = False``.
        """
        call = _Call(slot, request)
        try:
            self._send.send_nowait(call)
        except anyio.WouldBlock:
            await self._send.send(call)
        try:
            await call.event.wait()
        except BaseException:
            batch = call.batch
            if batch is not None:
                self._in_flight -= 1
                if call.state == _DISPATCHED:
                    slot.reusable = False
                    batch.live -= 1
                    if batch.live == 0:
                        batch.scope.cancel()
            call.state = _ABANDONED
            raise
        if call.batch is not None:
            self._in_flight -= 1
        result = call.result
        if isinstance(result, Exception):
            raise result
        assert result is not None
        return result

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Consume the channel until :meth:`close`, dispatching batches as child tasks.

        Cancellation: in-flight batches are cancelled; their callers get
        ``ClosedResourceError`` (the slot is marked not reusable), queued callers too.
        """
        recv = self._recv
        batch: list[_Call] = []
        try:
            async with anyio.create_task_group() as tg:
                task_status.started()
                while True:
                    try:
                        first = await recv.receive()
                    except anyio.EndOfStream:
                        break
                    batch = [first]
                    if self._window > 0:
                        await self._fill_window(batch)
                    else:
                        self._fill_now(batch)
                    self._dispatch(batch, tg)
                    batch = []
        finally:
            # Calls collected into an open window, or still queued, never ran: tell them.
            self._fail_pending(batch)
            while True:
                try:
                    self._fail_pending([recv.receive_nowait()])
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
            recv.close()
            self._send.close()

    def _fill_now(self, batch: list[_Call]) -> None:
        recv = self._recv
        limit = self._max_batch
        while len(batch) < limit:
            try:
                batch.append(recv.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream):
                return

    async def _fill_window(self, batch: list[_Call]) -> None:
        recv = self._recv
        deadline = anyio.current_time() + self._window
        with anyio.move_on_at(deadline):
            while len(batch) < self._max_batch:
                self._fill_now(batch)
                if len(batch) >= self._max_batch:
                    return
                try:
                    batch.append(await recv.receive())
                except anyio.EndOfStream:
                    return

    def _dispatch(self, batch: list[_Call], tg: anyio.abc.TaskGroup) -> None:
        groups: dict[str, list[_Call]] = {}
        for call in batch:
            if call.state != _PENDING:
                self._dropped += 1
                continue
            call.state = _DISPATCHED
            group = groups.get(call.slot.host_id)
            if group is None:
                groups[call.slot.host_id] = [call]
            else:
                group.append(call)
        for calls in groups.values():
            self._batches += 1
            self._dispatched += len(calls)
            self._in_flight += len(calls)
            if len(calls) > self._largest:
                self._largest = len(calls)
            group_batch = _Batch(len(calls))
            for call in calls:
                call.batch = group_batch
            tg.start_soon(self._run_batch, calls, group_batch)

    async def _run_batch(self, calls: list[_Call], batch: _Batch) -> None:
        answered = [False] * len(calls)

        def deliver(i: int, result: ExecResult | Exception) -> None:
            if answered[i]:
                return
            answered[i] = True
            call = calls[i]
            if call.state == _DISPATCHED:
                call.result = result
                call.state = _DONE
                call.event.set()

        try:
            with batch.scope:
                await self._backend.exec_batch([(c.slot, c.request) for c in calls], deliver)
        except Exception as exc:
            # A backend failure belongs to the callers of this batch, not to the batcher:
            # each caller re-raises it in its own task, and their slots are not trusted.
            self._answer_rest(calls, answered, deliver, exc)
        finally:
            self._answer_rest(
                calls, answered, deliver, anyio.ClosedResourceError("the batch ended unanswered")
            )

    @staticmethod
    def _answer_rest(
        calls: list[_Call],
        answered: list[bool],
        deliver: Callable[[int, ExecResult | Exception], None],
        error: Exception,
    ) -> None:
        for i, call in enumerate(calls):
            if not answered[i]:
                call.slot.reusable = False
                deliver(i, error)

    @staticmethod
    def _fail_pending(calls: list[_Call]) -> None:
        for call in calls:
            if call.state == _PENDING:
                call.result = anyio.ClosedResourceError("the batcher stopped before dispatch")
                call.state = _DONE
                call.event.set()

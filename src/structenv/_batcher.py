"""The channel batcher: every trajectory's exec calls fan in over one bounded memory channel.

The consumer drains the channel, closes a batch on ``window`` or ``max_batch_size``, groups it
per sandbox host and starts each group as its own child task, so a slow command never delays
anyone else's call. Replies go back through a one-shot slot on the call object and an
:class:`anyio.Event`: a new memory stream per reply would cost ~4x more per call.

The reply is a one-shot on the caller's own task (:mod:`structenv._wakeup`, the one module that
knows asyncio from trio; this one imports neither).

The client-side deadline of every call (its ``timeout`` plus a grace, in case the host itself
stops answering) is kept by one watchdog task over queues of deadlines rather than by a cancel
scope per call: a scope costs a timer-heap entry in the event loop plus enter/exit bookkeeping,
which was a third of the per-call cost. There is one queue per timeout value, in which
deadlines only grow, so tracking a call is an append (a heap entry per call was a tuple and
log n comparisons, and one more object per call in flight for the collector to walk).

When the batcher is idle (no other call queued or in flight) and the window is 0, a call takes
the express lane: the caller runs ``slot.exec`` itself under one cancel scope (its deadline,
and the batcher's shutdown). Nothing could have joined its batch anyway, and skipping the
hand-offs to the consumer and to a batch task saves three task switches, which at low load
(code and caches cold after every command) are a tenth of an exec round trip. The express lane
keeps the deadline with a cancel scope, so it is taken only when the backend's exec reacts to
cancellation (:attr:`SandboxBackend.cancellable_exec`); otherwise every call takes the batched
lane, where the watchdog answers the caller at the deadline whatever the backend does.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Awaitable, Callable
from typing import Final

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._exceptions import ConfigError
from ._types import ExecRequest, ExecResult
from ._wakeup import LoopKit, OneShot, current_loop
from .abc import SandboxBackend, Slot

__all__ = ["Batcher", "BatcherStatistics", "PendingCall"]

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
        waiting: Callers waiting for an answer (queued or in flight).
        batches: Batches dispatched so far (one per host per drain).
        dispatched: Calls dispatched so far.
        dropped: Calls dropped because their caller was cancelled before dispatch.
        expired: Calls answered with a timeout because the host did not answer in time.
        max_batch: Largest batch seen.
    """

    queued: int
    in_flight: int
    waiting: int
    batches: int
    dispatched: int
    dropped: int
    expired: int
    max_batch: int


class _Batch:
    """A dispatched group; cancelled as soon as every caller in it has gone away."""

    __slots__ = ("live", "scope")

    def __init__(self, size: int) -> None:
        self.live = size
        self.scope = anyio.CancelScope()


class _Call(OneShot):
    """One queued call. Made by :func:`_new_call`, never called with arguments."""

    __slots__ = ("batch", "deadline", "request", "result", "slot", "start", "state", "tracked")

    # The C __init__: a Python one costs the type's generic __init__ dispatch (~2,000
    # instructions, 4% of an exec) on every call.
    __init__ = object.__init__

    slot: Slot
    request: ExecRequest
    state: int
    result: ExecResult | Exception | None
    batch: _Batch | None
    start: float
    deadline: float
    tracked: bool


def _new_call(slot: Slot, request: ExecRequest, start: float, waiter: object) -> _Call:
    call: _Call = _Call()
    call.slot = slot
    call.request = request
    call.state = _PENDING
    call.result = None
    call.batch = None
    call.start = start
    call.deadline = math.inf
    call.tracked = False
    call.waiter = waiter  # armed: LoopKit.new_waiter()
    return call


#: A call queued by :meth:`Batcher.submit`, for its caller to park on and collect.
PendingCall = _Call


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
        deadline_grace: Seconds past a request's own ``timeout`` (which the host enforces)
            after which the caller stops waiting: the call returns a ``timed_out`` result with
            an ``error`` and the slot is marked not reusable.
    """

    def __init__(
        self,
        backend: SandboxBackend,
        *,
        window: float = 0.0,
        max_batch_size: int = 256,
        max_pending: int = 4096,
        deadline_grace: float = 5.0,
    ) -> None:
        if not deadline_grace >= 0:
            raise ConfigError(f"deadline grace must be >= 0, got {deadline_grace}")
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
        self._grace = deadline_grace
        self._kit: LoopKit | None = None
        #: The express lane keeps the deadline by cancelling exec: only if exec reacts to it.
        self._express_ok = window == 0 and backend.cancellable_exec
        #: Tracked calls in deadline order, one queue per request timeout (a call's deadline
        #: is its start plus its timeout plus the grace, so each queue only grows at its end).
        self._deadlines: dict[float, collections.deque[_Call]] = {}
        self._waiting = 0
        self._watch_target = math.inf
        self._watch_wakeup: anyio.Event | None = None
        self._expired = 0
        self._closed = False
        #: Cancel scopes of express-lane calls, cancelled when the batcher stops.
        self._express: set[anyio.CancelScope] = set()
        #: Set when the last express-lane call ends, while serve() waits for them to finish.
        self._express_idle: anyio.Event | None = None

    def statistics(self) -> BatcherStatistics:
        """A snapshot of the batcher's counters."""
        return BatcherStatistics(
            queued=self._recv.statistics().current_buffer_used,
            in_flight=self._in_flight,
            waiting=self._waiting,
            batches=self._batches,
            dispatched=self._dispatched,
            dropped=self._dropped,
            expired=self._expired,
            max_batch=self._largest,
        )

    def clock(self) -> Callable[[], float]:
        """The running event loop's clock, bound once (cheaper than ``anyio.current_time``)."""
        return self._loop().now

    def _loop(self) -> LoopKit:
        kit = self._kit
        if kit is None:
            kit = self._kit = current_loop()
        return kit

    def close(self) -> None:
        """Stop accepting calls; :meth:`serve` returns once the queue is drained."""
        self._closed = True
        self._send.close()

    async def exec(self, slot: Slot, request: ExecRequest) -> ExecResult:
        """Run ``request`` in ``slot`` through the next batch for the slot's host.

        If no answer arrives within ``request.timeout`` plus the deadline grace, the result
        is ``timed_out`` with an ``error`` and the slot is marked not reusable.

        Raises:
            anyio.ClosedResourceError: The batcher was closed, or it stopped before this call
                was answered.
            StaleLeaseError, SlotBrokenError: As raised by the backend for this call.

        Cancellation: before dispatch, the call is dropped and never executed; after
        dispatch, the command may still run, so the slot is marked ``reusable = False``.
        """
        kit = self._kit
        if kit is None:
            kit = self._loop()
        if not self._waiting and self._express_ok and not self._closed:
            return await self._exec_express(slot, request, kit)
        start = kit.now()
        call = _new_call(slot, request, start, kit.new_waiter())
        try:
            try:
                self._send.send_nowait(call)
            except anyio.WouldBlock:
                await self._send.send(call)
            self._track(call, start + request.timeout + self._grace)
            await kit.park(call)
        except BaseException:
            self.abandon(call)
            raise
        return self.collect(call)

    def submit(self, slot: Slot, request: ExecRequest, start: float) -> _Call | None:
        """The batched lane's first half, without a coroutine of its own.

        Queues the call and returns it armed: the caller awaits ``park(call)`` (the loop
        kit's), calls :meth:`abandon` if that raises and :meth:`collect` once it returns.
        ``None`` when the call must go through :meth:`exec` instead (the express lane, or a
        full channel: back-pressure). ``start`` is the caller's clock reading (``clock()``).
        This is :meth:`exec` in its caller's frame: one coroutine frame fewer per call, which
        every wake-up would resume and the collector would walk while the call is in flight.

        Raises:
            anyio.ClosedResourceError: The batcher was closed.
        """
        if not self._waiting and self._express_ok and not self._closed:
            return None
        kit = self._kit
        assert kit is not None  # bound by clock(), which the caller read start from
        call: _Call = _Call()  # _new_call, inline: one Python frame fewer
        call.slot = slot
        call.request = request
        call.state = _PENDING
        call.result = None
        call.batch = None
        call.start = start
        call.deadline = math.inf
        call.tracked = False
        call.waiter = kit.new_waiter()
        try:
            self._send.send_nowait(call)
        except anyio.WouldBlock:
            return None
        self._track(call, start + request.timeout + self._grace)
        return call

    def collect(self, call: _Call) -> ExecResult:
        """The answer to a submitted call whose ``park`` returned (raises what the call
        raised: ``ClosedResourceError``, ``StaleLeaseError``, ``SlotBrokenError``)."""
        self._waiting -= 1
        if call.batch is not None:
            self._in_flight -= 1
        result = call.result
        if isinstance(result, Exception):
            raise result
        assert result is not None
        return result

    @property
    def park(self) -> Callable[[_Call], Awaitable[object]]:
        """The loop kit's ``park``: await ``park(call)`` for a :meth:`submit` ted call."""
        return self._loop().park

    async def _exec_express(self, slot: Slot, request: ExecRequest, kit: LoopKit) -> ExecResult:
        """Run one call in the caller's task (see the module docstring); same contract."""
        start = kit.now()
        self._waiting += 1
        self._in_flight += 1
        self._batches += 1
        self._dispatched += 1
        self._largest = max(self._largest, 1)
        express = self._express
        result: ExecResult | None = None
        try:
            with anyio.CancelScope(deadline=start + request.timeout + self._grace) as scope:
                express.add(scope)
                try:
                    result = await slot.exec(request)
                except BaseException as exc:
                    if not isinstance(exc, Exception):
                        slot.reusable = False  # cancelled mid-command: it may still run
                    raise
        finally:
            express.discard(scope)
            self._waiting -= 1
            self._in_flight -= 1
            if not express and self._express_idle is not None:
                self._express_idle.set()  # serve() waits for the last one at shutdown
        if result is not None and not scope.cancel_called:
            return result
        # The deadline (or the end of the shutdown grace) passed: a result that still came
        # back came from a backend that ignored the cancellation; it is not trusted, exactly
        # as on the batched lane, and the slot is not reused.
        slot.reusable = False
        if self._closed and not kit.now() >= scope.deadline:
            raise anyio.ClosedResourceError("the batcher stopped before this call was answered")
        self._expired += 1
        return ExecResult(
            exit_code=None,
            timed_out=True,
            duration=kit.now() - start,
            sandboxed=slot.sandboxed,
            error="no answer from the sandbox host within the deadline",
        )

    def _track(self, call: _Call, deadline: float) -> None:
        call.tracked = True
        call.deadline = deadline
        self._waiting += 1
        timeout = call.request.timeout
        queue = self._deadlines.get(timeout)
        if queue is None:
            queue = self._deadlines[timeout] = collections.deque()
        if not queue or queue[-1].deadline <= deadline:
            queue.append(call)
        else:
            # Tracked late (the caller waited for room in the channel): keep the order.
            i = len(queue)
            while i and queue[i - 1].deadline > deadline:
                i -= 1
            queue.insert(i, call)
        if len(queue) > 2 * self._waiting + 64:
            # Answered calls stay queued until they reach the head: drop them, the answered
            # head first (calls mostly finish in order), then in one O(n) pass if need be.
            while queue and queue[0].state > _DISPATCHED:
                queue.popleft()
            if len(queue) > 2 * self._waiting + 64:
                self._deadlines[timeout] = collections.deque(
                    c for c in queue if c.state <= _DISPATCHED
                )
        if deadline < self._watch_target and self._watch_wakeup is not None:
            self._watch_wakeup.set()

    def abandon(self, call: _Call) -> None:
        """The caller of a submitted call is gone (its ``park`` raised): drop or release it."""
        state = call.state
        if state == _ABANDONED:
            return
        call.state = _ABANDONED
        if call.tracked:
            self._waiting -= 1
        batch = call.batch
        if batch is not None:
            self._in_flight -= 1
            if state == _DISPATCHED:
                call.slot.reusable = False
                batch.live -= 1
                if batch.live == 0:
                    batch.scope.cancel()

    def _expire(self, call: _Call, now: float) -> None:
        """The client-side deadline passed: answer the caller with a timeout result."""
        self._expired += 1
        if call.state == _DISPATCHED:
            call.slot.reusable = False
            batch = call.batch
            assert batch is not None
            batch.live -= 1
            if batch.live == 0:
                batch.scope.cancel()
        call.result = ExecResult(
            exit_code=None,
            timed_out=True,
            duration=now - call.start,
            sandboxed=call.slot.sandboxed,
            error="no answer from the sandbox host within the deadline",
        )
        call.state = _DONE
        self._loop().wake(call)

    async def _watch_deadlines(self) -> None:
        kit = self._loop()
        queues = self._deadlines
        while True:
            now = kit.now()
            target = math.inf
            for timeout, queue in list(queues.items()):
                while queue and (queue[0].state > _DISPATCHED or queue[0].deadline <= now):
                    call = queue.popleft()
                    if call.state <= _DISPATCHED:
                        self._expire(call, now)
                if queue:
                    target = min(target, queue[0].deadline)
                else:
                    del queues[timeout]
            self._watch_target = target
            self._watch_wakeup = wakeup = kit.event_cls()
            with anyio.move_on_at(target):
                await wakeup.wait()

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Consume the channel until :meth:`close`, dispatching batches as child tasks.

        After :meth:`close` it returns once every batch and every express-lane call (which
        runs in its caller's task) has finished.

        Cancellation: in-flight batches and express-lane calls are cancelled; their callers
        get ``ClosedResourceError`` (the slot is marked not reusable), queued callers too.
        """
        recv = self._recv
        batch: list[_Call] = []
        self._loop()
        try:
            async with anyio.create_task_group() as watchdog:
                watchdog.start_soon(self._watch_deadlines)
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
                # Calls on the express lane run in their callers' tasks, not in ``tg``: they
                # get the same shutdown grace as batches (the owner cancels us when it ends).
                while self._express:
                    self._express_idle = anyio.Event()
                    await self._express_idle.wait()
                # Every batch has finished: nothing is left to watch.
                watchdog.cancel_scope.cancel()
        finally:
            # Calls collected into an open window, or still queued, never ran: tell them.
            self._fail_pending(batch)
            while True:
                try:
                    self._fail_pending([recv.receive_nowait()])
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
            recv.close()
            self._closed = True
            self._send.close()
            for scope in self._express:
                scope.cancel()

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
        wake = self._loop().wake

        def deliver(i: int, result: ExecResult | Exception) -> None:
            if answered[i]:
                return
            answered[i] = True
            call = calls[i]
            if call.state == _DISPATCHED:
                call.result = result
                call.state = _DONE
                wake(call)

        try:
            with batch.scope:
                if len(calls) == 1:
                    # A batch of one takes the plain exec route: a single request/response
                    # is cheaper than a streamed batch (~0.25 ms less on the sandbox server).
                    call = calls[0]
                    try:
                        result: ExecResult | Exception = await call.slot.exec(call.request)
                    except Exception as exc:
                        result = exc
                    deliver(0, result)
                else:
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

    def _fail_pending(self, calls: list[_Call]) -> None:
        for call in calls:
            if call.state == _PENDING:
                call.result = anyio.ClosedResourceError("the batcher stopped before dispatch")
                call.state = _DONE
                self._loop().wake(call)

"""ExecService and SlotLease: slot leases, exec through the batcher, deadlines.

This is the layer *below* ``tools/``: it knows slots, requests and results, never a tool, a
schema or a registry. :class:`~structenv.ToolExecutor` (``_executor.py``, above ``tools/``)
routes tool calls and hands each tool a trajectory whose ``exec`` is a :class:`SlotLease`'s.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Self

import anyio
import anyio.abc
from anyio import AsyncContextManagerMixin

from ._batcher import Batcher, BatcherStatistics, PendingCall
from ._config import ExecutorConfig
from ._exceptions import ConfigError, SandboxUnavailableError, SlotError, StaleLeaseError
from ._pool import PoolStatistics, SlotPool
from ._types import ExecRequest, ExecResult
from .abc import SandboxBackend, Slot

if TYPE_CHECKING:
    from ._spec import SandboxSpec

__all__ = ["ExecService", "ExecStatistics", "LatencyStatistics", "SlotLease"]

_ids = itertools.count()
#: How many of the most recent latencies the statistics are computed over.
_LATENCY_WINDOW = 4096


@dataclasses.dataclass(frozen=True, slots=True)
class LatencyStatistics:
    """Latencies (seconds, event-loop clock) of the most recent calls.

    Attributes:
        count: Calls completed so far (all of them).
        p50, p99: Percentiles over the last 4,096 completed calls (0.0 before any).
    """

    count: int
    p50: float
    p99: float


class Latencies:
    """A bounded record of recent latencies (appending is O(1); percentiles on demand)."""

    __slots__ = ("count", "recent")

    def __init__(self) -> None:
        self.count = 0
        self.recent: collections.deque[float] = collections.deque(maxlen=_LATENCY_WINDOW)

    def record(self, seconds: float) -> None:
        self.count += 1
        self.recent.append(seconds)

    def statistics(self) -> LatencyStatistics:
        ordered = sorted(self.recent)
        if not ordered:
            return LatencyStatistics(self.count, 0.0, 0.0)

        def at(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        return LatencyStatistics(self.count, at(0.5), at(0.99))


@dataclasses.dataclass(frozen=True, slots=True)
class ExecStatistics:
    """A snapshot of an :class:`ExecService`.

    Attributes:
        active_leases: Leases inside their ``async with`` block.
        pool: The slot pool's statistics.
        batcher: The batcher's statistics.
        exec_latency: :meth:`SlotLease.exec` calls, queueing and batching included.
    """

    active_leases: int
    pool: PoolStatistics
    batcher: BatcherStatistics
    exec_latency: LatencyStatistics


class ExecService(AsyncContextManagerMixin):
    """Leases slots and runs exec calls through the batcher. Use as an async context manager.

    Entering checks the sandbox policy and starts the batcher in the service's own task
    group; leaving stops accepting calls and leases, lets in-flight calls finish for at most
    ``shutdown_grace`` seconds, then cancels them. A service is entered once: entering it
    again, while it runs or after it exited, raises ``RuntimeError``.

    Args:
        backend: A started backend.
        config: Knobs and deadlines.
    """

    def __init__(self, backend: SandboxBackend, *, config: ExecutorConfig) -> None:
        if config.max_tool_timeout < config.tool_timeout:
            raise ConfigError("max_tool_timeout must be >= tool_timeout")
        self.config = config
        self._backend = backend
        self._pool: SlotPool | None = None
        self._batcher: Batcher | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._state = "new"  # new | running | exiting | exited
        self._active = 0
        self.exec_latency = Latencies()

    @property
    def running(self) -> bool:
        """Entered and not exiting: leases may be taken."""
        return self._state == "running"

    @property
    def entered(self) -> bool:
        """Entered at some point (its pool and batcher exist)."""
        return self._state != "new"

    @property
    def pool(self) -> SlotPool:
        """The slot pool (exists once the service is entered)."""
        if self._pool is None:
            raise RuntimeError("the executor has not been entered")
        return self._pool

    @property
    def batcher(self) -> Batcher:
        """The batcher (exists once the service is entered)."""
        if self._batcher is None:
            raise RuntimeError("the executor has not been entered")
        return self._batcher

    def statistics(self) -> ExecStatistics:
        """A snapshot of the service's counters."""
        return ExecStatistics(
            active_leases=self._active,
            pool=self.pool.statistics(),
            batcher=self.batcher.statistics(),
            exec_latency=self.exec_latency.statistics(),
        )

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncIterator[Self]:
        if self._state != "new":
            raise RuntimeError("an executor is entered once; make a new one")
        config = self.config
        if config.require_sandbox and not self._backend.sandboxed:
            raise SandboxUnavailableError(
                "require_sandbox is set but the backend does not isolate its slots"
            )
        if self._backend.allow_network and not config.allow_network:
            raise ConfigError("the backend allows network access but allow_network is False")
        self._pool = SlotPool(
            self._backend,
            size=config.pool_size,
            acquire_timeout=config.acquire_timeout,
            release_timeout=config.release_timeout,
        )
        self._batcher = batcher = Batcher(
            self._backend,
            window=config.batch_window_ms / 1000,
            max_batch_size=config.max_batch_size,
            max_pending=config.max_pending_calls,
            deadline_grace=config.tool_deadline_grace,
        )
        self._state = "running"
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await tg.start(self._serve_batcher)
                try:
                    yield self
                except BaseException:
                    tg.cancel_scope.cancel()
                    raise
                finally:
                    self._state = "exiting"  # from here on, no new lease
                    batcher.close()
                # A clean exit: in-flight calls get the grace, then are cancelled.
                tg.start_soon(self._shutdown_watchdog)
        finally:
            self._state = "exited"

    async def _serve_batcher(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        await self.batcher.serve(task_status=task_status)
        # The queue is drained: stop the shutdown watchdog, if one is waiting.
        assert self._tg is not None
        self._tg.cancel_scope.cancel()

    async def _shutdown_watchdog(self) -> None:
        await anyio.sleep(self.config.shutdown_grace)
        assert self._tg is not None
        self._tg.cancel_scope.cancel()

    @asynccontextmanager
    async def lease(
        self, lease_id: str | None = None, spec: SandboxSpec | None = None
    ) -> AsyncIterator[SlotLease]:
        """Lease a slot of ``spec`` (default: the backend's), under the trajectory deadline.

        The slot is acquired inside the caller's own scope (never lazily by the batcher)
        and released and reset on exit whatever happened. With ``trajectory_timeout`` set, the
        whole block (acquisition included) raises ``TimeoutError`` when it passes.

        Raises:
            anyio.ClosedResourceError: The service is exiting or has exited.

        Cancellation: the slot is released (shielded, bounded) before the cancellation
        propagates; a call that was executing leaves the slot marked not reusable, so it is
        destroyed rather than reset.
        """
        if self._state != "running":
            if self._state == "new":
                raise RuntimeError("the executor has not been entered")
            raise anyio.ClosedResourceError("the executor has exited: no new trajectory")
        lid = lease_id if lease_id is not None else f"traj-{next(_ids)}"
        with anyio.fail_after(self.config.trajectory_timeout):
            async with self.pool.slot(spec) as slot:
                lease = SlotLease(self, slot, lid)
                self._active += 1
                try:
                    yield lease
                finally:
                    self._active -= 1
                    lease.closed = True


class SlotLease:
    """One leased slot and exec through the batcher, with the client-side deadline.

    Attributes:
        slot: The leased slot.
        id: The lease's (trajectory's) identifier.
        closed: Set when the lease's block ends; exec is refused from then on.
    """

    __slots__ = ("_batcher", "_latency", "_now", "closed", "id", "park", "slot")

    def __init__(self, service: ExecService, slot: Slot, lease_id: str) -> None:
        self.slot = slot
        self.id = lease_id
        self.closed = False
        self._batcher = batcher = service.batcher
        self._latency = service.exec_latency
        self._now = batcher.clock()
        #: Await ``park(pending)`` for a :meth:`submit` ted request.
        self.park = batcher.park

    async def exec(self, request: ExecRequest) -> ExecResult:
        """Run a command in the slot through the batcher.

        The host enforces ``request.timeout``; if no answer arrives within that plus
        ``tool_deadline_grace`` the result says ``timed_out`` and the slot is marked not
        reusable. A broken slot or stale lease becomes an error result (the slot is not
        reused).

        Raises:
            anyio.ClosedResourceError: The lease has ended or the service is shutting down.

        Cancellation: before dispatch the command never runs; after dispatch it is killed by
        the host and the slot is marked not reusable.
        """
        if self.closed:
            raise anyio.ClosedResourceError("the trajectory has ended")
        slot = self.slot
        now = self._now
        start = now()
        batcher = self._batcher
        try:
            # The batched lane in this frame (Batcher.submit/park/collect is Batcher.exec
            # without its coroutine); the express lane and back-pressure go through exec.
            call = batcher.submit(slot, request, start)
            if call is None:
                result = await batcher.exec(slot, request)
            else:
                try:
                    await self.park(call)
                except BaseException:
                    batcher.abandon(call)
                    raise
                result = batcher.collect(call)
        except (SlotError, StaleLeaseError) as exc:
            slot.reusable = False
            result = ExecResult.failure(f"{type(exc).__name__}: {exc}", sandboxed=slot.sandboxed)
        latency = self._latency  # Latencies.record, inline: one call fewer per exec
        latency.count += 1
        latency.recent.append(now() - start)
        return result

    # exec in its caller's frame, for Trajectory.call (one coroutine frame fewer per tool
    # call): ``pending = submit(request, start)``; ``None`` means ``await exec(request)``;
    # else ``await park(pending)`` (``abandon(pending)`` if it raises), then ``collect``.

    def submit(self, request: ExecRequest, start: float) -> PendingCall | None:
        """Queue ``request`` on the batched lane (``start``: this lease's clock, now), or
        ``None`` when it must go through :meth:`exec`.

        Raises:
            anyio.ClosedResourceError: The lease has ended or the service is shutting down.
        """
        if self.closed:
            raise anyio.ClosedResourceError("the trajectory has ended")
        return self._batcher.submit(self.slot, request, start)

    def abandon(self, pending: PendingCall) -> None:
        """The caller's ``park`` raised (cancelled): as :meth:`exec` when cancelled."""
        self._batcher.abandon(pending)

    def collect(self, pending: PendingCall, start: float) -> ExecResult:
        """The result of a submitted request once ``park`` returned: as :meth:`exec`'s."""
        try:
            result = self._batcher.collect(pending)
        except (SlotError, StaleLeaseError) as exc:
            slot = self.slot
            slot.reusable = False
            result = ExecResult.failure(f"{type(exc).__name__}: {exc}", sandboxed=slot.sandboxed)
        latency = self._latency
        latency.count += 1
        latency.recent.append(self._now() - start)
        return result

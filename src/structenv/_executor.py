"""ToolExecutor and Trajectory: a slot per trajectory, tool calls routed through the batcher."""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Self

import anyio
import anyio.abc

from ._batcher import Batcher, BatcherStatistics
from ._config import ExecutorConfig
from ._exceptions import ConfigError, SandboxUnavailableError, SlotError, StaleLeaseError
from ._pool import PoolStatistics, SlotPool
from ._spec import SandboxSpec
from ._types import ExecRequest, ExecResult, ToolCall, ToolResult
from .abc import SandboxBackend, Slot
from .tools import ToolRegistry, ToolServerClient, default_registry

__all__ = ["ExecutorStatistics", "LatencyStatistics", "ToolExecutor", "Trajectory"]

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


class _Latencies:
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
class ExecutorStatistics:
    """A snapshot of a :class:`ToolExecutor`.

    Attributes:
        active_trajectories: Trajectories inside their ``async with`` block.
        tool_calls: Tool calls routed so far.
        pool: The slot pool's statistics.
        batcher: The batcher's statistics.
        exec_latency: ``Trajectory.exec`` calls, queueing and batching included.
        call_latency: ``Trajectory.call`` (tool calls of every kind), validation included.
    """

    active_trajectories: int
    tool_calls: int
    pool: PoolStatistics
    batcher: BatcherStatistics
    exec_latency: LatencyStatistics
    call_latency: LatencyStatistics


class ToolExecutor:
    """Runs trajectories' tool calls against a backend. Use as an async context manager.

    Entering checks the sandbox policy and starts the batcher in the executor's own task
    group; leaving stops accepting calls, lets in-flight ones finish for at most
    ``shutdown_grace`` seconds, then cancels them.

    Args:
        backend: A started backend.
        config: Knobs and deadlines.
        registry: The tools the model may call (default: the built-in ``default`` toolset).
        tool_server: Client for tools that do not run in the sandbox.
    """

    def __init__(
        self,
        backend: SandboxBackend,
        *,
        config: ExecutorConfig | None = None,
        registry: ToolRegistry | None = None,
        tool_server: ToolServerClient | None = None,
    ) -> None:
        self.config = config = config or ExecutorConfig()
        if config.max_tool_timeout < config.tool_timeout:
            raise ConfigError("max_tool_timeout must be >= tool_timeout")
        self._backend = backend
        self.registry = (
            registry
            if registry is not None
            else default_registry().select(enabled_toolsets=["default"])
        )
        self.tool_server = tool_server
        self._pool: SlotPool | None = None
        self._batcher: Batcher | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._active = 0
        self._exiting = False
        self._exec_latency = _Latencies()
        self._call_latency = _Latencies()
        self._tool_calls = 0

    @property
    def pool(self) -> SlotPool:
        """The slot pool (exists once the executor is entered)."""
        if self._pool is None:
            raise RuntimeError("the executor has not been entered")
        return self._pool

    def statistics(self) -> ExecutorStatistics:
        """A snapshot of the executor's counters."""
        pool = self.pool
        assert self._batcher is not None
        return ExecutorStatistics(
            active_trajectories=self._active,
            tool_calls=self._tool_calls,
            pool=pool.statistics(),
            batcher=self._batcher.statistics(),
            exec_latency=self._exec_latency.statistics(),
            call_latency=self._call_latency.statistics(),
        )

    async def __aenter__(self) -> Self:
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
        self._batcher = Batcher(
            self._backend,
            window=config.batch_window_ms / 1000,
            max_batch_size=config.max_batch_size,
            max_pending=config.max_pending_calls,
            deadline_grace=config.tool_deadline_grace,
        )
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        try:
            await tg.start(self._serve_batcher)
        except BaseException as exc:
            tg.cancel_scope.cancel()
            with anyio.move_on_after(config.shutdown_grace, shield=True):
                await tg.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def _serve_batcher(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        assert self._batcher is not None
        await self._batcher.serve(task_status=task_status)
        # The queue is drained: stop the shutdown watchdog, if one is waiting.
        assert self._tg is not None
        self._tg.cancel_scope.cancel()

    async def _shutdown_watchdog(self) -> None:
        await anyio.sleep(self.config.shutdown_grace)
        assert self._tg is not None
        self._tg.cancel_scope.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg = self._tg
        assert tg is not None and self._batcher is not None
        self._exiting = True  # from here on, no new trajectory may lease a slot
        self._batcher.close()
        if exc is None:
            tg.start_soon(self._shutdown_watchdog)
        else:
            tg.cancel_scope.cancel()
        return await tg.__aexit__(exc_type, exc, tb)

    @asynccontextmanager
    async def trajectory(
        self, trajectory_id: str | None = None, *, spec: SandboxSpec | None = None
    ) -> AsyncIterator[Trajectory]:
        """Lease a slot of ``spec`` (default: the backend's) for one trajectory, under the
        trajectory deadline.

        The slot is acquired inside the trajectory's own scope (never lazily by the batcher)
        and released and reset on exit whatever happened. With ``trajectory_timeout`` set, the
        whole block (acquisition included) raises ``TimeoutError`` when it passes.

        Raises:
            anyio.ClosedResourceError: The executor is exiting or has exited.

        Cancellation: the slot is released (shielded, bounded) before the cancellation
        propagates; a call that was executing leaves the slot marked not reusable, so it is
        destroyed rather than reset.
        """
        if self._tg is None:
            raise RuntimeError("the executor has not been entered")
        if self._exiting:
            raise anyio.ClosedResourceError("the executor has exited: no new trajectory")
        tid = trajectory_id if trajectory_id is not None else f"traj-{next(_ids)}"
        with anyio.fail_after(self.config.trajectory_timeout):
            async with self.pool.slot(spec) as slot:
                traj = Trajectory(self, slot, tid)
                self._active += 1
                try:
                    yield traj
                finally:
                    self._active -= 1
                    traj._closed = True


class Trajectory:
    """One trajectory's view of the executor: its slot, exec and tool calls.

    Implements :class:`~structenv.tools.ToolContext` for the tools it runs.
    """

    __slots__ = ("_closed", "_executor", "_slot", "id", "tool_calls")

    def __init__(self, executor: ToolExecutor, slot: Slot, trajectory_id: str) -> None:
        self._executor = executor
        self._slot = slot
        self._closed = False
        self.id = trajectory_id
        self.tool_calls = 0

    @property
    def slot(self) -> Slot:
        """The leased slot."""
        return self._slot

    @property
    def tool_timeout(self) -> float:
        return self._executor.config.tool_timeout

    @property
    def max_tool_timeout(self) -> float:
        return self._executor.config.max_tool_timeout

    @property
    def max_output(self) -> int:
        return self._executor.config.max_output_bytes

    @property
    def tool_server(self) -> ToolServerClient | None:
        return self._executor.tool_server

    def specs(self) -> list[dict[str, object]]:
        """OpenAI function specs of the tools this trajectory may call."""
        return self._executor.registry.specs()

    async def exec(self, request: ExecRequest) -> ExecResult:
        """Run a command in the slot through the batcher.

        The host enforces ``request.timeout``; if no answer arrives within that plus
        ``tool_deadline_grace`` the result says ``timed_out`` and the slot is marked not
        reusable. A broken slot or stale lease becomes an error result (the slot is not
        reused).

        Raises:
            anyio.ClosedResourceError: The executor is shutting down.

        Cancellation: before dispatch the command never runs; after dispatch it is killed by
        the host and the slot is marked not reusable.
        """
        if self._closed:
            raise anyio.ClosedResourceError("the trajectory has ended")
        slot = self._slot
        executor = self._executor
        batcher = executor._batcher
        assert batcher is not None
        now = batcher.clock()
        start = now()
        try:
            result = await batcher.exec(slot, request)
        except (SlotError, StaleLeaseError) as exc:
            slot.reusable = False
            result = ExecResult.failure(f"{type(exc).__name__}: {exc}", sandboxed=slot.sandboxed)
        executor._exec_latency.record(now() - start)
        return result

    async def call(self, call: ToolCall) -> ToolResult:
        """Route one tool call; every failure of the call is a result.

        Unknown tools and arguments that fail the tool's schema never reach the sandbox.

        Cancellation: as :meth:`exec` for sandbox tools; external calls may have run.
        """
        registry = self._executor.registry
        tool = registry.get(call.name)
        if tool is None:
            return ToolResult(
                call.id,
                call.name,
                f"error: unknown tool {call.name!r}; available tools: "
                + ", ".join(registry.names()),
                error="unknown_tool",
            )
        problem = registry.validate(call)
        if problem is not None:
            return ToolResult(
                call.id,
                call.name,
                f"error: invalid arguments for {call.name}: {problem}",
                error="invalid_arguments",
            )
        self.tool_calls += 1
        executor = self._executor
        executor._tool_calls += 1
        assert executor._batcher is not None
        now = executor._batcher.clock()
        start = now()
        result = await tool.run(self, call)
        executor._call_latency.record(now() - start)
        return result

    async def call_many(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        """Run several calls of one step concurrently; results in the calls' order.

        Cancellation: as :meth:`call`, for each call still running.
        """
        if len(calls) == 1:
            return [await self.call(calls[0])]
        results: list[ToolResult | None] = [None] * len(calls)

        async def one(i: int, call: ToolCall) -> None:
            results[i] = await self.call(call)

        async with anyio.create_task_group() as tg:
            for i, call in enumerate(calls):
                tg.start_soon(one, i, call)
        return [r for r in results if r is not None]

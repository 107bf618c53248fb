"""ToolExecutor and Trajectory: tool-call routing, above ``tools/``.

The executor's two jobs are split so that imports point one way: slot leases, exec and
deadlines live below ``tools/`` in :mod:`structenv._exec` (:class:`~structenv._exec.ExecService`,
:class:`~structenv._exec.SlotLease`); this module routes tool calls (lookup, validation, the
one unknown-tool message, ``call_many``) and hands each tool the :class:`Trajectory` as its
:class:`~structenv.tools.ToolContext`. ``tools/`` never imports this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Self

import anyio
from anyio import AsyncContextManagerMixin

from ._batcher import BatcherStatistics
from ._config import ExecutorConfig
from ._exec import ExecService, Latencies, LatencyStatistics, SlotLease
from ._pool import PoolStatistics, SlotPool
from ._spec import SandboxSpec
from ._types import ExecRequest, ExecResult, ToolCall, ToolResult
from .abc import SandboxBackend, Slot
from .tools import CommandTool, ToolRegistry, ToolServerClient, default_registry
from .tools._base import exec_tool_result

__all__ = [
    "ExecutorStatistics",
    "LatencyStatistics",
    "ToolExecutor",
    "Trajectory",
    "unknown_tool_result",
]


#: A tool whose class keeps this ``run`` is run inline by :meth:`Trajectory.call`.
_COMMAND_RUN = CommandTool.run
#: ... and a tool that keeps this ``result`` gets :func:`~structenv.tools.exec_tool_result`.
_COMMAND_RESULT = CommandTool.result


def unknown_tool_result(call: ToolCall, available: Iterable[str]) -> ToolResult:
    """The one answer to a call of a tool that does not exist (never reaches a sandbox)."""
    names = ", ".join(sorted(available)) or "none"
    return ToolResult(
        call.id,
        call.name,
        f"error: unknown tool {call.name!r}; available tools: {names}",
        error="unknown_tool",
    )


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


class ToolExecutor(AsyncContextManagerMixin):
    """Runs trajectories' tool calls against a backend. Use as an async context manager.

    Entering checks the sandbox policy and starts the batcher in the executor's own task
    group; leaving stops accepting calls, lets in-flight ones finish for at most
    ``shutdown_grace`` seconds, then cancels them. An executor is entered once: entering it
    again, while it runs or after it exited, raises ``RuntimeError``.

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
        self.service = ExecService(backend, config=config)
        self.registry = (
            registry
            if registry is not None
            else default_registry().select(enabled_toolsets=["default"])
        )
        self.tool_server = tool_server
        self.call_latency = Latencies()
        self.tool_calls = 0

    @property
    def pool(self) -> SlotPool:
        """The slot pool (exists once the executor is entered)."""
        return self.service.pool

    @property
    def running(self) -> bool:
        """Entered and not exiting: trajectories may start."""
        return self.service.running

    @property
    def entered(self) -> bool:
        """Entered at some point (its statistics exist)."""
        return self.service.entered

    def statistics(self) -> ExecutorStatistics:
        """A snapshot of the executor's counters."""
        stats = self.service.statistics()
        return ExecutorStatistics(
            active_trajectories=stats.active_leases,
            tool_calls=self.tool_calls,
            pool=stats.pool,
            batcher=stats.batcher,
            exec_latency=stats.exec_latency,
            call_latency=self.call_latency.statistics(),
        )

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncIterator[Self]:
        async with self.service:
            yield self

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
        async with self.service.lease(trajectory_id, spec) as lease:
            yield Trajectory(self, lease)


class Trajectory:
    """One trajectory's view of the executor: its slot, exec and tool calls.

    Implements :class:`~structenv.tools.ToolContext` for the tools it runs.
    """

    __slots__ = (
        "_executor",
        "_lease",
        "_now",
        "_park",
        "_registry",
        "exec",
        "id",
        "max_output",
        "max_tool_timeout",
        "tool_calls",
        "tool_server",
        "tool_timeout",
    )

    #: Run a command in the slot through the batcher (:meth:`structenv._exec.SlotLease.exec`:
    #: the same deadline, error and cancellation contract), bound once per trajectory.
    exec: Callable[[ExecRequest], Coroutine[Any, Any, ExecResult]]

    def __init__(self, executor: ToolExecutor, lease: SlotLease) -> None:
        self._executor = executor
        self._lease = lease
        self._registry = executor.registry
        self._now = lease._now
        self._park = lease.park
        self.id = lease.id
        self.tool_calls = 0
        # ToolContext: plain attributes read on every tool call, copied once from the
        # executor (its config is fixed once it runs).
        config = executor.config
        #: Default per-call deadline in seconds.
        self.tool_timeout: float = config.tool_timeout
        #: Largest deadline a model may ask for.
        self.max_tool_timeout: float = config.max_tool_timeout
        #: Byte cap for each of stdout and stderr.
        self.max_output: int = config.max_output_bytes
        #: The external tool server, if configured.
        self.tool_server: ToolServerClient | None = executor.tool_server
        # Bound, not delegated: tools call it on every tool call, and a delegating method
        # would be one more coroutine frame per call.
        self.exec = lease.exec

    @property
    def slot(self) -> Slot:
        """The leased slot."""
        return self._lease.slot

    def specs(self) -> list[dict[str, object]]:
        """OpenAI function specs of the tools this trajectory may call."""
        return self._registry.specs()

    async def call(self, call: ToolCall) -> ToolResult:
        """Route one tool call; every failure of the call is a result.

        Unknown tools and arguments that fail the tool's schema never reach the sandbox.

        Raises:
            anyio.ClosedResourceError: The trajectory has ended or the executor is stopping.

        Cancellation: as :meth:`exec` for sandbox tools; external calls may have run.
        """
        registry = self._registry
        route = registry.route(call.name)
        if route is None:
            return unknown_tool_result(call, registry.names())
        tool, is_valid = route
        try:
            valid = is_valid(call.arguments)
        except ValueError:
            valid = False
        if not valid:
            problem = registry.validate(call)  # the judge, and why (not JSON data, ...)
            if problem is not None:
                return ToolResult(
                    call.id,
                    call.name,
                    f"error: invalid arguments for {call.name}: {problem}",
                    error="invalid_arguments",
                )
        if self._lease.closed:
            raise anyio.ClosedResourceError("the trajectory has ended")
        self.tool_calls += 1
        executor = self._executor
        executor.tool_calls += 1
        now = self._now
        start = now()
        if type(tool).run is _COMMAND_RUN:
            # CommandTool.run's three steps in this frame: one coroutine fewer per call (the
            # check above is the type check; no cast() call on the hot path).
            command_tool: CommandTool = tool  # type: ignore[assignment]
            request = command_tool.request(self, call)
            # The lease's exec in this frame too (SlotLease.submit/park/collect): one
            # coroutine frame fewer per tool call.
            lease = self._lease
            exec_start = now()
            pending = lease.submit(request, exec_start)
            if pending is None:
                exec_result = await self.exec(request)
            else:
                try:
                    await self._park(pending)
                except BaseException:
                    lease.abandon(pending)
                    raise
                exec_result = lease.collect(pending, exec_start)
            if type(command_tool).result is _COMMAND_RESULT:
                result = exec_tool_result(call, exec_result)  # one frame fewer
            else:
                result = command_tool.result(call, exec_result)
        else:
            result = await tool.run(self, call)
        latency = executor.call_latency  # Latencies.record, inline
        latency.count += 1
        latency.recent.append(now() - start)
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

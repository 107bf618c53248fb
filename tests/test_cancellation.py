"""Cancellation as an input: at every await point, nothing leaks (httpcore style)."""

from __future__ import annotations

import functools
import random
from collections.abc import Awaitable, Callable

import anyio
import pytest
import sniffio

from structenv import ExecRequest, ExecutorConfig, ToolCall, ToolExecutor
from structenv.testing import FakeBackend, assert_no_leaks, virtual_time_backend

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return virtual_time_backend(request.param)


async def trajectory(executor: ToolExecutor, steps: list[str], sleep: float = 0.001) -> None:
    """Every kind of await point a trajectory has, in one body."""
    async with executor.trajectory() as traj:
        steps.append("acquired")
        await traj.exec(ExecRequest(f"sleep {sleep}", timeout=5))
        steps.append("exec")
        await traj.call(ToolCall("terminal", {"command": "echo x"}))
        steps.append("call")
        await traj.call_many(
            [
                ToolCall("terminal", {"command": f"sleep {2 * sleep}"}),
                ToolCall("terminal", {"command": "true"}),
            ]
        )
        steps.append("call_many")
        await traj.call(ToolCall("write_file", {"path": "a", "content": "b"}))
        await traj.call(ToolCall("read_file", {"path": "a"}))
        steps.append("files")
    steps.append("released")


def _backend() -> FakeBackend:
    return FakeBackend(
        slots_per_host=2, acquire_latency=0.003, exec_latency=0.0005, reset_latency=0.004
    )


async def test_cancel_at_every_point_in_time() -> None:
    async with _backend() as backend, ToolExecutor(backend) as executor:
        full: list[str] = []
        start = anyio.current_time()
        await trajectory(executor, full)
        total = anyio.current_time() - start
        assert full[-1] == "released"
        reached: set[str] = set()
        step = 0.00025
        for k in range(int(total / step) + 2):
            steps: list[str] = []
            with anyio.move_on_after(k * step):
                await trajectory(executor, steps)
            reached.add(steps[-1] if steps else "none")
            assert_no_leaks(executors=[executor], backends=[backend])
        # The grid cut the trajectory in every stage that takes time (the zero-time ones are
        # covered by the scheduling-point test below).
        assert reached >= {"none", "acquired", "exec", "call", "released"}


async def _cancel_after_steps(k: int, body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` in a new task and cancel it right after its k-th scheduling step.

    After a step the task is suspended at an await: blocked (the cancellation aborts the
    wait) or rescheduled. On trio an instrument counts the task's own steps (trio's scheduler
    is randomised, so a sibling counting its own yields would not be exact); asyncio
    schedules FIFO, so a sibling that yields k times lands after the body's k-th step.
    """
    scope = anyio.CancelScope()

    async def victim() -> None:
        with scope:
            await body()

    if sniffio.current_async_library() == "trio":
        import trio

        class CancelAtStep(trio.abc.Instrument):
            def __init__(self) -> None:
                self.task: trio.lowlevel.Task | None = None
                self.steps = 0

            def task_spawned(self, task: trio.lowlevel.Task) -> None:
                if self.task is None and task.name.endswith("victim"):
                    self.task = task

            def after_task_step(self, task: trio.lowlevel.Task) -> None:
                if task is self.task:
                    self.steps += 1
                    if self.steps == k:
                        scope.cancel()

        if k == 0:
            scope.cancel()
        instrument = CancelAtStep()
        trio.lowlevel.add_instrument(instrument)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(victim)
        finally:
            trio.lowlevel.remove_instrument(instrument)
        return

    async def killer() -> None:
        for _ in range(k):
            await anyio.lowlevel.checkpoint()
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(victim)
        tg.start_soon(killer)


async def test_cancel_after_every_scheduling_point() -> None:
    """Zero-time checkpoints too: cancel before the trajectory's k-th step, for every k."""
    async with FakeBackend(slots_per_host=2) as backend, ToolExecutor(backend) as executor:
        outcomes: set[str] = set()
        for k in range(120):
            steps: list[str] = []
            await _cancel_after_steps(k, functools.partial(trajectory, executor, steps, sleep=0))
            outcomes.add(steps[-1] if steps else "none")
            assert_no_leaks(executors=[executor], backends=[backend])
        # ("files" is never last: the release after it is shielded, so "released" follows.)
        assert outcomes == {"none", "acquired", "exec", "call", "call_many", "released"}


async def test_ten_thousand_random_cancellations() -> None:
    """200 trajectories on a pool of 50, 50 rounds, each trajectory cancelled at random."""
    rng = random.Random(20261124)
    baseline = len(anyio.get_running_tasks())
    backend = FakeBackend(
        hosts=5,
        slots_per_host=10,
        acquire_latency=0.0002,
        exec_latency=0.0001,
        reset_latency=0.0003,
    )
    config = ExecutorConfig(batch_window_ms=0.5, acquire_timeout=30)
    cancelled = 0
    async with backend, ToolExecutor(backend, config=config) as executor:

        async def member(deadline: float, calls: int) -> None:
            nonlocal cancelled
            with anyio.move_on_after(deadline) as scope:
                async with executor.trajectory() as traj:
                    for _ in range(calls):
                        await traj.exec(ExecRequest(f"sleep {rng.random() * 0.002:.6f}"))
            cancelled += scope.cancelled_caught

        for _ in range(50):
            async with anyio.create_task_group() as tg:
                for _ in range(200):
                    tg.start_soon(member, rng.random() * 0.02, rng.randint(1, 8))
            assert_no_leaks(executors=[executor], backends=[backend])
    assert backend.acquires == backend.releases
    assert backend.statistics().leased == 0
    assert len(anyio.get_running_tasks()) == baseline
    # Most of the 10,000 trajectories were cut somewhere; the rest finished.
    assert cancelled > 5000

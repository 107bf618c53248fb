"""The channel batcher: windows, sizes, per-host grouping, no head-of-line blocking."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from structenv import (
    Batcher,
    ConfigError,
    ExecRequest,
    ExecResult,
    ExecutorConfig,
    SlotPool,
    ToolCall,
    ToolExecutor,
)
from structenv._wakeup import OneShot, current_loop
from structenv.abc import Slot
from structenv.testing import FakeBackend, assert_no_leaks, virtual_time_backend

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return virtual_time_backend(request.param)


async def test_window_collects_calls_into_one_batch_per_host() -> None:
    async with FakeBackend(hosts=2, slots_per_host=4) as backend:
        pool = SlotPool(backend)
        batcher = Batcher(backend, window=0.010)
        async with anyio.create_task_group() as tg:
            await tg.start(batcher.serve)

            async def one() -> None:
                async with pool.slot() as slot:
                    result = await batcher.exec(slot, ExecRequest("true"))
                    assert result.exit_code == 0

            async with anyio.create_task_group() as callers:
                for _ in range(8):
                    callers.start_soon(one)
            batcher.close()
        stats = batcher.statistics()
        # 8 calls over 2 hosts inside one window: exactly one batch per host.
        assert stats.dispatched == 8 and stats.batches == 2 and stats.max_batch == 4
        assert_no_leaks(pools=[pool], backends=[backend])


async def test_max_batch_size_closes_the_batch_early() -> None:
    async with FakeBackend(slots_per_host=8) as backend:
        pool = SlotPool(backend)
        batcher = Batcher(backend, window=10.0, max_batch_size=4)
        done_at: list[float] = []
        async with anyio.create_task_group() as tg:
            await tg.start(batcher.serve)

            async def one() -> None:
                async with pool.slot() as slot:
                    await batcher.exec(slot, ExecRequest("true"))
                    done_at.append(anyio.current_time())

            start = anyio.current_time()
            async with anyio.create_task_group() as callers:
                for _ in range(4):
                    callers.start_soon(one)
            batcher.close()
        # Full at 4 calls: nobody waited for the 10 s window.
        assert max(done_at) - start < 0.001
        assert_no_leaks(pools=[pool], backends=[backend])


async def test_slow_call_does_not_delay_fast_calls_on_the_same_host() -> None:
    """One 2 s call while 49 trajectories make 20 fast calls: latency <= window + 5 ms."""
    window = 0.010
    async with FakeBackend(hosts=1, slots_per_host=50) as backend:
        pool = SlotPool(backend)
        batcher = Batcher(backend, window=window)
        latencies: list[float] = []
        async with anyio.create_task_group() as tg:
            await tg.start(batcher.serve)

            async def slow() -> None:
                async with pool.slot() as slot:
                    result = await batcher.exec(slot, ExecRequest("sleep 2", timeout=10))
                    assert result.exit_code == 0

            async def fast() -> None:
                async with pool.slot() as slot:
                    for _ in range(20):
                        start = anyio.current_time()
                        await batcher.exec(slot, ExecRequest("true"))
                        latencies.append(anyio.current_time() - start)

            async with anyio.create_task_group() as callers:
                callers.start_soon(slow)
                for _ in range(49):
                    callers.start_soon(fast)
            batcher.close()
        assert len(latencies) == 49 * 20
        assert max(latencies) <= window + 0.005
        assert_no_leaks(pools=[pool], backends=[backend])


async def test_call_cancelled_before_dispatch_is_dropped_not_executed() -> None:
    async with FakeBackend(slots_per_host=1) as backend:
        pool = SlotPool(backend)
        batcher = Batcher(backend, window=1.0)
        async with anyio.create_task_group() as tg:
            await tg.start(batcher.serve)
            async with pool.slot() as slot:
                with anyio.move_on_after(0.5):
                    await batcher.exec(slot, ExecRequest("echo never"))
                assert slot.reusable, "a call that never ran must not taint the slot"
            await anyio.sleep(2)
            batcher.close()
        assert backend.execs == 0
        assert batcher.statistics().dropped == 1
        assert_no_leaks(pools=[pool], backends=[backend])


async def test_call_cancelled_after_dispatch_taints_the_slot() -> None:
    async with FakeBackend(slots_per_host=1) as backend:
        pool = SlotPool(backend)
        batcher = Batcher(backend)
        async with anyio.create_task_group() as tg:
            await tg.start(batcher.serve)
            async with pool.slot() as slot:
                with anyio.move_on_after(0.5):
                    await batcher.exec(slot, ExecRequest("sleep 5", timeout=10))
                assert not slot.reusable
            batcher.close()
        # Not reusable: destroyed and replaced, never reset and handed out.
        assert backend.destroyed == 1
        assert_no_leaks(pools=[pool], backends=[backend])


async def test_channel_is_bounded_back_pressure() -> None:
    async with FakeBackend(slots_per_host=8) as backend:
        pool = SlotPool(backend)
        batcher = Batcher(backend, window=1.0, max_pending=2)
        async with pool.slot() as slot:
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(batcher.exec, slot, ExecRequest("true"))
                await anyio.wait_all_tasks_blocked()
                # Nobody consumes yet: exactly max_pending calls are buffered.
                assert batcher.statistics().queued == 2
                await tg.start(batcher.serve)
                await anyio.sleep(3)
                batcher.close()
        assert batcher.statistics().dispatched == 5
        assert_no_leaks(pools=[pool], backends=[backend])


async def test_backend_errors_reach_only_their_callers() -> None:
    async with FakeBackend(slots_per_host=2) as backend:
        pool = SlotPool(backend)
        batcher = Batcher(backend)
        async with anyio.create_task_group() as tg:
            await tg.start(batcher.serve)
            async with pool.slot() as a, pool.slot() as b:
                from structenv import SlotBrokenError

                with pytest.raises(SlotBrokenError):
                    await batcher.exec(a, ExecRequest("broken"))
                ok = await batcher.exec(b, ExecRequest("echo fine"))
                assert ok.stdout == b"fine\n"
            batcher.close()
        assert_no_leaks(pools=[pool], backends=[backend])


async def test_stopped_batcher_answers_queued_callers() -> None:
    async with FakeBackend(slots_per_host=4) as backend:
        pool = SlotPool(backend)
        batcher = Batcher(backend, window=5.0)
        outcomes: list[str] = []

        async def caller(slot_cm: object) -> None:
            async with pool.slot() as slot:
                try:
                    await batcher.exec(slot, ExecRequest("sleep 1", timeout=10))
                    outcomes.append("result")
                except anyio.ClosedResourceError:
                    outcomes.append("closed")

        async with anyio.create_task_group() as callers:
            async with anyio.create_task_group() as service:
                await service.start(batcher.serve)
                for _ in range(4):
                    callers.start_soon(caller, None)
                await anyio.sleep(1)
                service.cancel_scope.cancel()
        assert outcomes == ["closed"] * 4
        assert_no_leaks(pools=[pool], backends=[backend])


def test_invalid_settings_are_refused() -> None:
    backend = FakeBackend()
    with pytest.raises(ConfigError):
        Batcher(backend, window=-1)
    with pytest.raises(ConfigError):
        Batcher(backend, max_batch_size=0)


class _DeafBackend(FakeBackend):
    """A host that accepts commands and never answers, whatever their deadline."""

    async def _run(self, slot, request):  # type: ignore[no-untyped-def]
        await anyio.sleep_forever()


async def test_idle_batcher_runs_a_call_in_the_callers_own_task() -> None:
    """The express lane: nothing else is waiting, so no hand-off to the batcher's tasks."""
    ran_in: list[object] = []

    async def handler(slot: object, request: ExecRequest) -> ExecResult:
        ran_in.append(anyio.get_current_task().id)
        await anyio.sleep(1)
        return ExecResult(exit_code=0, sandboxed=True)

    async with FakeBackend(slots_per_host=2, handler=handler) as backend:
        pool = SlotPool(backend)
        batcher = Batcher(backend)
        callers: list[object] = []
        async with anyio.create_task_group() as tg:
            await tg.start(batcher.serve)

            async def one(delay: float) -> None:
                await anyio.sleep(delay)
                async with pool.slot() as slot:
                    callers.append(anyio.get_current_task().id)
                    assert (await batcher.exec(slot, ExecRequest("x"))).exit_code == 0

            async with anyio.create_task_group() as group:
                group.start_soon(one, 0)  # idle batcher: express
                group.start_soon(one, 0.5)  # one call in flight: through a batch task
            batcher.close()
        assert ran_in[0] == callers[0]
        assert ran_in[1] != callers[1]
        stats = batcher.statistics()
        assert (stats.batches, stats.dispatched, stats.in_flight, stats.waiting) == (2, 2, 0, 0)
        assert_no_leaks(pools=[pool], backends=[backend])


async def test_express_call_past_its_deadline_returns_timed_out_and_taints_the_slot() -> None:
    async with _DeafBackend() as backend:
        pool = SlotPool(backend)
        batcher = Batcher(backend, deadline_grace=1)
        async with anyio.create_task_group() as tg:
            await tg.start(batcher.serve)
            async with pool.slot() as slot:
                start = anyio.current_time()
                result = await batcher.exec(slot, ExecRequest("x", timeout=3))
                assert anyio.current_time() - start == pytest.approx(4)
                assert result.timed_out and result.error and result.exit_code is None
                assert not slot.reusable
            batcher.close()
        stats = batcher.statistics()
        assert (stats.expired, stats.in_flight, stats.waiting) == (1, 0, 0)
        assert backend.destroyed == 1
        assert_no_leaks(pools=[pool], backends=[backend])


async def test_express_call_cancelled_mid_command_taints_the_slot() -> None:
    async with FakeBackend() as backend:
        pool = SlotPool(backend)
        batcher = Batcher(backend)
        async with anyio.create_task_group() as tg:
            await tg.start(batcher.serve)
            async with pool.slot() as slot:
                with anyio.move_on_after(0.5) as scope:
                    await batcher.exec(slot, ExecRequest("sleep 5", timeout=10))
                assert scope.cancelled_caught
                assert not slot.reusable
                assert batcher.statistics().in_flight == 0
            batcher.close()
        assert backend.destroyed == 1
        assert_no_leaks(pools=[pool], backends=[backend])


async def test_stopping_the_batcher_ends_express_calls_with_closed() -> None:
    async with _DeafBackend() as backend:
        pool = SlotPool(backend)
        batcher = Batcher(backend)
        async with pool.slot() as slot:
            async with anyio.create_task_group() as service:
                await service.start(batcher.serve)

                async def stop() -> None:
                    await anyio.sleep(1)
                    service.cancel_scope.cancel()

                service.start_soon(stop)
                with pytest.raises(anyio.ClosedResourceError):
                    await batcher.exec(slot, ExecRequest("x", timeout=10))
                assert not slot.reusable
            with pytest.raises(anyio.ClosedResourceError):
                await batcher.exec(slot, ExecRequest("x"))  # closed: no express lane either
        assert batcher.statistics().in_flight == 0
        assert_no_leaks(pools=[pool], backends=[backend])


async def test_a_one_shot_woken_before_its_owner_parks_returns_at_once() -> None:
    # park() is an awaitable, not a coroutine (the asyncio future itself): a wake-up that
    # came first must make it complete without waiting, and a second wake-up is a no-op.
    kit = current_loop()
    shot = OneShot()
    kit.arm(shot)
    kit.wake(shot)
    with anyio.fail_after(1):
        await kit.park(shot)
    kit.wake(shot)
    # Parked first, woken by another task.
    shot = OneShot()
    kit.arm(shot)
    async with anyio.create_task_group() as tg:
        waker = anyio.Event()

        async def wake_later() -> None:
            await waker.wait()
            kit.wake(shot)

        tg.start_soon(wake_later)
        waker.set()
        with anyio.fail_after(5):
            await kit.park(shot)


async def test_the_kit_reads_the_loops_own_clock(
    anyio_backend_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kit = current_loop()
    if anyio_backend_name == "trio":
        import trio

        # trio's clock is the run's (a MockClock when virtual time is on), never monotonic().
        assert kit.now is trio.current_time
        return
    # The default loop's time() is time.monotonic(), called directly; a loop class with
    # its own clock (a virtual one) keeps it.
    assert abs(kit.now() - asyncio.get_running_loop().time()) < 1.0
    monkeypatch.setattr(type(asyncio.get_running_loop()), "time", lambda self: 42.0)
    assert current_loop().now() == 42.0


async def test_deadlines_hold_per_timeout_value_and_out_of_order() -> None:
    # One deadline queue per timeout value; a call tracked after a later deadline of its own
    # timeout (its caller waited for room in the channel) still expires at its own deadline.
    async with FakeBackend(slots_per_host=3) as backend:
        pool = SlotPool(backend)
        batcher = Batcher(backend, window=10.0, deadline_grace=0.5)
        now = batcher.clock()
        answered: dict[str, float] = {}
        async with anyio.create_task_group() as tg:
            await tg.start(batcher.serve)
            async with pool.slot() as s1, pool.slot() as s2, pool.slot() as s3:
                t0 = now()

                async def one(name: str, slot: Slot, seconds: float, start: float) -> None:
                    call = batcher.submit(slot, ExecRequest("true", timeout=seconds), start)
                    assert call is not None, "window > 0: the batched lane"
                    try:
                        await batcher.park(call)
                    except BaseException:
                        batcher.abandon(call)
                        raise
                    result = batcher.collect(call)
                    assert result.timed_out and result.error is not None, result
                    answered[name] = now() - t0

                async with anyio.create_task_group() as callers:
                    callers.start_soon(one, "three", s1, 3.0, t0)
                    callers.start_soon(one, "one", s2, 1.0, t0)
                    callers.start_soon(one, "three_tracked_late", s3, 3.0, t0 - 1.0)
            batcher.close()
        assert answered == pytest.approx({"one": 1.5, "three_tracked_late": 2.5, "three": 3.5})
        stats = batcher.statistics()
        assert (stats.expired, stats.waiting, stats.dispatched) == (3, 0, 0)
        assert_no_leaks(pools=[pool], backends=[backend])


@pytest.mark.parametrize(("window_ms", "dispatched"), [(1000.0, False), (1.0, True)])
async def test_tool_call_cancelled_on_the_batched_lane_leaks_nothing(
    window_ms: float, dispatched: bool
) -> None:
    # Trajectory.call parks on the batched lane in its own frame (no exec coroutine under
    # it): cancelled before dispatch the command never runs and the slot is kept; after
    # dispatch the slot is retired.
    config = ExecutorConfig(batch_window_ms=window_ms)
    async with (
        FakeBackend(slots_per_host=1) as backend,
        ToolExecutor(backend, config=config) as executor,
    ):
        async with executor.trajectory() as traj:
            with anyio.move_on_after(0.5) as scope:
                await traj.call(ToolCall("terminal", {"command": "sleep 5"}))
            assert scope.cancelled_caught
            assert traj.slot.reusable is not dispatched
            # The trajectory goes on after the cancelled call.
            assert (await traj.call(ToolCall("terminal", {"command": "echo ok"}))).ok
        stats = executor.statistics().batcher
        assert (stats.waiting, stats.in_flight) == (0, 0)
        assert stats.dropped == (0 if dispatched else 1)
    assert backend.destroyed == (1 if dispatched else 0)
    assert_no_leaks(executors=[executor], backends=[backend])

"""ToolExecutor and trajectories: routing, deadlines, policy, shutdown (virtual time)."""

from __future__ import annotations

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from structenv import (
    ConfigError,
    ExecRequest,
    ExecResult,
    ExecutorConfig,
    LatencyStatistics,
    SandboxUnavailableError,
    SlotAcquireTimeout,
    ToolCall,
    ToolExecutor,
)
from structenv.testing import FakeBackend, assert_no_leaks, virtual_time_backend
from structenv.tools import ExternalTool, ToolRegistry, default_registry

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return virtual_time_backend(request.param)


async def test_tool_calls_route_to_the_sandbox() -> None:
    async with FakeBackend() as backend, ToolExecutor(backend) as executor:
        async with executor.trajectory("t1") as traj:
            result = await traj.call(ToolCall("terminal", {"command": "echo hi"}, id="c1"))
            assert result.ok and result.call_id == "c1"
            assert "hi" in result.content and "[exit code: 0]" in result.content
            failed = await traj.call(ToolCall("terminal", {"command": "exit 3"}))
            # A nonzero exit is data for the model, not a tool error.
            assert failed.error is None and "[exit code: 3]" in failed.content
            wrote = await traj.call(ToolCall("write_file", {"path": "f.txt", "content": "abc"}))
            assert wrote.ok
            read = await traj.call(ToolCall("read_file", {"path": "f.txt"}))
            assert read.content == "abc"
            missing = await traj.call(ToolCall("read_file", {"path": "nope"}))
            assert missing.error == "tool_error"
            assert traj.tool_calls == 5
        assert_no_leaks(executors=[executor], backends=[backend])


async def test_unknown_tool_and_invalid_arguments_are_error_results() -> None:
    async with FakeBackend() as backend, ToolExecutor(backend) as executor:
        async with executor.trajectory() as traj:
            unknown = await traj.call(ToolCall("rm_rf", {}))
            assert unknown.error == "unknown_tool" and "terminal" in unknown.content
            missing = await traj.call(ToolCall("terminal", {}))
            assert missing.error == "invalid_arguments" and "command" in missing.content
            wrong_type = await traj.call(ToolCall("terminal", {"command": 5}))
            assert wrong_type.error == "invalid_arguments"
        assert backend.execs == 0, "invalid calls must never reach the sandbox"


async def test_model_cannot_set_policy_flags() -> None:
    async with FakeBackend() as backend, ToolExecutor(backend) as executor:
        async with executor.trajectory() as traj:
            for flag in ("allow_network", "require_sandbox"):
                result = await traj.call(ToolCall("terminal", {"command": "true", flag: True}))
                assert result.error == "invalid_arguments" and flag in result.content
        assert backend.execs == 0


async def test_tool_timeout_becomes_a_result_and_is_capped() -> None:
    config = ExecutorConfig(tool_timeout=2, max_tool_timeout=5)
    async with FakeBackend() as backend, ToolExecutor(backend, config=config) as executor:
        async with executor.trajectory() as traj:
            start = anyio.current_time()
            result = await traj.call(ToolCall("terminal", {"command": "hang"}))
            assert result.error == "timeout" and "timed out" in result.content
            assert anyio.current_time() - start == pytest.approx(2)
            start = anyio.current_time()
            capped = await traj.call(ToolCall("terminal", {"command": "hang", "timeout": 999}))
            assert capped.error == "timeout"
            assert anyio.current_time() - start == pytest.approx(5)
        assert_no_leaks(executors=[executor], backends=[backend])


async def test_unresponsive_host_times_out_on_the_client_side() -> None:
    class DeafBackend(FakeBackend):
        """A host that accepts commands and never answers, whatever their deadline."""

        async def _run(self, slot, request):  # type: ignore[no-untyped-def]
            await anyio.sleep_forever()

        async def exec_batch(self, calls, on_result):  # type: ignore[no-untyped-def]
            await anyio.sleep_forever()

    config = ExecutorConfig(tool_deadline_grace=1)
    async with DeafBackend() as backend, ToolExecutor(backend, config=config) as executor:
        async with executor.trajectory() as traj:
            start = anyio.current_time()
            result = await traj.exec(ExecRequest("echo hello", timeout=3))
            assert result.timed_out and result.error is not None
            assert anyio.current_time() - start == pytest.approx(4)
            assert not traj.slot.reusable
            # The abandoned batch is cancelled at once, not left running until shutdown.
            await anyio.wait_all_tasks_blocked()
            assert executor.statistics().batcher.in_flight == 0
        assert backend.destroyed == 1
        assert_no_leaks(executors=[executor], backends=[backend])


async def test_trajectory_deadline_raises_and_releases() -> None:
    config = ExecutorConfig(trajectory_timeout=10)
    async with FakeBackend() as backend, ToolExecutor(backend, config=config) as executor:
        with pytest.raises(TimeoutError):
            async with executor.trajectory() as traj:
                for _ in range(100):
                    await traj.exec(ExecRequest("sleep 1"))
        assert_no_leaks(executors=[executor], backends=[backend])


async def test_twenty_trajectories_on_ten_slots_all_complete() -> None:
    async with FakeBackend(slots_per_host=10) as backend, ToolExecutor(backend) as executor:
        done: list[int] = []

        async def run(i: int) -> None:
            async with executor.trajectory() as traj:
                for _ in range(5):
                    result = await traj.call(ToolCall("terminal", {"command": "sleep 1"}))
                    assert result.ok
            done.append(i)

        start = anyio.current_time()
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(run, i)
        assert sorted(done) == list(range(20))
        # Two waves of 5 s each.
        assert anyio.current_time() - start == pytest.approx(10, abs=0.1)
        assert_no_leaks(executors=[executor], backends=[backend])


async def test_waiters_beyond_the_acquire_deadline_get_slot_acquire_timeout() -> None:
    config = ExecutorConfig(acquire_timeout=3)
    async with (
        FakeBackend(slots_per_host=10) as backend,
        ToolExecutor(backend, config=config) as executor,
    ):
        outcomes: list[str] = []

        async def run() -> None:
            try:
                async with executor.trajectory() as traj:
                    for _ in range(5):
                        await traj.call(ToolCall("terminal", {"command": "sleep 1"}))
                outcomes.append("done")
            except SlotAcquireTimeout as exc:
                assert exc.pool_size == 10
                outcomes.append("timeout")

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(run)
        assert sorted(outcomes) == ["done"] * 10 + ["timeout"] * 10
        assert_no_leaks(executors=[executor], backends=[backend])


async def test_several_calls_of_one_step_run_concurrently() -> None:
    async with FakeBackend() as backend, ToolExecutor(backend) as executor:
        async with executor.trajectory() as traj:
            start = anyio.current_time()
            calls = [ToolCall("terminal", {"command": f"sleep 1; echo {i}"}) for i in range(3)]
            results = await traj.call_many(calls)
            assert anyio.current_time() - start == pytest.approx(1)
            assert [r.content.split("\n")[0] for r in results] == ["0", "1", "2"]


async def test_shutdown_with_calls_in_flight_leaves_nothing() -> None:
    async with FakeBackend(slots_per_host=8) as backend:
        outcomes: list[str] = []
        with anyio.move_on_after(1):
            async with ToolExecutor(backend) as executor:

                async def run() -> None:
                    try:
                        async with executor.trajectory() as traj:
                            await traj.exec(ExecRequest("sleep 100", timeout=200))
                        outcomes.append("result")
                    except anyio.get_cancelled_exc_class():
                        outcomes.append("cancelled")
                        raise

                async with anyio.create_task_group() as tg:
                    for _ in range(8):
                        tg.start_soon(run)
        assert outcomes == ["cancelled"] * 8
        assert_no_leaks(executors=[executor], backends=[backend])


async def test_executor_exit_waits_for_queued_calls_within_grace() -> None:
    config = ExecutorConfig(shutdown_grace=2, batch_window_ms=500)
    async with FakeBackend() as backend:
        async with ToolExecutor(backend, config=config) as executor:
            pass
        assert executor.statistics().batcher.queued == 0
        assert_no_leaks(executors=[executor], backends=[backend])


async def test_require_sandbox_refuses_an_unsandboxed_backend() -> None:
    class Bare(FakeBackend):
        @property
        def sandboxed(self) -> bool:
            return False

    async with Bare() as backend:
        with pytest.raises(SandboxUnavailableError):
            async with ToolExecutor(backend):
                pass
        async with ToolExecutor(backend, config=ExecutorConfig(require_sandbox=False)):
            pass


async def test_network_policy_must_agree_with_the_backend() -> None:
    class Open(FakeBackend):
        @property
        def allow_network(self) -> bool:
            return True

    async with Open() as backend:
        with pytest.raises(ConfigError):
            async with ToolExecutor(backend):
                pass


async def test_external_tool_without_server_is_an_error_result() -> None:
    registry = ToolRegistry([ExternalTool(name="search", description="web", parameters={})])
    async with FakeBackend() as backend, ToolExecutor(backend, registry=registry) as executor:
        async with executor.trajectory() as traj:
            result = await traj.call(ToolCall("search", {"q": "x"}))
            assert result.error == "tool_error" and "no tool server" in result.content


def test_registry_refuses_duplicates_and_unknown_toolsets() -> None:
    registry = default_registry()
    with pytest.raises(ConfigError):
        registry.register(registry.get("terminal"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        registry.select(enabled_toolsets=["nonexistent"])
    chosen = registry.select(enabled_toolsets=["default"], disabled_tools=["write_file"])
    assert chosen.names() == ["terminal", "read_file"]


async def test_no_trajectory_after_the_executor_exited() -> None:
    # An executor that has exited (or is exiting) must not lease a slot any more: a caller
    # still holding it gets ClosedResourceError and the backend sees no acquire.
    async with FakeBackend() as backend:
        async with ToolExecutor(backend) as executor:
            async with executor.trajectory() as traj:
                await traj.exec(ExecRequest("true"))
        acquired = backend.acquires
        with pytest.raises(anyio.ClosedResourceError, match="exited"):
            async with executor.trajectory():
                pass
        assert backend.acquires == acquired
        assert_no_leaks(executors=[executor], backends=[backend])


async def test_express_lane_call_in_flight_gets_the_shutdown_grace() -> None:
    # The default window (0) runs a lone call on the express lane, in the caller's task. When
    # the executor exits meanwhile, that call gets shutdown_grace to finish, as a batched one
    # does, instead of being cancelled at once.
    results: list[ExecResult] = []

    async def call(executor: ToolExecutor) -> None:
        async with executor.trajectory() as traj:
            results.append(await traj.exec(ExecRequest("true", timeout=10)))

    config = ExecutorConfig(shutdown_grace=5.0)
    async with FakeBackend(exec_latency=1.0) as backend, anyio.create_task_group() as tg:
        async with ToolExecutor(backend, config=config) as executor:
            tg.start_soon(call, executor)
            await wait_all_tasks_blocked()  # the call is in flight
            assert executor.statistics().batcher.in_flight == 1
        assert len(results) == 1 and results[0].exit_code == 0, results


async def test_express_lane_deadline_holds_when_the_backend_ignores_cancellation() -> None:
    # A backend whose exec cannot be interrupted (a blocking SDK call in a worker thread)
    # answers long after the client-side deadline: that answer is not trusted, the result is
    # timed_out and the slot is destroyed, not reset — the same on both lanes.
    async def stubborn(slot: object, request: ExecRequest) -> ExecResult:
        with anyio.CancelScope(shield=True):
            await anyio.sleep(3)
        return ExecResult(exit_code=0, stdout=b"late\n")

    for window in (0.0, 1.0):
        config = ExecutorConfig(batch_window_ms=window, tool_deadline_grace=0.2)
        async with FakeBackend(handler=stubborn) as backend:
            async with ToolExecutor(backend, config=config) as executor:
                async with executor.trajectory() as traj:
                    result = await traj.exec(ExecRequest("sleep 9", timeout=0.5))
                assert result.timed_out and result.stdout == b"", (window, result)
            assert backend.destroyed == 1 and backend.resets == 0, window


async def test_statistics_report_exec_and_call_latencies() -> None:
    async with FakeBackend(exec_latency=0.25) as backend, ToolExecutor(backend) as executor:
        assert executor.statistics().exec_latency == LatencyStatistics(0, 0.0, 0.0)
        async with executor.trajectory() as traj:
            for _ in range(3):
                await traj.exec(ExecRequest("true"))
            await traj.call(ToolCall("terminal", {"command": "true"}))
        stats = executor.statistics()
        # Virtual time: each exec takes the backend's latency exactly, a tool call one exec.
        assert stats.exec_latency.count == 4  # the tool call's exec included
        assert stats.exec_latency.p50 == pytest.approx(0.25)
        assert stats.call_latency.count == 1
        assert stats.call_latency.p50 == stats.call_latency.p99 == pytest.approx(0.25)


async def test_express_lane_call_past_the_shutdown_grace_is_closed_and_nothing_leaks() -> None:
    # The batcher waits for an express-lane call at shutdown, but only for shutdown_grace: a
    # call still running then is cancelled, its caller gets ClosedResourceError, its slot is
    # destroyed, and nothing is left.
    errors: list[BaseException] = []

    async def call(executor: ToolExecutor) -> None:
        async with executor.trajectory() as traj:
            try:
                await traj.exec(ExecRequest("sleep 60", timeout=60))
            except anyio.ClosedResourceError as exc:
                errors.append(exc)

    config = ExecutorConfig(shutdown_grace=2.0)
    async with FakeBackend(exec_latency=30.0) as backend, anyio.create_task_group() as tg:
        async with ToolExecutor(backend, config=config) as executor:
            tg.start_soon(call, executor)
            await wait_all_tasks_blocked()
            start = anyio.current_time()
        assert anyio.current_time() - start == pytest.approx(2.0)
    assert len(errors) == 1
    assert backend.destroyed == 1 and backend.acquires == backend.releases
    assert_no_leaks(executors=[executor], backends=[backend])

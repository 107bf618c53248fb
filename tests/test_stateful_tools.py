"""The terminal_stateful toolset against real tmux inside real bwrap sandboxes."""

from __future__ import annotations

import anyio
import pytest

from structenv import ExecutorConfig, ToolCall, ToolExecutor
from structenv.backends import LocalBackend
from structenv.testing import FakeBackend, assert_no_leaks, child_processes, cmdline
from structenv.tools import default_registry

pytestmark = pytest.mark.anyio


async def test_stateful_terminal_keeps_state_and_tmux_drives_it() -> None:
    registry = default_registry().select(enabled_toolsets=["default", "terminal_stateful"])
    config = ExecutorConfig(tool_timeout=5)
    async with (
        LocalBackend(hosts=1, slots_per_host=1) as backend,
        ToolExecutor(backend, registry=registry, config=config) as executor,
    ):
        async with executor.trajectory() as traj:
            first = await traj.call(
                ToolCall("stateful_terminal", {"command": "mkdir -p d && cd d && export X=7"})
            )
            assert first.ok, first.content
            second = await traj.call(ToolCall("stateful_terminal", {"command": "pwd; echo $X"}))
            assert "/workspace/d" in second.content and "7" in second.content
            assert "[exit code: 0]" in second.content
            slow = await traj.call(
                ToolCall("stateful_terminal", {"command": "sleep 30", "timeout": 1})
            )
            assert slow.error == "timeout"
            keys = await traj.call(
                ToolCall(
                    "tmux", {"action": "send_keys", "keys": "C-c", "literal": False, "enter": False}
                )
            )
            assert keys.ok
            after = await traj.call(ToolCall("stateful_terminal", {"command": "echo back"}))
            assert "back" in after.content and "[exit code: 0]" in after.content
            bad = await traj.call(ToolCall("tmux", {"action": "send_keys"}))
            assert bad.error == "invalid_arguments"
            assert (await traj.call(ToolCall("tmux", {"action": "stop"}))).ok
        assert_no_leaks(executors=[executor], backends=[backend])


async def test_stateful_tools_on_a_backend_without_a_terminal_are_error_results() -> None:
    registry = default_registry().select(enabled_toolsets=["terminal_stateful"])
    async with (
        FakeBackend() as backend,
        ToolExecutor(backend, registry=registry) as executor,
        executor.trajectory() as traj,
    ):
        result = await traj.call(ToolCall("stateful_terminal", {"command": "ls"}))
        assert result.error == "tool_error"
        assert "no stateful terminal" in result.content


async def test_cancelled_stateful_command_leaves_no_process_and_no_slot() -> None:
    registry = default_registry().select(enabled_toolsets=["terminal_stateful"])
    async with (
        LocalBackend(hosts=1, slots_per_host=1) as backend,
        ToolExecutor(backend, registry=registry) as executor,
    ):
        hosts = list(backend.host_pids().values())

        def sleeping() -> list[int]:
            return [
                pid
                for host in hosts
                for pid in child_processes(host)
                if b"sleep\x00555" in cmdline(pid) or cmdline(pid).startswith(b"tmux")
            ]

        async with anyio.create_task_group() as tg:

            async def run() -> None:
                async with executor.trajectory() as traj:
                    await traj.call(
                        ToolCall("stateful_terminal", {"command": "sleep 555", "timeout": 60})
                    )

            tg.start_soon(run)
            # External state (processes in the sandbox) has no event: poll, bounded.
            for _ in range(1000):
                if any(b"sleep" in cmdline(p) for p in sleeping()):
                    break
                await anyio.sleep(0.02)
            else:
                pytest.fail("the command never started in the sandbox")
            tg.cancel_scope.cancel()
        assert_no_leaks(executors=[executor], backends=[backend])
        # The release reset killed the terminal and its command inside the sandbox.
        assert sleeping() == []

"""External tools: ToolServerClient against the real reference ToolServer over HTTP."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import pytest

from structenv import ExecutorConfig, ToolCall, ToolExecutor
from structenv.testing import FakeBackend, assert_no_leaks
from structenv.tools import (
    ServedTool,
    ToolRegistry,
    ToolServerClient,
    ToolServerError,
    default_registry,
    serve_tool_server,
)

pytestmark = pytest.mark.anyio

TOKEN = "s3cret"


async def _add(arguments: Mapping[str, Any]) -> str:
    return str(arguments["a"] + arguments["b"])


async def _boom(arguments: Mapping[str, Any]) -> str:
    raise RuntimeError("exploded")


async def _slow(arguments: Mapping[str, Any]) -> str:
    await anyio.sleep(30)
    return "late"


_NUMBERS = {
    "type": "object",
    "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    ServedTool("add", "add two numbers", _NUMBERS, _add),
    ServedTool("boom", "always fails", {"type": "object"}, _boom),
    ServedTool("slow", "takes 30 s", {"type": "object"}, _slow),
]


async def _registry(client: ToolServerClient) -> ToolRegistry:
    registry = default_registry().select(enabled_toolsets=["default"])
    for tool in await client.list_tools():
        registry.register(tool)
    return registry


async def test_external_tools_run_on_the_server_and_failures_are_results() -> None:
    async with (
        serve_tool_server(TOOLS, token=TOKEN) as server,
        ToolServerClient(server.url, token=TOKEN) as client,
    ):
        registry = await _registry(client)
        assert {"terminal", "add", "boom", "slow"} <= set(registry.names())
        async with (
            FakeBackend() as backend,
            ToolExecutor(backend, registry=registry, tool_server=client) as executor,
        ):
            async with executor.trajectory() as traj:
                added = await traj.call(ToolCall("add", {"a": 2, "b": 40}, id="c1"))
                assert added.ok and added.content == "42" and added.call_id == "c1"
                failed = await traj.call(ToolCall("boom", {}))
                assert failed.error == "tool_error" and "exploded" in failed.content
                # Validated on our side first, so it never reaches the server.
                invalid = await traj.call(ToolCall("add", {"a": 1}))
                assert invalid.error == "invalid_arguments"
                both = await traj.call_many(
                    [ToolCall("add", {"a": 1, "b": 1}), ToolCall("terminal", {"command": "echo x"})]
                )
                assert [r.ok for r in both] == [True, True]
            assert backend.execs == 1  # only the terminal call touched the sandbox
            assert_no_leaks(executors=[executor], backends=[backend])
        assert server.calls == 3


async def test_wrong_token_is_refused() -> None:
    async with (
        serve_tool_server(TOOLS, token=TOKEN) as server,
        ToolServerClient(server.url, token="wrong") as client,
    ):
        with pytest.raises(ToolServerError, match="401"):
            await client.list_tools()
        assert server.calls == 0


async def test_unreachable_server_is_an_error_result_after_connect_retries() -> None:
    # Reserve a port, then close it so nothing listens there.
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()
    registry = ToolRegistry(
        [tool for tool in await _tools_from_a_live_server() if tool.name == "add"]
    )
    async with ToolServerClient(f"http://127.0.0.1:{port}", connect_retries=2) as client:
        async with (
            FakeBackend() as backend,
            ToolExecutor(backend, registry=registry, tool_server=client) as executor,
            executor.trajectory() as traj,
        ):
            result = await traj.call(ToolCall("add", {"a": 1, "b": 2}))
            assert result.error == "tool_error" and "unreachable" in result.content


async def _tools_from_a_live_server() -> list[Any]:
    async with (
        serve_tool_server(TOOLS) as server,
        ToolServerClient(server.url) as client,
    ):
        return list(await client.list_tools())


async def test_cancelled_external_call_leaves_no_connection_or_task() -> None:
    config = ExecutorConfig()
    async with (
        serve_tool_server(TOOLS, token=TOKEN) as server,
        ToolServerClient(server.url, token=TOKEN) as client,
    ):
        registry = await _registry(client)
        async with (
            FakeBackend() as backend,
            ToolExecutor(backend, config=config, registry=registry, tool_server=client) as executor,
        ):
            with anyio.move_on_after(0.3) as scope:
                async with executor.trajectory() as traj:
                    await traj.call(ToolCall("slow", {}))
            assert scope.cancelled_caught
            assert_no_leaks(executors=[executor], backends=[backend])
    # filterwarnings=error turns any unclosed socket or stream into a failure here.

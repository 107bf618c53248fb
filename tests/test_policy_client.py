"""OpenAIPolicy against the real scripted HTTP server: retries, deadlines, logprobs, cleanup.

Real sockets, so real (short) deadlines; conditions are awaited through the server's events
(``wait_requests``/``wait_idle``), never by sleeping.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import pytest

from structenv import PolicyError, ProtocolError, ToolCall
from structenv.agent import (
    AgentConfig,
    AgentTask,
    OpenAIPolicy,
    OpenAIPolicyConfig,
    parse_chat_completion,
    run_agent,
)
from structenv.testing._policy_server import (
    Fault,
    PolicyServer,
    ReplayScript,
    serve_policy_server,
    task_marker,
)

pytestmark = pytest.mark.anyio

CALL = '<tool_call>{"name": "terminal", "arguments": {"command": "ls"}}</tool_call>'
SOLUTIONS = {"t1": [CALL, "The answer is 42."]}
ASK = [{"role": "user", "content": f"Solve {task_marker('t1')}"}]


@pytest.fixture
async def server() -> AsyncIterator[PolicyServer]:
    async with serve_policy_server(ReplayScript(SOLUTIONS)) as srv:
        yield srv


def config(server: PolicyServer, **overrides: Any) -> OpenAIPolicyConfig:
    values: dict[str, Any] = {
        "base_url": server.base_url,
        "model": "scripted",
        "backoff_initial": 0.001,
        "backoff_max": 0.005,
        "backoff_jitter": 0.0,
        "request_deadline": 10.0,
    }
    values.update(overrides)
    return OpenAIPolicyConfig(**values)


async def test_completion_with_hermes_tool_call_and_no_logprobs(server: PolicyServer) -> None:
    async with OpenAIPolicy(config(server)) as policy:
        completion = await policy.complete(ASK, tools=[])
    assert completion.text == CALL
    assert completion.finish_reason == "stop"
    assert completion.tool_calls == []  # Hermes text is parsed by the agent loop
    assert completion.logprobs_available is False
    assert completion.completion_logprobs is None
    assert completion.completion_tokens is None
    assert completion.prompt_tokens is None


async def test_logprobs_are_real_when_asked(server: PolicyServer) -> None:
    async with OpenAIPolicy(config(server, logprobs=True)) as policy:
        completion = await policy.complete(ASK, tools=[])
    logprobs = completion.completion_logprobs
    assert completion.logprobs_available is True
    assert logprobs is not None
    assert len(logprobs) > 10
    assert all(math.isfinite(lp) and lp < 0.0 for lp in logprobs)
    assert len(set(logprobs)) > len(logprobs) // 2  # not a constant placeholder


async def test_native_tool_calls() -> None:
    async with (
        serve_policy_server(ReplayScript(SOLUTIONS), native_tool_calls=True) as srv,
        OpenAIPolicy(config(srv)) as policy,
    ):
        completion = await policy.complete(
            ASK, tools=[{"type": "function", "function": {"name": "terminal"}}]
        )
    assert completion.finish_reason == "tool_calls"
    assert [(c.name, dict(c.arguments)) for c in completion.tool_calls] == [
        ("terminal", {"command": "ls"})
    ]
    assert completion.tool_calls[0].id
    assert completion.raw_tool_calls is not None
    assert completion.text == ""


async def test_server_errors_are_retried_then_succeed(server: PolicyServer) -> None:
    server.inject(Fault("status", 500), times=2)
    server.inject(Fault("status", 429, retry_after=0.001))
    server.inject(Fault("disconnect"))
    async with OpenAIPolicy(config(server, max_retries=4)) as policy:
        completion = await policy.complete(ASK, tools=[])
        stats = policy.statistics()
    assert completion.text == CALL
    assert stats.requests == 5
    assert stats.retries == 4
    assert server.statistics().faults == 4


async def test_persistent_500_gives_policy_error_after_retries(server: PolicyServer) -> None:
    server.inject(Fault("status", 503), times=None)
    async with OpenAIPolicy(config(server, max_retries=2)) as policy:
        with pytest.raises(PolicyError, match=r"HTTP 503.*after 3 attempts"):
            await policy.complete(ASK, tools=[])
        assert policy.statistics().failures == 1
    assert server.statistics().faults == 3


async def test_connection_refused_gives_policy_error() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()
    cfg = OpenAIPolicyConfig(
        base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1, backoff_initial=0.001
    )
    async with OpenAIPolicy(cfg) as policy:
        with pytest.raises(PolicyError, match="ConnectError"):
            await policy.complete(ASK, tools=[])
        assert policy.statistics().requests == 2


async def test_unusable_url_is_a_policy_error_without_retry() -> None:
    cfg = OpenAIPolicyConfig(base_url="ftp://127.0.0.1:1/v1", model="m", max_retries=3)
    async with OpenAIPolicy(cfg) as policy:
        with pytest.raises(PolicyError, match="UnsupportedProtocol"):
            await policy.complete(ASK, tools=[])
        assert policy.statistics().requests == 1


async def test_garbage_json_is_a_protocol_error_without_retry(server: PolicyServer) -> None:
    server.inject(Fault("garbage"))
    async with OpenAIPolicy(config(server, max_retries=5)) as policy:
        with pytest.raises(ProtocolError, match="not JSON"):
            await policy.complete(ASK, tools=[])
        assert policy.statistics().requests == 1
        # The server is fine afterwards and the same policy keeps working.
        assert (await policy.complete(ASK, tools=[])).text == CALL


async def test_client_error_status_is_not_retried() -> None:
    async with serve_policy_server(ReplayScript(SOLUTIONS), api_key="right") as srv:
        async with OpenAIPolicy(config(srv, api_key="wrong", max_retries=5)) as policy:
            with pytest.raises(PolicyError, match=r"HTTP 401.*not retried"):
                await policy.complete(ASK, tools=[])
            assert policy.statistics().requests == 1
        async with OpenAIPolicy(config(srv, api_key="right")) as policy:
            assert (await policy.complete(ASK, tools=[])).text == CALL


async def test_hanging_server_hits_the_request_deadline(server: PolicyServer) -> None:
    server.inject(Fault("hang"), times=None)
    async with OpenAIPolicy(config(server, request_deadline=0.2, read_timeout=None)) as policy:
        start = anyio.current_time()
        with pytest.raises(TimeoutError):
            await policy.complete(ASK, tools=[])
        assert anyio.current_time() - start < 2.0
        assert policy.statistics().requests == 1  # a deadline is never retried
    with anyio.fail_after(5):
        await server.wait_idle()


async def test_hanging_server_read_timeouts_are_retried_then_policy_error(
    server: PolicyServer,
) -> None:
    server.inject(Fault("hang"), times=None)
    cfg = config(server, read_timeout=0.1, max_retries=1, request_deadline=5.0)
    async with OpenAIPolicy(cfg) as policy:
        start = anyio.current_time()
        with pytest.raises(PolicyError, match="ReadTimeout"):
            await policy.complete(ASK, tools=[])
        assert anyio.current_time() - start < 2.0
        assert policy.statistics().requests == 2
    with anyio.fail_after(5):
        await server.wait_idle()


async def test_cancellation_mid_request_closes_the_connection(server: PolicyServer) -> None:
    server.inject(Fault("hang"))
    async with OpenAIPolicy(config(server)) as policy:
        finished = False

        async def ask() -> None:
            nonlocal finished
            await policy.complete(ASK, tools=[])
            finished = True

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            with anyio.fail_after(5):
                await server.wait_requests(1)
            tg.cancel_scope.cancel()
        assert not finished
        # The connection was closed by the cancellation itself, not by closing the policy.
        with anyio.fail_after(5):
            await server.wait_idle()
        assert policy.statistics().retries == 0
        assert (await policy.complete(ASK, tools=[])).text == CALL
    with anyio.fail_after(5):
        await server.wait_idle()


async def test_closed_policy_refuses_requests(server: PolicyServer) -> None:
    policy = OpenAIPolicy(config(server))
    with pytest.raises(RuntimeError, match="async with"):
        await policy.complete(ASK, tools=[])
    async with policy:
        pass
    with pytest.raises(anyio.ClosedResourceError):
        await policy.complete(ASK, tools=[])


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"choices": []},
        {"choices": [{"message": "hi"}]},
        {"choices": [{"message": {"content": 3}}]},
        {"choices": [{"message": {"content": "x", "tool_calls": {}}}]},
        {"choices": [{"message": {"content": "x"}, "logprobs": {"content": [{"x": 1}]}}]},
        {"choices": [{"message": {"content": "x"}, "logprobs": {"content": [{"logprob": 0.5}]}}]},
    ],
)
def test_invalid_completion_bodies_are_protocol_errors(body: object) -> None:
    with pytest.raises(ProtocolError):
        parse_chat_completion(body)


class _Tools:
    def __init__(self) -> None:
        self.batches: list[list[ToolCall]] = []

    def specs(self) -> list[dict[str, Any]]:
        return [{"type": "function", "function": {"name": "terminal", "parameters": {}}}]

    async def call_many(self, calls: Sequence[ToolCall]) -> list[Any]:
        from structenv import ToolResult

        self.batches.append(list(calls))
        return [ToolResult(call_id=c.id, name=c.name, content="file.txt") for c in calls]


async def test_agent_end_to_end_over_http(server: PolicyServer) -> None:
    tools = _Tools()
    task = AgentTask(prompt=f"List files {task_marker('t1')}", system="You are terse.")
    async with OpenAIPolicy(config(server, logprobs=True, native_tools=False)) as policy:
        result = await run_agent(policy, tools, task, config=AgentConfig(max_steps=5))
    assert result.finish_reason == "final_answer", result.error
    assert result.final_answer == "The answer is 42."
    assert result.tool_calls == 1
    assert tools.batches == [[ToolCall("terminal", {"command": "ls"}, "call_0")]]
    assert all(c.logprobs_available for c in result.completions)
    roles = [m["role"] for m in result.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert json.loads(json.dumps(result.messages)) == result.messages


@pytest.mark.parametrize(
    ("field", "value", "where"),
    [
        ("finish_reason", 3, "choices.0.finish_reason"),
        ("prompt_token_ids", [1, True], "choices.0.prompt_token_ids.1"),
        ("token_ids", "12", "choices.0.token_ids"),
    ],
)
def test_both_routes_read_bodies_with_one_model_set(field: str, value: Any, where: str) -> None:
    """The chat and the token-id completion routes share the response models (agent/_wire):
    a field they have in common is refused alike, naming where it is."""
    from structenv.agent._tokens import parse_token_completion

    chat: dict[str, Any] = {"message": {"content": "x"}, "token_ids": [5], "prompt_token_ids": [1]}
    text: dict[str, Any] = {
        "text": "x",
        "logprobs": {"tokens": ["token_id:5"], "token_logprobs": [-0.5]},
        "token_ids": [5],
        "prompt_token_ids": [1],
    }
    parse_chat_completion({"choices": [chat]}, token_ids=True)
    parse_token_completion({"choices": [text]})
    with pytest.raises(ProtocolError, match=f"^chat completion: {re.escape(where)}: "):
        parse_chat_completion({"choices": [{**chat, field: value}]}, token_ids=True)
    with pytest.raises(ProtocolError, match=f"^completion: {re.escape(where)}: "):
        parse_token_completion({"choices": [{**text, field: value}]})


def test_only_the_wire_models_read_completion_bodies() -> None:
    """No second hand-written parser of ``choices`` grows back in the agent layer."""
    import ast
    import pathlib

    import structenv.agent

    root = pathlib.Path(structenv.agent.__file__).parent
    readers = sorted(
        path.name
        for path in root.glob("*.py")
        if any(
            isinstance(node, ast.Constant) and node.value in ("choices", "token_logprobs")
            for node in ast.walk(ast.parse(path.read_text()))
        )
    )
    assert readers == [], readers

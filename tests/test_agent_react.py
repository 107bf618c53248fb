"""The ReACT loop with a fake policy and a fake ToolRunner, on virtual time (no sockets)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import pytest

from structenv import PolicyError, ProtocolError, ToolCall, ToolResult
from structenv.agent import AgentConfig, AgentResult, AgentTask, Completion, run_agent
from structenv.testing import virtual_time_backend

pytestmark = pytest.mark.anyio

TASK = AgentTask(prompt="Do the thing.", system="Be careful.", id="t")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return virtual_time_backend(request.param)


def call(name: str, **arguments: Any) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


Reply = str | Completion | BaseException | Callable[[], Any]


class FakePolicy:
    """Replies from a list: text, a Completion, an exception to raise, or an async callable."""

    def __init__(self, replies: Sequence[Reply], *, repeat_last: bool = False) -> None:
        self.replies = list(replies)
        self.repeat_last = repeat_last
        self.seen: list[list[dict[str, Any]]] = []
        self.tools_seen: list[list[dict[str, Any]]] = []

    async def complete(self, messages: Any, *, tools: Any) -> Completion:
        self.seen.append([dict(m) for m in messages])
        self.tools_seen.append([dict(t) for t in tools])
        index = len(self.seen) - 1
        reply = self.replies[min(index, len(self.replies) - 1) if self.repeat_last else index]
        await anyio.lowlevel.checkpoint()
        if isinstance(reply, BaseException):
            raise reply
        if callable(reply):
            reply = await reply()
        if isinstance(reply, Completion):
            return reply
        return Completion(text=str(reply))


class FakeTools:
    """Runs the calls of one batch concurrently; every call of a batch waits for all others."""

    def __init__(self, names: Sequence[str] = ("terminal", "read_file")) -> None:
        self.names = names
        self.batches: list[list[ToolCall]] = []

    def specs(self) -> list[dict[str, Any]]:
        return [
            {"type": "function", "function": {"name": n, "description": n, "parameters": {}}}
            for n in self.names
        ]

    async def call_many(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        self.batches.append(list(calls))
        results: list[ToolResult | None] = [None] * len(calls)
        started = 0
        all_started = anyio.Event()

        async def one(index: int, tool_call: ToolCall) -> None:
            nonlocal started
            started += 1
            if started == len(calls):
                all_started.set()
            await all_started.wait()  # deadlocks unless the calls really run concurrently
            results[index] = ToolResult(
                call_id=tool_call.id, name=tool_call.name, content=f"ran {tool_call.name}"
            )

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for index, tool_call in enumerate(calls):
                    tg.start_soon(one, index, tool_call)
        return [r for r in results if r is not None]


async def run(
    policy: FakePolicy, tools: FakeTools | None = None, **config: Any
) -> tuple[AgentResult, FakeTools]:
    tools = tools or FakeTools()
    result = await run_agent(policy, tools, TASK, config=AgentConfig(**config))
    json.dumps(result.messages)  # plain JSON only
    return result, tools


async def test_final_answer_after_tool_calls() -> None:
    policy = FakePolicy([call("terminal", command="ls"), "<think>ok</think>All done."])
    result, tools = await run(policy)
    assert result.finish_reason == "final_answer"
    assert result.ok
    assert result.final_answer == "All done."
    assert result.error is None
    assert result.steps == 2
    assert result.tool_calls == 1
    assert tools.batches == [[ToolCall("terminal", {"command": "ls"}, "call_0")]]
    system, user, assistant, tool, final = result.messages
    assert system["role"] == "system"
    assert system["content"].startswith("Be careful.")
    assert "<tools>" in system["content"]
    assert '"name": "terminal"' in system["content"]
    assert user == {"role": "user", "content": "Do the thing."}
    assert assistant["role"] == "assistant"
    assert tool["role"] == "tool"
    assert tool["tool_call_id"] == "call_0"
    assert tool["content"].startswith("<tool_response>\n")
    assert json.loads(tool["content"].split("\n")[1]) == {
        "name": "terminal",
        "content": "ran terminal",
    }
    assert final == {"role": "assistant", "content": "<think>ok</think>All done."}
    assert policy.tools_seen[0] == FakeTools().specs()


async def test_several_calls_of_one_step_run_concurrently_in_one_batch() -> None:
    text = (
        call("terminal", command="a") + call("read_file", path="b") + call("terminal", command="c")
    )
    result, tools = await run(FakePolicy([text, "done"]))
    assert result.ok
    assert [[c.id for c in batch] for batch in tools.batches] == [["call_0", "call_1", "call_2"]]
    responses = [m for m in result.messages if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in responses] == ["call_0", "call_1", "call_2"]


async def test_ids_stay_unique_across_steps() -> None:
    replies = [call("terminal", command="a"), call("terminal", command="b"), "done"]
    result, tools = await run(FakePolicy(replies))
    assert [batch[0].id for batch in tools.batches] == ["call_0", "call_1"]
    assert result.tool_calls == 2


async def test_max_steps() -> None:
    policy = FakePolicy([call("terminal", command="ls")], repeat_last=True)
    result, tools = await run(policy, max_steps=4)
    assert result.finish_reason == "max_steps"
    assert not result.ok
    assert result.steps == 4
    assert len(tools.batches) == 4
    assert result.error is not None
    assert "4 steps" in result.error


async def test_malformed_call_is_an_error_observation_and_the_model_can_recover() -> None:
    policy = FakePolicy(['<tool_call>{"name": "terminal", "arguments": {</tool_call>', "fine"])
    result, tools = await run(policy)
    assert result.finish_reason == "final_answer"
    assert result.parse_errors == 1
    assert tools.batches == []
    observation = result.messages[3]
    assert observation["role"] == "tool"
    body = json.loads(observation["content"].split("\n")[1])
    assert body["error"] == "parse_error"
    assert "not valid JSON" in body["content"]
    assert "<tool_call>" in body["content"]  # the format hint
    assert policy.seen[1][-1] == observation


@pytest.mark.parametrize("limit", [0, 2])
async def test_parse_error_limit(limit: int) -> None:
    policy = FakePolicy(['{"name": "terminal", "arguments": {}}'], repeat_last=True)
    result, _ = await run(policy, max_consecutive_parse_errors=limit)
    assert result.finish_reason == "parse_errors"
    assert result.steps == limit + 1
    assert result.parse_errors == limit + 1
    assert result.final_answer is None
    assert result.error is not None
    assert "consecutive" in result.error


async def test_parse_error_streak_resets_after_a_good_step() -> None:
    bad = "<tool_call>{nope</tool_call>"
    good = call("terminal", command="ls")
    result, _ = await run(
        FakePolicy([bad, good, bad, good, "done"]), max_consecutive_parse_errors=1
    )
    assert result.ok
    assert result.parse_errors == 2


async def test_unknown_tool_is_an_observation_and_never_reaches_the_runner() -> None:
    text = call("rm_rf", path="/") + call("terminal", command="ls")
    result, tools = await run(FakePolicy([text, "done"]))
    assert result.ok
    assert result.tool_calls == 2
    assert result.tool_errors == 1
    assert tools.batches == [[ToolCall("terminal", {"command": "ls"}, "call_1")]]
    unknown = json.loads(result.messages[3]["content"].split("\n")[1])
    assert unknown["error"] == "unknown_tool"
    assert "read_file, terminal" in unknown["content"]
    assert result.messages[3]["name"] == "rm_rf"


async def test_user_role_observations_are_one_message_per_step() -> None:
    text = call("terminal", command="a") + "<tool_call>{bad</tool_call>" + call("read_file")
    result, _ = await run(FakePolicy([text, "done"]), tool_response_role="user")
    assert [m["role"] for m in result.messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    content = result.messages[3]["content"]
    assert content.count("<tool_response>") == 3
    assert content.index("parse_error") < content.index("ran terminal")


async def test_native_tool_calls_are_used_and_echoed() -> None:
    raw = [{"id": "x1", "type": "function", "function": {"name": "terminal", "arguments": "{}"}}]
    native = Completion(
        text="",
        tool_calls=[ToolCall("terminal", {}, "x1")],
        raw_tool_calls=raw,
        finish_reason="tool_calls",
    )
    result, tools = await run(FakePolicy([native, "done"]), tools_in_system_prompt=False)
    assert result.ok
    assert tools.batches == [[ToolCall("terminal", {}, "x1")]]
    assert result.messages[2]["tool_calls"] == raw
    assert result.messages[3]["tool_call_id"] == "x1"
    assert result.messages[0]["content"] == "Be careful."


@pytest.mark.parametrize("error", [PolicyError("gave up"), ProtocolError("garbage")])
async def test_policy_failure_is_a_result(error: Exception) -> None:
    result, _ = await run(FakePolicy([call("terminal"), error]))
    assert result.finish_reason == "policy_error"
    assert result.error is not None
    assert type(error).__name__ in result.error
    assert result.steps == 1  # the completed turn is kept


async def test_step_deadline_is_a_timeout_result() -> None:
    result, _ = await run(FakePolicy([call("terminal"), anyio.sleep_forever]), step_deadline=5.0)
    assert result.finish_reason == "timeout"
    assert result.error is not None
    assert "step 2" in result.error
    assert result.steps == 1


async def test_policy_timeout_error_is_a_timeout_result() -> None:
    result, _ = await run(FakePolicy([TimeoutError()]))
    assert result.finish_reason == "timeout"


async def test_agent_deadline_is_a_timeout_result_with_partial_history() -> None:
    async def slow() -> str:
        await anyio.sleep(10)
        return call("terminal")

    policy = FakePolicy([slow], repeat_last=True)
    start = anyio.current_time()
    result, _ = await run(policy, deadline=25.0, step_deadline=None, max_steps=100)
    assert result.finish_reason == "timeout"
    assert result.steps == 2
    assert anyio.current_time() - start == pytest.approx(25.0)


async def test_outer_cancellation_propagates_untouched() -> None:
    policy = FakePolicy([call("terminal"), anyio.sleep_forever])
    outcome: list[AgentResult] = []
    with anyio.move_on_after(7.0) as scope:
        outcome.append((await run(policy, step_deadline=100.0))[0])
    assert scope.cancelled_caught
    assert outcome == []


async def test_outer_cancellation_wins_over_a_simultaneous_step_deadline() -> None:
    policy = FakePolicy([anyio.sleep_forever])
    outcome: list[AgentResult] = []
    with anyio.move_on_after(5.0) as scope:
        outcome.append((await run(policy, step_deadline=5.0))[0])
    assert scope.cancel_called
    # Either the step deadline fired first and then the outer cancel was re-delivered, or the
    # outer scope caught it directly: no result escapes a cancelled scope either way.
    assert outcome == []


async def test_runner_failure_propagates() -> None:
    class Broken(FakeTools):
        async def call_many(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
            raise RuntimeError("executor crashed")

    with pytest.raises(RuntimeError, match="executor crashed"):
        await run(FakePolicy([call("terminal")]), Broken())


async def test_completion_refuses_fabricated_logprobs() -> None:
    with pytest.raises(ValueError, match="logprobs_available"):
        Completion(text="x", completion_logprobs=[-0.1])
    with pytest.raises(ValueError, match="logprobs_available"):
        Completion(text="x", logprobs_available=True)
    with pytest.raises(ValueError, match="placeholder"):
        Completion(text="x", completion_tokens=[])
    with pytest.raises(ValueError, match="2 completion tokens"):
        Completion(
            text="x", completion_tokens=[1, 2], completion_logprobs=[-1.0], logprobs_available=True
        )
    with pytest.raises(ValueError, match="finite"):
        Completion(text="x", completion_logprobs=[0.5], logprobs_available=True)
    await anyio.lowlevel.checkpoint()

"""Context overflow is an outcome, not a crash: ``context_exhausted``, scored or masked."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import atroposlib  # noqa: F401  (the atropos extra is part of the dev install)
import pytest

from structenv import ContextExhaustedError, ToolCall, ToolResult
from structenv.agent import (
    AgentConfig,
    AgentTask,
    Completion,
    OpenAIPolicy,
    OpenAIPolicyConfig,
    build_tiny_tokenizer,
    run_agent,
)
from structenv.examples._shell_data import shell_task_solutions
from structenv.testing import ReplayScript, serve_policy_server

TASK = AgentTask(prompt="Do the thing.", id="t")
VLLM_400 = json.dumps(
    {
        "object": "error",
        "message": "This model's maximum context length is 4096 tokens. "
        "However, you requested 5012 tokens (4500 in the messages, 512 in the completion).",
        "type": "BadRequestError",
        "code": 400,
    }
).encode()


class _Tools:
    def specs(self) -> list[dict[str, Any]]:
        return [{"type": "function", "function": {"name": "terminal", "parameters": {}}}]

    async def call_many(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        return [ToolResult(call_id=c.id, name=c.name, content="ok") for c in calls]


@pytest.mark.anyio
async def test_a_server_context_overflow_ends_the_trajectory_once(
    anyio_backend: str, error_server: Any
) -> None:
    error_server.routes["/v1/chat/completions"] = (400, VLLM_400)
    config = OpenAIPolicyConfig(base_url=error_server.base_url, model="m", backoff_initial=0)
    async with OpenAIPolicy(config) as policy:
        with pytest.raises(ContextExhaustedError, match="HTTP 400 \\(not retried\\)"):
            await policy.complete([{"role": "user", "content": "x"}], tools=[])
        result = await run_agent(policy, _Tools(), TASK, config=AgentConfig())
    assert result.finish_reason == "context_exhausted"
    assert result.error is not None and "maximum context length is 4096" in result.error
    assert error_server.requests == ["/v1/chat/completions"] * 2  # never retried


class _CountingPolicy:
    """Each turn calls a tool and reports 40 more prompt tokens than the last."""

    def __init__(self) -> None:
        self.calls = 0

    async def complete(
        self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]]
    ) -> Completion:
        self.calls += 1
        await anyio.lowlevel.checkpoint()
        text = '<tool_call>{"name": "terminal", "arguments": {"command": "ls"}}</tool_call>'
        return Completion(
            text=text, prompt_tokens=list(range(40 * self.calls)), completion_tokens=[1] * 10
        )


@pytest.mark.anyio
async def test_a_context_budget_ends_the_loop_before_an_impossible_prompt(
    anyio_backend: str,
) -> None:
    policy = _CountingPolicy()
    result = await run_agent(policy, _Tools(), TASK, config=AgentConfig(context_tokens=100))
    assert result.finish_reason == "context_exhausted"
    assert policy.calls == 3 and result.steps == 3  # 50, 90, then 130 >= 100
    assert result.error == "130 tokens after step 3 reach the context budget of 100"
    no_budget = await run_agent(_CountingPolicy(), _Tools(), TASK, config=AgentConfig(max_steps=4))
    assert no_budget.finish_reason == "max_steps"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # atroposlib is asyncio-only
async def test_env_scores_or_masks_an_exhausted_trajectory(
    anyio_backend: str, tokenizer_dir: Path, tmp_path: Path
) -> None:
    from structenv.adapters.atropos import APIServerConfig
    from structenv.examples.shell_tasks import ShellTasksEnv, ShellTasksEnvConfig

    config = ShellTasksEnvConfig(
        task_ids=["fix-add"], group_size=2, tokenizer_name=str(tokenizer_dir), use_wandb=False,
        data_path_to_save_groups=None, backend_options={"slots_per_host": 2},
        agent_context_tokens=64,
    )  # fmt: skip
    assert config.on_context_exhausted == "score"  # the documented default
    server_config = APIServerConfig(
        server_type="vllm", base_url="http://127.0.0.1:1/v1", model_name="scripted",
        tokenizer_name=str(tokenizer_dir), api_key="x", health_check=False,
    )  # fmt: skip
    async with serve_policy_server(ReplayScript(shell_task_solutions())) as policy:
        server_config.base_url = policy.base_url
        env = ShellTasksEnv(config, [server_config])
        reports: list[Any] = []
        env.add_group_listener(reports.append)
        async with env.sandbox_session():
            try:
                scored, _ = await env.collect_trajectories("fix-add")
                env.config.on_context_exhausted = "mask"
                masked, _ = await env.collect_trajectories("fix-add")
            finally:
                await env.aclose()
    assert scored is not None and masked is not None
    assert reports[0].finish_reasons == ["context_exhausted"] * 2
    assert reports[0].failures == [None, None]  # verified and scored like any other ending
    assert any(m != -100 for m in scored["masks"][0])
    assert reports[1].failed == 2
    assert all(str(f).startswith("context_exhausted: ") for f in reports[1].failures)
    assert all(m == -100 for mask in masked["masks"] for m in mask)
    stats = env.statistics()
    assert stats.context_exhausted == 4 and stats.inference_failures == 0

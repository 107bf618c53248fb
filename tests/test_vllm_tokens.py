"""Exact token tracking against stock vLLM's OpenAI API, on a scripted fake of its responses.

The fake (``serve_policy_server(generate_endpoint=False)``) answers as stock vLLM 0.32 does:
no ``/generate`` (404), ``/v1/completions`` with a token-id prompt, ``logprobs: 0`` and
``return_tokens_as_token_ids``, chat completions with ``return_token_ids``, ``/tokenize`` and
``/v1/models`` with ``root``. The real server is exercised in ``test_vllm_real.py``; these
tests pin the alignment logic of both loops (the agent loop on its own and the Atropos env)
fast, on asyncio and trio.
"""

from __future__ import annotations

import functools
import json
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import atroposlib  # noqa: F401  (the atropos extra is part of the dev install)
import pytest

from structenv import ConfigError, PolicyError, ProtocolError, ToolCall, ToolResult
from structenv.agent import (
    AgentConfig,
    AgentTask,
    Completion,
    OpenAIPolicy,
    OpenAIPolicyConfig,
    build_tiny_tokenizer,
    run_agent,
)
from structenv.agent._tokens import (
    MASK,
    PromptRenderer,
    TokenTracker,
    parse_token_completion,
)
from structenv.examples._shell_data import tool_call
from structenv.testing import (
    FakeBackend,
    Fault,
    ReplayScript,
    child_processes,
    serve_policy_server,
    task_marker,
    virtual_time_backend,
)
from vllm_support import runs

WRITE = tool_call("write_file", path="answer.txt", content="42")
LS = tool_call("terminal", command="ls")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def sampled(tokenizer: Any, text: str, *, eos: bool = True) -> Completion:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if eos:
        ids.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return Completion(
        text=text,
        completion_tokens=ids,
        completion_logprobs=[-0.5] * len(ids),
        logprobs_available=True,
    )


# --------------------------------------------------------------------------- the tracker


def test_tracker_builds_one_aligned_sequence_across_turns(tokenizer: Any) -> None:
    renderer = PromptRenderer(tokenizer)
    tracker = TokenTracker(renderer)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "do it"},
    ]
    assert tracker.sequence() is None
    completions = []
    for step, text in enumerate([LS, "é\ufffd odd bytes", "Done."]):
        turn = tracker.prepare(messages)
        assert turn.prompt_tokens[: len(tracker.tokens)] == tracker.tokens
        assert not turn.branch
        # A truncated turn (no end-of-turn token) is closed by masked template text.
        completion = sampled(tokenizer, text, eos=step != 1)
        tracker.prepare(messages)  # preparing again changes nothing
        tracker.commit(turn, messages, completion)
        completions.append(completion)
        messages += [{"role": "assistant", "content": text}, {"role": "tool", "content": "ok"}]
    sequence = tracker.sequence()
    assert sequence is not None
    tokens, masks, logprobs = sequence
    assert runs(tokens, masks) == [c.completion_tokens for c in completions]
    assert all((lp == 1.0) == (m == MASK) for lp, m in zip(logprobs or [], masks, strict=True))
    # The sequence is the conversation as the template renders it (the truncated turn
    # closed), ending with the last sampled token.
    final = renderer.render(messages[:-1], generation=False)
    assert tokenizer.decode(tokens) + "\n" == final
    assert not tracker.branched


def test_tracker_branches_when_the_conversation_is_rewritten(tokenizer: Any) -> None:
    tracker = TokenTracker(PromptRenderer(tokenizer))
    messages = [{"role": "user", "content": "hi"}]
    turn = tracker.prepare(messages)
    tracker.commit(turn, messages, sampled(tokenizer, "first"))
    rewritten = [
        *messages,
        {"role": "assistant", "content": "edited"},
        {"role": "user", "content": "?"},
    ]
    turn = tracker.prepare(rewritten)
    assert turn.branch
    tracker.commit(turn, rewritten, sampled(tokenizer, "second"))
    assert tracker.branched
    sequence = tracker.sequence()
    assert sequence is not None
    assert runs(sequence[0], sequence[1]) == [sampled(tokenizer, "second").completion_tokens]


def test_tracker_chat_mode_extends_or_branches(tokenizer: Any) -> None:
    tracker = TokenTracker(PromptRenderer(tokenizer))
    first = Completion(
        text="a", prompt_tokens=[1, 2], completion_tokens=[3], completion_logprobs=[-1.0],
        logprobs_available=True,
    )  # fmt: skip
    tracker.commit_server(first)
    second = Completion(
        text="b", prompt_tokens=[1, 2, 3, 4], completion_tokens=[5], completion_logprobs=None,
    )  # fmt: skip
    tracker.commit_server(second)
    assert tracker.tokens == [1, 2, 3, 4, 5]
    assert tracker.masks == [MASK, MASK, 3, MASK, 5]
    assert tracker.sequence() == ([1, 2, 3, 4, 5], [MASK, MASK, 3, MASK, 5], None)
    third = Completion(
        text="c", prompt_tokens=[1, 9], completion_tokens=[6], completion_logprobs=[-2.0],
        logprobs_available=True,
    )  # fmt: skip
    tracker.commit_server(third)
    assert tracker.branched
    assert tracker.sequence() == ([1, 9, 6], [MASK, MASK, 6], [1.0, 1.0, -2.0])


def test_completions_body_is_parsed_strictly() -> None:
    body = {
        "choices": [
            {
                "text": "hi",
                "finish_reason": "stop",
                "logprobs": {"tokens": ["token_id:104", "token_id:105"],
                             "token_logprobs": [-0.1, -0.2]},
                "token_ids": [104, 105],
                "prompt_token_ids": [1, 2],
            }
        ]
    }  # fmt: skip
    completion = parse_token_completion(body)
    assert completion.completion_tokens == [104, 105]
    assert completion.prompt_tokens == [1, 2]
    assert completion.completion_logprobs == [-0.1, -0.2]
    broken: list[tuple[str, Any]] = [
        ("not 'token_id", {"tokens": ["h", "i"], "token_logprobs": [-0.1, -0.2]}),
        ("equal lists", {"tokens": ["token_id:104"], "token_logprobs": [-0.1, -0.2]}),
        ("invalid logprob", {"tokens": ["token_id:1", "token_id:2"], "token_logprobs": [0.5, 0]}),
        ("without logprobs", None),
    ]
    for message, logprobs in broken:
        choice = {**body["choices"][0], "logprobs": logprobs}
        with pytest.raises(ProtocolError, match=message):
            parse_token_completion({"choices": [choice]})
    choice = {**body["choices"][0], "token_ids": [104, 106]}
    with pytest.raises(ProtocolError, match="disagree"):
        parse_token_completion({"choices": [choice]})


def test_completions_mode_needs_a_tokenizer_and_a_length(tokenizer: Any) -> None:
    config = OpenAIPolicyConfig(base_url="http://x/v1", model="m", token_ids="completions")
    with pytest.raises(ValueError, match="tokenizer"):
        OpenAIPolicy(config.model_copy(update={"max_tokens": 8}))
    with pytest.raises(ValueError, match="max_tokens or context_length"):
        OpenAIPolicy(config, tokenizer=tokenizer)


# --------------------------------------------------------------------------- the agent loop


class OkTools:
    """A ToolRunner answering every call with ``ok``."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def specs(self) -> list[dict[str, Any]]:
        return [
            {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
            for n in ("terminal", "write_file")
        ]

    async def call_many(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        self.calls += [c.name for c in calls]
        return [ToolResult(call_id=c.id, name=c.name, content="ok") for c in calls]


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["completions", "chat"])
async def test_agent_loop_gets_the_servers_exact_tokens(tokenizer: Any, mode: str) -> None:
    script = ReplayScript({"t": [LS, WRITE, "Done."]})
    async with serve_policy_server(script, generate_endpoint=False) as server:
        config = OpenAIPolicyConfig(
            base_url=server.base_url, model="scripted", token_ids=mode,
            context_length=server.max_model_len, max_retries=0,
        )  # fmt: skip
        async with OpenAIPolicy(config, tokenizer=tokenizer) as policy:
            tracked = policy.track()
            tools = OkTools()
            task = AgentTask(prompt=f"do it {task_marker('t')}", system="be good")
            result = await run_agent(tracked, tools, task, config=AgentConfig(max_steps=5))
        stats = server.statistics()
    assert result.finish_reason == "final_answer"
    assert tools.calls == ["terminal", "write_file"]
    sequence = tracked.sequence()
    assert sequence is not None
    tokens, masks, logprobs = sequence
    assert not tracked.branched
    assert runs(tokens, masks) == [c.completion_tokens for c in result.completions]
    assert logprobs is not None
    trained = [lp for lp, m in zip(logprobs, masks, strict=True) if m != MASK]
    assert trained == [lp for c in result.completions for lp in c.completion_logprobs or []]
    last = result.completions[-1]
    assert last.prompt_tokens is not None and last.completion_tokens is not None
    assert tokens == last.prompt_tokens + last.completion_tokens
    for completion, message in zip(
        result.completions, [m for m in result.messages if m["role"] == "assistant"], strict=True
    ):
        assert (
            tokenizer.decode(completion.completion_tokens, skip_special_tokens=True)
            == (message["content"])
        )
    counted = stats.completions if mode == "completions" else stats.chat_completions
    assert counted == 3 and stats.generations == 0


@pytest.mark.anyio
async def test_cancelled_turn_leaves_the_sequence_as_it_was(tokenizer: Any) -> None:
    async with serve_policy_server(ReplayScript({}), generate_endpoint=False) as server:
        config = OpenAIPolicyConfig(
            base_url=server.base_url, model="scripted", token_ids="completions", max_tokens=64
        )
        async with OpenAIPolicy(config, tokenizer=tokenizer) as policy:
            tracked = policy.track()
            messages = [{"role": "user", "content": "hi"}]
            await tracked.complete(messages, tools=[])
            assert tracked.tracker is not None
            before = list(tracked.tracker.tokens)
            server.inject(Fault("hang"))
            history = [*messages, {"role": "assistant", "content": "x"}]
            with anyio.move_on_after(5) as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(functools.partial(tracked.complete, history, tools=[]))
                    await server.wait_requests(2)
                    tg.cancel_scope.cancel()
            assert not scope.cancelled_caught
            assert tracked.tracker.tokens == before
        with anyio.fail_after(5):
            await server.wait_idle()
        assert server.statistics().open_connections == 0


# --------------------------------------------------------------------------- the Atropos env


def make_env(tokenizer_dir: Path, base_url: str, backend: FakeBackend, **fields: Any) -> Any:
    from structenv.adapters.atropos import AgentEnv, AgentEnvConfig, APIServerConfig

    class Env(AgentEnv):
        def create_backend(self) -> FakeBackend:
            return backend

        async def get_next_item(self) -> str:
            return "t"

        def build_task(self, item: Any) -> AgentTask:
            return AgentTask(prompt=f"Write 42 {task_marker('t')}", id="t")

        async def score_trajectory(self, item: Any, result: Any) -> float:
            return 1.0 if result.ok else 0.0

    config = AgentEnvConfig(
        group_size=2, tokenizer_name=str(tokenizer_dir), use_wandb=False, **fields
    )
    api = APIServerConfig(
        server_type="vllm", base_url=base_url, model_name="scripted",
        tokenizer_name=str(tokenizer_dir), api_key="x", health_check=False,
    )  # fmt: skip
    return Env(config, [api])


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # atroposlib is asyncio-only
async def test_env_detects_stock_vllm_and_trains_on_exact_tokens(
    tokenizer_dir: Path, tokenizer: Any
) -> None:
    backend = FakeBackend(slots_per_host=4)
    script = ReplayScript({"t": [WRITE, "Done."]})
    async with serve_policy_server(script, generate_endpoint=False) as server:
        env = make_env(tokenizer_dir, server.base_url, backend)
        async with env.sandbox_session():
            await env.setup()
            group, _ = await env.collect_trajectories("t")
        await env.aclose()
        stats = server.statistics()
    assert stats.generations == 0 and stats.completions == 4
    assert group is not None and group["scores"] == [1.0, 1.0]
    for tokens, masks, logprobs in zip(
        group["tokens"], group["masks"], group["inference_logprobs"], strict=True
    ):
        eos = "<|im_end|>"
        assert [tokenizer.decode(r) for r in runs(tokens, masks)] == [WRITE + eos, "Done." + eos]
        assert all((lp == 1.0) == (m == MASK) for lp, m in zip(logprobs, masks, strict=True))
        assert all(lp < 0 for lp, m in zip(logprobs, masks, strict=True) if m != MASK)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # atroposlib is asyncio-only
async def test_env_refuses_a_tokenizer_that_is_not_the_servers(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    shutil.copytree(tokenizer_dir, other)
    config_path = other / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = config["chat_template"].replace("'<|im_start|>'", "'<|im_start|> '")
    config_path.write_text(json.dumps(config))
    (other / "chat_template.jinja").unlink(missing_ok=True)
    async with serve_policy_server(ReplayScript({}), generate_endpoint=False) as server:
        env = make_env(other, server.base_url, FakeBackend(slots_per_host=2))
        with pytest.raises(ConfigError, match="does not match the server's model"):
            await env.setup_inference()
        await env.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # atroposlib is asyncio-only
async def test_cancelled_setup_leaves_nothing_open(tokenizer_dir: Path) -> None:
    async with serve_policy_server(ReplayScript({}), generate_endpoint=False) as server:
        env = make_env(tokenizer_dir, server.base_url, FakeBackend(slots_per_host=2))
        server.inject(Fault("hang"))  # the tokenizer check's /tokenize never answers
        with anyio.move_on_after(10) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(env.setup_inference)
                await server.wait_requests(3)  # /generate probe, /v1/models, /tokenize
                tg.cancel_scope.cancel()
        assert not scope.cancelled_caught
        assert env._token_policies == []
        with anyio.fail_after(5):
            await server.wait_idle()
        await env.aclose()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_probe_waits_for_the_server_then_names_it(backend: str) -> None:
    """An env may start before its inference server: the probe asks again for a while (in
    virtual time here), then fails naming the URL."""
    from structenv.adapters.atropos._inference import choose_vllm_api

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        name, options = virtual_time_backend(backend)

        async def probe() -> float:
            start = anyio.current_time()
            with pytest.raises(PolicyError, match=rf"probing {url[:-3]}/generate: .* \(for 5s\)"):
                await choose_vllm_api(url, wait=5)
            return anyio.current_time() - start

        waited = anyio.run(probe, backend=name, backend_options=options)
    assert 5 <= waited < 7


def test_demo_command_against_stock_vllm_shape(tmp_path: Path, tokenizer_dir: Path) -> None:
    """The README's real-endpoint command (no --tokenizer: the server's model names it)."""
    from structenv._demo import main as demo_main
    from structenv.examples._shell_data import shell_task_solutions

    script = ReplayScript(shell_task_solutions(), mistake_rate=0.3, seed=1)
    out = tmp_path / "out"
    with anyio.from_thread.start_blocking_portal() as portal:
        cm = serve_policy_server(script, generate_endpoint=False, root=str(tokenizer_dir))
        with portal.wrap_async_context_manager(cm) as server:
            code = demo_main(
                ["--openai.base_url", server.base_url, "--openai.model_name", "scripted",
                 "--groups", "2", "--group-size", "2", "--out", str(out), "--quiet"]
            )  # fmt: skip
            stats = server.statistics()
    assert code == 0
    assert stats.generations == 0 and stats.completions > 0
    groups = [json.loads(line) for line in (out / "shell-tasks.jsonl").read_text().splitlines()]
    assert len(groups) == 2
    assert all("inference_logprobs" in g for g in groups)
    assert any(s > 0 for g in groups for s in g["scores"])
    assert not child_processes()

"""The scripted policy server: vLLM /generate shape (checked with atroposlib), replay, CLI."""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from structenv.agent import TinyCodec, build_tiny_tokenizer, parse_hermes
from structenv.testing._policy_server import (
    Fault,
    PolicyServer,
    ReplayScript,
    ReplayStep,
    main,
    serve_policy_server,
    task_marker,
)

CALL = (
    '<tool_call>{"name": "write_file", "arguments": {"path": "a.txt", "content": "hi"}}</tool_call>'
)
WRONG = (
    '<tool_call>{"name": "write_file", "arguments": {"path": "a.txt", "content": "no"}}</tool_call>'
)
SOLUTIONS: dict[str, list[str | ReplayStep]] = {
    "t1": [ReplayStep(CALL, wrong=WRONG), "Wrote the file."],
}
CHATML = f"<|im_start|>user\nPlease {task_marker('t1')}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
async def server() -> AsyncIterator[PolicyServer]:
    async with serve_policy_server(ReplayScript(SOLUTIONS)) as srv:
        yield srv


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny")


def _root(server: PolicyServer) -> str:
    return server.base_url.removesuffix("/v1")


@pytest.mark.anyio
async def test_health_models_and_errors(server: PolicyServer) -> None:
    async with httpx.AsyncClient(base_url=_root(server)) as client:
        assert (await client.get("/health")).status_code == 200
        models = (await client.get("/v1/models")).json()
        assert models["data"][0]["id"] == "scripted"
        assert (await client.get("/nope")).status_code == 404
        assert (await client.get("/generate")).status_code == 405
        bad = await client.post("/generate", content=b"{not json")
        assert bad.status_code == 400
        assert (await client.post("/generate", json={"prompt": 3})).status_code == 400
    assert server.statistics().requests == 6


@pytest.mark.anyio
async def test_generate_matches_vllm_shape(server: PolicyServer) -> None:
    codec = TinyCodec()
    prompt_ids = codec.encode(CHATML)
    request = {"prompt": {"prompt_token_ids": prompt_ids}, "logprobs": 0, "n": 2, "max_tokens": 500}
    async with httpx.AsyncClient(base_url=_root(server)) as client:
        reply = (await client.post("/generate", json=request)).json()
        short = (await client.post("/generate", json={**request, "n": 1, "max_tokens": 5})).json()
        stopped = (
            await client.post("/generate", json={"prompt": CHATML, "stop": ["write_file"]})
        ).json()
    assert reply["finish_reasons"] == ["stop", "stop"]
    assert reply["text"] == [CALL, CALL]
    assert reply["prompt_token_ids"] == prompt_ids
    for text, ids, logprobs in zip(
        reply["text"], reply["token_ids"], reply["logprobs"], strict=True
    ):
        assert codec.decode(ids) == text
        # vLLM: per token a one-element list of {"<token id>": logprob}.
        assert [int(next(iter(entry[0]))) for entry in logprobs] == ids
        values = [next(iter(entry[0].values())) for entry in logprobs]
        assert all(math.isfinite(v) and v < 0 for v in values)
        assert len(set(values)) > len(values) // 2
    # Two samples of one prompt draw different (seeded) logprobs.
    assert reply["logprobs"][0] != reply["logprobs"][1]
    assert short["finish_reasons"] == ["length"]
    assert len(short["token_ids"][0]) == 5
    assert stopped["text"] == ['<tool_call>{"name": "']
    assert "logprobs" not in stopped


@pytest.mark.anyio
async def test_generate_logprobs_are_deterministic(server: PolicyServer) -> None:
    request = {"prompt": CHATML, "logprobs": 0}
    async with httpx.AsyncClient(base_url=_root(server)) as client:
        first = (await client.post("/generate", json=request)).json()
        second = (await client.post("/generate", json=request)).json()
    assert first["logprobs"] == second["logprobs"]


# atroposlib is asyncio-only (aiohttp, asyncio.create_task), so this test runs on asyncio only.
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_atroposlib_vllm_server_tracks_tokens_across_turns(
    server: PolicyServer, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("atroposlib")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from atroposlib.envs.server_handling.managed_server import ManagedServer
    from atroposlib.envs.server_handling.server_baseline import APIServerConfig
    from atroposlib.envs.server_handling.vllm_server import VLLMServer

    config = APIServerConfig(
        server_type="vllm",
        base_url=server.base_url,
        model_name="scripted",
        tokenizer_name=str(tokenizer_dir),
        api_key="unused",
        health_check=False,
    )
    vllm = VLLMServer(config)
    prompt_tokens, outputs, logprobs, finishes = await vllm.tokens_and_logprobs_completion(
        prompt=CHATML, n=2, max_tokens=512
    )
    assert prompt_tokens == TinyCodec().encode(CHATML)
    assert finishes == ["stop", "stop"]
    assert [vllm.tokenizer.decode(o) for o in outputs] == [CALL, CALL]
    assert [len(lp) for lp in logprobs] == [len(o) for o in outputs]

    managed = ManagedServer(vllm, tokenizer=vllm.tokenizer)
    messages: list[dict[str, Any]] = [{"role": "user", "content": f"Do {task_marker('t1')}"}]
    first = await managed.chat_completion(messages=messages, n=1, max_tokens=512)
    assert first.choices[0].message.content == CALL
    messages += [
        {"role": "assistant", "content": CALL},
        {"role": "tool", "content": '<tool_response>\n{"content": "ok"}\n</tool_response>'},
    ]
    second = await managed.chat_completion(messages=messages, n=1, max_tokens=512)
    assert second.choices[0].message.content == "Wrote the file."
    (node,) = managed.current_nodes
    assert len(node.tokens) == len(node.masked_tokens) == len(node.logprobs)
    trained = [t for t in node.masked_tokens if t != -100]
    assert vllm.tokenizer.decode(trained) == CALL + "Wrote the file."
    # Assistant positions carry real logprobs; prompt/tool positions are masked with 1.0.
    for token, logprob in zip(node.masked_tokens, node.logprobs, strict=True):
        assert (logprob < 0) if token != -100 else (logprob == 1.0)


def test_replay_without_mistakes_is_exact() -> None:
    script = ReplayScript(SOLUTIONS)
    ask = [{"role": "user", "content": f"go {task_marker('t1')}"}]
    assert script(ask) == CALL
    after = [*ask, {"role": "assistant", "content": CALL}, {"role": "tool", "content": "ok"}]
    assert script(after) == "Wrote the file."
    done = [*after, {"role": "assistant", "content": "Wrote the file."}]
    assert script(done) == ReplayScript.done_text
    assert script([{"role": "user", "content": "no marker"}]) == ReplayScript.unknown_text
    assert script([{"role": "user", "content": task_marker("other")}]) == ReplayScript.unknown_text


def test_replay_mistakes_vary_within_a_group_and_are_seeded() -> None:
    ask = [{"role": "user", "content": f"go {task_marker('t1')}"}]

    def outcomes(seed: int) -> collections.Counter[str]:
        script = ReplayScript(SOLUTIONS, mistake_rate=0.5, seed=seed)
        return collections.Counter(script(ask) for _ in range(64))

    first = outcomes(1)
    assert first == outcomes(1)  # reproducible
    assert first != outcomes(2)
    assert first[CALL] > 10
    assert first[WRONG] > 0
    assert first[ReplayScript.give_up_text] > 0
    malformed = [t for t in first if parse_hermes(t).errors]
    assert malformed


def test_replay_retries_the_same_step_after_a_malformed_turn() -> None:
    script = ReplayScript(SOLUTIONS, mistake_rate=1.0, seed=0)
    ask = [{"role": "user", "content": f"go {task_marker('t1')}"}]
    bad = '<tool_call>{"name": "write_file", "arguments": {</tool_call>'
    after_bad = [*ask, {"role": "assistant", "content": bad}, {"role": "tool", "content": "err"}]
    clean = ReplayScript(SOLUTIONS)
    assert clean(after_bad) == CALL
    assert script.mistake_rate == 1.0
    assert script(after_bad) != CALL  # still step 0, and a mistake was forced


def test_replay_loads_json(tmp_path: Path) -> None:
    path = tmp_path / "solutions.json"
    path.write_text(json.dumps({"t1": [{"text": CALL, "wrong": WRONG}, "Wrote the file."]}))
    script = ReplayScript.from_json(path, seed=3)
    assert script.solutions == ReplayScript(SOLUTIONS).solutions
    with pytest.raises(ValueError, match="task id"):
        task_marker("has space")


@pytest.mark.anyio
async def test_cli_serves_as_a_separate_process(tmp_path: Path) -> None:
    solutions = tmp_path / "s.json"
    solutions.write_text(json.dumps({"t1": ["Hello from the CLI."]}))
    code = "import sys; from structenv.testing._policy_server import main; sys.exit(main())"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    async with await anyio.open_process(
        [sys.executable, "-c", code, "--solutions", str(solutions)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    ) as process:
        try:
            assert process.stdout is not None
            with anyio.fail_after(30):
                line = b""
                while not line.endswith(b"\n"):
                    line += await process.stdout.receive(1)
            base_url = line.decode().strip()
            assert base_url.startswith("http://127.0.0.1:")
            async with httpx.AsyncClient(base_url=base_url) as client:
                reply = await client.post(
                    "chat/completions",
                    json={"model": "m", "messages": [{"role": "user", "content": "[task:t1]"}]},
                )
            assert reply.json()["choices"][0]["message"]["content"] == "Hello from the CLI."
        finally:
            process.terminate()
            with anyio.move_on_after(10, shield=True):
                await process.wait()


def test_main_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        main(["--port", "not-a-number"])


@pytest.mark.anyio
async def test_connections_beyond_the_limit_get_503() -> None:
    async with serve_policy_server(ReplayScript(SOLUTIONS), max_connections=1) as srv:
        srv.inject(Fault("hang"))
        async with (
            httpx.AsyncClient(base_url=_root(srv)) as first,
            httpx.AsyncClient(base_url=_root(srv)) as second,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(functools.partial(first.post, "/generate", json={"prompt": "x"}))
            with anyio.fail_after(5):
                await srv.wait_requests(1)
            assert (await second.get("/health")).status_code == 503
            tg.cancel_scope.cancel()
        with anyio.fail_after(5):
            await srv.wait_idle()

"""Inference failures are loud: one-line errors, only transient failures retried, runs that
stop with a nonzero exit, failed members with their reasons, all-failed groups dropped.

Against real atroposlib servers and real HTTP servers on 127.0.0.1 (``error_server``,
``closed_port_url`` in conftest); atroposlib is asyncio-only, so are these tests.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import atroposlib  # noqa: F401  (the atropos extra is part of the dev install)
import httpx
import pytest

from structenv import ContextExhaustedError
from structenv.adapters.atropos import APIServerConfig, open_atropos_policy
from structenv.adapters.atropos._errors import (
    InferenceError,
    InferenceFailedError,
    install_retry_policy,
)
from structenv.agent import build_tiny_tokenizer
from structenv.examples._shell_data import shell_task_solutions
from structenv.testing import Fault, ReplayScript, child_processes, serve_policy_server

# atroposlib is asyncio-only (aiohttp, asyncio.create_task).
asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])

CONTEXT_400 = json.dumps(
    {
        "error": {
            "message": "This model's maximum context length is 4096 tokens. However, you "
            "requested 5000 tokens in the messages.",
            "code": 400,
        }
    }
).encode()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny")


def _manager(base_url: str, tokenizer: Path, server_type: str) -> Any:
    from atroposlib.envs.server_handling.server_manager import ServerManager

    config = APIServerConfig(
        server_type=server_type, base_url=base_url, model_name="m",
        tokenizer_name=str(tokenizer), api_key="x", health_check=False, timeout=20,
    )  # fmt: skip
    manager = ServerManager([config])
    install_retry_policy(manager, max_attempts=3, backoff_max=0.0)
    return manager


async def _complete(manager: Any, tokenizer: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    async with open_atropos_policy(manager, tokenizer=tok, max_tokens=8) as policy:
        return await policy.complete([{"role": "user", "content": "hi"}], tools=[])


@pytest.mark.anyio
@asyncio_only
async def test_inference_errors_name_url_status_attempts_and_only_transient_are_retried(
    anyio_backend: str,
    error_server: Any,
    closed_port_url: str,
    tokenizer_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="structenv.adapters.atropos")
    root = error_server.base_url.removesuffix("/v1")

    # Stock vLLM: no /generate. One request (a 404 is final), the fix in the message.
    with pytest.raises(InferenceError) as info:
        await _complete(_manager(error_server.base_url, tokenizer_dir, "vllm"), tokenizer_dir)
    message = str(info.value)
    assert f"{root}/generate: HTTP 404" in message and "after 1 attempt, not retried" in message
    assert "this server has no /generate: use --openai.server_type openai" in message
    assert "RetryError" not in message and "\n" not in message
    assert error_server.requests == ["/generate"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"{root}/generate" in warnings[0].getMessage()

    # openai mode: a plain 400 is sent once (atroposlib alone sent it nine times).
    error_server.requests.clear()
    error_server.routes["/v1/chat/completions"] = (400, b'{"error": {"message": "bad tool"}}')
    with pytest.raises(InferenceError, match=r"HTTP 400: bad tool \(after 1 attempt, not retried"):
        await _complete(_manager(error_server.base_url, tokenizer_dir, "openai"), tokenizer_dir)
    assert error_server.requests == ["/v1/chat/completions"]

    # A context overflow is its own error (an outcome of the trajectory), also not retried.
    error_server.requests.clear()
    error_server.routes["/v1/chat/completions"] = (400, CONTEXT_400)
    with pytest.raises(ContextExhaustedError, match="maximum context length is 4096"):
        await _complete(_manager(error_server.base_url, tokenizer_dir, "openai"), tokenizer_dir)
    assert len(error_server.requests) == 1

    # A 5xx is transient: three attempts, then the count and the status.
    error_server.requests.clear()
    error_server.routes["/generate"] = (503, b'{"error": {"message": "loading"}}')
    with pytest.raises(InferenceError, match=r"HTTP 503.*\(after 3 attempts\)"):
        await _complete(_manager(error_server.base_url, tokenizer_dir, "vllm"), tokenizer_dir)
    assert error_server.requests == ["/generate"] * 3

    # Garbage (a 200 that is not JSON) is final: retrying gets the same garbage.
    error_server.requests.clear()
    error_server.routes["/generate"] = (200, b"<html>not json {")
    with pytest.raises(InferenceError, match=r"/generate: .*not retried"):
        await _complete(_manager(error_server.base_url, tokenizer_dir, "vllm"), tokenizer_dir)
    assert error_server.requests == ["/generate"]

    # Nothing listening: transient, retried, the URL and the exception named.
    host = closed_port_url.removesuffix("/v1")
    with pytest.raises(InferenceError, match=rf"{host}/generate: ClientConnectorError.*3 attempts"):
        await _complete(_manager(closed_port_url, tokenizer_dir, "vllm"), tokenizer_dir)


def _env(base_url: str, tokenizer: Path, tmp_path: Path, **fields: Any) -> Any:
    from structenv.examples.shell_tasks import ShellTasksEnv, ShellTasksEnvConfig

    config = ShellTasksEnvConfig(
        task_ids=["fix-add"], group_size=2, total_steps=2, tokenizer_name=str(tokenizer),
        use_wandb=False, include_messages=True, ensure_scores_are_not_same=False,
        data_path_to_save_groups=str(tmp_path / "groups.jsonl"),
        backend_options={"slots_per_host": 2},
        agent_max_steps=6, inference_backoff_max_s=0.0, vllm_api="generate", **fields,
    )  # fmt: skip
    server = APIServerConfig(
        server_type="vllm", base_url=base_url, model_name="scripted",
        tokenizer_name=str(tokenizer), api_key="x", health_check=False,
    )  # fmt: skip
    return ShellTasksEnv(config, [server])


@pytest.mark.anyio
@asyncio_only
async def test_failed_members_keep_their_reason_all_failed_groups_drop_and_the_run_stops(
    anyio_backend: str, tokenizer_dir: Path, tmp_path: Path
) -> None:
    script = ReplayScript(shell_task_solutions())
    async with serve_policy_server(script) as policy:
        env = _env(policy.base_url, tokenizer_dir, tmp_path, max_consecutive_inference_failures=4)
        async with env.sandbox_session():
            try:
                # One member's request gets a 400: that member alone fails, with its reason.
                policy.inject(Fault("status", status=400), times=1)
                group, _ = await env.collect_trajectories("fix-add")
                assert group is not None and len(group["tokens"]) == 2
                failures = group["structenv"]["failures"]
                assert sum(f is not None for f in failures) == 1
                reason = next(f for f in failures if f is not None)
                assert "/generate: HTTP 400" in reason and "not retried" in reason
                assert env.statistics().inference_failures == 1

                # Every member fails on inference: no training group.
                policy.inject(Fault("status", status=400), times=None)
                reports: list[Any] = []
                env.add_group_listener(reports.append)
                group, _ = await env.collect_trajectories("fix-add")
                assert group is None
                assert reports[-1].dropped and reports[-1].drop_reason == "inference"
                assert all("HTTP 400" in str(f) for f in reports[-1].failures)
                stats = env.statistics()
                assert stats.dropped_groups == 1 and stats.inference_failures == 3

                # The 4th trajectory failing in a row stops the run, with a one-line reason
                # (4 or 5: the first group's failed member was first or last of its group).
                with pytest.raises(
                    InferenceFailedError, match=r"[45] trajectories in a row.*HTTP 400: Bad Request"
                ):
                    await env.collect_trajectories("fix-add")
            finally:
                await env.aclose()
        assert env.statistics().executor is not None
        assert env.statistics().executor.pool.in_use == 0


@pytest.mark.anyio
@asyncio_only
async def test_equal_score_drops_are_counted(
    anyio_backend: str, tokenizer_dir: Path, tmp_path: Path
) -> None:
    env = _env("http://127.0.0.1:1/v1", tokenizer_dir, tmp_path)
    env.config.ensure_scores_are_not_same = True
    group = {"tokens": [[1], [2]], "masks": [[1], [2]], "scores": [0.0, 0.0],
             "group_overrides": {}, "messages": [[], []]}  # fmt: skip
    await env.handle_send_to_api(group, do_send_to_api=False)
    assert env.statistics().dropped_groups == 1
    assert not (tmp_path / "groups.jsonl").exists()  # nothing written: no empty file either


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.anyio
@asyncio_only
async def test_serve_mode_stops_with_inference_failed_instead_of_looping(
    anyio_backend: str, tokenizer_dir: Path, tmp_path: Path, closed_port_url: str
) -> None:
    """Before: serve mode looped forever on "Scores are the same in a group, skipping..."."""
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "atroposlib.cli.run_api", "--host", "127.0.0.1"]
    async with (
        await anyio.open_process(
            [*argv, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ) as api,
        httpx.AsyncClient(base_url=api_url) as trainer,
    ):
        try:
            with anyio.fail_after(60):
                while True:
                    try:
                        if (await trainer.get("/status")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await anyio.sleep(0.2)
            registration = {
                "wandb_group": "g", "wandb_project": "p", "batch_size": 4,
                "max_token_len": 1 << 20, "checkpoint_dir": str(tmp_path),
                "save_checkpoint_interval": -1, "starting_step": 0, "num_steps": 1000,
            }  # fmt: skip
            assert (await trainer.post("/register", json=registration)).status_code == 200
            await trainer.get("/batch")  # the trainer has started: envs may register
            env = _env(closed_port_url, tokenizer_dir, tmp_path,
                       max_consecutive_inference_failures=4, rollout_server_url=api_url,
                       max_num_workers=2, wandb_name="structenv_failures_test")  # fmt: skip
            env.config.data_path_to_save_groups = None
            with anyio.fail_after(120), pytest.raises(InferenceFailedError, match="4 traj"):
                await env.env_manager()
            assert env.statistics().running_groups == 0
            assert (await trainer.get("/batch")).json().get("batch") is None
            ours = set(child_processes()) - {api.pid} - set(child_processes(api.pid))
            assert not ours, f"processes left behind: {ours}"
        finally:
            api.terminate()
            with anyio.move_on_after(10, shield=True):
                await api.wait()


def test_demo_against_a_server_without_generate_exits_1_with_the_fix(
    tmp_path: Path, error_server: Any, tokenizer_dir: Path
) -> None:
    """The README's real-endpoint command against stock vLLM, from a fresh process."""
    exe = shutil.which("structenv")
    assert exe is not None, "the structenv console script is not installed"
    out = tmp_path / "out"
    proc = subprocess.run(
        [exe, "demo", "--groups", "2", "--group-size", "2", "--out", str(out), "--quiet",
         "--openai.base_url", error_server.base_url, "--openai.model_name", "m",
         "--env.max_consecutive_inference_failures", "2", "--vllm-api", "generate",
         "--tokenizer", str(tokenizer_dir), "--env.inference_backoff_max_s", "0"],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("structenv demo: error: InferenceFailedError: inference failed for 2")
    assert "/generate: HTTP 404" in last and "use --openai.server_type openai" in last
    assert "Traceback" not in proc.stderr and "RetryError" not in proc.stderr
    assert "policy_error: InferenceError" in proc.stdout  # the failed members' reasons
    assert error_server.requests == ["/generate", "/generate"]  # a 404 is never retried
    assert not list(out.glob("*.jsonl"))  # no empty file shifting the next run's name


@pytest.mark.anyio
@asyncio_only
async def test_cancelling_a_request_between_attempts_propagates_and_leaves_nothing(
    anyio_backend: str, error_server: Any, tokenizer_dir: Path
) -> None:
    import asyncio

    error_server.routes["/generate"] = (503, b'{"error": {"message": "busy"}}')
    manager = _manager(error_server.base_url, tokenizer_dir, "vllm")
    install_retry_policy(manager)  # idempotent: the first policy stays
    before = set(asyncio.all_tasks())
    outcome: list[BaseException] = []

    async def complete() -> None:
        try:
            await _complete(manager, tokenizer_dir)
        except BaseException as exc:
            outcome.append(exc)
            raise

    loop = asyncio.get_running_loop()
    answered = asyncio.Event()
    error_server.on_request = lambda: loop.call_soon_threadsafe(answered.set)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(complete)
            await answered.wait()  # the first attempt failed: retrying now
            tg.cancel_scope.cancel()
    assert len(outcome) == 1 and isinstance(outcome[0], asyncio.CancelledError)
    assert len(error_server.requests) <= 3
    await anyio.lowlevel.checkpoint()
    assert set(asyncio.all_tasks()) <= before | {asyncio.current_task()}


def test_env_process_cli_against_a_closed_port_exits_1_in_one_line(
    tmp_path: Path, tokenizer_dir: Path, closed_port_url: str
) -> None:
    """``python my_env.py process`` (atroposlib's CLI) stops instead of writing masked zeros,
    and leaves no empty jsonl behind."""
    out = tmp_path / "out"
    tok = str(tokenizer_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "structenv.examples.shell_tasks", "process",
         "--env.tokenizer_name", tok, "--env.use_wandb", "False",
         "--env.data_path_to_save_groups", str(out / "groups.jsonl"),
         "--env.total_steps", "3", "--env.group_size", "2",
         "--env.backend_options.slots_per_host", "2",
         "--env.max_consecutive_inference_failures", "2", "--env.inference_backoff_max_s", "0",
         "--env.vllm_api", "generate",
         "--openai.base_url", closed_port_url, "--openai.model_name", "m",
         "--openai.api_key", "x", "--openai.tokenizer_name", tok],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
        env=dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled"),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    host = closed_port_url.removesuffix("/v1")
    assert last.startswith("ShellTasksEnv process: error: InferenceFailedError: inference failed")
    assert f"{host}/generate: ClientConnectorError" in last and "(after 3 attempts)" in last
    assert "Traceback" not in proc.stderr
    assert not list(out.glob("*"))

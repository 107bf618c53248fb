"""``serve`` mode against atroposlib's real ``run-api`` and a test trainer, worker timeouts.

run-api runs as a subprocess on a free port; the test plays the trainer (POST /register, poll
GET /batch). One task's solution runs a ``sleep`` that never ends on its own, so BaseEnv's
``worker_timeout`` cancels those workers while their commands run; afterwards no slot may be
leased and, once the env stops, no sandbox process may be left.

Conditions, not wall-clock guesses: the timeout is off (0) while the other task's groups make a
batch at whatever pace the machine allows; the test turns it on only once a batch has arrived
and every worker holds a group whose members all run their command in the sandbox (seen in
/proc), so it fires for sure, and only on groups that are held.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import atroposlib  # noqa: F401  (the atropos extra is part of the dev install)
import httpx
import pytest
import uvicorn  # noqa: F401

from structenv.agent import build_tiny_tokenizer
from structenv.examples._shell_data import shell_task_solutions, tool_call
from structenv.testing import (
    ReplayScript,
    ReplayStep,
    child_processes,
    cmdline,
    serve_policy_server,
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny")


#: Bounds every wait on a condition, so a broken run fails instead of hanging; never reached by
#: a healthy run, however loaded the machine.
HANG_GUARD = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# atroposlib is asyncio-only (aiohttp, asyncio.create_task): asyncio only.
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_serve_mode_batches_and_worker_timeouts_leave_nothing(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    from atroposlib.envs.base import APIServerConfig

    from structenv.examples.shell_tasks import ShellTasksEnv, ShellTasksEnvConfig

    class ServeEnv(ShellTasksEnv):
        feeding = True

        async def get_next_item(self) -> str | None:  # type: ignore[override]  # None ends serving
            return await super().get_next_item() if self.feeding else None

    solutions: dict[str, list[str | ReplayStep]] = {
        task: [*steps] for task, steps in shell_task_solutions().items()
    }
    marker = f"4242.{secrets.randbelow(10**6):06d}"  # seconds: it never ends on its own
    solutions["count-lines"] = [
        tool_call("terminal", command=f"sleep {marker}", timeout=600),
        "Done.",
    ]
    needle = f"sleep\0{marker}\0".encode()

    def sleeping() -> int:
        return sum(needle in cmdline(pid) for pid in child_processes())

    port = _free_port()
    api_url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "atroposlib.cli.run_api", "--host", "127.0.0.1"]
    async with (
        await anyio.open_process(
            [*argv, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ) as api,
        httpx.AsyncClient(base_url=api_url) as trainer,
        serve_policy_server(ReplayScript(solutions)) as policy,
    ):
        try:
            with anyio.fail_after(HANG_GUARD):
                while True:
                    try:
                        if (await trainer.get("/status")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await anyio.sleep(0.2)
            registration = {
                "wandb_group": "g",
                "wandb_project": "p",
                "batch_size": 4,
                "max_token_len": 1 << 20,
                "checkpoint_dir": str(tmp_path),
                "save_checkpoint_interval": -1,
                "starting_step": 0,
                "num_steps": 1000,
            }
            assert (await trainer.post("/register", json=registration)).status_code == 200

            config = ShellTasksEnvConfig(
                task_ids=["fix-add", "count-lines"],
                group_size=2,
                max_num_workers=2,
                worker_timeout=0,  # off until the test turns it on (BaseEnv: 0 = none)
                rollout_server_url=api_url,
                wandb_name="structenv_serve_test",
                use_wandb=False,
                ensure_scores_are_not_same=False,
                tokenizer_name=str(tokenizer_dir),
                backend_options={"slots_per_host": 4},
                agent_max_steps=6,
            )
            api_config = APIServerConfig(
                server_type="vllm",
                base_url=policy.base_url,
                model_name="scripted",
                tokenizer_name=str(tokenizer_dir),
                api_key="x",
                health_check=False,
            )
            env = ServeEnv(config, [api_config])
            batches: list[Any] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(env.env_manager)
                # Deadlines below are hang guards only: every wait is for a condition.
                with anyio.fail_after(HANG_GUARD):
                    # Tasks alternate, so once two fix-add groups made a batch, both workers
                    # hold a count-lines group whose members all sleep.
                    held = config.max_num_workers * config.group_size
                    while not batches or sleeping() < held:
                        batch = (await trainer.get("/batch")).json().get("batch")
                        if batch:
                            batches.append(batch)
                        await anyio.sleep(0.25)
                # Stop feeding, then let the timeout fire: every group still running is held
                # in its sandbox, so BaseEnv cancels it at its next loop.
                env.feeding = False
                env.backlog.clear()
                cancelled_before = env.statistics().cancelled_groups
                env.config.worker_timeout = 1e-3
                with anyio.fail_after(HANG_GUARD):
                    await env.wait_idle()
                assert env.statistics().running_groups == 0
                stats = env.statistics()
                assert stats.executor is not None
                assert stats.executor.pool.in_use == 0
                assert stats.executor.active_trajectories == 0
                assert stats.executor.pool.acquired == stats.executor.pool.released
                tg.cancel_scope.cancel()

            assert stats.cancelled_groups > cancelled_before
            assert sleeping() == 0
            ours = set(child_processes()) - {api.pid} - set(child_processes(api.pid))
            assert not ours, f"processes left behind: {ours}"
            for batch in batches:
                for group in batch:
                    for tokens, masks in zip(group["tokens"], group["masks"], strict=True):
                        assert tokens and len(tokens) == len(masks)
                    lps = group["inference_logprobs"]
                    assert [len(x) for x in lps] == [len(t) for t in group["tokens"]]
        finally:
            api.terminate()
            with anyio.move_on_after(10, shield=True):
                await api.wait()

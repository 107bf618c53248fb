"""End to end, offline: ShellTasksEnv in atroposlib's process mode.

Real sandboxes (LocalBackend, bubblewrap), the scripted policy server over real HTTP (vLLM's
/generate), atroposlib's ManagedServer tracking tokens, pytest run inside each slot.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import atroposlib  # noqa: F401  (the atropos extra is part of the dev install)
import pytest

from structenv.agent import build_tiny_tokenizer
from structenv.testing import ReplayScript, child_processes, serve_policy_server


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny")


# atroposlib is asyncio-only (aiohttp, asyncio.create_task): asyncio only.
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_process_mode_writes_real_token_groups(tokenizer_dir: Path, tmp_path: Path) -> None:
    from atroposlib.envs.base import APIServerConfig
    from transformers import AutoTokenizer

    from structenv.examples._shell_data import shell_task_solutions
    from structenv.examples.shell_tasks import ShellTasksEnv, ShellTasksEnvConfig

    tasks = ["fix-add", "make-greeting", "fix-slugify"]
    script = ReplayScript(shell_task_solutions(), mistake_rate=0.4, seed=7)
    out = tmp_path / "groups.jsonl"
    async with serve_policy_server(script, seed=7) as server:
        config = ShellTasksEnvConfig(
            task_ids=tasks,
            group_size=3,
            total_steps=3,
            tokenizer_name=str(tokenizer_dir),
            use_wandb=False,
            include_messages=True,
            ensure_scores_are_not_same=False,
            data_path_to_save_groups=str(out),
            backend_options={"slots_per_host": 3},
            agent_max_steps=8,
            trajectory_timeout_s=300,  # generous: CI machines can be slow
        )
        api = APIServerConfig(
            server_type="vllm",
            base_url=server.base_url,
            model_name="scripted",
            tokenizer_name=str(tokenizer_dir),
            api_key="x",
            health_check=False,
        )
        env = ShellTasksEnv(config, [api])
        env.process_mode = True
        env.n_groups_to_process = 3
        env.group_size_to_process = 3
        with warnings.catch_warnings():
            # process mode warns per group that the trainer's max length is unset (-1).
            warnings.filterwarnings("ignore", message="Trainer requested to ignore max length")
            await env.process_manager()
        assert env.check_mode == "pytest"  # pytest ran inside the sandbox
        stats = env.statistics()
        assert stats.executor is not None
        assert stats.executor.pool.in_use == 0
        assert stats.executor.pool.acquired == stats.executor.pool.released
    assert not child_processes()  # sandbox hosts and their sandboxes are gone
    assert out.with_suffix(".html").is_file()

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    groups = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(groups) == 3
    scores: list[float] = []
    failed = 0
    for group in groups:
        assert len(group["tokens"]) == 3
        scores += group["scores"]
        for i, (tokens, masks, logprobs) in enumerate(
            zip(group["tokens"], group["masks"], group["inference_logprobs"], strict=True)
        ):
            assert tokens and len(tokens) == len(masks) == len(logprobs)
            trained = [lp for lp, m in zip(logprobs, masks, strict=True) if m != -100]
            masked = [lp for lp, m in zip(logprobs, masks, strict=True) if m == -100]
            assert all(lp == 1.0 for lp in masked)
            if not trained:  # a failed member (e.g. a deadline on a loaded machine): masked
                assert group["scores"][i] == 0.0
                failed += 1
                continue
            # Real logprobs: negative, varied, never 0.0 placeholders.
            assert trained and all(lp < 0.0 for lp in trained)
            assert len(set(trained)) > len(trained) // 2
            messages: list[dict[str, Any]] = group["messages"][i]
            assistant = "".join(m["content"] for m in messages if m["role"] == "assistant")
            # Exactly the assistant turns are trained; prompt and tool responses are masked.
            assert tok.decode([t for t in masks if t != -100]) == assistant
            assert messages[0]["role"] == "system" and messages[1]["role"] == "user"
            for m in messages:
                if m["role"] == "tool":  # in the tokens, but masked
                    assert m["content"].startswith("<tool_response>")
                    assert m["content"] in tok.decode(tokens)
    assert failed <= 1, f"{failed} of 9 trajectories failed"
    assert len(set(scores)) > 1  # seeded mistakes make scores vary
    assert max(scores) == 1.0

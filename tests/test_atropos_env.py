"""AgentEnv unit tests: hook order, failure policy, config validation (FakeBackend sandboxes).

The policy is real: atroposlib's VLLMServer/ManagedServer against the scripted policy server
with the tiny tokenizer, so the tokens checked here are the ones a trainer would get.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import atroposlib  # noqa: F401  (the atropos extra is part of the dev install)
import pytest
from pydantic import ValidationError

from structenv import ConfigError
from structenv.adapters import (
    ExecTool,
    MemberOutcome,
    TokenSequence,
    build_scored_group,
)
from structenv.adapters.atropos import AgentEnv, AgentEnvConfig
from structenv.agent import AgentResult, AgentTask, build_tiny_tokenizer
from structenv.backends import DockerOptions, NomadBackend, available_backends, create_backend
from structenv.examples._shell_data import tool_call
from structenv.testing import (
    FakeBackend,
    PolicyServer,
    assert_no_leaks,
    serve_policy_server,
    task_marker,
)

WRITE = tool_call("write_file", path="answer.txt", content="42")
HANG = tool_call("terminal", command="hang")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny")


class HangFirst:
    """Scripted policy: the first trajectory to start runs a command that never ends."""

    def __init__(self) -> None:
        self.starts = 0

    def __call__(self, messages: Sequence[Mapping[str, Any]]) -> str:
        if not any(m.get("role") == "assistant" for m in messages):
            self.starts += 1
            return HANG if self.starts == 1 else WRITE
        return "Done."


class RecordingEnv(AgentEnv):
    name = "recording"

    def __init__(self, config: AgentEnvConfig, servers: list[Any], backend: FakeBackend) -> None:
        self.events: list[Any] = []
        self.fake = backend
        super().__init__(config, servers)

    def create_backend(self) -> FakeBackend:
        return self.fake

    async def get_next_item(self) -> str:
        return "t"

    async def setup_agent_env(self) -> None:
        self.events.append("setup_agent_env")

    def build_task(self, item: Any) -> AgentTask:
        self.events.append("build_task")
        return AgentTask(prompt=f"Write 42 to answer.txt {task_marker('t')}", id="t")

    def build_agent_config(self, item: Any) -> Any:
        self.events.append("build_agent_config")
        return super().build_agent_config(item)

    async def setup_trajectory_workspace(
        self, item: Any, *, trajectory_id: str, exec_tool: ExecTool
    ) -> None:
        self.events.append(("workspace", trajectory_id))
        await exec_tool.write_file("seed.txt", "seed")

    async def verify_and_score_trajectory(
        self, item: Any, result: AgentResult, *, trajectory_id: str, exec_tool: ExecTool
    ) -> float:
        # Runs in the trajectory's own slot, before it is released.
        assert self.executor.pool.statistics().in_use >= 1
        assert await exec_tool.read_file("seed.txt") == b"seed"
        self.events.append(("verify", trajectory_id))
        try:
            return 1.0 if await exec_tool.read_file("answer.txt") == b"42" else 0.0
        except OSError:
            return 0.0


def make_env(
    tokenizer_dir: Path,
    server: PolicyServer,
    backend: FakeBackend,
    server_type: str = "vllm",
    **fields: Any,
) -> RecordingEnv:
    from atroposlib.envs.base import APIServerConfig

    config = AgentEnvConfig(
        group_size=fields.pop("group_size", 3),
        tokenizer_name=str(tokenizer_dir),
        use_wandb=False,
        **fields,
    )
    api = APIServerConfig(
        server_type=server_type,
        base_url=server.base_url,
        model_name="scripted",
        tokenizer_name=str(tokenizer_dir),
        api_key="x",
        health_check=False,
    )
    return RecordingEnv(config, [api], backend)


def check_sequences(group: Mapping[str, Any]) -> None:
    for tokens, masks, logprobs in zip(
        group["tokens"], group["masks"], group["inference_logprobs"], strict=True
    ):
        assert tokens and len(tokens) == len(masks) == len(logprobs)
        for token, mask, logprob in zip(tokens, masks, logprobs, strict=True):
            assert mask in (-100, token)
            assert (logprob == 1.0) if mask == -100 else (logprob < 0.0)


# atroposlib is asyncio-only (aiohttp, asyncio.create_task): these tests run on asyncio only.
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_hooks_run_in_order_inside_the_slot(tokenizer_dir: Path) -> None:
    from structenv.testing import ReplayScript

    backend = FakeBackend(slots_per_host=4)
    async with serve_policy_server(ReplayScript({"t": [WRITE, "Done."]})) as server:
        env = make_env(tokenizer_dir, server, backend, group_size=2)
        async with env.sandbox_session() as executor:
            await env.setup()
            group, backlog = await env.collect_trajectories("t")
            assert_no_leaks(pools=[executor.pool])
    assert backlog == []
    assert group is not None
    assert group["scores"] == [1.0, 1.0]
    assert group["group_overrides"] == {}
    check_sequences(group)
    assert env.events[:3] == ["setup_agent_env", "build_task", "build_agent_config"]
    for i in range(2):
        tid = f"g0-{i}"
        assert env.events.index(("workspace", tid)) < env.events.index(("verify", tid))
    # Messages are plain JSON; the last assistant turn is the final answer.
    assert all(isinstance(m, dict) for ms in group["messages"] for m in ms)
    assert group["messages"][0][-1] == {"role": "assistant", "content": "Done."}
    stats = env.statistics()
    assert (stats.groups, stats.tool_calls, stats.failed_members) == (1, 2, 0)
    assert backend.acquires == backend.releases == 2


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # atroposlib is asyncio-only
async def test_failed_member_is_masked_with_its_real_tokens(tokenizer_dir: Path) -> None:
    backend = FakeBackend(slots_per_host=4)
    async with serve_policy_server(HangFirst()) as server:
        env = make_env(tokenizer_dir, server, backend, trajectory_timeout_s=1.5)
        async with env.sandbox_session() as executor:
            group, _ = await env.collect_trajectories("t")
            assert executor.pool.statistics().in_use == 0
    assert group is not None
    assert len(group["tokens"]) == 3
    check_sequences(group)
    failed = [i for i, masks in enumerate(group["masks"]) if all(m == -100 for m in masks)]
    assert len(failed) == 1
    (i,) = failed
    assert group["scores"][i] == 0.0
    assert sorted(group["scores"]) == [0.0, 1.0, 1.0]
    # Its tokens are the real prompt + the hanging tool call, not a placeholder.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert str(tok.decode(group["tokens"][i])).endswith(HANG)
    assert env.statistics().failed_members == 1
    assert backend.acquires == backend.releases == 3


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # atroposlib is asyncio-only
async def test_failed_member_drops_the_group_when_configured(tokenizer_dir: Path) -> None:
    backend = FakeBackend(slots_per_host=4)
    async with serve_policy_server(HangFirst()) as server:
        env = make_env(
            tokenizer_dir,
            server,
            backend,
            trajectory_timeout_s=1.5,
            failure_policy="drop_group",
            max_consecutive_dropped_groups=2,
        )
        async with env.sandbox_session():
            group, backlog = await env.collect_trajectories("t")
            assert group is None and backlog == []
            env_stats = env.statistics()
            assert env_stats.dropped_groups == 1
            assert env_stats.executor is not None and env_stats.executor.pool.in_use == 0
    assert backend.acquires == backend.releases == 3


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # atroposlib is asyncio-only
async def test_openai_endpoint_says_it_has_no_logprobs(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    from structenv.testing import ReplayScript

    backend = FakeBackend(slots_per_host=4)
    async with serve_policy_server(ReplayScript({"t": [WRITE, "Done."]})) as server:
        env = make_env(tokenizer_dir, server, backend, server_type="openai", group_size=2)
        async with env.sandbox_session():
            group, _ = await env.collect_trajectories("t")
        await env.aclose()  # atroposlib's OpenAIServer never closes its HTTP client
    assert group is not None
    assert group["scores"] == [1.0, 1.0]
    # No token-level data from the server: tokens are rebuilt from the messages with the
    # chat template, and no logprobs are shipped at all (never placeholders).
    assert "inference_logprobs" not in group
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    for tokens, masks in zip(group["tokens"], group["masks"], strict=True):
        assert tokens and len(tokens) == len(masks)
        trained = tok.decode([t for t in masks if t != -100])
        assert trained == f"{WRITE}<|im_end|>\nDone.<|im_end|>\n"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])  # what is tested is the refusal on trio
async def test_the_managers_refuse_trio_before_anything_starts(tokenizer_dir: Path) -> None:
    """atroposlib is asyncio code: on Trio, process_manager() started the sandboxes and failed
    half-way through the first group with "no running event loop"; it is refused at once
    (the asyncio path is what every other test here runs)."""
    backend = FakeBackend(slots_per_host=4)

    class NoServer:
        base_url = "http://127.0.0.1:9/v1"  # never contacted

    env = make_env(tokenizer_dir, NoServer(), backend, group_size=2)  # type: ignore[arg-type]
    for manager in (env.process_manager, env.env_manager):
        with pytest.raises(RuntimeError, match=r"runs on asyncio only .* not on trio"):
            await manager()
    assert not backend.started and backend.acquires == 0


def test_a_hook_defined_the_wrong_way_fails_when_the_class_is_defined() -> None:
    """A plain ``def score_trajectory`` used to fail in the first trajectory, as ``TypeError:
    object float can't be used in 'await' expression`` raised inside structenv."""
    with pytest.raises(TypeError, match=r"^E\.score_trajectory must be 'async def'"):

        class E(AgentEnv):
            def score_trajectory(self, item: Any, result: AgentResult) -> float:  # type: ignore[override]
                return 1.0

    with pytest.raises(TypeError, match=r"^F\.build_task must be a plain 'def'"):

        class F(AgentEnv):
            async def build_task(self, item: Any) -> AgentTask:  # type: ignore[override]
                return AgentTask(prompt="x")

    class Fine(RecordingEnv):  # every hook as documented, inherited ones too
        async def score_trajectory(self, item: Any, result: AgentResult) -> float:
            return 1.0

    assert Fine.score_trajectory is not AgentEnv.score_trajectory


def test_config_validation() -> None:
    with pytest.raises(ValidationError, match=r"max_hosts \(2\) < min_hosts \(3\)"):
        AgentEnvConfig(backend_options={"min_hosts": 3, "max_hosts": 2})
    with pytest.raises(ValidationError, match="backend 'kubernetes' is not available: unknown"):
        AgentEnvConfig(backend="kubernetes")
    with pytest.raises(ValidationError, match="LocalOptions: image: Extra inputs"):
        AgentEnvConfig(backend_options={"image": "x"})  # a DockerOptions field
    with pytest.raises(ValidationError):
        AgentEnvConfig(failure_policy="retry")
    config = AgentEnvConfig(backend="docker", backend_options={"slots_per_host": "3"})
    options = config.backend_options_model()
    assert isinstance(options, DockerOptions) and options.slots_per_host == 3
    assert options.require_sandbox and not options.allow_network  # the env's, passed on
    # modal: SDK not installed; ray: in the dev extra
    assert available_backends() == ["docker", "local", "nomad", "ray"]
    with pytest.raises(ConfigError, match=r"backend 'modal' is not available.*structenv\[modal\]"):
        create_backend("modal")
    with pytest.raises(ConfigError, match="backend 'nope' is not available: unknown"):
        create_backend("nope")
    nomad = create_backend("nomad", {"slots_per_host": 3, "min_hosts": 1, "max_hosts": 4})
    assert isinstance(nomad, NomadBackend) and nomad.capacity == 12
    with pytest.raises(ConfigError, match=r"NomadOptions: max_hosts \(1\) < min_hosts \(2\)"):
        create_backend("nomad", {"min_hosts": 2, "max_hosts": 1})
    with pytest.raises(ConfigError, match="require_stateful_sandbox needs require_sandbox"):
        create_backend("local", {"require_sandbox": False}, require_stateful_sandbox=True)


def test_env_rejects_unavailable_backend_and_unknown_toolset(tokenizer_dir: Path) -> None:
    from atroposlib.envs.base import APIServerConfig

    api = [APIServerConfig(server_type="vllm", tokenizer_name=str(tokenizer_dir))]
    base = dict(tokenizer_name=str(tokenizer_dir), use_wandb=False)
    with pytest.raises(ConfigError, match="backend 'modal' is not available"):
        RecordingEnv(AgentEnvConfig(backend="modal", **base), api, FakeBackend())
    with pytest.raises(ConfigError, match="unknown toolset"):
        RecordingEnv(AgentEnvConfig(enabled_toolsets=["nope"], **base), api, FakeBackend())


def test_scored_group_rules() -> None:
    seq = TokenSequence([1, 2, 3], [-100, 2, 3], [1.0, -0.5, -0.25], "managed")
    bare = TokenSequence([1, 2], [-100, 2], None, "retokenized")
    msgs = [{"role": "user", "content": None}]
    ok = MemberOutcome(seq, 0.5, msgs)
    bad = MemberOutcome(bare, 0.9, msgs, failed=True, error="TimeoutError")
    group = build_scored_group([ok, bad], group_size=2, failure_policy="mask")
    assert group is not None
    assert group["scores"] == [0.5, 0.0]
    assert group["masks"][1] == [-100, -100]
    # A masked member carries 1.0 (the masked marker), so the group keeps real logprobs.
    assert group["inference_logprobs"] == [[1.0, -0.5, -0.25], [1.0, 1.0]]
    assert group["messages"][0] == [{"role": "user", "content": ""}]
    assert build_scored_group([ok, bad], group_size=2, failure_policy="drop_group") is None
    unlogged = build_scored_group(
        [ok, MemberOutcome(bare, 1.0, msgs)], group_size=2, failure_policy="mask"
    )
    assert unlogged is not None and "inference_logprobs" not in unlogged
    with pytest.raises(ValueError, match="expected 3"):
        build_scored_group([ok, ok], group_size=3, failure_policy="mask")
    with pytest.raises(ValueError, match="empty"):
        TokenSequence([], [], None, "managed")

"""AgentEnv: an Atropos ``BaseEnv`` whose trajectories call tools in sandboxes, structurally.

Part of :mod:`structenv.adapters.atropos`, the only package importing atroposlib; it needs
``structenv[atropos]`` and runs on asyncio only (atroposlib uses aiohttp and
``asyncio.create_task``).

Subclass :class:`AgentEnv`, implement ``get_next_item`` and :meth:`AgentEnv.build_task`, and
score with :meth:`AgentEnv.score_trajectory` or, for checks that must run in the sandbox,
:meth:`AgentEnv.verify_and_score_trajectory`. Per trajectory, in this order and inside one
leased slot::

    setup_trajectory_workspace(item, trajectory_id=..., exec_tool=...)
    run_agent(...)                          # ReACT loop; tool calls through the executor
    verify_and_score_trajectory(item, result, trajectory_id=..., exec_tool=...)
    # the slot is released (reset or destroyed) only after this returns

What the environment guarantees:

* The backend and the :class:`~structenv.ToolExecutor` start before ``setup()`` and stop after
  ``env_manager`` / ``process_manager`` return or are cancelled, with shielded, bounded
  teardown.
* ``collect_trajectories`` runs the group in one task group. A member that fails (trajectory
  deadline, slot or sandbox failure, inference endpoint failure) becomes a fully masked item
  with ``failure_score`` and its real tokens, or drops the group (``failure_policy``). A group
  whose members *all* failed on inference is never a training group: it is dropped
  (``drop_reason="inference"``); nor is one whose members all failed before the agent's run
  ended (a bad per-item spec, its workspace setup, the sandbox, the trajectory deadline:
  ``drop_reason="failed"``), and ``max_consecutive_dropped_groups`` dropped groups in a row
  stop the manager. Exactly ``group_size`` sequences or ``None``; never an empty
  sequence; ``inference_logprobs`` only when real; ``messages`` plain JSON dicts; each group
  carries ``structenv: {"task_id", "failures"}`` (every member's failure reason or ``None``).
* Inference failures are loud (:mod:`._errors`): only transient failures are retried, the
  first failure is logged at WARNING with its URL, status and attempt, every failed member
  names them, and ``max_consecutive_inference_failures`` trajectories failing in a row stop
  the manager with :class:`InferenceFailedError` (serve mode included).
* A trajectory that runs out of context ends with ``context_exhausted`` and is scored
  (``on_context_exhausted="score"``, the default) or masked (``"mask"``).
* A group that cannot get a slot for every member at once is refused at start-up
  (:class:`~structenv.ConfigError` with the numbers), never failed member by member.
* When BaseEnv cancels a worker (``worker_timeout``, evals, back-pressure), every slot of
  that group is released before the cancellation finishes propagating.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import itertools
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import sniffio
from atroposlib.envs.base import APIServerConfig, BaseEnv

from ..._config import ExecutorConfig
from ..._exceptions import ConfigError, StructEnvError
from ..._executor import ExecutorStatistics, ToolExecutor
from ..._runner import run_group
from ...abc import SandboxBackend
from ...agent import (
    AgentConfig,
    AgentResult,
    AgentTask,
    OpenAIPolicy,
    hermes_system_prompt,
    run_agent,
)
from ...backends._registry import backend_entry, create_backend
from ...tools import ToolRegistry, ToolServerClient, default_registry
from .._sequence import MemberOutcome, TokenSequence, build_scored_group, retokenize_messages
from .._workspace import ExecTool
from ._cli import accept_list_flags, run_cli, with_cli_signals
from ._config import AgentEnvConfig, AgentEnvStatistics, GroupReport
from ._errors import InferenceFailedError, install_retry_policy
from ._html import structenv_html
from ._inference import OpenAITrajectoryPolicy, TrajectoryPolicy, open_token_policies
from ._policy import open_atropos_policy

if TYPE_CHECKING:
    from ...testing import ReplayStep

__all__ = ["AgentEnv"]

log = logging.getLogger("structenv.adapters.atropos")

#: Agent finish reasons that are failures of the harness or endpoint, not of the model.
_FAILED_FINISHES = frozenset({"policy_error", "timeout"})


@dataclasses.dataclass(slots=True, eq=False)
class _Member:
    trajectory_id: str
    policy: TrajectoryPolicy | None = None
    result: AgentResult | None = None
    score: float = 0.0
    failure: str | None = None
    duration: float = 0.0

    @property
    def inference_failed(self) -> bool:
        """The member failed because the inference endpoint did (not a deadline or bug)."""
        return self.result is not None and self.result.finish_reason == "policy_error"


def _free_path(path: str) -> str:
    """``path``, or ``stem_1``, ``stem_2``, ... if it exists (atroposlib's naming)."""
    original = Path(path)
    candidate, counter = original, 1
    while candidate.exists():
        candidate = original.with_stem(f"{original.stem}_{counter}")
        counter += 1
    return str(candidate)


class _LazyJsonl:
    """atroposlib's jsonl writer, opened on the first group written.

    BaseEnv opens the file in its constructor, so a run that fails before its first group
    left an empty file behind that shifted the next run's file name to ``_1``.
    """

    def __init__(self, env: AgentEnv) -> None:
        self._env = env
        self._writer: Any | None = None
        self.written = 0  # groups written (each a complete, flushed line) to this run's file

    def _open(self) -> Any:
        if self._writer is None:
            import jsonlines

            config = self._env.config
            config.data_path_to_save_groups = _free_path(config.data_path_to_save_groups)
            self._writer = jsonlines.open(config.data_path_to_save_groups, "w", flush=True)
        return self._writer

    def write(self, obj: Any) -> None:
        self._open().write(obj)
        self.written += 1

    def close(self) -> None:
        """BaseEnv's ``process_manager`` closes the writer when it completed, then renders
        the file: a completed run with no group kept (all dropped) gets its empty file."""
        self._open().close()

    def release(self) -> None:
        """Close the file if one was opened (a run that failed leaves no empty file)."""
        if self._writer is not None:
            self._writer.close()


def _require_asyncio(method: str) -> None:
    """Refuse to run a BaseEnv manager on another loop, before any sandbox starts (on Trio,
    atroposlib failed half-way through the first group with "no running event loop").

    Raises:
        RuntimeError: The current async library is not asyncio.
    """
    library = sniffio.current_async_library()
    if library != "asyncio":
        raise RuntimeError(
            f"AgentEnv.{method}() runs on asyncio only (atroposlib's BaseEnv is asyncio code), "
            f"not on {library}: run it with asyncio.run() or anyio's asyncio backend; the "
            "layers below it (ToolExecutor, SlotPool, the backends) run on both"
        )


#: The hooks a subclass defines: True for those the env awaits (``async def``).
_HOOKS = {
    "get_next_item": True,
    "setup_agent_env": True,
    "setup_trajectory_workspace": True,
    "score_trajectory": True,
    "verify_and_score_trajectory": True,
    "build_task": False,
    "build_agent_config": False,
}


class AgentEnv(BaseEnv):  # type: ignore[misc]  # atroposlib is untyped
    """An Atropos environment whose trajectories run agents with sandboxed tools.

    Subclasses implement ``get_next_item`` (BaseEnv) and :meth:`build_task`, and override
    :meth:`score_trajectory` or :meth:`verify_and_score_trajectory`.

    Use it as any BaseEnv (``cls.cli()`` for ``serve`` / ``process``), or programmatically::

        env = MyEnv(config, server_configs)
        await env.process_manager()          # on asyncio

    Args:
        config: The environment configuration.
        server_configs: A **list** of ``APIServerConfig`` (a single config silently routes to
            default local ports in atroposlib). Use ``server_type="vllm"`` (or ``"sglang"``)
            for real token and logprob tracking.
        slurm: BaseEnv's slurm flag.
        testing: BaseEnv's testing flag (its mock server is broken in atroposlib 0.4.0).

    Raises:
        ConfigError: Unknown or unavailable backend, unknown toolset.
    """

    name: str | None = "structenv_agent"
    env_config_cls = AgentEnvConfig
    config: AgentEnvConfig

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Check, when the class is defined, that each hook is ``async def`` or plain ``def``
        as the env calls it: a plain ``def score_trajectory`` failed only in the first
        trajectory, with ``TypeError: object float can't be used in 'await' expression``.

        Raises:
            TypeError: A hook is defined the other way.
        """
        super().__init_subclass__(**kwargs)
        for name, awaited in _HOOKS.items():
            hook = cls.__dict__.get(name)
            if not inspect.isfunction(hook) or inspect.iscoroutinefunction(hook) == awaited:
                continue
            how = "'async def' (the env awaits it)" if awaited else "a plain 'def' (not awaited)"
            raise TypeError(f"{cls.__name__}.{name} must be {how}")

    def __init__(
        self,
        config: AgentEnvConfig,
        server_configs: list[APIServerConfig],
        slurm: bool = False,
        testing: bool = False,
    ) -> None:
        # Validate before BaseEnv loads tokenizers or builds server clients.
        backend_entry(config.backend)
        if config.wandb_name is None and self.name:
            # run-api refuses a registration without a name, and atroposlib's CLI default
            # (the class's name) never reaches the config it builds: `serve` would fail.
            config = config.model_copy(update={"wandb_name": self.name})
        self.registry: ToolRegistry = self.build_tools(config)
        super().__init__(config, server_configs, slurm=slurm, testing=testing)
        opened: Any = self.jsonl_writer
        if opened is not None:  # opened by BaseEnv: reopen it lazily instead
            opened.close()
            path = self.config.data_path_to_save_groups
            if os.path.isfile(path) and os.path.getsize(path) == 0:
                os.unlink(path)
            self.jsonl_writer: Any = _LazyJsonl(self)
        # Programmatic process mode (``await env.process_manager()``) as the docs show it:
        # atroposlib's CLI sets these after construction; default them from the config.
        self.process_mode = False
        self.n_groups_to_process = int(config.total_steps)
        self.group_size_to_process = int(config.group_size)
        install_retry_policy(
            self.server,
            max_attempts=config.inference_max_attempts,
            backoff_max=config.inference_backoff_max_s,
        )
        self._executor: ToolExecutor | None = None
        self._last_stats: ExecutorStatistics | None = None
        self._group_listeners: list[Callable[[GroupReport], None]] = []
        self._groups = itertools.count()
        self._counts = dict(
            groups=0, dropped=0, cancelled=0, failed=0, tool_calls=0, inference=0, context=0
        )
        self._dropped_in_a_row = 0
        self._inference_failures_in_a_row = 0
        self._fatal: BaseException | None = None
        self._manager_scope: anyio.CancelScope | None = None
        self._live: set[asyncio.Task[Any]] = set()
        self._live_changed: anyio.Event | None = None
        self._token_policies: list[OpenAIPolicy] = []
        self._next_policy = itertools.count()

    @classmethod
    def config_init(cls) -> tuple[AgentEnvConfig, list[APIServerConfig]]:
        """Defaults for the CLI: groups of 4, a vLLM-style server on localhost:8000.

        Override to point at your inference server; ``--openai.*`` flags override it too.
        """
        config = cls.env_config_cls(
            group_size=4, max_token_length=8192, agent_max_steps=12, use_wandb=False
        )
        server = APIServerConfig(
            server_type="vllm", base_url="http://127.0.0.1:8000/v1", health_check=False
        )
        return config, [server]

    @classmethod
    def cli(cls) -> None:
        """atroposlib's ``serve | process | evaluate`` CLI, where every config field is a flag
        (list fields too: ``--env.enabled_toolsets default,filesystem``), SIGINT/SIGTERM run one
        orderly shutdown (exit ``128 + signal``; a second signal stops at once) and an error
        is one line (``--debug`` for the traceback). See ``docs/writing-an-env.md``."""
        run_cli(cls, super().cli)

    @classmethod
    def get_cli_serve_config_cls(cls) -> type:
        return accept_list_flags(super().get_cli_serve_config_cls())

    @classmethod
    def get_cli_process_config_cls(cls) -> type:
        return accept_list_flags(super().get_cli_process_config_cls())

    @classmethod
    def get_cli_evaluate_config_cls(cls) -> type:
        return accept_list_flags(super().get_cli_evaluate_config_cls())

    @classmethod
    def cli_main(cls, argv: list[str] | None = None) -> int:
        """atroposlib's ``serve | process | evaluate`` CLI; ``argv`` replaces ``sys.argv[1:]``
        (atroposlib reads ``sys.argv`` itself)."""
        if argv is not None:
            sys.argv = [sys.argv[0], *argv]
        cls.cli()
        return 0

    # -- construction hooks ----------------------------------------------------------------

    def build_tools(self, config: AgentEnvConfig) -> ToolRegistry:
        """The tools the model may call (default: the built-in toolsets selected by config).

        Raises:
            ConfigError: An unknown toolset name.
        """
        return default_registry().select(
            enabled_toolsets=config.enabled_toolsets,
            disabled_toolsets=config.disabled_toolsets,
        )

    def create_backend(self) -> SandboxBackend:
        """The (unstarted) sandbox backend, built from the config by the backend registry."""
        c = self.config
        return create_backend(
            c.backend,
            c.backend_options_model(),
            require_stateful_sandbox=c.require_stateful_sandbox,
        )

    def executor_config(self) -> ExecutorConfig:
        """The executor's knobs, derived from the env config."""
        c = self.config
        return ExecutorConfig(
            batch_window_ms=c.tool_batch_window_ms,
            max_batch_size=c.tool_max_batch_size,
            acquire_timeout=c.acquire_timeout_s,
            trajectory_timeout=c.trajectory_timeout_s,
            tool_timeout=c.tool_timeout_s,
            max_tool_timeout=max(600.0, c.tool_timeout_s),
            allow_network=c.allow_network,
            require_sandbox=c.require_sandbox,
            shutdown_grace=c.shutdown_grace_s,
        )

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def executor(self) -> ToolExecutor:
        """The running executor (between startup and shutdown of a manager)."""
        if self._executor is None:
            raise RuntimeError(
                "the sandbox session is not running: use env_manager(), process_manager() "
                "or `async with env.sandbox_session():`"
            )
        return self._executor

    @asynccontextmanager
    async def sandbox_session(self) -> AsyncIterator[ToolExecutor]:
        """Start the backend, the tool server client and the executor for the block.

        ``env_manager`` and ``process_manager`` run inside one; use it directly to call
        ``collect_trajectories`` yourself.

        Cancellation: everything started is stopped under a shielded, bounded scope
        (``shutdown_grace_s``) before the cancellation propagates; no slot or host outlives
        the block.
        """
        if self._executor is not None:
            raise RuntimeError("the sandbox session is already running")
        # Plain nesting, no extra cancel scopes around the exits: the backend and the
        # executor enter task groups in __aenter__, and their own __aexit__ already tear
        # down under shielded, bounded scopes (wrapping them in new scopes would break the
        # nesting of those task groups).
        try:
            async with self.create_backend() as backend, AsyncExitStack() as stack:
                if not self.config.sandbox.is_default:
                    # A bad default spec (no such image, a refused bind) fails here, once,
                    # before any item runs.
                    await backend.prepare_spec(self.config.sandbox)
                tool_server = None
                registry = self.registry
                if self.config.tool_server_url:
                    tool_server = await stack.enter_async_context(
                        ToolServerClient(
                            self.config.tool_server_url, token=self.config.tool_server_token
                        )
                    )
                    registry = self.build_tools(self.config)
                    for tool in await tool_server.list_tools():
                        registry.register(tool)
                async with ToolExecutor(
                    backend,
                    config=self.executor_config(),
                    registry=registry,
                    tool_server=tool_server,
                ) as executor:
                    self._executor = executor
                    try:
                        yield executor
                    finally:
                        self._last_stats = executor.statistics()
                        self._executor = None
        finally:
            self._executor = None

    async def env_manager(self) -> None:
        """BaseEnv's ``serve`` loop inside a sandbox session.

        Under :meth:`cli`, the first SIGINT/SIGTERM cancels it (see :meth:`cli`).

        Cancellation: the loop's workers are cancelled by the loop; the session is torn down
        (shielded, bounded) before the cancellation propagates.

        Raises:
            RuntimeError: Not on asyncio (atroposlib is asyncio code), before anything starts.
        """
        _require_asyncio("env_manager")
        await with_cli_signals(self._env_manager)

    async def _env_manager(self) -> None:
        await self._run_manager(super().env_manager)

    async def process_manager(self) -> None:
        """BaseEnv's ``process`` mode inside a sandbox session.

        Cancellation: as :meth:`env_manager`.

        Raises:
            RuntimeError: Not on asyncio (atroposlib is asyncio code), before anything starts.
        """
        _require_asyncio("process_manager")
        await with_cli_signals(self._process_manager)

    async def _process_manager(self) -> None:
        base = super().process_manager

        async def process() -> None:
            with structenv_html():  # our escaped viewer, not atroposlib's generate_html
                await base()

        await self._run_manager(process)

    async def _run_manager(self, manager: Callable[[], Any]) -> None:
        """Run a BaseEnv manager in a sandbox session; a fatal error (too many inference
        failures) raised in any worker cancels it and is raised here, after the teardown."""
        self.check_slot_capacity()
        self._fatal = None
        try:
            async with self.sandbox_session():
                try:
                    with anyio.CancelScope() as scope:
                        self._manager_scope = scope
                        await manager()
                finally:
                    self._manager_scope = None
                    await self._stop_groups()
                    await self.aclose()
                    if isinstance(self.jsonl_writer, _LazyJsonl):
                        self.jsonl_writer.release()
        except BaseExceptionGroup as group:
            if self._fatal is not None:  # the reason the run stopped, not the task groups'
                raise self._fatal from group
            raise
        if self._fatal is not None:
            raise self._fatal

    def check_slot_capacity(self) -> None:
        """Refuse a group that cannot hold a slot for every member at once.

        The members of a group run together; with fewer slots than members the rest wait
        for ``acquire_timeout_s`` and fail (a silent score that also skews the group's
        baseline). Called before a manager starts.

        Raises:
            ConfigError: ``group_size`` exceeds ``slots_per_host * max_hosts``.
        """
        c = self.config
        size = max(int(c.group_size), int(getattr(self, "group_size_to_process", 0) or 0))
        o = c.backend_options_model()
        capacity = o.slots_per_host * o.host_bound
        if size > capacity:
            raise ConfigError(
                f"group_size {size} needs {size} sandbox slots at once but the backend has "
                f"{capacity} (slots_per_host {o.slots_per_host} x max_hosts {o.host_bound}): "
                f"raise --env.backend_options.slots_per_host or --env.backend_options.max_hosts, "
                f"or lower --env.group_size"
            )

    async def aclose(self) -> None:
        """Release what atroposlib's inference servers leave open: their OpenAI HTTP clients
        and health-check tasks. Called when a manager ends; call it yourself after using
        :meth:`sandbox_session` directly. Idempotent.

        Cancellation: shielded and bounded (5 s).
        """
        policies, self._token_policies = self._token_policies, []
        for policy in policies:
            await policy.aclose()
        with anyio.move_on_after(5, shield=True):
            for server in getattr(self.server, "servers", None) or []:
                check = getattr(server, "check_task", None)
                if isinstance(check, asyncio.Task) and not check.done():
                    check.cancel()
                client = getattr(server, "openai", None)
                if client is not None and hasattr(client, "close"):
                    await client.close()

    async def _stop_groups(self) -> None:
        """Cancel and wait for every group still running in a BaseEnv worker task.

        BaseEnv's workers are bare asyncio tasks that outlive ``env_manager`` when it returns
        or is cancelled (and a worker cancelled on ``worker_timeout`` is forgotten by BaseEnv
        while it still releases its slots). Before the executor and backend stop, every
        group still running is cancelled and awaited, shielded and bounded.
        """
        tasks = [t for t in self._live if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            with anyio.move_on_after(self.config.shutdown_grace_s, shield=True):
                await asyncio.wait(tasks)

    async def setup(self) -> None:
        """Called by BaseEnv once the sandbox session runs: chooses how to get exact tokens
        from the inference server (``vllm_api``), then calls :meth:`setup_agent_env`.

        Raises:
            ConfigError: The env's tokenizer does not match the server's model.

        Cancellation: propagates; the session is torn down by the manager.
        """
        await self.setup_inference()
        await self.setup_agent_env()

    async def setup_inference(self) -> None:
        """Probe ``server_type="vllm"`` servers once (``vllm_api``): a stock vLLM OpenAI
        server gets exact tokens through ``/v1/completions`` with a locally rendered prompt,
        after its model's tokenizer is checked against the env's. Idempotent.

        Raises:
            ConfigError: The env's tokenizer does not match the server's model.
            PolicyError: A server cannot be reached for the probe.

        Cancellation: nothing is left open.
        """
        if self._token_policies:
            return
        servers = [getattr(s, "config", None) for s in getattr(self.server, "servers", [])]
        self._token_policies = await open_token_policies(
            [s for s in servers if s is not None],
            api=self.config.vllm_api,
            tokenizer=self.tokenizer,
            temperature=self.config.agent_temperature,
            max_tokens=self.config.agent_max_tokens,
        )

    async def evaluate(self, *args: Any, **kwargs: Any) -> None:
        """No evaluation by default; override to add one.

        Cancellation: nothing to undo.
        """

    # -- user hooks ------------------------------------------------------------------------

    async def setup_agent_env(self) -> None:
        """Env-specific setup (load data, probe the sandbox); runs after the backend started.

        Cancellation: propagates; the session is torn down by the manager.
        """

    @classmethod
    def offline_solutions(cls, config: AgentEnvConfig) -> Mapping[str, Sequence[str | ReplayStep]]:
        """Reference solutions for ``structenv run MODULE:Env --offline``.

        Task id -> the assistant turns that solve it (Hermes ``<tool_call>`` blocks, then a
        final answer; a :class:`~structenv.testing.ReplayStep` may carry a plausible wrong
        turn). The scripted policy server finds the task by the :func:`~structenv.testing.
        task_marker` that :meth:`build_task` puts in the prompt, and replays its solution
        with seeded mistakes so a group's scores vary.

        Raises:
            ConfigError: (default) the env has no offline solutions.
        """
        del config
        raise ConfigError(
            f"{cls.__name__} defines no offline_solutions(): override it (task id -> turns, "
            "and put task_marker(task_id) in build_task's prompt) to run it --offline; "
            "see docs/writing-an-env.md"
        )

    def build_task(self, item: Any) -> AgentTask:
        """The task the agent gets for ``item``."""
        raise NotImplementedError("AgentEnv subclasses implement build_task(item)")

    def build_agent_config(self, item: Any) -> AgentConfig:
        """Limits of the agent loop for ``item`` (default: from the env config)."""
        del item
        c = self.config
        return AgentConfig(
            max_steps=c.agent_max_steps,
            step_deadline=c.agent_step_timeout_s,
            max_consecutive_parse_errors=c.agent_max_parse_errors,
            context_tokens=c.agent_context_tokens,
        )

    async def setup_trajectory_workspace(
        self, item: Any, *, trajectory_id: str, exec_tool: ExecTool
    ) -> None:
        """Prepare the slot's workspace before the agent starts (default: nothing).

        Cancellation: the slot is released and not reused.
        """

    async def score_trajectory(self, item: Any, result: AgentResult) -> float:
        """Score a finished trajectory without touching the sandbox.

        Cancellation: nothing to undo.
        """
        raise NotImplementedError(
            "AgentEnv subclasses override score_trajectory or verify_and_score_trajectory"
        )

    async def verify_and_score_trajectory(
        self, item: Any, result: AgentResult, *, trajectory_id: str, exec_tool: ExecTool
    ) -> float:
        """Score a finished trajectory; runs in the same slot before it is released.

        The default calls :meth:`score_trajectory`. Override to run checks in the sandbox
        (tests, diffs of produced files).

        Cancellation: the slot is released and not reused.
        """
        del trajectory_id, exec_tool
        return await self.score_trajectory(item, result)

    @asynccontextmanager
    async def open_policy(self, item: Any) -> AsyncIterator[TrajectoryPolicy]:
        """The policy of one trajectory: token-id requests to a stock vLLM server (see
        :meth:`setup_inference`), else the atroposlib adapter over ``self.server``.

        Cancellation: the policy's tracking state is dropped.
        """
        del item
        if self._token_policies:
            policies = self._token_policies
            yield OpenAITrajectoryPolicy(policies[next(self._next_policy) % len(policies)])
            return
        async with open_atropos_policy(
            self.server,
            tokenizer=self.tokenizer,
            temperature=self.config.agent_temperature,
            max_tokens=self.config.agent_max_tokens,
        ) as policy:
            yield policy

    # -- observation -----------------------------------------------------------------------

    def add_group_listener(self, listener: Callable[[GroupReport], None]) -> None:
        """Call ``listener`` (synchronously) after every collected group."""
        self._group_listeners.append(listener)

    async def wait_idle(self) -> None:
        """Wait until no group is running (cancelled ones included: their slots are back).

        The caller bounds it with a deadline.

        Cancellation: nothing to undo.
        """
        while self._live:
            if self._live_changed is None:
                self._live_changed = anyio.Event()
            await self._live_changed.wait()

    def statistics(self) -> AgentEnvStatistics:
        """A snapshot of the env's counters."""
        c = self._counts
        return AgentEnvStatistics(
            groups=c["groups"],
            dropped_groups=c["dropped"],
            cancelled_groups=c["cancelled"],
            running_groups=len(self._live),
            failed_members=c["failed"],
            tool_calls=c["tool_calls"],
            executor=self._executor.statistics() if self._executor else self._last_stats,
            inference_failures=c["inference"],
            context_exhausted=c["context"],
        )

    async def handle_send_to_api(self, scored_data: Any, *args: Any, **kwargs: Any) -> Any:
        """BaseEnv's, counting the groups it drops for equal scores in ``dropped_groups``."""
        if self.config.ensure_scores_are_not_same:
            groups = scored_data if isinstance(scored_data, list) else [scored_data]
            for group in groups:
                if group is not None and len(set(group.get("scores") or [None])) == 1:
                    self._counts["dropped"] += 1
        return await super().handle_send_to_api(scored_data, *args, **kwargs)

    # -- the group -------------------------------------------------------------------------

    async def collect_trajectories(self, item: Any) -> tuple[dict[str, Any] | None, list[Any]]:
        """Run ``group_size`` trajectories of ``item`` in one task group and score them.

        Returns:
            ``(group, [])``: a ScoredDataGroup dict with exactly ``group_size`` sequences, or
            ``None`` when the group is dropped.

        Raises:
            ExceptionGroup: A harness failure (a bug in a hook, an unexpected error); the
                members are cancelled and their slots released first. Each member's error is
                logged, since BaseEnv's ``serve`` mode swallows it with a one-line log.
            StructEnvError: ``max_consecutive_dropped_groups`` groups were dropped in a row.
            InferenceFailedError: ``max_consecutive_inference_failures`` trajectories in a row
                failed on inference (the manager is stopped too: BaseEnv's serve workers
                swallow exceptions).

        Cancellation: every member is cancelled and every slot released (shielded) before
        the cancellation propagates; nothing is returned.
        """
        executor = self.executor
        number = next(self._groups)
        size = int(self.config.group_size)
        task = self.build_task(item)
        agent_config = self.build_agent_config(item)
        members = [_Member(f"g{number}-{i}") for i in range(size)]
        start = time.monotonic()

        async def member(i: int) -> None:
            began = time.monotonic()
            try:
                await self._run_member(executor, item, task, agent_config, members[i])
            finally:
                members[i].duration = time.monotonic() - began

        current = asyncio.current_task()
        if current is not None:
            self._live.add(current)
        try:
            outcomes = await run_group(member, size)
        except anyio.get_cancelled_exc_class():
            self._counts["cancelled"] += 1
            raise
        except BaseExceptionGroup as group:
            if current is not None and current.cancelling():
                # The worker was cancelled (serve's shutdown, a timeout) while its members
                # failed because of it (the executor's batches ending as it stops): that is
                # a cancelled group, not a harness failure to print a traceback for.
                self._counts["cancelled"] += 1
                log.debug("group %d: cancelled while failing: %r", number, group)
                raise asyncio.CancelledError(f"group {number} cancelled") from group
            for exc in group.exceptions:
                log.error("group %d: harness failure", number, exc_info=exc)
            raise
        finally:
            self._live.discard(current)
            if self._live_changed is not None:
                self._live_changed.set()
                self._live_changed = None
        for m, outcome in zip(members, outcomes, strict=True):
            if outcome.error is not None and m.failure is None:
                m.failure = f"{type(outcome.error).__name__}: {outcome.error}"
        scored, drop_reason = self._assemble(task, members)
        if scored is not None:  # for the jsonl and the viewer; the API ignores unknown keys
            scored["structenv"] = {"task_id": task.id, "failures": [m.failure for m in members]}
        self._report(number, members, scored, time.monotonic() - start, drop_reason)
        return scored, []

    async def _run_member(
        self,
        executor: ToolExecutor,
        item: Any,
        task: AgentTask,
        agent_config: AgentConfig,
        member: _Member,
    ) -> None:
        tid = member.trajectory_id
        spec = task.sandbox if task.sandbox is not None else self.config.sandbox
        async with executor.trajectory(tid, spec=spec) as traj:
            exec_tool = ExecTool(traj)
            await self.setup_trajectory_workspace(item, trajectory_id=tid, exec_tool=exec_tool)
            async with self.open_policy(item) as policy:
                member.policy = policy
                result = await run_agent(policy, traj, task, config=agent_config)
            member.result = result
            if result.finish_reason in _FAILED_FINISHES or (
                result.finish_reason == "context_exhausted"
                and self.config.on_context_exhausted == "mask"
            ):
                member.failure = f"{result.finish_reason}: {result.error}"
                return
            member.score = float(
                await self.verify_and_score_trajectory(
                    item, result, trajectory_id=tid, exec_tool=exec_tool
                )
            )

    def _initial_messages(self, task: AgentTask) -> list[dict[str, Any]]:
        system = hermes_system_prompt(task.system, self.registry.specs())
        messages = [{"role": "system", "content": system}] if system else []
        return [*messages, {"role": "user", "content": task.prompt}]

    def _assemble(
        self, task: AgentTask, members: list[_Member]
    ) -> tuple[dict[str, Any] | None, str | None]:
        """The scored group and, when it is dropped, why."""
        if all(m.inference_failed for m in members):
            return None, "inference"  # nothing the model did: not a training group
        if all(m.failure is not None and m.result is None for m in members):
            # Every member failed without an ending of the agent's (the item's spec, its
            # workspace setup, the sandbox, the deadline): all masked, no training signal,
            # usually one cause for all. A loud drop, not a group of masked zeros.
            return None, "failed"
        outcomes: list[MemberOutcome] = []
        for m in members:
            messages = m.result.messages if m.result is not None else self._initial_messages(task)
            sequence: TokenSequence | None = m.policy.sequence() if m.policy else None
            if sequence is None:
                try:
                    sequence = retokenize_messages(self.tokenizer, messages)
                except ValueError as exc:
                    log.error("%s: cannot tokenize the conversation (%s)", m.trajectory_id, exc)
                    return None, "tokenize"
            if m.failure is not None:
                log.info("%s failed: %s", m.trajectory_id, m.failure)
            outcomes.append(
                MemberOutcome(
                    sequence=sequence,
                    score=m.score,
                    messages=messages,
                    failed=m.failure is not None,
                    error=m.failure,
                )
            )
        scored = build_scored_group(
            outcomes,
            group_size=len(members),
            failure_policy=self.config.failure_policy,
            failure_score=self.config.failure_score,
            include_messages=True,
        )
        return scored, None if scored is not None else "failure_policy"

    def _report(
        self,
        number: int,
        members: list[_Member],
        scored: dict[str, Any] | None,
        took: float,
        drop_reason: str | None,
    ) -> None:
        failed = sum(m.failure is not None for m in members)
        tool_calls = sum(m.result.tool_calls for m in members if m.result is not None)
        c = self._counts
        c["groups"] += 1
        c["failed"] += failed
        c["tool_calls"] += tool_calls
        c["context"] += sum(
            m.result is not None and m.result.finish_reason == "context_exhausted" for m in members
        )
        last_inference_failure = None
        for m in members:  # in member order: the group's members finish together
            if m.inference_failed:
                c["inference"] += 1
                self._inference_failures_in_a_row += 1
                last_inference_failure = m.failure
            elif m.result is not None:
                self._inference_failures_in_a_row = 0
        if scored is None:
            c["dropped"] += 1
            self._dropped_in_a_row += 1
        else:
            self._dropped_in_a_row = 0
        report = GroupReport(
            group=number,
            scores=list(scored["scores"]) if scored else [],
            failed=failed,
            dropped=scored is None,
            tool_calls=tool_calls,
            duration=took,
            drop_reason=drop_reason,
            failures=[m.failure for m in members],
            finish_reasons=[m.result.finish_reason if m.result else None for m in members],
            durations=[m.duration for m in members],
        )
        if drop_reason == "inference":
            log.warning("group %d dropped: every member failed on inference (%s)", number,
                        last_inference_failure)  # fmt: skip
        elif drop_reason == "failed":
            log.warning("group %d dropped: every member failed (%s)", number, members[0].failure)
        for listener in self._group_listeners:
            listener(report)
        limit = self.config.max_consecutive_inference_failures
        if self._inference_failures_in_a_row >= limit:
            self._fail(InferenceFailedError(self._inference_failures_in_a_row,
                                            str(last_inference_failure)))  # fmt: skip
        if self._dropped_in_a_row >= self.config.max_consecutive_dropped_groups:
            self._fail(StructEnvError(
                f"{self._dropped_in_a_row} groups in a row were dropped; giving up "
                "(raise max_consecutive_dropped_groups or fix the failures above)"
            ))  # fmt: skip

    def _fail(self, error: StructEnvError) -> None:
        """Stop the run: remember ``error`` for the manager, cancel it, and raise."""
        if self._fatal is None:
            self._fatal = error
        if self._manager_scope is not None:
            self._manager_scope.cancel()
        raise error

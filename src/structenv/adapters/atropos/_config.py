"""AgentEnvConfig and the report types of :class:`~structenv.adapters.atropos.AgentEnv`.

Imports atroposlib (``BaseEnvConfig``); part of the :mod:`structenv.adapters.atropos` package.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Literal

from atroposlib.envs.base import BaseEnvConfig
from pydantic import Field, ValidationInfo, field_validator, model_validator

from ..._executor import ExecutorStatistics
from ..._spec import SandboxSpec
from ...backends._options import HostedOptions
from ...backends._registry import backend_options
from ._cli import list_fields, parse_list_flag, parse_object_flag

__all__ = ["AgentEnvConfig", "AgentEnvStatistics", "GroupReport"]

#: Former top-level fields, now backend options.
_MOVED = frozenset({"slots_per_host", "min_hosts", "max_hosts"})


def _with_suggestion(name: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


class AgentEnvConfig(BaseEnvConfig):  # type: ignore[misc]  # atroposlib is untyped
    """Configuration of an :class:`AgentEnv`: BaseEnv's fields plus sandbox and agent knobs.

    Every field is also a ``--env.<name>`` flag of the env's ``serve`` / ``process`` CLI and
    an ``env:`` key of its ``--config`` YAML file. A list field given as text (a flag, or a
    YAML string) is comma-separated (``default,filesystem``), a JSON list, or ``None``.
    """

    backend: str = Field(
        default="local",
        description="Sandbox backend: local, docker, nomad, modal or ray (a registered name). "
        "Only backends available in this installation start; the others fail with "
        "'backend X is not available'.",
    )
    backend_options: dict[str, Any] = Field(
        default_factory=dict,
        description="The backend's options (its options model's fields: slots_per_host, "
        "min_hosts, max_hosts, ...). In YAML a mapping; as flags "
        "--env.backend_options.<name> VALUE (repeatable), or one JSON object.",
    )
    allow_network: bool = Field(
        default=False, description="Sandboxed commands may use the network."
    )
    require_sandbox: bool = Field(
        default=True, description="Fail closed if the backend cannot isolate its slots."
    )
    require_stateful_sandbox: bool = Field(
        default=False,
        description="Fail closed if the isolated stateful terminal (tmux) is unavailable.",
    )
    tool_batch_window_ms: float = Field(
        default=0.0, ge=0, description="Batcher window (0: dispatch whatever is queued at once)."
    )
    tool_max_batch_size: int = Field(default=256, ge=1, description="Calls per batch at most.")
    acquire_timeout_s: float = Field(default=60.0, gt=0, description="Seconds to wait for a slot.")
    trajectory_timeout_s: float | None = Field(
        default=900.0,
        gt=0,
        description="Deadline of one trajectory (slot acquisition, workspace setup, agent and "
        "verification); past it the member fails.",
    )
    tool_timeout_s: float = Field(
        default=60.0, gt=0, description="Default deadline of a tool call."
    )
    agent_max_steps: int = Field(default=30, ge=1, description="Policy calls per trajectory.")
    agent_temperature: float = Field(default=1.0, ge=0, description="Sampling temperature.")
    agent_max_tokens: int | None = Field(
        default=None, gt=0, description="Tokens per assistant turn (None: the server's default)."
    )
    agent_step_timeout_s: float | None = Field(
        default=300.0, gt=0, description="Deadline of one policy call."
    )
    agent_max_parse_errors: int = Field(
        default=3, ge=0, description="Consecutive malformed tool-call turns answered with an error."
    )
    enabled_toolsets: list[str] = Field(
        default_factory=lambda: ["default"],
        description="Toolsets the model may use (as a flag: comma-separated or repeated).",
    )
    disabled_toolsets: list[str] = Field(
        default_factory=list,
        description="Toolsets removed after enabled_toolsets (as a flag: comma-separated).",
    )
    tool_server_url: str | None = Field(
        default=None, description="External ToolServer for tools that do not run in the sandbox."
    )
    tool_server_token: str | None = Field(
        default=None, description="Bearer token of the ToolServer."
    )
    vllm_api: Literal["auto", "generate", "completions", "chat"] = Field(
        default="auto",
        description="How a server_type='vllm' server is asked for exact tokens and logprobs: "
        "'generate' (atroposlib's /generate: its vLLM script, SGLang), 'completions' (stock "
        "vLLM: a locally rendered token-id prompt to /v1/completions), 'chat' (stock vLLM: "
        "/v1/chat/completions with return_token_ids) or 'auto' (a 404 on GET /generate "
        "means stock vLLM: 'completions'; else 'generate').",
    )
    failure_policy: Literal["mask", "drop_group"] = Field(
        default="mask",
        description="A failed member becomes a masked item with failure_score ('mask') or "
        "drops its group ('drop_group').",
    )
    failure_score: float = Field(default=0.0, description="Score of a failed member.")
    max_consecutive_dropped_groups: int = Field(
        default=50,
        ge=1,
        description="Abort after this many dropped groups in a row instead of looping forever.",
    )
    sandbox: SandboxSpec = Field(
        default_factory=SandboxSpec,
        description="Default sandbox spec of every item's slot (an item's AgentTask.sandbox "
        "wins): image, dockerfile, context, rootfs, binds, env, path, workdir, limits. As flags: "
        "--env.sandbox.image IMG, --env.sandbox.binds /a,/b:/c, --env.sandbox.env K=V,K2=V2, "
        "--env.sandbox.limits.memory N, or --env.sandbox '<JSON object>'.",
    )
    max_consecutive_inference_failures: int = Field(
        default=16,
        ge=1,
        description="Stop the run (InferenceFailedError, exit status 1) after this many "
        "trajectories in a row failed on inference (endpoint down, HTTP errors, garbage).",
    )
    inference_max_attempts: int = Field(
        default=3,
        ge=1,
        description="Attempts per inference request; only transient failures (connect errors, "
        "timeouts, HTTP 408/429/5xx) are retried, another 4xx never.",
    )
    inference_backoff_max_s: float = Field(
        default=10.0, ge=0, description="Longest random exponential backoff between attempts."
    )
    agent_context_tokens: int | None = Field(
        default=None,
        gt=0,
        description="The model's context budget in tokens: a trajectory whose prompt plus "
        "completion reach it ends with 'context_exhausted' (None: only the server decides).",
    )
    on_context_exhausted: Literal["score", "mask"] = Field(
        default="score",
        description="A trajectory that ran out of context is verified and scored like any "
        "other ending ('score') or becomes a masked failed member ('mask').",
    )
    shutdown_grace_s: float = Field(
        default=30.0, gt=0, description="Seconds the executor and backend may take to stop."
    )

    @model_validator(mode="before")
    @classmethod
    def _lists_from_text(cls, data: Any) -> Any:
        if isinstance(data, dict):
            texts = {k for k in list_fields(cls) & data.keys() if isinstance(data[k], str)}
            if texts:
                data = {**data, **{k: parse_list_flag(data[k]) for k in texts}}
        return data

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data: Any) -> Any:
        moved = sorted(_MOVED & data.keys()) if isinstance(data, dict) else []
        if moved:  # BaseEnvConfig ignores unknown keys: never drop these silently
            raise ValueError(
                f"{', '.join(moved)}: moved to backend_options "
                f"(YAML backend_options: {{{moved[0]}: ...}}; flag "
                f"--env.backend_options.{moved[0]})"
            )
        return data

    @model_validator(mode="before")
    @classmethod
    def _unknown_fields(cls, data: Any) -> Any:
        # BaseEnvConfig ignores unknown keys, so a typo'd flag or YAML key
        # (--env.agent_max_stpes 6) would run with the default, silently.
        if not isinstance(data, dict) or cls.model_config.get("extra") == "allow":
            return data  # a subclass that asks for extra keys gets them
        known = set(cls.model_fields) | {
            f.alias for f in cls.model_fields.values() if f.alias is not None
        }
        unknown = sorted(str(k) for k in data.keys() - known - _MOVED)
        if unknown:
            raise ValueError(
                f"{cls.__name__} has no field "
                + ", ".join(_with_suggestion(name, known) for name in unknown)
            )
        return data

    @field_validator("sandbox", "backend_options", mode="before")
    @classmethod
    def _object_from_text(cls, value: Any, info: ValidationInfo) -> Any:
        # A flag's text (as atroposlib hands it over; pydantic-cli: a one-item list) or a
        # YAML string: one JSON object (see fold_model_flags).
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            value = value[0]
        if isinstance(value, str):
            return parse_object_flag(value, info.field_name or "")
        return value

    @model_validator(mode="after")
    def _check(self) -> AgentEnvConfig:
        # Fails early, as one line, on an unknown backend or option (the SDK of an
        # uninstalled backend is only needed when it starts).
        self.backend_options_model()
        return self

    def backend_options_model(self) -> HostedOptions:
        """``backend_options`` validated by the backend's options model, with the env's
        ``allow_network`` and ``require_sandbox`` (which the executor enforces too).

        Raises:
            ConfigError: Unknown backend or option, or an invalid value.
        """
        options = {
            **self.backend_options,
            "allow_network": self.allow_network,
            "require_sandbox": self.require_sandbox,
        }
        return backend_options(self.backend, options)


@dataclasses.dataclass(frozen=True, slots=True)
class GroupReport:
    """What one ``collect_trajectories`` call produced (passed to group listeners).

    Attributes:
        group: Sequence number of the group in this env (from 0).
        scores: Member scores (failed members carry the failure score).
        failed: Members that failed.
        dropped: The group was dropped (see ``drop_reason``).
        tool_calls: Tool calls the members' models made.
        duration: Wall-clock seconds of the group.
        drop_reason: Why it was dropped: ``"inference"`` (every member failed on inference),
            ``"failure_policy"`` (a member failed under ``failure_policy="drop_group"``),
            ``"tokenize"`` (a conversation could not be tokenized); ``None`` if kept.
        failures: Each member's failure reason (``None`` for a member that did not fail).
        finish_reasons: Each member's agent finish reason (``None`` if the agent never ran).
        durations: Each member's wall-clock seconds (its trajectory: slot, agent, scoring).
    """

    group: int
    scores: list[float]
    failed: int
    dropped: bool
    tool_calls: int
    duration: float
    drop_reason: str | None = None
    failures: list[str | None] = dataclasses.field(default_factory=list)
    finish_reasons: list[str | None] = dataclasses.field(default_factory=list)
    durations: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, slots=True)
class AgentEnvStatistics:
    """Counters of an :class:`AgentEnv`.

    Attributes:
        groups: Groups collected (including dropped ones).
        dropped_groups: Groups not used for training: returned as ``None`` (see
            ``GroupReport.drop_reason``) or dropped by atroposlib for equal scores
            (``ensure_scores_are_not_same``).
        inference_failures: Members that failed on inference (the endpoint).
        context_exhausted: Members whose conversation ran out of context.
        cancelled_groups: Groups whose worker was cancelled (by BaseEnv or a deadline).
        running_groups: Groups running right now (their slots are leased or being released).
        failed_members: Members that failed.
        tool_calls: Tool calls made by the models.
        executor: The executor's statistics, while it runs (else its last snapshot).
    """

    groups: int
    dropped_groups: int
    cancelled_groups: int
    running_groups: int
    failed_members: int
    tool_calls: int
    executor: ExecutorStatistics | None
    inference_failures: int = 0
    context_exhausted: int = 0

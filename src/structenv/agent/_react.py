"""The ReACT loop: ask the policy, run the tool calls it made, feed the results back, repeat.

Failure modes are results, not exceptions: a policy that fails after its retries, a step or
agent deadline, too many consecutive malformed tool calls and running out of steps each end
the loop with an :class:`AgentResult` that says why and keeps the conversation and every
completion so far (their tokens and logprobs are still real training data). Cancellation from
outside is never converted: it propagates untouched and no result is produced.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import anyio
import anyio.lowlevel
from pydantic import BaseModel, ConfigDict, Field

from .._exceptions import ContextExhaustedError, PolicyError, ProtocolError
from .._executor import unknown_tool_result
from .._spec import SandboxSpec
from .._types import ToolCall, ToolResult
from ._parsing import ParsedMessage, ParseError, parse_hermes, parse_message
from ._policy import Completion, Policy
from ._prompts import format_parse_error, format_tool_response, hermes_system_prompt

__all__ = ["AgentConfig", "AgentResult", "AgentTask", "FinishReason", "ToolRunner", "run_agent"]

FinishReason = Literal[
    "final_answer", "max_steps", "parse_errors", "policy_error", "timeout", "context_exhausted"
]


class ToolRunner(Protocol):
    """Executes tool calls for one trajectory (the executor's trajectory object implements it)."""

    def specs(self) -> list[dict[str, Any]]:
        """OpenAI-style function specs of the tools this trajectory may call."""
        ...

    async def call_many(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        """Run ``calls`` (concurrently where possible); one result per call, in order.

        Tool failures, timeouts and invalid arguments are results, not exceptions.

        Cancellation: calls in flight are abandoned; their slot is marked not reusable.
        """
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class AgentTask:
    """What the agent is asked to do.

    Attributes:
        prompt: The user message.
        system: Instructions placed before the tool definitions in the system prompt.
        id: Identifier for logs and results.
        sandbox: The sandbox spec this item's slot is built from (its image, binds, env...);
            ``None``: the env's default (``AgentEnvConfig.sandbox``).
    """

    prompt: str
    system: str = ""
    id: str = ""
    sandbox: SandboxSpec | None = None


class AgentConfig(BaseModel):
    """Limits and formatting of the ReACT loop.

    Attributes:
        max_steps: Policy calls allowed; the loop ends with ``"max_steps"`` after that many.
        step_deadline: Seconds one policy call may take (``None``: no limit); exceeding it
            ends the trajectory with ``"timeout"``.
        deadline: Seconds the whole loop may take (``None``: no limit); exceeding it ends the
            trajectory with ``"timeout"`` and whatever it has so far.
        max_consecutive_parse_errors: Consecutive steps with a malformed tool call that are
            answered with an error observation; one more ends the loop with
            ``"parse_errors"``. ``0`` ends it at the first malformed call.
        tool_response_role: ``"tool"`` (Hermes / OpenAI style, one message per call) or
            ``"user"`` (one user message per step holding every ``<tool_response>``).
        tools_in_system_prompt: Put the tool definitions in the system prompt (Hermes). Turn
            off when the server receives the tools natively and renders them itself.
        max_observation_chars: Tool output shown to the model is cut to this many characters.
        context_tokens: The model's context budget in tokens (``None``: only the server
            decides). When a turn's prompt plus completion reaches it (counted from the
            completion's token ids, when the policy returns them) the loop ends with
            ``"context_exhausted"`` instead of sending a prompt that cannot fit.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_steps: int = Field(default=30, gt=0)
    step_deadline: float | None = Field(default=300.0, gt=0.0)
    deadline: float | None = Field(default=None, gt=0.0)
    max_consecutive_parse_errors: int = Field(default=3, ge=0)
    tool_response_role: Literal["tool", "user"] = "tool"
    tools_in_system_prompt: bool = True
    max_observation_chars: int = Field(default=32_000, gt=0)
    context_tokens: int | None = Field(default=None, gt=0)


@dataclasses.dataclass(frozen=True, slots=True)
class AgentResult:
    """How a trajectory's agent loop ended and everything it produced.

    Attributes:
        finish_reason: ``"final_answer"``, ``"max_steps"``, ``"parse_errors"``,
            ``"policy_error"``, ``"timeout"`` or ``"context_exhausted"`` (the conversation no
            longer fits the model's context: the server refused the prompt as too long, or
            ``AgentConfig.context_tokens`` were used up).
        final_answer: The final answer text (``<think>`` blocks removed), if one was given.
        messages: The whole conversation as plain JSON dicts (role, content, and for tool
            messages ``tool_call_id``/``name``), system prompt first.
        completions: Every policy turn in order, with its tokens and logprobs if available.
        tool_calls: Tool calls the model made (including calls to unknown tools).
        tool_errors: Tool results that carried an error (unknown tool, timeout, ...).
        parse_errors: Malformed tool-call attempts over the whole trajectory.
        error: What went wrong, for every finish reason but ``"final_answer"``.
    """

    finish_reason: FinishReason
    final_answer: str | None
    messages: list[dict[str, Any]]
    completions: list[Completion]
    tool_calls: int = 0
    tool_errors: int = 0
    parse_errors: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        """The model gave a final answer."""
        return self.finish_reason == "final_answer"

    @property
    def steps(self) -> int:
        """Policy calls that returned a completion."""
        return len(self.completions)


class _Run:
    """Mutable state of one loop; turned into an :class:`AgentResult` at the end."""

    def __init__(self, task: AgentTask, specs: list[dict[str, Any]], config: AgentConfig) -> None:
        self.config = config
        self.specs = specs
        self.known = {_spec_name(s) for s in specs}
        system = hermes_system_prompt(task.system, specs if config.tools_in_system_prompt else [])
        self.messages: list[dict[str, Any]] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self.messages.append({"role": "user", "content": task.prompt})
        self.completions: list[Completion] = []
        self.tool_calls = self.tool_errors = self.parse_errors = 0
        self.next_id = 0
        self.consecutive_parse_errors = 0

    def result(
        self, reason: FinishReason, *, error: str | None = None, answer: str | None = None
    ) -> AgentResult:
        return AgentResult(
            finish_reason=reason,
            final_answer=answer,
            messages=self.messages,
            completions=self.completions,
            tool_calls=self.tool_calls,
            tool_errors=self.tool_errors,
            parse_errors=self.parse_errors,
            error=error,
        )

    def parse(self, completion: Completion) -> ParsedMessage:
        if completion.has_native_tool_calls:
            parsed = ParsedMessage(
                content=parse_message(completion.text).content,
                calls=list(completion.tool_calls),
                errors=list(completion.tool_call_errors),
            )
        else:
            parsed = parse_hermes(completion.text, id_start=self.next_id)
        self.next_id += len(parsed.calls)
        return parsed

    def record_assistant(self, completion: Completion) -> None:
        message: dict[str, Any] = {"role": "assistant", "content": completion.text}
        if completion.raw_tool_calls:
            message["tool_calls"] = json.loads(json.dumps(completion.raw_tool_calls))
        self.messages.append(message)

    def observe(self, errors: Sequence[ParseError], results: Sequence[ToolResult]) -> None:
        limit = self.config.max_observation_chars
        blocks = [(format_parse_error(e), e.call_id, None) for e in errors] + [
            (format_tool_response(r, max_chars=limit), r.call_id, r.name) for r in results
        ]
        if self.config.tool_response_role == "user":
            self.messages.append({"role": "user", "content": "\n".join(b for b, _, _ in blocks)})
            return
        for content, call_id, name in blocks:
            message: dict[str, Any] = {"role": "tool", "content": content}
            if call_id:
                message["tool_call_id"] = call_id
            if name:
                message["name"] = name
            self.messages.append(message)


def _context_used(completion: Completion) -> int | None:
    if completion.prompt_tokens is None or completion.completion_tokens is None:
        return None
    return len(completion.prompt_tokens) + len(completion.completion_tokens)


def _spec_name(spec: Mapping[str, Any]) -> str:
    function = spec.get("function")
    name = function.get("name") if isinstance(function, Mapping) else spec.get("name")
    return str(name)


async def run_agent(
    policy: Policy, tools: ToolRunner, task: AgentTask, *, config: AgentConfig
) -> AgentResult:
    """Run the ReACT loop for one task until a final answer or a limit.

    Each step asks the policy (bounded by ``config.step_deadline``), parses the tool calls,
    answers malformed ones and unknown tools with error observations, runs the rest together
    through ``tools.call_many`` and appends one ``<tool_response>`` per call.

    Returns:
        The result; :attr:`AgentResult.finish_reason` says how it ended. Policy failures
        (``PolicyError``, ``ProtocolError``) and deadlines become results.

    Raises:
        Exception: Whatever ``tools.call_many`` raises (a harness failure, not a tool failure).

    Cancellation: propagates untouched (no result); tool calls in flight are abandoned by the
    runner, which owns the slot and marks it not reusable.
    """
    run = _Run(task, tools.specs(), config)
    with anyio.move_on_after(
        config.deadline if config.deadline is not None else float("inf")
    ) as scope:
        result = await _loop(policy, tools, run)
    if scope.cancelled_caught:
        await anyio.lowlevel.checkpoint_if_cancelled()  # an outer cancellation wins
        return run.result("timeout", error=f"agent deadline of {config.deadline}s passed")
    return result


async def _loop(policy: Policy, tools: ToolRunner, run: _Run) -> AgentResult:
    config = run.config
    for step in range(config.max_steps):
        try:
            with anyio.fail_after(config.step_deadline):
                completion = await policy.complete(run.messages, tools=run.specs)
        except TimeoutError:
            # Raised by our step deadline or the policy's own request deadline; a deadline of
            # an enclosing scope would surface as cancellation here, never as TimeoutError.
            await anyio.lowlevel.checkpoint_if_cancelled()
            return run.result(
                "timeout", error=f"policy call of step {step + 1} exceeded its deadline"
            )
        except ContextExhaustedError as exc:
            return run.result("context_exhausted", error=f"{type(exc).__name__}: {exc}")
        except (PolicyError, ProtocolError) as exc:
            return run.result("policy_error", error=f"{type(exc).__name__}: {exc}")
        run.completions.append(completion)
        run.record_assistant(completion)
        parsed = run.parse(completion)
        if parsed.is_final_answer:
            return run.result("final_answer", answer=parsed.content)
        used = _context_used(completion)
        if config.context_tokens is not None and used is not None and used >= config.context_tokens:
            return run.result(
                "context_exhausted",
                error=f"{used} tokens after step {step + 1} reach the context budget of "
                f"{config.context_tokens}",
            )

        run.parse_errors += len(parsed.errors)
        run.consecutive_parse_errors = run.consecutive_parse_errors + 1 if parsed.errors else 0
        if run.consecutive_parse_errors > config.max_consecutive_parse_errors:
            problems = "; ".join(e.message for e in parsed.errors)
            return run.result(
                "parse_errors",
                error=f"{run.consecutive_parse_errors} consecutive steps with malformed tool "
                f"calls (limit {config.max_consecutive_parse_errors}); last: {problems}",
            )

        run.tool_calls += len(parsed.calls)
        results: dict[int, ToolResult] = {}
        runnable = []
        for index, call in enumerate(parsed.calls):
            if call.name in run.known:
                runnable.append((index, call))
            else:
                results[index] = unknown_tool_result(call, run.known)
        if runnable:
            outcomes = await tools.call_many([call for _, call in runnable])
            if len(outcomes) != len(runnable):
                raise RuntimeError(
                    f"ToolRunner returned {len(outcomes)} results for {len(runnable)} calls"
                )
            results.update((index, r) for (index, _), r in zip(runnable, outcomes, strict=True))
        ordered = [results[i] for i in range(len(parsed.calls))]
        run.tool_errors += sum(not r.ok for r in ordered)
        run.observe(parsed.errors, ordered)
    return run.result("max_steps", error=f"no final answer within {config.max_steps} steps")

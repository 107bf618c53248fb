"""The policy interface: what the agent loop needs from an LLM, and what one turn returns.

A :class:`Policy` is deliberately tiny so the Trio-tested core never depends on a particular
client: the httpx-based :class:`~structenv.agent.OpenAIPolicy`, the atroposlib adapter (asyncio
only, tokens tracked by ``ManagedServer``) and test fakes all fit it.

:class:`Completion` refuses to fabricate training data: token ids and logprobs are either real
or ``None``, and ``logprobs_available`` says which, so a trainer can never mistake placeholder
zeros for a policy's probabilities.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from .._types import ToolCall
from ._parsing import ParseError

__all__ = ["Completion", "Policy"]


@dataclasses.dataclass(frozen=True, slots=True)
class Completion:
    """One assistant turn as the policy produced it.

    Attributes:
        text: The assistant message content (may contain Hermes ``<tool_call>`` blocks).
        tool_calls: Calls the *server* returned as native OpenAI ``tool_calls``, parsed. Empty
            when the server returned none; Hermes text is parsed by the agent loop instead.
        tool_call_errors: Native ``tool_calls`` entries the server returned malformed.
        finish_reason: The server's finish reason (``"stop"``, ``"length"``, ``"tool_calls"``),
            ``None`` if it gave none.
        prompt_tokens: The prompt's token ids exactly as the model saw them, or ``None`` when
            the server does not expose them. Never an empty placeholder.
        completion_tokens: The generated token ids, or ``None`` when not available.
        completion_logprobs: The log-probability of each generated token, or ``None``.
        logprobs_available: ``True`` exactly when ``completion_logprobs`` holds real values.
        raw_tool_calls: The native ``tool_calls`` list as received (plain JSON), so the
            assistant message can be echoed back to an OpenAI server unchanged.
    """

    text: str
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: list[int] | None = None
    completion_tokens: list[int] | None = None
    completion_logprobs: list[float] | None = None
    logprobs_available: bool = False
    tool_call_errors: list[ParseError] = dataclasses.field(default_factory=list)
    raw_tool_calls: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.logprobs_available != (self.completion_logprobs is not None):
            raise ValueError("logprobs_available must be True exactly when logprobs are given")
        if self.completion_logprobs is not None:
            if any(not math.isfinite(lp) or lp > 0.0 for lp in self.completion_logprobs):
                raise ValueError("logprobs must be finite and <= 0")
            if self.completion_tokens is not None and len(self.completion_tokens) != len(
                self.completion_logprobs
            ):
                raise ValueError(
                    f"{len(self.completion_tokens)} completion tokens but "
                    f"{len(self.completion_logprobs)} logprobs"
                )
        if self.completion_tokens is not None and not self.completion_tokens and self.text:
            raise ValueError("an empty token list for a non-empty completion is a placeholder")

    @property
    def has_native_tool_calls(self) -> bool:
        """The server returned OpenAI ``tool_calls`` (well-formed or not)."""
        return bool(self.tool_calls or self.tool_call_errors)


@runtime_checkable
class Policy(Protocol):
    """Anything that can produce the next assistant turn.

    Implementations must be safe to call from many tasks at once and must work under both
    asyncio and Trio unless they say otherwise.
    """

    async def complete(
        self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]]
    ) -> Completion:
        """Produce the next assistant turn for ``messages``.

        Args:
            messages: The conversation so far, as plain JSON chat messages.
            tools: OpenAI-style function specs (``{"type": "function", "function": {...}}``);
                the implementation decides whether to send them natively.

        Raises:
            PolicyError: The endpoint failed after the retries its configuration allows.
            ProtocolError: The endpoint answered something that is not a valid completion.
            TimeoutError: The implementation's own request deadline passed.

        Cancellation: the request is abandoned; nothing is recorded and no connection is left
        half-used (a pooled connection in an unknown state is closed).
        """
        ...

"""The OpenAI-compatible response bodies structenv reads, as one set of pydantic models.

Both routes of :class:`~structenv.agent.OpenAIPolicy` parse their answers here: a chat
completion (``/v1/chat/completions``, with vLLM's ``return_token_ids`` fields in ``"chat"``
mode) and a token-id completion (``/v1/completions`` with ``return_tokens_as_token_ids`` and
``logprobs: 0``, the ``"completions"`` mode of :mod:`structenv.agent._tokens`). The models
are strict (a number is not a string, ``true`` is not a token id) and ignore fields they do
not name; a body that does not fit is one :class:`~structenv.ProtocolError` naming where.
Logprobs are finite and not positive (a rounding excess up to 1e-6 is clamped to 0).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .._exceptions import ProtocolError
from ._parsing import parse_openai_tool_calls
from ._policy import Completion

__all__ = ["parse_chat_completion", "parse_token_completion"]


def _logprob(value: float) -> float:
    if not math.isfinite(value) or value > 1e-6:
        raise ValueError(f"invalid logprob {value}")
    return min(value, 0.0)


def _token_id(token: Any) -> int:
    # return_tokens_as_token_ids: each token is "token_id:<id>".
    if isinstance(token, str) and token.startswith("token_id:"):
        try:
            return int(token[len("token_id:") :])
        except ValueError:
            pass
    raise ValueError(f"token {str(token)[:50]!r} is not 'token_id:<id>' (is this vLLM?)")


Logprob = Annotated[float, AfterValidator(_logprob)]
TokenId = Annotated[int, BeforeValidator(_token_id)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class ChatLogprob(_Body):
    logprob: Logprob


class ChatLogprobs(_Body):
    content: list[ChatLogprob] | None = None


class ChatMessage(_Body):
    content: str | None = None
    tool_calls: list[Any] | None = None


class _Choice(_Body):
    finish_reason: str | None = None
    #: vLLM's ``return_token_ids``: the completion's and the prompt's token ids.
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


class ChatChoice(_Choice):
    message: ChatMessage
    logprobs: ChatLogprobs | None = None


class TextLogprobs(_Body):
    tokens: list[TokenId]
    token_logprobs: list[Logprob]

    @model_validator(mode="after")
    def _paired(self) -> TextLogprobs:
        if len(self.tokens) != len(self.token_logprobs):
            raise ValueError("logprobs.tokens and logprobs.token_logprobs must be equal lists")
        return self


class TextChoice(_Choice):
    text: str
    logprobs: TextLogprobs

    @field_validator("logprobs", mode="before")
    @classmethod
    def _present(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError("completion without logprobs (the server ignored logprobs: 0)")
        return value


_M = TypeVar("_M", bound=_Body)


class ChatResponse(_Body):
    choices: list[ChatChoice] = Field(min_length=1)
    prompt_token_ids: list[int] | None = None


class TextResponse(_Body):
    choices: list[TextChoice] = Field(min_length=1)
    prompt_token_ids: list[int] | None = None


def _validate(model: type[_M], data: Any, what: str) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        message = first["msg"].removeprefix("Value error, ")
        raise ProtocolError(f"{what}: {where}: {message}: {str(data)[:200]}") from None


def parse_chat_completion(data: Any, *, token_ids: bool = False) -> Completion:
    """Turn a chat-completion JSON body into a :class:`Completion`.

    With ``token_ids`` (``OpenAIPolicyConfig.token_ids == "chat"``) the body must carry vLLM's
    ``return_token_ids`` fields, which become ``prompt_tokens`` and ``completion_tokens``.

    Raises:
        ProtocolError: Not a chat completion; with ``token_ids``, one without token ids
            (the server does not support ``return_token_ids``) or whose ids do not match
            its logprobs.
    """
    body = _validate(ChatResponse, data, "chat completion")
    choice = body.choices[0]
    text = choice.message.content or ""
    raw_calls = choice.message.tool_calls
    calls, errors = parse_openai_tool_calls(raw_calls or [])
    content = choice.logprobs.content if choice.logprobs is not None else None
    logprobs = [entry.logprob for entry in content] if content is not None else None
    if logprobs is not None and not logprobs and text:
        logprobs = None  # an empty list for a non-empty answer is no information
    prompt = ids = None
    if token_ids:
        prompt = choice.prompt_token_ids
        prompt = prompt if prompt is not None else body.prompt_token_ids
        ids = choice.token_ids
        if prompt is None or ids is None:
            raise ProtocolError(
                "the chat completion has no prompt_token_ids/token_ids: the server does not "
                "support return_token_ids (vLLM >= 0.10.2 does); use token_ids='completions'"
            )
        if logprobs is not None and len(logprobs) != len(ids):
            raise ProtocolError(f"{len(ids)} token ids but {len(logprobs)} logprobs")
    return Completion(
        text=text,
        tool_calls=calls,
        tool_call_errors=errors,
        raw_tool_calls=raw_calls or None,
        finish_reason=choice.finish_reason,
        prompt_tokens=prompt,
        completion_tokens=ids,
        completion_logprobs=logprobs,
        logprobs_available=logprobs is not None,
    )


def parse_token_completion(data: Any) -> Completion:
    """A ``/v1/completions`` body (token-id prompt, ``logprobs: 0``,
    ``return_tokens_as_token_ids``) as a :class:`Completion` with token ids and logprobs.

    The completion's token ids come from ``logprobs.tokens``; if the server also returned
    ``token_ids`` (``return_token_ids``) they must agree. ``prompt_token_ids``, when given,
    becomes ``prompt_tokens``.

    Raises:
        ProtocolError: Not such a body.
    """
    body = _validate(TextResponse, data, "completion")
    choice = body.choices[0]
    ids = list(choice.logprobs.tokens)
    if choice.token_ids is not None and choice.token_ids != ids:
        raise ProtocolError("choice.token_ids disagree with logprobs.tokens")
    if not ids and choice.text:
        raise ProtocolError("a non-empty completion without tokens")
    prompt = choice.prompt_token_ids
    prompt = prompt if prompt is not None else body.prompt_token_ids
    return Completion(
        text=choice.text,
        finish_reason=choice.finish_reason,
        prompt_tokens=prompt,
        completion_tokens=ids,
        completion_logprobs=list(choice.logprobs.token_logprobs),
        logprobs_available=True,
    )

"""An OpenAI-compatible chat-completions policy over httpx (works under asyncio and Trio).

Retries are for transport trouble only: connect failures, a connection dropped before the
answer was complete, transport read timeouts, HTTP 429 and 5xx. A completed answer that is
wrong is never retried: a 2xx body that is not a valid completion raises
:class:`~structenv.ProtocolError` at once, another 4xx raises :class:`~structenv.PolicyError`
at once. Cancellation and the request deadline are never retried either. When the retries are
used up the last transient failure surfaces as :class:`~structenv.PolicyError`. A 4xx whose
message says the prompt does not fit the model's context (vLLM, SGLang and OpenAI wordings) is
:class:`~structenv.ContextExhaustedError` (:func:`is_context_overflow`): the agent loop ends the
trajectory with ``"context_exhausted"``.

Token ids (``token_ids``): ``"none"`` asks for chat completions as they are; ``"chat"`` adds
``return_token_ids`` (vLLM >= 0.10.2) so each completion carries the prompt and completion
token ids; ``"completions"`` renders the prompt locally with the model's tokenizer and sends
it as token ids to ``/v1/completions`` (``return_tokens_as_token_ids``, ``logprobs: 0``). For
exact multi-turn sequences use one :meth:`OpenAIPolicy.track` per trajectory
(:mod:`structenv.agent._tokens`).

Two time limits come from the config: ``read_timeout`` is httpx's per-read inactivity limit (a
transport timeout, retried), ``request_deadline`` bounds one whole :meth:`OpenAIPolicy.complete`
call including retries and backoff and raises the builtin ``TimeoutError``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, Self

import anyio
import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
)

from .._exceptions import ContextExhaustedError, PolicyError, ProtocolError
from ._policy import Completion
from ._tokens import PromptRenderer, TrackedPolicy
from ._wire import parse_chat_completion as parse_chat_completion
from ._wire import parse_token_completion

__all__ = [
    "OpenAIPolicy",
    "OpenAIPolicyConfig",
    "PolicyStatistics",
    "TrackedPolicy",
    "is_context_overflow",
]

#: Transport failures that mean "no complete answer arrived": safe and useful to retry.
_TRANSIENT_TRANSPORT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)
_ERROR_EXCERPT = 2048
_CONTEXT_OVERFLOW = re.compile(
    r"maximum context length|context length|context window|context_length_exceeded"
    r"|prompt is too long|too many tokens|longer than the model",
    re.IGNORECASE,
)


def is_context_overflow(status: int | None, text: str) -> bool:
    """An HTTP error answer that means "the prompt does not fit the model's context"
    (HTTP 400/413/422 with vLLM's, SGLang's or OpenAI's wording)."""
    return status in (400, 413, 422) and bool(_CONTEXT_OVERFLOW.search(text))


class OpenAIPolicyConfig(BaseModel):
    """Configuration of :class:`OpenAIPolicy`.

    Attributes:
        base_url: The API root including ``/v1`` (``http://127.0.0.1:8000/v1``).
        api_key: Sent as a bearer token when set.
        model: Model name sent with each request.
        temperature: Sampling temperature.
        max_tokens: Completion length cap (``None``: the server's default).
        request_deadline: Seconds one :meth:`OpenAIPolicy.complete` call may take in total,
            retries and backoff included; ``TimeoutError`` when it passes. ``None``: no limit.
        connect_timeout: httpx connect timeout (transient, retried).
        read_timeout: httpx per-read inactivity timeout (transient, retried). ``None``: none.
        max_retries: Retries after the first attempt for transient failures.
        backoff_initial: First backoff in seconds; doubles per retry.
        backoff_max: Backoff cap in seconds (also caps a server's ``Retry-After``).
        backoff_jitter: Up to this many random seconds added to each backoff.
        logprobs: Ask for per-token logprobs (``logprobs: true``).
        native_tools: Send tool specs as the request's ``tools`` field. Turn off when the tools
            are already in the system prompt (Hermes style) and the server would add them again.
        token_ids: ``"none"``: plain chat completions (no token ids). ``"chat"``: chat
            completions with ``return_token_ids`` and logprobs (vLLM). ``"completions"``: the
            prompt rendered locally (needs the model's tokenizer) and sent as token ids to
            ``/v1/completions`` with logprobs; exact across turns through :meth:`track`.
        context_length: The model's context length (vLLM's ``max_model_len``). With
            ``token_ids="completions"`` and no ``max_tokens`` a turn may use what the prompt
            leaves of it (``/v1/completions`` would otherwise stop after 16 tokens).
        extra_body: Extra JSON fields merged into every request body.
        max_connections: Connection pool size.
        max_response_bytes: A larger response body is a protocol error.
        close_grace: Seconds :meth:`OpenAIPolicy.aclose` may spend closing connections.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_url: str
    api_key: SecretStr | None = None
    model: str
    temperature: float = Field(default=1.0, ge=0.0)
    max_tokens: int | None = Field(default=None, gt=0)
    request_deadline: float | None = Field(default=600.0, gt=0.0)
    connect_timeout: float = Field(default=10.0, gt=0.0)
    read_timeout: float | None = Field(default=300.0, gt=0.0)
    max_retries: int = Field(default=3, ge=0, le=50)
    backoff_initial: float = Field(default=0.5, ge=0.0)
    backoff_max: float = Field(default=10.0, ge=0.0)
    backoff_jitter: float = Field(default=0.5, ge=0.0)
    logprobs: bool = False
    native_tools: bool = True
    token_ids: Literal["none", "chat", "completions"] = "none"
    context_length: int | None = Field(default=None, gt=0)
    extra_body: dict[str, Any] = Field(default_factory=dict)
    max_connections: int = Field(default=256, gt=0)
    max_response_bytes: int = Field(default=16 << 20, gt=0)
    close_grace: float = Field(default=5.0, gt=0.0)


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyStatistics:
    """Counters of an :class:`OpenAIPolicy`.

    Attributes:
        requests: HTTP requests sent (attempts, retries included).
        retries: Attempts that were retries of a transient failure.
        completions: Calls that returned a :class:`Completion`.
        failures: Calls that raised (``PolicyError``, ``ProtocolError`` or ``TimeoutError``).
    """

    requests: int
    retries: int
    completions: int
    failures: int


class _Transient(Exception):
    """A retryable failure of one attempt (never escapes the policy)."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


async def _read_body(response: httpx.Response, limit: int, *, truncate: bool) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            if truncate:
                break
            raise ProtocolError(f"response body larger than {limit} bytes")
    return b"".join(chunks)[:limit] if truncate else b"".join(chunks)


class OpenAIPolicy:
    """A :class:`~structenv.agent.Policy` talking to an OpenAI-compatible chat endpoint.

    Use it as an async context manager; it owns its connection pool::

        async with OpenAIPolicy(OpenAIPolicyConfig(base_url=url, model="m")) as policy:
            completion = await policy.complete(messages, tools=specs)

    Logprobs come from ``choices[0].logprobs.content[*].logprob`` when the server returns
    them; otherwise the completion says ``logprobs_available=False``. Token ids are not part of
    the OpenAI response, so ``prompt_tokens`` and ``completion_tokens`` are ``None``.
    """

    def __init__(self, config: OpenAIPolicyConfig, *, tokenizer: Any | None = None) -> None:
        if config.token_ids == "completions":
            if tokenizer is None:
                raise ValueError("token_ids='completions' renders prompts locally: pass tokenizer=")
            if config.max_tokens is None and config.context_length is None:
                raise ValueError("token_ids='completions' needs max_tokens or context_length")
        self.config = config
        self.renderer = PromptRenderer(tokenizer) if tokenizer is not None else None
        self._client: httpx.AsyncClient | None = None
        self._closed = False
        self._requests = 0
        self._retries = 0
        self._completions = 0
        self._failures = 0

    async def __aenter__(self) -> Self:
        """Open the connection pool (no I/O happens until the first request).

        Cancellation: nothing is opened that needs closing.
        """
        if self._client is not None or self._closed:
            raise RuntimeError("an OpenAIPolicy can be entered only once")
        cfg = self.config
        headers = {"Accept": "application/json"}
        if cfg.api_key is not None:
            headers["Authorization"] = f"Bearer {cfg.api_key.get_secret_value()}"
        self._client = httpx.AsyncClient(
            base_url=cfg.base_url,
            headers=headers,
            timeout=httpx.Timeout(
                connect=cfg.connect_timeout,
                read=cfg.read_timeout,
                write=cfg.read_timeout,
                pool=None,
            ),
            limits=httpx.Limits(
                max_connections=cfg.max_connections, max_keepalive_connections=cfg.max_connections
            ),
            follow_redirects=False,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the pool (see :meth:`aclose`).

        Cancellation: the close is shielded and bounded; the policy ends up closed.
        """
        await self.aclose()

    async def aclose(self) -> None:
        """Close every pooled connection. Idempotent; shielded and bounded by ``close_grace``.

        Cancellation: the close still runs to completion (shielded, at most ``close_grace``
        seconds); the policy is closed afterwards either way.
        """
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            with anyio.move_on_after(self.config.close_grace, shield=True):
                await client.aclose()

    def statistics(self) -> PolicyStatistics:
        """Counters since the policy was created."""
        return PolicyStatistics(
            requests=self._requests,
            retries=self._retries,
            completions=self._completions,
            failures=self._failures,
        )

    def _payload(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        cfg = self.config
        payload: dict[str, Any] = {
            "model": cfg.model,
            "messages": [dict(m) for m in messages],
            "temperature": cfg.temperature,
        }
        if cfg.max_tokens is not None:
            payload["max_tokens"] = cfg.max_tokens
        if cfg.native_tools and tools:
            payload["tools"] = [dict(t) for t in tools]
        if cfg.logprobs or cfg.token_ids == "chat":
            payload["logprobs"] = True
        if cfg.token_ids == "chat":
            payload["return_token_ids"] = True
        payload.update(cfg.extra_body)
        return payload

    def _max_tokens(self, prompt_length: int) -> int:
        cfg = self.config
        if cfg.context_length is None:
            assert cfg.max_tokens is not None  # checked in __init__
            return cfg.max_tokens
        # /v1/completions defaults to 16 tokens: always send a number. A prompt that fills
        # the context gets 1, and the server's "maximum context length" error.
        room = max(1, cfg.context_length - prompt_length)
        return min(cfg.max_tokens, room) if cfg.max_tokens is not None else room

    def _completions_payload(self, prompt: Sequence[int]) -> dict[str, Any]:
        cfg = self.config
        payload: dict[str, Any] = {
            "model": cfg.model,
            "prompt": list(prompt),
            "temperature": cfg.temperature,
            "max_tokens": self._max_tokens(len(prompt)),
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
            "return_token_ids": True,
            "skip_special_tokens": True,
        }
        payload.update(cfg.extra_body)
        return payload

    def _wait(self, state: RetryCallState) -> float:
        cfg = self.config
        exponent = min(state.attempt_number - 1, 60)
        delay = min(cfg.backoff_initial * 2.0**exponent, cfg.backoff_max)
        delay += random.uniform(0.0, cfg.backoff_jitter)
        failure = state.outcome.exception() if state.outcome is not None else None
        if isinstance(failure, _Transient) and failure.retry_after is not None:
            delay = max(delay, failure.retry_after)
        return min(delay, cfg.backoff_max + cfg.backoff_jitter)

    async def complete(
        self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]]
    ) -> Completion:
        """Ask the endpoint for the next assistant turn.

        Raises:
            PolicyError: Transient failures outlasted ``max_retries``, or a non-retryable HTTP
                error status (4xx other than 429) came back.
            ContextExhaustedError: The server refused the prompt as too long for its context.
            ProtocolError: A 2xx answer that is not a valid chat completion (never retried).
            TimeoutError: ``request_deadline`` passed.
            anyio.ClosedResourceError: The policy was closed.

        Cancellation: the in-flight request is abandoned and its connection closed by httpx
        (it is in an unknown state); nothing else changes. Cancellation is never retried.
        """
        if self.config.token_ids == "completions":
            assert self.renderer is not None
            specs = tools if self.config.native_tools else ()
            prompt = self.renderer.encode(
                self.renderer.render(messages, tools=specs, generation=True)
            )
            return await self.complete_tokens(prompt)
        return await self._request("chat/completions", self._payload(messages, tools))

    async def complete_tokens(self, prompt: Sequence[int]) -> Completion:
        """Complete a prompt given as token ids (``/v1/completions``): the completion's
        token ids, its logprobs and the prompt ids the server saw.

        Raises:
            PolicyError, ProtocolError, TimeoutError: As :meth:`complete`; also
                ``ProtocolError`` when the server reports prompt ids other than ``prompt``.

        Cancellation: as :meth:`complete`.
        """
        completion = await self._request("completions", self._completions_payload(prompt))
        if completion.prompt_tokens is not None and completion.prompt_tokens != list(prompt):
            self._failures += 1
            raise ProtocolError(
                f"{self.config.base_url}: the server saw other prompt tokens than were sent"
            )
        return dataclasses.replace(completion, prompt_tokens=list(prompt))

    def track(self) -> TrackedPolicy:
        """A policy for one trajectory that keeps its exact token sequence across turns
        (``token_ids`` ``"completions"`` or ``"chat"``); see :class:`TrackedPolicy`."""
        return TrackedPolicy(self)

    async def _request(self, path: str, payload: dict[str, Any]) -> Completion:
        client = self._client
        if client is None:
            if self._closed:
                raise anyio.ClosedResourceError
            raise RuntimeError("use `async with OpenAIPolicy(config) as policy:` first")
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.config.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception_type(_Transient),
            sleep=anyio.sleep,
            reraise=True,
        )
        try:
            with anyio.fail_after(self.config.request_deadline):
                body: bytes = await retrying(self._attempt, client, path, payload, [0])
            completion = self._parse(body, completions=path == "completions")
        except _Transient as exc:
            self._failures += 1
            attempts = self.config.max_retries + 1
            raise PolicyError(
                f"{self.config.base_url}: {exc.reason} (gave up after {attempts} attempts)"
            ) from (exc.__cause__ or exc)
        except (PolicyError, ProtocolError, TimeoutError):
            self._failures += 1
            raise
        self._completions += 1
        return completion

    async def _attempt(
        self,
        client: httpx.AsyncClient,
        path: str,
        payload: dict[str, Any],
        attempts: list[int],
    ) -> bytes:
        # ``attempts`` is per call, so concurrent calls never share retry bookkeeping.
        attempts[0] += 1
        self._requests += 1
        if attempts[0] > 1:
            self._retries += 1
        try:
            async with client.stream("POST", path, json=payload) as response:
                status = response.status_code
                if status == 429 or status >= 500:
                    excerpt = await _read_body(response, _ERROR_EXCERPT, truncate=True)
                    raise _Transient(
                        f"HTTP {status}: {excerpt.decode(errors='replace')}",
                        retry_after=_retry_after(response),
                    )
                limit = _ERROR_EXCERPT if status >= 300 else self.config.max_response_bytes
                body = await _read_body(response, limit, truncate=status >= 300)
        except _TRANSIENT_TRANSPORT as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from exc
        except httpx.HTTPError as exc:  # bad URL/protocol, decoding, redirects: not transient
            raise PolicyError(f"{self.config.base_url}: {type(exc).__name__}: {exc}") from exc
        if status >= 300:
            text = body.decode(errors="replace")
            error = ContextExhaustedError if is_context_overflow(status, text) else PolicyError
            raise error(f"{self.config.base_url}: HTTP {status} (not retried): {text}")
        return body

    def _parse(self, body: bytes, *, completions: bool) -> Completion:
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise ProtocolError(
                f"{self.config.base_url}: response is not JSON: {body[:200]!r}"
            ) from exc
        if completions:
            return parse_token_completion(data)
        return parse_chat_completion(data, token_ids=self.config.token_ids == "chat")

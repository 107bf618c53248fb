"""Inference failures said loudly: what failed, where, how often, and what to do.

atroposlib wraps every request in two nested tenacity ``@retry`` layers (3 x 3 attempts)
that retry *every* exception, and surfaces the result as ``RetryError[<Future ...>]``: no URL,
no status, an HTTP 400 (a prompt too long for the model) tried nine times. This module

* classifies a failure (:func:`is_transient`): connect failures, dropped connections, timeouts,
  HTTP 408/429/5xx are retried; another 4xx and an answer that is not a valid completion are
  not (retrying cannot fix them);
* replaces atroposlib's retry layers on each server of a ``ServerManager``
  (:func:`install_retry_policy`) with one loop that retries only transient failures, logs the
  first failure of a run at WARNING and ends in an :class:`InferenceError`;
* turns any inference exception, tenacity's ``RetryError`` included, into one line naming the
  URL, the HTTP status or exception and the attempt count (:func:`inference_error`), with the
  fix when there is an obvious one (a 404 on ``/generate``: the server is a stock
  OpenAI-compatible server, use ``--openai.server_type openai``);
* recognises a context overflow (HTTP 400 "maximum context length ...") as
  :class:`~structenv.ContextExhaustedError`, an outcome of the trajectory, not a failure.

:class:`InferenceFailedError` is what stops a run whose inference keeps failing
(``AgentEnvConfig.max_consecutive_inference_failures``).
"""

from __future__ import annotations

import asyncio
import http
import logging
import types
from collections.abc import Awaitable, Callable
from typing import Any

import tenacity
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from ..._exceptions import ContextExhaustedError, PolicyError, StructEnvError
from ..._main import unwrap_retry
from ...agent._openai import is_context_overflow

__all__ = [
    "InferenceError",
    "InferenceFailedError",
    "context_overflow",
    "inference_error",
    "install_retry_policy",
    "is_transient",
]

log = logging.getLogger("structenv.adapters.atropos")

#: HTTP statuses worth another attempt (the server may answer differently next time).
TRANSIENT_STATUSES = frozenset({408, 425, 429})

_GENERATE_HINT = (
    "this server has no /generate: use --openai.server_type openai, or --env.vllm_api auto "
    "for a stock vLLM server (exact tokens through /v1/completions)"
)


class InferenceError(PolicyError):
    """An inference request failed, after the attempts its kind allows.

    Attributes:
        url: The URL of the request (or the server's base URL when unknown).
        reason: The HTTP status and body excerpt, or the exception, of the last attempt.
        attempts: Attempts made (1 when the failure is not retried).
        retryable: Whether the failure was of a kind that is retried.
        status: The HTTP status of the last attempt, if there was an answer.
    """

    def __init__(
        self, url: str, reason: str, *, attempts: int, retryable: bool, status: int | None
    ) -> None:
        self.url = url
        self.reason = reason
        self.attempts = attempts
        self.retryable = retryable
        self.status = status
        tries = f"after {attempts} attempt{'s' if attempts != 1 else ''}"
        if not retryable:
            tries += ", not retried"
        message = f"{url}: {reason} ({tries})"
        if status == 404 and url.rstrip("/").endswith("/generate"):
            message += f"; {_GENERATE_HINT}"
        super().__init__(message)


class InferenceFailedError(StructEnvError):
    """The run stopped: inference failed for too many trajectories in a row.

    Attributes:
        failures: Consecutive trajectories that failed on inference.
        last: The last failure's one-line reason.
    """

    def __init__(self, failures: int, last: str) -> None:
        self.failures = failures
        self.last = last
        super().__init__(
            f"inference failed for {failures} trajectories in a row; stopping (last: {last}) "
            "(fix the endpoint, or raise --env.max_consecutive_inference_failures)"
        )


# --------------------------------------------------------------------------- classification


def http_status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries (``None`` for transport failures and for a
    2xx answer that could not be read)."""
    status = getattr(exc, "status_code", None)  # openai.APIStatusError
    if status is None:
        status = getattr(exc, "status", None)  # aiohttp.ClientResponseError
    if status is None:
        response = getattr(exc, "response", None)  # httpx.HTTPStatusError
        status = getattr(response, "status_code", None)
    if isinstance(status, int) and not isinstance(status, bool) and status >= 300:
        return status
    return None


def _is_transport(exc: BaseException) -> bool:
    import aiohttp
    import httpx
    import openai

    transport = (
        aiohttp.ClientConnectionError,
        aiohttp.ClientPayloadError,
        httpx.TransportError,
        openai.APIConnectionError,  # APITimeoutError included
        ConnectionError,
        asyncio.TimeoutError,
    )
    return isinstance(exc, transport)


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt could succeed: transport failures and HTTP 408/425/429/5xx.

    Everything else — another 4xx, a 2xx body that is not a valid completion, a bug — is
    final: retrying sends the same request for the same answer.
    """
    status = http_status(exc)
    if status is not None:
        return status in TRANSIENT_STATUSES or status >= 500
    return _is_transport(exc)


def _body_excerpt(exc: BaseException) -> str:
    body = getattr(exc, "body", None)  # openai.APIStatusError: the decoded JSON body
    if isinstance(body, dict):
        error = body.get("error", body)
        message = error.get("message") if isinstance(error, dict) else error
        if message:
            return str(message)
    if isinstance(body, str) and body:
        return body
    message = getattr(exc, "message", None)  # aiohttp: the reason phrase; openai: the text
    if message:
        return str(message)
    status = http_status(exc)
    if status is not None:  # aiohttp with an empty reason phrase: the standard one
        try:
            return http.HTTPStatus(status).phrase
        except ValueError:
            return "(no reason given)"
    return str(exc)


def _url_of(exc: BaseException) -> str | None:
    info = getattr(exc, "request_info", None)  # aiohttp
    url = getattr(info, "real_url", None) or getattr(info, "url", None)
    if url is None:
        request = getattr(exc, "request", None)  # openai / httpx
        try:
            url = getattr(request, "url", None)
        except RuntimeError:  # httpx raises when the error has no request
            url = None
    return str(url) if url is not None else None


def describe(exc: BaseException) -> str:
    """The status and body excerpt, or the exception type and message, on one line."""
    status = http_status(exc)
    if status is not None:
        text = f"HTTP {status}: {_body_excerpt(exc)}"
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= 400 else text[:400] + "..."


def context_overflow(exc: BaseException) -> bool:
    """The server refused the request because the prompt no longer fits the context."""
    return is_context_overflow(http_status(exc), _body_excerpt(exc))


def inference_error(
    exc: BaseException, *, url: str | None = None, attempts: int | None = None
) -> PolicyError:
    """``exc`` (an inference failure of any library, or a ``RetryError``) as one-line error.

    Returns an :class:`InferenceError`, a :class:`~structenv.ContextExhaustedError` for a
    context overflow, or ``exc`` itself if it already is one of these.
    """
    if isinstance(exc, InferenceError | ContextExhaustedError):
        return exc
    inner, counted = unwrap_retry(exc)
    if isinstance(inner, InferenceError | ContextExhaustedError):
        return inner
    where = _url_of(inner) or url or "the inference server"
    if context_overflow(inner):
        return ContextExhaustedError(f"{where}: {describe(inner)}")
    return InferenceError(
        where,
        describe(inner),
        attempts=attempts or counted or 1,
        retryable=is_transient(inner),
        status=http_status(inner),
    )


# --------------------------------------------------------------------------- atroposlib servers

#: atroposlib's inner retry layers (per request kind) and the endpoint each one calls.
_INNER = {
    "_chat_comp": "chat/completions",
    "_chat_eval": "chat/completions",
    "_comp": "completions",
    "_comp_eval": "completions",
    "_tokens_and_logprobs_comp": "generate",
    "_tokens_and_logprobs_comp_eval": "generate",
    "_logprobs": "generate",
    "_logprobs_eval": "generate",
}
#: atroposlib's outer retry layer around the inner ones: no retries of its own.
_OUTER = ("chat_completion",)


def _endpoint_url(server: Any, endpoint: str) -> str:
    base = str(getattr(getattr(server, "config", None), "base_url", None) or "").rstrip("/")
    if endpoint == "generate":
        return f"{base.removesuffix('/v1')}/generate"
    return f"{base}/{endpoint}"


class _FirstFailure:
    """Logs the first inference failure of a run at WARNING, later ones at DEBUG."""

    def __init__(self) -> None:
        self.logged = False

    def __call__(self, url: str, exc: BaseException, attempt: int, final: bool) -> None:
        level = logging.DEBUG if self.logged else logging.WARNING
        self.logged = True
        what = "giving up" if final else "retrying"
        log.log(level, "inference failed: %s: %s (attempt %d, %s)", url, describe(exc), attempt,
                what)  # fmt: skip


def install_retry_policy(
    server_manager: Any, *, max_attempts: int = 3, backoff_max: float = 10.0
) -> None:
    """Replace atroposlib's retry layers on every server of ``server_manager``.

    Each request is tried up to ``max_attempts`` times, only while its failure is transient
    (:func:`is_transient`), with random exponential backoff capped at ``backoff_max``
    seconds; then it raises :class:`InferenceError` (or ``ContextExhaustedError``). The
    first failure is logged at WARNING with its URL, status or exception, and attempt.
    Idempotent. Servers without atroposlib's tenacity layers are left alone.
    """
    servers = getattr(server_manager, "servers", None) or []
    report = _FirstFailure()
    for server in servers:
        if getattr(server, "_structenv_retry_policy", False):
            continue
        cls = type(server)
        for name, endpoint in _INNER.items():
            raw = getattr(getattr(cls, name, None), "__wrapped__", None)
            if raw is not None:
                setattr(server, name, types.MethodType(
                    _retrying(raw, _endpoint_url(server, endpoint), max_attempts, backoff_max,
                              report),
                    server,
                ))  # fmt: skip
        for name in _OUTER:
            raw = getattr(getattr(cls, name, None), "__wrapped__", None)
            if raw is not None:
                setattr(server, name, types.MethodType(raw, server))
        openai_client = getattr(server, "openai", None)
        if openai_client is not None and hasattr(openai_client, "with_options"):
            server.openai = openai_client.with_options(max_retries=0)  # our loop retries
        server._structenv_retry_policy = True


def _retrying(
    raw: Callable[..., Awaitable[Any]],
    url: str,
    max_attempts: int,
    backoff_max: float,
    report: _FirstFailure,
) -> Callable[..., Awaitable[Any]]:
    async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        attempt = 0

        def before_sleep(state: tenacity.RetryCallState) -> None:
            failure = state.outcome.exception() if state.outcome is not None else None
            if failure is not None:
                report(_url_of(failure) or url, failure, state.attempt_number, False)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(max_attempts),
            wait=wait_random_exponential(multiplier=min(1.0, backoff_max), max=backoff_max),
            retry=retry_if_exception(is_transient),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            async for state in retrying:
                with state:
                    attempt = state.retry_state.attempt_number
                    return await raw(self, *args, **kwargs)
        except Exception as exc:
            report(_url_of(exc) or url, exc, attempt, True)
            raise inference_error(exc, url=url, attempts=attempt) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    return method

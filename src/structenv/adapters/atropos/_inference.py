"""How an :class:`~structenv.adapters.atropos.AgentEnv` talks to its inference server.

Decided once at start-up (``AgentEnvConfig.vllm_api``), for ``server_type="vllm"`` servers:

* ``"generate"``: atroposlib's ``ManagedServer`` over the native ``/generate`` endpoint (the
  atroposlib vLLM server script, SGLang). Exact tokens and logprobs.
* ``"completions"``: the stock vLLM OpenAI server. The prompt is rendered locally with the
  env's tokenizer and sent as token ids to ``/v1/completions``
  (:class:`~structenv.agent.TrackedPolicy`). Exact tokens and logprobs, multi-turn.
* ``"chat"``: the stock vLLM OpenAI server, the server rendering the prompt
  (``return_token_ids``). Exact per turn; a re-tokenized prompt that no longer extends the
  sequence starts a new one.
* ``"auto"`` (default): ``GET /generate``; a 404 means a stock vLLM server, so
  ``"completions"``, anything else ``"generate"``.

With a token-id route the tokenizer is checked once: a probe conversation rendered and
tokenized locally must give the same ids as the server's ``/tokenize``. A mismatch (a tiny test
tokenizer paired with a real model, another model's tokenizer) is a :class:`ConfigError`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import anyio
import httpx

from ..._exceptions import ConfigError, PolicyError
from ...agent import Completion, OpenAIPolicy, OpenAIPolicyConfig
from ...agent._tokens import PromptRenderer, TrackedPolicy
from .._sequence import TokenSequence

__all__ = [
    "OpenAITrajectoryPolicy",
    "TrajectoryPolicy",
    "VllmApi",
    "check_tokenizer",
    "choose_vllm_api",
    "open_token_policies",
    "server_model",
]

log = logging.getLogger("structenv.adapters.atropos")

VllmApi = Literal["auto", "generate", "completions", "chat"]

#: The probe conversation of the tokenizer check: roles, a tool tag, non-ASCII text.
_PROBE = [
    {"role": "system", "content": "You are a probe. <tool_call> 1+1 </tool_call>"},
    {"role": "user", "content": "Grüße, 世界! What is 2 + 2?"},
]
_PROBE_TIMEOUT = httpx.Timeout(30.0, connect=10.0)


class TrajectoryPolicy(Protocol):
    """The policy of one trajectory: a :class:`~structenv.agent.Policy` with its tokens."""

    tracks_tokens: bool

    async def complete(
        self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]]
    ) -> Completion:
        """The next assistant turn (see :class:`~structenv.agent.Policy`)."""
        ...

    def sequence(self) -> TokenSequence | None:
        """The trajectory's exact tokens so far, ``None`` when not tracked."""
        ...


class OpenAITrajectoryPolicy:
    """One trajectory over a shared token-tracking :class:`~structenv.agent.OpenAIPolicy`.

    Attributes:
        tracks_tokens: Always true: completions carry the server's tokens and logprobs.
    """

    def __init__(self, policy: OpenAIPolicy) -> None:
        self._tracked: TrackedPolicy = policy.track()
        self.tracks_tokens = True

    @property
    def branched(self) -> bool:
        """The sequence restarted at some turn (see :class:`~structenv.agent.TrackedPolicy`)."""
        return self._tracked.branched

    async def complete(
        self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]]
    ) -> Completion:
        """The next assistant turn (tools are already in the Hermes system prompt).

        Raises:
            PolicyError, ProtocolError, TimeoutError: As :meth:`OpenAIPolicy.complete`.

        Cancellation: the request is abandoned; the tracked sequence is as before.
        """
        return await self._tracked.complete(messages, tools=tools)

    def sequence(self) -> TokenSequence | None:
        """The tracked tokens, masks and logprobs (``"managed"``: exactly as sampled)."""
        tracked = self._tracked.sequence()
        if tracked is None:
            return None
        tokens, masks, logprobs = tracked
        return TokenSequence(tokens, masks, logprobs, "managed")


def _root(base_url: str) -> str:
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def choose_vllm_api(
    base_url: str, *, api_key: str | None = None, wait: float = 60.0
) -> VllmApi:
    """``"completions"`` if the server has no ``/generate`` (a 404), else ``"generate"``.

    A ``GET`` generates nothing: a server with the endpoint answers 405 (POST only) or 422.
    A server that refuses connections is asked again every second for ``wait`` seconds (an
    env may start before its inference server is up).

    Raises:
        PolicyError: The server cannot be reached within ``wait`` seconds.

    Cancellation: the probe is abandoned; nothing changes.
    """
    url = f"{_root(base_url)}/generate"
    deadline = anyio.current_time() + wait
    async with httpx.AsyncClient(timeout=_PROBE_TIMEOUT, headers=_headers(api_key)) as client:
        while True:
            try:
                response = await client.get(url)
                break
            except httpx.ConnectError as exc:
                if anyio.current_time() >= deadline:
                    raise PolicyError(
                        f"probing {url}: {type(exc).__name__}: {exc} (for {wait:g}s)"
                    ) from exc
                await anyio.sleep(1.0)
            except httpx.HTTPError as exc:
                raise PolicyError(f"probing {url}: {type(exc).__name__}: {exc}") from exc
    return "completions" if response.status_code == 404 else "generate"


async def server_model(
    base_url: str, model: str | None, *, api_key: str | None = None
) -> dict[str, Any] | None:
    """The ``/v1/models`` entry of ``model`` (the only one when ``model`` is ``None``).

    vLLM's entry carries ``root`` (where the model, and so its tokenizer, was loaded from) and
    ``max_model_len``. ``None`` when the server has no such entry or no model list.

    Cancellation: the request is abandoned; nothing changes.
    """
    url = f"{base_url.rstrip('/')}/models"
    async with httpx.AsyncClient(timeout=_PROBE_TIMEOUT, headers=_headers(api_key)) as client:
        try:
            response = await client.get(url)
            data = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return None
    entries = [e for e in entries if isinstance(e, dict)]
    if model is None:
        return entries[0] if len(entries) == 1 else None
    return next((e for e in entries if e.get("id") == model), None)


async def check_tokenizer(
    base_url: str, model: str, tokenizer: Any, *, api_key: str | None = None
) -> None:
    """Compare a probe conversation's token ids, local against the server's ``/tokenize``.

    Raises:
        ConfigError: They differ: the env's tokenizer is not the server model's.

    Cancellation: the request is abandoned; nothing changes.
    """
    renderer = PromptRenderer(tokenizer)
    local = renderer.encode(renderer.render(_PROBE, generation=True))
    url = f"{_root(base_url)}/tokenize"
    body = {"model": model, "messages": _PROBE, "add_generation_prompt": True}
    async with httpx.AsyncClient(timeout=_PROBE_TIMEOUT, headers=_headers(api_key)) as client:
        try:
            response = await client.post(url, json=body)
        except httpx.HTTPError as exc:
            raise PolicyError(f"POST {url}: {type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        log.warning(
            "cannot check the tokenizer against %s (HTTP %d): assuming it matches",
            url,
            response.status_code,
        )
        return
    remote = response.json().get("tokens")
    if remote != local:
        at = next(
            (i for i, (a, b) in enumerate(zip(local, remote or [], strict=False)) if a != b),
            min(len(local), len(remote or [])),
        )
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise ConfigError(
            f"tokenizer {name!r} does not match the server's model {model!r} at {base_url}: a "
            f"probe prompt's token ids differ at position {at} ({len(local)} local, "
            f"{len(remote or [])} on the server); use the model's tokenizer (vLLM's "
            f"/v1/models 'root' names where it was loaded from)"
        )


async def open_token_policies(
    servers: Sequence[Any],
    *,
    api: VllmApi,
    tokenizer: Any,
    temperature: float,
    max_tokens: int | None,
) -> list[OpenAIPolicy]:
    """Entered token-tracking policies, one per server, or ``[]`` for atroposlib's route.

    ``servers`` are atroposlib ``APIServerConfig``-like objects; only ``server_type="vllm"``
    ones are considered. The caller closes the policies (``aclose``).

    Raises:
        ConfigError: The tokenizer does not match a server's model.
        PolicyError: A server cannot be reached for the probes.

    Cancellation: policies opened so far are closed; nothing is left open.
    """
    vllm = [s for s in servers if getattr(s, "server_type", None) == "vllm"]
    if not vllm or len(vllm) != len(servers) or api == "generate":
        return []
    policies: list[OpenAIPolicy] = []
    try:
        for server in vllm:
            base_url = str(server.base_url)
            key = server.api_key or None
            chosen = api if api != "auto" else await choose_vllm_api(base_url, api_key=key)
            if chosen == "generate":
                for policy in policies:
                    await policy.aclose()
                return []
            entry = await server_model(base_url, server.model_name, api_key=key) or {}
            context = entry.get("max_model_len")
            await check_tokenizer(base_url, server.model_name, tokenizer, api_key=key)
            timeout = float(getattr(server, "timeout", 0) or 0) or None
            config = OpenAIPolicyConfig(
                base_url=base_url,
                api_key=key,
                model=server.model_name,
                temperature=temperature,
                max_tokens=max_tokens,
                context_length=context if isinstance(context, int) and context > 0 else None,
                token_ids=chosen,
                native_tools=False,
                request_deadline=None,
                read_timeout=timeout,
            )
            if config.max_tokens is None and config.context_length is None:
                config = config.model_copy(update={"max_tokens": 1024})
            policy = OpenAIPolicy(config, tokenizer=tokenizer)
            await policy.__aenter__()
            policies.append(policy)
            log.info("%s: stock vLLM OpenAI API, exact tokens through /v1/%s", base_url, chosen)
    except BaseException:
        for policy in policies:
            await policy.aclose()
        raise
    return policies

"""The atroposlib policy adapter: the agent loop's :class:`Policy` over a BaseEnv's servers.

Part of :mod:`structenv.adapters.atropos` (atroposlib is asyncio-only). With a
token-tracking server (``server_type`` ``"vllm"`` or ``"sglang"``, or any server class that
is not atroposlib's ``OpenAIServer``) every turn goes through ``ServerManager.managed_server()``:
the ``ManagedServer`` keeps one node per trajectory across turns whose tokens are exactly what
the server saw and produced, assistant tokens unmasked with their real logprobs and
prompt/tool tokens masked. With a plain OpenAI-compatible server atroposlib can only offer
placeholder tokens (``DummyManagedServer``), so the adapter does not use it: it calls
``chat_completion`` and says so (``tracks_tokens`` false, completions without tokens or
logprobs); the environment then re-tokenizes the messages and ships no logprobs.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from ..._exceptions import ProtocolError
from ...agent import Completion
from .._sequence import MASK, TokenSequence
from ._errors import inference_error

__all__ = ["AtroposPolicy", "open_atropos_policy", "server_tracks_tokens"]

log = logging.getLogger("structenv.adapters.atropos")


def server_tracks_tokens(server_manager: Any) -> bool:
    """Whether ``managed_server()`` of this ServerManager yields real tokens and logprobs."""
    from atroposlib.envs.server_handling.openai_server import OpenAIServer

    servers = getattr(server_manager, "servers", None) or []
    return bool(servers) and not any(isinstance(s, OpenAIServer) for s in servers)


class AtroposPolicy:
    """One trajectory's policy over an atroposlib ``ServerManager``.

    Get one from :func:`open_atropos_policy`; it is bound to a single trajectory because the
    managed server tracks one conversation. Not usable under Trio.

    Attributes:
        tracks_tokens: Completions carry the server's real token ids and logprobs.
        branched: The conversation stopped extending the tracked sequence (the chat
            template re-rendered an earlier turn differently); the last node then holds
            only the turns since the branch unmasked. Logged when it happens.
    """

    def __init__(
        self,
        *,
        managed: Any | None,
        server_manager: Any,
        sampling: Mapping[str, Any],
    ) -> None:
        self._managed = managed
        self._server_manager = server_manager
        self._sampling = dict(sampling)
        self._node: Any | None = None
        self.tracks_tokens = managed is not None
        self.branched = False
        servers = getattr(server_manager, "servers", None) or []
        base = getattr(getattr(servers[0], "config", None), "base_url", None) if servers else None
        self._url = str(base) if base else None

    async def complete(
        self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]]
    ) -> Completion:
        """Produce the next assistant turn (tools are already in the Hermes system prompt).

        Raises:
            InferenceError: The server failed (after retries, for transient failures).
            ContextExhaustedError: The server refused the prompt as too long.
            ProtocolError: The server's answer holds no usable choice.

        Cancellation: the request is abandoned; the tracked sequence is left as it was
        before this turn.
        """
        del tools  # rendered into the system prompt by the agent loop (Hermes format)
        payload = [dict(m) for m in messages]
        target = self._managed if self._managed is not None else self._server_manager
        before = [] if self._managed is None else list(self._managed.current_nodes)
        try:
            response = await target.chat_completion(messages=payload, n=1, **self._sampling)
        except TimeoutError:
            raise
        except Exception as exc:  # atroposlib surfaces aiohttp/openai/tenacity errors
            # One line naming the URL, the status or exception and the attempts (never a bare
            # RetryError); a context overflow becomes ContextExhaustedError.
            raise inference_error(exc, url=self._url) from exc
        choices = getattr(response, "choices", None) or []
        if not choices:
            raise ProtocolError("the inference server returned no choices")
        choice = choices[0]
        text = choice.message.content or ""
        finish = choice.finish_reason if isinstance(choice.finish_reason, str) else None
        if self._managed is None:
            return Completion(text=text, finish_reason=finish)
        return self._tracked_completion(text, finish, before)

    def _tracked_completion(self, text: str, finish: str | None, before: list[Any]) -> Completion:
        assert self._managed is not None
        nodes = list(self._managed.current_nodes)
        new = [n for n in nodes if not any(n is b for b in before)]
        if not new:
            raise ProtocolError("the managed server tracked no sequence for this turn")
        node = new[-1]
        if len(nodes) > 1 and not self.branched:
            self.branched = True
            log.warning(
                "conversation no longer extends its tracked sequence (%d nodes): earlier "
                "turns are left out of the trained tokens",
                len(nodes),
            )
        self._node = node
        masks: list[int] = node.masked_tokens
        out = 0
        for m in reversed(masks):
            if m == MASK:
                break
            out += 1
        tokens = list(node.tokens)
        logprobs = [float(x) for x in node.logprobs[len(tokens) - out :]]
        real = out > 0 and all(lp <= 0.0 for lp in logprobs)
        if not real and out:
            log.warning("the server returned no logprobs for a turn: none are reported")
        return Completion(
            text=text,
            finish_reason=finish,
            prompt_tokens=tokens[: len(tokens) - out],
            completion_tokens=tokens[len(tokens) - out :],
            completion_logprobs=logprobs if real else None,
            logprobs_available=real,
        )

    def sequence(self) -> TokenSequence | None:
        """The trajectory's tracked tokens so far (``None`` before the first completion or
        when the server does not track tokens)."""
        node = self._node
        if node is None:
            return None
        logprobs = [float(x) for x in node.logprobs]
        trained = [lp for lp, m in zip(logprobs, node.masked_tokens, strict=True) if m != MASK]
        real = bool(trained) and all(lp <= 0.0 for lp in trained)
        return TokenSequence(
            list(node.tokens), list(node.masked_tokens), logprobs if real else None, "managed"
        )


@asynccontextmanager
async def open_atropos_policy(
    server_manager: Any,
    *,
    tokenizer: Any,
    temperature: float | None = None,
    max_tokens: int | None = None,
) -> AsyncIterator[AtroposPolicy]:
    """A policy for one trajectory, tracking its tokens while the block runs.

    Args:
        server_manager: The env's ``ServerManager`` (``BaseEnv.server``).
        tokenizer: The tokenizer the server's tokens belong to (``BaseEnv.tokenizer``).
        temperature: Sampling temperature (``None``: the server's default).
        max_tokens: Completion length cap per turn (``None``: the server's default).

    Cancellation: the managed server's tracking state is reset; the last sequence read
    through :meth:`AtroposPolicy.sequence` stays valid.
    """
    sampling: dict[str, Any] = {}
    if temperature is not None:
        sampling["temperature"] = temperature
    if max_tokens is not None:
        sampling["max_tokens"] = max_tokens
    if not server_tracks_tokens(server_manager):
        yield AtroposPolicy(managed=None, server_manager=server_manager, sampling=sampling)
        return
    async with server_manager.managed_server(tokenizer=tokenizer) as managed:
        yield AtroposPolicy(managed=managed, server_manager=server_manager, sampling=sampling)

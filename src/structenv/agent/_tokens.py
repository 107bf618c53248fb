"""Exact token tracking against a stock OpenAI-compatible server (vLLM's, SGLang's).

A trainer needs, per trajectory, one sequence: every token the model saw and produced, the
assistant's sampled tokens unmasked with the logprobs they were sampled with, everything else
(system prompt, user turns, tool responses, role headers) masked. atroposlib's
``ManagedServer`` builds it from vLLM's native ``/generate`` endpoint, which stock vLLM does not
have. This module builds the same sequence from the OpenAI API that every vLLM serves.

:class:`TokenTracker` keeps one trajectory's sequence. In ``"completions"`` mode (the default
of the Atropos env, see ``docs/design.md`` for why) it renders the prompt *locally* with the
model's chat template and sends it as token ids to ``/v1/completions``: the model then sees
exactly the tracked tokens, its earlier answers included, so nothing is ever re-tokenized and
the sequence is always one unbroken prefix-extension, turn after turn. Only the text the
template adds between turns (the end of an assistant turn, tool responses, the next
generation prompt) is tokenized, and it is masked.

In ``"chat"`` mode the server renders the conversation (``return_token_ids``): each turn's
tokens and logprobs are exact, but the next prompt is the server re-tokenizing the messages,
which need not reproduce the sampled tokens (a non-canonical tokenization, a template that
re-renders a turn); when a prompt no longer extends the tracked sequence the tracker starts a
new one from it, like ``ManagedServer``'s branching, and says so (``branched``).

Nothing here does I/O; :class:`~structenv.agent.OpenAIPolicy` sends the requests.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._policy import Completion
from ._wire import parse_token_completion as parse_token_completion

if TYPE_CHECKING:
    from ._openai import OpenAIPolicy

__all__ = [
    "MASK",
    "MASKED_LOGPROB",
    "PromptRenderer",
    "TokenTracker",
    "TrackedPolicy",
    "TrackedTurn",
    "parse_token_completion",
]

log = logging.getLogger("structenv.agent")

#: Mask value of positions that are not trained on (atroposlib's convention).
MASK = -100
#: Logprob on masked positions (atroposlib's convention).
MASKED_LOGPROB = 1.0


class PromptRenderer:
    """A Hugging Face tokenizer's chat template and codec, as the tracker needs them.

    Args:
        tokenizer: A ``transformers`` tokenizer (anything with ``apply_chat_template``,
            ``encode`` and ``decode``), the one the server's model uses.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] = (),
        generation: bool,
    ) -> str:
        """The conversation as the template renders it (``generation``: with the header of
        the next assistant turn)."""
        kwargs: dict[str, Any] = {"tools": [dict(t) for t in tools]} if tools else {}
        text = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages],
            tokenize=False,
            add_generation_prompt=generation,
            **kwargs,
        )
        if not isinstance(text, str):  # pragma: no cover - a template that returns ids
            raise TypeError("apply_chat_template(tokenize=False) did not return text")
        return text

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens added (the template writes them)."""
        if not text:
            return []
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens kept (as they appear in a rendered prompt)."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    @property
    def eos_text(self) -> str | None:
        """The end-of-turn token's text, if the tokenizer names one."""
        eos = getattr(self.tokenizer, "eos_token", None)
        return eos if isinstance(eos, str) and eos else None


@dataclasses.dataclass(frozen=True, slots=True)
class TrackedTurn:
    """The prompt of one turn, computed without changing the tracker (see
    :meth:`TokenTracker.prepare`).

    Attributes:
        prompt_tokens: Every token the model is to see: the tracked sequence plus ``added``.
        added: The masked tokens this turn appends before the completion.
        rendered: The template's text of the conversation through the generation prompt.
        messages: How many messages the prompt holds.
        branch: The conversation no longer extends the tracked text: the sequence restarts.
    """

    prompt_tokens: list[int]
    added: list[int]
    rendered: str
    messages: int
    branch: bool


class TokenTracker:
    """One trajectory's aligned token sequence across turns.

    Use :meth:`prepare` for the next prompt (pure: a cancelled request leaves the tracker
    untouched), then :meth:`commit` the completion. :attr:`tokens`, :attr:`masks` and
    :attr:`logprobs` are the sequence: masks hold the token id on trained (assistant)
    positions and :data:`MASK` elsewhere; logprobs hold the sampled logprob on trained
    positions and :data:`MASKED_LOGPROB` elsewhere.

    Attributes:
        branched: A turn's prompt did not extend the tracked sequence and a new sequence was
            started from it; earlier turns are no longer part of the trained tokens.
        logprobs_available: Every trained token has a real logprob from the server.
    """

    def __init__(self, renderer: PromptRenderer) -> None:
        self.renderer = renderer
        self.tokens: list[int] = []
        self.masks: list[int] = []
        self.logprobs: list[float] = []
        self.branched = False
        self.logprobs_available = True
        self._rendered = ""  # template text of what the tracked tokens stand for
        self._pending = ""  # text closing the last assistant turn, not yet tokenized

    @property
    def turns(self) -> int:
        """Trained (assistant) positions so far; 0 before the first completion."""
        return sum(m != MASK for m in self.masks)

    def prepare(
        self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]] = ()
    ) -> TrackedTurn:
        """The prompt tokens of the next turn (``"completions"`` mode); changes nothing.

        The template renders the whole conversation; the part beyond what is tracked (tool
        responses, the next generation prompt) is tokenized and appended masked. If the
        rendering does not extend the tracked text (a template that re-renders earlier turns)
        the sequence restarts from the full rendering, masked, and ``branch`` says so.
        """
        rendered = self.renderer.render(messages, tools=tools, generation=True)
        if self.tokens and rendered.startswith(self._rendered):
            added = self.renderer.encode(self._pending + rendered[len(self._rendered) :])
            return TrackedTurn([*self.tokens, *added], added, rendered, len(messages), False)
        added = self.renderer.encode(rendered)
        return TrackedTurn(list(added), added, rendered, len(messages), bool(self.tokens))

    def commit(
        self,
        turn: TrackedTurn,
        messages: Sequence[Mapping[str, Any]],
        completion: Completion,
        *,
        tools: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """Append a turn prepared with :meth:`prepare` and its completion.

        Raises:
            ValueError: The completion carries no token ids.
        """
        ids = completion.completion_tokens
        if ids is None:
            raise ValueError("a tracked completion needs its token ids")
        if turn.branch:
            self._restart()
        self._append(turn.added)
        self._append_sampled(ids, completion.completion_logprobs)
        # What the template writes for this assistant turn, after the generation prompt; the
        # sampled text is a prefix of it when the template renders content verbatim, and the
        # rest (e.g. "\n" after the end-of-turn token) closes the turn in the next prompt.
        assistant = {"role": "assistant", "content": completion.text}
        full = self.renderer.render(
            [*messages[: turn.messages], assistant], tools=tools, generation=False
        )
        self._pending = _closing_text(
            full[len(turn.rendered) :] if full.startswith(turn.rendered) else "",
            self.renderer.decode(ids),
            self.renderer.eos_text,
        )
        self._rendered = full if full.startswith(turn.rendered) else turn.rendered

    def commit_server(self, completion: Completion) -> None:
        """Append a turn whose prompt the server rendered (``"chat"`` mode).

        The server's prompt tokens must extend the tracked sequence; if they do not (the
        server re-tokenized an earlier answer differently), a new sequence starts from them
        and :attr:`branched` is set.

        Raises:
            ValueError: The completion carries no prompt or completion token ids.
        """
        prompt, ids = completion.prompt_tokens, completion.completion_tokens
        if prompt is None or ids is None:
            raise ValueError("a tracked completion needs its prompt and completion token ids")
        if self.tokens and prompt[: len(self.tokens)] != self.tokens:
            at = next(
                (i for i, (a, b) in enumerate(zip(prompt, self.tokens, strict=False)) if a != b),
                min(len(prompt), len(self.tokens)),
            )
            log.warning(
                "the server's prompt no longer extends the tracked tokens (first difference at "
                "token %d of %d): a new sequence starts here; earlier turns are left out",
                at,
                len(self.tokens),
            )
            self._restart()
        self._append(prompt[len(self.tokens) :])
        self._append_sampled(ids, completion.completion_logprobs)

    def _restart(self) -> None:
        self.tokens, self.masks, self.logprobs = [], [], []
        self.logprobs_available = True
        self.branched = True
        self._rendered = self._pending = ""

    def _append(self, ids: Sequence[int]) -> None:
        self.tokens += ids
        self.masks += [MASK] * len(ids)
        self.logprobs += [MASKED_LOGPROB] * len(ids)

    def _append_sampled(self, ids: Sequence[int], logprobs: Sequence[float] | None) -> None:
        self.tokens += ids
        self.masks += ids
        if logprobs is None:
            self.logprobs_available = False  # sequence() then reports no logprobs at all
            self.logprobs += [0.0] * len(ids)
        else:
            self.logprobs += [float(x) for x in logprobs]

    def sequence(self) -> tuple[list[int], list[int], list[float] | None] | None:
        """``(tokens, masks, logprobs)`` so far; logprobs ``None`` unless all are real;
        ``None`` before the first completion."""
        if not self.turns:
            return None
        logprobs = list(self.logprobs) if self.logprobs_available else None
        return list(self.tokens), list(self.masks), logprobs


def _closing_text(template_part: str, sampled: str, eos: str | None) -> str:
    """The text that closes an assistant turn after its sampled tokens.

    ``template_part`` is the template's rendering of the turn (after the generation prompt),
    ``sampled`` the decoded sampled tokens. If the sampled text is a prefix, the rest closes
    the turn. Otherwise (a template that rewrites content) the closing is what follows the
    template's end-of-turn token, plus the token itself when the model did not emit it.
    """
    if template_part.startswith(sampled):
        return template_part[len(sampled) :]
    if eos is None or eos not in template_part:
        return ""
    tail = template_part[template_part.rindex(eos) :]
    return tail[len(eos) :] if sampled.endswith(eos) else tail


class TrackedPolicy:
    """One trajectory's :class:`~structenv.agent.Policy` keeping its exact token sequence.

    Get one from :meth:`OpenAIPolicy.track` (the HTTP client is shared; the sequence is per
    trajectory). With ``token_ids="completions"`` every prompt is the tracked sequence plus the
    masked text the template adds; with ``"chat"`` the server's prompt ids are checked against
    it; with ``"none"`` there are no tokens and :meth:`sequence` is ``None``.
    """

    def __init__(self, policy: OpenAIPolicy) -> None:
        self.policy = policy
        mode = policy.config.token_ids
        self.tracker = (
            TokenTracker(policy.renderer or PromptRenderer(None)) if mode != "none" else None
        )
        self.tracks_tokens = self.tracker is not None

    @property
    def branched(self) -> bool:
        """The sequence restarted at some turn (see :attr:`TokenTracker.branched`)."""
        return self.tracker is not None and self.tracker.branched

    async def complete(
        self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping[str, Any]]
    ) -> Completion:
        """The next assistant turn; its tokens join the tracked sequence.

        Raises:
            PolicyError, ProtocolError, TimeoutError: As :meth:`OpenAIPolicy.complete`.

        Cancellation: the request is abandoned; the tracked sequence is as before the call.
        """
        tracker = self.tracker
        mode = self.policy.config.token_ids
        if tracker is None or mode == "chat":
            completion = await self.policy.complete(messages, tools=tools)
            if tracker is not None:
                tracker.commit_server(completion)
            return completion
        specs = tools if self.policy.config.native_tools else ()
        turn = tracker.prepare(messages, tools=specs)
        if turn.branch:
            log.warning(
                "the chat template re-rendered an earlier turn: a new sequence starts here; "
                "earlier turns are left out of the trained tokens"
            )
        completion = await self.policy.complete_tokens(turn.prompt_tokens)
        tracker.commit(turn, messages, completion, tools=specs)
        return completion

    def sequence(self) -> tuple[list[int], list[int], list[float] | None] | None:
        """``(tokens, masks, logprobs)`` so far (see :meth:`TokenTracker.sequence`)."""
        return self.tracker.sequence() if self.tracker is not None else None

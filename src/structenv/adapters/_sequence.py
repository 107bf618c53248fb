"""Token sequences of trajectories and their assembly into Atropos scored groups.

Nothing here imports atroposlib: a scored group is a plain dict with the keys of atroposlib's
``ScoredDataGroup`` TypedDict. The rules it enforces are the ones trainers silently depend on:

* exactly ``group_size`` sequences, or no group at all;
* never an empty token sequence, and tokens, masks and logprobs of equal length;
* logprobs are real or absent: ``inference_logprobs`` is set only when every member has real
  ones (1.0 on masked positions, atroposlib's convention), never filled with placeholders;
* ``messages`` are plain JSON dicts; ``group_overrides`` is a dict or absent (never ``None``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

__all__ = ["MASK", "MemberOutcome", "TokenSequence", "build_scored_group", "retokenize_messages"]

log = logging.getLogger("structenv.adapters")

#: Mask value of positions that are not trained on (prompt, tool responses).
MASK = -100
#: Logprob placeholder atroposlib expects on masked positions.
MASKED_LOGPROB = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class TokenSequence:
    """One trajectory as a trainer sees it.

    Attributes:
        tokens: Every token id of the conversation, prompt included.
        masks: ``tokens`` with :data:`MASK` on positions not trained on.
        logprobs: The sampling logprob of each unmasked token and 1.0 on masked ones, or
            ``None`` when the server did not report real logprobs.
        source: ``"managed"`` (tokens exactly as the inference server saw and produced them)
            or ``"retokenized"`` (rebuilt from the messages with the tokenizer's chat template,
            for servers that do not expose tokens).
    """

    tokens: list[int]
    masks: list[int]
    logprobs: list[float] | None
    source: Literal["managed", "retokenized"]

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ValueError("a token sequence must not be empty")
        if len(self.masks) != len(self.tokens):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.masks)} masks")
        if self.logprobs is not None and len(self.logprobs) != len(self.tokens):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.logprobs)} logprobs")

    @property
    def trained_tokens(self) -> int:
        """Positions that are not masked."""
        return sum(m != MASK for m in self.masks)

    def masked(self) -> TokenSequence:
        """The same tokens with every position masked (a failed trajectory: no gradient).

        Its logprobs are all 1.0, atroposlib's marker of a masked position: with nothing
        trained there is nothing to fabricate, so a masked member never removes the group's
        ``inference_logprobs``.
        """
        n = len(self.tokens)
        return TokenSequence(list(self.tokens), [MASK] * n, [MASKED_LOGPROB] * n, self.source)


def _render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *, generation: bool) -> str:
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=generation
    )
    if not isinstance(text, str):  # pragma: no cover - a template that returns ids
        raise TypeError("apply_chat_template(tokenize=False) did not return text")
    return text


def _encode(tokenizer: Any, text: str) -> list[int]:
    return [int(t) for t in tokenizer.encode(text, add_special_tokens=False)] if text else []


def retokenize_messages(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> TokenSequence:
    """Tokenize a conversation with the chat template; assistant turns unmasked.

    Each assistant turn is the difference between the conversation rendered up to it with a
    generation prompt and rendered including it, so the role header stays masked and the
    turn's own end-of-turn token is trained. Used when the inference server does not expose
    token ids (an OpenAI-compatible endpoint) and for trajectories that failed before their
    first completion. Never carries logprobs.

    Raises:
        ValueError: The conversation renders to no tokens, or the template does not render
            conversations as prefixes of their extensions.
    """
    tokens: list[int] = []
    masks: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            head = _render(tokenizer, messages[:i], generation=True)
            if not head.startswith(rendered):
                raise ValueError("the chat template does not render prefixes consistently")
            ids = _encode(tokenizer, head[len(rendered) :])
            tokens += ids
            masks += [MASK] * len(ids)
            rendered = head
            full = _render(tokenizer, messages[: i + 1], generation=False)
            if not full.startswith(rendered):
                raise ValueError("the chat template does not render prefixes consistently")
            ids = _encode(tokenizer, full[len(rendered) :])
            tokens += ids
            masks += ids
            rendered = full
        else:
            full = _render(tokenizer, messages[: i + 1], generation=False)
            if not full.startswith(rendered):
                raise ValueError("the chat template does not render prefixes consistently")
            ids = _encode(tokenizer, full[len(rendered) :])
            tokens += ids
            masks += [MASK] * len(ids)
            rendered = full
    return TokenSequence(tokens, masks, None, "retokenized")


@dataclasses.dataclass(frozen=True, slots=True)
class MemberOutcome:
    """What one member of a group contributes.

    Attributes:
        sequence: Its tokens (real ones, also for a failed member).
        score: Its score (ignored for a failed member, which gets the failure score).
        messages: The conversation as plain JSON chat messages.
        failed: The trajectory failed (deadline, infrastructure, policy endpoint) rather than
            producing a scoreable result.
        error: Why it failed.
    """

    sequence: TokenSequence
    score: float
    messages: list[dict[str, Any]]
    failed: bool = False
    error: str | None = None


def _plain(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(json.dumps([dict(m) for m in messages], default=str))
    for message in out:
        if message.get("content") is None:
            message["content"] = ""
    return out


def build_scored_group(
    members: Sequence[MemberOutcome],
    *,
    group_size: int,
    failure_policy: Literal["mask", "drop_group"],
    failure_score: float = 0.0,
    include_messages: bool = True,
) -> dict[str, Any] | None:
    """Assemble a ``ScoredDataGroup`` dict, or ``None`` to drop the group.

    A failed member is kept fully masked with ``failure_score`` (``"mask"``) or drops the
    whole group (``"drop_group"``). ``inference_logprobs`` is present only if every member has
    real logprobs.

    Raises:
        ValueError: ``members`` does not hold exactly ``group_size`` outcomes.
    """
    if len(members) != group_size:
        raise ValueError(f"expected {group_size} members, got {len(members)}")
    failed = [m for m in members if m.failed]
    if failed and failure_policy == "drop_group":
        log.info("dropping group: %d of %d members failed", len(failed), group_size)
        return None
    sequences = [m.sequence.masked() if m.failed else m.sequence for m in members]
    group: dict[str, Any] = {
        "tokens": [s.tokens for s in sequences],
        "masks": [s.masks for s in sequences],
        "scores": [failure_score if m.failed else float(m.score) for m in members],
        # A dict, never None: atroposlib reads group_overrides.get(...) before defaulting it.
        "group_overrides": {},
    }
    logprobs = [s.logprobs for s in sequences]
    if all(lp is not None for lp in logprobs):
        group["inference_logprobs"] = logprobs
    elif any(lp is not None for lp in logprobs):
        log.warning("some members have no real logprobs: inference_logprobs left out")
    if include_messages:
        group["messages"] = [_plain(m.messages) for m in members]
    return group

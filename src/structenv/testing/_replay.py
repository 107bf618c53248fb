"""Scripted replies for the policy server: reference solutions replayed with seeded mistakes.

A :data:`Script` maps the conversation so far to the next assistant text. A
:class:`ReplayScript` finds the task by its :func:`task_marker` and replays the task's
reference solution (a list of :class:`ReplayStep`), making seeded mistakes so that scores
vary between the members of a group.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..agent._parsing import parse_hermes

__all__ = ["ReplayScript", "ReplayStep", "Script", "task_marker"]

#: A script maps the conversation so far (plain chat messages) to the next assistant text.
Script = Callable[[Sequence[Mapping[str, Any]]], str]

_MARKER = re.compile(r"\[task:([A-Za-z0-9_.:/-]+)\]")


def task_marker(task_id: str) -> str:
    """The marker a prompt carries so :class:`ReplayScript` finds the task (``[task:<id>]``)."""
    if not _MARKER.fullmatch(f"[task:{task_id}]"):
        raise ValueError(f"task id {task_id!r} may only use letters, digits and _.:/-")
    return f"[task:{task_id}]"


@dataclasses.dataclass(frozen=True, slots=True)
class ReplayStep:
    """One assistant turn of a reference solution.

    Attributes:
        text: The correct turn (Hermes ``<tool_call>`` blocks, or the final answer).
        wrong: A plausible wrong turn used when a mistake of kind ``"wrong"`` is drawn.
    """

    text: str
    wrong: str | None = None


class ReplayScript:
    """Replays reference solutions per task, making seeded mistakes so scores vary.

    The task is found by :func:`task_marker` in the first user message that carries one. The
    step is the number of earlier assistant turns that parsed cleanly, so after a malformed
    turn the same step is tried again. With probability ``mistake_rate`` a step that calls
    tools goes wrong in one of three ways: its ``wrong`` alternative (if it has one), a
    malformed tool call (the model recovers on the next turn), or giving up early.

    Draws are seeded by ``(seed, task, step, conversation)`` plus a per-key counter, so the
    ``n`` members of a group asking the same question get different, reproducible draws.

    Args:
        solutions: Task id -> the assistant turns of its reference solution.
        mistake_rate: Probability in ``[0, 1]`` that a tool-calling step is a mistake.
        seed: Seed of every draw.
    """

    give_up_text = "I could not complete this task."
    done_text = "I have completed the task."
    unknown_text = "I do not know how to solve this task."

    def __init__(
        self,
        solutions: Mapping[str, Sequence[str | ReplayStep]],
        *,
        mistake_rate: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= mistake_rate <= 1.0:
            raise ValueError("mistake_rate must be within [0, 1]")
        self.solutions = {
            task: [s if isinstance(s, ReplayStep) else ReplayStep(s) for s in steps]
            for task, steps in solutions.items()
        }
        self.mistake_rate = mistake_rate
        self.seed = seed
        self.mistakes: collections.Counter[str] = collections.Counter()
        self._draws: collections.OrderedDict[bytes, int] = collections.OrderedDict()

    @classmethod
    def from_json(cls, path: str | Path, **kwargs: Any) -> ReplayScript:
        """Load ``{"task": ["turn", {"text": ..., "wrong": ...}, ...]}`` from a JSON file."""
        raw = json.loads(Path(path).read_text())
        solutions = {
            task: [s if isinstance(s, str) else ReplayStep(**s) for s in steps]
            for task, steps in raw.items()
        }
        return cls(solutions, **kwargs)

    def _draw(self, key: bytes) -> random.Random:
        count = self._draws.pop(key, 0)
        self._draws[key] = count + 1
        if len(self._draws) > 65536:  # bounded memory over a long run
            self._draws.popitem(last=False)
        digest = hashlib.blake2b(key + count.to_bytes(8, "little"), digest_size=8).digest()
        return random.Random(int.from_bytes(digest, "little"))

    def __call__(self, messages: Sequence[Mapping[str, Any]]) -> str:
        task = next(
            (
                m.group(1)
                for msg in messages
                if msg.get("role") == "user" and isinstance(msg.get("content"), str)
                for m in [_MARKER.search(msg["content"])]
                if m
            ),
            None,
        )
        steps = self.solutions.get(task) if task is not None else None
        if steps is None:
            return self.unknown_text
        step = sum(
            1
            for msg in messages
            if msg.get("role") == "assistant"
            and (msg.get("tool_calls") or not parse_hermes(str(msg.get("content") or "")).errors)
        )
        if step >= len(steps):
            return self.done_text
        current = steps[step]
        conversation = json.dumps([dict(m) for m in messages], sort_keys=True, default=str)
        key = f"{self.seed}\0{task}\0{step}\0{conversation}".encode()
        rng = self._draw(hashlib.blake2b(key, digest_size=16).digest())
        if "</tool_call>" not in current.text or rng.random() >= self.mistake_rate:
            return current.text
        kinds = ["malformed", "give_up"] + (["wrong"] if current.wrong else [])
        kind = rng.choice(kinds)
        self.mistakes[kind] += 1
        if kind == "wrong" and current.wrong is not None:
            return current.wrong
        if kind == "give_up":
            return self.give_up_text
        head, _, tail = current.text.partition("</tool_call>")
        cut = head.rfind("}")
        return head[:cut] + head[cut + 1 :] + "</tool_call>" + tail  # drop a closing brace

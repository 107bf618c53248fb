"""Tool-call parsing: Hermes ``<tool_call>`` text and OpenAI ``tool_calls``.

The parser does syntax only. Whether a tool exists or its arguments fit its schema is the
tool registry's business. What the parser guarantees is the rule the original design broke:
a message that *tries* to call a tool and gets it wrong is never a final answer. Every
malformed attempt (bad JSON, an unclosed or stray tag, a near-miss tag such as
``<tool-call>``, a tool-call JSON object outside the tags, a missing name, arguments that are
not an object) becomes a :class:`ParseError` whose message is fed back to the model as an
observation. Only a message with no tool call and no attempt at one is a final answer.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .._types import ToolCall

__all__ = [
    "ParseError",
    "ParsedMessage",
    "parse_hermes",
    "parse_message",
    "parse_openai_tool_calls",
]

_OPEN = "<tool_call>"
_CLOSE = "</tool_call>"
_TAG = re.compile(r"<tool_call>|</tool_call>")
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
# Tags that look like an attempt at <tool_call> but are not exactly it.
_NEAR_MISS = re.compile(r"</?\s*(?:tool[\s_-]?calls?|function[\s_-]?calls?)\b[^<>\n]{0,40}>?", re.I)
# Where a bare tool-call JSON object could start.
_BARE_START = re.compile(r"\{\s*\"(?:name|function)\"\s*:")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)
_MAX_RAW = 500


@dataclasses.dataclass(frozen=True, slots=True)
class ParseError:
    """One malformed tool-call attempt (data, not an exception).

    Attributes:
        message: What is wrong, phrased for the model; it becomes an error observation.
        raw: The offending text, cut to 500 characters.
        call_id: The call's id when the malformed call had one (OpenAI ``tool_calls``).
    """

    message: str
    raw: str = ""
    call_id: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ParsedMessage:
    """The result of parsing one assistant message.

    Attributes:
        content: The text with ``<tool_call>`` blocks and ``<think>`` blocks removed, stripped.
        calls: Well-formed tool calls, in order of appearance.
        errors: Malformed attempts, in order of appearance.
    """

    content: str
    calls: list[ToolCall]
    errors: list[ParseError]

    @property
    def is_final_answer(self) -> bool:
        """No tool call and no malformed attempt at one."""
        return not self.calls and not self.errors


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_RAW else text[:_MAX_RAW] + "..."


def _decode_arguments(value: Any) -> tuple[dict[str, Any] | None, str | None]:
    """``(arguments, None)`` or ``(None, problem)``."""
    if value is None or value == "":
        return {}, None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            return None, f"its arguments string is not valid JSON ({exc})"
    if not isinstance(value, dict):
        return None, f"its arguments must be a JSON object, got {type(value).__name__}"
    return value, None


def _call_from_object(obj: Any, call_id: str) -> ToolCall | ParseError:
    if not isinstance(obj, dict):
        return ParseError(
            f"a tool call must be a JSON object, got {type(obj).__name__}", _cut(json.dumps(obj))
        )
    spec = obj["function"] if isinstance(obj.get("function"), dict) else obj
    name = spec.get("name")
    if not isinstance(name, str) or not name.strip():
        return ParseError('the tool call has no "name" string', _cut(json.dumps(obj)))
    raw_args = spec["arguments"] if "arguments" in spec else spec.get("parameters")
    arguments, problem = _decode_arguments(raw_args)
    if arguments is None:
        return ParseError(f"tool call {name!r}: {problem}", _cut(json.dumps(obj)))
    return ToolCall(name=name.strip(), arguments=arguments, id=call_id)


def _parse_block(body: str, next_id: int) -> list[ToolCall | ParseError]:
    text = body.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    if not text:
        return [ParseError("empty <tool_call></tool_call> block", _cut(body))]
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return [ParseError(f"the <tool_call> body is not valid JSON ({exc})", _cut(body))]
    items = obj if isinstance(obj, list) and obj else [obj]
    return [_call_from_object(item, f"call_{next_id + i}") for i, item in enumerate(items)]


def _bare_attempts(text: str) -> list[ParseError]:
    """Errors for tool-call lookalikes outside proper tags."""
    errors = [
        ParseError(
            f"{m.group()!r} is not a valid tag; wrap each call in <tool_call></tool_call>",
            _cut(text[max(0, m.start() - 40) : m.end() + 80]),
        )
        for m in _NEAR_MISS.finditer(text)
        if m.group() not in (_OPEN, _CLOSE)
    ]
    decoder = json.JSONDecoder()
    pos = 0
    while match := _BARE_START.search(text, pos):
        try:
            obj, end = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            pos = match.end()
            continue
        pos = end
        spec = obj.get("function") if isinstance(obj.get("function"), dict) else obj
        if isinstance(spec, dict) and ("arguments" in spec or "parameters" in spec):
            errors.append(
                ParseError(
                    "a tool call must be wrapped in <tool_call></tool_call> tags; "
                    "this JSON object was outside them and was not run",
                    _cut(text[match.start() : end]),
                )
            )
    return errors


def parse_hermes(text: str, *, id_start: int = 0) -> ParsedMessage:
    """Parse Hermes-format tool calls out of an assistant message.

    Closed ``<think>`` blocks are ignored (reasoning may mention tags). A block may hold one
    call object or a JSON list of them. Arguments may be an object or a JSON string of one; a
    missing ``arguments`` means ``{}``. Calls get ids ``call_<id_start + n>``.

    Args:
        text: The assistant message content.
        id_start: Number of the first id handed out (keeps ids unique across a trajectory).
    """
    scan = _THINK.sub("", text)
    outside: list[str] = []
    results: list[ToolCall | ParseError] = []
    open_at: int | None = None
    pos = 0
    for match in _TAG.finditer(scan):
        if match.group() == _OPEN:
            if open_at is not None:
                results.append(
                    ParseError(
                        "<tool_call> opened again before the previous one was closed "
                        "with </tool_call>",
                        _cut(scan[open_at : match.start()]),
                    )
                )
            else:
                outside.append(scan[pos : match.start()])
            open_at = match.end()
        elif open_at is None:
            outside.append(scan[pos : match.start()])
            results.append(
                ParseError(
                    "</tool_call> without a matching <tool_call>",
                    _cut(scan[max(0, match.start() - 200) : match.end()]),
                )
            )
        else:
            results.extend(_parse_block(scan[open_at : match.start()], id_start + _n(results)))
            open_at = None
        pos = match.end()
    if open_at is not None:
        results.append(
            ParseError(
                "<tool_call> was never closed: end every call with </tool_call>",
                _cut(scan[open_at:]),
            )
        )
    else:
        outside.append(scan[pos:])
    content = "".join(outside)
    results.extend(_bare_attempts(content))
    calls = [r for r in results if isinstance(r, ToolCall)]
    errors = [r for r in results if isinstance(r, ParseError)]
    return ParsedMessage(content=content.strip(), calls=calls, errors=errors)


def _n(results: Sequence[ToolCall | ParseError]) -> int:
    return sum(isinstance(r, ToolCall) for r in results)


def parse_openai_tool_calls(
    tool_calls: Sequence[Any], *, id_start: int = 0
) -> tuple[list[ToolCall], list[ParseError]]:
    """Parse an OpenAI ``message.tool_calls`` list.

    Each entry is ``{"id", "type": "function", "function": {"name", "arguments"}}`` with
    ``arguments`` a JSON string (an object is tolerated). Entries without an id get
    ``call_<id_start + n>``.
    """
    calls: list[ToolCall] = []
    errors: list[ParseError] = []
    for index, entry in enumerate(tool_calls):
        fallback_id = f"call_{id_start + index}"
        if not isinstance(entry, Mapping):
            errors.append(ParseError("a tool_calls entry must be an object", _cut(repr(entry))))
            continue
        call_id = entry.get("id") if isinstance(entry.get("id"), str) and entry["id"] else None
        raw = _cut(json.dumps(entry, default=repr))
        kind = entry.get("type", "function")
        function = entry.get("function")
        if kind != "function" or not isinstance(function, Mapping):
            errors.append(ParseError("a tool_calls entry must be a function call", raw, call_id))
            continue
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            errors.append(ParseError('the tool call has no "name" string', raw, call_id))
            continue
        arguments, problem = _decode_arguments(function.get("arguments"))
        if arguments is None:
            errors.append(ParseError(f"tool call {name!r}: {problem}", raw, call_id))
            continue
        calls.append(ToolCall(name=name.strip(), arguments=arguments, id=call_id or fallback_id))
    return calls, errors


def parse_message(
    text: str, tool_calls: Sequence[Any] | None = None, *, id_start: int = 0
) -> ParsedMessage:
    """Parse one assistant message in whichever format it came.

    Native ``tool_calls`` win when present (a server that parsed them has already removed the
    tags from ``text``); otherwise ``text`` is parsed as Hermes.
    """
    if tool_calls:
        calls, errors = parse_openai_tool_calls(tool_calls, id_start=id_start)
        return ParsedMessage(content=_THINK.sub("", text).strip(), calls=calls, errors=errors)
    return parse_hermes(text, id_start=id_start)

"""Hermes-format prompt pieces: the tools system prompt and ``<tool_response>`` observations."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .._types import ToolResult
from ._parsing import ParseError

__all__ = [
    "CALL_FORMAT_HINT",
    "format_parse_error",
    "format_tool_response",
    "hermes_system_prompt",
]

#: Appended to every parse-error observation so the model can correct itself.
CALL_FORMAT_HINT = (
    'Write each tool call as <tool_call>{"name": <tool name>, "arguments": '
    "<JSON object>}</tool_call>. To finish, answer without any tool call."
)

_TOOLS_PROMPT = """\
# Tools

You can call functions to work on the task. Their signatures are listed as JSON inside \
<tools></tools> tags:
<tools>
{tools}
</tools>

To call a function, write a JSON object with its name and arguments inside \
<tool_call></tool_call> tags. Use one pair of tags per call; several calls in one message \
run at the same time:
<tool_call>
{{"name": <function name>, "arguments": <arguments as a JSON object>}}
</tool_call>

Each result comes back inside <tool_response></tool_response> tags. When the task is done, \
reply with your final answer and no tool call."""


def hermes_system_prompt(instructions: str, tools: Sequence[Mapping[str, Any]]) -> str:
    """The system prompt: the task's instructions, then the tool definitions (Hermes style).

    Args:
        instructions: Task- or environment-specific instructions (may be empty).
        tools: OpenAI-style function specs, rendered one JSON object per line.
    """
    parts = [instructions.strip()] if instructions.strip() else []
    if tools:
        rendered = "\n".join(json.dumps(dict(spec), ensure_ascii=False) for spec in tools)
        parts.append(_TOOLS_PROMPT.format(tools=rendered))
    return "\n\n".join(parts)


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    dropped = len(text) - limit
    return f"{text[:limit]}\n[... {dropped} more characters truncated]"


def format_tool_response(result: ToolResult, *, max_chars: int) -> str:
    """One ``<tool_response>`` block for a tool result (JSON inside the tags)."""
    body: dict[str, Any] = {"name": result.name, "content": _truncate(result.content, max_chars)}
    if result.error is not None:
        body["error"] = result.error
    return f"<tool_response>\n{json.dumps(body, ensure_ascii=False)}\n</tool_response>"


def format_parse_error(error: ParseError) -> str:
    """One ``<tool_response>`` block telling the model its tool call was malformed."""
    content = f"Your tool call could not be parsed: {error.message}."
    if error.raw:
        content += f" The text was: {error.raw}"
    body = {"error": "parse_error", "content": f"{content}\n{CALL_FORMAT_HINT}"}
    return f"<tool_response>\n{json.dumps(body, ensure_ascii=False)}\n</tool_response>"

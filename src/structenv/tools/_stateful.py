"""Stateful terminal tools: a persistent shell and raw tmux, inside the slot's sandbox.

They need a slot with a ``terminal(action, **arguments)`` method (the sandbox server's slots:
LocalBackend, DockerBackend); on other backends they answer with an error result. ``cd`` and
``export`` persist between calls; output is what appeared since the previous call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import anyio

from .._exceptions import StructEnvError
from .._types import ToolCall, ToolResult
from ._base import Tool, ToolContext

__all__ = ["StatefulTerminalTool", "TerminalSlot", "TmuxTool"]

#: Seconds the client waits beyond a command's own deadline for the terminal to answer.
_GRACE = 10.0


@runtime_checkable
class TerminalSlot(Protocol):
    """A slot with a stateful tmux terminal inside its sandbox."""

    async def terminal(self, action: str, **arguments: Any) -> dict[str, Any]:
        """Drive the terminal (see :meth:`structenv.sandbox.RemoteSlot.terminal`)."""
        ...


async def _drive(
    ctx: ToolContext, call: ToolCall, action: str, limit: float, **arguments: Any
) -> ToolResult | dict[str, Any]:
    slot = ctx.slot
    if not isinstance(slot, TerminalSlot):
        return ToolResult(
            call.id, call.name, "error: this sandbox has no stateful terminal", error="tool_error"
        )
    with anyio.move_on_after(limit + _GRACE):
        try:
            return await slot.terminal(action, **arguments)
        except (StructEnvError, OSError, ValueError) as exc:
            return ToolResult(call.id, call.name, f"error: {exc}", error="tool_error")
    # The terminal did not answer in time: its state is unknown, so the slot is not reused.
    ctx.slot.reusable = False
    return ToolResult(call.id, call.name, "error: the terminal did not answer", error="timeout")


class StatefulTerminalTool(Tool):
    """Run a command in a persistent shell: the working directory and variables persist."""

    name = "stateful_terminal"
    description = (
        "Run a bash command in a persistent shell session in the sandboxed workspace. The "
        "working directory, environment variables and background jobs persist between calls."
    )
    parameters: Mapping[str, Any] = {
        "type": "object",
        "properties": {
            "command": {"type": "string", "minLength": 1, "pattern": "^[^\\n]*$"},
            "timeout": {"type": "integer", "minimum": 1},
        },
        "required": ["command"],
        "additionalProperties": False,
    }

    async def run(self, ctx: ToolContext, call: ToolCall) -> ToolResult:
        """Type the command into the shell and wait for it.

        Cancellation: the command may keep running in the terminal; the slot is reset on
        release.
        """
        timeout = min(float(call.arguments.get("timeout", ctx.tool_timeout)), ctx.max_tool_timeout)
        answer = await _drive(
            ctx, call, "run", timeout, command=str(call.arguments["command"]), timeout=timeout
        )
        if isinstance(answer, ToolResult):
            return answer
        output = str(answer.get("output", ""))
        if answer.get("timed_out"):
            return ToolResult(
                call.id,
                call.name,
                f"{output}\n[timed out after {timeout:g}s; the command may still be running — "
                "send C-c with the tmux tool]",
                error="timeout",
            )
        return ToolResult(call.id, call.name, f"{output}\n[exit code: {answer.get('exit_code')}]")


class TmuxTool(Tool):
    """Raw tmux control of the slot's terminal: start, send keys, capture, stop."""

    name = "tmux"
    description = (
        "Control the persistent terminal directly: 'start' it, 'send_keys' (text, or key names "
        "like C-c with literal=false), 'capture' the output since the last call, or 'stop' it."
    )
    parameters: Mapping[str, Any] = {
        "type": "object",
        "properties": {
            "action": {"enum": ["start", "send_keys", "capture", "stop"]},
            "keys": {"type": "string"},
            "enter": {"type": "boolean"},
            "literal": {"type": "boolean"},
        },
        "required": ["action"],
        "additionalProperties": False,
    }

    async def run(self, ctx: ToolContext, call: ToolCall) -> ToolResult:
        """Perform the action. Cancellation: the terminal keeps its state."""
        args = dict(call.arguments)
        action = str(args.pop("action"))
        if action == "send_keys" and "keys" not in args:
            return ToolResult(
                call.id, call.name, "error: send_keys needs 'keys'", error="invalid_arguments"
            )
        answer = await _drive(ctx, call, action, ctx.tool_timeout, **args)
        if isinstance(answer, ToolResult):
            return answer
        return ToolResult(call.id, call.name, str(answer.get("output", "")) or "(no new output)")

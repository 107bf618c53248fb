"""Built-in sandbox tools and the toolsets of the original design."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._exceptions import StructEnvError
from .._types import ExecRequest, ToolCall, ToolResult, new_exec_request
from ._base import CommandTool, Tool, ToolContext, ToolRegistry
from ._stateful import StatefulTerminalTool, TmuxTool

__all__ = [
    "ListFilesTool",
    "ReadFileTool",
    "TerminalTool",
    "WriteFileTool",
    "default_registry",
]

#: Largest file the read_file tool returns to the model.
MAX_READ_BYTES = 256 * 1024


class TerminalTool(CommandTool):
    """Run a shell command in the sandbox workspace (stateless: a fresh shell each call)."""

    name = "terminal"
    description = (
        "Run a bash command in the sandboxed workspace and return its output and exit code. "
        "Each call starts a fresh shell in the workspace root."
    )
    parameters: Mapping[str, Any] = {
        "type": "object",
        "properties": {
            "command": {"type": "string", "minLength": 1, "description": "bash command line"},
            "timeout": {
                "type": "integer",
                "minimum": 1,
                "description": "seconds before the command is killed",
            },
        },
        "required": ["command"],
        "additionalProperties": False,
    }

    def request(self, ctx: ToolContext, call: ToolCall) -> ExecRequest:
        """The command line, under the model's timeout capped at ``max_tool_timeout``."""
        args = call.arguments
        asked = args.get("timeout")
        timeout = ctx.tool_timeout if asked is None else min(float(asked), ctx.max_tool_timeout)
        return new_exec_request(str(args["command"]), None, {}, None, timeout, ctx.max_output)


class ReadFileTool(Tool):
    """Read a text file from the workspace."""

    name = "read_file"
    description = "Read a file from the workspace (path relative to the workspace root)."
    parameters: Mapping[str, Any] = {
        "type": "object",
        "properties": {"path": {"type": "string", "minLength": 1}},
        "required": ["path"],
        "additionalProperties": False,
    }

    async def run(self, ctx: ToolContext, call: ToolCall) -> ToolResult:
        """Read the file. Cancellation: nothing changes."""
        path = str(call.arguments["path"])
        try:
            data = await ctx.slot.read_file(path, max_bytes=MAX_READ_BYTES)
        except (OSError, ValueError, StructEnvError) as exc:
            return ToolResult(call.id, call.name, f"error: {exc}", error="tool_error")
        return ToolResult(call.id, call.name, data.decode("utf-8", "replace"))


class WriteFileTool(Tool):
    """Write a text file in the workspace."""

    name = "write_file"
    description = "Create or overwrite a file in the workspace with the given content."
    parameters: Mapping[str, Any] = {
        "type": "object",
        "properties": {
            "path": {"type": "string", "minLength": 1},
            "content": {"type": "string"},
        },
        "required": ["path", "content"],
        "additionalProperties": False,
    }

    async def run(self, ctx: ToolContext, call: ToolCall) -> ToolResult:
        """Write the file. Cancellation: the file is old or complete (atomic write)."""
        path = str(call.arguments["path"])
        data = str(call.arguments["content"]).encode()
        try:
            await ctx.slot.write_file(path, data)
        except (OSError, ValueError, StructEnvError) as exc:
            return ToolResult(call.id, call.name, f"error: {exc}", error="tool_error")
        return ToolResult(call.id, call.name, f"wrote {len(data)} bytes to {path}")


class ListFilesTool(Tool):
    """List the files of a workspace directory."""

    name = "list_files"
    description = "List files under a workspace directory, recursively, with sizes."
    parameters: Mapping[str, Any] = {
        "type": "object",
        "properties": {"path": {"type": "string", "default": "."}},
        "additionalProperties": False,
    }

    async def run(self, ctx: ToolContext, call: ToolCall) -> ToolResult:
        """List the directory. Cancellation: nothing changes."""
        try:
            entries = await ctx.slot.list_files(str(call.arguments.get("path", ".")))
        except (OSError, ValueError, StructEnvError) as exc:
            return ToolResult(call.id, call.name, f"error: {exc}", error="tool_error")
        lines = [f"{e.path}/" if e.is_dir else f"{e.path} ({e.size} bytes)" for e in entries]
        return ToolResult(call.id, call.name, "\n".join(lines) or "(empty)")


def default_registry() -> ToolRegistry:
    """The built-in tools with the original design's toolsets.

    ``default`` = terminal + read_file + write_file; ``filesystem`` = read_file + write_file +
    list_files; ``terminal`` = terminal; ``terminal_stateful`` = stateful_terminal + tmux
    (sandbox-server backends only).
    """
    return ToolRegistry(
        [
            TerminalTool(),
            ReadFileTool(),
            WriteFileTool(),
            ListFilesTool(),
            StatefulTerminalTool(),
            TmuxTool(),
        ],
        toolsets={
            "default": ["terminal", "read_file", "write_file"],
            "filesystem": ["read_file", "write_file", "list_files"],
            "terminal": ["terminal"],
            "terminal_stateful": ["stateful_terminal", "tmux"],
        },
    )

r"""Tool, ToolContext and ToolRegistry: what the model can call and how calls are checked.

Arguments are validated by a ``jsonschema-rs`` validator compiled once per tool at
registration (~0.4 µs for a valid call against ~20 µs for the ``jsonschema`` library's
``iter_errors``; docs/design.md says why this one). Only a call that fails gets its message
from the ``jsonschema`` library's ``best_match`` (the messages models are trained on), so the
fast path allocates nothing. ``jsonschema-rs`` evaluates ``pattern`` with ECMA-262 semantics
(``\d`` is ASCII digits only, as JSON Schema specifies), where Python's ``re`` matches any
Unicode digit: the compiled validator is the judge.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import jsonschema
import jsonschema_rs

from .._exceptions import ConfigError
from .._types import ExecRequest, ExecResult, ToolCall, ToolResult, new_tool_result

if TYPE_CHECKING:
    from ..abc import Slot
    from ._client import ToolServerClient

__all__ = [
    "CommandTool",
    "Tool",
    "ToolContext",
    "ToolRegistry",
    "exec_tool_result",
    "format_exec_result",
]


class ToolContext(Protocol):
    """What a tool sees of the trajectory it runs for (implemented by the executor)."""

    @property
    def slot(self) -> Slot:
        """The trajectory's leased slot (for file operations)."""
        ...

    @property
    def tool_timeout(self) -> float:
        """Default per-call deadline in seconds."""
        ...

    @property
    def max_tool_timeout(self) -> float:
        """Largest deadline a model may ask for."""
        ...

    @property
    def max_output(self) -> int:
        """Byte cap for each of stdout and stderr."""
        ...

    @property
    def tool_server(self) -> ToolServerClient | None:
        """The external tool server, if configured."""
        ...

    async def exec(self, request: ExecRequest) -> ExecResult:
        """Run a command in the slot through the batcher (deadline becomes a result)."""
        ...


class Tool(ABC):
    """A tool the model may call.

    Subclasses set :attr:`name`, :attr:`description` and :attr:`parameters` (a JSON schema
    for the arguments object) and implement :meth:`run`. The executor validates arguments
    against the schema before :meth:`run` sees them.
    """

    name: str
    description: str
    parameters: Mapping[str, Any] = {"type": "object", "properties": {}}
    #: ``True`` for tools that run in the trajectory's sandbox slot.
    in_sandbox: bool = True

    @abstractmethod
    async def run(self, ctx: ToolContext, call: ToolCall) -> ToolResult:
        """Execute the call. Failures of the tool are results (``error=...``), not exceptions.

        Cancellation: propagates; any sandbox command it started is killed by the host and
        the slot is marked not reusable.
        """

    def spec(self) -> dict[str, Any]:
        """The OpenAI function spec of this tool."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": copy.deepcopy(dict(self.parameters)),
            },
        }


class CommandTool(Tool):
    """A tool that is one command in the trajectory's slot.

    Subclasses implement :meth:`request` (the command for a call) and may override
    :meth:`result` (the observation for its outcome; default: output and exit code, a
    timeout or sandbox error as ``error``). :meth:`run` is the two around ``ctx.exec``; the
    executor runs a tool that keeps this :meth:`run` as the same three steps in the
    trajectory's own frame, one coroutine fewer per call.
    """

    @abstractmethod
    def request(self, ctx: ToolContext, call: ToolCall) -> ExecRequest:
        """The command that answers ``call`` (arguments already validated)."""

    def result(self, call: ToolCall, result: ExecResult) -> ToolResult:
        """The observation for the command's outcome (a nonzero exit is data, not an error)."""
        return exec_tool_result(call, result)

    async def run(self, ctx: ToolContext, call: ToolCall) -> ToolResult:
        """Run :meth:`request` in the slot. Cancellation: the command's process tree is killed."""
        return self.result(call, await ctx.exec(self.request(ctx, call)))


def format_exec_result(result: ExecResult) -> str:
    """Render an exec result as the observation text the model sees."""
    # Concatenation, not a list of parts: this runs on every tool call.
    stdout = result.stdout
    text = stdout.decode("utf-8", "replace") if stdout else ""
    if stdout and result.stdout_truncated:
        text += "\n[stdout truncated]"
    stderr = result.stderr
    if stderr:
        text += "\n[stderr]\n" + stderr.decode("utf-8", "replace")
        if result.stderr_truncated:
            text += "\n[stderr truncated]"
    if result.error is not None:
        text += f"\n[sandbox error: {result.error}]"
    elif result.timed_out:
        text += f"\n[timed out after {result.duration:.1f}s; the command was killed]"
    elif result.exit_code is None:
        text += f"\n[killed by signal {result.signal}]"
    else:
        text += f"\n[exit code: {result.exit_code}]"
    return text.lstrip("\n")


def exec_tool_result(call: ToolCall, result: ExecResult) -> ToolResult:
    """Map an exec result to a tool result: a nonzero exit is data, not an error."""
    error = None
    if result.error is not None:
        error = "sandbox_error"
    elif result.timed_out:
        error = "timeout"
    return new_tool_result(call.id, call.name, format_exec_result(result), error, result)


class ToolRegistry:
    """Tools by name, with toolsets and JSON-schema validation. Names never shadow.

    Args:
        tools: Tools to register.
        toolsets: Named groups of tool names, e.g. ``{"default": ["terminal", ...]}``.
    """

    def __init__(
        self,
        tools: Iterable[Tool] = (),
        *,
        toolsets: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self._tools: dict[str, Tool] = {}
        self._validators: dict[str, jsonschema_rs.Validator] = {}
        self._explainers: dict[str, jsonschema.protocols.Validator] = {}
        self._routes: dict[str, tuple[Tool, Callable[[Any], bool]]] = {}
        self.toolsets: dict[str, list[str]] = {k: list(v) for k, v in (toolsets or {}).items()}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        """Add a tool. Raises :class:`~structenv.ConfigError` on a duplicate name or a bad
        schema."""
        if not getattr(tool, "name", "") or not tool.name.replace("_", "").isalnum():
            raise ConfigError(f"invalid tool name {getattr(tool, 'name', None)!r}")
        if tool.name in self._tools:
            raise ConfigError(f"tool {tool.name!r} is already registered")
        cls = jsonschema.validators.validator_for(tool.parameters)
        try:
            cls.check_schema(dict(tool.parameters))
        except jsonschema.SchemaError as exc:
            raise ConfigError(f"tool {tool.name!r} has an invalid schema: {exc.message}") from exc
        try:
            fast = jsonschema_rs.validator_for(_plain(tool.parameters), validate_formats=False)
        except (jsonschema_rs.ValidationError, ValueError) as exc:
            raise ConfigError(f"tool {tool.name!r} has an invalid schema: {exc}") from exc
        self._validators[tool.name] = fast
        self._explainers[tool.name] = cls(tool.parameters)
        self._tools[tool.name] = tool
        self._routes[tool.name] = (tool, fast.is_valid)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def names(self) -> list[str]:
        """Registered tool names, in registration order."""
        return list(self._tools)

    def get(self, name: str) -> Tool | None:
        """The tool called ``name``, or ``None``."""
        return self._tools.get(name)

    def route(self, name: str) -> tuple[Tool, Callable[[Any], bool]] | None:
        """The tool called ``name`` and its compiled validator's ``is_valid``, or ``None``
        (one lookup for the executor's hot path).

        ``is_valid(arguments)`` is ``True`` only for arguments that match; it raises
        ``ValueError`` for data that is not JSON. When it is not ``True``, :meth:`validate`
        is the judge (and says why).
        """
        return self._routes.get(name)

    def specs(self) -> list[dict[str, Any]]:
        """OpenAI function specs of every tool."""
        return [tool.spec() for tool in self._tools.values()]

    def validate(self, call: ToolCall) -> str | None:
        """``None`` if the call's arguments match the tool's schema, else why not."""
        args = call.arguments
        try:
            if self._validators[call.name].is_valid(args):
                return None
        except ValueError:
            # Not JSON data (a tuple, a mapping proxy, ...): judge a plain copy.
            try:
                if self._validators[call.name].is_valid(_plain(args)):
                    return None
            except ValueError as exc:
                return f"arguments are not JSON data: {exc}"
        return self._explain(call.name, args)

    def _explain(self, name: str, args: Mapping[str, Any]) -> str:
        """Why ``args`` fail the schema of ``name`` (the slow path: failures only)."""
        error = jsonschema.exceptions.best_match(self._explainers[name].iter_errors(dict(args)))
        if error is None:
            # The two disagree only where regex dialects do (ECMA vs Python ``re``).
            first = next(iter(self._validators[name].iter_errors(_plain(args))), None)
            return first.message if first is not None else "does not match the schema"
        where = "/".join(str(p) for p in error.absolute_path)
        return f"{where + ': ' if where else ''}{error.message}"

    def select(
        self,
        *,
        enabled_toolsets: Sequence[str] | None = None,
        disabled_toolsets: Sequence[str] = (),
        disabled_tools: Sequence[str] = (),
    ) -> ToolRegistry:
        """A registry restricted to the enabled toolsets minus the disabled ones.

        ``enabled_toolsets=None`` keeps every tool. Unknown toolset or tool names are a
        :class:`~structenv.ConfigError` (a typo must not silently disable tools).
        """
        for name in (*(enabled_toolsets or ()), *disabled_toolsets):
            if name not in self.toolsets:
                raise ConfigError(f"unknown toolset {name!r}; known: {sorted(self.toolsets)}")
        for name in disabled_tools:
            if name not in self._tools:
                raise ConfigError(f"unknown tool {name!r}; known: {self.names()}")
        if enabled_toolsets is None:
            keep = list(self._tools)
        else:
            keep = [n for ts in enabled_toolsets for n in self.toolsets[ts]]
        drop = {n for ts in disabled_toolsets for n in self.toolsets[ts]} | set(disabled_tools)
        chosen: dict[str, Tool] = {}
        for name in keep:
            if name not in drop and name not in chosen:
                chosen[name] = self._tools[name]
        out = ToolRegistry(toolsets=self.toolsets)
        for tool in chosen.values():
            out.register(tool)
        return out


def _plain(value: Any) -> Any:
    """A copy of JSON-like data made of plain dicts and lists (what ``jsonschema-rs`` takes)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value

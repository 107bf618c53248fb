"""Plain data that crosses layers: exec requests/results and tool calls/results.

These are frozen, slotted dataclasses rather than pydantic models because they sit on the hot
path of every tool call (constructing one costs ~0.3 µs instead of ~3 µs). Validation of
untrusted input happens at the edges: the sandbox server validates wire payloads, the tool
registry validates model-produced arguments against JSON schema.

The two built on every tool call, :class:`ExecRequest` and :class:`ToolResult`, get a
hand-written ``__init__`` (:func:`_fast_init`): a frozen dataclass's generated one sets each
field through ``object.__setattr__``, which looks the wrapper up and allocates a bound
method-wrapper per field (~11,600 instructions for an ``ExecRequest``); setting the slots
through their descriptors' bound ``__set__`` costs ~7,300. Same signature, defaults and
frozenness (:func:`_fast_init` checks the signature against the dataclass fields at import).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["ExecRequest", "ExecResult", "ToolCall", "ToolResult"]

#: Default byte cap on each of stdout and stderr.
DEFAULT_MAX_OUTPUT = 1 << 20


@dataclasses.dataclass(frozen=True, slots=True)
class ExecRequest:
    """One command to run inside a slot.

    Attributes:
        command: Shell command line, run as ``bash -c command`` in the slot's workspace.
        cwd: Working directory relative to the workspace root (``None``: the root).
        env: Extra environment variables. The sandbox starts from a scrubbed environment.
        stdin: Bytes fed to the command's stdin (``None``: ``/dev/null``).
        timeout: Deadline in seconds, enforced by the sandbox server, which kills the whole
            process tree when it passes. This is data carried to the server, not an API timeout.
        max_output: Byte cap for each of stdout and stderr; the rest is dropped and the result
            says it was truncated.
    """

    command: str
    cwd: str | None = None
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    stdin: bytes | None = None
    timeout: float = 60.0
    max_output: int = DEFAULT_MAX_OUTPUT

    def to_wire(self) -> dict[str, Any]:
        """JSON-ready dict (bytes as base64)."""
        return {
            "command": self.command,
            "cwd": self.cwd,
            "env": dict(self.env),
            "stdin": None if self.stdin is None else base64.b64encode(self.stdin).decode(),
            "timeout": self.timeout,
            "max_output": self.max_output,
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> ExecRequest:
        """Inverse of :meth:`to_wire`; raises ``ValueError``/``TypeError`` on bad input."""
        stdin = data.get("stdin")
        env = data.get("env") or {}
        if not isinstance(data.get("command"), str):
            raise TypeError("command must be a string")
        if not isinstance(env, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise TypeError("env must map strings to strings")
        cwd = data.get("cwd")
        if cwd is not None and not isinstance(cwd, str):
            raise TypeError("cwd must be a string or null")
        timeout = float(data.get("timeout", 60.0))
        max_output = int(data.get("max_output", DEFAULT_MAX_OUTPUT))
        if not timeout > 0 or max_output < 0:
            raise ValueError("timeout must be > 0 and max_output >= 0")
        return cls(
            command=data["command"],
            cwd=cwd,
            env=dict(env),
            stdin=None if stdin is None else base64.b64decode(stdin),
            timeout=timeout,
            max_output=max_output,
        )


class _Factory:
    """The default of a field with a ``default_factory`` (shown as the generated one shows it)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<factory>"


_FACTORY: Any = _Factory()


def _fast_init(cls: type, init: Callable[..., None]) -> None:
    """Install ``init`` as ``cls.__init__``, checked against the dataclass fields."""
    fields = dataclasses.fields(cls)
    params = list(inspect.signature(init).parameters.values())[1 : 1 + len(fields)]
    for field, param in zip(fields, params, strict=True):
        default = _FACTORY if field.default_factory is not dataclasses.MISSING else field.default
        expected = inspect.Parameter.empty if default is dataclasses.MISSING else default
        if param.name != field.name or param.default is not expected:
            raise TypeError(f"{cls.__name__}.__init__ does not match field {field.name!r}")
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init  # type: ignore[misc]


def _setters(cls: type) -> list[Callable[[object, object], None]]:
    """The bound ``__set__`` of each field's slot descriptor, in field order."""
    return [vars(cls)[field.name].__set__ for field in dataclasses.fields(cls)]


_set_command, _set_cwd, _set_env, _set_stdin, _set_timeout, _set_max_output = _setters(ExecRequest)


def _exec_request_init(
    self: ExecRequest,
    command: str,
    cwd: str | None = None,
    env: Mapping[str, str] = _FACTORY,
    stdin: bytes | None = None,
    timeout: float = 60.0,
    max_output: int = DEFAULT_MAX_OUTPUT,
) -> None:
    _set_command(self, command)
    _set_cwd(self, cwd)
    _set_env(self, {} if env is _FACTORY else env)
    _set_stdin(self, stdin)
    _set_timeout(self, timeout)
    _set_max_output(self, max_output)


_fast_init(ExecRequest, _exec_request_init)


class _ExecRequestShape:
    """ExecRequest's slots, writable: :func:`new_exec_request` fills one, then retypes it."""

    __slots__ = ExecRequest.__slots__


def new_exec_request(
    command: str,
    cwd: str | None,
    env: Mapping[str, str],
    stdin: bytes | None,
    timeout: float,
    max_output: int,
) -> ExecRequest:
    """``ExecRequest(command, cwd, env, stdin, timeout, max_output)``, for the tool-call path.

    The same frozen object, built at ~40% of the cost: ``ExecRequest(...)`` goes through the
    type's generic ``__init__`` dispatch and six descriptor calls; this fills a plain object
    with the same slots (one store each) and then assigns its ``__class__``, which CPython
    allows between classes of identical layout (checked at import, below).
    """
    request = _ExecRequestShape()
    request.command = command  # type: ignore[attr-defined]
    request.cwd = cwd  # type: ignore[attr-defined]
    request.env = env  # type: ignore[attr-defined]
    request.stdin = stdin  # type: ignore[attr-defined]
    request.timeout = timeout  # type: ignore[attr-defined]
    request.max_output = max_output  # type: ignore[attr-defined]
    request.__class__ = ExecRequest  # type: ignore[assignment]
    return request  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True, slots=True)
class ExecResult:
    """What happened to one :class:`ExecRequest`. A nonzero exit code is data.

    Attributes:
        exit_code: The command's exit status; ``None`` if it was killed by a signal or never ran.
        signal: The signal that ended it, if any.
        stdout: Captured stdout, binary-safe, at most ``max_output`` bytes.
        stderr: Captured stderr, same rules.
        stdout_truncated: ``True`` if stdout was cut at the cap.
        stderr_truncated: ``True`` if stderr was cut at the cap.
        duration: Wall-clock seconds the command ran.
        timed_out: The deadline passed and the process tree was killed.
        sandboxed: The command ran under isolation. Never silently ``False``: unsandboxed
            execution must be asked for, and this flag says which one happened.
        error: An infrastructure failure (host crashed, slot broken, protocol error). When set,
            the command's own outcome is unknown or it never ran.
    """

    exit_code: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    signal: int | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration: float = 0.0
    timed_out: bool = False
    sandboxed: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Ran to completion with exit code 0."""
        return self.exit_code == 0 and self.error is None and not self.timed_out

    @classmethod
    def failure(cls, error: str, *, sandboxed: bool = False) -> ExecResult:
        """An infrastructure failure result (the command's fate is unknown)."""
        return cls(exit_code=None, error=error, sandboxed=sandboxed)

    def to_wire(self) -> dict[str, Any]:
        """JSON-ready dict (bytes as base64)."""
        return {
            "exit_code": self.exit_code,
            "signal": self.signal,
            "stdout": base64.b64encode(self.stdout).decode(),
            "stderr": base64.b64encode(self.stderr).decode(),
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
            "duration": self.duration,
            "timed_out": self.timed_out,
            "sandboxed": self.sandboxed,
            "error": self.error,
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> ExecResult:
        """Inverse of :meth:`to_wire`; raises ``ValueError`` on bad base64."""
        get = data.get
        stdout = get("stdout")
        stderr = get("stderr")
        return cls(
            exit_code=get("exit_code"),
            signal=get("signal"),
            stdout=binascii.a2b_base64(stdout) if stdout else b"",
            stderr=binascii.a2b_base64(stderr) if stderr else b"",
            stdout_truncated=bool(get("stdout_truncated")),
            stderr_truncated=bool(get("stderr_truncated")),
            duration=float(get("duration") or 0.0),
            timed_out=bool(get("timed_out")),
            sandboxed=bool(get("sandboxed")),
            error=get("error"),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool call as the model produced it (already parsed from text or ``tool_calls``)."""

    name: str
    arguments: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    id: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class ToolResult:
    """The observation returned to the model for one :class:`ToolCall`.

    Attributes:
        call_id: The :attr:`ToolCall.id` this answers.
        name: The tool's name.
        content: Text shown to the model.
        error: ``None`` on success, else a short kind: ``"timeout"``, ``"unknown_tool"``,
            ``"invalid_arguments"``, ``"sandbox_error"``, ``"tool_error"``, ``"nonzero_exit"``.
        exec: The underlying exec result for sandbox tools.
    """

    call_id: str
    name: str
    content: str
    error: str | None = None
    exec: ExecResult | None = None

    @property
    def ok(self) -> bool:
        """No error of any kind."""
        return self.error is None


_set_call_id, _set_name, _set_content, _set_error, _set_exec = _setters(ToolResult)


def _tool_result_init(
    self: ToolResult,
    call_id: str,
    name: str,
    content: str,
    error: str | None = None,
    exec: ExecResult | None = None,
) -> None:
    _set_call_id(self, call_id)
    _set_name(self, name)
    _set_content(self, content)
    _set_error(self, error)
    _set_exec(self, exec)


_fast_init(ToolResult, _tool_result_init)


class _ToolResultShape:
    """ToolResult's slots, writable: :func:`new_tool_result` fills one, then retypes it."""

    __slots__ = ToolResult.__slots__


def new_tool_result(
    call_id: str, name: str, content: str, error: str | None, exec: ExecResult | None
) -> ToolResult:
    """``ToolResult(call_id, name, content, error, exec)``, for the tool-call path (as
    :func:`new_exec_request`: the same frozen object at ~40% of the cost)."""
    result = _ToolResultShape()
    result.call_id = call_id  # type: ignore[attr-defined]
    result.name = name  # type: ignore[attr-defined]
    result.content = content  # type: ignore[attr-defined]
    result.error = error  # type: ignore[attr-defined]
    result.exec = exec  # type: ignore[attr-defined]
    result.__class__ = ToolResult  # type: ignore[assignment]
    return result  # type: ignore[return-value]


def _check_shapes() -> None:
    """The builders make exactly what the constructors make (fields in slot order)."""
    for cls in (ExecRequest, ToolResult):
        names = tuple(f.name for f in dataclasses.fields(cls))
        if cls.__slots__ != names:
            raise TypeError(f"{cls.__name__}.__slots__ is not its fields in order")
    ok = ExecResult(exit_code=0)
    args_r: tuple[Any, ...] = ("c", "d", {"K": "v"}, b"i", 2.5, 7)
    args_t: tuple[Any, ...] = ("i", "n", "text", "e", ok)
    for built, made in (
        (new_exec_request(*args_r), ExecRequest(*args_r)),
        (new_tool_result(*args_t), ToolResult(*args_t)),
    ):
        if type(built) is not type(made) or built != made:
            raise TypeError(f"the fast builder of {type(made).__name__} disagrees: {built!r}")


_check_shapes()

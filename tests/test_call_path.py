"""The tool-call path: one entry per context manager, one exec shape, deadlines against a
stubborn exec (real clock: a worker thread runs in real time), validators that agree with the
``jsonschema`` library on every tool schema in the repository."""

from __future__ import annotations

import dataclasses
import inspect
import threading
from collections.abc import Mapping
from typing import Any

import anyio
import anyio.to_thread
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from structenv import ExecRequest, ExecResult, ExecutorConfig, ToolCall, ToolExecutor, ToolResult
from structenv._types import DEFAULT_MAX_OUTPUT, _fast_init, new_exec_request, new_tool_result
from structenv.testing import FakeBackend, FakeSlot, assert_no_leaks
from structenv.tools import CommandTool, Tool, ToolContext, ToolRegistry, default_registry

pytestmark = pytest.mark.anyio


def _gated(gate: threading.Event) -> Any:
    async def handler(slot: FakeSlot, request: ExecRequest) -> ExecResult:
        # A blocking SDK call in a worker thread: cancellation cannot interrupt it.
        await anyio.to_thread.run_sync(gate.wait, 10)
        return ExecResult(exit_code=0, stdout=b"late\n")

    return handler


@pytest.mark.parametrize("window_ms", [0.0, 1.0])
async def test_deadline_holds_on_both_lanes_when_exec_ignores_cancellation(
    window_ms: float,
) -> None:
    # The defect: on the express lane (window 0) the caller waited for the thread and got the
    # answer after it; with cancellable_exec=False the watchdog answers at the deadline (0.5 s)
    # on both lanes and the slot is retired, not reset.
    gate = threading.Event()
    config = ExecutorConfig(batch_window_ms=window_ms, tool_deadline_grace=0.2)
    backend = FakeBackend(handler=_gated(gate))
    backend.cancellable_exec = False
    try:
        async with backend, ToolExecutor(backend, config=config) as executor:
            async with executor.trajectory() as traj:
                start = anyio.current_time()
                result = await traj.exec(ExecRequest("sleep 9", timeout=0.3))
                took = anyio.current_time() - start
                gate.set()
            assert result.timed_out and result.stdout == b"", result
            assert took < 3, took
            assert backend.destroyed == 1 and backend.resets == 0
        assert_no_leaks(executors=[executor], backends=[backend])
    finally:
        gate.set()


async def test_executor_and_backend_are_entered_once() -> None:
    async with FakeBackend() as backend:
        with pytest.raises(RuntimeError, match="entered"):
            async with backend:
                pass
        executor = ToolExecutor(backend)
        async with executor:
            with pytest.raises(RuntimeError, match="entered"):
                async with executor:
                    pass
            async with executor.trajectory() as traj:
                assert (await traj.exec(ExecRequest("true"))).exit_code == 0
        with pytest.raises(RuntimeError, match="entered once"):
            async with executor:
                pass
        assert_no_leaks(executors=[executor], backends=[backend])
    with pytest.raises(RuntimeError, match="entered"):
        async with backend:
            pass


async def test_unknown_tool_has_one_message() -> None:
    async with FakeBackend() as backend, ToolExecutor(backend) as executor:
        async with executor.trajectory() as traj:
            result = await traj.call(ToolCall("rm_rf", {}))
    assert result.error == "unknown_tool"
    assert result.content == (
        "error: unknown tool 'rm_rf'; available tools: read_file, terminal, write_file"
    )


# -- validators ------------------------------------------------------------------------


def _all_tools() -> list[Tool]:
    registry = default_registry()
    return [tool for name in registry.names() if (tool := registry.get(name)) is not None]


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)


@st.composite
def _arguments(draw: st.DrawFn, tool: Tool) -> dict[str, Any]:
    properties = dict(tool.parameters.get("properties", {}))
    keys = draw(st.lists(st.sampled_from(sorted(properties) or ["x"]), unique=True))
    args: dict[str, Any] = {}
    for key in keys:
        kind = properties.get(key, {}).get("type")
        typed = {
            "string": st.text(max_size=12) | st.sampled_from(["", "ls\n", "a\nb"]),
            "integer": st.integers(-5, 5),
            "boolean": st.booleans(),
        }.get(kind, _json)
        args[key] = draw(typed | _json)
    args.update(draw(st.dictionaries(st.text(max_size=4), _json, max_size=2)))
    return args


@pytest.mark.parametrize("tool", _all_tools(), ids=lambda t: t.name)
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_compiled_validator_agrees_with_jsonschema(tool: Tool, data: st.DataObject) -> None:
    registry = ToolRegistry([tool])
    reference = jsonschema.validators.validator_for(tool.parameters)(tool.parameters)
    args = data.draw(_arguments(tool))
    ours = registry.validate(ToolCall(tool.name, args))
    theirs = reference.is_valid(args)
    if (ours is None) == theirs:
        return
    # The one known difference: ``pattern`` is ECMA-262 in jsonschema-rs, where ``$`` does
    # not match before a final newline as Python's ``re`` does (docs/design.md).
    assert ours is not None and theirs, (args, ours)
    assert "pattern" in str(tool.parameters)
    assert any(isinstance(v, str) and v.endswith("\n") for v in args.values()), (args, ours)
    assert "does not match" in ours


# -- the inline CommandTool route and the hand-written __init__s ----------------------------


class _Echo(CommandTool):
    name = "echo"
    description = "echo the text"
    parameters: Mapping[str, Any] = {
        "type": "object",
        "properties": {"text": {"type": "string"}},
        "required": ["text"],
        "additionalProperties": False,
    }

    def request(self, ctx: ToolContext, call: ToolCall) -> ExecRequest:
        return ExecRequest(f"echo {call.arguments['text']}", timeout=ctx.tool_timeout)


class _LoudEcho(_Echo):
    """Overrides ``run``: the executor must run it, not the inline route."""

    name = "loud"

    async def run(self, ctx: ToolContext, call: ToolCall) -> ToolResult:
        result = await super().run(ctx, call)
        return dataclasses.replace(result, content=result.content.upper())


class _TerseEcho(_Echo):
    """Overrides ``result`` only: the inline route must use it."""

    name = "terse"

    def result(self, call: ToolCall, result: ExecResult) -> ToolResult:
        return ToolResult(call.id, call.name, result.stdout.decode().strip())


@pytest.mark.parametrize("window_ms", [0.0, 1.0])
async def test_exec_tool_runs_inline_and_an_overridden_run_is_kept(window_ms: float) -> None:
    # Both lanes: the express lane (an idle batcher, window 0) and the batched lane, which
    # Trajectory.call runs in its own frame.
    registry = ToolRegistry([_Echo(), _LoudEcho(), _TerseEcho()])
    config = ExecutorConfig(batch_window_ms=window_ms)
    async with (
        FakeBackend() as backend,
        ToolExecutor(backend, registry=registry, config=config) as executor,
    ):
        async with executor.trajectory() as traj:
            quiet = await traj.call(ToolCall("echo", {"text": "hi"}, id="1"))
            shout = await traj.call(ToolCall("loud", {"text": "hi"}, id="2"))
            terse = await traj.call(ToolCall("terse", {"text": "hi"}, id="3"))
        stats = executor.statistics()
    assert quiet == ToolResult("1", "echo", "hi\n\n[exit code: 0]", None, quiet.exec)
    assert quiet.exec is not None and quiet.exec.ok
    assert shout.content == "HI\n\n[EXIT CODE: 0]" and shout.call_id == "2"
    assert terse == ToolResult("3", "terse", "hi")
    assert stats.tool_calls == 3 and stats.call_latency.count == 3
    assert stats.exec_latency.count == 3


def test_fast_inits_keep_the_dataclass_contract() -> None:
    request = ExecRequest("ls", timeout=3.0)
    assert request == ExecRequest("ls", None, {}, None, 3.0, DEFAULT_MAX_OUTPUT)
    assert request.env == {} and request.env is not ExecRequest("ls").env
    assert dataclasses.replace(request, cwd="src").cwd == "src"
    assert str(inspect.signature(ExecRequest)).startswith(
        "(command: 'str', cwd: 'str | None' = None, env: 'Mapping[str, str]' = <factory>"
    )
    result = ToolResult("id", "terminal", "ok")
    assert (result.error, result.exec) == (None, None) and result.ok
    with pytest.raises(TypeError):
        ExecRequest()  # type: ignore[call-arg]
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.cwd = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.content = "x"  # type: ignore[misc]


_text = st.text(max_size=5)


@given(
    request=st.tuples(
        _text,
        st.none() | _text,
        st.dictionaries(_text, _text, max_size=2),
        st.none() | st.binary(max_size=4),
        st.floats(min_value=0.1, max_value=1e6),
        st.integers(min_value=0, max_value=1 << 30),
    ),
    result=st.tuples(_text, _text, _text, st.none() | _text, st.none() | st.just(ExecResult(0))),
)
def test_fast_builders_make_what_the_constructors_make(
    request: tuple[Any, ...], result: tuple[Any, ...]
) -> None:
    # new_exec_request/new_tool_result fill a same-slots object and assign __class__: the
    # object must be indistinguishable from the constructor's (type, equality, hash, repr,
    # frozenness, replace).
    for built, made in (
        (new_exec_request(*request), ExecRequest(*request)),
        (new_tool_result(*result), ToolResult(*result)),
    ):
        assert type(built) is type(made) and built == made and repr(built) == repr(made)
        assert dataclasses.astuple(built) == dataclasses.astuple(made)
        assert dataclasses.replace(built) == made
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(built, dataclasses.fields(built)[0].name, "x")
    if all(isinstance(v, str | None) for v in result[:4]) and result[4] is None:
        assert hash(new_tool_result(*result)) == hash(ToolResult(*result))


def test_fast_init_refuses_a_signature_that_drifts_from_the_fields() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Pair:
        a: int
        b: int = 1

    def wrong(self: Pair, a: int, b: int = 2) -> None:
        pass

    with pytest.raises(TypeError, match="does not match field 'b'"):
        _fast_init(Pair, wrong)

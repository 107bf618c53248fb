"""Tool-call parsing: every malformed attempt is an error, never a final answer."""

from __future__ import annotations

import json

import pytest

from structenv import ToolCall
from structenv.agent import parse_hermes, parse_message, parse_openai_tool_calls


def _call(name: str, arguments: object) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_plain_text_is_a_final_answer() -> None:
    parsed = parse_hermes("The answer is 42.")
    assert parsed.is_final_answer
    assert parsed.content == "The answer is 42."
    assert parsed.calls == []
    assert parsed.errors == []


def test_ordinary_json_in_an_answer_is_not_an_attempt() -> None:
    assert parse_hermes('Result: {"name": "Bob", "age": 3}').is_final_answer


def test_single_call() -> None:
    parsed = parse_hermes("Let me look.\n" + _call("terminal", {"command": "ls"}))
    assert parsed.calls == [ToolCall("terminal", {"command": "ls"}, "call_0")]
    assert parsed.errors == []
    assert parsed.content == "Let me look."
    assert not parsed.is_final_answer


def test_several_calls_and_string_arguments_and_id_start() -> None:
    text = (
        _call("a", {"x": 1})
        + '\n<tool_call>\n{"name": "b", "arguments": "{\\"y\\": [1, 2]}"}\n</tool_call>'
        + '<tool_call>{"name": "c"}</tool_call>'
    )
    parsed = parse_hermes(text, id_start=7)
    assert parsed.calls == [
        ToolCall("a", {"x": 1}, "call_7"),
        ToolCall("b", {"y": [1, 2]}, "call_8"),
        ToolCall("c", {}, "call_9"),
    ]
    assert parsed.errors == []


def test_list_in_one_block_and_code_fence() -> None:
    parsed = parse_hermes(
        '<tool_call>[{"name": "a"}, {"name": "b", "arguments": {}}]</tool_call>'
        '<tool_call>```json\n{"name": "c", "arguments": {"k": "v"}}\n```</tool_call>'
    )
    assert [c.name for c in parsed.calls] == ["a", "b", "c"]
    assert [c.id for c in parsed.calls] == ["call_0", "call_1", "call_2"]


def test_tags_inside_think_are_ignored() -> None:
    parsed = parse_hermes("<think>I could use <tool_call> here</think>Final: 3")
    assert parsed.is_final_answer
    assert parsed.content == "Final: 3"


MALFORMED = {
    "bad json": '<tool_call>{"name": "f", "arguments": {"a": 1}</tool_call>',
    "unclosed tag": '<tool_call>{"name": "f", "arguments": {"a": 1}}',
    "missing opening tag": '{"name": "f", "arguments": {"a": 1}}</tool_call>',
    "no tags at all": 'I will run {"name": "f", "arguments": {"a": 1}} now',
    "missing name": '<tool_call>{"arguments": {"a": 1}}</tool_call>',
    "empty name": '<tool_call>{"name": " ", "arguments": {}}</tool_call>',
    "arguments a list": '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
    "arguments a bad string": '<tool_call>{"name": "f", "arguments": "nope"}</tool_call>',
    "arguments a number string": '<tool_call>{"name": "f", "arguments": "3"}</tool_call>',
    "call not an object": "<tool_call>42</tool_call>",
    "empty block": "<tool_call>  </tool_call>",
    "near-miss tag": '<tool-call>{"name": "f"}</tool-call>',
    "reopened before close": '<tool_call>{"name": "f"}<tool_call>{"name": "g"}</tool_call>',
}


@pytest.mark.parametrize("text", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_call_is_an_error_not_a_final_answer(text: str) -> None:
    parsed = parse_hermes(text)
    assert parsed.errors, text
    assert not parsed.is_final_answer
    for error in parsed.errors:
        assert error.message
        assert len(error.raw) <= 503


def test_good_and_bad_calls_in_one_message_keep_both() -> None:
    parsed = parse_hermes(_call("ok", {}) + "<tool_call>{oops}</tool_call>")
    assert [c.name for c in parsed.calls] == ["ok"]
    assert len(parsed.errors) == 1
    assert "not valid JSON" in parsed.errors[0].message


def test_openai_tool_calls() -> None:
    calls, errors = parse_openai_tool_calls(
        [
            {"id": "abc", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
            {"type": "function", "function": {"name": "g", "arguments": {"b": 2}}},
            {"function": {"name": "h", "arguments": ""}},
        ]
    )
    assert errors == []
    assert calls == [
        ToolCall("f", {"a": 1}, "abc"),
        ToolCall("g", {"b": 2}, "call_1"),
        ToolCall("h", {}, "call_2"),
    ]


@pytest.mark.parametrize(
    "entry",
    [
        {"id": "x", "type": "function", "function": {"name": "f", "arguments": "{bad"}},
        {"id": "x", "type": "function", "function": {"name": "f", "arguments": "[1]"}},
        {"id": "x", "type": "function", "function": {"arguments": "{}"}},
        {"id": "x", "type": "retrieval", "function": {"name": "f"}},
        {"id": "x"},
        "not an object",
    ],
)
def test_malformed_openai_tool_call(entry: object) -> None:
    calls, errors = parse_openai_tool_calls([entry])
    assert calls == []
    assert len(errors) == 1
    if isinstance(entry, dict):
        assert errors[0].call_id == "x"


def test_parse_message_prefers_native_calls() -> None:
    native = [{"id": "n1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    parsed = parse_message("thinking aloud", native)
    assert parsed.calls == [ToolCall("f", {}, "n1")]
    assert parsed.content == "thinking aloud"
    assert parse_message(_call("g", {})).calls[0].name == "g"
    assert parse_message("done", []).is_final_answer

"""The tiny tokenizer: builds offline, loads with AutoTokenizer, agrees with TinyCodec."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from structenv.agent import TinyCodec, build_tiny_tokenizer

pytest.importorskip("transformers")

SAMPLES = [
    "plain ascii",
    "héllo wörld ☃ 🎉 \x00\t\n",
    '<tool_call>\n{"name": "f"}\n</tool_call><think>x</think>',
    "<|im_start|>user\nhi<|im_end|>\n<tool_response>ok</tool_response>",
    "<tool_call<tool_call>>",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny")


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir: Path, monkeypatch_module: pytest.MonkeyPatch) -> Any:
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_build_is_cached_and_complete(tokenizer_dir: Path) -> None:
    assert (tokenizer_dir / ".complete").is_file()
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "<|im_start|>" in config["chat_template"]
    mtime = (tokenizer_dir / "tokenizer.json").stat().st_mtime_ns
    assert build_tiny_tokenizer(tokenizer_dir) == tokenizer_dir
    assert (tokenizer_dir / "tokenizer.json").stat().st_mtime_ns == mtime
    assert not [p for p in tokenizer_dir.parent.iterdir() if p.name.startswith(".")]


def test_specials_and_added_tokens(hf_tokenizer: Any) -> None:
    tok: Any = hf_tokenizer
    codec = TinyCodec()
    assert tok.eos_token == "<|im_end|>"
    assert tok.convert_tokens_to_ids("<|im_end|>") == codec.eos_token_id
    for token, token_id in codec.token_to_id.items():
        assert tok.convert_tokens_to_ids(token) == token_id
    # Hermes tags are not special: they survive skip_special_tokens, ChatML markers do not.
    ids = codec.encode("<|im_start|>a<tool_call>b</tool_call><|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "a<tool_call>b</tool_call>"


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_and_codec_agreement(hf_tokenizer: Any, text: str) -> None:
    tok: Any = hf_tokenizer
    codec = TinyCodec()
    ids = tok.encode(text, add_special_tokens=True)
    assert ids == codec.encode(text)
    assert tok.decode(ids) == text == codec.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == codec.decode(ids, skip_special_tokens=True)


def test_chat_template_returns_token_ids(hf_tokenizer: Any) -> None:
    tok: Any = hf_tokenizer
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "content": "<tool_response>ok</tool_response>"},
    ]
    ids = tok.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=True
    )
    assert isinstance(ids, list)
    assert all(isinstance(i, int) for i in ids)
    text = TinyCodec().decode(ids)
    assert text.startswith("<|im_start|>system\nbe brief<|im_end|>\n")
    assert '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>' in text
    assert text.endswith("<|im_start|>assistant\n")


def test_codec_rejects_unknown_ids() -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TinyCodec().decode([100_000])

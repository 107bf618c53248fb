"""A tiny byte-level tokenizer with a ChatML template, for running offline without a model hub.

Every byte is one token (256 byte symbols, no merges); ``<|endoftext|> <|im_start|> <|im_end|>``
are special tokens and the Hermes tags (``<tool_call>``, ``<think>``, ``<tool_response>`` and
their closers) are *non-special* added tokens, so they survive ``skip_special_tokens=True`` in
decoded completions (atroposlib decodes completions that way).

Two views of the same vocabulary live here:

* :func:`build_tiny_tokenizer` writes a Hugging Face tokenizer directory (``tokenizer.json`` +
  ``tokenizer_config.json`` with the chat template) that ``AutoTokenizer.from_pretrained(dir)``
  loads offline. It needs the optional ``tokenizers`` and ``transformers`` packages, imported
  lazily inside the function so the core never depends on them.
* :class:`TinyCodec` is a pure-Python encoder/decoder producing exactly the same ids, used by
  the scripted policy server so serving needs neither package.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "ADDED_TOKENS",
    "CHATML_TEMPLATE",
    "SPECIAL_TOKENS",
    "TinyCodec",
    "build_tiny_tokenizer",
    "default_tokenizer_dir",
]

#: Special tokens, ids 256, 257, 258.
SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: Non-special added tokens, ids 259 onwards.
ADDED_TOKENS: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<think>",
    "</think>",
    "<tool_response>",
    "</tool_response>",
)
#: Bump when the vocabulary or the template changes: it names the cache directory.
_VERSION = "1"

CHATML_TEMPLATE = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- messages[0]['content'] + '\\n\\n' -}}"
    "{%- endif -%}"
    "{{- '# Tools\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools><|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (tools and loop.first and message['role'] == 'system') -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- endif -%}"
    "{%- if message.get('tool_calls') -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set fn = call['function'] if call.get('function') else call -%}"
    "{%- set args = fn.get('arguments', {}) -%}"
    "{{- '\\n<tool_call>\\n{\"name\": ' + (fn['name'] | tojson) + ', \"arguments\": ' -}}"
    "{{- (args if args is string else (args | tojson)) + '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2's convention).

    Printable Latin-1 bytes map to themselves; the others are shifted past 255 so every byte
    has a visible, whitespace-free symbol.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table: dict[int, str] = {}
    shift = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


class TinyCodec:
    """Pure-Python encode/decode with the tiny tokenizer's exact ids.

    Ids 0-255 are the bytes themselves, then :data:`SPECIAL_TOKENS`, then :data:`ADDED_TOKENS`.
    Added tokens are matched leftmost-longest anywhere in the text, as ``tokenizers`` does.
    """

    def __init__(self) -> None:
        self.byte_symbols = _bytes_to_unicode()
        self.added: tuple[str, ...] = SPECIAL_TOKENS + ADDED_TOKENS
        self.token_to_id = {tok: 256 + i for i, tok in enumerate(self.added)}
        self.special_ids = frozenset(self.token_to_id[t] for t in SPECIAL_TOKENS)
        ordered = sorted(self.added, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(t) for t in ordered))

    @property
    def vocab_size(self) -> int:
        """Number of ids (256 bytes plus the added tokens)."""
        return 256 + len(self.added)

    @property
    def eos_token_id(self) -> int:
        """Id of ``<|im_end|>``, the end of an assistant turn."""
        return self.token_to_id["<|im_end|>"]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        ids: list[int] = []
        pos = 0
        for match in self._pattern.finditer(text):
            ids.extend(text[pos : match.start()].encode())
            ids.append(self.token_to_id[match.group()])
            pos = match.end()
        ids.extend(text[pos:].encode())
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD. Raises ``ValueError`` on unknown ids."""
        parts: list[str] = []
        buf = bytearray()
        for i in ids:
            if 0 <= i < 256:
                buf.append(i)
                continue
            if not 256 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary")
            if buf:
                parts.append(buf.decode(errors="replace"))
                buf.clear()
            if not (skip_special_tokens and i in self.special_ids):
                parts.append(self.added[i - 256])
        if buf:
            parts.append(buf.decode(errors="replace"))
        return "".join(parts)

    def token_text(self, token_id: int) -> str:
        """The vocabulary symbol of one id (byte-level character or added token)."""
        if 0 <= token_id < 256:
            return self.byte_symbols[token_id]
        return self.added[token_id - 256]

    def token_bytes(self, token_id: int) -> list[int]:
        """The UTF-8 bytes one id stands for (OpenAI's ``logprobs.content[*].bytes``)."""
        if 0 <= token_id < 256:
            return [token_id]
        return list(self.added[token_id - 256].encode())


def default_tokenizer_dir() -> Path:
    """Where :func:`build_tiny_tokenizer` caches by default.

    ``$STRUCTENV_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/structenv`` (``~/.cache/structenv``).
    """
    root = os.environ.get("STRUCTENV_CACHE_DIR")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "structenv"
    return base / f"tiny-tokenizer-v{_VERSION}"


def build_tiny_tokenizer(directory: str | os.PathLike[str] | None = None) -> Path:
    """Build the tiny tokenizer into ``directory`` on first use and return the directory.

    An existing complete build is reused. The build happens in a temporary sibling directory
    that is renamed into place, so a concurrent builder or a crash never leaves a half-written
    tokenizer behind. Blocking (file I/O, ~1 s): from async code call it through
    ``anyio.to_thread.run_sync``.

    Raises:
        ModuleNotFoundError: ``tokenizers``/``transformers`` are missing (``structenv[atropos]``).
    """
    target = Path(directory) if directory is not None else default_tokenizer_dir()
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _write_tokenizer(staging)
        (staging / ".complete").write_text(_VERSION)
        if target.exists() and not (target / ".complete").is_file():
            shutil.rmtree(target, ignore_errors=True)  # a stale partial build of an old layout
        try:
            staging.rename(target)
        except OSError:
            if not (target / ".complete").is_file():  # someone else won the race: fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_tokenizer(out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = _bytes_to_unicode()
    vocab = {symbols[b]: b for b in range(256)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    expected = TinyCodec().token_to_id
    for token, token_id in expected.items():
        if core.token_to_id(token) != token_id:  # pragma: no cover - tokenizers changed
            raise RuntimeError(f"tiny tokenizer: {token!r} got id {core.token_to_id(token)}")

    # Typed as Any: transformers' annotations differ between 4.x and 5.x.
    wrapper: Any = PreTrainedTokenizerFast
    fast = wrapper(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(out))
    _patch_config(out / "tokenizer_config.json")


def _patch_config(path: Path) -> None:
    # transformers 5 records its own backend class name; 4.x cannot load that, and
    # PreTrainedTokenizerFast loads everywhere. The template is also pinned in the config for
    # versions that do not read chat_template.jinja.
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = CHATML_TEMPLATE
    config["clean_up_tokenization_spaces"] = False
    config.pop("auto_map", None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

"""``structenv view``: a static, escaped HTML page of scored rollouts (a JSONL of groups).

Reads the ``ScoredDataGroup`` lines that Atropos ``process`` mode (and ``structenv demo``)
write and renders one self-contained HTML file:

* every text from the data — model output, tool results, file contents a sandbox ``cat``-ed —
  is HTML-escaped by jinja2's autoescape, and the page carries a Content-Security-Policy
  ``<meta>`` that allows no script at all and only the page's own stylesheet (by hash), so
  even a bug in the escaping cannot run code from the data;
* ``<tool_call>`` and ``<tool_response>`` blocks (and native ``tool_calls``) are shown as tool
  calls and tool results, their string arguments with real line breaks;
* the system prompt (with its tool schema) is shown once per group when the members share it;
* each group shows its task id, its rounded scores and the failure reason of each failed
  member (from the ``structenv`` key that :class:`~structenv.adapters.atropos.AgentEnv` adds
  to every group: ``{"task_id": str, "failures": [str | None, ...]}``);
* the run gets a score histogram (an inline SVG, no script).

No JavaScript: groups and members fold with ``<details>``.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["load_groups", "main", "render_html", "write_html"]

_BLOCK = re.compile(
    r"<(tool_call|tool_response|think)>\s*(.*?)\s*</\1>",
    re.DOTALL,
)


@dataclasses.dataclass(slots=True)
class Part:
    """One piece of a message: ``text``, ``think``, ``tool_call`` or ``tool_result``."""

    kind: str
    text: str = ""
    name: str = ""
    args: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    error: str = ""


@dataclasses.dataclass(slots=True)
class Turn:
    role: str
    parts: list[Part]


@dataclasses.dataclass(slots=True)
class Member:
    index: int
    score: str
    failure: str | None
    masked: bool
    turns: list[Turn]
    system: str | None


@dataclasses.dataclass(slots=True)
class Group:
    index: int
    task_id: str
    scores: list[str]
    mean: str
    failed: int
    system: str | None
    members: list[Member]


@dataclasses.dataclass(slots=True)
class Bar:
    x: float
    y: float
    height: float
    count: int
    label: str


def fmt_score(value: Any) -> str:
    """A score rounded to 3 decimals, without trailing zeros (``1``, ``0.75``, ``0.333``)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number) or math.isinf(number):
        return str(number)
    text = f"{number:.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts
        return "\n".join(
            str(p.get("text", "")) if isinstance(p, Mapping) else str(p) for p in value
        )
    return "" if value is None else json.dumps(value, ensure_ascii=False)


def _arg_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, indent=2)


def _call_part(raw: str) -> Part:
    try:
        call = json.loads(raw)
    except json.JSONDecodeError as exc:
        return Part("tool_call", text=raw, error=f"malformed tool call: {exc.msg}")
    if not isinstance(call, Mapping):
        return Part("tool_call", text=raw, error="malformed tool call: not an object")
    args = call.get("arguments", {})
    if isinstance(args, str):  # OpenAI style: arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return Part("tool_call", name=str(call.get("name", "")), text=args)
    if not isinstance(args, Mapping):
        return Part("tool_call", name=str(call.get("name", "")), text=_arg_value(args))
    return Part(
        "tool_call",
        name=str(call.get("name", "")),
        args=[(str(k), _arg_value(v)) for k, v in args.items()],
    )


def _result_part(raw: str, name: str = "") -> Part:
    try:
        body = json.loads(raw)
    except json.JSONDecodeError:
        return Part("tool_result", name=name, text=raw)
    if not isinstance(body, Mapping):
        return Part("tool_result", name=name, text=_arg_value(body))
    error = body.get("error")
    return Part(
        "tool_result",
        name=str(body.get("name") or name),
        text=_text(body.get("content", "")),
        error="" if error is None else _text(error),
    )


def _split(content: str, *, tool_name: str = "") -> list[Part]:
    """Text, ``<think>``, ``<tool_call>`` and ``<tool_response>`` blocks, in order."""
    parts: list[Part] = []
    pos = 0
    for match in _BLOCK.finditer(content):
        before = content[pos : match.start()].strip()
        if before:
            parts.append(Part("text", text=before))
        tag, body = match.group(1), match.group(2)
        if tag == "tool_call":
            parts.append(_call_part(body))
        elif tag == "tool_response":
            parts.append(_result_part(body, tool_name))
        else:
            parts.append(Part("think", text=body))
        pos = match.end()
    rest = content[pos:].strip()
    if rest:
        parts.append(Part("text", text=rest))
    return parts


def parse_message(message: Mapping[str, Any]) -> Turn:
    """A chat message as a :class:`Turn` of typed parts."""
    role = str(message.get("role", "?"))
    content = _text(message.get("content"))
    name = str(message.get("name") or "")
    parts = _split(content, tool_name=name)
    if role == "tool" and not any(p.kind == "tool_result" for p in parts):
        parts = [Part("tool_result", name=name, text=content)]
    for call in message.get("tool_calls") or []:
        if isinstance(call, Mapping):
            function = call.get("function", call)
            if isinstance(function, Mapping):
                parts.append(_call_part(json.dumps(function)))
    return Turn(role, parts)


def load_groups(path: str | Path) -> list[dict[str, Any]]:
    """The groups of a JSONL file (blank lines skipped).

    Raises:
        ValueError: A line is not a JSON object (the message names the line).
    """
    groups: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                group = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(group, dict):
                raise ValueError(f"{path}:{number}: not a JSON object")
            groups.append(group)
    return groups


def _system_of(messages: Sequence[Any]) -> str | None:
    if messages and isinstance(messages[0], Mapping) and messages[0].get("role") == "system":
        return _text(messages[0].get("content"))
    return None


def _group(index: int, raw: Mapping[str, Any]) -> Group:
    scores = list(raw.get("scores") or [])
    conversations = list(raw.get("messages") or [])
    masks = list(raw.get("masks") or [])
    extra_raw = raw.get("structenv")
    extra: Mapping[str, Any] = extra_raw if isinstance(extra_raw, Mapping) else {}
    failures = list(extra.get("failures") or [])
    size = max(len(scores), len(conversations))
    systems = {_system_of(c) for c in conversations if isinstance(c, list)}
    shared = systems.pop() if len(systems) == 1 else None
    members = []
    for i in range(size):
        conversation = conversations[i] if i < len(conversations) else []
        if not isinstance(conversation, list):
            conversation = []
        own_system = _system_of(conversation)
        body = conversation[1:] if own_system is not None else conversation
        mask = masks[i] if i < len(masks) and isinstance(masks[i], list) else None
        failure = failures[i] if i < len(failures) else None
        members.append(
            Member(
                index=i,
                score=fmt_score(scores[i]) if i < len(scores) else "?",
                failure=None if failure is None else str(failure),
                masked=mask is not None and bool(mask) and all(m == -100 for m in mask),
                turns=[parse_message(m) for m in body if isinstance(m, Mapping)],
                system=None if shared is not None else own_system,
            )
        )
    numeric = [float(s) for s in scores if isinstance(s, int | float)]
    return Group(
        index=index,
        task_id=str(extra.get("task_id") or ""),
        scores=[m.score for m in members],
        mean=fmt_score(sum(numeric) / len(numeric)) if numeric else "?",
        failed=sum(m.failure is not None for m in members),
        system=shared,
        members=members,
    )


#: Geometry of the histogram's SVG.
_W, _H, _PAD = 480, 160, 24


def histogram(scores: Iterable[float], bins: int = 10) -> tuple[list[Bar], str, str]:
    """Bars of an SVG histogram of ``scores`` and the axis' low and high labels."""
    values = [s for s in scores if math.isfinite(s)]
    if not values:
        return [], "", ""
    low, high = min(values), max(values)
    if low >= 0.0 and high <= 1.0:
        low, high = 0.0, 1.0
    if high == low:
        bins, high = 1, low + 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - low) / (high - low) * bins))] += 1
    width = (_W - 2 * _PAD) / bins
    top = max(counts)
    bars = []
    for i, count in enumerate(counts):
        h = (_H - 2 * _PAD) * count / top
        lo = low + (high - low) * i / bins
        hi = low + (high - low) * (i + 1) / bins
        bars.append(
            Bar(
                x=_PAD + i * width,
                y=_H - _PAD - h,
                height=h,
                count=count,
                label=f"[{fmt_score(lo)}, {fmt_score(hi)}{']' if i == bins - 1 else ')'}",
            )
        )
    return bars, fmt_score(low), fmt_score(high)


def _template_text(name: str) -> str:
    return resources.files("structenv").joinpath("templates", name).read_text("utf-8")


def render_html(groups: Sequence[Mapping[str, Any]], *, title: str = "rollouts") -> str:
    """The HTML page of ``groups`` (see the module docstring)."""
    import jinja2

    env = jinja2.Environment(
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        loader=jinja2.FunctionLoader(_template_text),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    css = _template_text("rollouts.css")
    digest = base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()
    csp = (
        "default-src 'none'; script-src 'none'; object-src 'none'; base-uri 'none'; "
        f"form-action 'none'; img-src 'none'; style-src 'sha256-{digest}'"
    )
    views = [_group(i, g) for i, g in enumerate(groups)]
    all_scores = [
        float(s) for g in groups for s in (g.get("scores") or []) if isinstance(s, int | float)
    ]
    bars, low, high = histogram(all_scores)
    return env.get_template("rollouts.html.j2").render(
        title=title,
        csp=csp,
        css=css,
        groups=views,
        n_members=sum(len(g.members) for g in views),
        n_failed=sum(g.failed for g in views),
        mean=fmt_score(sum(all_scores) / len(all_scores)) if all_scores else "?",
        bars=bars,
        low=low,
        high=high,
        width=_W,
        height=_H,
        pad=_PAD,
    )


def write_html(jsonl: str | Path, output: str | Path | None = None) -> Path:
    """Render ``jsonl`` to ``output`` (default: beside it, ``.html``); return the path.

    Raises:
        OSError: The file cannot be read or written.
        ValueError: A line is not a JSON object.
    """
    source = Path(jsonl)
    target = Path(output) if output is not None else source.with_suffix(".html")
    page = render_html(load_groups(source), title=source.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """``structenv view FILE.jsonl [-o OUT.html]``."""
    parser = argparse.ArgumentParser(
        prog="structenv view",
        description="Write an escaped, script-free HTML view of a JSONL of scored groups.",
    )
    parser.add_argument("jsonl", help="scored groups, one JSON object per line")
    parser.add_argument("-o", "--output", help="the HTML file (default: FILE.html beside it)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        target = write_html(args.jsonl, args.output)
    except (OSError, ValueError) as exc:
        print(f"structenv view: {exc}", file=sys.stderr)
        return 1
    print(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

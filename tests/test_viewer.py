"""The rollout viewer (``structenv view``, and the HTML that process mode writes).

Rendering is checked on the parsed structure and, as a person would see it, in a real
headless Chromium (Debian's ``chromium``): ``--dump-dom`` returns the DOM after the page ran,
so a payload that executed would show in the title or the body. The payload is written by
the (scripted) model into a file in a real sandbox and ``cat``-ed back by the sandbox.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import atroposlib  # noqa: F401  (the atropos extra is part of the dev install)
import pytest

from structenv._viewer import fmt_score, histogram, load_groups, main, parse_message, render_html
from structenv.agent import build_tiny_tokenizer
from structenv.testing import ReplayScript, ReplayStep, child_processes, serve_policy_server

#: Runs if markup from the data is ever executed: it changes the title and marks the body.
PAYLOAD = (
    "<script>document.title='PWNED';document.body.setAttribute('data-pwned','script')"
    "</script>\n</pre><img src=x onerror=\"document.title='PWNED';"
    "document.body.setAttribute('data-pwned','onerror')\">\n"
    "<svg onload=\"document.title='PWNED'\"></svg>"
)


def chromium_dom(page: Path, tmp_path: Path) -> str:
    """The DOM of ``page`` after Chromium loaded it and ran whatever it would run."""
    exe = shutil.which("chromium")
    assert exe is not None, "chromium is missing: apt-get install chromium (README install line)"
    proc = subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=3000",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _group(**extra: Any) -> dict[str, Any]:
    system = {"role": "system", "content": 'You have tools.\n<tools>[{"name": "terminal"}]</tools>'}
    members = [
        [
            system,
            {"role": "user", "content": "Fix it.\n\n[task:t1]"},
            {
                "role": "assistant",
                "content": "<think>look first</think>\nLet me look.\n<tool_call>\n"
                '{"name": "terminal", "arguments": {"command": "cat a.txt\\nls"}}\n</tool_call>',
            },
            {
                "role": "tool",
                "name": "terminal",
                "content": '<tool_response>\n{"name": "terminal", "content": "line1\\nline2"}'
                "\n</tool_response>",
            },
            {"role": "assistant", "content": "Done."},
        ],
        [system, {"role": "user", "content": "Fix it.\n\n[task:t1]"}],
    ]
    return {
        "tokens": [[1, 2], [1, 2]],
        "masks": [[-100, 2], [-100, -100]],
        "scores": [0.6666666, 0.0],
        "messages": members,
        "structenv": {"task_id": "t1", "failures": [None, "policy_error: connection refused"]},
        **extra,
    }


def test_messages_become_text_calls_and_results() -> None:
    turn = parse_message(_group()["messages"][0][2])
    assert [p.kind for p in turn.parts] == ["think", "text", "tool_call"]
    call = turn.parts[2]
    assert call.name == "terminal"
    assert call.args == [("command", "cat a.txt\nls")]  # a real newline, not "\\n"
    result = parse_message(_group()["messages"][0][3]).parts
    assert [(p.kind, p.name, p.text) for p in result] == [
        ("tool_result", "terminal", "line1\nline2")
    ]
    native = parse_message(
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "ls", "arguments": '{"path": "."}'}}],
        }
    )
    assert [(p.kind, p.name, p.args) for p in native.parts] == [
        ("tool_call", "ls", [("path", ".")])
    ]
    bad = parse_message({"role": "assistant", "content": "<tool_call>{nope</tool_call>"})
    assert bad.parts[0].kind == "tool_call" and bad.parts[0].error.startswith("malformed")
    plain = parse_message({"role": "tool", "content": "raw output"})
    assert [(p.kind, p.text) for p in plain.parts] == [("tool_result", "raw output")]


def test_scores_round_and_histogram_counts() -> None:
    assert [fmt_score(s) for s in (1.0, 0.75, 2 / 3, 0.0, -0.5, "x")] == [
        "1", "0.75", "0.667", "0", "-0.5", "x",
    ]  # fmt: skip
    bars, low, high = histogram([0.0, 0.05, 1.0, 1.0])
    assert (low, high, len(bars)) == ("0", "1", 10)
    assert [b.count for b in bars] == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    bars, low, high = histogram([3.0, 3.0])
    assert [b.count for b in bars] == [2] and (low, high) == ("3", "4")
    assert histogram([]) == ([], "", "")


def test_view_cli_and_loud_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jsonl = tmp_path / "run.jsonl"
    jsonl.write_text(json.dumps(_group()) + "\n\n")
    assert main([str(jsonl), "-o", str(tmp_path / "x" / "v.html")]) == 0
    assert (tmp_path / "x" / "v.html").is_file()
    assert capsys.readouterr().out.strip() == str(tmp_path / "x" / "v.html")
    assert main([str(jsonl)]) == 0
    assert jsonl.with_suffix(".html").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_group()) + "\n{oops\n")
    assert main([str(bad)]) == 1
    assert (
        capsys.readouterr().err.strip()
        == f"structenv view: {bad}:2: not JSON (Expecting property name enclosed in double quotes)"
    )
    assert main([str(tmp_path / "missing.jsonl")]) == 1
    assert "No such file" in capsys.readouterr().err


def test_console_script_view(tmp_path: Path) -> None:
    jsonl = tmp_path / "run.jsonl"
    jsonl.write_text(json.dumps(_group()) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "structenv._cli", "view", str(jsonl)],
        capture_output=True, text=True, timeout=60, check=False,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == jsonl.with_suffix(".html")


def test_page_in_chromium_shows_calls_results_scores_and_failures(tmp_path: Path) -> None:
    group = _group()
    group["messages"][0][3]["content"] = (
        "<tool_response>\n"
        + json.dumps({"name": "terminal", "content": PAYLOAD})
        + "\n</tool_response>"
    )
    group["messages"][0][4]["content"] = PAYLOAD  # the model's own text, too
    page = tmp_path / "v.html"
    page.write_text(render_html([group, _group()], title="<b>run</b>"))
    dom = chromium_dom(page, tmp_path)
    assert "PWNED" not in dom.split("<body")[0]  # the title was not changed
    assert "data-pwned" not in dom.split("<body", 1)[1].split(">", 1)[0]
    assert "<title>&lt;b&gt;run&lt;/b&gt;</title>" in dom
    assert "&lt;script&gt;document.title='PWNED'" in dom  # shown as text
    assert "<img" not in dom and "<script" not in dom
    assert "Content-Security-Policy" in dom and "script-src 'none'" in dom
    # Tool calls and results as such, real newlines, one system prompt per group.
    assert dom.count('class="call"') == 2 and dom.count('class="result"') == 2
    assert "cat a.txt\nls" in dom and "line1\nline2" in dom
    assert dom.count("You have tools.") == 2  # once per group, not per member
    assert dom.count("system prompt (shared by the group)") == 2
    # Task id, rounded scores, failure reasons, the histogram.
    assert '<span class="task">t1</span>' in dom
    assert '<span class="score">0.667</span>' in dom and "0.6666666" not in dom
    assert dom.count("failed: policy_error: connection refused") == 2
    assert dom.count("(masked)") == 2
    assert "score histogram" in dom and dom.count("<rect") == 10


def test_the_detection_works_on_an_unescaped_page(tmp_path: Path) -> None:
    """Control: the same payload in a page without escaping does run in this Chromium."""
    page = tmp_path / "raw.html"
    page.write_text(
        "<!DOCTYPE html><html><head><title>ok</title></head>"
        f"<body><pre>{PAYLOAD}</pre></body></html>"
    )
    dom = chromium_dom(page, tmp_path)
    assert "<title>PWNED</title>" in dom and "data-pwned" in dom


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny")


# atroposlib is asyncio-only (aiohttp, asyncio.create_task): asyncio only.
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_process_mode_writes_our_view_and_sandbox_output_does_not_run(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    """The model writes a payload into a file, the sandbox ``cat``-s it; process mode writes the
    view (structenv's, not atroposlib's) and Chromium runs none of it."""
    import atroposlib.envs.base as base
    from atroposlib.envs.base import APIServerConfig

    from structenv.examples.shell_tasks import ShellTasksEnv, ShellTasksEnvConfig

    original = base.generate_html
    write = json.dumps({"name": "write_file", "arguments": {"path": "p.html", "content": PAYLOAD}})
    cat = json.dumps({"name": "terminal", "arguments": {"command": "cat p.html"}})
    steps = [
        ReplayStep(f"<tool_call>\n{write}\n</tool_call>"),
        ReplayStep(f"<tool_call>\n{cat}\n</tool_call>"),
        ReplayStep("Done. " + PAYLOAD),
    ]
    out = tmp_path / "groups.jsonl"
    async with serve_policy_server(ReplayScript({"fix-add": steps})) as server:
        config = ShellTasksEnvConfig(
            task_ids=["fix-add"],
            group_size=2,
            total_steps=1,
            tokenizer_name=str(tokenizer_dir),
            use_wandb=False,
            include_messages=True,
            ensure_scores_are_not_same=False,
            data_path_to_save_groups=str(out),
            backend_options={"slots_per_host": 2},
            agent_max_steps=4,
            trajectory_timeout_s=300,  # generous: CI machines can be slow
        )
        api = APIServerConfig(
            server_type="vllm", base_url=server.base_url, model_name="scripted",
            tokenizer_name=str(tokenizer_dir), api_key="x", health_check=False,
        )  # fmt: skip
        env = ShellTasksEnv(config, [api])
        env.process_mode = True
        env.n_groups_to_process = 1
        env.group_size_to_process = 2
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Trainer requested to ignore max length")
            await env.process_manager()
    assert base.generate_html is original  # restored after the run
    assert not child_processes()
    (group,) = load_groups(out)
    assert group["structenv"] == {"task_id": "fix-add", "failures": [None, None]}
    tool_outputs = [m["content"] for m in group["messages"][0] if m["role"] == "tool"]
    assert any("<script>document.title" in t for t in tool_outputs)
    page = out.with_suffix(".html")
    dom = chromium_dom(page, tmp_path)
    assert "PWNED" not in dom.split("<body")[0]
    assert "data-pwned" not in dom.split("<body", 1)[1].split(">", 1)[0]
    assert '<span class="task">fix-add</span>' in dom
    assert "&lt;script&gt;document.title='PWNED'" in dom
    assert dom.count('class="call"') == 4  # write_file + terminal, per member

"""``structenv run MODULE:Env --offline`` and the programmatic ``await env.process_manager()``,
as a user runs them: a new env module in a fresh directory, a fresh process, no model hub."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import atroposlib  # noqa: F401  (the atropos extra is part of the dev install)
import pytest

from structenv.testing import child_processes

#: The smallest env of docs/writing-an-env.md, plus what --offline needs: a task marker in
#: the prompt and offline_solutions().
HELLO_ENV = textwrap.dedent(
    """
    from structenv.adapters import ExecTool
    from structenv.adapters.atropos import AgentEnv, AgentEnvConfig
    from structenv.agent import AgentResult, AgentTask
    from structenv.testing import task_marker


    def tool_call(name, **arguments):
        import json
        call = json.dumps({"name": name, "arguments": arguments})
        return f"<tool_call>\\n{call}\\n</tool_call>"


    class HelloFileEnv(AgentEnv):
        name = "hello_file"
        env_config_cls = AgentEnvConfig

        async def get_next_item(self):
            return {"name": "world"}

        def build_task(self, item) -> AgentTask:
            return AgentTask(
                prompt=f"Create hello.txt containing 'hello {item['name']}'. {task_marker('hello')}"
            )

        @classmethod
        def offline_solutions(cls, config):
            return {"hello": [
                tool_call("write_file", path="hello.txt", content="hello world\\n"),
                "Done.",
            ]}

        async def verify_and_score_trajectory(self, item, result, *, trajectory_id, exec_tool):
            check = await exec_tool.run(f"grep -qx 'hello {item['name']}' hello.txt")
            return 1.0 if check.exit_code == 0 else 0.0
    """
)


def _structenv() -> str:
    exe = shutil.which("structenv")
    assert exe is not None, "the structenv console script is not installed"
    return exe


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache of this module's own (the first run builds the tiny tokenizer in it)."""
    return tmp_path_factory.mktemp("cache")


def _user_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["STRUCTENV_CACHE_DIR"] = str(cache)
    env["HF_HUB_OFFLINE"] = "1"  # any hub access would fail instead of waiting
    return env


def test_run_offline_a_new_env_from_a_fresh_process(tmp_path: Path, cache_dir: Path) -> None:
    (tmp_path / "hello_env.py").write_text(HELLO_ENV)
    out = tmp_path / "out"
    proc = subprocess.run(
        [_structenv(), "run", "hello_env:HelloFileEnv", "--offline", "--groups", "2",
         "--group-size", "2", "--mistake-rate", "0", "--out", str(out), "--quiet",
         "--env.agent_max_steps", "4", "--env.enabled_toolsets", "default"],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
        env=_user_env(cache_dir),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    groups = [json.loads(line) for line in (out / "HelloFileEnv.jsonl").read_text().splitlines()]
    assert len(groups) == 2
    assert [g["scores"] for g in groups] == [[1.0, 1.0], [1.0, 1.0]]
    assert all(g["structenv"]["failures"] == [None, None] for g in groups)
    assert "groups" in proc.stdout and str(out / "HelloFileEnv.jsonl") in proc.stdout


def test_run_refuses_bad_input_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from structenv.adapters.atropos._run import main

    (tmp_path / "hello_env.py").write_text(
        HELLO_ENV.replace("@classmethod\n    def offline_solutions", "@classmethod\n    def _x")
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STRUCTENV_CACHE_DIR", str(tmp_path / "cache"))

    def run(*argv: str) -> tuple[int, str]:
        code = main(list(argv))
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return code, err.strip().splitlines()[-1]

    # No offline solutions; a group larger than the slots (11.5); bad spec; bad field value.
    code, line = run("hello_env.py:HelloFileEnv", "--offline", "--groups", "1", "--quiet")
    assert code == 1 and "HelloFileEnv defines no offline_solutions()" in line
    code, line = run("structenv.examples.shell_tasks:ShellTasksEnv", "--offline", "--groups",
                     "1", "--group-size", "6", "--env.backend_options.slots_per_host", "2",
                     "--quiet")  # fmt: skip
    assert code == 1
    assert line == (
        "structenv run: error: ConfigError: group_size 6 needs 6 sandbox slots at once but the "
        "backend has 2 (slots_per_host 2 x max_hosts 1): raise "
        "--env.backend_options.slots_per_host or --env.backend_options.max_hosts, or lower "
        "--env.group_size"
    )
    code, line = run("no_such_module:Env", "--offline")
    assert code == 1 and "cannot import 'no_such_module'" in line
    code, line = run("hello_env.py:HelloFileEnv", "--offline", "--env.failure_policy", "drop")
    assert code == 1 and "failure_policy" in line
    code, line = run("hello_env.py:HelloFileEnv", "--offline", "--env.agent_max_stpes", "6")
    assert code == 1 and line == (
        "structenv run: error: invalid configuration: AgentEnvConfig has no field "
        "'agent_max_stpes' (did you mean 'agent_max_steps'?)"
    )
    assert run("hello_env.py:HelloFileEnv")[0] == 2  # neither --offline nor an endpoint
    assert not list(tmp_path.glob("structenv-out/*.jsonl"))
    assert not child_processes()


PROGRAMMATIC = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from structenv.adapters.atropos import APIServerConfig
    from structenv.agent import build_tiny_tokenizer
    from structenv.examples.shell_tasks import ShellTasksEnv, ShellTasksEnvConfig
    from structenv.testing import ReplayScript, serve_policy_server

    OUT = sys.argv[1]
    TOKENIZER = str(build_tiny_tokenizer())

    def make_env(base_url, **fields):
        config = ShellTasksEnvConfig(
            task_ids=["fix-add"], group_size=2, total_steps=1, tokenizer_name=TOKENIZER,
            use_wandb=False, data_path_to_save_groups=os.path.join(OUT, "groups.jsonl"),
            ensure_scores_are_not_same=False,
            **fields,
        )
        server = APIServerConfig(server_type="vllm", base_url=base_url, model_name="m",
                                 tokenizer_name=TOKENIZER, api_key="x", health_check=False)
        return ShellTasksEnv(config, [server])

    async def main():
        # As docs/writing-an-env.md shows it: construct, then await process_manager().
        solutions = ShellTasksEnv.offline_solutions(None)
        async with serve_policy_server(ReplayScript(solutions)) as server:
            env = make_env(server.base_url)
            await env.process_manager()
        print("PATH", env.config.data_path_to_save_groups)

    asyncio.run(main())
    """
)


def test_programmatic_process_manager_from_a_fresh_process(tmp_path: Path, cache_dir: Path) -> None:
    script = tmp_path / "programmatic.py"
    script.write_text(PROGRAMMATIC)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=300,
        check=False, cwd=tmp_path, env=_user_env(cache_dir),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "AttributeError" not in proc.stderr
    lines = proc.stdout.splitlines()
    jsonl = out / "groups.jsonl"
    assert f"PATH {jsonl}" in lines
    assert len(jsonl.read_text().splitlines()) == 1
    assert not child_processes()


#: An env module that configures logging itself, at DEBUG, when imported (as a user's might,
#: or as atroposlib's own module-level ``logging.warning`` does at WARNING).
NOISY_ENV = HELLO_ENV.replace(
    "from structenv.adapters import ExecTool",
    "import logging\nlogging.basicConfig(level=logging.DEBUG)\n"
    "from structenv.adapters import ExecTool",
).replace(
    "    async def get_next_item(self):\n",
    "    async def get_next_item(self):\n"
    "        logging.getLogger('hello_env').debug('my own debug line')\n",
)


@pytest.mark.parametrize("debug", [False, True])
def test_cli_keeps_library_noise_at_warning_unless_debug(
    debug: bool, tmp_path: Path, cache_dir: Path
) -> None:
    assert "my own debug line" in NOISY_ENV and "basicConfig" in NOISY_ENV
    (tmp_path / "noisy_env.py").write_text(NOISY_ENV)
    proc = subprocess.run(
        [_structenv(), "run", "noisy_env:HelloFileEnv", "--offline", "--groups", "1",
         "--group-size", "2", "--mistake-rate", "0", "--out", str(tmp_path / "out"), "--quiet",
         "--env.agent_max_steps", "4", *(["--debug"] if debug else [])],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
        env=_user_env(cache_dir),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The user's own DEBUG configuration still works for the user's loggers.
    assert "my own debug line" in proc.stderr
    # atroposlib's per-item DEBUG lines and httpx's per-request INFO lines only with --debug.
    noise = [
        line
        for line in proc.stderr.splitlines()
        if "atroposlib" in line or "httpx" in line or "HTTP Request:" in line
    ]
    if debug:
        assert any("atroposlib" in line for line in noise), proc.stderr[-3000:]
    else:
        assert noise == [], noise[:5]


LIBRARY_LOGGING = """
import logging
import structenv
import structenv.adapters.atropos
import atroposlib.envs.base

root = logging.getLogger()
assert root.handlers == [], ("importing structenv configured logging", root.handlers)
logging.basicConfig(level=logging.INFO)  # the application's choice
pinned = logging.getLogger("atroposlib.envs.base")
assert not pinned.isEnabledFor(logging.DEBUG), "atroposlib's DEBUG ignores the app's INFO"
assert logging.getLogger("httpx").isEnabledFor(logging.INFO), "a library must not quiet httpx"
root.setLevel(logging.DEBUG)
assert pinned.isEnabledFor(logging.DEBUG), "atroposlib no longer follows the app's level"
print("OK")
"""


def test_importing_structenv_leaves_the_applications_logging_alone(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", LIBRARY_LOGGING], capture_output=True, text=True, timeout=120,
        check=False, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-2000:]


def test_env_flags_for_the_run_sizes_size_the_run(tmp_path: Path) -> None:
    """``--env.group_size 6 --env.total_steps 1`` (the env CLI's names) are ``--group-size 6
    --groups 1``: the slots are sized for 6 and 1 group is what the run expects. Before, the
    slots were sized for the default 4 (a ConfigError advising backend options) and a run
    that wrote its 1 group exited 1 with "1 of 6 groups written"."""
    from structenv.adapters.atropos._run import (
        RunOptions,
        _config,
        _parser,
        _take_run_sizes,
        load_env_class,
    )

    (tmp_path / "hello_env.py").write_text(HELLO_ENV)
    env_cls = load_env_class(str(tmp_path / "hello_env.py") + ":HelloFileEnv")
    args = _parser().parse_args(["hello_env:HelloFileEnv", "--offline"])
    fields = {"group_size": "6", "total_steps": "1", "agent_max_steps": "3"}
    options = RunOptions(args, env_cls, offline=True, fields=fields, name="h", prog="p")
    _take_run_sizes(options)
    assert (args.group_size, args.groups) == (6, 1)
    config = _config(options, "tok", tmp_path)
    assert (config.group_size, config.total_steps, config.agent_max_steps) == (6, 1, 3)
    assert config.backend_options_model().slots_per_host == 6
    bad = RunOptions(args, env_cls, offline=True, fields={"total_steps": "x"}, name="h", prog="p")
    _take_run_sizes(bad)  # left for the config's validation: one line naming the field
    assert bad.fields == {"total_steps": "x"} and args.groups == 1


def test_a_run_whose_items_all_fail_exits_1_with_the_reason(
    tmp_path: Path, cache_dir: Path
) -> None:
    # Every member of every group fails the same way (the item's spec names an image that
    # does not exist): no group of masked zeros is written as training data; the groups are
    # dropped (process mode tries the next), the reason is printed, and after
    # max_consecutive_dropped_groups in a row the run stops with exit status 1.
    (tmp_path / "bad_image_env.py").write_text(
        HELLO_ENV.replace(
            "from structenv.agent import AgentResult, AgentTask",
            "from structenv import SandboxSpec\nfrom structenv.agent import AgentResult, AgentTask",
        ).replace(
            'prompt=f"Create hello.txt',
            "sandbox=SandboxSpec(image='structenv-no-such-image:1'),\n"
            '                prompt=f"Create hello.txt',
        )
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [_structenv(), "run", "bad_image_env:HelloFileEnv", "--offline", "--groups", "2",
         "--group-size", "2", "--out", str(out), "--quiet",
         "--env.max_consecutive_dropped_groups", "3"],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
        env=_user_env(cache_dir),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        "structenv run: error: StructEnvError: 3 groups in a row were dropped; giving up "
        "(raise max_consecutive_dropped_groups or fix the failures above)"
    ), proc.stderr
    assert "ConfigError: image 'structenv-no-such-image:1' does not exist" in proc.stdout
    jsonl = out / "HelloFileEnv.jsonl"
    assert not jsonl.exists() or jsonl.read_text() == ""
    assert not child_processes()


def test_python_dash_m_structenv_is_the_structenv_command(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "structenv", "--help"], capture_output=True, text=True,
        timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: structenv ")
    assert "run" in proc.stdout and "demo" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "structenv", "run", "no_such_module:Env", "--offline"],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("structenv run: error: ConfigError: cannot import 'no_such_module'")
    )


TORCH_ADVICE = "PyTorch was not found"


def test_commands_do_not_print_transformers_torch_advice(tmp_path: Path, cache_dir: Path) -> None:
    """structenv needs tokenizers only: transformers' ``PyTorch was not found. Models won't
    be available ...`` is noise on every command (on a machine without torch, like this one;
    with torch installed transformers prints nothing anyway)."""
    env = _user_env(cache_dir)
    env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
    env.pop("TRANSFORMERS_VERBOSITY", None)
    (tmp_path / "hello_env.py").write_text(HELLO_ENV)
    for argv in (
        [_structenv(), "run", "hello_env:HelloFileEnv", "--offline", "--groups", "1",
         "--group-size", "1", "--mistake-rate", "0", "--out", str(tmp_path / "out"), "--quiet"],
        [sys.executable, "-m", "structenv", "run", "no_such_module:Env", "--offline"],
    ):  # fmt: skip
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path, env=env
        )
        assert TORCH_ADVICE not in proc.stdout + proc.stderr, argv
    # Importing the library changes nothing (the advisory is the application's business).
    probe = (
        "import os, structenv.adapters.atropos; "
        "print(os.environ.get('TRANSFORMERS_NO_ADVISORY_WARNINGS'))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False,
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.stdout.strip() == "None", proc.stderr[-2000:]


def test_run_reads_the_env_clis_config_file_flags_first(tmp_path: Path, cache_dir: Path) -> None:
    """``structenv run/demo --config FILE`` read the env CLI's YAML (``env:``, ``openai:``):
    explicit flags > the file > the defaults; ``env.total_steps`` / ``env.group_size`` size
    the run unless ``--groups`` / ``--group-size`` are given."""
    from structenv.adapters.atropos._run import (
        RunOptions,
        _config,
        _fill_run_defaults,
        _parser,
        _take_run_sizes,
        parse_run_argv,
    )

    (tmp_path / "hello_env.py").write_text(HELLO_ENV)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "env:\n  total_steps: 1\n  group_size: 2\n  agent_max_steps: 4\n"
        "  enabled_toolsets: [default]\n"
        "openai:\n  - base_url: http://127.0.0.1:9/v1\n    model_name: m\n    timeout: 17\n"
        "slurm: false\n"
    )
    spec = str(tmp_path / "hello_env.py") + ":HelloFileEnv"

    def resolved(*flags: str) -> tuple[Any, Any]:
        parsed = parse_run_argv([spec, "--config", str(cfg), *flags], _parser(), "p")
        assert not isinstance(parsed, int)
        args, env_cls, fields = parsed
        options = RunOptions(args, env_cls, offline=False, fields=fields, name="h", prog="p")
        _take_run_sizes(options)
        _fill_run_defaults(args)
        return args, _config(options, "tok", tmp_path)

    args, config = resolved()
    assert (args.groups, args.group_size, args.base_url, args.model_name) == (
        1, 2, "http://127.0.0.1:9/v1", "m"
    )  # fmt: skip
    assert (args.api_key, args.server_type, args.config_openai) == ("x", "vllm", {"timeout": 17})
    assert (config.total_steps, config.group_size, config.agent_max_steps) == (1, 2, 4)
    assert config.enabled_toolsets == ["default"]
    args, config = resolved("--groups", "3", "--group-size", "1", "--env.agent_max_steps", "5",
                            "--openai.model_name", "n")  # fmt: skip
    assert (args.groups, args.group_size, args.model_name) == (3, 1, "n")
    assert (config.total_steps, config.group_size, config.agent_max_steps) == (3, 1, 5)
    args = _parser().parse_args(["x:Y"])  # no file: the defaults
    _fill_run_defaults(args)
    assert (args.groups, args.group_size, args.api_key, args.server_type) == (6, 4, "x", "vllm")

    # As a user runs it: the file sizes the run (1 group of 2), --offline ignores openai:.
    out = tmp_path / "out"
    proc = subprocess.run(
        [_structenv(), "run", "hello_env:HelloFileEnv", "--offline", "--config", str(cfg),
         "--mistake-rate", "0", "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
        env=_user_env(cache_dir),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    groups = [json.loads(line) for line in (out / "HelloFileEnv.jsonl").read_text().splitlines()]
    assert [g["scores"] for g in groups] == [[1.0, 1.0]]


@pytest.mark.parametrize("command", ["run", "demo"])
def test_a_bad_config_file_is_one_line(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from structenv._cli import main

    (tmp_path / "hello_env.py").write_text(HELLO_ENV)
    monkeypatch.chdir(tmp_path)
    lead = ["run", "hello_env.py:HelloFileEnv", "--offline"] if command == "run" else ["demo"]
    files = {
        "missing.yaml": None,
        "syntax.yaml": "env: [\n",
        "section.yaml": "envv:\n  group_size: 2\n",
        "field.yaml": "env:\n  agent_max_stpes: 4\n",
        "server.yaml": "openai:\n  base_urll: http://x\n",
        "list.yaml": "- 1\n",
    }
    expected = {
        "missing.yaml": "No such file or directory",
        "syntax.yaml": "not valid YAML (line 2",
        "section.yaml": "the file has no key 'envv' (did you mean 'env'?)",
        "field.yaml": "env has no key 'agent_max_stpes' (did you mean 'agent_max_steps'?)",
        "server.yaml": "openai has no key 'base_urll' (did you mean 'base_url'?)",
        "list.yaml": "expected a mapping",
    }
    for name, text in files.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        code = main([*lead, "--config", name, "--quiet", "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 1, (name, err)
        assert "Traceback" not in err
        lines = err.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"structenv {command}: error: ConfigError: --config {name}: ")
        assert expected[name] in lines[0], lines[0]
    with pytest.raises(SystemExit) as exit_info:  # --config without a file: usage, status 2
        main([*lead, "--config"])
    assert exit_info.value.code == 2
    assert not (tmp_path / "out").exists()

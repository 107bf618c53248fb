"""The env CLI's list flags and the one-line error report, in-process (the fresh-process
behaviour is in ``test_cli_process.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tenacity
from pydantic import ConfigDict, Field, ValidationError

from structenv._exceptions import ConfigError, SandboxUnavailableError
from structenv._main import describe_error
from structenv.adapters.atropos import AgentEnvConfig
from structenv.adapters.atropos._cli import (
    fold_model_flags,
    normalize_argv,
    parse_list_flag,
    parse_object_flag,
)

FIELDS = {"env.enabled_toolsets", "env.task_ids"}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--env.task_ids", "a,b"], ["a", "b"]),
        (["--env.task_ids=a, b,"], ["a", "b"]),
        (["--env.task_ids", "a", "b"], ["a", "b"]),
        (["--env.task_ids", "a", "--env.task_ids", "b,c"], ["a", "b", "c"]),
        (["--env.task_ids", '["a,b", "c"]'], ["a,b", "c"]),
        (["--env.task_ids="], []),
        (["--env.task_ids", "None"], None),
        (["--env.task_ids"], []),
    ],
)
def test_list_flags_become_one_json_flag(argv: list[str], expected: list[str] | None) -> None:
    out = normalize_argv(["process", *argv, "--env.group_size", "2"], FIELDS)
    assert out == ["process", f"--env.task_ids={json.dumps(expected)}", "--env.group_size", "2"]


def test_other_flags_are_untouched_and_bad_json_is_refused() -> None:
    argv = ["serve", "--env.group_size", "4", "--openai.base_url", "http://x", "--slurm"]
    assert normalize_argv(argv, FIELDS) == argv
    with pytest.raises(ConfigError, match=r"^--env.task_ids: not a JSON list: '\[1' "):
        normalize_argv(["--env.task_ids", "[1"], FIELDS)
    with pytest.raises(ConfigError, match="not a JSON list"):
        parse_list_flag('["a"]]')


def test_config_accepts_text_for_list_fields() -> None:
    config = AgentEnvConfig(enabled_toolsets="default, filesystem", disabled_toolsets="")
    assert config.enabled_toolsets == ["default", "filesystem"]
    assert config.disabled_toolsets == []
    assert AgentEnvConfig(enabled_toolsets='["terminal"]').enabled_toolsets == ["terminal"]


def test_an_unknown_field_is_refused_with_a_suggestion() -> None:
    """BaseEnvConfig ignores unknown keys: a typo'd ``--env.`` flag or YAML key ran with the
    default value, silently. It is one line naming the field and the closest one."""

    class MyConfig(AgentEnvConfig):
        task_ids: list[str] = Field(default_factory=list)

    with pytest.raises(ValidationError) as typo:
        MyConfig(agent_max_stpes=6, task_ids="a")
    assert describe_error(typo.value) == (
        "invalid configuration: MyConfig has no field 'agent_max_stpes' "
        "(did you mean 'agent_max_steps'?)"
    )
    with pytest.raises(ValidationError, match=r"no field 'frobnicate', 'task_idz' \(did you"):
        MyConfig(frobnicate=1, task_idz="a")
    assert MyConfig(task_ids="a,b").task_ids == ["a", "b"]  # a subclass's own fields are known

    class Open(AgentEnvConfig):  # a subclass that asks for extra keys keeps them
        model_config = ConfigDict(extra="allow")

    assert Open(my_key=1).my_key == 1
    # Every field of the default config goes back in (atroposlib's CLI rebuilds it this way).
    assert MyConfig.model_validate(MyConfig().model_dump()) == MyConfig()
    with pytest.raises(ValidationError) as moved:  # a moved field keeps its own message
        AgentEnvConfig(slots_per_host=2)
    assert describe_error(moved.value).startswith(
        "invalid configuration: slots_per_host: moved to backend_options"
    )


def test_errors_are_one_line_through_exception_groups() -> None:
    error = SandboxUnavailableError("bwrap not found (apt-get install -y bubblewrap)")
    group = BaseExceptionGroup("outer", [ExceptionGroup("inner", [error])])
    assert describe_error(group) == (
        "SandboxUnavailableError: bwrap not found (apt-get install -y bubblewrap)"
    )
    with pytest.raises(ValidationError) as info:
        AgentEnvConfig(failure_policy="drop")
    assert describe_error(info.value, prefixes={"AgentEnvConfig": "env."}) == (
        "invalid configuration: env.failure_policy: Input should be 'mask' or 'drop_group' "
        "(got 'drop')"
    )

    def hook() -> None:
        raise KeyError("multi\nline")

    try:
        hook()
    except KeyError as exc:
        line = describe_error(ExceptionGroup("g", [exc, RuntimeError("second")]))
    assert "\n" not in line
    assert line.startswith("KeyError: 'multi\\nline' (raised in hook at ")
    assert line.endswith("(and 1 more error(s))")


def test_a_retry_that_gave_up_is_its_last_error_and_the_attempts() -> None:
    """tenacity's ``RetryError`` says nothing (``RetryError[<Future ...>]``): the line shows
    the last attempt's error (URL, status) and how many attempts were made."""

    @tenacity.retry(stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_none())
    def register() -> None:
        raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 9)")

    with pytest.raises(tenacity.RetryError) as info:
        register()
    expected = (
        "ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 9) "
        "(gave up after 3 attempts)"
    )
    assert describe_error(info.value) == expected
    assert describe_error(ExceptionGroup("g", [info.value])) == expected
    assert "RetryError" not in describe_error(ExceptionGroup("g", [info.value, KeyError("x")]))


def test_an_env_without_a_run_name_gets_its_class_name() -> None:
    """run-api refuses ``/register-env`` without a name, and atroposlib's CLI default never
    reaches the config: ``serve`` from the command line needs the env to fill it in."""
    from atroposlib.envs.base import APIServerConfig

    from structenv.examples.shell_tasks import ShellTasksEnv

    server = APIServerConfig(base_url="http://127.0.0.1:9/v1", api_key="x", health_check=False)
    config, _ = ShellTasksEnv.config_init()
    assert config.wandb_name is None
    env = ShellTasksEnv(config.model_copy(update={"tokenizer_name": _tokenizer()}), [server])
    assert env.config.wandb_name == ShellTasksEnv.name
    named = config.model_copy(update={"tokenizer_name": _tokenizer(), "wandb_name": "mine"})
    assert ShellTasksEnv(named, [server]).config.wandb_name == "mine"


def _tokenizer() -> str:
    from structenv.agent import build_tiny_tokenizer

    return str(build_tiny_tokenizer())


def test_backend_option_flags_become_one_json_object(tmp_path: Path) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text("env:\n  backend_options: {max_hosts: 4, placement: PACK}\n")
    argv = [
        "process", "--config", str(config), "--env.backend_options.slots_per_host", "8",
        "--env.group_size", "2", "--env.backend_options.placement=STRICT_SPREAD",
        "--env.backend_options.resources", '{"sandbox": 1}',
    ]  # fmt: skip
    out = fold_model_flags(argv, "env.backend_options")
    options = {"max_hosts": 4, "placement": "STRICT_SPREAD", "slots_per_host": 8}
    options["resources"] = {"sandbox": 1}
    assert out == [
        "process", "--config", str(config), f"--env.backend_options={json.dumps(options)}",
        "--env.group_size", "2",
    ]  # fmt: skip
    assert fold_model_flags(["--env.group_size", "2"], "env.backend_options") == [
        "--env.group_size",
        "2",
    ]
    with pytest.raises(ConfigError, match=r"--env\.backend_options\.max_hosts needs a value"):
        fold_model_flags(["--env.backend_options.max_hosts"], "env.backend_options")
    with pytest.raises(ConfigError, match="backend_options: not a JSON object"):
        parse_object_flag("[1]", "backend_options")
    # AgentEnvConfig reads the JSON text (as atroposlib hands it over) and validates it.
    env = AgentEnvConfig(backend="local", backend_options='{"slots_per_host": "2"}')
    assert env.backend_options_model().slots_per_host == 2
    with pytest.raises(ValidationError, match="slots_per_host: moved to backend_options"):
        AgentEnvConfig(slots_per_host=2)


def test_sandbox_flags_fold_with_the_same_function(tmp_path: Path) -> None:
    """``--env.sandbox.*`` and ``--env.backend_options.*`` share fold_model_flags: nested keys
    merge over the YAML file's object, values are JSON when JSON, else text."""
    config = tmp_path / "cfg.yaml"
    config.write_text("env:\n  sandbox: {image: 'task:1', limits: {memory: 1000000}}\n")
    argv = [
        "process", "--config", str(config), "--env.sandbox.limits.pids", "64",
        "--env.sandbox.env.PORT", "8080", "--env.backend_options.slots_per_host", "2",
    ]  # fmt: skip
    for field in ("sandbox", "backend_options"):
        argv = fold_model_flags(argv, f"env.{field}")
    assert argv[:3] == ["process", "--config", str(config)]
    sandbox = argv[3].partition("=")[2]
    assert json.loads(sandbox) == {
        "image": "task:1", "limits": {"memory": 1000000, "pids": 64}, "env": {"PORT": 8080}
    }  # fmt: skip
    assert argv[4] == '--env.backend_options={"slots_per_host": 2}'
    env = AgentEnvConfig(sandbox=sandbox, backend_options=argv[4].partition("=")[2])
    assert env.sandbox.env == {"PORT": "8080"} and env.sandbox.limits.pids == 64
    with pytest.raises(ConfigError, match=r"--env\.sandbox\.image needs a value"):
        fold_model_flags(["--env.sandbox.image"], "env.sandbox")
    with pytest.raises(ConfigError, match="sandbox: not a JSON object"):
        fold_model_flags(["--env.sandbox", "[1]"], "env.sandbox")

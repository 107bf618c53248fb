"""The env's Atropos command line (``MyEnv.cli()``): list flags, signals, one-line errors.

atroposlib builds ``serve`` / ``process`` / ``evaluate`` from the config classes with
pydantic-cli, then reads ``sys.argv`` a second time itself (``get_double_dash_flags``), which
turns every value into one string: a list field could not be set from the command line at all.
:func:`run_cli` rewrites the list flags first, so every field is a flag:

* ``--env.enabled_toolsets default,filesystem`` — comma-separated;
* ``--env.enabled_toolsets default --env.enabled_toolsets terminal`` or
  ``--env.enabled_toolsets default terminal`` — repeated or space-separated values add up;
* ``--env.task_ids '["a,b", "c"]'`` — a JSON list (for items holding a comma);
* ``--env.disabled_toolsets=`` — the empty list; ``--env.task_ids None`` — ``None``.

Each becomes one ``--env.<field>=<JSON list>`` that both of atroposlib's parsers accept
(:func:`accept_list_flags` lets pydantic-cli's model read it; ``AgentEnvConfig`` parses text
given for a list field, from the command line or a YAML file).

Object fields (``sandbox``, ``backend_options``) take one flag per key:
``--env.sandbox.limits.pids 64``, ``--env.backend_options.slots_per_host 8`` (a value is JSON
when it is JSON, else text) or the whole object as ``--env.<field> '{...}'``;
:func:`fold_model_flags` folds them into one ``--env.<field>=<JSON object>`` merged over the
``--config`` file's object.

It also runs the managers under :func:`~structenv._main.run_until_signal` (SIGINT/SIGTERM:
one orderly shutdown, exit ``128 + signal``) and reports an error that ends the command as
one line (:func:`~structenv._main.report_error`; ``--debug`` for the traceback).
"""

from __future__ import annotations

import contextvars
import json
import sys
import types
import typing
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, model_validator

from ..._exceptions import ConfigError
from ..._logging import configure_cli_logging
from ..._main import report_error, run_until_signal

__all__ = [
    "accept_list_flags",
    "fold_model_flags",
    "list_fields",
    "normalize_argv",
    "parse_list_flag",
    "parse_object_flag",
    "run_cli",
    "with_cli_signals",
]

_SEQUENCES = (list, set, frozenset, tuple)

#: Set while ``run_cli`` runs: the managers then handle SIGINT/SIGTERM themselves.
_cli_prog: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "structenv_cli_prog", default=None
)


def _is_sequence(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in _SEQUENCES or annotation in _SEQUENCES:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_sequence(arg) for arg in typing.get_args(annotation))
    return False


def list_fields(model: type[BaseModel]) -> set[str]:
    """Names of the fields of ``model`` that hold lists (optional ones included)."""
    return {name for name, f in model.model_fields.items() if _is_sequence(f.annotation)}


def parse_list_flag(text: str) -> list[Any] | None:
    """The list a flag's text stands for: ``a,b`` -> ``["a", "b"]``; a JSON list as is;
    ``""`` -> ``[]``; ``None`` -> ``None``.

    Raises:
        ConfigError: Text starting with ``[`` that is not a JSON list.
    """
    text = text.strip()
    if text == "None":
        return None
    if text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"not a JSON list: {text!r} ({exc})") from exc
        if not isinstance(value, list):
            raise ConfigError(f"not a JSON list: {text!r}")
        return value
    return [item.strip() for item in text.split(",") if item.strip()]


def normalize_argv(argv: list[str], fields: set[str]) -> list[str]:
    """Rewrite every list flag of ``fields`` (names like ``env.task_ids``) into one
    ``--<name>=<JSON list>`` at the place of its first occurrence; other arguments unchanged.

    Raises:
        ConfigError: A value is not a valid list (see :func:`parse_list_flag`).
    """
    out: list[str | tuple[str]] = []
    values: dict[str, list[Any] | None] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg[2:].partition("=")
        if not arg.startswith("--") or name not in fields:
            out.append(arg)
            i += 1
            continue
        texts = [inline] if eq else []
        i += 1
        if not eq:
            while i < len(argv) and not argv[i].startswith("-"):
                texts.append(argv[i])
                i += 1
        if name not in values:
            values[name] = []
            out.append((name,))
        for text in texts:
            try:
                parsed = parse_list_flag(text)
            except ConfigError as exc:
                raise ConfigError(f"--{name}: {exc}") from exc
            current = values[name]
            if parsed is None or current is None:
                values[name] = parsed  # None replaces; a later list replaces None
            else:
                current.extend(parsed)
    return [
        arg if isinstance(arg, str) else f"--{arg[0]}={json.dumps(values[arg[0]])}" for arg in out
    ]


#: The env's object fields: one flag per key, folded by :func:`fold_model_flags`.
OBJECT_FIELDS = ("sandbox", "backend_options")


def _flag_value(text: str) -> Any:
    """A flag's text as a value: JSON when it is JSON (numbers, booleans, objects, lists,
    null), else the text itself (pydantic converts ``"8"`` for an int field too)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_object_flag(text: str, field: str) -> dict[str, Any]:
    """The mapping a ``--env.<field>`` text stands for: a JSON object (``""`` and ``None``:
    empty).

    Raises:
        ConfigError: Anything but a JSON object.
    """
    text = text.strip()
    if text in ("", "None"):
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{field}: not a JSON object: {text!r} ({exc})") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{field}: not a JSON object: {text!r}")
    return value


def _yaml_section(argv: list[str], prefix: str) -> dict[str, Any]:
    """The ``--config`` YAML file's object at the dotted ``prefix`` (``env.sandbox``), if a
    file is given (flags are merged into it, as atroposlib merges flags into the YAML's other
    fields)."""
    path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.partition("=")[2]
    if not path:
        return {}
    import yaml  # type: ignore[import-untyped]

    try:
        with open(path) as f:
            node: Any = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return {}  # atroposlib reports the file's problem itself
    for key in prefix.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return dict(node) if isinstance(node, dict) else {}


def fold_model_flags(argv: list[str], prefix: str) -> list[str]:
    """Fold ``--<prefix>.<key>[.<key>] VALUE`` flags (and a ``--<prefix> JSON`` one) into a
    single ``--<prefix>=<JSON object>`` at the place of the first one, merged over the
    ``--config`` file's object at ``prefix``; other arguments unchanged. Values are JSON when
    they are JSON, else text (the model converts them). Used for ``--env.sandbox.*`` and
    ``--env.backend_options.*``.

    Raises:
        ConfigError: A flag without a value, ``--<prefix>`` given anything but a JSON object,
            or a key below one that is not an object.
    """
    out: list[str | None] = []
    data: dict[str, Any] | None = None
    field = prefix.rpartition(".")[2]
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg[2:].partition("=")
        if not arg.startswith("--") or not (name == prefix or name.startswith(prefix + ".")):
            out.append(arg)
            i += 1
            continue
        i += 1
        if eq:
            text = inline
        elif i < len(argv) and not argv[i].startswith("--"):
            text = argv[i]
            i += 1
        else:
            raise ConfigError(f"--{name} needs a value")
        if data is None:
            data = _yaml_section(argv, prefix)
            out.append(None)
        if name == prefix:
            data.update(parse_object_flag(text, field))
            continue
        keys = name[len(prefix) + 1 :].split(".")
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{name}: {key} is not an object")
        node[keys[-1]] = _flag_value(text)
    return [a if a is not None else f"--{prefix}={json.dumps(data)}" for a in out]


def accept_list_flags(cli_model: type[BaseModel]) -> type[BaseModel]:
    """A subclass of pydantic-cli's command model whose list fields accept the JSON text
    :func:`normalize_argv` produced (pydantic-cli passes it as a string or a 1-item list)."""
    names = list_fields(cli_model)

    def _lists(cls: type[BaseModel], data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name in {n for n in data if n.endswith(OBJECT_FIELDS)}:
            value = data[name]
            if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
                value = value[0]
            if isinstance(value, str):
                data[name] = parse_object_flag(value, name)
        for name in names & data.keys():
            value = data[name]
            if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
                value = value[0]
            if isinstance(value, str):
                data[name] = parse_list_flag(value)
        return data

    namespace = {
        "__module__": cli_model.__module__,
        "__doc__": cli_model.__doc__,
        "_structenv_lists": model_validator(mode="before")(classmethod(_lists)),  # type: ignore[arg-type]
    }
    return type(cli_model.__name__, (cli_model,), namespace)


def run_cli(env_cls: Any, base_cli: Callable[[], None]) -> None:
    """Run atroposlib's CLI for ``env_cls`` with list flags, signals and one-line errors."""
    argv = sys.argv[1:]
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = next((a for a in argv if not a.startswith("-")), "")
    prog = f"{env_cls.__name__} {command}".strip()
    config_cls = type(env_cls.config_init()[0])
    prefixes = {config_cls.__name__: "env.", "APIServerConfig": "openai."}
    try:
        fields = {f"env.{name}" for name in list_fields(config_cls)}
        for field in OBJECT_FIELDS:
            argv = fold_model_flags(argv, f"env.{field}")
        sys.argv = [sys.argv[0], *normalize_argv(argv, fields)]
        configure_cli_logging(debug=debug)
        token = _cli_prog.set(prog)
        try:
            base_cli()
        finally:
            _cli_prog.reset(token)
    except Exception as exc:  # ExceptionGroup included; SystemExit passes (the exit status)
        sys.exit(report_error(exc, prog=prog, debug=debug, prefixes=prefixes))


async def with_cli_signals(fn: Callable[[], Awaitable[None]]) -> None:
    """Await ``fn()``; under :func:`run_cli`, with its SIGINT/SIGTERM handling.

    Raises:
        Interrupted: (under ``run_cli``) a signal stopped it after the orderly shutdown.

    Cancellation: ``fn`` is cancelled.
    """
    prog = _cli_prog.get()
    if prog is None:
        await fn()
    else:
        await run_until_signal(fn, prog=prog)

"""``structenv run MODULE:Env``: run any :class:`AgentEnv` end to end in process mode.

With ``--offline`` nothing leaves the machine: a scripted policy server on 127.0.0.1 replays
the env's :meth:`AgentEnv.offline_solutions` (reference solutions, with seeded mistakes so the
scores of a group vary), the tokenizer is structenv's tiny byte-level one (built into
``~/.cache/structenv`` on first use; no model hub is contacted), and the scored groups go to
``--out`` as JSONL plus an HTML view. Against a real endpoint, give ``--openai.base_url``,
``--openai.model_name`` and ``--tokenizer`` instead::

    structenv run my_env:MyEnv --offline --groups 2 --group-size 4
    structenv run path/to/my_env.py:MyEnv --offline --env.agent_max_steps 6
    structenv run my_env:MyEnv --openai.base_url http://HOST:8000/v1 --openai.model_name M \\
        --openai.server_type openai --tokenizer M

Every ``--env.<field> VALUE`` sets a field of the env's config (lists: comma-separated or a
JSON list). ``--config FILE`` reads the env CLI's YAML file (``env:`` and ``openai:``
sections; :func:`apply_config_file`): flags given explicitly win over the file, the file over
the defaults. ``structenv demo`` is this command for the shipped examples.

Exit status: 0 when every requested group was written; 1 when fewer were, or the run stopped
on an error (one line on stderr, e.g. ``InferenceFailedError: inference failed for 16
trajectories in a row ...``); 2 for bad arguments; 128 + signal after Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from ._config import GroupReport

__all__ = [
    "RunOptions",
    "add_run_arguments",
    "collect_run",
    "load_env_class",
    "main",
    "run_env",
    "split_env_flags",
]


#: The run's settings when neither a flag nor the ``--config`` file gives them.
RUN_DEFAULTS: dict[str, Any] = {
    "groups": 6,
    "group_size": 4,
    "api_key": "x",
    "server_type": "vllm",
}

#: ``openai:`` keys of a ``--config`` file that are run flags (``tokenizer_name`` is
#: ``--tokenizer``); any other APIServerConfig field goes to the server config as is.
_OPENAI_FLAGS = {
    "base_url": "base_url",
    "model_name": "model_name",
    "api_key": "api_key",
    "server_type": "server_type",
    "tokenizer_name": "tokenizer",
}
_SERVER_TYPES = ("vllm", "sglang", "openai")
#: Sections of the env CLI's YAML that a run does not use (atroposlib's server manager).
_IGNORED_SECTIONS = ("slurm", "testing")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags shared by ``structenv run`` and ``structenv demo``.

    Flags whose value a ``--config`` file may also give default to ``None`` (so a flag given
    explicitly can be told from its default); :func:`apply_config_file` fills them in.
    """
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML file as the env's own CLI reads it (env: and openai: "
                        "sections); flags override it, it overrides the defaults")  # fmt: skip
    parser.add_argument("--groups", type=int, default=None,
                        help="groups to collect (default: env.total_steps of --config, "
                        "else 6)")  # fmt: skip
    parser.add_argument("--group-size", type=int, default=None,
                        help="trajectories per group (default: env.group_size of --config, "
                        "else 4)")  # fmt: skip
    parser.add_argument("--out", default="structenv-out", help="output directory")
    parser.add_argument("--mistake-rate", type=float, default=0.35,
                        help="offline: share of scripted steps that go wrong")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="offline: seed of the script")
    parser.add_argument("--hosts", type=int, default=1, help="sandbox host processes")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer dir or hub id (default: the tiny one)")  # fmt: skip
    parser.add_argument("--openai.base_url", dest="base_url", default=None)
    parser.add_argument("--openai.model_name", dest="model_name", default=None)
    parser.add_argument("--openai.api_key", dest="api_key", default=None)
    parser.add_argument(
        "--openai.server_type", dest="server_type", choices=_SERVER_TYPES, default=None,
        help="default vllm",
    )  # fmt: skip
    parser.add_argument(
        "--vllm-api", dest="vllm_api", choices=("auto", "generate", "completions", "chat"),
        default=None, help="how a vllm server gives exact tokens (default: probe it)",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="tracebacks for errors")


def _load_yaml(path: str) -> dict[str, Any]:
    """The mapping of the YAML file ``path``.

    Raises:
        ConfigError: The file is missing or unreadable, not YAML, or not a mapping.
    """
    import yaml  # type: ignore[import-untyped]

    from ..._exceptions import ConfigError

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"--config {path}: not valid YAML{at}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping with env: and openai: sections")
    return data


def _unknown(path: str, where: str, name: str, known: Sequence[str]) -> Exception:
    import difflib

    from ..._exceptions import ConfigError

    close = difflib.get_close_matches(str(name), sorted(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"--config {path}: {where} has no key {name!r}{hint}")


def apply_config_file(args: argparse.Namespace, env_cls: type[Any]) -> None:
    """Read ``args.config`` (the env CLI's YAML format) into ``args``; fill in the defaults.

    Precedence: a flag given on the command line, then the file, then the defaults
    (:data:`RUN_DEFAULTS`, the env's ``config_init()``). The file's ``env:`` section becomes
    ``args.config_env`` (env fields, below every ``--env.<field>`` flag); its ``env.total_steps``
    and ``env.group_size`` are the run's ``--groups`` and ``--group-size`` unless those are
    given. Its ``openai:`` section (a mapping, or a list of one) gives ``--openai.*`` and
    ``--tokenizer`` (``tokenizer_name``) unless given; its other server fields become
    ``args.config_openai``. With ``--offline`` the ``openai:`` section is not used.
    ``slurm:`` and ``testing:`` (atroposlib's server manager) are accepted and not used.

    Raises:
        ConfigError: The file is missing, not YAML, or holds an unknown section or key.
    """
    from ..._exceptions import ConfigError

    path = getattr(args, "config", None)
    data = _load_yaml(path) if path else {}
    for section in data:
        if section not in ("env", "openai", *_IGNORED_SECTIONS):
            raise _unknown(path or "", "the file", section, ("env", "openai"))
    env = data.get("env") or {}
    if not isinstance(env, dict):
        raise ConfigError(f"--config {path}: env: must be a mapping of env config fields")
    known = type(env_cls.config_init()[0]).model_fields
    for name in env:
        if name not in known:
            raise _unknown(path or "", "env", name, list(known))
    env = dict(env)
    for field, attr in (("total_steps", "groups"), ("group_size", "group_size")):
        if field in env:
            value = env.pop(field)
            if getattr(args, attr) is None:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"--config {path}: env.{field} must be an integer")
                setattr(args, attr, value)
    openai: Any = data.get("openai") or {}
    if isinstance(openai, list) and len(openai) == 1:
        openai = openai[0]
    if not isinstance(openai, dict):
        raise ConfigError(f"--config {path}: openai: must be a mapping (or a list of one)")
    from . import APIServerConfig

    extra: dict[str, Any] = {}
    for name, value in openai.items():  # checked also when --offline does not use them
        if name in _OPENAI_FLAGS:
            attr = _OPENAI_FLAGS[name]
            if getattr(args, attr) is None and not getattr(args, "offline", False):
                setattr(args, attr, None if value is None else str(value))
        elif name in APIServerConfig.model_fields:
            extra[name] = value
        else:
            raise _unknown(path or "", "openai", name, list(APIServerConfig.model_fields))
    if getattr(args, "offline", False):
        extra = {}
    if args.server_type is not None and args.server_type not in _SERVER_TYPES:
        raise ConfigError(
            f"--config {path}: openai.server_type must be one of {', '.join(_SERVER_TYPES)}"
        )
    args.config_env = env
    args.config_openai = extra


def _fill_run_defaults(args: argparse.Namespace) -> None:
    """The :data:`RUN_DEFAULTS` of what neither a flag nor the ``--config`` file gave."""
    for attr, value in RUN_DEFAULTS.items():
        if getattr(args, attr, None) is None:
            setattr(args, attr, value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="structenv run",
        description="Run an AgentEnv end to end in process mode and write its scored groups. "
        "--env.<field> VALUE sets any field of the env's config.",
    )
    parser.add_argument("env", metavar="MODULE:ENV",
                        help="the env class: a module (my_pkg.my_env:MyEnv) or a file "
                        "(path/to/my_env.py:MyEnv)")  # fmt: skip
    parser.add_argument("--offline", action="store_true",
                        help="scripted policy server replaying the env's offline_solutions(), "
                        "tiny tokenizer, no network")  # fmt: skip
    add_run_arguments(parser)
    return parser


def split_env_flags(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Separate ``--env.<field> VALUE`` / ``--env.<field>=VALUE`` from the other arguments.

    Object fields take one flag per key (``--env.sandbox.image IMG``,
    ``--env.backend_options.slots_per_host 8``), folded as the env's own CLI folds them
    (:func:`~structenv.adapters.atropos._cli.fold_model_flags`).

    Raises:
        ValueError: ``--env.<field>`` without a value, or a malformed object flag.
    """
    from ._cli import OBJECT_FIELDS, fold_model_flags

    argv = list(argv)
    for field in OBJECT_FIELDS:
        argv = fold_model_flags(argv, f"env.{field}")
    rest: list[str] = []
    fields: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--env."):
            rest.append(arg)
            i += 1
            continue
        name, eq, value = arg[len("--env.") :].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"{arg} needs a value")
            value = argv[i + 1]
            i += 1
        fields[name] = value
        i += 1
    return rest, fields


def load_env_class(spec: str) -> type[Any]:
    """The class named by ``module:Class`` or ``path/to/file.py:Class``.

    Raises:
        ConfigError: Malformed spec, missing module, file or class, or not an AgentEnv.
    """
    from ..._exceptions import ConfigError
    from ._env import AgentEnv

    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"expected MODULE:ENV (e.g. my_env:MyEnv), got {spec!r}")
    if module_name.endswith(".py") or os.sep in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise ConfigError(f"no such file: {module_name}")
        loaded = importlib.util.spec_from_file_location(path.stem, path)
        if loaded is None or loaded.loader is None:  # pragma: no cover - a .py file loads
            raise ConfigError(f"cannot import {module_name}")
        module = importlib.util.module_from_spec(loaded)
        sys.modules[path.stem] = module
        sys.path.insert(0, str(path.resolve().parent))
        loaded.loader.exec_module(module)
    else:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the current directory first
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise ConfigError(f"cannot import {module_name!r}: {exc}") from exc
    env_cls = getattr(module, attr, None)
    if env_cls is None:
        raise ConfigError(f"{module_name} has no attribute {attr!r}")
    if not (isinstance(env_cls, type) and issubclass(env_cls, AgentEnv)):
        raise ConfigError(f"{spec} is not an AgentEnv subclass")
    return env_cls


class RunOptions:
    """What :func:`run_env` runs: the parsed flags plus config overrides.

    Attributes:
        args: The parsed flags (see :func:`add_run_arguments`).
        env_cls: The env class.
        offline: Serve the env's offline solutions from a scripted policy server.
        fields: Config field overrides (values as given on the command line, or typed).
        defaults: Config fields of the command's own (``structenv demo``'s limits): below
            the ``--config`` file's ``env:`` section and ``fields``.
        name: Output file stem and title of the summary.
        prog: Program name for messages.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        env_cls: type[Any],
        *,
        offline: bool,
        fields: Mapping[str, Any],
        name: str,
        prog: str,
        defaults: Mapping[str, Any] | None = None,
    ) -> None:
        self.args = args
        self.env_cls = env_cls
        self.offline = offline
        self.fields = dict(fields)
        self.defaults = dict(defaults or {})
        self.name = name
        self.prog = prog


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def parse_run_argv(
    argv: Sequence[str] | None, parser: argparse.ArgumentParser, prog: str
) -> tuple[argparse.Namespace, type[Any], dict[str, str]] | int:
    """``argv`` (default: ``sys.argv[1:]``) of a command taking ``MODULE:Env`` and
    ``--env.<field>`` flags: the parsed arguments, the env class and the env fields, or the
    exit status after a one-line error."""
    from ..._main import report_error

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, fields = split_env_flags(argv)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(rest)
    try:
        env_cls = load_env_class(args.env)
        apply_config_file(args, env_cls)
    except Exception as exc:
        return report_error(exc, prog=prog, debug=args.debug)
    return args, env_cls, fields


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``structenv run``; returns the exit status."""
    parsed = parse_run_argv(argv, _parser(), "structenv run")
    if isinstance(parsed, int):
        return parsed
    args, env_cls, fields = parsed
    if args.offline and args.base_url is not None:
        print("structenv run: error: --offline and --openai.base_url exclude each other",
              file=sys.stderr)  # fmt: skip
        return 2
    if not args.offline and args.base_url is None:
        print("structenv run: error: give --offline (scripted policy) or --openai.base_url URL",
              file=sys.stderr)  # fmt: skip
        return 2
    options = RunOptions(
        args, env_cls, offline=args.offline, fields=fields, name=env_cls.__name__,
        prog="structenv run",
    )  # fmt: skip
    return run_env(options)


def run_env(options: RunOptions, body: Callable[[RunOptions], Awaitable[int]] | None = None) -> int:
    """Run ``options`` in process mode on asyncio; print a summary; the exit status.

    ``body`` replaces what runs inside (default: :func:`collect_run` and the summary table);
    ``structenv bench env`` gives its own, with the same environment, signals and errors.
    """
    from ..._logging import configure_cli_logging
    from ..._main import report_error, run_until_signal

    args = options.args
    configure_cli_logging(debug=args.debug)
    _take_run_sizes(options)
    _fill_run_defaults(args)
    if args.groups < 1 or args.group_size < 1:
        print(f"{options.prog}: error: --groups and --group-size must be >= 1", file=sys.stderr)
        return 2
    env_vars = {"WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    if (args.tokenizer is None and args.base_url is None) or (
        args.tokenizer is not None and Path(args.tokenizer).is_dir()
    ):
        env_vars["HF_HUB_OFFLINE"] = "1"  # the tiny tokenizer or a local one: no hub access
    with _environment(env_vars), warnings.catch_warnings():
        # process mode warns once per group that the trainer's max length is unset (-1).
        warnings.filterwarnings("ignore", message="Trainer requested to ignore max length")
        try:
            return anyio.run(
                functools.partial(run_until_signal, body or _run, options, prog=options.prog),
                backend="asyncio",
            )
        except Exception as exc:
            return report_error(exc, prog=options.prog, debug=args.debug)


def _take_run_sizes(options: RunOptions) -> None:
    """``--env.group_size`` / ``--env.total_steps`` (as the env's own CLI spells them) are
    ``--group-size`` / ``--groups``: the run sizes its slots, progress and exit status by
    these (before, the slots were sized for the default 4 and the status expected 6 groups).
    A value that is not an integer is left to the config's validation to report."""
    for field, attr in (("group_size", "group_size"), ("total_steps", "groups")):
        value = options.fields.get(field)
        if value is None or isinstance(value, bool):
            continue
        try:
            number = int(value)
        except (TypeError, ValueError):
            continue
        setattr(options.args, attr, number)
        del options.fields[field]


async def _run(options: RunOptions) -> int:
    from rich.console import Console

    args = options.args
    console = Console()
    summary = await collect_run(options, console)
    _print_summary(console, options.name, summary)
    if summary["groups"] < args.groups:
        print(
            f"{options.prog}: error: {summary['groups']} of {args.groups} groups written"
            + (f" ({summary['dropped_groups']} dropped)" if summary["dropped_groups"] else ""),
            file=sys.stderr,
        )
        return 1
    return 0


async def collect_run(
    options: RunOptions,
    console: Any,
    *,
    on_group: Callable[[GroupReport], None] | None = None,
) -> dict[str, Any]:
    """Build the tokenizer, config, (offline) policy server and env of ``options``, collect
    its groups; the summary (counts, mean score, tool-call latency, ``collect_time_s``: the
    seconds of ``process_manager``, ``wall_time_s``: everything). ``on_group`` sees every
    :class:`GroupReport`."""
    from ...agent import build_tiny_tokenizer

    args = options.args
    started = time.monotonic()
    if args.tokenizer is None and args.base_url is not None:
        args.tokenizer = await _server_tokenizer(args)
    tokenizer = args.tokenizer or str(
        await anyio.to_thread.run_sync(build_tiny_tokenizer, limiter=anyio.CapacityLimiter(1))
    )
    out = Path(args.out)
    await anyio.Path(out).mkdir(parents=True, exist_ok=True)
    config = _config(options, tokenizer, out)  # a bad --env flag fails before anything starts
    if options.offline:
        from ...testing import ReplayScript, serve_policy_server

        solutions = options.env_cls.offline_solutions(config)
        script = ReplayScript(solutions, mistake_rate=args.mistake_rate, seed=args.seed)
        async with serve_policy_server(script, seed=args.seed) as server:
            env = _make_env(options, config, tokenizer, server.base_url)
            summary = await _collect(options, env, console, on_group)
    else:
        env = _make_env(options, config, tokenizer, args.base_url)
        summary = await _collect(options, env, console, on_group)
    summary["wall_time_s"] = round(time.monotonic() - started, 2)
    return summary


async def _server_tokenizer(args: argparse.Namespace) -> str:
    """The tokenizer of the server's model: vLLM's ``root`` (where it loaded the model from),
    else the model name."""
    from ..._exceptions import ConfigError
    from ._inference import server_model

    entry = await server_model(args.base_url, args.model_name, api_key=args.api_key)
    if entry and not args.model_name and isinstance(entry.get("id"), str):
        args.model_name = entry["id"]
    root = entry.get("root") if entry else None
    if isinstance(root, str) and root:
        return root
    if args.model_name:
        return str(args.model_name)
    raise ConfigError(
        f"{args.base_url}/models does not name one model: pass --openai.model_name and --tokenizer"
    )


def _config(options: RunOptions, tokenizer: str, out: Path) -> Any:
    """The env's ``config_init()`` config with the run's settings and ``--env.*`` overrides,
    validated (so list flags and types are checked as the env's own CLI checks them)."""
    args = options.args
    config, _servers = options.env_cls.config_init()
    fields: dict[str, Any] = dict(
        group_size=args.group_size,
        total_steps=args.groups,
        tokenizer_name=tokenizer,
        use_wandb=False,
        include_messages=True,
        ensure_scores_are_not_same=False,
        data_path_to_save_groups=str(out / f"{options.name}.jsonl"),
        backend_options={
            "slots_per_host": max(1, -(-args.group_size // args.hosts)),
            "min_hosts": args.hosts,
            "max_hosts": args.hosts,
        },
    )
    if args.vllm_api is not None:
        fields["vllm_api"] = args.vllm_api
    # Precedence: the run's settings, the command's defaults, the --config file's env:
    # section, the --env.* flags (backend_options merged key by key).
    for layer in (options.defaults, getattr(args, "config_env", None) or {}):
        layer = dict(layer)
        if isinstance(layer.get("backend_options"), dict):
            given = layer.pop("backend_options")
            fields["backend_options"] = {**fields["backend_options"], **given}
        fields.update(layer)
    overrides = dict(options.fields)
    if "backend_options" in overrides:  # the flags' options over the run's host counts
        given = overrides.pop("backend_options")
        if isinstance(given, str):
            from ._cli import parse_object_flag

            given = parse_object_flag(given, "backend_options")
        fields["backend_options"] = {**fields["backend_options"], **given}
    fields.update(overrides)
    return type(config).model_validate({**config.model_dump(), **fields})


def _make_env(options: RunOptions, config: Any, tokenizer: str, base_url: str) -> Any:
    from . import APIServerConfig

    args = options.args
    settings: dict[str, Any] = {"health_check": False, "timeout": 300}
    settings.update(getattr(args, "config_openai", None) or {})  # the --config file's others
    server = APIServerConfig(
        **{
            **settings,
            "server_type": "vllm" if options.offline else args.server_type,
            "base_url": base_url,
            "model_name": args.model_name or "scripted",
            "tokenizer_name": tokenizer,
            "api_key": args.api_key,
        }
    )
    return options.env_cls(config, [server])


async def _collect(
    options: RunOptions,
    env: Any,
    console: Any,
    listener: Callable[[GroupReport], None] | None = None,
) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    args = options.args
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=args.quiet,
    )
    bar = progress.add_task(f"{options.name} groups", total=args.groups, status="starting")
    scores: list[float] = []
    reasons: collections.Counter[str] = collections.Counter()

    def on_group(report: GroupReport) -> None:
        reasons.update(_short(f) for f in report.failures if f is not None)
        if report.dropped:
            progress.update(bar, status=f"group dropped ({report.drop_reason})")
            return
        scores.extend(report.scores)
        status = f"mean score {statistics.fmean(scores):.2f}, {report.tool_calls} tool calls"
        progress.update(bar, advance=1, status=status)

    env.add_group_listener(on_group)
    if listener is not None:
        env.add_group_listener(listener)
    collect_started = time.monotonic()
    try:
        with progress:
            await env.process_manager()
    except anyio.get_cancelled_exc_class():  # Ctrl-C / SIGTERM: say what was kept
        written = getattr(env.jsonl_writer, "written", 0)  # this run's groups, not the file's
        _print_kept(options, Path(env.config.data_path_to_save_groups), written)
        raise
    finally:
        if reasons:  # the reasons are what a user needs, also when the run stopped
            _print_failures(console, reasons)
    collect_time = time.monotonic() - collect_started
    stats = env.statistics()
    calls = stats.executor.call_latency if stats.executor is not None else None
    jsonl = Path(env.config.data_path_to_save_groups)
    groups: list[dict[str, Any]] = []
    if await anyio.Path(jsonl).is_file():
        text = await anyio.Path(jsonl).read_text()
        groups = [json.loads(line) for line in text.splitlines() if line.strip()]
    all_scores = [float(s) for g in groups for s in g["scores"]]
    return {
        "groups": len(groups),
        "trajectories": len(all_scores),
        "mean_score": round(statistics.fmean(all_scores), 3) if all_scores else 0.0,
        "solved": sum(s >= 1.0 for s in all_scores),
        "failed_members": stats.failed_members,
        "dropped_groups": stats.dropped_groups,
        "tool_calls": stats.tool_calls,
        "tool_call_latency_s": (
            {"count": calls.count, "p50": calls.p50, "p99": calls.p99} if calls else None
        ),
        "collect_time_s": collect_time,
        "jsonl": str(jsonl),
        "html": str(jsonl.with_suffix(".html")),
    }


def _print_kept(options: RunOptions, jsonl: Path, written: int) -> None:
    """After a signal: one line saying which groups the run kept (each line of the JSONL is
    one complete group, written and flushed before the next; no HTML view is written)."""
    total = options.args.groups
    if written and jsonl.is_file():
        kept = (
            f"{written} of {total} groups kept in {jsonl} "
            f"(complete groups only; view them with: structenv view {jsonl})"
        )
    else:
        kept = f"no group of {total} was written"
    print(f"{options.prog}: interrupted: {kept}", file=sys.stderr, flush=True)


def _short(reason: str, limit: int = 300) -> str:
    line = " ".join(reason.split())
    return line if len(line) <= limit else line[:limit] + "..."


def _print_failures(console: Any, reasons: collections.Counter[str]) -> None:
    console.print("[bold]failed members[/bold] (count, reason):", highlight=False)
    for reason, count in reasons.most_common(5):
        console.print(f"  {count:4d}  {reason}", soft_wrap=True, highlight=False, markup=False)
    if len(reasons) > 5:
        console.print(f"  ... and {len(reasons) - 5} other reasons", highlight=False)


def _print_summary(console: Any, title: str, summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key in ("groups", "trajectories", "mean_score", "solved", "failed_members",
                "dropped_groups"):  # fmt: skip
        table.add_row(key.replace("_", " "), str(summary[key]))
    table.add_row("tool calls", str(summary["tool_calls"]))
    table.add_row("wall time", f"{summary['wall_time_s']:.1f} s")
    console.print(table)
    # Paths on their own lines, never truncated to the terminal width.
    console.print(f"scored groups: {summary['jsonl']}", soft_wrap=True, highlight=False)
    console.print(f"html view:     {summary['html']}", soft_wrap=True, highlight=False)


if __name__ == "__main__":
    sys.exit(main())

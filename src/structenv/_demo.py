"""``structenv demo``: the shell-tasks env end to end, offline, in under a minute.

What runs, all on this machine with no GPU and no network:

* :class:`~structenv.backends.LocalBackend` sandbox hosts (bubblewrap-isolated slots);
* the scripted policy server on 127.0.0.1 (in-process): real HTTP, vLLM's ``/generate`` and
  ``/health``, replaying the tasks' reference solutions with seeded mistakes (a wrong fix, a
  malformed tool call the agent recovers from, giving up early) so scores vary;
* a tiny byte-level tokenizer, built on first use into ``~/.cache/structenv`` (or
  ``$STRUCTENV_CACHE_DIR``);
* :class:`~structenv.examples.shell_tasks.ShellTasksEnv` in atroposlib's ``process`` mode
  (programmatic: the env is constructed and ``process_manager()`` awaited), with atroposlib's
  ``ManagedServer`` tracking tokens, masks and logprobs across turns.

It writes the scored groups as JSONL plus structenv's HTML view of them (escaped, no script;
``structenv view FILE.jsonl`` renders any such file) into ``--out`` (default
``./structenv-out/``) and prints a summary::

    structenv demo                         # 6 groups of 4
    structenv demo --groups 2 --group-size 2 --out /tmp/demo
    structenv demo --example data-wrangling

Against a real model: pass the endpoint and the model; the scripted server is then not
started. The tokenizer is the server's model's (vLLM's ``/v1/models`` says where the model
was loaded from; ``--tokenizer`` overrides it) and is checked against the server once::

    structenv demo --openai.base_url http://GPU-HOST:8000/v1 \\
        --openai.model_name NousResearch/Hermes-3-Llama-3.1-8B

What each server gives (``docs/design.md``, "Exact tokens from inference servers"): a stock
vLLM OpenAI server (``vllm serve``) has no ``/generate``, so prompts are rendered locally and
sent as token ids to ``/v1/completions``: exact tokens and logprobs. atroposlib's ``/generate``
server and SGLang go through atroposlib's ``ManagedServer``: exact tokens and logprobs. With
``--openai.server_type openai`` (any OpenAI-compatible endpoint) tokens are rebuilt from the
messages with the tokenizer's chat template and the groups carry no ``inference_logprobs``
(never placeholder values). The env's own Atropos CLI
(``python -m structenv.examples.shell_tasks serve|process ...``) takes every ``--env.*`` and
``--openai.*`` flag.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio

__all__ = ["main"]

_EXAMPLES = ("shell-tasks", "data-wrangling", "swe", "swe-images")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="structenv demo",
        description="Run the shell-tasks env end to end offline (sandboxes, scripted policy, "
        "atroposlib process mode) and write the scored groups.",
    )
    parser.add_argument("--groups", type=int, default=6, help="groups to collect (default 6)")
    parser.add_argument("--group-size", type=int, default=4, help="trajectories per group")
    parser.add_argument("--out", default="structenv-out", help="output directory")
    parser.add_argument("--example", choices=_EXAMPLES, default="shell-tasks")
    parser.add_argument("--mistake-rate", type=float, default=0.35, help="scripted mistakes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scripted policy")
    parser.add_argument("--hosts", type=int, default=1, help="sandbox host processes")
    parser.add_argument("--max-steps", type=int, default=8, help="policy calls per trajectory")
    parser.add_argument("--max-tokens", type=int, default=2048, help="tokens per assistant turn")
    parser.add_argument(
        "--backend", choices=["local", "docker"], default="local", help="sandbox backend"
    )
    parser.add_argument(
        "--image",
        default=None,
        help="swe-images: the first task image (default: the sandbox image); the second is "
        "built from a Dockerfile on top of it",
    )
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer dir or hub id (default: the tiny one)"
    )
    parser.add_argument("--openai.base_url", dest="base_url", default=None)
    parser.add_argument("--openai.model_name", dest="model_name", default=None)
    parser.add_argument("--openai.api_key", dest="api_key", default="x")
    parser.add_argument(
        "--openai.server_type", dest="server_type", choices=("vllm", "sglang", "openai"),
        default="vllm",
    )  # fmt: skip
    parser.add_argument(
        "--vllm-api", dest="vllm_api", choices=("auto", "generate", "completions", "chat"),
        default="auto", help="how a vllm server gives exact tokens (default: probe it)",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="tracebacks for errors")
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``structenv demo``; returns the exit status."""
    args = _parser().parse_args(argv)
    if min(args.groups, args.group_size, args.max_steps, args.max_tokens) < 1:
        print(
            "structenv demo: --groups, --group-size, --max-steps and --max-tokens must be >= 1",
            file=sys.stderr,
        )
        return 2
    if importlib.util.find_spec("atroposlib") is None:
        print("structenv demo needs the atropos extra: pip install 'structenv[atropos]'")
        return 2
    env_vars = {"WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    if (args.tokenizer is None and args.base_url is None) or (
        args.tokenizer is not None and Path(args.tokenizer).is_dir()
    ):
        env_vars["HF_HUB_OFFLINE"] = "1"
    with _environment(env_vars), warnings.catch_warnings():
        # process mode warns once per group that the trainer's max length is unset (-1).
        warnings.filterwarnings("ignore", message="Trainer requested to ignore max length")
        # SIGINT/SIGTERM: one orderly shutdown, exit 128 + signal; errors: one line.
        from ._main import report_error, run_until_signal

        try:
            return anyio.run(
                functools.partial(run_until_signal, _run, args, prog="structenv demo"),
                backend="asyncio",
            )
        except Exception as exc:
            return report_error(exc, prog="structenv demo", debug=args.debug)


async def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ._exceptions import StructEnvError
    from .agent import build_tiny_tokenizer

    console = Console()
    started = time.monotonic()
    if args.tokenizer is None and args.base_url is not None:
        args.tokenizer = await _server_tokenizer(args)
    tokenizer = args.tokenizer or str(await anyio.to_thread.run_sync(build_tiny_tokenizer))
    out = Path(args.out)
    await anyio.Path(out).mkdir(parents=True, exist_ok=True)
    try:
        if args.base_url is not None:
            summary = await _collect(args, args.base_url, tokenizer, out, console)
        else:
            from .testing import ReplayScript, serve_policy_server

            script = ReplayScript(
                _solutions(args.example), mistake_rate=args.mistake_rate, seed=args.seed
            )
            async with serve_policy_server(script, seed=args.seed) as server:
                summary = await _collect(args, server.base_url, tokenizer, out, console)
    except StructEnvError as exc:
        console.print(f"[red]structenv demo failed:[/red] {type(exc).__name__}: {exc}")
        return 1
    summary["wall_time_s"] = round(time.monotonic() - started, 2)
    _print_summary(console, summary)
    return 0 if summary["groups"] == args.groups else 1


async def _server_tokenizer(args: argparse.Namespace) -> str:
    """The tokenizer of the server's model: vLLM's ``root`` (where it loaded the model from),
    else the model name."""
    from ._exceptions import ConfigError
    from .adapters.atropos._inference import server_model

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


def _solutions(example: str) -> dict[str, Any]:
    if example == "data-wrangling":
        from .examples.data_wrangling import data_wrangling_solutions

        return dict(data_wrangling_solutions())
    from .examples._shell_data import shell_task_solutions

    return dict(shell_task_solutions())


def _two_images(image: str | None, out: Path) -> dict[str, Any]:
    """swe-images: the sandbox image as one task image, and a second one built from a
    Dockerfile on top of it (no registry: both are local)."""
    from ._image import DEFAULT_TAG

    first = image or os.environ.get("STRUCTENV_TEST_IMAGE") or DEFAULT_TAG
    context = out / "swe-image-b"
    context.mkdir(parents=True, exist_ok=True)
    dockerfile = context / "Dockerfile"
    dockerfile.write_text(f"FROM {first}\nENV SWE_IMAGE=b\nRUN echo b > /etc/swe-image\n")
    return {"images": [first], "dockerfiles": [str(dockerfile)]}


async def _collect(
    args: argparse.Namespace, base_url: str, tokenizer: str, out: Path, console: Any
) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from .adapters.atropos import AgentEnv, APIServerConfig, GroupReport

    env_cls: type[AgentEnv]
    fields: dict[str, Any] = dict(
        group_size=args.group_size,
        total_steps=args.groups,
        tokenizer_name=tokenizer,
        use_wandb=False,
        include_messages=True,
        ensure_scores_are_not_same=False,
        data_path_to_save_groups=str(out / f"{args.example}.jsonl"),
        max_token_length=16384,
        slots_per_host=max(1, -(-args.group_size // args.hosts)),
        min_hosts=args.hosts,
        max_hosts=args.hosts,
        agent_max_steps=args.max_steps,
        agent_max_tokens=args.max_tokens,
        trajectory_timeout_s=120.0,
        vllm_api=args.vllm_api,
        backend=args.backend,
    )
    if args.example == "data-wrangling":
        from .adapters.atropos import AgentEnvConfig
        from .examples.data_wrangling import DataWranglingEnv

        env_cls, config = DataWranglingEnv, AgentEnvConfig(**fields)
    elif args.example in ("swe", "swe-images"):
        from .examples.swe_tasks import SweTasksEnv, SweTasksEnvConfig

        if args.example == "swe-images":
            fields.update(await anyio.to_thread.run_sync(_two_images, args.image, out))
        env_cls, config = SweTasksEnv, SweTasksEnvConfig(**fields)
    else:
        from .examples.shell_tasks import ShellTasksEnv, ShellTasksEnvConfig

        env_cls, config = ShellTasksEnv, ShellTasksEnvConfig(**fields)
    server = APIServerConfig(
        server_type=args.server_type,
        base_url=base_url,
        model_name=args.model_name or "scripted",
        tokenizer_name=tokenizer,
        api_key=args.api_key,
        health_check=False,
        timeout=300,
    )
    env = env_cls(config, [server])
    env.process_mode = True
    env.n_groups_to_process = args.groups
    env.group_size_to_process = args.group_size

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=args.quiet,
    )
    bar = progress.add_task(f"{args.example} groups", total=args.groups, status="starting")
    scores: list[float] = []

    def on_group(report: GroupReport) -> None:
        if report.dropped:
            return
        scores.extend(report.scores)
        status = f"mean score {statistics.fmean(scores):.2f}, {report.tool_calls} tool calls"
        progress.update(bar, advance=1, status=status)

    env.add_group_listener(on_group)
    with progress:
        await env.process_manager()
    stats = env.statistics()
    jsonl = Path(env.config.data_path_to_save_groups)
    text = await anyio.Path(jsonl).read_text()
    groups = [json.loads(line) for line in text.splitlines() if line.strip()]
    all_scores = [float(s) for g in groups for s in g["scores"]]
    return {
        "groups": len(groups),
        "trajectories": len(all_scores),
        "mean_score": round(statistics.fmean(all_scores), 3) if all_scores else 0.0,
        "solved": sum(s >= 1.0 for s in all_scores),
        "failed_members": stats.failed_members,
        "tool_calls": stats.tool_calls,
        "jsonl": str(jsonl),
        "html": str(jsonl.with_suffix(".html")),
    }


def _print_summary(console: Any, summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="structenv demo", show_header=False)
    for key in ("groups", "trajectories", "mean_score", "solved", "failed_members"):
        table.add_row(key.replace("_", " "), str(summary[key]))
    table.add_row("tool calls", str(summary["tool_calls"]))
    table.add_row("wall time", f"{summary['wall_time_s']:.1f} s")
    console.print(table)
    # Paths on their own lines, never truncated to the terminal width.
    console.print(f"scored groups: {summary['jsonl']}", soft_wrap=True, highlight=False)
    console.print(f"html view:     {summary['html']}", soft_wrap=True, highlight=False)


if __name__ == "__main__":
    sys.exit(main())

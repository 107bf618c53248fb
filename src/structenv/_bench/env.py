"""``structenv bench env MODULE:Env``: your env, end to end, offline, with its numbers.

It runs the env exactly as ``structenv run MODULE:Env --offline`` does (the same machinery:
:func:`structenv.adapters.atropos._run.collect_run`): a scripted policy server replays the
env's ``offline_solutions()``, the tiny tokenizer, the env's own backend and config
(``--env.<field> VALUE`` sets any field). Against a real endpoint give ``--openai.base_url``
and ``--openai.model_name`` instead (then the model's speed is in every number).

Reported (table on stdout, ``DIR/env.json``): groups/s, trajectories/s and tool calls/s over
the collection (``process_manager``: the server and tokenizer start-up excluded), p50/p99
trajectory wall time (each member: slot, agent loop, scoring), p50/p99 tool-call latency (the
executor's ``call_latency``), mean score, failed members. The scored groups go to
``DIR/<Env>.jsonl`` as with ``structenv run``.

Exit status as ``structenv run``: 0 when every group was written, 1 when fewer were or the
run stopped on an error (one line), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

PROG = "structenv bench env"
_COLUMNS = (
    "groups/s",
    "traj/s",
    "tool calls/s",
    "traj p50 ms",
    "traj p99 ms",
    "call p50 ms",
    "call p99 ms",
    "mean score",
    "failed",
)


def _parser() -> argparse.ArgumentParser:
    from ..adapters.atropos._run import add_run_arguments

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Benchmark an AgentEnv end to end (offline unless --openai.base_url). "
        "--env.<field> VALUE sets any field of the env's config.",
    )
    parser.add_argument(
        "env",
        metavar="MODULE:ENV",
        help="the env class: my_pkg.my_env:MyEnv or path/to/env.py:MyEnv",
    )
    add_run_arguments(parser)
    parser.set_defaults(out="structenv-bench", quiet=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``structenv bench env``; returns the exit status."""
    from ..adapters.atropos._run import RunOptions, parse_run_argv, run_env

    parsed = parse_run_argv(argv, _parser(), PROG)
    if isinstance(parsed, int):
        return parsed
    args, env_cls, fields = parsed
    options = RunOptions(
        args, env_cls, offline=args.base_url is None, fields=fields, name=env_cls.__name__,
        prog=PROG,
    )  # fmt: skip
    return run_env(options, _bench)


async def _bench(options: Any) -> int:
    from rich.console import Console

    from ..adapters.atropos._config import GroupReport
    from ..adapters.atropos._run import collect_run
    from ._report import NOISE_NOTE, machine_info, percentile, print_table, progress, write_results

    args = options.args
    durations: list[float] = []

    def on_group(report: GroupReport) -> None:
        durations.extend(report.durations)
        state = "dropped" if report.dropped else f"{len(report.scores)} trajectories"
        progress(f"group {report.group + 1}/{args.groups}: {state}, "
                 f"{report.tool_calls} tool calls, {report.duration:.2f} s")  # fmt: skip

    progress(f"{options.name}: {args.groups} groups of {args.group_size}, "
             f"{'offline' if options.offline else args.base_url}")  # fmt: skip
    summary = await collect_run(options, Console(stderr=True), on_group=on_group)
    seconds = max(summary["collect_time_s"], 1e-9)
    calls = summary["tool_call_latency_s"]
    payload: dict[str, Any] = {
        "benchmark": "env",
        "env": args.env,
        "offline": options.offline,
        "groups_requested": args.groups,
        "group_size": args.group_size,
        "groups": summary["groups"],
        "trajectories": summary["trajectories"],
        "tool_calls": summary["tool_calls"],
        "failed_members": summary["failed_members"],
        "dropped_groups": summary["dropped_groups"],
        "mean_score": summary["mean_score"],
        "collect_time_s": round(seconds, 3),
        "wall_time_s": summary["wall_time_s"],
        "groups_per_s": round(summary["groups"] / seconds, 3),
        "trajectories_per_s": round(summary["trajectories"] / seconds, 3),
        "tool_calls_per_s": round(summary["tool_calls"] / seconds, 3),
        "trajectory_p50_ms": round(percentile(durations, 50) * 1e3, 3) if durations else None,
        "trajectory_p99_ms": round(percentile(durations, 99) * 1e3, 3) if durations else None,
        "tool_call_p50_ms": round(calls["p50"] * 1e3, 3) if calls and calls["count"] else None,
        "tool_call_p99_ms": round(calls["p99"] * 1e3, 3) if calls and calls["count"] else None,
        "jsonl": summary["jsonl"],
        "machine": machine_info(),
    }
    row = [
        f"{payload['groups_per_s']:.2f}",
        f"{payload['trajectories_per_s']:.2f}",
        f"{payload['tool_calls_per_s']:.2f}",
        payload["trajectory_p50_ms"],
        payload["trajectory_p99_ms"],
        payload["tool_call_p50_ms"],
        payload["tool_call_p99_ms"],
        f"{payload['mean_score']:.3f}",
        payload["failed_members"],
    ]
    print_table(f"{options.name}: {summary['groups']} groups x {args.group_size}", _COLUMNS, [row])
    path = write_results("env", payload, Path(args.out))
    print(f"wrote {path}")
    print(f"scored groups: {summary['jsonl']}")
    print(NOISE_NOTE)
    if summary["groups"] < args.groups:
        print(f"{PROG}: error: {summary['groups']} of {args.groups} groups written",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0

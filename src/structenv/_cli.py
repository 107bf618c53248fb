"""The ``structenv`` command line.

Subcommands import what they need lazily, so ``structenv doctor`` works without the atropos
extra and ``structenv --help`` is instant.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def _forward(module: str, argv: Sequence[str]) -> int:
    """Hand the remaining arguments to ``module.main(argv)``."""
    entry = importlib.import_module(module).main
    return int(entry(list(argv)) or 0)


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ._exceptions import ConfigError

    out = Path(args.out)
    try:
        if args.backend is not None:
            if args.which != "exec":
                raise ConfigError("--backend works with `structenv bench exec` only")
            return _bench_user(args, out)
        if args.command != _DEFAULT_BENCH_COMMAND:
            raise ConfigError("--command works with --backend only")
        module = importlib.import_module(f"structenv._bench.{args.which}")
        module.run(quick=args.quick, out=out)
    except ConfigError as exc:
        print(f"structenv bench: {exc}", file=sys.stderr)
        return 2
    return 0


def _bench_user(args: argparse.Namespace, out: Any) -> int:
    import anyio

    from ._bench._report import finish, print_table
    from ._bench._user import load_factory, run_user_bench

    factory = load_factory(args.backend)
    payload = anyio.run(
        functools.partial(
            run_user_bench, factory, command=args.command, quick=args.quick, name=args.backend
        )
    )
    rows = [
        [path, level, stats["p50_ms"], stats["p99_ms"], stats["throughput_per_s"]]
        for path in ("slot_api", "full_stack")
        for level, stats in payload[path].items()
    ]
    print_table(
        f"{args.backend}: {args.command}",
        ["path", "concurrency", "p50 ms", "p99 ms", "cmds/s"],
        rows,
    )
    finish("user", payload, out)
    return 0


_DEFAULT_BENCH_COMMAND = "/bin/true"


def _doctor(args: argparse.Namespace) -> int:
    from ._doctor import doctor, format_report

    report = doctor()
    print(format_report(report))
    return 0


def _quiet_transformers() -> None:
    """Silence transformers' import-time advisories (``PyTorch was not found. Models won't be
    available ...``: structenv needs tokenizers only) for structenv's commands. Set here, in
    the entry point, before atroposlib imports transformers; importing the library changes
    nothing. An explicit ``TRANSFORMERS_NO_ADVISORY_WARNINGS`` in the environment is kept."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``structenv`` console script and of ``python -m structenv``."""
    _quiet_transformers()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Commands that own their whole argument list (they parse atroposlib-style flags).
    forwarded = {
        "demo": "structenv._demo",
        "run": "structenv.adapters.atropos._run",
        "policy-server": "structenv.testing._policy_server",
        "image": "structenv._image",
        "reap": "structenv._reap",
        "view": "structenv._viewer",
    }
    if argv and argv[0] in forwarded:
        return _forward(forwarded[argv[0]], argv[1:])
    if argv[:2] == ["bench", "env"]:  # owns its flags (--env.<field> VALUE)
        return _forward("structenv._bench.env", argv[2:])

    parser = argparse.ArgumentParser(
        prog="structenv",
        description="Sandboxed agent trajectories for RL environments.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the shell-tasks example env end to end (offline)")
    sub.add_parser("run", help="run any AgentEnv end to end: structenv run MODULE:Env --offline")
    sub.add_parser("policy-server", help="run the scripted policy server")
    sub.add_parser("image", help="build the sandbox image locally (no registry needed)")
    sub.add_parser("reap", help="remove work dirs and containers left behind by dead runs")
    sub.add_parser("view", help="write an escaped HTML view of a JSONL of scored groups")
    doctor = sub.add_parser("doctor", help="report which isolation features work here")
    doctor.set_defaults(func=_doctor)
    bench = sub.add_parser(
        "bench",
        help="run a benchmark; JSON and PNG plots go to --out",
        description="Benchmarks of structenv (docs/benchmarks.md). Progress goes to stderr, "
        "tables to stdout, DIR/NAME.json and DIR/NAME.png to --out. Your own env: "
        "`structenv bench env MODULE:Env` (see `structenv bench env --help`).",
    )
    bench.add_argument("which", choices=["dispatch", "exec", "docker", "specs", "ray"])
    bench.add_argument(
        "--quick", action="store_true", help="asyncio only, small sizes (about 30 s)"
    )
    bench.add_argument(
        "--out", default="structenv-bench", help="results directory (default ./structenv-bench)"
    )
    bench.add_argument(
        "--backend",
        metavar="MODULE:FACTORY",
        help="bench exec on your backend: FACTORY() returns an unstarted SandboxBackend",
    )
    bench.add_argument(
        "--command",
        default=_DEFAULT_BENCH_COMMAND,
        help="with --backend: the command to run (default /bin/true)",
    )
    bench.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``structenv`` command line.

Subcommands import what they need lazily, so ``structenv doctor`` works without the atropos
extra and ``structenv --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _forward(module: str, argv: Sequence[str]) -> int:
    """Hand the remaining arguments to ``module.main(argv)``."""
    entry = importlib.import_module(module).main
    return int(entry(list(argv)) or 0)


def _bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"structenv._bench.{args.which}")
    module.run(quick=args.quick)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from ._doctor import doctor, format_report

    report = doctor()
    print(format_report(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``structenv`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Commands that own their whole argument list (they parse atroposlib-style flags).
    forwarded = {
        "demo": "structenv._demo",
        "policy-server": "structenv.testing._policy_server",
        "image": "structenv._image",
        "reap": "structenv._reap",
        "view": "structenv._viewer",
    }
    if argv and argv[0] in forwarded:
        return _forward(forwarded[argv[0]], argv[1:])

    parser = argparse.ArgumentParser(
        prog="structenv",
        description="Sandboxed agent trajectories for RL environments.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the shell-tasks example env end to end (offline)")
    sub.add_parser("policy-server", help="run the scripted policy server")
    sub.add_parser("image", help="build the sandbox image locally (no registry needed)")
    sub.add_parser("reap", help="remove work dirs and containers left behind by dead runs")
    sub.add_parser("view", help="write an escaped HTML view of a JSONL of scored groups")
    doctor = sub.add_parser("doctor", help="report which isolation features work here")
    doctor.set_defaults(func=_doctor)
    bench = sub.add_parser("bench", help="run a benchmark; results go to benchmarks/results/")
    bench.add_argument("which", choices=["dispatch", "exec", "docker"])
    bench.add_argument("--quick", action="store_true", help="a shorter run (under 30 s)")
    bench.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())

"""``structenv reap``: find and remove what dead runs left behind.

Every resource a backend creates carries owner labels (:mod:`structenv.backends._ownership`);
a resource is removed only when its owner process is gone on this host. Backends run their
reapers at start-up too; this is the same code run by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

from .backends._ownership import ReapReport

__all__ = ["main"]


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="structenv reap",
        description="Remove sandbox containers left behind by structenv runs whose owner "
        "process is gone (same host, pid dead or reused, or the host rebooted). "
        "Live runs' and other hosts' containers are never touched.",
    )
    p.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    p.add_argument("--pool", help="only containers of this pool name")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--docker-url", help="Docker Engine URL (default: from the environment)")
    p.add_argument(
        "--nomad-url",
        help="reap Nomad jobs on this cluster (e.g. http://127.0.0.1:4646) instead of containers",
    )
    p.add_argument("--nomad-token", help="Nomad ACL token (default: $NOMAD_TOKEN)")
    return p.parse_args(list(argv))


async def _reap_nomad(args: argparse.Namespace) -> ReapReport:
    import os

    import httpx

    from .backends._nomad import _Nomad, reap_jobs

    token = args.nomad_token or os.environ.get("NOMAD_TOKEN")
    headers = {"X-Nomad-Token": token} if token else {}
    async with httpx.AsyncClient(base_url=args.nomad_url, headers=headers, timeout=30) as http:
        return await reap_jobs(_Nomad(http, attempts=4), pool=args.pool, dry_run=args.dry_run)


def main(argv: Sequence[str] | None = None) -> int:
    """``structenv reap``: remove dead runs' containers (or Nomad jobs); exit 1 if a removal
    failed."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    what = "job(s)" if args.nomad_url else "container(s)"
    if args.nomad_url:
        import anyio

        report = anyio.run(_reap_nomad, args)
    else:
        from .backends._docker import reap_containers  # the SDK stays in the docker module

        report = reap_containers(docker_url=args.docker_url, pool=args.pool, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
    else:
        verb = "would remove" if report.dry_run else "removed"
        print(f"{verb} {len(report.removed)} {what} of dead runs")
        for cid in report.removed:
            print(f"  {cid}")
        print(f"left {len(report.alive)} of live runs, {len(report.foreign)} of other hosts")
        for cid, error in report.failed:
            print(f"  FAILED {cid}: {error}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``structenv reap``: find and remove what dead runs left behind.

Every resource a backend creates carries owner labels (:mod:`structenv.backends._ownership`);
a resource is removed only when its owner process is gone on this host. Backends run their
reapers at start-up too; this is the same code run by hand.

Without options it removes LocalBackend work dirs (``/var/tmp/structenv-<pid>-*``: workspaces,
sockets, and the hosts' cgroups) and Docker containers of dead runs; with ``--nomad-url``, Nomad
jobs instead; with ``--ray``, RayBackend's detached host actors of dead runs and dead runs'
work dirs on every node of the Ray cluster. Docker is skipped with a note when no engine
answers (unless ``--docker-url`` names one).
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
        description="Remove local work dirs and sandbox containers left behind by structenv "
        "runs whose owner process is gone (same host, pid dead or reused, or the host "
        "rebooted). Live runs' and other hosts' resources are never touched.",
    )
    p.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    p.add_argument("--pool", help="only containers of this pool name (skips local work dirs)")
    p.add_argument(
        "--workdir",
        help="look for local work dirs in DIR (LocalBackend's workdir=; default /var/tmp)",
    )
    p.add_argument("--local", action="store_true", help="only local work dirs, no containers")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--docker-url", help="Docker Engine URL (default: from the environment)")
    p.add_argument(
        "--nomad-url",
        help="reap Nomad jobs on this cluster (e.g. http://127.0.0.1:4646) instead of containers",
    )
    p.add_argument("--nomad-token", help="Nomad ACL token (default: $NOMAD_TOKEN)")
    p.add_argument(
        "--ray",
        action="store_true",
        help="reap RayBackend hosts instead of containers: detached host actors of dead runs, "
        "and dead runs' work dirs on every node of the Ray cluster",
    )
    p.add_argument(
        "--ray-address",
        help="Ray cluster (default: the running one, $RAY_ADDRESS, or 'auto')",
    )
    p.add_argument("--ray-namespace", help="only host actors in this Ray namespace")
    return p.parse_args(list(argv))


async def _reap_nomad(args: argparse.Namespace) -> ReapReport:
    import os

    import httpx

    from .backends._nomad import _Nomad, reap_jobs

    token = args.nomad_token or os.environ.get("NOMAD_TOKEN")
    headers = {"X-Nomad-Token": token} if token else {}
    async with httpx.AsyncClient(base_url=args.nomad_url, headers=headers, timeout=30) as http:
        return await reap_jobs(_Nomad(http, attempts=4), pool=args.pool, dry_run=args.dry_run)


def _reap_ray(args: argparse.Namespace) -> dict[str, ReapReport]:
    from .backends._ray_node import reap_cluster  # the only module importing ray

    actors, workdirs = reap_cluster(
        address=args.ray_address, namespace=args.ray_namespace, dry_run=args.dry_run
    )
    return {"Ray actor(s)": actors, "Ray work dir(s)": workdirs}


def _print(report: ReapReport, what: str) -> None:
    verb = "would remove" if report.dry_run else "removed"
    print(f"{verb} {len(report.removed)} {what} of dead runs")
    for rid in report.removed:
        print(f"  {rid}")
    print(f"left {len(report.alive)} of live runs, {len(report.foreign)} of other hosts")
    for rid, error in report.failed:
        print(f"  FAILED {rid}: {error}")


def _reap_docker(args: argparse.Namespace) -> ReapReport | None:
    """Containers of dead runs; ``None`` (with a note) when no engine answers and none was
    named."""
    try:
        from .backends._docker import reap_containers  # the SDK stays in the docker module

        return reap_containers(docker_url=args.docker_url, pool=args.pool, dry_run=args.dry_run)
    except Exception as exc:
        if args.docker_url or args.pool:
            raise
        print(f"containers: skipped, no Docker engine answers ({type(exc).__name__})")
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """``structenv reap``: remove dead runs' work dirs and containers (or Nomad jobs); exit 1
    if a removal failed."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    reports: dict[str, ReapReport] = {}
    if args.nomad_url:
        import anyio

        reports["job(s)"] = anyio.run(_reap_nomad, args)
    elif args.ray:
        reports.update(_reap_ray(args))
    else:
        if not args.pool:
            from .backends._local import reap_workdirs

            reports["work dir(s)"] = reap_workdirs(base=args.workdir, dry_run=args.dry_run)
        if not args.local:
            containers = _reap_docker(args)
            if containers is not None:
                reports["container(s)"] = containers
    if args.json:
        if len(reports) == 1:
            (only,) = reports.values()
            print(json.dumps(dataclasses.asdict(only), indent=2))
        else:
            named = {what.split("(")[0].lower().replace(" ", "_"): r for what, r in reports.items()}
            print(json.dumps({k: dataclasses.asdict(r) for k, r in named.items()}, indent=2))
    else:
        for what, report in reports.items():
            _print(report, what)
    return 1 if any(r.failed for r in reports.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())

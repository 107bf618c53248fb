"""Find and remove what dead runs left behind, using the owner labels every resource carries.

Every container (and, later, Nomad job or Modal sandbox) a backend creates is labelled with the
identity of the process that owns it: host name, boot id, pid and the pid's start time (clock
ticks since boot, field 22 of ``/proc/<pid>/stat``). An owner is *dead* when, on the same host,
the machine has rebooted since (boot id differs), the pid no longer exists, or the pid now
belongs to a different process (start time differs: pid reuse). Resources of a live owner, or
of an owner on another host (whose liveness cannot be checked from here), are never touched.

``structenv reap`` (:func:`main`) runs the reaper by hand; backends run it at start-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from .sandbox._bwrap import rmdir_all

__all__ = [
    "DOCKER_CGROUP_PARENT",
    "DOCKER_MOUNT",
    "LABEL_BACKEND",
    "LABEL_CREATED",
    "LABEL_MANAGED",
    "LABEL_OWNER_BOOT",
    "LABEL_OWNER_HOST",
    "LABEL_OWNER_PID",
    "LABEL_OWNER_START",
    "LABEL_POOL",
    "LABEL_RUN",
    "Owner",
    "OwnerState",
    "ReapReport",
    "current_owner",
    "reap_docker",
    "remove_docker_cgroups",
    "main",
    "owner_labels",
    "owner_state",
    "process_start_time",
]

LABEL_MANAGED = "org.structenv.managed"
LABEL_BACKEND = "org.structenv.backend"
LABEL_RUN = "org.structenv.run"
LABEL_POOL = "org.structenv.pool"
LABEL_OWNER_HOST = "org.structenv.owner.host"
LABEL_OWNER_BOOT = "org.structenv.owner.boot"
LABEL_OWNER_PID = "org.structenv.owner.pid"
LABEL_OWNER_START = "org.structenv.owner.start"
LABEL_CREATED = "org.structenv.created"
#: Where DockerBackend bind-mounts a container's private host directory (its unix socket).
DOCKER_MOUNT = "/run/structenv"
#: The v1 cgroup (in every hierarchy) under which DockerBackend makes each container's parent
#: cgroup, ``/sys/fs/cgroup/<controller>/structenv-docker/<container name>``.
DOCKER_CGROUP_PARENT = "structenv-docker"
_CGROUP_V1 = "/sys/fs/cgroup"
#: Seconds a container's cgroups may exist without the container before the reaper takes them
#: for a dead run's (a live backend makes them just before it creates the container).
_ORPHAN_CGROUP_AGE = 600.0

#: ``alive``: the owner process still runs; ``dead``: it is gone (reapable); ``foreign``: it
#: ran on another host (never reaped from here); ``invalid``: the labels are incomplete
#: (never reaped: it may be someone else's resource with a similar label).
OwnerState = Literal["alive", "dead", "foreign", "invalid"]


@dataclasses.dataclass(frozen=True, slots=True)
class Owner:
    """Identity of a process, stable against pid reuse and reboots."""

    host: str
    boot: str
    pid: int
    start: str


@dataclasses.dataclass(frozen=True, slots=True)
class ReapReport:
    """What a reaper run found and did (resource ids, by outcome).

    Attributes:
        removed: Resources of dead owners that were removed (or would be, on a dry run).
        alive: Resources whose owner still runs (left alone).
        foreign: Resources owned from another host (left alone).
        failed: Resources of dead owners whose removal failed, with the error.
        dry_run: Nothing was removed.
    """

    removed: tuple[str, ...] = ()
    alive: tuple[str, ...] = ()
    foreign: tuple[str, ...] = ()
    failed: tuple[tuple[str, str], ...] = ()
    dry_run: bool = False


def process_start_time(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot, or ``None`` if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else None


@functools.cache
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def current_owner() -> Owner:
    """The identity of this process."""
    pid = os.getpid()
    return Owner(socket.gethostname(), _boot_id(), pid, process_start_time(pid) or "unknown")


def owner_labels(*, backend: str, run_id: str, pool: str) -> dict[str, str]:
    """The labels a backend puts on every resource it creates."""
    me = current_owner()
    return {
        LABEL_MANAGED: "1",
        LABEL_BACKEND: backend,
        LABEL_RUN: run_id,
        LABEL_POOL: pool,
        LABEL_OWNER_HOST: me.host,
        LABEL_OWNER_BOOT: me.boot,
        LABEL_OWNER_PID: str(me.pid),
        LABEL_OWNER_START: me.start,
        LABEL_CREATED: f"{time.time():.3f}",
    }


def owner_state(labels: Mapping[str, str], *, me: Owner | None = None) -> OwnerState:
    """Whether the process that created a labelled resource is still alive."""
    me = me or current_owner()
    host = labels.get(LABEL_OWNER_HOST)
    pid_text = labels.get(LABEL_OWNER_PID, "")
    start = labels.get(LABEL_OWNER_START)
    if not host or not pid_text.isdigit() or not start:
        return "invalid"
    if host != me.host:
        return "foreign"
    if labels.get(LABEL_OWNER_BOOT) != me.boot:
        return "dead"  # the machine rebooted: every process from before is gone
    if int(pid_text) == me.pid:
        return "alive" if start == me.start else "dead"
    now = process_start_time(int(pid_text))
    return "alive" if now is not None and now == start else "dead"


def reap_docker(
    client: Any, *, pool: str | None, purge: bool = False, dry_run: bool = False
) -> ReapReport:
    """Remove containers of dead owners through a Docker SDK ``client`` (blocking).

    With ``purge``, remove every container of ``pool`` whatever its owner's state. The SDK
    itself is only imported by the docker backend; this works on the client it passes.
    """
    filters = {"label": [f"{LABEL_MANAGED}=1"]}
    if pool is not None:
        filters["label"].append(f"{LABEL_POOL}={pool}")
    removed: list[str] = []
    alive: list[str] = []
    foreign: list[str] = []
    failed: list[tuple[str, str]] = []
    me = current_owner()
    for container in client.containers.list(all=True, filters=filters, ignore_removed=True):
        state = owner_state(container.labels or {}, me=me)
        cid = f"{container.name} ({container.short_id})"
        if not purge and state != "dead":
            (alive if state == "alive" else foreign).append(cid)
            continue
        if dry_run:
            removed.append(cid)
            continue
        try:
            container.remove(force=True, v=True)
        except Exception as exc:
            status = getattr(exc, "status_code", None)
            if not (status == 404 or (status == 409 and "in progress" in str(exc))):
                failed.append((cid, repr(exc)))
                continue
        removed.append(cid)
        _remove_docker_hostdir(container.attrs.get("Mounts") or [])
        if container.name and not remove_docker_cgroups(container.name, patience=5):
            failed.append((cid, "its cgroups are still busy"))
    if not dry_run:
        # Every container, managed or not and of any pool: only a name nobody uses is orphaned.
        known = {c.name for c in client.containers.list(all=True, ignore_removed=True)}
        _remove_orphan_cgroups(known)
    return ReapReport(tuple(removed), tuple(alive), tuple(foreign), tuple(failed), dry_run)


def docker_cgroup_dirs(name: str) -> list[str]:
    """Every cgroup directory of the container ``name`` that exists (all hierarchies)."""
    return sorted(glob.glob(os.path.join(_CGROUP_V1, "*", DOCKER_CGROUP_PARENT, glob.escape(name))))


def remove_docker_cgroups(name: str, *, patience: float = 0.0) -> bool:
    """Remove the container ``name``'s parent cgroups and everything under them (blocking).

    A cgroup can be removed only once its last process is reaped, which follows the
    container's removal by a moment: retries for up to ``patience`` seconds. Returns whether
    everything is gone.
    """
    deadline = time.monotonic() + patience
    delay = 0.005
    while not _remove_cgroups_once(name) and time.monotonic() < deadline:
        time.sleep(delay)  # blocking by design (runs in a worker thread); bounded
        delay = min(delay * 2, 0.2)
    return _remove_cgroups_once(name)


def _remove_cgroups_once(name: str) -> bool:
    gone = True
    for top in docker_cgroup_dirs(name):
        # Children first: a v1 cgroup directory is removed with rmdir once it has no child.
        paths = [path for path, _dirs, _files in os.walk(top, topdown=False)]
        gone = rmdir_all(paths) and gone
    return gone


def docker_cgroup_names() -> set[str]:
    """Names of the containers that have cgroups under ``structenv-docker`` (any hierarchy)."""
    pattern = os.path.join(_CGROUP_V1, "*", DOCKER_CGROUP_PARENT, "*")
    return {os.path.basename(p) for p in glob.glob(pattern) if os.path.isdir(p)}


def _remove_orphan_cgroups(known: set[str]) -> None:
    """Remove cgroups of containers that no longer exist (their run died after removing
    them), once old enough that no live backend is about to create the container."""
    now = time.time()
    for name in docker_cgroup_names() - known:
        if not re.fullmatch(r"structenv-.+-\d+", name):
            continue
        try:
            made = min(os.stat(p).st_mtime for p in docker_cgroup_dirs(name))
        except (OSError, ValueError):
            continue
        if now - made > _ORPHAN_CGROUP_AGE:
            remove_docker_cgroups(name)


def _remove_docker_hostdir(mounts: list[dict[str, Any]]) -> None:
    """Remove a dead run's socket directory (only one DockerBackend made)."""
    for mount in mounts:
        source = str(mount.get("Source") or "")
        if mount.get("Destination") == DOCKER_MOUNT and "/structenv-docker-" in source:
            shutil.rmtree(source, ignore_errors=True)
            try:
                os.rmdir(os.path.dirname(source))  # the run's root, once its last one is gone
            except OSError:
                pass


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

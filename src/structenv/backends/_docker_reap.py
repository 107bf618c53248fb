"""Docker cleanup: remove dead runs' containers, their cgroups and socket directories.

Used by :class:`~structenv.backends.DockerBackend` at start-up and by ``structenv reap``. The
Docker SDK itself is imported only by the docker backend; these functions work on the client
it passes.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import time
from typing import Any

from ..sandbox._bwrap import rmdir_all
from ._ownership import LABEL_MANAGED, LABEL_POOL, ReapReport, current_owner, owner_state

__all__ = [
    "DOCKER_CGROUP_PARENT",
    "DOCKER_MOUNT",
    "docker_cgroup_dirs",
    "docker_cgroup_names",
    "reap_docker",
    "remove_docker_cgroups",
]

#: Where DockerBackend bind-mounts a container's private host directory (its unix socket).
DOCKER_MOUNT = "/run/structenv"
#: The v1 cgroup (in every hierarchy) under which DockerBackend makes each container's parent
#: cgroup, ``/sys/fs/cgroup/<controller>/structenv-docker/<container name>``.
DOCKER_CGROUP_PARENT = "structenv-docker"
_CGROUP_V1 = "/sys/fs/cgroup"
#: Seconds a container's cgroups may exist without the container before the reaper takes them
#: for a dead run's (a live backend makes them just before it creates the container).
_ORPHAN_CGROUP_AGE = 600.0


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

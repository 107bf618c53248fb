"""Owner labels: which process created a resource, and whether it is still alive.

Every container, Nomad job or Modal sandbox a backend creates is labelled with the identity of
the process that owns it: host name, boot id, pid and the pid's start time (clock ticks since
boot, field 22 of ``/proc/<pid>/stat``). An owner is *dead* when, on the same host, the machine
has rebooted since (boot id differs), the pid no longer exists, or the pid now belongs to a
different process (start time differs: pid reuse). Resources of a live owner, or of an owner on
another host (whose liveness cannot be checked from here), are never touched.

Backends import this module (it imports no backend); ``structenv reap`` (:mod:`structenv._reap`)
sits above the backends and runs their reapers.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import time
from collections.abc import Mapping
from typing import Literal

__all__ = [
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

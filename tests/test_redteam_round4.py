"""Red team, round 4: attacks on what landed on 2026-12-04, from inside real slots.

What worked (and is fixed) is in ``tests/test_verify_tamper.py`` (the example envs'
verification: cached bytecode, a workspace module ahead of the standard library, a package
marker next to the tests, a read-only forged report). What held, and was not tested yet, is
here: the cgroup join from outside (every process of a slot's uid is in the slot's cgroups
from its first command, lease after lease) and a networked slot's flow budget against the
slot itself (it cannot flush or change its own ruleset). docs/design.md, threat model.
"""

from __future__ import annotations

import os
import posixpath
import time

import pytest

from structenv import ExecRequest, SlotPool
from structenv.abc import Slot
from test_docker_support import docker_backend, docker_image
from test_sandbox_net_budget import attack, within_budget
from test_sandbox_network import networked, remote_machine
from test_sandbox_support import local_backend

_ = docker_image
pytestmark = pytest.mark.anyio

HIERARCHIES = ("pids", "memory", "cpu")


def _cgroups(pid: int) -> dict[str, str]:
    """``pid``'s cgroup path in each of :data:`HIERARCHIES` (v1 lines ``N:ctrl,...:path``)."""
    paths: dict[str, str] = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(","):
                if c in HIERARCHIES:
                    paths[c] = path
    return paths


def _processes_of(uid: int) -> list[int]:
    """The host's processes whose real uid is ``uid`` (a slot's own uid: only its processes)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                real = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if real == uid:
            found.append(int(entry))
    return found


def _zombie(pid: int) -> bool:
    """Whether ``pid`` has exited and awaits its reaping (an old sandbox's PID 1, whose
    bwrap parent died, until the host's init reaps it; it is in no cgroup but ``/``)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


#: The slot's first command of a lease: leave processes behind (a plain child, a double
#: forked ``setsid`` one), then report its uid and its own view of its cgroups.
_FIRST = "sleep 300 & (setsid sleep 300 &); id -u; cat /proc/self/cgroup"


@pytest.mark.skipif(os.geteuid() != 0, reason="the join from outside is a root server's")
async def test_every_process_of_a_slots_uid_is_in_its_cgroups_lease_after_lease() -> None:
    # SlotCgroup.join moves the worker while it starts; a reset starts the next sandbox
    # while the old one dies, in another of the slot's cgroups. At the first command of
    # each lease every host process of the slot's uid (the old sandbox's leftovers
    # included: the slot is handed out only once they are gone) is in one cgroup per
    # hierarchy, the one the slot's own /proc/self/cgroup names (relative to the server's).
    async with local_backend(slots_per_host=1, cpu_limit=0.5) as backend:
        pool = SlotPool(backend, acquire_timeout=60)
        seen = set()
        for _ in range(4):  # more leases than the slot has cgroup names (3)
            async with pool.slot() as slot:
                got = await slot.exec(ExecRequest(_FIRST, timeout=30))
                assert got.exit_code == 0, got
                uid, *lines = got.stdout.decode().splitlines()
                inside = {}
                for line in lines:
                    _, controllers, path = line.split(":", 2)
                    for c in controllers.split(","):
                        if c in HIERARCHIES:
                            # Relative to the server's cgroup (the namespace's root): the
                            # slot's is outside a server's memory cgroup /a/b ("/../..").
                            inside[c] = posixpath.normpath(path)
                assert set(inside) == set(HIERARCHIES), lines
                assert len(set(inside.values())) == 1, inside
                (name,) = set(inside.values())
                assert name.startswith("/structenv/"), name
                seen.add(name)
                procs = _processes_of(int(uid))
                assert len(procs) >= 3, procs  # the worker and the two sleeps
                for pid in procs:
                    try:
                        paths = _cgroups(pid)
                    except FileNotFoundError:
                        continue  # a command's shell that just exited
                    if _zombie(pid):
                        continue
                    for c in HIERARCHIES:
                        assert paths[c].endswith(name), (pid, c, paths)
        assert len(seen) >= 2, seen  # the resets moved between the slot's cgroups


#: From inside a networked slot: try to remove or change the slot's flow budget (nft, which
#: is netlink NETLINK_NETFILTER), print whether each attempt failed, then the capability sets.
_UNBUDGET = r"""
for cmd in "flush ruleset" "delete table inet structenv" \
    "add rule inet structenv output accept" "list ruleset"; do
  if /usr/sbin/nft $cmd >/dev/null 2>&1; then echo "done: $cmd"; else echo "refused: $cmd"; fi
done
grep ^Cap /proc/self/status
"""


async def _cannot_change_its_budget(slot: Slot, address: str, port: int) -> None:
    got = await slot.exec(ExecRequest(_UNBUDGET, timeout=60))
    out = got.stdout.decode()
    assert out.count("refused: ") == 4 and "done: " not in out, out
    for line in out.splitlines():
        if line.split(":")[0] in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
            assert int(line.split()[1], 16) == 0, line
    start = time.monotonic()
    sent = await attack(slot, "udp", address, port, 2.0)
    assert within_budget(sent, time.monotonic() - start), sent


@pytest.mark.skipif(not os.path.exists("/usr/sbin/nft"), reason="needs nft in the slot")
async def test_a_networked_slot_cannot_change_its_own_budget() -> None:
    async with (
        remote_machine() as (address, port),
        networked(slots_per_host=1) as backend,
        SlotPool(backend).slot() as slot,
    ):
        await _cannot_change_its_budget(slot, address, port)


@pytest.mark.docker
@pytest.mark.usefixtures("docker_image")
async def test_a_networked_container_slot_cannot_change_its_own_budget() -> None:
    # In a container the slot's network namespace is owned by a user namespace of the
    # slot's own uid (the server runs the budget as that uid): the slot itself is in the
    # nested one bwrap's --disable-userns makes, with no capability over it.
    async with (
        remote_machine() as (address, port),
        docker_backend(allow_network=True, slots_per_host=1) as backend,
        SlotPool(backend, acquire_timeout=60).slot() as slot,
    ):
        await _cannot_change_its_budget(slot, address, port)

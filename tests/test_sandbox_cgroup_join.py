"""A root server moves each sandbox into its cgroups from outside while it starts
(``SlotCgroup.join``): every process of the slot is in all of them before it runs a command,
and only the sandbox's own process is ever moved.

Real cgroup v1 trees and real bwrap slots. Cancellation while a reset waits for the move is
in ``test_sandbox_reset_overlap.py`` (``cancel_join``).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import anyio
import pytest

from structenv import ExecRequest
from structenv.sandbox import RemoteSlot
from structenv.sandbox._bwrap import CgroupError, SlotCgroup, remove_cgroup_tree
from test_sandbox_support import local_backend

HIERARCHIES = ("pids", "memory", "cpu")


def _procs(path: str) -> list[int]:
    with open(os.path.join(path, "cgroup.procs")) as f:
        return [int(x) for x in f.read().split()]


@pytest.fixture
def cgroup() -> Iterator[SlotCgroup]:
    name = f"join-{os.getpid()}"
    group = SlotCgroup(name, pids_max=16, memory_max=64 << 20, cpus=0.5)
    yield group
    assert remove_cgroup_tree(name, patience=5)


def test_join_moves_a_child_into_every_hierarchy(cgroup: SlotCgroup) -> None:
    with subprocess.Popen(["sleep", "60"]) as child:
        try:
            cgroup.join(child.pid, os.getpid())
            assert len(cgroup.paths) == len(HIERARCHIES)
            for path in cgroup.paths:
                assert _procs(path) == [child.pid], path
        finally:
            child.kill()


def test_join_refuses_a_process_that_is_not_the_sandbox(cgroup: SlotCgroup) -> None:
    # A pid whose parent is not the sandbox's bwrap (here: this process's child, said to be
    # init's) is not moved: a freed pid taken by another process must not land in a slot.
    with subprocess.Popen(["sleep", "60"]) as child:
        try:
            with pytest.raises(CgroupError, match=r"exited before it joined .*bwrap 1 is not"):
                cgroup.join(child.pid, 1)
            assert cgroup.procs() == []
        finally:
            child.kill()


def test_join_refuses_a_process_that_is_gone(cgroup: SlotCgroup) -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    with pytest.raises(CgroupError, match=r"pid \d+\) exited before it joined its cgroups"):
        cgroup.join(child.pid, os.getpid())
    assert cgroup.procs() == []


@pytest.mark.anyio
async def test_every_process_of_a_slot_is_in_its_cgroups() -> None:
    # The worker (moved while it started) and what it spawns later (inherited), in the pids,
    # memory and cpu cgroups alike; bwrap's monitor outside the sandbox is not in them.
    async with local_backend(cpu_limit=0.5) as backend:
        slot = await backend.acquire_slot()
        assert isinstance(slot, RemoteSlot)
        got = await slot.exec(ExecRequest("sleep 300 & echo $$"))
        assert got.exit_code == 0, got
        base = f"/sys/fs/cgroup/%s/structenv/{slot.host_id}/{slot.index}"
        members = [sorted(_procs(base % h)) for h in HIERARCHIES]
        assert members[0] == members[1] == members[2], members
        assert len(members[0]) == 2, members  # the worker and the sleep
        monitors = set()
        for pid in members[0]:
            stat = await anyio.Path(f"/proc/{pid}/stat").read_bytes()
            monitors.add(int(stat[stat.rindex(b")") + 2 :].split()[1]))
        # The worker's parent is bwrap (outside); the sleep's is the worker (inside).
        assert len(monitors - set(members[0])) == 1, (monitors, members)
        await backend.release_slot(slot, reusable=True)

"""Per-slot cgroups in Docker containers, against the real engine and the host's cgroup v1 tree.

Each slot of a container gets pids, memory and cpu cgroups of its own under the container's
parent cgroup (``/sys/fs/cgroup/<controller>/structenv-docker/<container>/slots/...``); these
tests read that tree from the host, where the slots cannot lie about it.
"""

from __future__ import annotations

import glob
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import docker
import pytest

from structenv import ExecRequest, ExecResult
from structenv.abc import Slot
from structenv.backends import DockerBackend
from structenv.backends._docker_reap import reap_docker
from structenv.sandbox import RemoteSlot
from test_docker_support import (
    containers_of,
    docker_backend,
    docker_image,
    new_run_id,
    wait_until,
)

_ = docker_image
pytestmark = [pytest.mark.anyio, pytest.mark.docker, pytest.mark.usefixtures("docker_image")]

_CG = "/sys/fs/cgroup"


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _slot_dir(slot: Slot, controller: str) -> str:
    """The slot's cgroup directory on the host (the server names its cgroups after the
    container, ``--name``: the last 40 characters of its name)."""
    assert isinstance(slot, RemoteSlot)
    name = slot.host_id
    return f"{_CG}/{controller}/structenv-docker/{name}/slots/{name[-40:]}/{slot.index}"


def _stat(slot: Slot, controller: str, key: str) -> int:
    """One value of a cgroup file (a plain number, or ``key value`` lines)."""
    directory = _slot_dir(slot, controller)
    for file, field in (
        ("pids.current", None),
        ("pids.events", "max"),
        ("memory.usage_in_bytes", None),
        ("memory.max_usage_in_bytes", None),
        ("memory.limit_in_bytes", None),
        ("memory.oom_control", "oom_kill"),
    ):
        if key == (field or file) or key == f"{file}:{field}":
            text = _read(f"{directory}/{file}")
            if field is None:
                return int(text)
            return int(dict(line.split() for line in text.splitlines())[field])
    raise KeyError(key)


def _run_dirs(run_id: str) -> list[str]:
    """Every cgroup directory of this run's containers, in every hierarchy."""
    return glob.glob(f"{_CG}/*/structenv-docker/structenv-{run_id}-*")


def _find(marker: str) -> list[int]:
    """Host pids whose command line is exactly ``marker`` (split on spaces)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = _read(f"/proc/{entry}/cmdline")
            except OSError:
                continue
            if cmdline.rstrip("\0").split("\0") == marker.split():
                found.append(int(entry))
    return found


async def _run(slot: Slot, command: str) -> ExecResult:
    return await slot.exec(ExecRequest(command, timeout=30))


@asynccontextmanager
async def _two_slots(backend: DockerBackend) -> AsyncIterator[tuple[Slot, Slot]]:
    a, b = await backend.acquire_slot(), await backend.acquire_slot()
    try:
        assert isinstance(a, RemoteSlot) and isinstance(b, RemoteSlot)
        assert a.host_id == b.host_id and a.index != b.index  # siblings in one container
        yield a, b
    finally:
        with anyio.move_on_after(60, shield=True):
            for s in (a, b):
                await backend.release_slot(s, reusable=True)


_HOG = """
chunks = []
try:
    while True:
        chunks.append(bytearray(8 << 20))  # zero-filled: every page is touched
except MemoryError:
    print("memory error at", len(chunks) * 8, "MiB")
"""

_HOLD = "import time; x = bytearray(150 << 20); time.sleep(120)"


async def test_a_slot_exhausting_its_limits_leaves_its_sibling_alone() -> None:
    run_id = new_run_id()
    options = {"memory_limit": 1 << 30, "pids_limit": 256, "workspace_size": 128 << 20}
    async with docker_backend(run_id=run_id, **options) as backend, _two_slots(backend) as (a, b):
        assert backend.slot_cgroups
        share = (1 << 30) // 3  # two slots and the server
        for slot in (a, b):
            assert _stat(slot, "memory", "memory.limit_in_bytes") == share // 4096 * 4096
        # A fills its /tmp (its pages count against A's memory cgroup) ...
        fill = await _run(a, "head -c 2000000000 /dev/zero > /tmp/fill; du -sm /tmp/fill")
        assert b"No space" in fill.stderr, fill
        filled = int(fill.stdout.split()[0]) << 20
        assert filled > 64 << 20
        # ... allocates until the kernel stops it in A's own cgroup ...
        hog = await _run(a, f"python3 -c '{_HOG}'")
        assert hog.signal == 9 or b"memory error" in hog.stdout, hog
        assert _stat(a, "memory", "memory.oom_control:oom_kill") >= (hog.signal == 9)
        assert _stat(a, "memory", "memory.max_usage_in_bytes") >= share - (16 << 20)
        assert _stat(b, "memory", "memory.max_usage_in_bytes") < 64 << 20
        # ... keeps most of its share busy ...
        hold = await _run(a, f'python3 -c "{_HOLD}" >/dev/null 2>&1 & sleep 1; echo started')
        assert hold.stdout == b"started\n", hold
        usage_a = _stat(a, "memory", "memory.usage_in_bytes")
        assert usage_a >= filled + (150 << 20), (usage_a, filled)
        assert _stat(b, "memory", "memory.usage_in_bytes") < 64 << 20
        # ... and runs a fork bomb, which meets A's pids limit only.
        bombed = await a.exec(ExecRequest("bomb() { bomb | bomb & }; bomb; sleep 2", timeout=4))
        assert bombed.error is None, bombed
        assert _stat(a, "pids", "pids.events:max") > 0
        # B forks and allocates as if A were idle; its cgroup never hit a limit.
        for _ in range(3):
            ok = await _run(b, "sh -c 'echo forked' && python3 -c 'bytearray(200 << 20)'")
            assert ok.stdout == b"forked\n" and ok.exit_code == 0, ok
        assert _stat(b, "pids", "pids.events:max") == 0
        assert _stat(b, "memory", "memory.oom_control:oom_kill") == 0
        assert _stat(b, "memory", "memory.max_usage_in_bytes") >= 200 << 20
        assert _stat(a, "pids", "pids.current") >= 1 and _stat(b, "pids", "pids.current") >= 1


async def test_slot_processes_live_in_their_own_cgroups() -> None:
    run_id = new_run_id()
    async with docker_backend(run_id=run_id, cpus=1.5) as backend, _two_slots(backend) as slots:
        for slot in slots:
            marker = f"sleep {7000 + secrets.randbelow(999)}.{secrets.randbelow(999)}"
            r = await _run(slot, f"{marker} >/dev/null 2>&1 & echo ok")
            assert r.stdout == b"ok\n", r

            async def started(marker: str = marker) -> bool:
                return bool(_find(marker))

            await wait_until(started, deadline=10)  # the shell forked; the exec may lag
            (pid,) = _find(marker)
            groups = {}
            for line in _read(f"/proc/{pid}/cgroup").splitlines():
                _, controllers, path = line.split(":", 2)
                for controller in controllers.split(","):
                    groups[controller] = path
            for controller in ("pids", "memory", "cpu"):
                expected = _slot_dir(slot, controller).removeprefix(f"{_CG}/{controller}")
                assert groups[controller] == expected, (controller, groups)
                procs = _read(f"{_slot_dir(slot, controller)}/cgroup.procs").split()
                assert str(pid) in procs
            cpu = _slot_dir(slot, "cpu")
            assert _read(f"{cpu}/cpu.shares").strip() == "1024"
            assert _read(f"{cpu}/cpu.cfs_quota_us").strip() == "150000"
            await _run(slot, f"pkill -f '^{marker}$'; true")
        # The container's overall limits hold on the parent, which holds the slots too.
        parent = f"{_CG}/%s/structenv-docker/{slots[0].host_id}"
        assert _read(f"{parent % 'pids'}/pids.max").strip() == "256"
        assert int(_read(f"{parent % 'memory'}/memory.limit_in_bytes")) == 512 << 20
        assert _read(f"{parent % 'cpu'}/cpu.cfs_quota_us").strip() == "150000"


async def test_closing_the_backend_removes_every_cgroup_of_its_run() -> None:
    run_id = new_run_id()
    async with docker_backend(run_id=run_id, max_hosts=2) as backend:
        extra = [await backend.acquire_slot() for _ in range(3)]  # a second container
        try:
            busy = await _run(extra[0], "sleep 600 >/dev/null 2>&1 & echo ok")
            assert busy.stdout == b"ok\n"
            dirs = _run_dirs(run_id)
            controllers = {d.split("/")[4] for d in dirs}
            assert {"pids", "memory", "cpu"} <= controllers, dirs
            assert len({os.path.basename(d) for d in dirs}) == 2, dirs
        finally:
            with anyio.move_on_after(60, shield=True):
                for s in extra:
                    await backend.release_slot(s, reusable=True)
    assert containers_of(run_id) == []
    assert _run_dirs(run_id) == []


async def test_the_reaper_removes_the_cgroups_of_what_it_removes() -> None:
    run_id, pool = new_run_id(), f"cg-{secrets.token_hex(4)}"
    async with docker_backend(run_id=run_id, pool=pool) as backend:
        slot = await backend.acquire_slot()
        try:
            await _run(slot, "sleep 600 >/dev/null 2>&1 & echo ok")
            assert _run_dirs(run_id)
            client = docker.from_env()
            try:
                report = await anyio.to_thread.run_sync(
                    lambda: reap_docker(client, pool=pool, purge=True)
                )
            finally:
                client.close()
            assert len(report.removed) == 1 and not report.failed, report
            # Only the reaped container's cgroups: the live backend may already have started
            # a replacement for it (its health check sees the container die), which is its own.
            reaped = slot.host_id
            assert [d for d in _run_dirs(run_id) if os.path.basename(d) == reaped] == []
        finally:
            with anyio.move_on_after(30, shield=True):
                await backend.release_slot(slot, reusable=False)
    assert _run_dirs(run_id) == []


def _existing_names(paths: list[str]) -> set[str]:
    return {os.path.basename(p) for p in paths if os.path.isdir(p)}


async def test_the_reaper_removes_old_orphaned_cgroups_only() -> None:
    # A run that died after removing its containers leaves their cgroup parents behind. The
    # reaper removes those that no container uses once they are old enough that no live
    # backend can be about to start a container with that name; it leaves young ones, and
    # names that are not structenv's, alone.
    tag = secrets.token_hex(3)
    names = {
        "old": f"structenv-orphan{tag}-1",
        "young": f"structenv-orphan{tag}-2",
        "foreign": f"someone-else-{tag}",
    }
    made = []
    for controller in ("pids", "memory"):
        for kind, name in names.items():
            path = f"/sys/fs/cgroup/{controller}/structenv-docker/{name}"
            os.makedirs(f"{path}/slots/x", exist_ok=True)
            made.append(path)
            if kind != "young":
                os.utime(path, (0, 0))  # made long ago
    try:
        client = docker.from_env()
        try:
            await anyio.to_thread.run_sync(
                lambda: reap_docker(client, pool=f"none-{tag}", dry_run=False)
            )
        finally:
            client.close()
        left = _existing_names(made)
        assert left == {names["young"], names["foreign"]}, left
    finally:
        for path in made:
            for sub in (f"{path}/slots/x", f"{path}/slots", path):
                try:
                    os.rmdir(sub)
                except FileNotFoundError:
                    pass

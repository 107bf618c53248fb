"""Helpers shared by the sandbox and LocalBackend tests (no tests here).

Process-death waits use pidfds: ``pidfd_open`` works for any process (not only children) and
becomes readable when it exits, so "no process left behind" is asserted by waiting on events
with a deadline rather than by sleeping and polling.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator

import anyio
import pytest

from structenv.backends import LocalBackend
from structenv.testing import child_processes

#: Small limits so containment tests are quick.
LIMITS = {"pids_limit": 64, "memory_limit": 512 << 20, "file_size_limit": 8 << 20}


def local_backend(**options: object) -> LocalBackend:
    """A LocalBackend with test-sized defaults."""
    settings: dict[str, object] = {"hosts": 1, "slots_per_host": 2, **LIMITS}
    settings.update(options)
    return LocalBackend(**settings)


@pytest.fixture
async def backend() -> AsyncIterator[LocalBackend]:
    async with local_backend() as b:
        yield b


def find_processes(pattern: str) -> list[int]:
    """PIDs of this test process's descendants whose command line matches ``pattern``.

    Only descendants: other sessions on the machine may run the same tests meanwhile. Every
    sandbox process stays a descendant (orphans are reparented to the slot's PID 1).
    """
    regex = re.compile(pattern)
    found = []
    for entry in map(str, child_processes()):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if regex.search(cmd):
            found.append(int(entry))
    return found


def open_pidfds(pids: list[int]) -> list[int]:
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            pass  # already gone
    return fds


async def wait_all_dead(pidfds: list[int], *, within: float = 10.0) -> None:
    """Wait until every process behind ``pidfds`` has exited; fail after ``within`` s."""
    try:
        with anyio.fail_after(within):
            for fd in pidfds:
                await anyio.wait_readable(fd)
    finally:
        for fd in pidfds:
            os.close(fd)


async def wait_fifo(path: str, *, within: float = 10.0) -> bytes:
    """Create a FIFO at ``path`` (host side) and wait until a command writes a line to it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        data = b""
        with anyio.fail_after(within):
            while not data.endswith(b"\n"):
                await anyio.wait_readable(fd)
                chunk = os.read(fd, 4096)
                data += chunk
        return data
    finally:
        os.close(fd)


def make_fifo(backend: LocalBackend, slot: object, name: str = "ready") -> str:
    path = os.path.join(backend.workspace_path(slot), name)  # type: ignore[arg-type]
    os.mkfifo(path)
    owner = os.stat(os.path.dirname(path))
    os.chown(path, owner.st_uid, owner.st_gid)  # the slot's own uid, not host root
    return path

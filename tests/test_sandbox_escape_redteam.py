"""Attacks a red-team pass found working from inside a slot (all failed on main at 824a945).

Each test performs the attack through the public API, as a hostile policy would (a command, a
tool argument, a file operation), on LocalBackend and DockerBackend where both apply, and
asserts the property the threat model in docs/design.md promises. The attacks that did *not*
work are listed in that document's threat model table, not repeated here.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from structenv import ConfigError, ExecRequest, ExecResult, StructEnvError
from structenv.abc import SandboxBackend, Slot
from structenv.sandbox import RemoteSlot, _files
from structenv.sandbox._bwrap import FILE_TABLE_SHARE, TCP_MEMORY, nofile_limit
from structenv.sandbox._runtime import Limits, within_file_budget
from test_docker_support import docker_backend, docker_image
from test_sandbox_support import local_backend

_ = docker_image
pytestmark = pytest.mark.anyio


@pytest.fixture(params=["local", pytest.param("docker", marks=pytest.mark.docker)])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[SandboxBackend]:
    """One host with one slot, so a release and an acquire give the same slot back.

    LocalBackend runs with ``disk_limit=0``: its workspace is then a plain host directory
    kept across leases, as a container's per-slot tmpfs is (a quota tmpfs is remounted).
    """
    if request.param == "local":
        b: SandboxBackend = local_backend(slots_per_host=1, disk_limit=0)
    else:
        request.getfixturevalue("docker_image")
        b = docker_backend(slots_per_host=1, workspace_size=64 << 20, memory_limit=1 << 30)
    async with b:
        yield b


@pytest.fixture
async def local() -> AsyncIterator[SandboxBackend]:
    """A LocalBackend slot: for attacks on what both backends share (the server, the worker
    and the seccomp filter of every slot), one backend is enough."""
    async with local_backend(slots_per_host=1) as b:
        yield b


@contextlib.asynccontextmanager
async def lease(backend: SandboxBackend) -> AsyncIterator[Slot]:
    slot = await backend.acquire_slot()
    try:
        yield slot
    finally:
        with anyio.move_on_after(30, shield=True):
            await backend.release_slot(slot, reusable=True)


async def python(slot: Slot, program: str) -> ExecResult:
    await slot.write_file("attack.py", program.encode())
    return await slot.exec(ExecRequest("python3 attack.py", timeout=20))


# -- the worker ------------------------------------------------------------------------------


async def test_a_nul_in_a_tool_argument_leaves_the_slot_working(local: SandboxBackend) -> None:
    # The tmux tool passes its keys (and stateful_terminal its command) to the slot in an
    # environment variable: a NUL made posix_spawn raise ValueError in the worker, which
    # died with it and took the slot (and its terminal) down for the rest of the lease.
    async with lease(local) as slot:
        assert isinstance(slot, RemoteSlot)
        await slot.terminal("start")
        for action, arguments in (
            ("send_keys", {"keys": "echo a\0b"}),
            ("run", {"command": "echo a\0b", "timeout": 5}),
        ):
            with pytest.raises(StructEnvError, match="NUL"):
                await slot.terminal(action, **arguments)
        for request in (
            ExecRequest("true", env={"A": "x\0y"}),
            ExecRequest("true", env={"A=B": "x"}),
            ExecRequest("true", cwd="sub\0dir"),
        ):
            with pytest.raises(StructEnvError, match="invalid exec request"):
                await slot.exec(request)
        alive = await slot.exec(ExecRequest("echo alive", timeout=10))
        assert alive.stdout == b"alive\n", alive
        answer = await slot.terminal("run", command="echo still here", timeout=10)
        assert "still here" in answer["output"] and answer["exit_code"] == 0, answer


# -- the next lease --------------------------------------------------------------------------

_MARK = r"""
import array, fcntl, os
os.setxattr("/workspace", "user.note", b"for the next lease")
fd = os.open("/workspace", os.O_RDONLY)
flags = array.array("i", [0])
fcntl.ioctl(fd, 0x80086601, flags)  # FS_IOC_GETFLAGS
flags[0] |= 0x40 | 0x80  # nodump, noatime: the owner may set them
fcntl.ioctl(fd, 0x40086602, flags)  # FS_IOC_SETFLAGS
os.utime("/workspace", (981173106, 981173106))
print("marked")
"""

_LOOK = r"""
import array, fcntl, json, os
fd = os.open("/workspace", os.O_RDONLY)
flags = array.array("i", [0])
fcntl.ioctl(fd, 0x80086601, flags)
print(json.dumps({"xattrs": os.listxattr("/workspace"), "flags": flags[0] & 0xC0,
                  "mtime": int(os.stat("/workspace").st_mtime)}))
"""


async def test_the_workspace_root_carries_nothing_to_the_next_lease(
    backend: SandboxBackend,
) -> None:
    # A reset emptied the workspace but kept its root directory: an extended attribute,
    # chattr flags and times set on it by one lease were there for the next one to read.
    async with lease(backend) as slot:
        first = slot.id
        marked = await python(slot, _MARK)
        assert marked.stdout == b"marked\n", marked
    async with lease(backend) as slot:
        assert slot.id == first
        seen = json.loads((await python(slot, _LOOK)).stdout)
    assert seen["xattrs"] == [] and seen["flags"] == 0, seen
    assert seen["mtime"] != 981173106, seen


# -- the machine -----------------------------------------------------------------------------

_VSOCK = r"""
import errno, socket
try:
    socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    print("OPENED")
except OSError as exc:
    print(errno.errorcode[exc.errno])
"""


async def test_vsock_is_refused(local: SandboxBackend) -> None:
    # vsock ignores network namespaces: a slot without a network could bind a port in the
    # VM's own vsock port space (one a host process held was "in use" inside the slot) and
    # reach the hypervisor at CID 2.
    async with lease(local) as slot:
        r = await python(slot, _VSOCK)
        assert r.stdout == b"EPERM\n", r


_TCP_FILL = r"""
import socket
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(64)
held, queued = [], 0
for _ in range(40):  # about 4 MB of buffers each when nobody reads
    client = socket.create_connection(server.getsockname())
    held += [client, server.accept()[0]]
    client.setblocking(False)
    try:
        while True:
            queued += client.send(b"x" * 65536)
    except BlockingIOError:
        pass
print(queued >> 20)
"""


async def test_tcp_buffers_count_against_the_slot(local: SandboxBackend) -> None:
    # cgroup v1 charges TCP buffers to no cgroup unless it has a TCP limit: 60 stalled
    # loopback connections queued 223 MB that the slot's memory cgroup never saw, against
    # the host-wide tcp_mem (2.25 GB here) that every TCP socket on the machine shares.
    async with lease(local) as slot:
        assert isinstance(slot, RemoteSlot)
        memory = f"/sys/fs/cgroup/memory/structenv/{slot.host_id}/{slot.index}"
        limit = await anyio.Path(f"{memory}/memory.kmem.tcp.limit_in_bytes").read_text()
        assert int(limit) == TCP_MEMORY
        r = await python(slot, _TCP_FILL)
        assert r.exit_code == 0, r
        assert int(r.stdout) <= (TCP_MEMORY >> 20) + 8, r  # about 150 MB before


def test_a_huge_directory_is_not_read_into_the_server(tmp_path: Path) -> None:
    # list_files and archive lstat'ed a whole directory before checking their limits: a
    # slot's million empty files cost the shared server 1 GB and 8 s per listing (32 s per
    # archive). The walk now stops at the limit.
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    for i in range(3000):
        os.close(os.open(crowded / f"{i:05d}", os.O_CREAT | os.O_WRONLY, 0o644))
    for call in (
        lambda: _files.list_files(str(tmp_path), ".", 100),
        lambda: _files.archive(str(tmp_path), 100 * tarfile.BLOCKSIZE),
    ):
        tracemalloc.start()
        try:
            with pytest.raises(ValueError, match="more than 100 entries"):
                call()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, peak  # 2.5 MB before, for 3,000 entries
    assert os.listdir(tmp_path) == ["crowded"]


# -- the kernel's shared tables --------------------------------------------------------------

#: A small inode cap, so the attack is quick (the default, 65,536, is measured in the docs).
_INODES = 4096

_FILL_INODES = r"""
import errno, json, os, sys
cap = int(sys.argv[1])
out = {}
for root in ("/workspace/many", "/tmp/many", "/dev/shm/many"):
    os.mkdir(root)
    n = 0
    try:
        while n < 2 * cap:  # unbounded before: 1.5 M files, 20 s for the kernel to free
            os.close(os.open(f"{root}/{n}", os.O_CREAT | os.O_WRONLY, 0o600))
            n += 1
        out[root] = ["UNBOUNDED", n]
    except OSError as exc:
        out[root] = [errno.errorcode[exc.errno], n]
print(json.dumps(out))
"""


@pytest.fixture(params=["local", pytest.param("docker", marks=pytest.mark.docker)])
async def capped(request: pytest.FixtureRequest) -> AsyncIterator[SandboxBackend]:
    """One slot whose tmpfs (workspace, /tmp, /dev/shm) hold at most ``_INODES`` files."""
    if request.param == "local":
        b: SandboxBackend = local_backend(slots_per_host=1, inode_limit=_INODES)
    else:
        request.getfixturevalue("docker_image")
        b = docker_backend(slots_per_host=1, inode_limit=_INODES, memory_limit=1 << 30)
    async with b:
        yield b


async def test_a_slot_cannot_make_more_files_than_its_inode_cap(capped: SandboxBackend) -> None:
    # A slot's tmpfs had no inode cap: 1.5 M empty files in /tmp (within its memory limit)
    # took the kernel over 20 s to free when the sandbox died, so the reset timed out and the
    # slot was destroyed (once its host was declared dead); Docker's workspace, wiped file by
    # file, timed out at a million. Now each tmpfs answers ENOSPC at its cap.
    async with lease(capped) as slot:
        first = slot.id
        # Empty apart from read-only host binds (an editable source under /tmp, say).
        fresh = await slot.exec(ExecRequest("ls -A /workspace /tmp /dev/shm", timeout=10))
        await slot.write_file("fill.py", _FILL_INODES.encode())
        r = await slot.exec(ExecRequest(f"python3 fill.py {_INODES}", timeout=60))
        assert r.exit_code == 0, r
        for root, (outcome, count) in json.loads(r.stdout).items():
            assert outcome == "ENOSPC" and count < _INODES, (root, outcome, count)
    async with lease(capped) as slot:
        assert slot.id == first  # reset in time and reused, not destroyed
        left = await slot.exec(ExecRequest("ls -A /workspace /tmp /dev/shm", timeout=10))
        assert left.stdout == fresh.stdout, left
        assert not {b"many", b"fill.py"} & set(left.stdout.split()), left
    assert capped.statistics().resets_failed == 0


_OPEN_EVERYWHERE = r"""
import errno, json, os, resource
limit = resource.getrlimit(resource.RLIMIT_NOFILE)
counts, release = [], os.pipe()
while len(counts) < 1000:
    report = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:  # the pids cgroup is full
        stop = errno.errorcode[exc.errno]
        break
    if pid == 0:
        n = 0
        try:
            while True:
                os.open("/dev/null", os.O_RDONLY)
                n += 1
        except OSError:
            pass
        os.write(report[1], str(n).encode())
        os.read(release[0], 1)  # hold every descriptor until the parent is done
        os._exit(0)
    os.close(report[1])
    counts.append(int(os.read(report[0], 32)))
    os.close(report[0])
else:
    stop = "NO LIMIT"
print(json.dumps({"limit": limit, "stop": stop, "processes": len(counts), "open": sum(counts)}))
"""


async def test_a_slot_cannot_fill_the_machines_file_table() -> None:
    # The file table is machine-wide: each slot could hold nofile x pids (4096 x 256, a
    # million) open files, three slots filled fs.file-max (2.47 M here) and every process
    # on the machine got ENFILE. All slots together now stay within half of file-max.
    slots, pids = 6, 64
    file_max = int(await anyio.Path("/proc/sys/fs/file-max").read_text())
    budget = int(file_max * FILE_TABLE_SHARE) // slots
    async with local_backend(slots_per_host=slots, pids_limit=pids) as b, lease(b) as slot:
        assert isinstance(slot, RemoteSlot)
        cgroup = f"/sys/fs/cgroup/pids/structenv/{slot.host_id}/{slot.index}"
        assert int(await anyio.Path(f"{cgroup}/pids.max").read_text()) == pids
        r = await python(slot, _OPEN_EVERYWHERE)
    got = json.loads(r.stdout)
    soft, hard = got["limit"]
    assert soft == hard and hard * pids <= budget, (got, budget)
    assert got["stop"] == "EAGAIN" and got["processes"] < pids, got
    assert hard * (pids - 5) <= got["open"] <= hard * pids, got  # every process at its rlimit


def test_the_file_budget_is_checked_when_a_backend_is_made() -> None:
    assert nofile_limit(None, pids=256, groups=4, what="4 slots", file_max=2_470_000) == 1024
    assert nofile_limit(None, pids=256, groups=12, what="12 slots", file_max=2_470_000) == 402
    assert nofile_limit(512, pids=256, groups=4, what="4 slots", file_max=2_470_000) == 512
    with pytest.raises(ConfigError, match=r"4 slots: 256 processes x nofile .* 308750 open files .*"
                       r"fs.file-max 2470000 x 0.5 / 4\), so nofile 4096 > 1206"):  # fmt: skip
        nofile_limit(4096, pids=256, groups=4, what="4 slots", file_max=2_470_000)
    with pytest.raises(ConfigError, match="nofile 30 < 64: lower pids or slots"):
        nofile_limit(None, pids=4096, groups=10, what="10 slots", file_max=2_470_000)
    with pytest.raises(ConfigError, match="nofile 4096 > "):
        local_backend(slots_per_host=4, pids_limit=256, nofile_limit=4096)
    # A sandbox spec may raise a slot's pids: its nofile goes down to keep the product.
    base = Limits(pids=256, nofile=1024)
    assert within_file_budget(Limits(pids=512, nofile=1024), base).nofile == 512
    assert within_file_budget(Limits(pids=128, nofile=1024), base).nofile == 1024

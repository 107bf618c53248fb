"""Attacks of a second red-team pass, on spec'd slots (image and rootfs roots, binds, image
exports) and machine-wide kernel budgets.

Each test performs the attack as a hostile image or a hostile command would, on the real
backend, and asserts the property the threat model in docs/design.md promises. These worked
on main at 849e1d8 and are fixed: a rootfs symlink steering a bind's mount point onto the
host, an image export chowning/chmodding host files (and planting devices), kernel AIO,
pseudo-terminals, an export filling the host's disk. The others held already but were not
tested: device nodes in a rootfs or bind, abstract sockets and message queues across slots
and leases, a Docker image slot writing the shared rootfs cache. A third pass closed what
was left: a Docker slot's terminals (200 of 200 tried, now 64) and cgroup limits the kernel
refused (the controller was dropped and the slot ran without it; now it does not run).
"""

from __future__ import annotations

import functools
import os
import stat
from pathlib import Path

import anyio
import docker
import pytest

from spec_support import PROGRAMS, make_rootfs
from structenv import ConfigError, ExecRequest, SandboxSpec, SlotPool
from structenv.abc import SandboxBackend
from structenv.backends._images import export_rootfs
from structenv.sandbox._bwrap import SLOT_PTYS, CgroupError, SlotCgroup, remove_cgroup_tree
from test_docker_support import docker_backend, docker_image
from test_sandbox_support import local_backend

_ = docker_image

pytestmark = pytest.mark.anyio


def sh(command: str) -> ExecRequest:
    return ExecRequest(command, timeout=30)


async def test_a_rootfs_symlink_does_not_steer_a_bind_onto_the_host(tmp_path: Path) -> None:
    # bwrap makes a bind's mount point before it enters the slot's root, following symlinks
    # from its own view, where the host's / is /oldroot: an image whose /data was a link to
    # /oldroot/<host dir> (or ../oldroot/<host dir>) made bwrap, running as host root,
    # create the spec's mount points /data/sub and /rel/file in that host directory.
    victim = tmp_path / "host"
    victim.mkdir()
    root = make_rootfs(str(tmp_path / "root"))
    os.symlink(f"/oldroot{victim}", os.path.join(root, "data"))
    os.symlink(f"../oldroot{victim}", os.path.join(root, "rel"))
    os.symlink("/workspace", os.path.join(root, "ws"))
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_text("bound")
    spec = SandboxSpec(rootfs=root, binds=[f"{source}:/data/sub", f"{source}/f:/rel/file"])
    async with local_backend(slots_per_host=1) as backend:
        pool = SlotPool(backend)
        async with pool.slot(spec) as slot:
            # The binds are where the slot's own links lead, inside its root.
            got = await slot.exec(sh("cat /data/sub/f; echo; cat /rel/file"))
            assert got.stdout == b"bound\nbound", got
        assert os.listdir(victim) == []
        # A link that leads a bind over the sandbox's own mounts is refused up front.
        with pytest.raises(ConfigError, match="over the sandbox's own mounts"):
            await backend.prepare_spec(SandboxSpec(rootfs=root, binds=[f"{source}:/ws/x"]))


async def test_device_nodes_in_a_rootfs_or_a_bind_do_not_open(tmp_path: Path) -> None:
    # A user's rootfs directory or a bound host directory may hold device nodes (a copy of
    # /dev/null here, world-writable; the host's disk would read the same way): the slot's
    # binds are nodev, so none opens, whatever its mode.
    root = make_rootfs(str(tmp_path / "root"))
    data = tmp_path / "data"
    data.mkdir()
    for path in (os.path.join(root, "etc", "null"), str(data / "null")):
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.chmod(path, 0o666)
    spec = SandboxSpec(rootfs=root, binds=[f"{data}:/data"])
    async with local_backend(slots_per_host=1) as backend, SlotPool(backend).slot(spec) as slot:
        got = await slot.exec(sh("for d in /etc/null /data/null; do echo x > $d && echo $d; done"))
        assert got.stdout == b"" and got.stderr.count(b"Permission denied") == 2, got


_AIO = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
taken = []
while len(taken) < 64:
    ctx = ctypes.c_ulong(0)
    if libc.syscall(206, 4096, ctypes.byref(ctx)) != 0:  # io_setup
        print(os.strerror(ctypes.get_errno()))
        break
    taken.append(ctx)
print(len(taken) * 4096)
"""


async def test_a_slot_cannot_take_the_machines_aio_events() -> None:
    # fs.aio-max-nr (65,536 events) is one budget for the whole machine: a slot's io_setup
    # calls took all of it, and io_setup then failed with EAGAIN for every other process.
    async with local_backend(slots_per_host=1) as backend, SlotPool(backend).slot() as slot:
        await slot.write_file("aio.py", _AIO.encode())
        got = await slot.exec(sh("python3 aio.py"))
        assert got.stdout == b"Operation not permitted\n0\n", got


_PTYS = r"""
import os, sys, time
fds = []
try:
    while len(fds) < 200:
        fds.append(os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY))
except OSError as exc:
    print(exc.strerror)
print(len(fds), flush=True)
time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)  # hold them
"""


@pytest.mark.parametrize("kind", ["local", pytest.param("docker", marks=pytest.mark.docker)])
async def test_a_slot_cannot_take_the_machines_terminals(
    kind: str, request: pytest.FixtureRequest
) -> None:
    # Every devpts instance but the host's first shares kernel.pty.max - kernel.pty.reserve
    # (3,072): bwrap's /dev/pts has no cap of its own, and three processes of one slot held
    # them all, so no other slot could start a terminal (tmux). In a container the server
    # cannot mount, so the engine mounts each slot's capped devpts (200 of 200 before).
    if kind == "local":
        backend: SandboxBackend = local_backend(slots_per_host=2)
    else:
        request.getfixturevalue("docker_image")
        backend = docker_backend(slots_per_host=2)
    async with backend:
        pool = SlotPool(backend)
        for _ in range(2):  # the next lease gets the whole allowance again
            async with pool.slot() as a, pool.slot() as b:
                slot, sibling = sorted((a, b), key=lambda s: s.id)  # the same holder twice
                await slot.write_file("ptys.py", _PTYS.encode())
                got = await slot.exec(
                    sh("mkfifo f; (python3 ptys.py 60 > f 2>/dev/null &); sed '/^[0-9]/q' f")
                )
                assert got.stdout == f"No space left on device\n{SLOT_PTYS}\n".encode(), got
                # While the slot holds all of its own, its sibling's terminals still work.
                got = await sibling.exec(sh("script -qc tty /dev/null"))
                assert got.stdout.startswith(b"/dev/pts/"), got


@pytest.mark.docker
async def test_an_image_cannot_touch_host_files_or_plant_devices_on_export(
    tmp_path: Path,
) -> None:
    # An exported image is extracted by the host's root. tarfile makes a hard link and then
    # chowns, chmods and touches it *through its path*: an image holding a symlink to a host
    # file and a hard link to that symlink made the export chown the host file to the
    # image's uid and chmod it 0755 (/etc/shadow would have been world-readable). A hard link
    # to a dropped device node made tarfile extract the unfiltered device into the cache.
    victim = tmp_path / "victim"
    victim.write_text("secret")
    victim.chmod(0o600)
    before = os.stat(victim)
    context = tmp_path / "image"
    make_rootfs(str(context / "rootfs"), (*PROGRAMS, "chown", "mknod", "mkfifo"))
    # Names sorting last: the export walks in order, so the links are the archive's last
    # members (tarfile's fallback for a missing link target reads the rest of the stream).
    (context / "Dockerfile").write_text(
        "FROM scratch\nCOPY rootfs/ /\n"
        f"RUN ln -s {victim} /zz1 && ln /zz1 /zz2 && chown -h 4242:4242 /zz2 && "
        "mknod /zz3 c 1 3 && ln /zz3 /zz4 && mkfifo /zz5 && ln /zz5 /zz6\n"
    )
    client = docker.from_env()
    tag = f"structenv-redteam-export:{os.getpid()}"
    try:
        await anyio.to_thread.run_sync(
            lambda: client.images.build(
                path=str(context), tag=tag, rm=True, pull=False, network_mode="none"
            )
        )
        root, _ = await anyio.to_thread.run_sync(export_rootfs, tag, str(tmp_path / "cache"))
    finally:
        try:
            client.images.remove(tag, force=True)
        except docker.errors.APIError:
            pass
        client.close()
    after = os.stat(victim)
    assert (after.st_mode, after.st_uid, after.st_gid) == (
        before.st_mode,
        before.st_uid,
        before.st_gid,
    )
    assert victim.read_text() == "secret"
    specials = []
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            mode = os.lstat(os.path.join(top, name)).st_mode
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                specials.append(os.path.join(top, name))
    assert specials == []
    assert os.readlink(os.path.join(root, "zz1")) == str(victim)  # the image's own link stays
    assert not await anyio.Path(root, "zz2").exists()


@pytest.mark.docker
async def test_an_image_cannot_fill_the_host_disk_on_export(tmp_path: Path) -> None:
    # A sparse file costs an image (and its layer) nothing, and its export its full size on
    # the host's disk: an image of a few kilobytes wrote 256 MiB here, and one of 1 TiB
    # would fill the disk every slot and the host share. So would millions of empty files.
    context = tmp_path / "image"
    make_rootfs(str(context / "rootfs"), (*PROGRAMS, "truncate"))
    (context / "Dockerfile").write_text(
        "FROM scratch\nCOPY rootfs/ /\nRUN truncate -s 256M /zzbig\n"
    )
    client = docker.from_env()
    tag = f"structenv-redteam-sparse:{os.getpid()}"
    cache = tmp_path / "cache"
    try:
        await anyio.to_thread.run_sync(
            lambda: client.images.build(
                path=str(context), tag=tag, rm=True, pull=False, network_mode="none"
            )
        )
        for max_bytes, max_files, message in (
            (32 << 20, 10_000, "more than 33554432 bytes"),
            (1 << 30, 10, "more than 10 files"),
        ):
            export = functools.partial(
                export_rootfs, tag, str(cache), max_bytes=max_bytes, max_files=max_files
            )
            with pytest.raises(ConfigError, match=message):
                await anyio.to_thread.run_sync(export)
            assert os.listdir(cache / "rootfs") == []  # nothing written is left
    finally:
        try:
            client.images.remove(tag, force=True)
        except docker.errors.APIError:
            pass
        client.close()


_HOLD = r"""
import ctypes, os, socket
libc = ctypes.CDLL(None, use_errno=True)
listener = socket.socket(socket.AF_UNIX)
listener.bind("\0structenv-redteam")
listener.listen(8)
libc.mq_open.restype = ctypes.c_int
assert libc.mq_open(b"/structenv-redteam", os.O_CREAT | os.O_RDWR, 0o666, None) >= 0
open("ready", "w").close()
while True:
    listener.accept()[0].sendall(b"leaked")
"""

_REACH = r"""
import ctypes, os, socket
libc = ctypes.CDLL(None, use_errno=True)
try:
    client = socket.socket(socket.AF_UNIX)
    client.connect("\0structenv-redteam")
    print(client.recv(16).decode())
except OSError as exc:
    print(exc.strerror)
libc.mq_open.restype = ctypes.c_int
print(libc.mq_open(b"/structenv-redteam", os.O_RDWR, 0, None) >= 0)
"""


@pytest.mark.parametrize("kind", ["local", pytest.param("docker", marks=pytest.mark.docker)])
async def test_abstract_sockets_and_message_queues_stay_in_their_slot(
    kind: str, request: pytest.FixtureRequest
) -> None:
    # Abstract unix sockets live in a network namespace and POSIX message queues in an IPC
    # namespace, not in any file a bind could hide: a slot's daemon holding both must be
    # out of reach of a sibling slot and of the slot's next lease.
    if kind == "local":
        backend: SandboxBackend = local_backend(slots_per_host=2)
    else:
        request.getfixturevalue("docker_image")
        backend = docker_backend(slots_per_host=2)
    async with backend:
        pool = SlotPool(backend)
        async with pool.slot() as holder:
            await holder.write_file("hold.py", _HOLD.encode())
            got = await holder.exec(
                sh(
                    "(setsid python3 hold.py >/dev/null 2>&1 &); "
                    "while [ ! -e ready ]; do sleep 0.05; done; "
                    'python3 -c "import socket; s = socket.socket(socket.AF_UNIX); '
                    "s.connect('\\0structenv-redteam'); print(s.recv(16).decode())\""
                )
            )
            assert got.stdout == b"leaked\n", got  # the daemon answers in its own slot
            async with pool.slot() as sibling:
                assert sibling.id != holder.id
                await sibling.write_file("reach.py", _REACH.encode())
                got = await sibling.exec(sh("python3 reach.py"))
                assert got.stdout == b"Connection refused\nFalse\n", got
            first = holder.id
        async with pool.slot() as one, pool.slot() as two:  # the holder's slot is one of them
            assert first in (one.id, two.id)
            for slot in (one, two):
                await slot.write_file("reach.py", _REACH.encode())
                got = await slot.exec(sh("python3 reach.py"))
                assert got.stdout == b"Connection refused\nFalse\n", (slot.id == first, got)


@pytest.mark.docker
async def test_a_docker_image_slot_cannot_change_the_rootfs_cache(
    tmp_path: Path, docker_image: str
) -> None:
    # Every sandbox container sees the host's whole rootfs cache (every image's export):
    # a slot of one image must neither write its own rootfs (the next lease's, and other
    # containers') nor reach another image's.
    del docker_image
    client = docker.from_env()
    tags = {}
    try:
        for name in ("a", "b"):
            context = tmp_path / name
            make_rootfs(str(context / "rootfs"), marker=name)
            (context / "Dockerfile").write_text("FROM scratch\nCOPY rootfs/ /\n")
            tag = tags[name] = f"structenv-redteam-cache-{name}:{os.getpid()}"
            await anyio.to_thread.run_sync(
                functools.partial(
                    client.images.build, path=str(context), tag=tag, rm=True, network_mode="none"
                )
            )
        async with docker_backend(slots_per_host=2) as backend:
            pool = SlotPool(backend)
            spec_a, spec_b = (SandboxSpec(image=tags[n]) for n in ("a", "b"))
            async with pool.slot(spec_a) as slot:
                got = await slot.exec(
                    sh(
                        "for f in /etc/marker /usr/bin/cat /newfile /etc/newfile; do "
                        "echo x >> $f && echo WROTE $f; done; "
                        "ls -d /.structenv-rootfs /.structenv/host/.structenv-rootfs; "
                        "ls /proc/1/root/.structenv-rootfs; cat /etc/marker"
                    )
                )
                assert b"WROTE" not in got.stdout and got.stdout.endswith(b"a"), got
            async with pool.slot(spec_a) as slot, pool.slot(spec_b) as other:
                got = await slot.exec(sh("cat /etc/marker; ls /newfile"))
                assert got.stdout == b"a", got
                got = await other.exec(sh("cat /etc/marker"))
                assert got.stdout == b"b", got
    finally:
        for tag in tags.values():
            try:
                client.images.remove(tag, force=True)
            except docker.errors.APIError:
                pass
        client.close()


@pytest.mark.docker
async def test_a_cpu_limit_the_kernel_refuses_is_not_dropped(docker_image: str) -> None:
    # cgroup v1 refuses a cpu quota above a parent's (EINVAL): a spec asking for more cpus
    # than its container has. Any failed write made SlotCgroup drop the whole controller, so
    # that slot ran in no cpu cgroup of its own (no equal share, no quota of its own). Now
    # the slot is not handed out, the caller gets one line, and the slot keeps its old spec.
    del docker_image
    async with docker_backend(slots_per_host=1, cpus=1.0) as backend:
        pool = SlotPool(backend)
        with pytest.raises(ConfigError, match=r"cpu\.cfs_quota_us=200000 .*Invalid argument"):
            async with pool.slot(SandboxSpec(limits={"cpus": 2})) as slot:
                got = await slot.exec(sh("grep :cpu: /proc/self/cgroup"))
                pytest.fail(f"a slot ran without its cpu cgroup: {got.stdout!r}")
        # The slot kept its old spec and its cpu cgroup; a spec within the container's quota
        # is applied (read from the host: the slot's cgroup namespace shows it only "/").
        for spec, quota in ((None, b"100000"), (SandboxSpec(limits={"cpus": 0.5}), b"50000")):
            async with pool.slot(spec) as slot:
                name = slot.host_id
                cpu = f"/sys/fs/cgroup/cpu/structenv-docker/{name}/slots/{name[-40:]}/0"
                assert (await anyio.Path(cpu, "cpu.cfs_quota_us").read_bytes()).strip() == quota
                assert (await anyio.Path(cpu, "cgroup.procs").read_bytes()).split(), "no process"


async def test_a_memory_limit_below_what_is_charged_is_not_dropped() -> None:
    # Lowering memory.limit_in_bytes below what a cgroup still has charged (kernel memory
    # outlives the slot's processes) fails with EBUSY: SlotCgroup used to drop the memory
    # controller and the slot ran with no memory cgroup at all. Real cgroup v1 tree.
    name = f"redteam-memory-{os.getpid()}"
    try:
        first = SlotCgroup(name, pids_max=64, memory_max=256 << 20)
        assert first.memory is not None
        # What a lease leaves charged after its processes are gone: page cache, slab.
        await anyio.run_process(first.wrap(["sh", "-c", "cat /usr/bin/* >/dev/null 2>&1; true"]))
        with pytest.raises(CgroupError, match=r"memory\.limit_in_bytes=4096 .*busy .*charged"):
            SlotCgroup(name, pids_max=64, memory_max=4096)
    finally:
        assert remove_cgroup_tree(name, patience=5)

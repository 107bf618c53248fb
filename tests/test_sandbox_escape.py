"""Attacks from inside a slot, on the real backends: every one must fail.

Each test is one attack class from the hardening issue, run as a hostile command would run it
(a shell one-liner or a small Python program through ``slot.exec``), against LocalBackend and
DockerBackend with their defaults. A test that touches a host-global setting reads it first and
restores it in a ``finally`` if the attack changed it (it must not have).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import AsyncIterator

import anyio
import pytest

from structenv import ExecRequest, ExecResult
from structenv.abc import SandboxBackend, Slot
from structenv.sandbox import RemoteSlot
from test_docker_support import docker_backend, docker_image
from test_sandbox_support import local_backend

_ = docker_image
pytestmark = pytest.mark.anyio

#: Host sysctls an attacker in a slot has tried to write (all writable at commit 4d2ce7f).
SYSCTLS = (
    "kernel/core_pattern",
    "kernel/pid_max",
    "vm/drop_caches",
    "vm/nr_hugepages",
    "fs/file-max",
)


@pytest.fixture(
    params=[
        "local",
        pytest.param("docker", marks=pytest.mark.docker),
    ]
)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[SandboxBackend]:
    """One host with one slot: a release and a new acquire give the same slot back."""
    if request.param == "local":
        b: SandboxBackend = local_backend(slots_per_host=1)
    else:
        request.getfixturevalue("docker_image")
        b = docker_backend(slots_per_host=1, workspace_size=256 << 20, memory_limit=1 << 30)
    async with b:
        yield b


async def run(slot: Slot, command: str) -> ExecResult:
    return await slot.exec(ExecRequest(command, timeout=20))


def assert_none_printed(result: ExecResult, *markers: bytes) -> None:
    """Each attack step echoes a marker only if it worked: none may show up."""
    shown = [m for m in markers if m in result.stdout]
    assert shown == [], result


async def python(slot: Slot, program: str) -> ExecResult:
    """Run a Python program in the slot (the sandbox's own python3)."""
    await slot.write_file("attack.py", program.encode())
    return await run(slot, "python3 attack.py")


@contextlib.asynccontextmanager
async def lease(backend: SandboxBackend) -> AsyncIterator[Slot]:
    slot = await backend.acquire_slot()
    try:
        yield slot
    finally:
        with anyio.move_on_after(30, shield=True):
            await backend.release_slot(slot, reusable=True)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


# -- escape to host root ---------------------------------------------------------------------


async def test_sysctls_are_not_writable(backend: SandboxBackend) -> None:
    readable = [name for name in SYSCTLS if name != "vm/drop_caches"]  # write-only
    before = {name: _read(f"/proc/sys/{name}") for name in readable}
    try:
        async with lease(backend) as slot:
            # Each write puts back the value the setting has (drop_caches: 1, harmless), so
            # an attack that works on a vulnerable build shows up without hurting the host.
            script = "; ".join(
                f"echo {before.get(name, '1').strip()!r} > /proc/sys/{name} && echo WROTE {name}"
                for name in SYSCTLS
            )
            r = await run(slot, script)
            assert b"WROTE" not in r.stdout, r
            assert r.stderr.count(b"Read-only file system") + r.stderr.count(
                b"Permission denied"
            ) == len(SYSCTLS), r.stderr
        assert {name: _read(f"/proc/sys/{name}") for name in readable} == before
    finally:
        for name, value in before.items():
            if _read(f"/proc/sys/{name}") != value:
                _write(f"/proc/sys/{name}", value)


async def test_slot_processes_are_not_host_root(backend: SandboxBackend) -> None:
    async with lease(backend) as slot:
        tag = secrets.token_hex(4)
        # Every process of the slot, as the host sees it: none has uid 0 in any field.
        r = await run(
            slot, f"sleep 99{len(tag)} & cp /bin/sh sh-{tag}; chmod 4755 sh-{tag}; ls -ln"
        )
        assert r.exit_code == 0, r
        owner = int(r.stdout.split(f"sh-{tag}".encode())[0].split()[-7])
        me = await run(slot, "whoami")  # the slot's uid has a name (git, ssh need one)
        assert me.exit_code == 0 and me.stdout.strip() in (b"sandbox", b"root"), me
        r2 = await run(slot, "cat /proc/self/status")
        uids = next(ln for ln in r2.stdout.decode().splitlines() if ln.startswith("Uid:"))
        if isinstance(backend, type(local_backend())):
            # Inside a user namespace (containers) the slot may call itself 0; on a host the
            # uid it sees is the host uid, so it must not be 0 at all.
            assert uids.split()[1:] != ["0"] * 4, uids
            assert owner != 0 and me.stdout == b"sandbox\n"
            host_path = os.path.join(backend.workspace_path(slot), f"sh-{tag}")
            st = os.stat(host_path)
            assert st.st_uid != 0 and st.st_gid != 0
            assert not (st.st_mode & stat.S_ISUID and st.st_uid == 0)
        assert isinstance(slot, RemoteSlot)
        archive = await slot.archive()
        import io
        import tarfile

        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            member = tar.getmember(f"sh-{tag}")
        assert not member.mode & (stat.S_ISUID | stat.S_ISGID), oct(member.mode)


async def test_no_nested_user_namespace_or_mount(backend: SandboxBackend) -> None:
    async with lease(backend) as slot:
        r = await run(
            slot,
            "unshare -U true && echo USERNS; unshare -r true && echo ROOTMAP; "
            "unshare -m true && echo MOUNTNS; mount -t tmpfs x /tmp && echo MOUNTED; "
            "mount -o remount,rw / && echo REMOUNT; exit 0",
        )
        assert_none_printed(r, b"USERNS", b"ROOTMAP", b"MOUNTNS", b"MOUNTED", b"REMOUNT")


_SYSCALLS = r"""
import ctypes, errno, json
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    r = libc.syscall(nr, *[ctypes.c_long(a) for a in args])
    return "ok" if r >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")
out = {
    "unshare_user": call(272, 0x10000000),
    "clone_newuser": call(56, 0x10000000 | 17, 0, 0, 0, 0),
    "setns": call(308, 0, 0),
    "ptrace_attach_1": call(101, 16, 1, 0, 0),
    "process_vm_readv_1": call(310, 1, 0, 0, 0, 0, 0),
    "keyctl": call(250, 0, -4, 0, 0, 0),
    "add_key": call(248, ctypes.addressof(ctypes.create_string_buffer(b"user")),
                    ctypes.addressof(ctypes.create_string_buffer(b"k")),
                    ctypes.addressof(ctypes.create_string_buffer(b"v")), 1, -4),
    "io_uring_setup": call(425, 4, ctypes.addressof(ctypes.create_string_buffer(120))),
    "bpf": call(321, 0, 0, 0),
    "perf_event_open": call(298, 0, 0, -1, -1, 0),
    "userfaultfd": call(323, 0),
    "kexec_load": call(246, 0, 0, 0, 0),
    "init_module": call(175, 0, 0, 0),
    "reboot": call(169, 0xfee1dead, 672274793, 0x4321fedc, 0),
    "swapon": call(167, 0, 0),
    "settimeofday": call(164, 0, 0),
    "open_by_handle_at": call(304, 0, 0, 0),
}
print(json.dumps(out))
"""


async def test_dangerous_system_calls_are_refused(backend: SandboxBackend) -> None:
    import json

    async with lease(backend) as slot:
        r = await python(slot, _SYSCALLS)
        assert r.exit_code == 0, r
        results = json.loads(r.stdout)
        allowed = {name: code for name, code in results.items() if code not in ("EPERM", "ENOSYS")}
        assert allowed == {}, results
        status = (await run(slot, "grep -E '^(Seccomp|NoNewPrivs|Cap)' /proc/self/status")).stdout
        assert b"Seccomp:\t2" in status and b"NoNewPrivs:\t1" in status
        for field in (b"CapInh", b"CapPrm", b"CapEff", b"CapAmb"):
            assert field + b":\t0000000000000000" in status, status


# -- host secrets and host state ---------------------------------------------------------------


_ADD_KEY = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
for ring in (-4, -5, -3):  # user, user session and session keyrings
    libc.syscall(248, b"user", sys.argv[1].encode(), b"v", 1, ring)
"""


async def test_root_only_host_files_and_keyrings_are_out_of_reach() -> None:
    secret = f"/etc/structenv-secret-{secrets.token_hex(4)}"
    key = f"structenv-key-{secrets.token_hex(4)}"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"TOPSECRET")
    os.close(fd)
    try:
        async with local_backend(slots_per_host=1) as backend, lease(backend) as slot:
            r = await run(
                slot,
                f"cat {secret}; cat /etc/ssl/private/* /etc/docker/key.json 2>&1; "
                "cat /proc/keys; wc -l < /proc/keys",
            )
            assert b"TOPSECRET" not in r.stdout and b"PRIVATE KEY" not in r.stdout
            assert r.stdout.split()[-1] == b"0", r  # no keyring is visible
            await slot.write_file("add_key.py", _ADD_KEY.encode())
            await run(slot, f"python3 add_key.py {key}")
        # Keyrings are not namespaced: a key added in a slot would outlive it on the host.
        assert key not in _read("/proc/keys")
    finally:
        os.unlink(secret)


async def test_worker_descriptors_are_not_the_hosts(backend: SandboxBackend) -> None:
    async with lease(backend) as slot:
        r = await run(
            slot,
            "readlink /proc/1/fd/* && echo LINKS; cat /proc/1/fd/2 && echo READ2; "
            "echo pwned >> /proc/1/fd/2 && echo WROTE2; cat /proc/1/environ && echo ENVIRON; "
            "cat /proc/1/maps && echo MAPS; ls /proc/self/fd",
        )
        # (In a user namespace the fd *numbers* of the worker may be listable; what they
        # point to, its memory map and its environment are not.)
        assert_none_printed(r, b"LINKS", b"READ2", b"WROTE2", b"ENVIRON", b"MAPS")
        # A command holds its own stdio and ls's directory descriptor, nothing else.
        assert r.stdout.split()[-4:] == [b"0", b"1", b"2", b"3"], r


# -- the next trajectory on the same slot ------------------------------------------------------


_INJECT = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
attached = libc.ptrace(16, 1, 0, 0) == 0
try:
    open("/proc/1/mem", "r+b").close(); mem = True
except OSError:
    mem = False
print("ATTACHED" if attached else "", "MEM" if mem else "")
"""


async def test_a_lease_leaves_nothing_for_the_next(backend: SandboxBackend) -> None:
    async with lease(backend) as slot:
        first_id = slot.id
        r = await run(
            slot,
            "touch /planted /dev/planted /var/planted /usr/planted 2>/dev/null; "
            "echo x > /tmp/planted; echo x > /dev/shm/planted; ipcmk -M 4096; ipcmk -Q; "
            "head -c 200000000 /dev/zero > /dev/shm/fill; "
            "(setsid sleep 9999 &) ; kill -INT 1; kill -TERM 1; kill -HUP 1; kill -USR1 1; "
            "echo sent",
        )
        assert b"sent" in r.stdout, r
        injected = await python(slot, _INJECT)
        assert b"ATTACHED" not in injected.stdout and b"MEM" not in injected.stdout, injected
        alive = await run(slot, "echo alive")  # signals did not stop the worker
        assert alive.stdout == b"alive\n", alive
    async with lease(backend) as slot:
        assert slot.id == first_id
        r = await run(
            slot,
            "ls -A / /dev /tmp /dev/shm | grep planted; ipcs -m -q | grep -c '^0x'; "
            "ps -e -o comm= | grep -c sleep; df -k /dev/shm | tail -1",
        )
        lines = r.stdout.decode().split("\n")
        assert "planted" not in r.stdout.decode(), r
        assert lines[0] == "0" and lines[1] == "0", r  # no IPC object, no process
        assert int(lines[2].split()[2]) < 1024, r  # no tmpfs memory left over
        # A large allocation succeeds: nothing is still charged to the slot's memory.
        big = await run(slot, 'python3 -c "b = bytearray(300 << 20); print(len(b))"')
        assert big.exit_code == 0, big


# -- siblings and the host (denial of service) -------------------------------------------------


async def test_limits_are_hard() -> None:
    async with local_backend(slots_per_host=1, file_size_limit=8 << 20) as backend:
        async with lease(backend) as slot:
            r = await run(
                slot,
                "ulimit -f unlimited && echo RAISED_F; ulimit -n 100000 && echo RAISED_N; "
                "ulimit -v unlimited && echo RAISED_V; "
                "fallocate -l 64M big || echo FALLOCATE_REFUSED; "
                "head -c 20000000 /dev/zero > big2 || echo WRITE_REFUSED; "
                "ls -l big2 | cut -d' ' -f5",
            )
            out = r.stdout.decode()
            assert "RAISED" not in out, r
            assert "FALLOCATE_REFUSED" in out and "WRITE_REFUSED" in out, r
            assert int(out.split()[-1]) <= 8 << 20


_SPIN = r"""
import os, time
WALL = 1.5
start = time.monotonic()
kids = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        os.setsid()
        end = time.monotonic() + WALL
        while time.monotonic() < end:
            pass
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
t = os.times()
print(t.children_user + t.children_system, time.monotonic() - start)
"""


async def test_a_slot_gets_at_most_its_cpu_share() -> None:
    # 4 spinning sessions on a 2-core machine would take both cores (2x the wall time in
    # CPU time) on an idle machine; with a 1-core quota per slot they get at most one. The
    # quota itself is checked from the host too: timing alone cannot fail on a busy machine.
    async with local_backend(slots_per_host=1, cpu_limit=1.0) as backend, lease(backend) as slot:
        assert isinstance(slot, RemoteSlot)
        cpu_dir = f"/sys/fs/cgroup/cpu/structenv/{slot.host_id}/{slot.index}"
        assert _read(f"{cpu_dir}/cgroup.procs").split(), "the slot's processes are not in it"
        assert _read(f"{cpu_dir}/cpu.cfs_quota_us").strip() == "100000"
        assert _read(f"{cpu_dir}/cpu.cfs_period_us").strip() == "100000"
        r = await python(slot, _SPIN)
        cpu, wall = map(float, r.stdout.split())
        assert cpu <= wall * 1.0 * 1.25 + 0.1, (cpu, wall)


_TREE = r"""
import os, socket
os.makedirs("t", exist_ok=True)
fd = os.open("t", os.O_RDONLY)
for _ in range(3000):  # deeper than Python's recursion limit
    os.mkdir("d", dir_fd=fd)
    nxt = os.open("d", os.O_RDONLY, dir_fd=fd)
    os.close(fd)
    fd = nxt
os.close(fd)
os.mkfifo("fifo")
socket.socket(socket.AF_UNIX).bind("sock")
os.makedirs("locked/inner")
open("locked/inner/f", "w").close()
os.chmod("locked/inner", 0)
os.chmod("locked", 0)
os.symlink("/", "root-link")
print("built")
"""


async def test_hostile_trees_are_listed_archived_and_wiped(backend: SandboxBackend) -> None:
    async with lease(backend) as slot:
        first_id = slot.id
        r = await python(slot, _TREE)
        assert r.stdout == b"built\n", r
        entries = {e.path: e for e in await slot.list_files(".")}
        assert len(entries) > 3000 and "fifo" in entries and "root-link" in entries
        assert not entries["root-link"].is_dir  # a link, never followed
        assert isinstance(slot, RemoteSlot)
        assert await slot.archive()  # no recursion error, no hang on the FIFO
    async with lease(backend) as slot:  # the reset coped: the slot was not retired
        assert slot.id == first_id
        assert await slot.list_files(".") == []


async def test_teardown_removes_hostile_trees() -> None:
    # disk_limit=0: the workspace is a plain host directory, removed by walking it.
    async with local_backend(slots_per_host=1, disk_limit=0) as backend:
        async with lease(backend) as slot:
            assert (await python(slot, _TREE)).stdout == b"built\n"
        run_dir = anyio.Path(backend._root)
        assert await run_dir.is_dir()
    assert not await run_dir.exists()


@pytest.mark.docker
async def test_docker_slot_cannot_starve_its_siblings(docker_image: str) -> None:
    # Slots of one container: a fork bomb and a /tmp fill in one slot must
    # still leave the other slot able to fork and allocate.
    async with docker_backend(
        slots_per_host=2, memory_limit=1 << 30, pids_limit=256, workspace_size=128 << 20
    ) as backend:
        bomb, other = await backend.acquire_slot(), await backend.acquire_slot()
        try:
            fill = await run(bomb, "head -c 2000000000 /dev/zero > /tmp/fill; df -k /tmp")
            assert fill.exit_code == 0 or b"No space" in fill.stderr, fill
            bombed = await bomb.exec(
                ExecRequest("bomb() { bomb | bomb & }; bomb; sleep 2", timeout=4)
            )
            assert bombed.error is None
            for _ in range(3):
                ok = await run(other, "sh -c 'echo forked' && python3 -c 'bytearray(200 << 20)'")
                assert ok.stdout == b"forked\n" and ok.exit_code == 0, ok
        finally:
            with anyio.move_on_after(60, shield=True):
                for s in (bomb, other):
                    await backend.release_slot(s, reusable=True)


async def test_files_written_through_the_api_belong_to_the_slot(backend: SandboxBackend) -> None:
    # The server writes as a privileged process; the slot (an unprivileged uid) must still be
    # able to change, extend and remove what it wrote, as if it had made it.
    async with lease(backend) as slot:
        await slot.write_file("deep/dir/notes.txt", b"one\n")
        r = await run(
            slot,
            "echo two >> deep/dir/notes.txt && touch deep/dir/new && cat deep/dir/notes.txt"
            " && rm -r deep && echo removed",
        )
        assert r.stdout == b"one\ntwo\nremoved\n", r


async def test_a_slot_cannot_fill_the_disk() -> None:
    # Each file is under the file-size limit; together they pass the workspace quota.
    async with (
        local_backend(slots_per_host=1, file_size_limit=24 << 20, disk_limit=64 << 20) as backend,
        lease(backend) as slot,
    ):
        r = await run(
            slot,
            "for i in 1 2 3 4; do head -c 20000000 /dev/zero > f$i || echo FULL; done; "
            "df -k /workspace | tail -1",
        )
        assert b"FULL" in r.stdout and b"No space left" in r.stderr, r
        assert int(r.stdout.split()[-5]) <= 64 << 10  # the quota, in KiB


@pytest.mark.docker
async def test_docker_server_is_not_host_root(docker_image: str) -> None:
    # Container root is host root (no user-namespace remapping): the sandbox server runs as an
    # unprivileged uid with only the capabilities it uses.
    from test_docker_support import containers_of, new_run_id

    run_id = new_run_id()
    async with docker_backend(run_id=run_id, slots_per_host=1) as backend, lease(backend):
        (container,) = containers_of(run_id)
        pid = container.attrs["State"]["Pid"]  # the container's init (docker --init)
        procs = [int(p) for p in _read(f"/proc/{pid}/task/{pid}/children").split()]
        status = _read(f"/proc/{procs[0]}/status")
        assert "structenv.sandbox" in _read(f"/proc/{procs[0]}/cmdline").replace("\0", " ")
        uids = next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1:]
        assert uids == ["65533"] * 4, status
        cap_eff = int(
            next(ln for ln in status.splitlines() if ln.startswith("CapEff:")).split()[1], 16
        )
        assert not cap_eff & (1 << 21), "CAP_SYS_ADMIN"
        security = container.attrs["HostConfig"]["SecurityOpt"]
        assert not any(o == "seccomp=unconfined" for o in security), security
        assert any(o.startswith("seccomp=") for o in security), security


async def test_workspace_quotas_live_only_in_the_hosts_mount_namespace() -> None:
    # A quota is a tmpfs mounted by the sandbox host in a mount namespace of its own: the
    # host's mount table never holds it, so no crash of the host can leave it behind.
    async with local_backend(slots_per_host=1) as backend, lease(backend) as slot:
        (pid,) = backend.host_pids().values()
        path = backend.workspace_path(slot).removeprefix(f"/proc/{pid}/root")

        def mountpoints(of: str) -> list[str]:
            return [ln.split()[4] for ln in _read(f"/proc/{of}/mountinfo").splitlines()]

        assert path in mountpoints(str(pid))
        assert path not in mountpoints("self")
        r = await run(slot, "df -k /workspace | tail -1")
        assert int(r.stdout.split()[1]) == (2 << 30) >> 10, r  # the default disk_limit

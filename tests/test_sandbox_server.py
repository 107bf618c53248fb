"""The sandbox server on its own: run in-process (under asyncio *and* trio) over TCP + token."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator

import anyio
import pytest

import test_sandbox_support
from structenv import ExecRequest, ExecResult, SandboxUnavailableError, SlotBrokenError
from structenv.backends import LocalBackend
from structenv.sandbox import (
    HostClient,
    Isolation,
    RemoteSlot,
    SandboxServer,
    ServerConfig,
    _runtime,
)
from structenv.sandbox._client import stream_batch
from structenv.testing import child_processes, cmdline

pytestmark = pytest.mark.anyio

TOKEN = "test-token-" + "x" * 20


@pytest.fixture
async def tcp_server(tmp_path: object) -> AsyncIterator[SandboxServer]:
    workdir = os.path.join(str(tmp_path), "host")
    server = SandboxServer(ServerConfig(slots=1, workdir=workdir, token=TOKEN, port=0))
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        yield server
        tg.cancel_scope.cancel()


async def _raw(port: int, request: bytes) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        data = b""
        with anyio.fail_after(10):
            while b"\r\n\r\n" not in data:
                data += await stream.receive()
        return data


async def test_tcp_requires_token(tcp_server: SandboxServer) -> None:
    port = tcp_server.port
    assert port > 0
    for auth in (
        b"",
        b"authorization: Bearer wrong\r\n",
        b"authorization: " + TOKEN.encode() + b"\r\n",
    ):
        reply = await _raw(port, b"GET /v1/health HTTP/1.1\r\nhost: x\r\n" + auth + b"\r\n")
        assert reply.startswith(b"HTTP/1.1 401 "), reply
    good = b"authorization: Bearer " + TOKEN.encode() + b"\r\n"
    reply = await _raw(port, b"GET /v1/health HTTP/1.1\r\nhost: x\r\n" + good + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 200 ")


async def _first_slot(client: HostClient) -> RemoteSlot:
    """A handle on slot 0 of the server behind ``client``, at its current lease."""
    status, body = await client.request("GET", "/v1/health")
    assert status == 200
    lease = json.loads(body)["slots"][0]["lease"]
    return RemoteSlot(client=client, index=0, id="t/0", host_id="t", lease=lease, sandboxed=True)


async def test_client_over_tcp(tcp_server: SandboxServer) -> None:
    client = HostClient(port=tcp_server.port, token=TOKEN)
    try:
        slot = await _first_slot(client)
        result = await slot.exec(ExecRequest("echo over tcp; hostname"))
        assert result.stdout == b"over tcp\nsandbox\n" and result.sandboxed
        results: dict[int, ExecResult | Exception] = {}
        calls = [(i, 0, slot.lease, ExecRequest(c)) for i, c in enumerate(["exit 1", "echo b"])]
        await stream_batch(client, calls, results.__setitem__)
        assert [getattr(results[i], "exit_code", None) for i in range(2)] == [1, 0]
        with pytest.raises(SlotBrokenError):
            bad = RemoteSlot(client=client, index=5, id="t/5", host_id="t", lease=1, sandboxed=True)
            await bad.exec(ExecRequest("true"))
    finally:
        await client.aclose()


async def test_tcp_server_needs_token() -> None:
    with pytest.raises(ValueError, match="token"):
        SandboxServer(ServerConfig(token=None, socket_path=None))


async def test_missing_bwrap_fails_closed(tmp_path: object) -> None:
    config = ServerConfig(
        slots=1,
        workdir=str(tmp_path),
        socket_path=os.path.join(str(tmp_path), "s.sock"),
        isolation=Isolation(bwrap="/nonexistent/bwrap"),
    )
    with pytest.raises(SandboxUnavailableError):
        await SandboxServer(config).serve()


async def test_local_backend_fails_closed() -> None:
    with pytest.raises(SandboxUnavailableError):
        async with LocalBackend(bwrap_path="/nonexistent/bwrap"):
            pass
    # Not requiring a sandbox is not enough while the network must stay isolated.
    with pytest.raises(SandboxUnavailableError):
        async with LocalBackend(bwrap_path="/nonexistent/bwrap", require_sandbox=False):
            pass


async def test_unsandboxed_only_when_asked() -> None:
    async with LocalBackend(
        bwrap_path="/nonexistent/bwrap", require_sandbox=False, allow_network=True
    ) as backend:
        assert not backend.sandboxed
        slot = await backend.acquire_slot()
        assert not slot.sandboxed
        result = await slot.exec(ExecRequest("echo plain; sleep 1000 & setsid sleep 1001 &"))
        assert result.stdout == b"plain\n" and result.sandboxed is False
        await backend.release_slot(slot, reusable=True)
        # Even unsandboxed, a reset kills what the slot started (subreaper + tree walk).
        assert test_sandbox_support.find_processes(r"^sleep 100[01]$") == []


@contextlib.asynccontextmanager
async def _uds_server(tmp_path: object) -> AsyncIterator[tuple[HostClient, RemoteSlot]]:
    """A one-slot server in this process on a unix socket, a client and its slot."""
    sock = os.path.join(str(tmp_path), "s.sock")
    server = SandboxServer(
        ServerConfig(slots=1, workdir=os.path.join(str(tmp_path), "host"), socket_path=sock)
    )
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        client = HostClient(uds=sock)
        try:
            yield client, await _first_slot(client)
        finally:
            with anyio.move_on_after(5, shield=True):
                await client.aclose()
        tg.cancel_scope.cancel()


async def test_stuck_worker_breaks_the_slot_past_the_backstop(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker enforces deadlines; a worker that misses one by BACKSTOP seconds (stuck or
    # subverted by a command running with its uid) is not trusted again: its sandbox is
    # killed, the caller gets a broken slot, and only a reset rebuilds it.
    monkeypatch.setattr(_runtime, "BACKSTOP", 0.5)
    async with _uds_server(tmp_path) as (_, slot):
        assert (await slot.exec(ExecRequest("echo up"))).stdout == b"up\n"
        argv = [b"-I", b"-S", _runtime.WORKER_PATH.encode()]
        (worker,) = [p for p in child_processes() if cmdline(p).split(b"\0")[1:4] == argv]
        pidfds = test_sandbox_support.open_pidfds([worker])
        os.kill(worker, signal.SIGSTOP)
        with anyio.fail_after(5):
            with pytest.raises(SlotBrokenError, match="did not enforce the deadline"):
                await slot.exec(ExecRequest("sleep 30", timeout=0.2))
        await test_sandbox_support.wait_all_dead(pidfds, within=5)
        with pytest.raises(SlotBrokenError):
            await slot.exec(ExecRequest("echo again"))
        await slot.reset()  # a hard reset: a new sandbox and worker
        assert (await slot.exec(ExecRequest("echo again"))).stdout == b"again\n"


def _mounts_under(path: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f if ln.split()[4].startswith(path)]


@pytest.mark.parametrize("step", range(8))
async def test_cancelled_reset_leaves_no_process_or_mount(tmp_path: object, step: int) -> None:
    # A reset kills the sandbox, empties the workspace and starts a new sandbox: cancel it
    # after `step` scheduling points, then stop the server. Nothing of the slot may be left:
    # no process, no mount in this (the host's) mount namespace, no cgroup.
    workdir = os.path.join(str(tmp_path), "host")
    sock = os.path.join(str(tmp_path), "s.sock")
    server = SandboxServer(ServerConfig(slots=1, workdir=workdir, socket_path=sock))
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        (rt,) = server.slots
        assert (await rt.exec(ExecRequest("sleep 4321 &"))).exit_code == 0
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as inner:
                inner.start_soon(rt.hard_reset)
                for _ in range(step):
                    await anyio.lowlevel.checkpoint()
                scope.cancel()
        tg.cancel_scope.cancel()
    assert test_sandbox_support.find_processes(r"^sleep 4321$") == []
    assert [p for p in child_processes() if b"bwrap" in cmdline(p)] == []
    assert _mounts_under(workdir) == []
    assert not await anyio.Path(f"/sys/fs/cgroup/pids/structenv/{server.config.name}").exists()


# A bwrap that quietly drops one protection: the probe must notice and name it. (Others,
# such as the read-only /proc/sys, are backed by the slot's unprivileged uid as well: dropping
# one of those two layers alone does not make the property fail.)
_WEAKENED = {
    "seccomp filter": "--seccomp",  # the option and its descriptor
    "network isolated": "--unshare-net",
    "no inherited descriptors": "",  # leak a descriptor into the sandbox
}
_WRAPPER = """import os, sys
drop, args, out = sys.argv[1], sys.argv[2:], []
while args:
    arg = args.pop(0)
    if arg == drop:
        if arg == "--seccomp":
            args.pop(0)
        continue
    out.append(arg)
if not drop:
    os.set_inheritable(os.open("/etc/hostname", os.O_RDONLY), True)
os.execvp("bwrap", ["bwrap", *out])
"""


def _executable(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


def _weakened_bwrap(directory: str, missing: str) -> str:
    script = os.path.join(directory, "weaken.py")
    with open(script, "w") as f:
        f.write(_WRAPPER)
    wrapper = os.path.join(directory, "bwrap")
    with open(wrapper, "w") as f:
        f.write(f'#!/bin/sh\nexec {sys.executable} {script} "{_WEAKENED[missing]}" "$@"\n')
    os.chmod(wrapper, 0o755)
    return wrapper


@pytest.mark.parametrize("missing", sorted(_WEAKENED))
async def test_a_missing_property_fails_closed_and_is_named(tmp_path: object, missing: str) -> None:
    config = ServerConfig(
        slots=1,
        workdir=os.path.join(str(tmp_path), "host"),
        socket_path=os.path.join(str(tmp_path), "s.sock"),
        isolation=Isolation(bwrap=_weakened_bwrap(str(tmp_path), missing)),
    )
    with anyio.fail_after(60):
        with pytest.raises(SandboxUnavailableError, match=f"sandbox property missing: {missing}"):
            await SandboxServer(config).serve()


def test_doctor_reports_every_property() -> None:
    from structenv._doctor import doctor, format_report

    checks = {c.name: c for c in doctor()}
    for name in ("no host uid 0", "seccomp filter", "read-only kernel settings", "ptrace refused"):
        assert checks[name].ok, checks[name]
    toolchain = checks["sandbox toolchain"]
    assert toolchain.ok and "pytest" in toolchain.detail and "git version" in toolchain.detail
    network = checks["slot network"]  # allow_network=True: a real slot with its own NAT
    assert network.ok and "slirp4netns" in network.detail, network
    assert "budget of 20 new connections/s, burst 100 (nftables)" in network.detail, network
    assert "LocalBackend isolation: available" in format_report(list(checks.values()))
    missing = doctor(bwrap="/nonexistent/bwrap")
    assert not missing[0].ok and "not installed" in missing[0].detail
    assert "UNAVAILABLE" in format_report(missing)


async def test_a_slot_that_cannot_start_says_why(tmp_path: object) -> None:
    # bwrap works for the probe but fails for the slot's worker: the error carries bwrap's
    # own message (read from the sandbox's stderr pipe, never the server's stderr).
    wrapper = _executable(
        os.path.join(str(tmp_path), "bwrap"),
        "#!/bin/sh\ncase \"$*\" in *worker.py*) echo 'bwrap: no room for the slot' >&2;"
        ' exit 1;; esac\nexec bwrap "$@"\n',
    )
    config = ServerConfig(
        slots=1,
        workdir=os.path.join(str(tmp_path), "host"),
        socket_path=os.path.join(str(tmp_path), "s.sock"),
        isolation=Isolation(bwrap=wrapper),
    )
    with anyio.fail_after(60):
        with pytest.RaisesGroup(
            pytest.RaisesExc(_runtime.SlotBroken, match="did not start: bwrap: no room"),
            flatten_subgroups=True,
        ):
            await SandboxServer(config).serve()


async def test_a_connection_the_server_closed_while_idle_is_not_reused(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server closes keep-alive connections idle past its timeout. A slot left idle that
    # long (a policy thinking) must not fail its next call as if the host were gone.
    from structenv._http import ConnectionLimits
    from structenv.sandbox import _server

    monkeypatch.setattr(_server, "_LIMITS", ConnectionLimits(idle_timeout=0.2))
    async with _uds_server(tmp_path) as (client, slot):
        assert (await slot.exec(ExecRequest("echo one"))).stdout == b"one\n"
        (idle,) = client._idle
        with anyio.fail_after(10):
            await anyio.wait_readable(idle.sock)  # type: ignore[attr-defined]
        assert (await slot.exec(ExecRequest("echo two"))).stdout == b"two\n"


#: Run in a process of its own: the server must own a mount namespace (as ``python -m
#: structenv.sandbox`` does) for the per-slot tmpfs (workspace quota, /tmp and /dev/shm with
#: their inode caps) to be mounted and remounted on every reset.
_REMOUNT_SCRIPT = r"""
import json, os, sys
import anyio, anyio.from_thread
from structenv import ExecRequest
from structenv.sandbox import SandboxServer, ServerConfig, _bwrap, _runtime
from structenv.sandbox._runtime import Limits, SlotBroken

backend, target, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
assert _bwrap.private_mounts(), "no mount namespace of its own"
INODES = 2048
#: This run's own sleep (other runs of this test may be live on the machine).
NAP = str(os.getpid() + 100000)
calls = []


def mounts_under(path):
    with open("/proc/self/mountinfo") as f:
        return sorted(ln.split()[4] for ln in f if ln.split()[4].startswith(path))


def sleepers():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read() == f"sleep\0{NAP}\0".encode():
                    found.append(pid)
        except OSError:
            pass
    return found


async def main():
    config = ServerConfig(slots=1, workdir=workdir, socket_path=os.path.join(workdir, "s.sock"),
                          limits=Limits(inodes=INODES, disk=64 << 20, tmp_size=64 << 20))
    server = SandboxServer(config)
    out = {}
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        (rt,) = server.slots
        out["scratch"], out["quota"] = rt.scratch, rt.quota
        dirty = "echo d > /tmp/m; echo d > /dev/shm/m; echo d > /workspace/m; sleep " + NAP + " &"
        assert (await rt.exec(ExecRequest(dirty))).exit_code == 0
        scope = anyio.CancelScope()

        def hook(real, name):
            def wrapped(path, *args, **kwargs):
                calls.append(f"{name} {os.path.basename(path)}")
                if len(calls) == target:
                    anyio.from_thread.run_sync(scope.cancel)
                return real(path, *args, **kwargs)
            return wrapped

        for name in ("unmount", "mount_tmpfs", "mount_quota", "mount_devpts"):
            setattr(_runtime, name, hook(getattr(_runtime, name), name))
        with scope:
            await rt.hard_reset()
        out["calls"], out["cancelled"], out["state"] = calls, scope.cancelled_caught, rt.state
        try:
            await rt.exec(ExecRequest("cat /tmp/m"))
            out["handed_out"] = True
        except SlotBroken:
            out["handed_out"] = False
        with anyio.fail_after(20):
            await rt.reaped()  # a retired sandbox is reaped in the slot's background
        out["sleepers_after_cancel"] = sleepers()
        await rt.hard_reset()  # the next lease's reset
        probe = "cat /tmp/m /dev/shm/m /workspace/m 2>/dev/null; "
        probe += "df --output=itotal /tmp | tail -1"
        result = await rt.exec(ExecRequest(probe))
        out["after"] = result.stdout.decode().split()
        tg.cancel_scope.cancel()
    out["mounts_after_stop"] = mounts_under(workdir)
    out["sleepers_after_stop"] = sleepers()
    print(json.dumps(out))


anyio.run(main, backend=backend)
"""


#: The calls of a hard reset that touch the per-slot mounts, in order: the workspace quota,
#: the slot's /tmp and /dev/shm and its devpts unmounted, then mounted afresh with their caps.
_REMOUNT_STEPS = [
    "unmount slot-0",
    "unmount slot-0.tmp",
    "unmount slot-0.shm",
    "unmount slot-0.pts",
    "mount_quota slot-0",
    "mount_tmpfs slot-0.tmp",
    "mount_tmpfs slot-0.shm",
    "mount_devpts slot-0.pts",
]


@pytest.mark.parametrize("step", range(1, len(_REMOUNT_STEPS) + 1))
def test_reset_cancelled_at_the_tmpfs_remount_leaks_nothing_and_is_not_handed_out(
    tmp_path: object, step: int, anyio_backend: str
) -> None:
    """Cancelled while it unmounts or remounts the slot's capped tmpfs (the cancellation
    lands while the mount call runs in its thread): the slot stays down, so nothing is handed
    out dirty; the next reset gives an empty slot with its inode cap; stopping the server
    leaves no mount and no process of the slot."""
    import subprocess

    workdir = os.path.join(str(tmp_path), "host")
    proc = subprocess.run(
        [sys.executable, "-c", _REMOUNT_SCRIPT, anyio_backend, str(step), workdir],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["scratch"], out["quota"]) == ("mount", True)
    assert out["calls"][:step] == _REMOUNT_STEPS[:step]
    assert out["cancelled"] and out["state"] != "ready" and not out["handed_out"], out
    assert out["sleepers_after_cancel"] == [], out
    assert out["after"] == ["2048"], out  # no file of the last lease; /tmp capped again
    assert out["mounts_after_stop"] == [] and out["sleepers_after_stop"] == [], out

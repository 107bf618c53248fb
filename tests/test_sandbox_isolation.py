"""Isolation of real bwrap slots: each other, the network, the host, resource limits."""

from __future__ import annotations

import anyio
import pytest

from structenv import ExecRequest
from structenv.backends import LocalBackend
from structenv.sandbox import RemoteSlot
from test_sandbox_network import remote_machine
from test_sandbox_support import backend, find_processes, local_backend

pytestmark = pytest.mark.anyio
__all__ = ["backend"]


async def test_slots_cannot_see_each_other(backend: LocalBackend) -> None:
    a, b = await backend.acquire_slot(), await backend.acquire_slot()
    await a.write_file("secret.txt", b"A's data")
    await a.exec(ExecRequest("sleep 777 & echo $! > pid"))
    a_path = backend.workspace_path(a)
    listing = await b.exec(ExecRequest("ls -A /workspace"))
    assert listing.stdout == b""
    stolen = await b.exec(ExecRequest(f"cat {a_path}/secret.txt"))
    assert stolen.exit_code != 0 and b"No such file" in stolen.stderr  # not in B's root
    procs = await b.exec(ExecRequest("ps -e -o args="))
    # B's PID namespace holds its worker and this command only.
    assert len(procs.stdout.splitlines()) == 2 and b"sleep" not in procs.stdout
    assert find_processes(r"^sleep 777$")  # ...while A's process does exist on the host
    for s in (a, b):
        await backend.release_slot(s, reusable=True)


async def test_network_is_isolated(backend: LocalBackend) -> None:
    accepted: list[object] = []
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def count(stream: anyio.abc.SocketStream) -> None:
        accepted.append(stream)
        await stream.aclose()

    slot = await backend.acquire_slot()
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, count)
        probe = (
            f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo CONNECTED; "
            "cat /proc/net/dev | tail -n +3 | cut -d: -f1"
        )
        result = await slot.exec(ExecRequest(probe, timeout=10))
        tg.cancel_scope.cancel()
    assert b"CONNECTED" not in result.stdout
    assert result.stdout.split() == [b"lo"]
    assert accepted == []
    await backend.release_slot(slot, reusable=True)


async def test_bwrap_escapes_are_closed(backend: LocalBackend) -> None:
    slot = await backend.acquire_slot()
    script = (
        "mount -o remount,rw / && echo REMOUNT_ROOT; mount -o remount,rw /usr && echo REMOUNT_USR; "
        "touch /usr/pwned && echo WROTE_USR; "
        "for p in /run /var/run/docker.sock /run/docker.sock /tmp/.X11-unix; do "
        "  [ -e $p ] && echo VISIBLE $p; done; "
        'python3 -c "import socket; s=socket.socket(socket.AF_UNIX); '
        "s.connect('/run/docker.sock'); print('DOCKER')\" 2>/dev/null; "
        "grep CapEff /proc/self/status; cat /etc/shadow | wc -c"
    )
    result = await slot.exec(ExecRequest(script))
    out = result.stdout.decode()
    for bad in ("REMOUNT", "WROTE_USR", "VISIBLE", "DOCKER"):
        assert bad not in out, out
    assert "CapEff:\t0000000000000000" in out
    assert out.split()[-1] == "0"  # /etc/shadow is masked
    await backend.release_slot(slot, reusable=True)


async def test_fork_bomb_is_contained() -> None:
    async with local_backend(pids_limit=48) as b:
        bomb, other = await b.acquire_slot(), await b.acquire_slot()
        assert isinstance(bomb, RemoteSlot)
        result = await bomb.exec(ExecRequest("bomb() { bomb | bomb & }; bomb; wait", timeout=3))
        assert result.error is None
        # The bomb keeps running in its slot, pinned at the pids limit; the host and the other
        # slot stay usable.
        # Forks were refused at the limit: by the pids cgroup, or first by RLIMIT_NPROC (the
        # same count for the slot's own uid, now that bwrap's monitor is outside the cgroup).
        assert b"fork: retry: Resource temporarily unavailable" in result.stderr, result
        cgroup = f"/sys/fs/cgroup/pids/structenv/{bomb.host_id}/{bomb.index}"
        assert int(await anyio.Path(f"{cgroup}/pids.current").read_text()) <= 48
        for _ in range(3):
            assert (await other.exec(ExecRequest("echo fine"))).stdout == b"fine\n"
        # A reset kills the whole bomb (one kill(-1) in the slot's PID namespace).
        with anyio.fail_after(30):
            await bomb.reset()
        after = await bomb.exec(ExecRequest("ps -e -o comm="))
        assert sorted(after.stdout.split()) == [b"ps", b"python3.11"]
        for s in (bomb, other):
            await b.release_slot(s, reusable=True)


async def test_file_size_and_memory_limits() -> None:
    async with local_backend(file_size_limit=1 << 20, memory_limit=256 << 20) as b:
        slot = await b.acquire_slot()
        big = await slot.exec(ExecRequest("head -c 2000000 /dev/zero > f; ls -l f | cut -d' ' -f5"))
        assert b"File size limit exceeded" in big.stderr
        assert int(big.stdout) == 1 << 20
        mem = await slot.exec(ExecRequest("python3 -c 'x = bytearray(600 * 2**20); print(len(x))'"))
        assert mem.exit_code != 0 and b"MemoryError" in mem.stderr
        await b.release_slot(slot, reusable=True)


async def test_network_when_allowed() -> None:
    """Positive control for the isolation test: a networked slot reaches another machine
    (a namespace of its own behind a veth pair), through its own namespace's NAT; the host's
    loopback stays out of reach (tests/test_sandbox_network.py attacks it in detail)."""
    async with remote_machine() as (address, port), local_backend(allow_network=True) as b:
        slot = await b.acquire_slot()
        probe = f"exec 3<>/dev/tcp/{address}/{port} && head -1 <&3"
        result = await slot.exec(ExecRequest(probe, timeout=30))
        assert result.stdout == b"remote\n" and result.sandboxed, result
        interfaces = await slot.exec(ExecRequest("ip -o link | cut -d: -f2", timeout=30))
        assert interfaces.stdout.split() == [b"lo", b"tap0"], interfaces
        await b.release_slot(slot, reusable=True)

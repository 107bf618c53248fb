"""``allow_network=True``: a slot's own network namespace with outbound-only NAT (slirp4netns).

Attacks from inside a networked slot, on real bwrap and slirp4netns: each target (the host's
loopback over IPv4 and IPv6, every address of the host, an abstract unix socket, another
slot's listening port, the sandbox server's own TCP port, link-local metadata) must be
unreachable, and a listener there must have seen no connection (checked with a non-blocking
``accept`` once the attempts are over: a connection that succeeded sits in the backlog). The
positive control is a TCP server on "another machine": a process in a network namespace of
its own, linked to this host by a veth pair. The NAT helper's life is bound to its slot's:
no slirp4netns process survives a release, a reset, a cancelled start, the backend's exit or
the server's death.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from structenv import ExecRequest, ExecResult, SandboxUnavailableError
from structenv.abc import Slot
from structenv.backends import LocalBackend
from structenv.sandbox import Isolation, SandboxServer, ServerConfig, _netns, _runtime
from structenv.sandbox._bwrap import SlotCgroup, default_uid_base, slot_uid
from test_docker_support import docker_backend, docker_image
from test_sandbox_support import (
    find_processes,
    local_backend,
    make_fifo,
    open_pidfds,
    wait_all_dead,
    wait_fifo,
)

_ = docker_image
pytestmark = pytest.mark.anyio

#: One attempt per target: a line "<target> <errno name or OK>".
_TRY = r"""
import errno, socket, sys
for target in sys.argv[1:]:
    family = socket.AF_UNIX if target.startswith("@") else (
        socket.AF_INET6 if target.startswith("[") else socket.AF_INET)
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        if family == socket.AF_UNIX:
            s.connect("\0" + target[1:])
        else:
            host, port = target.rsplit(":", 1)
            s.connect((host.strip("[]"), int(port)))
        print(target, "OK", flush=True)
    except OSError as exc:
        print(target, errno.errorcode.get(exc.errno or 0, repr(exc)), flush=True)
    finally:
        s.close()
"""


async def attempt(slot: Slot, targets: list[str]) -> dict[str, str]:
    """Connect to each target from inside ``slot``: target -> ``"OK"`` or the errno name."""
    await slot.write_file("try.py", _TRY.encode())
    got = await slot.exec(ExecRequest("python3 try.py " + " ".join(targets), timeout=60))
    assert got.exit_code == 0, got
    answers = dict(line.split(" ", 1) for line in got.stdout.decode().splitlines())
    assert sorted(answers) == sorted(targets), got
    return answers


@contextlib.contextmanager
def listener(family: int, address: object) -> Iterator[socket.socket]:
    """A host listener; on exit, asserts that nothing ever connected to it."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind(address)  # type: ignore[arg-type]
    sock.listen(16)
    sock.setblocking(False)
    try:
        yield sock
        with pytest.raises(BlockingIOError):
            conn, peer = sock.accept()
            conn.close()
            pytest.fail(f"a slot reached {sock.getsockname()!r} (from {peer!r})")
    finally:
        sock.close()


def networked(**options: object) -> LocalBackend:
    return local_backend(allow_network=True, **options)


def nat_pids() -> list[int]:
    return find_processes(r"^\S*slirp4netns ")


# -- the positive control: another machine ---------------------------------------------------

_REMOTE = r"""
import socket, sys
s = socket.socket()
s.bind(("0.0.0.0", 0))
s.listen(16)
print(s.getsockname()[1], flush=True)
while True:
    conn, _ = s.accept()
    conn.sendall(b"remote\n")
    conn.close()
"""


async def _ip(*argv: str, stdin: bytes | None = None) -> None:
    await anyio.run_process(["ip", *argv], input=stdin)


@contextlib.asynccontextmanager
async def remote_machine(program: str = _REMOTE) -> AsyncIterator[tuple[str, int]]:
    """A TCP server on "another machine": ``(address, port)``; it answers ``remote``
    (``program``: another server, which prints its port first).

    A process in a network namespace of its own, linked to this one by a veth pair on a
    random /30 of 100.64.0.0/10; the namespace and both veth ends vanish with the process.
    """
    net = 0x64400000 + random.randrange(1 << 20) * 4  # 100.64.0.0/10, one /30
    near, far = (socket.inet_ntoa((net + i).to_bytes(4, "big")) for i in (1, 2))
    async with await anyio.open_process(
        ["unshare", "--net", "--", sys.executable, "-c", program]
    ) as proc:
        try:
            assert proc.stdout is not None
            with anyio.fail_after(20):
                port = int((await proc.stdout.receive()).decode())
            here, there = f"sen{proc.pid}", f"ser{proc.pid}"
            await _ip("link", "add", here, "type", "veth", "peer", "name", there,
                      "netns", str(proc.pid))  # fmt: skip
            await _ip("addr", "add", f"{near}/30", "dev", here)
            await _ip("link", "set", here, "up")
            await anyio.run_process(
                ["nsenter", f"--net=/proc/{proc.pid}/ns/net", "ip", "-batch", "-"],
                input=f"addr add {far}/30 dev {there}\nlink set {there} up\n".encode(),
            )
            yield far, port
        finally:
            with anyio.CancelScope(shield=True):
                # Deleting one end deletes the pair at once (a namespace's veths go later).
                await anyio.run_process(["ip", "link", "del", f"sen{proc.pid}"], check=False)
            proc.kill()


async def test_outbound_reaches_another_machine() -> None:
    async with remote_machine() as (address, port), networked(slots_per_host=1) as b:
        slot = await b.acquire_slot()
        try:
            got = await slot.exec(
                ExecRequest(f"exec 3<>/dev/tcp/{address}/{port} && head -1 <&3", timeout=30)
            )
            assert got.stdout == b"remote\n" and got.sandboxed, got
            # A fresh sandbox after a reset has its network again.
            await b.release_slot(slot, reusable=True)
            slot = await b.acquire_slot()
            got = await slot.exec(
                ExecRequest(f"exec 3<>/dev/tcp/{address}/{port} && head -1 <&3", timeout=30)
            )
            assert got.stdout == b"remote\n", got
        finally:
            await b.release_slot(slot, reusable=True)


# -- what a networked slot must not reach ----------------------------------------------------


async def test_the_hosts_loopback_and_addresses_are_unreachable() -> None:
    local = _netns.local_ipv4()
    assert local, "this host has no address but loopback"
    with (
        listener(socket.AF_INET, ("127.0.0.1", 0)) as lo4,
        listener(socket.AF_INET6, ("::1", 0)) as lo6,
        listener(socket.AF_INET, ("0.0.0.0", 0)) as anywhere,
    ):
        p4, p6, pany = (s.getsockname()[1] for s in (lo4, lo6, anywhere))
        targets = [
            f"127.0.0.1:{p4}",  # the slot's own loopback
            f"10.0.2.2:{p4}",  # slirp's gateway, which would map to the host's loopback
            f"[::1]:{p6}",
            f"10.0.2.2:{pany}",
            *(f"{address}:{pany}" for address in local),  # eth0, docker0, ...
            f"{local[0]}:{p4}",
        ]
        async with networked(slots_per_host=1) as b:
            slot = await b.acquire_slot()
            try:
                answers = await attempt(slot, targets)
            finally:
                await b.release_slot(slot, reusable=True)
    assert "OK" not in answers.values(), answers
    # The host's own addresses are refused by a prohibit route at once (EACCES), not after a
    # timeout; the gateway's loopback mapping is off.
    assert all(answers[f"{a}:{pany}"] == "EACCES" for a in local), sorted(answers.items())


async def test_a_host_abstract_unix_socket_is_unreachable() -> None:
    name = f"structenv-test-{os.getpid()}-{random.randrange(1 << 30)}"
    with listener(socket.AF_UNIX, "\0" + name):
        async with networked(slots_per_host=1) as b:
            slot = await b.acquire_slot()
            try:
                answers = await attempt(slot, ["@" + name])
            finally:
                await b.release_slot(slot, reusable=True)
    assert answers["@" + name] == "ECONNREFUSED", answers


_LISTEN = r"""
import os, select, socket
s = socket.socket()
s.bind(("0.0.0.0", 47011))
s.listen(16)
open("ready", "w").write("listening\n")
stop = os.open("stop", os.O_RDONLY)
readable, _, _ = select.select([s, stop], [], [], 60)
print("accepted" if s in readable else "quiet", flush=True)
"""


async def test_another_slots_listening_port_is_unreachable() -> None:
    async with networked(slots_per_host=2) as b:
        victim, attacker = await b.acquire_slot(), await b.acquire_slot()
        ready, stop = make_fifo(b, victim, "ready"), make_fifo(b, victim, "stop")
        await victim.write_file("listen.py", _LISTEN.encode())
        heard: list[ExecResult] = []

        async def serve() -> None:
            heard.append(await victim.exec(ExecRequest("python3 listen.py", timeout=60)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            await wait_fifo(ready)
            local = _netns.local_ipv4()
            targets = ["127.0.0.1", "10.0.2.100", "10.0.2.2", "[::1]", *local]
            answers = await attempt(attacker, [f"{t}:47011" for t in targets])
            fd = os.open(stop, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)  # the victim's select sees EOF: done
        assert heard[0].stdout == b"quiet\n", heard
        assert "OK" not in answers.values(), answers
        for s in (victim, attacker):
            await b.release_slot(s, reusable=True)


async def test_the_sandbox_servers_own_port_is_unreachable(tmp_path: object) -> None:
    # The server as a container runs it: TCP on every address, with a token. The slot must
    # not reach it at all (a token is a second line of defence, not the first).
    config = ServerConfig(
        slots=1,
        workdir=os.path.join(str(tmp_path), "host"),
        token="t" * 32,
        host="0.0.0.0",
        port=0,
        isolation=Isolation(allow_network=True),
    )
    server = SandboxServer(config)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        (rt,) = server.slots
        targets = ["127.0.0.1", "10.0.2.2", *_netns.local_ipv4()]
        await anyio.Path(rt.workspace, "try.py").write_text(_TRY)
        got = await rt.exec(
            ExecRequest(
                "python3 try.py " + " ".join(f"{t}:{server.port}" for t in targets), timeout=60
            )
        )
        tg.cancel_scope.cancel()
    answers = dict(line.split(" ", 1) for line in got.stdout.decode().splitlines())
    assert len(answers) == len(targets) and "OK" not in answers.values(), got


async def test_link_local_metadata_is_prohibited_and_the_routes_are_fixed() -> None:
    async with networked(slots_per_host=1) as b:
        slot = await b.acquire_slot()
        try:
            answers = await attempt(
                slot,
                [
                    "169.254.169.254:80",
                    "169.254.0.1:53",
                    "100.100.100.200:80",  # Alibaba Cloud's metadata service
                    "192.0.0.192:80",  # Oracle Cloud's legacy one
                ],
            )
            # The slot cannot lift the prohibition: no CAP_NET_ADMIN in its namespace.
            removed = await slot.exec(
                ExecRequest("ip route del prohibit 169.254.0.0/16; ip route", timeout=30)
            )
        finally:
            await b.release_slot(slot, reusable=True)
    assert set(answers.values()) == {"EACCES"}, answers
    assert removed.exit_code == 0 and b"prohibit 169.254.0.0/16" in removed.stdout, removed
    assert b"Operation not permitted" in removed.stderr, removed


# -- the NAT helper's life -------------------------------------------------------------------


def _cgroup_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return next(line.split(":", 2)[2].strip() for line in f if ":pids:" in line)


async def test_the_nat_helper_lives_and_dies_with_its_slot() -> None:
    before = nat_pids()
    async with networked(slots_per_host=2) as b:
        first = set(nat_pids()) - set(before)
        assert len(first) == 2, "one slirp4netns per networked slot"
        # Charged to its own slot: each sits in a different slot's pids cgroup.
        groups = {_cgroup_of(pid) for pid in first}
        assert len(groups) == 2 and all(g.startswith("/structenv/") for g in groups), groups
        for pid in first:
            # As root (a host), its root has an empty /run (no docker.sock to connect to)
            # and no password hashes.
            root = anyio.Path(f"/proc/{pid}/root")
            assert not await (root / "run/docker.sock").exists()
            assert (await (root / "etc/shadow").stat()).st_size == 0
        slot = await b.acquire_slot()
        mine = [p for p in first if _cgroup_of(p).endswith(f"/{slot.id.rsplit('-', 1)[-1]}")]
        gone = open_pidfds(mine)
        await b.release_slot(slot, reusable=True)  # a reset: a new sandbox, a new NAT
        await wait_all_dead(gone)
        now = set(nat_pids()) - set(before)
        assert len(now) == 2 and not now & set(mine), (first, now)
        rest = open_pidfds(sorted(now))
    await wait_all_dead(rest)  # the backend's exit
    assert set(nat_pids()) <= set(before)


_UDP_FLOWS = r"""
import socket, sys, time
for i in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"x", ("198.51.100.7", 9))  # TEST-NET-2: a flow slirp keeps for minutes
    s.close()
    if i % 50 == 49:
        time.sleep(0.02)  # let slirp4netns drain its tap queue (else it drops datagrams)
"""


def _open_files(pid: int) -> tuple[int, str]:
    with open(f"/proc/{pid}/limits") as f:
        limit = next(line for line in f if line.startswith("Max open files"))
    return len(os.listdir(f"/proc/{pid}/fd")), limit


async def test_the_nat_helper_holds_no_more_descriptors_than_its_slot() -> None:
    # Each datagram from a fresh port is a flow slirp4netns opens a host socket for and keeps
    # for minutes: with the server's limit (20,000) one slot made it hold 6,000+ descriptors
    # (30,000 datagrams) beyond the file-table budget of its nofile x pids. The flow budget
    # (tests/test_sandbox_net_budget.py) would stop them well before nofile: raised here.
    async with networked(
        slots_per_host=1, nofile_limit=64, connection_rate=1000, connection_burst=10_000
    ) as b:
        slot = await b.acquire_slot()
        try:
            (nat,) = nat_pids()
            await slot.write_file("udp.py", _UDP_FLOWS.encode())
            got = await slot.exec(ExecRequest("python3 udp.py 600", timeout=120))
            held, limit = _open_files(nat)
        finally:
            await b.release_slot(slot, reusable=True)
    assert got.exit_code == 0, got
    assert held <= 64, held
    assert limit.split()[3:5] == ["64", "64"], limit


async def test_the_nat_helper_dies_with_a_killed_server() -> None:
    async with networked(slots_per_host=2) as b:
        (host_pid,) = b.host_pids().values()
        helpers = [p for p in nat_pids() if host_pid in _ancestors(p)]
        assert len(helpers) == 2
        fds = open_pidfds(helpers)
        os.kill(host_pid, signal.SIGKILL)
        # Their --exit-fd pipe closes with the server: they end although nobody kills them.
        await wait_all_dead(fds, within=10)


def _ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            break
        pid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        out.append(pid)
    return out


@pytest.mark.parametrize("steps", range(0, 60, 3))
async def test_a_cancelled_start_leaves_no_nat_helper(tmp_path: object, steps: int) -> None:
    # Cancel a networked slot's start after ``steps`` scheduling steps: at bwrap's pid, the
    # routes, the spawn of slirp4netns, its ready signal or the worker's hello.
    name = f"netns-cancel-{os.getpid()}-{steps}"
    use_cgroup = SlotCgroup.available()
    before = set(nat_pids())
    async with anyio.create_task_group() as tg:
        rt = _runtime.SlotRuntime(
            index=0,
            name=name,
            workspace=os.path.join(str(tmp_path), "slot-0"),
            isolation=Isolation(allow_network=True),
            limits=_runtime.Limits(memory=512 << 20, pids=64),
            use_cgroup=use_cgroup,
            task_group=tg,
            lease=1,
            uid=slot_uid(default_uid_base(name), 0),
            seccomp_path=os.path.join(str(tmp_path), ".seccomp.bpf"),
        )
        with anyio.CancelScope() as scope:

            async def cancel_after() -> None:
                for _ in range(steps):
                    await anyio.lowlevel.checkpoint()
                scope.cancel()

            tg.start_soon(cancel_after)
            await rt.start()
        started = rt.state == "ready"
        left = set(nat_pids()) - before
        if not started:
            assert left == set(), f"cancelled start left slirp4netns {left}"
        with anyio.CancelScope(shield=True):
            await rt.stop()
        tg.cancel_scope.cancel()
    assert set(nat_pids()) - before == set()


# -- refusals --------------------------------------------------------------------------------


def _without_nat(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``PATH`` with bubblewrap but without slirp4netns."""
    bin_dir = os.path.join(str(tmp_path), "bin")
    os.makedirs(bin_dir)
    for tool in ("bwrap", "setpriv"):
        found = shutil.which(tool)
        assert found is not None
        os.symlink(found, os.path.join(bin_dir, tool))
    monkeypatch.setenv("PATH", bin_dir)


def test_a_missing_nat_tool_is_one_line_naming_the_package(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_nat(tmp_path, monkeypatch)
    with pytest.raises(SandboxUnavailableError) as info:
        _netns.check_nat()
    message = str(info.value)
    assert "\n" not in message and "apt-get install -y slirp4netns" in message, message


async def test_a_server_without_the_nat_tool_refuses_networked_slots(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_nat(tmp_path, monkeypatch)
    config = ServerConfig(
        slots=1,
        workdir=os.path.join(str(tmp_path), "host"),
        socket_path=os.path.join(str(tmp_path), "s.sock"),
        isolation=Isolation(allow_network=True),
    )
    with pytest.raises(SandboxUnavailableError, match="apt-get install -y slirp4netns"):
        await SandboxServer(config).serve()


def test_local_addresses_are_read_from_the_fib_trie() -> None:
    trie = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
     |-- 192.0.2.0
        /24 link UNICAST
     |-- 192.0.2.2
        /32 host LOCAL
Local:
     |-- 192.0.2.2
        /32 host LOCAL
     |-- 192.0.2.255
        /32 link BROADCAST
"""
    assert _netns.local_ipv4(trie) == ["192.0.2.2"]
    script = _netns.route_script(["192.0.2.2"])
    assert script.splitlines() == [
        "route add prohibit 192.0.2.2/32",
        "route add prohibit 169.254.0.0/16",
        "route add prohibit 100.100.100.200/32",
        "route add prohibit 192.0.0.192/32",
    ]


# -- DockerBackend ---------------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.usefixtures("docker_image")
async def test_a_networked_container_slot_has_its_own_nat() -> None:
    # In a container the server listens on TCP (token) on the container's address: a slot
    # must not reach it, nor the container's loopback; it reaches another machine.
    async with (
        remote_machine() as (address, port),
        docker_backend(allow_network=True, slots_per_host=1) as b,
    ):
        box = next(iter(b._hosts.values()))
        server = f"{box.client._host}:{box.client._port}"
        slot = await b.acquire_slot()
        try:
            answers = await attempt(
                slot, [server, "127.0.0.1:8765", "10.0.2.2:8765", "169.254.169.254:80"]
            )
            got = await slot.exec(
                ExecRequest(f"exec 3<>/dev/tcp/{address}/{port} && head -1 <&3", timeout=30)
            )
        finally:
            await b.release_slot(slot, reusable=True)
    assert "OK" not in answers.values() and answers[server] == "EACCES", answers
    assert got.stdout == b"remote\n" and got.sandboxed, got


@pytest.mark.docker
@pytest.mark.usefixtures("docker_image")
async def test_a_networked_container_slot_reaches_neither_the_docker_host_nor_its_bridge() -> None:
    # From a container the Docker host's addresses are not local, and the bridge holds the
    # host's gateway address and the other containers (other slots' servers): measured
    # reachable before (a host listener on 0.0.0.0 accepted, and a sibling's server port).
    local = _netns.local_ipv4()  # the Docker host's: eth0, docker0 (the bridge's gateway)
    with listener(socket.AF_INET, ("0.0.0.0", 0)) as anywhere:
        port = anywhere.getsockname()[1]
        async with (
            remote_machine() as (address, remote_port),
            docker_backend(allow_network=True, slots_per_host=1, min_hosts=2, max_hosts=2) as b,
        ):
            servers = [f"{box.client._host}:{box.client._port}" for box in b._hosts.values()]
            slot = await b.acquire_slot()
            try:
                answers = await attempt(slot, [*(f"{a}:{port}" for a in local), *servers])
                got = await slot.exec(
                    ExecRequest(
                        f"exec 3<>/dev/tcp/{address}/{remote_port} && head -1 <&3", timeout=30
                    )
                )
            finally:
                await b.release_slot(slot, reusable=True)
    assert set(answers.values()) == {"EACCES"}, answers
    assert got.stdout == b"remote\n", got  # another machine: still reachable


async def test_prohibited_networks_and_links_are_unreachable(tmp_path: object) -> None:
    # What a container's server is told (--prohibit, --prohibit-links), on a host's server:
    # "another machine" sits on a directly connected /30, and in a prohibited range.
    async with remote_machine() as (address, port):
        for iso in (
            Isolation(allow_network=True, prohibit_links=True),
            Isolation(allow_network=True, prohibit=("100.64.0.0/10",)),
        ):
            config = ServerConfig(
                slots=1,
                workdir=os.path.join(str(tmp_path), "host"),
                socket_path=os.path.join(str(tmp_path), "s.sock"),
                isolation=iso,
            )
            server = SandboxServer(config)
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve)
                (rt,) = server.slots
                await anyio.Path(rt.workspace, "try.py").write_text(_TRY)
                got = await rt.exec(ExecRequest(f"python3 try.py {address}:{port}", timeout=60))
                tg.cancel_scope.cancel()
            assert got.stdout == f"{address}:{port} EACCES\n".encode(), (iso, got)


def test_connected_networks_are_read_from_the_route_table() -> None:
    route = (
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t010011AC\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "eth0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
        "eth1\t0002000A\t00000000\t0000\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "lo\t0000007F\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n"
    )
    # The default route and routes via a gateway, down or on loopback are not links.
    assert _netns.connected_ipv4(route) == ["172.17.0.0/16"]
    script = _netns.route_script(["172.17.0.2"], ["192.0.2.2"], ["172.17.0.0/16"])
    assert script.splitlines() == [
        "route add prohibit 172.17.0.2/32",
        "route add prohibit 192.0.2.2/32",
        "route add prohibit 172.17.0.0/16",
        *(f"route add prohibit {net}" for net in _netns.PROHIBITED),
    ]


def test_the_servers_prohibit_flags_are_normalised_or_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from structenv.sandbox.__main__ import _parse

    args = _parse(["--prohibit", "192.0.2.2,10.1.2.3/8", "--prohibit-links"])
    assert args.prohibit == ("192.0.2.2/32", "10.0.0.0/8") and args.prohibit_links
    with pytest.raises(SystemExit):
        _parse(["--prohibit", "192.0.2.2,example.com"])
    assert "not an IPv4 address or network" in capsys.readouterr().err


_DNS_ALIAS = r"""
import os, sys, anyio
from structenv import ExecRequest
from structenv.sandbox import Isolation, SandboxServer, ServerConfig

ASK = '''
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(b"ping", ("10.0.2.3", 53))
try:
    print("answered", s.recvfrom(100)[0])
except OSError as exc:
    print("silent", type(exc).__name__)
'''

async def main():
    config = ServerConfig(
        slots=1, workdir=os.path.join(sys.argv[1], "host"),
        socket_path=os.path.join(sys.argv[1], "s.sock"), isolation=Isolation(allow_network=True),
    )
    server = SandboxServer(config)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        (rt,) = server.slots
        await anyio.Path(rt.workspace, "ask.py").write_text(ASK)
        got = await rt.exec(ExecRequest("python3 ask.py", timeout=30))
        print(got.stdout.decode(), end="", flush=True)
        tg.cancel_scope.cancel()

anyio.run(main)
"""


async def test_the_dns_alias_does_not_reach_a_resolver_on_the_hosts_loopback(
    tmp_path: object,
) -> None:
    # slirp4netns forwarded UDP to 10.0.2.3:53 to the first resolver of the server's
    # resolv.conf, also one on the host's loopback (systemd-resolved's 127.0.0.53, here
    # 127.0.0.1): --disable-host-loopback does not cover it. The server runs in a mount
    # namespace of its own whose resolv.conf names 127.0.0.1, where a UDP listener waits.
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 53))
    except OSError as exc:
        sock.close()
        pytest.skip(f"port 53 on the host's loopback is taken: {exc}")
    sock.setblocking(False)
    conf = os.path.join(str(tmp_path), "resolv.conf")
    await anyio.Path(conf).write_text("nameserver 127.0.0.1\n")
    script = os.path.join(str(tmp_path), "serve.py")
    await anyio.Path(script).write_text(_DNS_ALIAS)
    try:
        got = await anyio.run_process(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
             'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"', "sh", conf,
             sys.executable, script, str(tmp_path)],
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )  # fmt: skip
        with pytest.raises(BlockingIOError):
            data, peer = sock.recvfrom(100)
            pytest.fail(f"a slot reached the host's loopback resolver ({data!r} from {peer})")
    finally:
        sock.close()
    assert got.stdout.startswith(b"silent"), got

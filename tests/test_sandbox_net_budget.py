"""A networked slot's budget of new outbound flows (nftables in the slot's own namespace).

Every connection a networked slot opens is a host socket of its slirp4netns, left in
``TIME_WAIT`` (60 s, one of the host's ephemeral ports towards that address) when closed,
and an entry of the machine's conntrack table; every datagram to a new address or port is a
conntrack entry too. The attacks here start flows as fast as a slot can, on real bwrap and
slirp4netns (LocalBackend) and in a real container (DockerBackend), and check that what got
out in a window stays within ``burst + rate x (window + 1 s)``, measured from the host side
(its ``TIME_WAIT`` sockets) where it can be; a slot under its budget connects normally, and
its loopback is not limited. The red-team attack itself (a slot using up the host's ports
to one address) is ``tests/test_redteam_slot_leaks.py``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from structenv import ConfigError, ExecRequest, SandboxSpec, SandboxUnavailableError, SlotPool
from structenv.abc import Slot
from structenv.backends import LocalBackend
from structenv.sandbox import Isolation, SandboxServer, ServerConfig, _netns
from structenv.sandbox.__main__ import _parse
from test_docker_support import containers_of, docker_backend, docker_image, new_run_id
from test_sandbox_network import networked, remote_machine

_ = docker_image
pytestmark = pytest.mark.anyio

RATE, BURST = _netns.DEFAULT_CONNECTION_RATE, _netns.DEFAULT_CONNECTION_BURST

#: Opens and closes TCP connections (``tcp``) or sends datagrams from fresh sockets to fresh
#: ports (``udp``) to ``address:port`` for ``seconds``; prints how many got out. A dropped
#: SYN makes its connect time out (0.3 s, before the kernel's 1 s retransmission).
ATTACK = r"""
import socket, sys, time
kind, address, port, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
out = tries = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    tries += 1
    try:
        if kind == "tcp":
            socket.create_connection((address, port), timeout=0.3).close()
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"x", (address, port + tries % 1000))
        out += 1
    except OSError:
        pass
print(out, tries)
"""

#: A TCP server that closes after its client (the client's side is left in TIME_WAIT).
PATIENT_REMOTE = r"""
import socket, threading
server = socket.socket()
server.bind(("0.0.0.0", 0))
server.listen(512)
print(server.getsockname()[1], flush=True)
def serve(conn):
    while conn.recv(4096):
        pass
    conn.close()
while True:
    threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
"""

_HTTP_REMOTE = r"""
import http.server
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello from another machine\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def within_budget(count: int, elapsed: float, rate: int = RATE, burst: int = BURST) -> bool:
    """Whether ``count`` flows in ``elapsed`` seconds fit a budget (1 s of slack)."""
    return count <= burst + rate * (elapsed + 1)


async def time_wait_to(address: str, netns_pid: int | None = None) -> int:
    """The ``TIME_WAIT`` sockets towards ``address`` in this namespace (or ``netns_pid``'s)."""
    enter = ["nsenter", f"--net=/proc/{netns_pid}/ns/net", "--"] if netns_pid else []
    ss = await anyio.run_process([*enter, "ss", "-Htan", "state", "time-wait", "dst", address])
    return len(ss.stdout.splitlines())


def conntrack_to(address: str) -> int:
    """The conntrack entries towards ``address`` in this namespace's table, or 0 where the
    host tracks no connections (no ``/proc/net/nf_conntrack``)."""
    try:
        with open("/proc/net/nf_conntrack") as f:
            return sum(f" dst={address} " in line for line in f)
    except FileNotFoundError:
        return 0


async def attack(slot: Slot, kind: str, address: str, port: int, seconds: float) -> int:
    """Run :data:`ATTACK` in ``slot``: how many flows got out."""
    await slot.write_file("attack.py", ATTACK.encode())
    got = await slot.exec(
        ExecRequest(f"python3 attack.py {kind} {address} {port} {seconds}", timeout=120)
    )
    assert got.exit_code == 0, got
    out, tries = map(int, got.stdout.split())
    assert out > 0 and tries > out, got  # the budget let some through and dropped the rest
    return out


async def bounded_tcp_attack(slot: Slot, address: str, port: int, seconds: float = 2.0) -> int:
    """:func:`attack` over TCP, checked from the host: its ``TIME_WAIT`` sockets towards
    ``address`` grew by no more than the budget allows for the time it took."""
    before, tracked = await time_wait_to(address), conntrack_to(address)
    start = time.monotonic()
    out = await attack(slot, "tcp", address, port, seconds)
    grown = await time_wait_to(address) - before
    tracked = conntrack_to(address) - tracked
    elapsed = time.monotonic() - start
    assert grown > 0 and within_budget(grown, elapsed), (grown, out, elapsed)
    assert within_budget(tracked, elapsed), (tracked, elapsed)  # the host's conntrack table
    return grown


async def test_a_slot_under_its_budget_connects_normally() -> None:
    fetch = (
        'python3 -c "import urllib.request, sys\n'
        "for _ in range(5): sys.stdout.write(urllib.request.urlopen("
        "'http://{}:{}/', timeout=10).read().decode())\""
    )
    async with (
        remote_machine(_HTTP_REMOTE) as (address, port),
        networked(slots_per_host=1) as backend,
        SlotPool(backend).slot() as slot,
    ):
        got = await slot.exec(ExecRequest(fetch.format(address, port), timeout=60))
    assert got.exit_code == 0 and got.stdout == b"hello from another machine\n" * 5, got


_LOOPBACK = r"""
import socket
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(4096)
port = server.getsockname()[1]
made = sent = 0
for _ in range(1000):
    client = socket.create_connection(("127.0.0.1", port), timeout=0.5)
    server.accept()[0].close()
    client.close()
    made += 1
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for i in range(1000):
        s.sendto(b"x", ("127.0.0.1", 9 + i))
        sent += 1
print(made, sent)
"""


async def test_loopback_inside_a_slot_is_not_limited() -> None:
    # Ten times the burst, faster than the rate: every connection and datagram goes through
    # (one dropped SYN would time out its connect and fail the script).
    async with networked(slots_per_host=1) as backend, SlotPool(backend).slot() as slot:
        await slot.write_file("loop.py", _LOOPBACK.encode())
        got = await slot.exec(ExecRequest("python3 loop.py", timeout=120))
    assert got.stdout == b"1000 1000\n", got


async def test_datagrams_out_of_a_slot_are_bounded() -> None:
    # Each datagram to a new port is a new conntrack entry on the host: counted (sendto
    # succeeded: it passed the slot's output hook; a dropped one fails with EPERM).
    async with (
        remote_machine() as (address, port),
        networked(slots_per_host=1) as backend,
        SlotPool(backend).slot() as slot,
    ):
        start = time.monotonic()
        out = await attack(slot, "udp", address, port, 2.0)
        assert within_budget(out, time.monotonic() - start), out


async def test_the_budget_holds_after_a_reset_and_for_every_spec() -> None:
    # Each sandbox (a reset makes a new one, with a new namespace) and each spec's slots get
    # the budget: it is loaded where the NAT is attached, before any slot code runs.
    spec = SandboxSpec(env={"WHO": "spec"}, name="env")
    async with (
        remote_machine(PATIENT_REMOTE) as (address, port),
        networked(slots_per_host=1) as backend,
    ):
        pool = SlotPool(backend, acquire_timeout=60)
        async with pool.slot() as slot:
            await bounded_tcp_attack(slot, address, port)
        async with pool.slot() as slot:  # the same slot, reset
            await bounded_tcp_attack(slot, address, port)
        async with pool.slot(spec) as slot:
            assert (await slot.exec(ExecRequest("echo $WHO", timeout=30))).stdout == b"spec\n"
            await bounded_tcp_attack(slot, address, port)


async def test_a_configured_budget_is_the_one_enforced() -> None:
    async with (
        remote_machine(PATIENT_REMOTE) as (address, port),
        networked(slots_per_host=1, connection_rate=5, connection_burst=10) as backend,
        SlotPool(backend).slot() as slot,
    ):
        before = await time_wait_to(address)
        start = time.monotonic()
        out = await attack(slot, "tcp", address, port, 2.0)
        grown = await time_wait_to(address) - before
        elapsed = time.monotonic() - start
    assert grown > 0 and within_budget(grown, elapsed, 5, 10), (grown, out, elapsed)


# -- configuration and refusals ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"connection_rate": 0}, "connection_rate"),
        ({"connection_rate": -3}, "connection_rate"),
        ({"connection_rate": 2.5}, "connection_rate"),
        ({"connection_rate": 100_000}, "connection_rate"),
        ({"connection_rate": "fast"}, "connection_rate"),
        ({"connection_burst": 0}, "connection_burst"),
        ({"connection_burst": 10**6}, "connection_burst"),
    ],
)
def test_a_bad_budget_is_a_one_line_config_error(options: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        LocalBackend(allow_network=True, **options)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"LocalOptions: {field}: "), message


@pytest.mark.parametrize("flag", ["--connection-rate", "--connection-burst"])
@pytest.mark.parametrize("value", ["0", "-1", "1.5", "x", "99999999"])
def test_the_servers_budget_flags_are_refused_out_of_range(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        _parse(["--socket", "/tmp/x.sock", flag, value])
    assert "not an integer in 1.." in capsys.readouterr().err


def test_the_budget_script_refuses_what_nft_would_not_bound() -> None:
    for rate, burst in ((0, 1), (1, 0), (True, 1), (_netns.MAX_CONNECTION_RATE + 1, 1)):
        with pytest.raises(ValueError, match="connection_rate must be an integer"):
            _netns.budget_script(rate, burst)


@contextlib.contextmanager
def _without_nft(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tool look-ups that find everything a networked slot needs but ``nft``."""
    bin_dir = os.path.join(str(tmp_path), "bin")
    os.makedirs(bin_dir)
    for tool in ("bwrap", "setpriv", "slirp4netns", "ip"):
        found = shutil.which(tool, path=_netns._SBIN_PATH)
        assert found is not None, tool
        os.symlink(found, os.path.join(bin_dir, tool))
    monkeypatch.setenv("PATH", bin_dir)
    monkeypatch.setattr(_netns, "_SBIN_PATH", bin_dir)
    yield


def test_a_missing_nft_is_one_line_naming_the_package(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _without_nft(tmp_path, monkeypatch), pytest.raises(SandboxUnavailableError) as info:
        _netns.check_nat()
    message = str(info.value)
    assert "\n" not in message and message.endswith("apt-get install -y nftables"), message


def test_doctor_reports_a_missing_nft(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from structenv._doctor import _network_check

    with _without_nft(tmp_path, monkeypatch):
        check = _network_check("bwrap")
    assert not check.ok and check.detail.endswith("apt-get install -y nftables"), check


async def test_a_server_without_nft_refuses_networked_slots(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Never a networked slot without its budget: the server does not start.
    config = ServerConfig(
        slots=1,
        workdir=os.path.join(str(tmp_path), "host"),
        socket_path=os.path.join(str(tmp_path), "s.sock"),
        isolation=Isolation(allow_network=True),
    )
    with _without_nft(tmp_path, monkeypatch):
        with pytest.raises(SandboxUnavailableError, match=r"apt-get install -y nftables$"):
            await SandboxServer(config).serve()


def test_nft_is_installed_by_the_readme_ci_and_the_image() -> None:
    # The one install command (.ci/run runs the README's verbatim) and the sandbox image's
    # packages: a networked slot refuses to run without nft.
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    (install,) = [line.strip() for line in readme.splitlines() if "apt-get install" in line]
    assert " nftables " in install
    assert install in (root / ".ci" / "run").read_text()
    recipe = (root / "src" / "structenv" / "_images" / "build.sh").read_text()
    (packages,) = [line for line in recipe.splitlines() if line.startswith("packages=")]
    assert "slirp4netns,iproute2,nftables" in packages


# -- DockerBackend -----------------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.usefixtures("docker_image")
async def test_a_networked_container_slot_has_the_budget_too() -> None:
    # In a container slirp4netns's sockets are the container's: counted in its namespace.
    run_id = new_run_id()
    async with (
        remote_machine(PATIENT_REMOTE) as (address, port),
        docker_backend(allow_network=True, slots_per_host=1, run_id=run_id) as backend,
    ):
        (container,) = containers_of(run_id)
        container.reload()
        pid = int(container.attrs["State"]["Pid"])
        pool = SlotPool(backend, acquire_timeout=60)
        for _ in range(2):  # a fresh slot, then the same one after its reset
            async with pool.slot() as slot:
                before, tracked = await time_wait_to(address, pid), conntrack_to(address)
                start = time.monotonic()
                out = await attack(slot, "tcp", address, port, 2.0)
                grown = await time_wait_to(address, pid) - before
                tracked = conntrack_to(address) - tracked  # the Docker host's table
                elapsed = time.monotonic() - start
                assert grown > 0 and within_budget(grown, elapsed), (grown, out, elapsed)
                assert within_budget(tracked, elapsed), (tracked, elapsed)
        async with pool.slot() as slot:
            got = await slot.exec(
                ExecRequest(
                    'python3 -c "import socket; socket.create_connection('
                    f"('{address}', {port}), timeout=10).close(); print('ok')\"",
                    timeout=60,
                )
            )
            assert got.stdout == b"ok\n", got

"""A networked slot's own network namespace, with outbound-only user-mode NAT (slirp4netns).

``allow_network=True`` used to share the server's network namespace with the slot (bwrap
``--share-net``): a slot then reached every service on the host's loopback (policy and
inference servers, the trainer's APIs), the host's abstract unix sockets, the other slots'
listening ports, and in a container the sandbox server's own TCP port. Now a networked slot
keeps bwrap's private network namespace, and a ``slirp4netns`` process, started by the server
for that slot alone, gives it a ``tap0`` interface (10.0.2.100/24, gateway 10.0.2.2, no DNS
alias: the slot asks the host's ``resolv.conf`` servers itself) whose connections
slirp4netns makes as ordinary sockets of the server's namespace:

- ``--disable-host-loopback``: the gateway address is not mapped to the host's loopback;
- the slot's namespace gets ``prohibit`` routes (set before any slot code runs, by the
  server; the slot has no ``CAP_NET_ADMIN`` to remove them) for every IPv4 address local to
  the server's namespace (``/proc/net/fib_trie``: the host's ``eth0``, ``docker0``, ... or the
  container's own address, where the sandbox server listens) and for link-local
  ``169.254.0.0/16`` (cloud metadata services; :data:`PROHIBITED` adds those outside it);
- slirp4netns runs with ``--enable-sandbox`` (its own mount namespace, capabilities
  dropped) and ``--enable-seccomp``, in the slot's cgroups (its CPU and memory are the
  slot's), and exits when the server closes its ``--exit-fd`` (a pipe only the server holds:
  a server that dies, even by SIGKILL, takes every slot's slirp4netns with it).

A budget of new outbound flows (:func:`budget_script`, an nftables ruleset the server loads
into the slot's namespace next to the routes, before any slot code runs): every connection
the slot opens is a host socket of slirp4netns, left in ``TIME_WAIT`` (60 s, one of the
host's ephemeral ports towards that address) when closed, and an entry of the machine's
conntrack table (120 s) where the host tracks connections. Uncapped, one slot made 3,000 in
3.2 s: two could use up the host's ports towards one address, three the conntrack table.
The rules are stateless (no conntrack in the slot's namespace, whose entries would go to
the same table) and leave loopback alone.

IPv6 is not configured (slirp4netns without ``--enable-ipv6``): the slot has no IPv6 route.
A container's server is also told the Docker host's addresses (``Isolation.prohibit``: not
local to the container) and prohibits the networks its container is directly attached to
(``Isolation.prohibit_links``: the bridge, holding the host's gateway address and the other
containers). What stays reachable: any other address, i.e. other machines; see
``docs/design.md``.

Why slirp4netns and not pasta: measured in ``docs/design.md`` ("Decisions").
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import sys
from collections.abc import Sequence

import anyio

from .._exceptions import SandboxUnavailableError

__all__ = [
    "BUDGET_PACKAGE",
    "DEFAULT_CONNECTION_BURST",
    "DEFAULT_CONNECTION_RATE",
    "MAX_CONNECTION_BURST",
    "MAX_CONNECTION_RATE",
    "NAT_PACKAGE",
    "PROHIBITED",
    "budget_argv",
    "budget_script",
    "check_nat",
    "connected_ipv4",
    "local_ipv4",
    "nat_argv",
    "read_child_pid",
    "route_argv",
    "route_script",
]

#: The Debian package that provides the NAT helper.
NAT_PACKAGE = "slirp4netns"
#: The Debian package that provides ``nft``, which loads a slot's flow budget.
BUDGET_PACKAGE = "nftables"
#: Ranges no networked slot may reach besides the server's own addresses: link-local (the
#: metadata services of AWS, GCP, Azure, Tencent: instance credentials) and the metadata
#: addresses clouds put elsewhere (Alibaba Cloud 100.100.100.200, Oracle Cloud's legacy
#: 192.0.0.192).
PROHIBITED = ("169.254.0.0/16", "100.100.100.200/32", "192.0.0.192/32")
#: Interface, MTU of the slot's tap device.
TAP = "tap0"
MTU = 65520
#: Most bytes bwrap's ``--info-fd`` JSON may take.
_INFO_MAX = 1 << 16


def check_nat() -> tuple[str, str, str]:
    """Paths of ``slirp4netns``, ``ip`` and ``nft``, or a one-line refusal naming the packages.

    Raises:
        SandboxUnavailableError: a tool is missing.
    """
    nat = shutil.which("slirp4netns")
    ip, nft = shutil.which("ip", path=_SBIN_PATH), shutil.which("nft", path=_SBIN_PATH)
    tools = ((nat, NAT_PACKAGE), (ip, "iproute2"), (nft, BUDGET_PACKAGE))
    missing = [pkg for tool, pkg in tools if tool is None]
    if nat is None or ip is None or nft is None:
        raise SandboxUnavailableError(
            "allow_network=True gives each slot its own network namespace through slirp4netns"
            f" and a budget of new connections (nftables), which needs: apt-get install -y "
            f"{' '.join(missing)}"
        )
    return nat, ip, nft


_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def local_ipv4(fib_trie: str | None = None) -> list[str]:
    """Every IPv4 address local to this process's network namespace, loopback excepted.

    Read from ``/proc/net/fib_trie`` (the ``/32 host LOCAL`` entries), so no tool is needed.
    """
    if fib_trie is None:
        with open("/proc/net/fib_trie") as f:
            fib_trie = f.read()
    found: list[str] = []
    last = ""
    for line in fib_trie.splitlines():
        text = line.strip()
        if text.startswith("|--"):
            last = text[3:].strip()
        elif text == "/32 host LOCAL" and last:
            try:
                addr = ipaddress.IPv4Address(last)
            except ValueError:
                continue
            if not addr.is_loopback and str(addr) not in found:
                found.append(str(addr))
    return found


def connected_ipv4(route: str | None = None) -> list[str]:
    """The IPv4 networks this namespace reaches directly (no gateway), loopback excepted.

    Read from ``/proc/net/route``: in a container on a Docker bridge, the bridge's subnet
    (the Docker host's gateway address and every other container on it).
    """
    if route is None:
        with open("/proc/net/route") as f:
            route = f.read()
    found: list[str] = []
    for line in route.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or fields[0] == "lo":
            continue
        try:
            dest, gateway, flags, mask = (int(fields[i], 16) for i in (1, 2, 3, 7))
        except ValueError:
            continue
        if gateway or not flags & 1 or not mask:  # via a gateway, down, or the default
            continue
        net = ipaddress.IPv4Network(
            (ipaddress.IPv4Address(dest.to_bytes(4, "little")), bin(mask).count("1")),
            strict=False,
        )
        if not net.is_loopback and str(net) not in found:
            found.append(str(net))
    return found


def route_script(
    addresses: Sequence[str], prohibit: Sequence[str] = (), networks: Sequence[str] = ()
) -> str:
    """``ip -batch`` input: a ``prohibit`` route for each local address, each of
    ``prohibit`` and ``networks`` (addresses or CIDR networks) and :data:`PROHIBITED`."""
    targets: list[str] = []
    for item in [*addresses, *prohibit, *networks, *PROHIBITED]:
        net = str(ipaddress.IPv4Network(item, strict=False))
        if net not in targets:
            targets.append(net)
    return "".join(f"route add prohibit {net}\n" for net in targets)


#: Runs ``argv[2:]`` with ``{userns}`` replaced by a path to the user namespace that owns the
#: network namespace of pid ``argv[1]`` (``NS_GET_USERNS``). bwrap's ``--disable-userns``
#: nests a second user namespace inside the one owning the sandbox's network: joining
#: ``/proc/PID/ns/user`` (the nested one) would not grant ``CAP_NET_ADMIN`` over it.
_OWNER = """import fcntl, os, sys
net = os.open("/proc/%s/ns/net" % sys.argv[1], os.O_RDONLY | os.O_CLOEXEC)
owner = fcntl.ioctl(net, 0xB701)
os.set_inheritable(owner, True)
argv = [a.replace("{userns}", "/proc/self/fd/%d" % owner) for a in sys.argv[2:]]
os.execvp(argv[0], argv)
"""


def _as_owner(pid: int, mode: str, uid: int | None, argv: list[str]) -> list[str]:
    """``argv`` run by the owner of the sandbox's namespaces: as root, directly; otherwise as
    the slot's uid (``setpriv``) or this one, with ``{userns}`` the owning user namespace."""
    if mode == "root":
        return argv
    prefix: list[str] = []
    if mode == "setpriv" and uid is not None:
        prefix = [
            "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--",
        ]  # fmt: skip
    python = os.path.realpath(sys.executable)
    return [*prefix, python, "-I", "-S", "-c", _OWNER, str(pid), *argv]


def route_argv(ip: str, pid: int, *, mode: str, uid: int | None) -> list[str]:
    """Run ``ip -batch -`` (reading :func:`route_script`) in the network namespace of ``pid``.

    ``mode`` is ``_bwrap.privilege()``: as root, ``nsenter`` joins the namespace directly;
    otherwise the user namespace owning it (created by the slot's uid) is joined first, which
    grants ``CAP_NET_ADMIN`` over that network namespace and nothing outside it.
    """
    return _in_netns([ip, "-batch", "-"], pid, mode=mode, uid=uid)


def budget_argv(nft: str, pid: int, *, mode: str, uid: int | None) -> list[str]:
    """Run ``nft -f -`` (reading :func:`budget_script`) in the network namespace of ``pid``,
    as :func:`route_argv` does ``ip``."""
    return _in_netns([nft, "-f", "-"], pid, mode=mode, uid=uid)


def _in_netns(argv: list[str], pid: int, *, mode: str, uid: int | None) -> list[str]:
    net = f"--net=/proc/{pid}/ns/net"
    if mode == "root":
        return ["nsenter", net, "--", *argv]
    # --preserve-credentials: bwrap denied setgroups in its user namespace.
    enter = ["nsenter", "--preserve-credentials", "--user={userns}", net]
    return _as_owner(pid, mode, uid, [*enter, "--", *argv])


#: New outbound flows a networked slot may start per second, and at once beyond that, by
#: default (docs/design.md, "A networked slot's flow budget", for the arithmetic): at most
#: ``20 x 60 + 100 = 1,300`` of the host's ports in ``TIME_WAIT`` per slot (of 28,232 in the
#: usual ephemeral range) and ``20 x 120 + 100 = 2,500`` conntrack entries (of 262,144).
DEFAULT_CONNECTION_RATE = 20
DEFAULT_CONNECTION_BURST = 100
#: Upper bounds of the options: a slot at 1,000 a second alone holds 60,000 ports in
#: ``TIME_WAIT``, more than any host has; above that a budget would bound nothing.
MAX_CONNECTION_RATE = 1000
MAX_CONNECTION_BURST = 10_000

#: nftables' table holding a slot's flow budget (in the slot's own network namespace).
BUDGET_TABLE = "structenv"


def budget_script(rate: int, burst: int) -> str:
    """``nft -f`` input: at most ``rate`` new outbound flows a second (``burst`` more at
    once) leave the slot's namespace other than through loopback; the rest are dropped.

    A flow is a TCP SYN without ACK (a connection attempt: each one slirp4netns accepts is
    a host socket, ``TIME_WAIT`` after its close, and a conntrack entry), or any packet that
    is not TCP (UDP, ICMP): without connection tracking, which would add the slot's flows
    to the machine's table, a datagram cannot be told to start a flow, and each one to a
    new address or port is a new conntrack entry on the host. One shared budget (a named
    limit): a slot that spends it on datagrams opens fewer connections. A dropped SYN is
    retransmitted by the slot's kernel (``connect`` waits, then times out); a dropped
    datagram fails ``sendto`` with ``EPERM``. Packets of established connections are not
    counted. Loopback inside the slot is not limited.
    """
    if not (
        type(rate) is int
        and type(burst) is int
        and 1 <= rate <= MAX_CONNECTION_RATE
        and 1 <= burst <= MAX_CONNECTION_BURST
    ):
        raise ValueError(
            f"connection_rate must be an integer in 1..{MAX_CONNECTION_RATE} and "
            f"connection_burst one in 1..{MAX_CONNECTION_BURST}: got {rate!r}, {burst!r}"
        )
    return (
        f"table inet {BUDGET_TABLE} {{\n"
        f"  limit flows {{ rate over {rate}/second burst {burst} packets; }}\n"
        "  chain output {\n"
        "    type filter hook output priority filter; policy accept;\n"
        '    oifname "lo" accept\n'
        '    tcp flags & (syn | ack) == syn limit name "flows" drop\n'
        '    meta l4proto != tcp limit name "flows" drop\n'
        "  }\n"
        "}\n"
    )


def nat_argv(
    nat: str,
    pid: int,
    *,
    ready_fd: int,
    exit_fd: int,
    mode: str,
    uid: int | None,
    nofile: int = 0,
) -> list[str]:
    """The slirp4netns command line giving ``pid``'s network namespace outbound NAT.

    ``nofile`` (> 0): its descriptor limit, hard and soft, the slot's own. slirp4netns opens a
    host socket for every flow of the slot and keeps a UDP one for minutes after its last
    datagram: with the server's limit (20,000 here) one slot's datagrams from fresh ports
    made it hold thousands of descriptors the slot's ``nofile x pids`` budget of the
    machine's file table does not count (it is one of the slot's pids).
    """
    # --disable-dns: 10.0.2.3 forwarded UDP to the first resolver of the server's resolv.conf,
    # also one on the host's loopback or at a prohibited address (--disable-host-loopback
    # does not cover it). The slot never uses it: it reads the host's resolv.conf itself.
    argv = [
        nat, "--configure", f"--mtu={MTU}", "--disable-host-loopback", "--disable-dns",
        "--enable-sandbox", "--enable-seccomp", f"--ready-fd={ready_fd}", f"--exit-fd={exit_fd}",
    ]  # fmt: skip
    limit = ["prlimit", f"--nofile={nofile}:{nofile}", "--"] if nofile > 0 else []
    if mode != "root":
        argv.append("--userns-path={userns}")
        return [*limit, *_as_owner(pid, mode, uid, [*argv, str(pid), TAP])]
    return [*limit, *_masked([*argv, str(pid), TAP])]


#: Host files a root slirp4netns must not read (its sandbox keeps the host's /etc and /run).
_SECRETS = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers")
_MASK = (
    'if [ "$1" = run ]; then mount -t tmpfs -o size=64k,mode=755,nosuid,nodev,noexec '
    "structenv-nat /run || exit 125; fi; shift; "
    'for f in $1; do if [ -f "$f" ]; then mount --bind /dev/null "$f" || exit 125; fi; done; '
    'shift; exec "$@"'
)


def _masked(argv: list[str]) -> list[str]:
    """``argv`` (a root slirp4netns) in a mount namespace of its own where ``/run`` is an
    empty tmpfs and the host's password hashes are ``/dev/null``.

    slirp4netns's ``--enable-sandbox`` pivots into a root holding the host's ``/etc`` and
    ``/run`` read-only, and a read-only bind does not stop uid 0 from ``connect()``-ing to
    ``/run/docker.sock``: a libslirp bug would otherwise be one step from host root. ``/run``
    stays when ``/etc/resolv.conf`` lives there (systemd-resolved): DNS needs it.
    """
    run = "keep" if os.path.realpath("/etc/resolv.conf").startswith("/run/") else "run"
    return [
        "unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", _MASK, "sh",
        run, " ".join(_SECRETS), *argv,
    ]  # fmt: skip


async def read_child_pid(fd: int) -> int:
    """The sandbox's pid from bwrap's ``--info-fd`` (non-blocking ``fd``, read to EOF).

    Raises:
        EOFError: bwrap closed it without a pid (it failed to start).
    """
    data = bytearray()
    while len(data) <= _INFO_MAX:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            await anyio.wait_readable(fd)
            continue
        if not chunk:
            break
        data += chunk
    try:
        pid = json.loads(bytes(data))["child-pid"]
    except (ValueError, KeyError, TypeError):
        raise EOFError("bwrap reported no sandbox pid") from None
    if type(pid) is not int or pid <= 0:
        raise EOFError("bwrap reported no sandbox pid")
    return pid

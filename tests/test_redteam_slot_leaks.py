"""Attacks of a third red-team pass, from inside real slots (LocalBackend's bwrap, and
DockerBackend's where marked).

Each test performs the attack as a hostile command would and asserts the property the
threat model in docs/design.md promises. Worked on main at a25b64e and fixed: a host's slot
listening to the kernel's device events (uevents); a networked slot's closed connections
holding the host's ephemeral ports in TIME_WAIT (a strict xfail until each slot got a budget
of new connections, ``tests/test_sandbox_net_budget.py``). The Docker test held already but
was not tested elsewhere.
"""

from __future__ import annotations

import anyio
import pytest

from structenv import ExecRequest, SlotPool
from test_docker_support import docker_backend, docker_image
from test_sandbox_net_budget import (
    BURST,
    PATIENT_REMOTE,
    RATE,
    attack,
    conntrack_to,
    time_wait_to,
)
from test_sandbox_network import networked, remote_machine
from test_sandbox_support import local_backend

_ = docker_image

pytestmark = pytest.mark.anyio


def sh(command: str) -> ExecRequest:
    return ExecRequest(command, timeout=30)


_UEVENTS = r"""
import errno, socket
try:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 15)  # NETLINK_KOBJECT_UEVENT
    s.bind((0, 1))
    print("listening")
except OSError as exc:
    print(errno.errorcode[exc.errno])
# Other netlink families stay: the slot's own routes and addresses (ip, ss).
route = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
print("route")
"""


async def test_a_slot_cannot_listen_to_the_hosts_device_events() -> None:
    # The kernel broadcasts uevents to every network namespace its initial user namespace
    # owns, and a host's slot has one of those (root's bwrap makes no user namespace): the
    # slot's listener got "add@/devices/virtual/bdi/0:49" as another slot's reset mounted
    # its tmpfs, and would see each container's veth, block and USB device of the host.
    async with local_backend(slots_per_host=2) as backend:
        pool = SlotPool(backend)
        async with pool.slot() as slot:
            await slot.write_file("attack.py", _UEVENTS.encode())
            got = await slot.exec(sh("python3 attack.py"))
            assert got.stdout == b"EPERM\nroute\n", got


_SERVER_PATHS = r"""
import os, socket, stat
found = []
for top, dirs, files in os.walk("/"):
    if top == "/proc":
        dirs[:] = []
        continue
    for name in files + dirs:
        try:
            if stat.S_ISSOCK(os.lstat(os.path.join(top, name)).st_mode):
                found.append(os.path.join(top, name))
        except OSError:
            pass
print("sockets", found)
for path in ("/run/structenv", "/run/structenv-cgroup", "/.structenv-rootfs", "/sys/fs/cgroup"):
    print(path, os.path.exists(path))
client = socket.socket(socket.AF_UNIX)
try:
    client.connect("/run/structenv/sandbox.sock")
    print("connected")
except OSError as exc:
    print(exc.strerror)
"""


@pytest.mark.docker
async def test_a_docker_slot_reaches_neither_its_server_nor_its_cgroups(docker_image: str) -> None:
    # A sandbox container holds its server's unix socket (/run/structenv, bind-mounted from
    # the host: whoever connects drives every slot of the container), the slots' cgroup
    # tree (/run/structenv-cgroup, where a slot could raise its own limits) and the rootfs
    # cache. A slot's root is built from the container's /usr and /etc only: none of them,
    # and no socket at all, is in its file system.
    del docker_image
    async with docker_backend(slots_per_host=1) as backend, SlotPool(backend).slot() as slot:
        await slot.write_file("attack.py", _SERVER_PATHS.encode())
        got = await slot.exec(sh("python3 attack.py"))
        assert got.stdout.decode().splitlines() == [
            "sockets []",
            "/run/structenv False",
            "/run/structenv-cgroup False",
            "/.structenv-rootfs False",
            "/sys/fs/cgroup False",
            "No such file or directory",
        ], got


@pytest.mark.parametrize("slots", [1, 2])
async def test_a_networked_slot_cannot_use_up_the_hosts_ports_to_an_address(slots: int) -> None:
    # slirp4netns opens a host socket per connection of the slot and closes it when the
    # slot does: the host's side is then the one in TIME_WAIT (60 s), holding one of the
    # host's 28,232 ephemeral ports towards that address:port whatever the slot's nofile
    # (and, where the host tracks connections, a conntrack entry for 120 s). Measured before
    # the slot's budget of new connections: 3,000 connections in 10.6 s (3.2 s on another
    # run) left 3,000 such sockets on the host, so two slots cycling them could leave the
    # trainer no port to reach a server the slots reach too. Now each slot's connection
    # attempts beyond its budget (nftables in its own namespace) are dropped: the host's
    # TIME_WAIT sockets towards the address grow by at most burst + rate x time per slot.
    async with (
        remote_machine(PATIENT_REMOTE) as (address, port),
        networked(slots_per_host=slots) as backend,
    ):
        pool = SlotPool(backend)
        before, tracked = await time_wait_to(address), conntrack_to(address)
        start = anyio.current_time()

        async def cycle() -> None:
            async with pool.slot() as slot:
                await attack(slot, "tcp", address, port, 3.0)

        async with anyio.create_task_group() as tg:
            for _ in range(slots):
                tg.start_soon(cycle)
        grown = await time_wait_to(address) - before
        tracked = conntrack_to(address) - tracked
        elapsed = anyio.current_time() - start
    budget = slots * (BURST + RATE * (elapsed + 1))
    assert 0 < grown <= budget, (grown, elapsed)
    assert tracked <= budget, (tracked, elapsed)  # where the host tracks connections

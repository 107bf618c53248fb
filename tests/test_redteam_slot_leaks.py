"""Attacks of a third red-team pass, from inside real slots (LocalBackend's bwrap).

Each test performs the attack as a hostile command would and asserts the property the
threat model in docs/design.md promises. Worked on main at a25b64e and fixed: a host's slot
listening to the kernel's device events (uevents). The others held already but were not
tested elsewhere.
"""

from __future__ import annotations

import anyio
import pytest

from structenv import ExecRequest, SlotPool
from test_sandbox_support import local_backend

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

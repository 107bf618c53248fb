"""A hard reset that starts the new sandbox while the old one is torn down (the cold-slot
path of a server with its own mount namespace): the next lease sees nothing of the old
sandbox, limits always apply, and a reset cancelled at any await point leaks nothing.

Each case runs in a process of its own: the server must own a mount namespace (as ``python
-m structenv.sandbox`` does) for the overlapping reset to be used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import json, os, sys, threading
import anyio, anyio.lowlevel
from structenv import ExecRequest
from structenv.sandbox import SandboxServer, ServerConfig, _bwrap, _runtime
from structenv.sandbox._runtime import SlotBroken

backend, mode, step, workdir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
assert _bwrap.private_mounts(), "no mount namespace of its own"
PIDS = "/sys/fs/cgroup/pids/structenv"
# Unique to this process: other sessions on the machine may run the same tests meanwhile.
SLEEP = f"4321.{os.getpid()}"


def mounts_under(path):
    with open("/proc/self/mountinfo") as f:
        return sorted(ln.split()[4] for ln in f if ln.split()[4].startswith(path))


def sleepers():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read() == f"sleep\0{SLEEP}\0".encode():
                    found.append(pid)
        except OSError:
            pass
    return found


def cgroups(name):
    base = os.path.join(PIDS, name)
    if not os.path.isdir(base):
        return None
    return sorted(e for e in os.listdir(base) if os.path.isdir(os.path.join(base, e)))


async def run(rt, command):
    return (await rt.exec(ExecRequest(command, timeout=20))).stdout.decode()


# An event whose waiter sets `entered` first: the test cancels the reset right there.
class Spy:
    def __init__(self, entered):
        self.event, self.entered = anyio.Event(), entered

    async def wait(self):
        self.entered.set()
        await self.event.wait()

    def set(self):
        self.event.set()


# After a cancelled reset: the old sandboxes are reaped, nothing of theirs is left, and the
# next lease's reset gives a clean slot; then the slot's cgroups.
async def reap_then_next_lease(rt, out, name):
    with anyio.fail_after(20):
        await rt.reaped()
    out["sleepers_after_reap"] = sleepers()
    await rt.hard_reset()
    out["probe"] = (await run(rt, PROBE)).split()
    with anyio.fail_after(20):
        await rt.reaped()
    out["cgroups"] = cgroups(name)


DIRTY = (
    "echo d > /tmp/m; echo d > /dev/shm/m; echo d > /workspace/m; sleep " + SLEEP + " & "
    "mkfifo /tmp/up; python3 -c 'import os,time; os.openpty(); open(\"/tmp/up\", \"w\").close(); "
    "time.sleep(999)' & read x < /tmp/up"
)
PROBE = (
    "cat /tmp/m /dev/shm/m /workspace/m 2>/dev/null; ls /dev/pts | grep -v ptmx | wc -l; "
    "ps -e -o comm= | grep -c sleep; cat /proc/self/cgroup | grep pids"
)


async def main():
    name = "ovl" + str(os.getpid())
    server = SandboxServer(ServerConfig(slots=1, workdir=workdir, name=name,
                                        socket_path=os.path.join(workdir, "s.sock")))
    out = {}
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        (rt,) = server.slots
        out["overlap"] = rt.quota and rt.scratch == rt.ptys == "mount"
        await run(rt, DIRTY)
        if mode == "cancel":
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as inner:
                    inner.start_soon(rt.hard_reset)
                    for _ in range(step):
                        await anyio.lowlevel.checkpoint()
                    scope.cancel()
            out["state_after_cancel"] = rt.state
            try:
                await run(rt, "cat /tmp/m")
                out["handed_out"] = True
            except SlotBroken:
                out["handed_out"] = False
            with anyio.fail_after(20):
                await rt.reaped()
            out["sleepers_after_reap"] = sleepers()
            await rt.hard_reset()  # the next lease's reset
            out["probe"] = (await run(rt, PROBE)).split()
            out["pids_max"] = open(os.path.join(PIDS, rt._cgroup_now, "pids.max")).read()
            out["cgroups"] = cgroups(name)
        elif mode == "cancel_wait":
            # The next reset must wait for a cgroup still held by a dying sandbox: cancel
            # it right there.
            hold = [True]
            real_remove = _runtime.SlotCgroup.remove
            _runtime.SlotCgroup.remove = lambda self: False if hold[0] else real_remove(self)
            # Each reset retires a sandbox whose cgroup stays busy: after two, all three of
            # the slot's cgroups are held, and the third reset must wait for the oldest.
            await rt.hard_reset()
            await rt.hard_reset()
            await run(rt, DIRTY)
            out["held"] = len(rt._old)
            old = rt._old[0]
            entered = anyio.Event()

            class Reached:
                async def wait(self, done=old.done):
                    entered.set()
                    await done.wait()

                def set(self, done=old.done):
                    done.set()

            old.done = Reached()
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as inner:
                    inner.start_soon(rt.hard_reset)
                    await entered.wait()
                    scope.cancel()
            out["state_after_cancel"] = rt.state
            hold[0] = False
            await reap_then_next_lease(rt, out, name)
        elif mode == "cancel_dead":
            # The new sandbox is up and waits for the old one's processes to be gone before
            # it is handed out: cancel it right there.
            gate, entered = anyio.Event(), anyio.Event()
            real_reap, real_old = _runtime.SlotRuntime._reap, _runtime._Old

            async def gated(self, old):
                await gate.wait()
                await real_reap(self, old)

            def make_old(*args):
                old = real_old(*args)
                old.dead = Spy(entered)
                return old

            _runtime.SlotRuntime._reap = gated
            _runtime._Old = make_old
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as inner:
                    inner.start_soon(rt.hard_reset)
                    await entered.wait()
                    scope.cancel()
            out["state_after_cancel"] = rt.state
            gate.set()
            await reap_then_next_lease(rt, out, name)
        elif mode == "cancel_join":
            # The new sandbox is spawned and the server moves it into its cgroups from a
            # thread (SlotCgroup.join): cancel the reset while it waits for that move.
            gate, entered = threading.Event(), anyio.Event()
            real_join, real_joined = _bwrap.SlotCgroup.join, _runtime._Joined

            def gated(self, pid, parent):
                gate.wait(20)
                real_join(self, pid, parent)

            def make_joined():
                joined = real_joined()
                joined.done = Spy(entered)
                return joined

            _bwrap.SlotCgroup.join, _runtime._Joined = gated, make_joined
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as inner:
                    inner.start_soon(rt.hard_reset)
                    await entered.wait()
                    scope.cancel()
                    gate.set()
            out["state_after_cancel"] = rt.state
            _bwrap.SlotCgroup.join, _runtime._Joined = real_join, real_joined
            await reap_then_next_lease(rt, out, name)
        elif mode == "twice":
            # Two resets back to back: the second takes a cgroup no dying sandbox holds.
            await rt.hard_reset()
            await run(rt, DIRTY)
            await rt.hard_reset()
            out["probe"] = (await run(rt, PROBE)).split()
            with anyio.fail_after(20):
                await rt.reaped()
            out["cgroups"] = cgroups(name)
        elif mode == "shutdown":
            # The server stops while the old sandbox is still being reaped.
            await rt.hard_reset()
            out["pending"] = len(rt._old)
        tg.cancel_scope.cancel()
    out["mounts_after_stop"] = mounts_under(workdir)
    out["sleepers_after_stop"] = sleepers()
    out["cgroups_after_stop"] = cgroups(name)
    print(json.dumps(out))


anyio.run(main, backend=backend)
"""


def _run(tmp_path: object, anyio_backend: str, mode: str, step: int = 0) -> dict[str, object]:
    workdir = os.path.join(str(tmp_path), "host")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, anyio_backend, mode, str(step), workdir],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["overlap"] is True, out
    assert out["mounts_after_stop"] == [] and out["sleepers_after_stop"] == [], out
    assert out["cgroups_after_stop"] is None, out
    return out


def _clean(probe: object) -> None:
    # No file of the old lease in /workspace, /tmp, /dev/shm; no pty of its devpts; no
    # process of its PID namespace; a cgroup of the slot's own.
    assert isinstance(probe, list) and probe[:2] == ["0", "0"], probe
    assert ":pids:/" in probe[2], probe


@pytest.mark.parametrize("step", range(12))
def test_overlapped_reset_cancelled_at_each_await_point_leaks_nothing(
    tmp_path: object, step: int, anyio_backend: str
) -> None:
    out = _run(tmp_path, anyio_backend, "cancel", step)
    if out["state_after_cancel"] != "ready":
        assert out["handed_out"] is False, out
    assert out["sleepers_after_reap"] == [], out
    _clean(out["probe"])
    assert out["pids_max"] == "256\n", out  # the new cgroup's limit is applied
    # The old sandbox's cgroup is gone once reaped; only the live one is left.
    cgroups = out["cgroups"]
    assert isinstance(cgroups, list) and len(cgroups) == 1, out


def test_reset_cancelled_while_waiting_for_a_dying_sandboxs_cgroup_leaks_nothing(
    tmp_path: object, anyio_backend: str
) -> None:
    out = _run(tmp_path, anyio_backend, "cancel_wait")
    assert out["held"] == 2, out
    assert out["state_after_cancel"] != "ready", out
    assert out["sleepers_after_reap"] == [], out
    _clean(out["probe"])
    cgroups = out["cgroups"]
    assert isinstance(cgroups, list) and len(cgroups) == 1, out


def test_reset_cancelled_while_the_old_sandbox_dies_leaks_nothing(
    tmp_path: object, anyio_backend: str
) -> None:
    out = _run(tmp_path, anyio_backend, "cancel_dead")
    assert out["state_after_cancel"] != "ready", out
    assert out["sleepers_after_reap"] == [], out
    _clean(out["probe"])
    cgroups = out["cgroups"]
    assert isinstance(cgroups, list) and len(cgroups) == 1, out


def test_reset_cancelled_while_the_sandbox_joins_its_cgroups_leaks_nothing(
    tmp_path: object, anyio_backend: str
) -> None:
    out = _run(tmp_path, anyio_backend, "cancel_join")
    assert out["state_after_cancel"] != "ready", out
    assert out["sleepers_after_reap"] == [], out
    _clean(out["probe"])
    cgroups = out["cgroups"]
    assert isinstance(cgroups, list) and len(cgroups) == 1, out


def test_back_to_back_resets_never_share_a_cgroup(tmp_path: object, anyio_backend: str) -> None:
    out = _run(tmp_path, anyio_backend, "twice")
    _clean(out["probe"])
    cgroups = out["cgroups"]
    assert isinstance(cgroups, list) and len(cgroups) == 1, out


def test_server_stopping_while_a_retired_sandbox_dies_leaks_nothing(
    tmp_path: object, anyio_backend: str
) -> None:
    out = _run(tmp_path, anyio_backend, "shutdown")
    assert out["pending"] in (0, 1), out

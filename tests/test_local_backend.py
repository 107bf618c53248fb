"""LocalBackend: the contract, supervision, no orphans, cancellation at every await point."""

from __future__ import annotations

import os
import signal

import anyio
import pytest

from structenv import ExecRequest, SlotBrokenError
from structenv.abc import Slot
from structenv.backends import LocalBackend
from structenv.testing import check_backend, child_processes
from test_sandbox_support import (
    find_processes,
    local_backend,
    make_fifo,
    open_pidfds,
    wait_all_dead,
    wait_fifo,
)

pytestmark = pytest.mark.anyio


async def test_contract() -> None:
    passed = await check_backend(lambda: local_backend(), deadline=60)
    assert "cancelled_exec" in passed and "batch_streams" in passed


async def test_slots_spread_across_hosts() -> None:
    async with local_backend(hosts=2, slots_per_host=2) as b:
        a, c = await b.acquire_slot(), await b.acquire_slot()
        assert a.host_id != c.host_id
        assert b.statistics().hosts == 2 and b.capacity == 4
        for s in (a, c):
            await b.release_slot(s, reusable=True)


async def test_host_crash_mid_command() -> None:
    async with local_backend(hosts=1, slots_per_host=2) as b:
        slot = await b.acquire_slot()
        other = await b.acquire_slot()
        fifo = make_fifo(b, slot)
        (host_pid,) = b.host_pids().values()
        sandbox_fds: list[int] = []
        errors: list[BaseException] = []

        async def run() -> None:
            try:
                await slot.exec(
                    ExecRequest("sleep 1000 & echo go > ready; sleep 1001", timeout=600)
                )
            except SlotBrokenError as exc:
                errors.append(exc)

        with anyio.fail_after(10):  # the caller's deadline: the error must come well before
            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await wait_fifo(fifo)
                sandbox_fds = open_pidfds(find_processes(r"^sleep 100[01]$"))
                os.kill(host_pid, signal.SIGKILL)
        assert len(errors) == 1
        # The host's sandboxes die with it (--die-with-parent, PID namespace teardown).
        await wait_all_dead(sandbox_fds, within=10)
        with pytest.raises(SlotBrokenError):
            await other.exec(ExecRequest("true"))
        for s in (slot, other):
            await b.release_slot(s, reusable=False)
        # A replacement host comes up; the dead host's slots are never handed out again.
        with anyio.fail_after(30):
            fresh = await b.acquire_slot()
        assert fresh.host_id != slot.host_id
        assert (await fresh.exec(ExecRequest("echo alive"))).stdout == b"alive\n"
        stats = b.statistics()
        assert stats.hosts_replaced == 1 and stats.hosts == 1 and stats.leased == 1
        await b.release_slot(fresh, reusable=True)


async def test_no_orphans_after_scope() -> None:
    before = set(child_processes())
    async with local_backend(hosts=2, slots_per_host=2) as b:
        slots = [await b.acquire_slot() for _ in range(4)]
        for s in slots:
            await s.exec(ExecRequest("sleep 1000 & setsid sleep 1001 & (setsid sleep 1002 &)"))
        await slots[0].terminal("start")  # type: ignore[attr-defined]
        tree = set(child_processes()) - before
        # Hosts, bwraps, workers, sleeps and a tmux server, all below this process.
        assert len(tree) >= 2 + 4 * 2 + 4 * 3
        fds = open_pidfds(sorted(tree) + find_processes(r"^sleep 100[0-2]$"))
        hosts = list(b.host_pids())
        for h in hosts:
            assert await anyio.Path(f"/sys/fs/cgroup/pids/structenv/{h}/0").is_dir()
        # Leave the scope with the slots still leased: the backend cleans up regardless.
    await wait_all_dead(fds, within=5)
    assert set(child_processes()) - before == set()
    assert find_processes(r"^sleep 100[0-2]$") == []
    assert await anyio.to_thread.run_sync(_processes_mentioning, hosts) == []
    for h in hosts:
        assert not await anyio.Path(f"/sys/fs/cgroup/pids/structenv/{h}").exists()


async def test_cancel_exec_at_every_point() -> None:
    """Cancel an exec after increasing delays; the slot is then destroyed, nothing leaks."""
    async with local_backend(hosts=1, slots_per_host=1) as b:
        for delay in (0, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.02, 0.1):
            slot = await b.acquire_slot()
            with anyio.move_on_after(delay):
                await slot.exec(ExecRequest("sleep 1000 & sleep 1001", timeout=60))
            slot.reusable = False
            await b.release_slot(slot, reusable=False)
            assert b.statistics().leased == 0
            assert find_processes(r"^sleep 100[01]$") == []
        stats = b.statistics()
        assert stats.acquires == stats.releases == 8 and stats.capacity == 1


async def test_cancel_release_at_every_point() -> None:
    """A reset cut short by the pool's deadline never hands out a dirty slot."""
    async with local_backend(hosts=1, slots_per_host=1) as b:
        for delay in (0, 0.0005, 0.002, 0.01, 0.05):
            slot = await b.acquire_slot()
            await slot.write_file("dirty", b"x")
            await slot.exec(ExecRequest("sleep 1000 &"))
            with anyio.CancelScope() as scope:
                scope.deadline = anyio.current_time() + delay
                await b.release_slot(slot, reusable=True)
            assert b.statistics().leased == 0
            with anyio.fail_after(30):
                again = await b.acquire_slot()  # waits for the rebuild if one is running
            listing = await again.exec(ExecRequest("ls -A; pgrep -c sleep"))
            assert listing.stdout == b"0\n", (delay, listing)
            await b.release_slot(again, reusable=True)
        stats = b.statistics()
        assert stats.acquires == stats.releases


async def test_cancelled_acquire_leases_nothing() -> None:
    async with local_backend(hosts=1, slots_per_host=1) as b:
        held = await b.acquire_slot()
        for delay in (0, 0.001, 0.05):
            with anyio.move_on_after(delay) as scope:
                await b.acquire_slot()
            assert scope.cancelled_caught
            assert b.statistics().leased == 1
        # A waiter is woken by a release (event-driven, no polling).
        got: list[Slot] = []
        async with anyio.create_task_group() as tg:

            async def waiter() -> None:
                got.append(await b.acquire_slot())

            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            await b.release_slot(held, reusable=True)
        assert len(got) == 1
        await b.release_slot(got[0], reusable=True)
        assert b.statistics().leased == 0


async def test_aclose_is_idempotent_and_final() -> None:
    b = local_backend()
    async with b:
        slot = await b.acquire_slot()
        await b.aclose()
        await b.aclose()
        with pytest.raises(SlotBrokenError):
            await slot.exec(ExecRequest("true"))
    assert isinstance(b, LocalBackend)


def _processes_mentioning(names: list[str]) -> list[int]:
    """Any process on the machine whose command line mentions one of our host names."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().decode(errors="replace")
            except OSError:
                continue
            if any(name in cmd for name in names):
                found.append(int(entry))
    return found

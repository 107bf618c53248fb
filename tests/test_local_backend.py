"""LocalBackend: the contract, supervision, no orphans, cancellation at every await point, and
the reaping of dead runs' work dirs at start."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from structenv import ExecRequest, ExecResult, SlotBrokenError, _emergency
from structenv.abc import Slot
from structenv.backends import LocalBackend, _local
from structenv.backends._ownership import (
    LABEL_OWNER_PID,
    LABEL_OWNER_START,
    owner_labels,
    process_start_time,
)
from structenv.sandbox._files import remove_tree
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
    # The body's error comes out as it is, not wrapped by the backend's task group.
    with pytest.raises(LookupError, match="the body's"):
        async with local_backend(hosts=2, slots_per_host=2) as b:
            a, c = await b.acquire_slot(), await b.acquire_slot()
            assert a.host_id != c.host_id
            assert b.statistics().hosts == 2 and b.capacity == 4
            # One exec shape: the batcher groups calls per host; the backend does not regroup.
            got: dict[int, ExecResult | Exception] = {}
            with pytest.raises(ValueError, match="one host"):
                await b.exec_batch(
                    [(a, ExecRequest("true")), (c, ExecRequest("true"))], got.__setitem__
                )
            assert got == {}
            for s in (a, c):
                await b.release_slot(s, reusable=True)
            raise LookupError("the body's error")


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


# -- start-up reaping of dead runs' work dirs -------------------------------------------------


def _run_dir(base: Path, name: str, labels: dict[str, str] | None) -> Path:
    """A run's work dir as LocalBackend leaves it: a host's workspace and the owner file."""
    path = base / name
    (path / "se1-1-abcd" / "slot-0" / "deep").mkdir(parents=True)
    (path / "se1-1-abcd" / "slot-0" / "deep" / "file").write_text("data")
    (path / "se1-1-abcd" / "slot-0" / "deep").chmod(0o500)  # slot-written: any mode
    if labels is not None:
        (path / _local.OWNER_FILE).write_text(json.dumps(labels))
    return path


def _entries(path: Path) -> set[Path]:
    return set(path.iterdir())


async def _dead_labels(run_id: str) -> dict[str, str]:
    """Owner labels naming a process that has exited (its pid and start time, this host)."""
    async with await anyio.open_process(["cat"]) as proc:
        start = process_start_time(proc.pid)
    assert start is not None and process_start_time(proc.pid) is None
    labels = owner_labels(backend="local", run_id=run_id, pool="local")
    labels.update({LABEL_OWNER_PID: str(proc.pid), LABEL_OWNER_START: start})
    return labels


@pytest.mark.parametrize("where", ["workdir", "default"])
async def test_start_removes_dead_runs_work_dirs_never_a_live_one(
    tmp_path: Path, where: str
) -> None:
    if where == "workdir":
        base, prefix, options = tmp_path, "run-", {"workdir": str(tmp_path)}
    else:  # /var/tmp/structenv-<pid>-*, where every LocalBackend without workdir= goes
        base, prefix, options = Path(_local.default_base() or tempfile.gettempdir()), "", {}
    tag = os.urandom(4).hex()
    dead_labels = await _dead_labels(f"dead-{tag}")
    dead = _run_dir(base, f"{prefix}structenv-{dead_labels[LABEL_OWNER_PID]}-{tag}", dead_labels)
    # This process is alive: its run's directory is never touched, nor is one without an
    # owner file (not structenv's, or a run killed while creating it).
    live = _run_dir(
        base,
        f"{prefix}structenv-{os.getpid()}-live-{tag}",
        owner_labels(backend="local", run_id="live", pool="local"),
    )
    stranger = _run_dir(base, f"{prefix}structenv-1-stranger-{tag}", None)
    try:
        async with local_backend(hosts=1, slots_per_host=1, **options) as b:
            assert not dead.exists()
            assert live.is_dir() and stranger.is_dir()
            slot = await b.acquire_slot()
            assert (await slot.exec(ExecRequest("echo ok"))).stdout == b"ok\n"
            await b.release_slot(slot, reusable=True)
        assert live.is_dir() and stranger.is_dir()
        if where == "workdir":
            assert _entries(tmp_path) == {live, stranger}  # its own dir removed on close
    finally:
        for path in (live, stranger):
            (path / "se1-1-abcd" / "slot-0" / "deep").chmod(0o700)
            remove_tree(str(path), keep_root=False)


async def test_start_cancelled_while_reaping_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while the start-up reap runs (held in its thread until the test cancels):
    no work dir is made, no host started, no emergency cleanup left registered."""
    started, release = threading.Event(), threading.Event()
    real = _local.reap_workdirs

    def held(**kwargs: Any) -> Any:
        started.set()
        release.wait(60)
        return real(**kwargs)

    monkeypatch.setattr(_local, "reap_workdirs", held)
    before = set(child_processes())
    registered = dict(_emergency._callbacks)
    b = local_backend(hosts=1, slots_per_host=1, workdir=str(tmp_path / "work"))
    entered: list[bool] = []

    async def start() -> None:
        async with b:
            entered.append(True)

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(start)
            assert await anyio.to_thread.run_sync(started.wait, 60), "the reap never started"
            scope.cancel()
            release.set()
    assert scope.cancelled_caught and not entered
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())
    assert b.statistics().hosts == 0 and b.statistics().leased == 0
    assert set(child_processes()) == before
    assert _emergency._callbacks == registered

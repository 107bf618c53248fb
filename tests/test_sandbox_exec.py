"""Command execution in real bwrap slots: data round trips, caps, deadlines, cancellation."""

from __future__ import annotations

import anyio
import pytest

from structenv import ExecRequest, ExecResult, StaleLeaseError
from structenv.backends import LocalBackend
from structenv.sandbox._client import RemoteSlot
from test_sandbox_support import (
    backend,
    find_processes,
    make_fifo,
    open_pidfds,
    wait_all_dead,
    wait_fifo,
)

pytestmark = pytest.mark.anyio
__all__ = ["backend"]

#: Background children of every flavour: plain ``&``, ``setsid``, and a double fork.
ESCAPERS = (
    "sleep 1001 & setsid sleep 1002 & (setsid sh -c 'sleep 1003 &') ; "
    "nohup sleep 1004 >/dev/null 2>&1 & sleep 1000 & "
    # Signal readiness only once all five have exec'd (no race with the host-side scan).
    "until [ $(pgrep -c -x sleep) -ge 5 ]; do :; done; echo go > ready; wait"
)


async def test_binary_round_trip(backend: LocalBackend) -> None:
    slot = await backend.acquire_slot()
    payload = bytes(range(256)) + b"\xc3\x28\x00\xff\xfe"
    result = await slot.exec(ExecRequest("cat; cat >&2 <<< x; exit 7", stdin=payload))
    assert result.exit_code == 7
    assert result.stdout == payload
    assert result.stderr == b"x\n"
    assert result.sandboxed and result.error is None
    await backend.release_slot(slot, reusable=True)


async def test_env_is_scrubbed(backend: LocalBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    slot = await backend.acquire_slot()
    result = await slot.exec(ExecRequest("env", env={"MINE": "yes"}))
    names = {line.split(b"=", 1)[0] for line in result.stdout.splitlines()}
    assert b"MINE" in names
    # Nothing from the host's environment: only the sandbox's own minimal set.
    allowed = {b"PATH", b"HOME", b"LANG", b"TERM", b"SHELL", b"USER", b"PWD", b"SHLVL", b"_"}
    assert names - allowed - {b"MINE", b"STRUCTENV_EXEC_TAG"} == set()
    await backend.release_slot(slot, reusable=True)


async def test_output_cap_keeps_server_responsive(backend: LocalBackend) -> None:
    big, small = await backend.acquire_slot(), await backend.acquire_slot()
    fast: list[float] = []

    async def poke() -> None:
        # While 100 MB stream through the other slot, this one keeps answering.
        for _ in range(5):
            start = anyio.current_time()
            assert (await small.exec(ExecRequest("echo hi"))).stdout == b"hi\n"
            fast.append(anyio.current_time() - start)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(poke)
            result = await big.exec(
                ExecRequest("head -c 100000000 /dev/zero; echo done >&2", max_output=1 << 20)
            )
    assert result.exit_code == 0
    assert len(result.stdout) == 1 << 20 and result.stdout_truncated
    assert result.stderr == b"done\n" and not result.stderr_truncated
    assert max(fast) < 2.0
    for s in (big, small):
        await backend.release_slot(s, reusable=True)


async def test_deadline_kills_whole_tree(backend: LocalBackend) -> None:
    slot = await backend.acquire_slot()
    fifo = make_fifo(backend, slot)
    result: list[ExecResult] = []

    async def run() -> None:
        req = ExecRequest(ESCAPERS, timeout=3)
        result.append(await slot.exec(req))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await wait_fifo(fifo)
        pids = find_processes(r"^sleep 100[0-4]$")
        assert len(pids) == 5, pids
        pidfds = open_pidfds(pids)
    assert result[0].timed_out and result[0].exit_code is None
    await wait_all_dead(pidfds, within=1.0)  # dead before the result was sent
    assert find_processes(r"^sleep 100[0-4]$") == []
    # The slot remains usable after a deadline (the executor keeps it).
    again = await slot.exec(ExecRequest("ps -e -o comm="))
    assert sorted(again.stdout.split()) == [b"ps", b"python3.11"]
    await backend.release_slot(slot, reusable=True)


async def test_cancelled_exec_kills_whole_tree(backend: LocalBackend) -> None:
    slot = await backend.acquire_slot()
    fifo = make_fifo(backend, slot)
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            await slot.exec(ExecRequest(ESCAPERS, timeout=300))

        tg.start_soon(run)
        await wait_fifo(fifo)
        pidfds = open_pidfds(find_processes(r"^sleep 10\d\d$"))
        assert len(pidfds) == 5
        tg.cancel_scope.cancel()
    slot.reusable = False
    # Client disconnect is the cancellation signal: the host kills the tree on its own.
    await wait_all_dead(pidfds, within=5.0)
    assert find_processes(r"^sleep 100[0-4]$") == []
    await backend.release_slot(slot, reusable=False)
    assert backend.statistics().leased == 0


async def test_stale_lease_refused(backend: LocalBackend) -> None:
    slot = await backend.acquire_slot()
    await backend.release_slot(slot, reusable=True)
    with pytest.raises(StaleLeaseError):
        await slot.exec(ExecRequest("true"))
    with pytest.raises(StaleLeaseError):
        await slot.reset()
    with pytest.raises(StaleLeaseError):
        await slot.read_file("x")
    # The new owner is untouched.
    fresh = await backend.acquire_slot()
    assert (await fresh.exec(ExecRequest("echo ok"))).stdout == b"ok\n"
    await backend.release_slot(fresh, reusable=True)


async def test_reset_leaves_nothing(backend: LocalBackend) -> None:
    slot = await backend.acquire_slot()
    # A fresh slot's listing: empty, apart from read-only host binds (an editable install's
    # source under /tmp, say, when the checkout lives there).
    fresh = await slot.exec(ExecRequest("ls -A /workspace /tmp /dev/shm"))
    await slot.exec(
        ExecRequest(
            "mkdir -p d/locked && touch d/locked/f && chmod 000 d/locked; "
            "echo x > /tmp/t; echo y > /dev/shm/s; sleep 1000 & setsid sleep 1001 &"
        )
    )
    assert isinstance(slot, RemoteSlot)
    await slot.terminal("start")
    await slot.reset()
    result = await slot.exec(ExecRequest("ls -A /workspace /tmp /dev/shm"))
    assert result.stdout == fresh.stdout
    assert (
        b"t\n" not in result.stdout and b"s\n" not in result.stdout and b"d\n" not in result.stdout
    )
    procs = await slot.exec(ExecRequest("ps -e -o comm="))
    assert sorted(procs.stdout.split()) == [b"ps", b"python3.11"]
    await backend.release_slot(slot, reusable=True)


async def test_exec_batch_streams_results(backend: LocalBackend) -> None:
    a, b = await backend.acquire_slot(), await backend.acquire_slot()
    order: list[int] = []
    fast_done = anyio.Event()

    def on_result(i: int, value: ExecResult | Exception) -> None:
        assert isinstance(value, ExecResult)
        order.append(i)
        if i == 1:
            fast_done.set()

    async with anyio.create_task_group() as tg:
        calls = [(a, ExecRequest("sleep 2; echo slow")), (b, ExecRequest("echo fast"))]
        calls.append((a, ExecRequest("exit 3")))
        tg.start_soon(backend.exec_batch, calls, on_result)
        with anyio.fail_after(1.5):
            await fast_done.wait()  # arrived while the slow call still runs
        assert 0 not in order
    assert order[-1] == 0 and sorted(order) == [0, 1, 2]
    for s in (a, b):
        await backend.release_slot(s, reusable=True)


async def test_unsimple_commands_use_bash(backend: LocalBackend) -> None:
    slot = await backend.acquire_slot()
    cases = {
        "/bin/echo a   b": b"a b\n",
        "echo $((1+2))": b"3\n",
        "X=1 printenv X": b"1\n",
        "no-such-command": b"",
    }
    for command, expected in cases.items():
        result = await slot.exec(ExecRequest(command))
        assert result.stdout == expected, command
    missing = await slot.exec(ExecRequest("no-such-command"))
    assert missing.exit_code == 127 and b"not found" in missing.stderr
    assert (await slot.exec(ExecRequest("pwd", cwd="sub"))).error is not None
    await slot.write_file("sub/x", b"")
    assert (await slot.exec(ExecRequest("pwd", cwd="sub"))).stdout == b"/workspace/sub\n"
    await backend.release_slot(slot, reusable=True)


async def test_output_around_exit(backend: LocalBackend) -> None:
    """Output is complete however it ends: more than a pipe buffer, after stdout closed early,
    from a background child within the drain window, or endless from a background child."""
    slot = await backend.acquire_slot()
    big = await slot.exec(ExecRequest("head -c 300000 /dev/zero"))  # runs without bash
    assert big.stdout == bytes(300000) and not big.stdout_truncated
    early = await slot.exec(ExecRequest("exec >&-; sleep 0.1; echo err >&2; exit 3"))
    assert (early.exit_code, early.stdout, early.stderr) == (3, b"", b"err\n")
    late = await slot.exec(ExecRequest("(sleep 0.01; echo late) & echo early"))
    assert late.stdout == b"early\nlate\n"
    with anyio.fail_after(5):
        held = await slot.exec(ExecRequest("sleep 1000 & echo done"))
        endless = await slot.exec(ExecRequest("yes & exit 4", max_output=1000))
    assert held.stdout == b"done\n" and held.exit_code == 0
    assert endless.exit_code == 4 and endless.stdout_truncated
    assert endless.stdout == b"y\n" * 500
    await backend.release_slot(slot, reusable=True)


async def test_orphans_are_reaped(backend: LocalBackend) -> None:
    """Orphans reparented to the slot's PID 1 are reaped when they exit, whether a command is
    running at the time or the worker is idle: no zombies pile up in the slot."""
    slot = await backend.acquire_slot()
    quiet = ">/dev/null 2>&1"
    orphans = f"(sleep 0.1 {quiet} &); (setsid sleep 0.1 {quiet} &)"
    during = await slot.exec(ExecRequest(f"{orphans}; sleep 0.5; ps -e -o stat=,comm="))
    await slot.exec(ExecRequest(orphans))
    await anyio.sleep(0.5)  # an idle period: they exit while the worker waits for requests
    after = await slot.exec(ExecRequest("ps -e -o stat=,comm="))
    for result in (during, after):
        states = [line.split()[0] for line in result.stdout.splitlines()]
        assert states and not any(s.startswith(b"Z") for s in states), result.stdout
    comms = [line.split()[1] for line in after.stdout.splitlines()]
    assert len(comms) == 2 and b"ps" in comms, comms  # the worker (PID 1) and ps: no orphan
    await backend.release_slot(slot, reusable=True)


async def test_the_fast_path_is_invisible_to_the_program(backend: LocalBackend) -> None:
    # A plain command skips bash; the program must not be able to tell (its argv[0] is the
    # word as typed, as bash passes it), so the model sees the same error text either way.
    slot = await backend.acquire_slot()
    fast = await slot.exec(ExecRequest("cat missing"))
    shell = await slot.exec(ExecRequest("cat missing; true"))
    assert fast.stderr == shell.stderr == b"cat: missing: No such file or directory\n", fast
    ps = await slot.exec(ExecRequest("sleep 0"))  # found on PATH, spawned directly
    assert ps.exit_code == 0 and ps.error is None
    await backend.release_slot(slot, reusable=True)

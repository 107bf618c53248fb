"""DockerBackend faults against the real engine: a container killed mid-command, an owner
process killed with SIGKILL and the reaper (at start-up and ``structenv reap``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import anyio
import pytest

from structenv import ExecRequest, ExecResult, ExecutorConfig, SlotBrokenError, ToolExecutor
from structenv._process import kill_child
from structenv._reap import main as reap_main
from structenv.backends._docker import reap_containers
from structenv.backends._docker_reap import docker_cgroup_names
from test_docker_support import (
    containers_of,
    docker_backend,
    docker_image,
    new_run_id,
    sdk,
    wait_until,
)

_ = docker_image
pytestmark = [pytest.mark.anyio, pytest.mark.docker, pytest.mark.usefixtures("docker_image")]


async def _wait_for_process(docker_id: str, name: str) -> None:
    """Wait until ``name`` runs in the container (``docker top``), with a deadline."""

    def top() -> str:
        client = sdk()
        try:
            return str(client.api.top(docker_id, ps_args="-eo pid,args"))
        finally:
            client.close()

    async def running() -> bool:
        return name in await anyio.to_thread.run_sync(top)

    await wait_until(running, deadline=15)


async def _docker_kill(docker_id: str) -> None:
    def kill() -> None:
        client = sdk()
        try:
            client.api.kill(docker_id)
        finally:
            client.close()

    await anyio.to_thread.run_sync(kill)


async def test_killed_container_mid_command() -> None:
    run_id = new_run_id()
    async with docker_backend(run_id=run_id, slots_per_host=2) as b:
        config = ExecutorConfig(trajectory_timeout=60, tool_timeout=600)
        async with ToolExecutor(b, config=config) as executor:
            ((victim_host, victim_id),) = b.container_ids().items()
            victim_slots: set[str] = set()
            outcome: list[tuple[ExecResult, float]] = []

            async def doomed() -> None:
                async with executor.trajectory("doomed") as traj:
                    victim_slots.add(traj.slot.id)
                    start = anyio.current_time()
                    result = await traj.exec(ExecRequest("sleep 1000", timeout=600))
                    outcome.append((result, anyio.current_time() - start))

            with anyio.fail_after(20):  # the trajectory's deadline: the error comes well before
                async with anyio.create_task_group() as tg:
                    tg.start_soon(doomed)
                    await _wait_for_process(victim_id, "sleep 1000")
                    await _docker_kill(victim_id)
            ((result, took),) = outcome
            assert result.error is not None and result.exit_code is None, result
            assert took < 10

            # A replacement container serves new trajectories; the dead one's slots are gone.
            async def replaced() -> bool:
                ids = b.container_ids()
                return bool(ids) and victim_host not in ids

            await wait_until(replaced, deadline=30)
            for n in range(3):
                async with executor.trajectory(f"after-{n}") as traj:
                    assert traj.slot.host_id != victim_host
                    assert traj.slot.id not in victim_slots
                    r = await traj.exec(ExecRequest("echo replaced", timeout=10))
                    assert r.exit_code == 0 and r.stdout == b"replaced\n"
        stats = b.statistics()
        assert stats.hosts_replaced == 1 and stats.leased == 0
        assert stats.acquires == stats.releases == 4
        assert victim_id not in {c.id for c in containers_of(run_id)}
    assert containers_of(run_id) == []


_OWNER = textwrap.dedent(
    """
    import sys, anyio
    sys.path.insert(0, {tests!r})
    from test_docker_support import docker_backend

    async def main():
        async with docker_backend(
            run_id={run_id!r}, pool={pool!r}, reap_on_start=False, exit_with_owner={switch!r}
        ) as b:
            slot = await b.acquire_slot()
            await slot.exec(__import__("structenv").ExecRequest("echo up"))
            print("READY", flush=True)
            await anyio.sleep_forever()

    anyio.run(main)
    """
)


_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


#: A hang guard for waits on the engine, not an expectation of how long they take: on a loaded
#: 2-core machine a fresh owner process (interpreter, imports, a container) can take minutes.
#: Every wait below ends as soon as its condition holds, or fails loudly when it cannot.
_HANG_GUARD = 600


async def _spawn_owner(run_id: str, pool: str, switch: bool) -> anyio.abc.Process:
    """An owner process with one container of its run, once it says READY (its stderr goes to
    the test's captured output; an owner that dies first fails the test with its status)."""
    code = _OWNER.format(tests=_TESTS_DIR, run_id=run_id, pool=pool, switch=switch)
    proc = await anyio.open_process([sys.executable, "-c", code], stderr=None)
    assert proc.stdout is not None
    with anyio.fail_after(_HANG_GUARD):
        buf = b""
        while b"READY" not in buf:
            try:
                chunk = await proc.stdout.receive()
            except anyio.EndOfStream:
                status = await proc.wait()
                await proc.aclose()
                raise AssertionError(f"owner of {run_id} exited ({status}) before READY") from None
            buf += chunk
    return proc


async def test_sigkilled_owner_is_reaped_live_runs_untouched() -> None:
    live_run = new_run_id("live")
    dead_a, dead_b = new_run_id("deadA"), new_run_id("deadB")
    pool_a = f"pool-{dead_a}"
    async with docker_backend(run_id=live_run, reap_on_start=False) as live:
        live_slot = await live.acquire_slot()
        owners: list[anyio.abc.Process] = []
        async with anyio.create_task_group() as tg:

            async def spawn(run_id: str, pool: str, switch: bool) -> None:
                owners.append(await _spawn_owner(run_id, pool, switch))

            # A's containers stop with their owner (the stdin switch); B's keep running, as
            # when the switch cannot work (daemon restart): only the reaper can remove them.
            tg.start_soon(spawn, dead_a, pool_a, True)
            tg.start_soon(spawn, dead_b, "pytest", False)
        try:
            assert containers_of(dead_a) and containers_of(dead_b)
        finally:
            for proc in owners:
                kill_child(proc)  # SIGKILL, as the OOM killer would
                await proc.wait()
                await proc.aclose()

        async def a_stopped() -> bool:
            return [c.status for c in containers_of(dead_a)] == ["exited"]

        await wait_until(a_stopped, deadline=_HANG_GUARD)  # the stdin switch stops it
        assert [c.status for c in containers_of(dead_b)] == ["running"]

        # `structenv reap --dry-run` reports, removes nothing; live containers are "alive".
        report = await anyio.to_thread.run_sync(lambda: reap_containers(dry_run=True))
        assert report.dry_run and any(dead_a in r for r in report.removed)
        assert not any(live_run in r for r in report.removed)
        assert any(live_run in r for r in report.alive)
        assert len(containers_of(dead_a)) == 1

        # `structenv reap --pool P` removes only that pool's dead run.
        code = await anyio.to_thread.run_sync(lambda: reap_main(["--pool", pool_a]))
        assert code == 0
        assert containers_of(dead_a) == [] and len(containers_of(dead_b)) == 1

        # A new run reaps the rest at start-up; the live backend is untouched and serving.
        async with docker_backend(reap_on_start=True):
            assert containers_of(dead_b) == []
        assert len(containers_of(live_run)) == 1
        r = await live_slot.exec(ExecRequest("echo still-here", timeout=10))
        assert r.exit_code == 0 and r.stdout == b"still-here\n"
        await live.release_slot(live_slot, reusable=True)
    assert containers_of(live_run) == []


async def test_hung_container_is_declared_dead_and_in_flight_calls_fail() -> None:
    """A paused container keeps its connections open: only the health check can tell."""
    run_id = new_run_id()
    async with docker_backend(
        run_id=run_id, slots_per_host=1, health_interval=0.2, health_timeout=0.5
    ) as b:
        slot = await b.acquire_slot()
        ((host, docker_id),) = b.container_ids().items()
        errors: list[BaseException] = []

        async def run() -> None:
            try:
                await slot.exec(ExecRequest("sleep 1000", timeout=600))
            except SlotBrokenError as exc:
                errors.append(exc)

        def pause() -> None:
            client = sdk()
            try:
                client.api.pause(docker_id)
            finally:
                client.close()

        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await _wait_for_process(docker_id, "sleep 1000")
                await anyio.to_thread.run_sync(pause)
        assert len(errors) == 1
        await b.release_slot(slot, reusable=False)
        with anyio.fail_after(30):
            fresh = await b.acquire_slot()
        assert fresh.host_id != host
        assert (await fresh.exec(ExecRequest("echo ok", timeout=10))).exit_code == 0
        await b.release_slot(fresh, reusable=True)
        assert b.statistics().hosts_replaced == 1
    assert containers_of(run_id) == []


# -- a forced exit (second signal) removes the run's containers -----------------------------

_FORCED = textwrap.dedent(
    """
    import sys, anyio
    sys.path.insert(0, {tests!r})
    from structenv import ExecRequest
    from structenv._main import Interrupted, run_until_signal
    from test_docker_support import docker_backend

    async def work():
        async with docker_backend(run_id={run_id!r}, min_hosts=2, reap_on_start=False) as b:
            slot = await b.acquire_slot()
            try:
                await slot.exec(ExecRequest("echo up"))
                print("READY", flush=True)
                await anyio.sleep_forever()
            finally:
                # An orderly shutdown that never ends: only the forced exit can clean up.
                with anyio.CancelScope(shield=True):
                    print("STUCK", flush=True)
                    await anyio.sleep_forever()

    async def main():
        try:
            await run_until_signal(work, prog="owner")
        except Interrupted as exc:
            sys.exit(exc.exit_status)

    anyio.run(main, backend={loop!r})
    """
)


def test_forced_exit_removes_the_runs_containers() -> None:
    """A second SIGTERM while the orderly shutdown hangs: the emergency cleanup removes every
    container of the run, their cgroups and the socket dir before the process exits.

    The child runs on trio; the same path on asyncio (the emergency registry run by
    ``run_until_signal``) is covered by the double-SIGINT test of ``test_cli_process.py``.
    """
    run_id = new_run_id("forced")
    code = _FORCED.format(tests=_TESTS_DIR, run_id=run_id, loop="trio")
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            # Each line is a condition the child reports (the hang guard bounds the wait).
            assert proc.stdout.readline() == b"READY\n"
            containers = containers_of(run_id)
            assert len(containers) == 2
            assert {c.labels["org.structenv.owner.pid"] for c in containers} == {str(proc.pid)}
            prefix = f"structenv-docker-{proc.pid}-"
            (root,) = [p for p in os.listdir("/var/tmp") if p.startswith(prefix)]
            proc.send_signal(signal.SIGTERM)
            assert proc.stdout.readline() == b"STUCK\n"
            assert len(containers_of(run_id)) == 2  # the orderly path is held: still there
            proc.send_signal(signal.SIGTERM)
            err = proc.stderr.read().decode()  # to end-of-file: the process has exited
            status = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert status == 128 + signal.SIGTERM, err
    assert "SIGTERM received; shutting down" in err and "SIGTERM received again" in err, err
    assert containers_of(run_id) == []  # removed before the process exited: no waiting
    assert not os.path.exists(os.path.join("/var/tmp", root))
    assert not [n for n in docker_cgroup_names() if n.startswith(f"structenv-{run_id}-")]

"""NomadBackend against the fake Nomad agent (structenv.testing._nomad_fake), whose allocations
are real sandbox-server processes on this machine: contract, scaling, purge, a killed
allocation mid-command, transient-error retries, ACL, cancellation and reaping."""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx
import pytest

from spec_support import assert_host_file_spec_refused, host_file_specs
from structenv import BackendError, ExecRequest, SandboxSpec, SlotBrokenError
from structenv.backends._nomad import NomadBackend, reap_jobs
from structenv.backends._ownership import LABEL_OWNER_PID, LABEL_OWNER_START
from structenv.testing import check_backend, child_processes, cmdline
from structenv.testing._nomad_fake import NomadFake, open_nomad_fake

pytestmark = pytest.mark.anyio


def backend(fake: NomadFake, **kwargs: Any) -> NomadBackend:
    options: dict[str, Any] = dict(
        address=fake.address,
        token=fake.token,
        slots_per_host=2,
        poll_interval=0.02,
        health_interval=0.2,
        reap_on_start=False,
    )
    options.update(kwargs)
    return NomadBackend(**options)


async def wait_until(condition: Callable[[], Awaitable[bool] | bool], *, deadline: float) -> None:
    """Poll external state (processes, the fake's scheduler) under a deadline."""
    with anyio.fail_after(deadline):
        while True:
            value = condition()
            if value if isinstance(value, bool) else await value:
                return
            await anyio.sleep(0.02)


def sandbox_servers() -> list[int]:
    return [p for p in child_processes() if b"structenv.sandbox" in cmdline(p)]


async def test_contract() -> None:
    async with open_nomad_fake(token="acl-secret") as fake:
        await check_backend(lambda: backend(fake))
        assert not fake.jobs and not fake.live_processes()


async def test_job_spec_meta_and_purge_on_close() -> None:
    async with open_nomad_fake() as fake:
        async with backend(fake, run_id="spec", min_hosts=2, max_hosts=3) as b:
            job = fake.jobs["structenv-spec"]
            group = job.spec["TaskGroups"][0]
            assert group["Count"] == 2 and group["Tasks"][0]["Driver"] == "docker"
            assert job.spec["Meta"]["org.structenv.run"] == "spec"
            assert job.spec["Meta"][LABEL_OWNER_PID] == str(os.getpid())
            assert b.statistics().hosts == 2 and b.capacity == 6
            assert len(fake.running("structenv-spec")) == 2
        assert fake.purged == ["structenv-spec"] and not fake.live_processes()
        assert not sandbox_servers()


async def test_purge_on_start_replaces_a_leftover_job() -> None:
    async with open_nomad_fake() as fake:
        # A leftover of a run that died with the same run id: its allocation still runs.
        spec = backend(fake, run_id="same").job_spec(1)
        async with httpx.AsyncClient(base_url=fake.address) as http:
            (await http.put("/v1/jobs", json={"Job": spec})).raise_for_status()
        await wait_until(lambda: len(fake.running("structenv-same")) == 1, deadline=20)
        (old,) = fake.running("structenv-same")
        async with backend(fake, run_id="same") as b:
            assert fake.purged == ["structenv-same"] and old.client == "complete"
            assert old.id not in b.allocation_ids().values()
            slot = await b.acquire_slot()
            result = await slot.exec(ExecRequest("echo new", timeout=10))
            await b.release_slot(slot, reusable=True)
            assert result.stdout == b"new\n"


async def test_scale_up_on_demand_and_down_when_idle() -> None:
    async with open_nomad_fake() as fake:
        kwargs: dict[str, Any] = dict(min_hosts=1, max_hosts=2, idle_timeout=0.3)
        async with backend(fake, slots_per_host=1, **kwargs) as b:
            first = await b.acquire_slot()
            with anyio.fail_after(30):
                second = await b.acquire_slot()  # needs a second allocation
            assert first.host_id != second.host_id and fake.scale_requests == [2]
            assert b.statistics().hosts == 2
            await b.release_slot(first, reusable=True)
            await b.release_slot(second, reusable=True)
            await wait_until(lambda: b.statistics().hosts == 1, deadline=20)
            await wait_until(lambda: fake.scale_requests == [2, 1], deadline=10)
            await wait_until(lambda: len(fake.running(b.job_id)) == 1, deadline=20)
            assert b.scaling_statistics()["scaled_down"] == 1
            slot = await b.acquire_slot()  # the survivor still serves
            assert (await slot.exec(ExecRequest("echo ok", timeout=10))).exit_code == 0
            await b.release_slot(slot, reusable=True)


async def test_killed_allocation_mid_command() -> None:
    async with open_nomad_fake() as fake, backend(fake) as b:
        (alloc_id,) = b.allocation_ids().values()
        slot = await b.acquire_slot()
        caught: list[BaseException] = []

        async def doomed() -> None:
            try:
                await slot.exec(ExecRequest("sleep 1000", timeout=600))
            except SlotBrokenError as exc:
                caught.append(exc)

        def sleeping() -> bool:
            pid = fake.allocs[alloc_id].pid
            assert pid is not None
            return any(b"sleep\x001000" in cmdline(p) for p in child_processes(pid))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(doomed)
                await wait_until(sleeping, deadline=15)
                fake.kill_allocation(alloc_id)
        assert len(caught) == 1
        await b.release_slot(slot, reusable=False)
        await wait_until(lambda: fake.allocs[alloc_id].desired == "stop", deadline=10)
        with anyio.fail_after(10):
            await fake.allocs[alloc_id].stopped.wait()
        assert fake.allocs[alloc_id].client == "failed"  # a crash, even if stopped after
        await wait_until(lambda: b.statistics().hosts == 1, deadline=20)
        (new_alloc,) = b.allocation_ids().values()
        assert new_alloc != alloc_id and fake.allocs[new_alloc].previous == alloc_id
        stats = b.statistics()
        assert stats.hosts_replaced == 1 and stats.leased == 0
        again = await b.acquire_slot()
        assert again.host_id != slot.host_id  # the dead allocation's slots are never reused
        result = await again.exec(ExecRequest("echo replaced", timeout=10))
        assert result.stdout == b"replaced\n"
        await b.release_slot(again, reusable=True)


async def test_transient_errors_are_retried_others_are_not() -> None:
    async with open_nomad_fake() as fake:
        fake.fail_next(503, 429, 500)
        async with backend(fake) as b:
            assert b.statistics().hosts == 1
        fake.fail_next(400)
        with pytest.raises(BackendError, match="400"):
            async with backend(fake):
                pass
        assert not fake.live_processes()


async def test_acl_token_is_required() -> None:
    async with open_nomad_fake(token="right") as fake:
        with pytest.raises(BackendError, match="403"):
            async with backend(fake, token="wrong"):
                pass
        assert not fake.jobs


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3, 1.0])
async def test_cancelled_start_leaves_nothing(delay: float) -> None:
    async with open_nomad_fake() as fake:
        with anyio.move_on_after(delay):
            async with backend(fake, min_hosts=2, max_hosts=2):
                pass
        assert not fake.jobs and not fake.live_processes()
        assert not sandbox_servers()


async def test_cancelled_acquire_during_scale_up_leaves_nothing() -> None:
    async with open_nomad_fake() as fake:
        async with backend(fake, slots_per_host=1, max_hosts=2) as b:
            held = await b.acquire_slot()
            with anyio.move_on_after(0.01):
                await b.acquire_slot()  # triggers a scale-up, then is cancelled
            assert b.statistics().leased == 1
            await b.release_slot(held, reusable=True)
        assert b.statistics().leased == 0
        assert not fake.jobs and not fake.live_processes() and not sandbox_servers()


async def test_reaper_purges_dead_owners_jobs_only() -> None:
    async with open_nomad_fake() as fake:
        async with backend(fake, run_id="live") as live:
            # A job whose owner is dead: same labels, but a pid start time that never existed.
            spec = live.job_spec(0)
            spec["ID"] = spec["Name"] = "structenv-dead"
            spec["Meta"] = dict(spec["Meta"], **{LABEL_OWNER_START: "1"})
            assert live._api is not None
            await live._api.call("PUT", "/v1/jobs", body={"Job": spec})
            report = await reap_jobs(live._api, pool=live.pool_name)
            assert report.removed == ("structenv-dead",)
            assert "structenv-live" in report.alive
            assert set(fake.jobs) == {"structenv-live"}


async def test_structenv_reap_cli_purges_dead_owners_jobs() -> None:
    async with open_nomad_fake() as fake:
        async with backend(fake, run_id="live2") as live:
            spec = live.job_spec(0)
            spec["ID"] = spec["Name"] = "structenv-dead2"
            spec["Meta"] = dict(spec["Meta"], **{LABEL_OWNER_START: "1"})
            assert live._api is not None
            await live._api.call("PUT", "/v1/jobs", body={"Job": spec})
            argv = [sys.executable, "-m", "structenv._reap", "--nomad-url", fake.address,
                    "--nomad-token", fake.token or "", "--pool", live.pool_name]  # fmt: skip
            dry = await anyio.run_process([*argv, "--dry-run"])
            assert b"would remove 1 job(s)" in dry.stdout
            assert "structenv-dead2" in fake.jobs
            done = await anyio.run_process(argv)
            assert b"removed 1 job(s)" in done.stdout
            assert set(fake.jobs) == {"structenv-live2"}


@pytest.mark.parametrize(("spec", "what"), host_file_specs())
async def test_specs_with_host_files_are_refused_before_anything_runs(
    spec: SandboxSpec, what: str
) -> None:
    """Its hosts run elsewhere: the driver's images, rootfs cache and bind sources are not
    there (docs/environments.md, backend table)."""
    async with open_nomad_fake() as fake:
        async with backend(fake) as b:
            await assert_host_file_spec_refused(b, spec, what)

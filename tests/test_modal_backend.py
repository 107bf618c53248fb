"""ModalBackend through the FAKE modal client surface (structenv.testing._modal_fake), whose
sandboxes are real local sandbox-server processes: contract, network blocking, tags and
reaping, lifetime, the creation rate limit and cancellation."""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import pytest

from spec_support import assert_host_file_spec_refused, host_file_specs
from structenv import ExecRequest, SandboxSpec
from structenv.backends._modal import ModalBackend, reap_sandboxes
from structenv.backends._ownership import LABEL_OWNER_START, LABEL_RUN
from structenv.testing import check_backend, child_processes, cmdline
from structenv.testing._modal_fake import FakeModal, open_modal_fake

pytestmark = pytest.mark.anyio


def backend(fake: FakeModal, **kwargs: Any) -> ModalBackend:
    options: dict[str, Any] = dict(
        modal_module=fake,
        tunnel_tls=False,
        slots_per_host=2,
        health_interval=0.2,
        trajectory_deadline=60,
        scoring_buffer=10,
    )
    options.update(kwargs)
    return ModalBackend(**options)


def servers() -> list[int]:
    return [p for p in child_processes() if b"structenv.sandbox" in cmdline(p)]


async def test_contract() -> None:
    async with open_modal_fake() as fake:
        await check_backend(lambda: backend(fake))
        assert not fake.running() and not servers()


async def test_create_options_tags_and_lifetime() -> None:
    async with open_modal_fake() as fake:
        async with backend(fake, run_id="tagged", sandbox_lifetime=600) as b:
            (sandbox,) = fake.running()
            assert sandbox.options["block_network"] is True
            assert sandbox.options["timeout"] == 600
            assert sandbox.options["encrypted_ports"] == [8765]
            assert sandbox.tags[LABEL_RUN] == "tagged"
            assert b.sandbox_ids() == {next(iter(b.sandbox_ids())): sandbox.object_id}
        assert not fake.running()
        async with backend(fake, allow_network=True):
            assert fake.running()[0].options["block_network"] is False


async def test_creation_rate_limit() -> None:
    async with open_modal_fake() as fake:
        kwargs: dict[str, Any] = dict(slots_per_host=1, max_hosts=4, creation_rate=5.0)
        async with backend(fake, **kwargs) as b:
            with anyio.fail_after(30):
                slots = [await b.acquire_slot() for _ in range(4)]
            times = sorted(s.created_at for s in fake.sandboxes)
            gaps = [b2 - a for a, b2 in itertools.pairwise(times)]
            assert len(times) == 4 and min(gaps) >= 0.19, gaps
            for slot in slots:
                await b.release_slot(slot, reusable=True)


async def test_no_lease_from_a_sandbox_near_its_end() -> None:
    async with open_modal_fake() as fake:
        async with backend(fake, max_hosts=2, slots_per_host=1) as b:
            (old,) = b._hosts.values()
            old.expires_at = anyio.current_time() + 69  # type: ignore[attr-defined]  # ModalHost  # < trajectory_deadline + buffer left
            with anyio.fail_after(20):
                slot = await b.acquire_slot()
            assert slot.host_id != old.id
            result = await slot.exec(ExecRequest("echo fresh", timeout=10))
            assert result.stdout == b"fresh\n"
            await b.release_slot(slot, reusable=True)
            # The idle old sandbox is replaced at the next health check.
            with anyio.fail_after(10):
                while old.alive:
                    await b._changed.wait()
            assert b.scaling_statistics()["scaled_down"] == 1


async def test_reaper_terminates_dead_owners_sandboxes_only() -> None:
    async with open_modal_fake() as fake:
        async with backend(fake, run_id="dead", reap_on_start=False):
            (orphan,) = fake.running()
            orphan.tags[LABEL_OWNER_START] = "1"  # its owner "died": pid start time differs
            async with backend(fake, run_id="live") as live:
                assert orphan.done.is_set()  # reaped at start-up
                (mine,) = [s for s in fake.running() if s.tags[LABEL_RUN] == "live"]
                app = await fake.App.lookup.aio("structenv")
                report = await reap_sandboxes(fake, app)
                assert mine.object_id in report.alive and not report.removed
                assert live.statistics().hosts == 1


async def test_cancelled_start_and_acquire_leave_nothing() -> None:
    async with open_modal_fake() as fake:
        for delay in (0.0, 0.05, 0.3):
            with anyio.move_on_after(delay):
                async with backend(fake, min_hosts=2):
                    pass
            assert not fake.running() and not servers()
        async with backend(fake, slots_per_host=1, max_hosts=2) as b:
            held = await b.acquire_slot()
            with anyio.move_on_after(0.01):
                await b.acquire_slot()
            await b.release_slot(held, reusable=True)
        assert b.statistics().leased == 0 and not fake.running() and not servers()


@pytest.mark.parametrize(("spec", "what"), host_file_specs())
async def test_specs_with_host_files_are_refused_before_anything_runs(
    spec: SandboxSpec, what: str
) -> None:
    """Its hosts run elsewhere: the driver's images, rootfs cache and bind sources are not
    there (docs/environments.md, backend table)."""
    async with open_modal_fake() as fake:
        async with backend(fake) as b:
            await assert_host_file_spec_refused(b, spec, what)

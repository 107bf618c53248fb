"""SlotPool: pairing, FIFO fairness, acquire deadline, quarantine (virtual time)."""

from __future__ import annotations

import anyio
import pytest

from structenv import ConfigError, SlotAcquireTimeout, SlotPool
from structenv.testing import FakeBackend, assert_no_leaks, virtual_time_backend

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return virtual_time_backend(request.param)


async def test_slot_is_released_and_reset() -> None:
    async with FakeBackend(slots_per_host=2) as backend:
        pool = SlotPool(backend)
        async with pool.slot() as slot:
            await slot.write_file("a.txt", b"x")
            assert pool.statistics().in_use == 1
        assert backend.resets == 1
        assert_no_leaks(pools=[pool], backends=[backend])
        # The slot came back clean.
        async with pool.slot() as again:
            assert await again.list_files() == []


async def test_waiters_are_served_fifo() -> None:
    async with FakeBackend(slots_per_host=1) as backend:
        pool = SlotPool(backend)
        order: list[int] = []

        async def worker(i: int) -> None:
            async with pool.slot():
                order.append(i)
                await anyio.sleep(1)

        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(worker, i)
                await anyio.sleep(0.01)  # deterministic arrival order
        assert order == list(range(6))
        assert_no_leaks(pools=[pool], backends=[backend])


async def test_acquire_deadline_raises_clear_error() -> None:
    async with FakeBackend(slots_per_host=2) as backend:
        pool = SlotPool(backend, acquire_timeout=3)
        errors: list[SlotAcquireTimeout] = []

        async def holder() -> None:
            async with pool.slot():
                await anyio.sleep(10)

        async def waiter() -> None:
            start = anyio.current_time()
            with pytest.raises(SlotAcquireTimeout) as info:
                async with pool.slot():
                    pass
            assert anyio.current_time() - start == pytest.approx(3)
            errors.append(info.value)

        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            tg.start_soon(holder)
            await anyio.sleep(0.1)
            tg.start_soon(waiter)
            tg.start_soon(waiter)
        assert len(errors) == 2
        assert errors[0].pool_size == 2 and errors[0].in_use == 2
        assert "pool size 2" in str(errors[0]) and "waiting" in str(errors[0])
        assert isinstance(errors[0], TimeoutError)
        assert pool.statistics().acquire_timeouts == 2
        assert_no_leaks(pools=[pool], backends=[backend])


async def test_failed_reset_quarantines_the_slot() -> None:
    async with FakeBackend(slots_per_host=1, fail_reset=lambda sid: True) as backend:
        pool = SlotPool(backend)
        async with pool.slot() as first:
            await first.write_file("dirty", b"x")
        assert backend.resets_failed == 1 and backend.destroyed == 1
        async with pool.slot() as second:
            # A fresh physical slot: the dirty workspace is never handed out again.
            assert await second.list_files() == []
            assert second.lease != first.lease
        assert_no_leaks(pools=[pool], backends=[backend])


async def test_hanging_reset_is_bounded_and_quarantined() -> None:
    async with FakeBackend(slots_per_host=1, hang_reset=lambda sid: True) as backend:
        pool = SlotPool(backend, release_timeout=2)
        start = anyio.current_time()
        async with pool.slot():
            pass
        assert anyio.current_time() - start == pytest.approx(2)
        assert pool.statistics().quarantined == 1
        assert pool.statistics().discarded == 0
        assert backend.destroyed == 1
        assert_no_leaks(pools=[pool], backends=[backend])


async def test_a_slot_not_reusable_is_discarded_not_counted_as_a_fault() -> None:
    # A call cancelled mid-command marks its slot not reusable: the release destroys it, by
    # design. That is not a failed reset, and the statistics keep the two apart.
    async with FakeBackend(slots_per_host=1) as backend:
        pool = SlotPool(backend)
        async with pool.slot() as slot:
            slot.reusable = False
        stats = pool.statistics()
        assert (stats.discarded, stats.quarantined) == (1, 0)
        assert backend.destroyed == 1
        assert_no_leaks(pools=[pool], backends=[backend])


async def test_release_happens_even_when_cancelled_inside() -> None:
    async with FakeBackend(slots_per_host=1, reset_latency=0.5) as backend:
        pool = SlotPool(backend)
        with anyio.move_on_after(1):
            async with pool.slot():
                await anyio.sleep(5)
        # The reset ran to completion under the shield despite the cancellation.
        assert backend.resets == 1 and backend.destroyed == 0
        assert_no_leaks(pools=[pool], backends=[backend])


async def test_cancelled_waiter_gives_up_its_place() -> None:
    async with FakeBackend(slots_per_host=1) as backend:
        pool = SlotPool(backend)
        got: list[str] = []

        async def holder() -> None:
            async with pool.slot():
                await anyio.sleep(1)

        async def waiter(name: str) -> None:
            async with pool.slot():
                got.append(name)

        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await anyio.sleep(0.1)
            with anyio.CancelScope() as doomed:
                doomed.cancel()
                await waiter("cancelled")
            tg.start_soon(waiter, "b")
        assert got == ["b"]
        assert_no_leaks(pools=[pool], backends=[backend])


def test_pool_size_is_validated() -> None:
    backend = FakeBackend(slots_per_host=2)
    with pytest.raises(ConfigError):
        SlotPool(backend, size=3)
    with pytest.raises(ConfigError):
        SlotPool(backend, size=0)

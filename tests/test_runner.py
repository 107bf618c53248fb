"""run_group: a member's failure is an outcome; bugs and cancellation propagate (virtual time)."""

from __future__ import annotations

import anyio
import pytest

from structenv import SlotBrokenError, run_group
from structenv.testing import virtual_time_backend

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return virtual_time_backend(request.param)


async def test_failures_are_outcomes_and_siblings_go_on() -> None:
    async def member(i: int) -> int:
        await anyio.sleep(i)
        if i == 1:
            raise TimeoutError("trajectory deadline")
        if i == 2:
            raise SlotBrokenError("host died")
        return i * 10

    outcomes = await run_group(member, 4)
    assert [o.value for o in outcomes] == [0, None, None, 30]
    assert isinstance(outcomes[1].error, TimeoutError)
    assert isinstance(outcomes[2].error, SlotBrokenError)
    assert [o.ok for o in outcomes] == [True, False, False, True]


async def test_cancel_group_policy_stops_the_rest() -> None:
    finished: list[int] = []

    async def member(i: int) -> int:
        if i == 0:
            await anyio.sleep(1)
            raise TimeoutError("first failure")
        await anyio.sleep(100)
        finished.append(i)
        return i

    start = anyio.current_time()
    outcomes = await run_group(member, 3, on_failure="cancel_group")
    assert anyio.current_time() - start == pytest.approx(1)
    assert finished == []
    assert all(isinstance(o.error, TimeoutError) for o in outcomes)


async def test_a_bug_is_a_harness_failure_that_propagates() -> None:
    async def member(i: int) -> int:
        if i == 1:
            raise KeyError("bug in scoring")
        await anyio.sleep(100)
        return i

    start = anyio.current_time()
    with pytest.raises(ExceptionGroup) as info:
        await run_group(member, 3)
    assert info.group_contains(KeyError)
    assert anyio.current_time() - start < 1  # siblings were cancelled, not awaited


async def test_cancellation_propagates_untouched() -> None:
    baseline = len(anyio.get_running_tasks())

    async def member(i: int) -> int:
        await anyio.sleep(100)
        return i

    with anyio.move_on_after(1) as scope:
        await run_group(member, 5)
        pytest.fail("run_group returned despite the cancellation")
    assert scope.cancelled_caught
    assert len(anyio.get_running_tasks()) == baseline

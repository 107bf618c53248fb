"""The public testing kit: contract suite, leak checks, fixtures under both pytest plugins."""

from __future__ import annotations

import textwrap

import anyio
import pytest

from structenv import ExecRequest, SlotPool
from structenv.testing import (
    FakeBackend,
    LeakError,
    assert_no_leaks,
    check_backend,
    child_processes,
    virtual_time_backend,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return virtual_time_backend(request.param)


async def test_fake_backend_passes_the_contract_suite() -> None:
    passed = await check_backend(lambda: FakeBackend(hosts=2, slots_per_host=2))
    assert "reset_and_stale_lease" in passed
    assert len(passed) == 10


class _NoLeaseBump(FakeBackend):
    """A broken backend: reset does not bump the lease, so stale handles still work."""

    async def _reset(self, phys):  # type: ignore[no-untyped-def]
        phys.files.clear()
        await anyio.lowlevel.checkpoint()


class _LeakyAcquire(FakeBackend):
    """A broken backend: a cancelled acquire after the pop leaks the slot."""

    async def acquire_slot(self):  # type: ignore[no-untyped-def]
        phys = self._free.popleft()
        self._leased.add(phys)
        self.acquires += 1
        await anyio.sleep_forever()


@pytest.mark.parametrize(
    ("backend_cls", "check"),
    [(_NoLeaseBump, "reset_and_stale_lease"), (_LeakyAcquire, "cancelled_acquire")],
)
async def test_contract_suite_catches_broken_backends(
    backend_cls: type[FakeBackend], check: str
) -> None:
    with pytest.raises(AssertionError, match=check):
        await check_backend(lambda: backend_cls(slots_per_host=1), only={check})


async def test_assert_no_leaks_reports_a_held_slot() -> None:
    async with FakeBackend() as backend:
        pool = SlotPool(backend)
        async with pool.slot():
            with pytest.raises(LeakError, match="in_use=1"):
                assert_no_leaks(pools=[pool])
            with pytest.raises(LeakError, match="leased"):
                assert_no_leaks(backends=[backend])
        assert_no_leaks(pools=[pool], backends=[backend])


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_child_processes_sees_a_real_child() -> None:
    # Real time: a real subprocess.
    async with await anyio.open_process(["sleep", "30"]) as proc:
        assert proc.pid in child_processes()
        with pytest.raises(LeakError, match="sleep 30"):
            assert_no_leaks(processes=True)
        proc.kill()
        await proc.wait()
    assert proc.pid not in child_processes()


_USER_SUITE = textwrap.dedent(
    """
    import pytest
    import sniffio
    from structenv import ExecRequest

    @pytest.mark.trio
    async def test_under_pytest_trio(fake_executor, structenv_leak_check):
        structenv_leak_check.watch(fake_executor)
        assert sniffio.current_async_library() == "trio"
        async with fake_executor.trajectory() as traj:
            result = await traj.exec(ExecRequest("echo hi"))
        assert result.stdout == b"hi\\n"

    @pytest.mark.anyio
    @pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
    async def test_under_anyio(fake_executor, structenv_leak_check, anyio_backend):
        structenv_leak_check.watch(fake_executor)
        assert sniffio.current_async_library() == anyio_backend
        async with fake_executor.trajectory() as traj:
            result = await traj.exec(ExecRequest("exit 3"))
        assert result.exit_code == 3

    @pytest.mark.trio
    async def test_leak_is_reported(fake_backend, structenv_leak_check):
        structenv_leak_check.watch(fake_backend)
        async with fake_backend:
            await fake_backend.acquire_slot()
    """
)


def test_fixtures_work_under_anyio_and_pytest_trio(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user_suite=_USER_SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v")
    # The leaking test itself passes; the leak check fails its teardown.
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*test_under_pytest_trio PASSED*",
            "*test_under_anyio?asyncio? PASSED*",
            "*test_under_anyio?trio? PASSED*",
            "*ERROR at teardown of test_leak_is_reported*",
        ]
    )
    result.stdout.fnmatch_lines(["*LeakError*leased*"])


def test_exec_request_wire_round_trip() -> None:
    request = ExecRequest("echo", cwd="sub", env={"A": "1"}, stdin=b"\x00\xff", timeout=3)
    assert ExecRequest.from_wire(request.to_wire()) == request
    with pytest.raises(TypeError):
        ExecRequest.from_wire({"command": 5})
    with pytest.raises(ValueError, match="timeout"):
        ExecRequest.from_wire({"command": "x", "timeout": 0})

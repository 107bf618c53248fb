"""The public testing kit: contract suite, leak checks, fixtures under both pytest plugins."""

from __future__ import annotations

import itertools
import re
import textwrap
from pathlib import Path
from xml.etree import ElementTree

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from structenv import ExecRequest, SlotPool
from structenv.testing import (
    BorrowedBackend,
    FakeBackend,
    LeakChecker,
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
    passed = await check_backend(
        lambda: FakeBackend(hosts=2, slots_per_host=2), skip={"deadline_beats_a_stubborn_exec"}
    )
    assert "reset_and_stale_lease" in passed
    assert len(passed) == 11


async def test_a_borrowed_backend_runs_the_checks_and_leaves_its_owner_open() -> None:
    # One started backend serves every check that needs no fresh one; closing the borrowed
    # wrapper (each check does) leaves it open for its owner, with nothing leased.
    owner = FakeBackend(hosts=2, slots_per_host=2)
    fresh = {"lifecycle", "idempotent_close", "deadline_beats_a_stubborn_exec"}
    async with owner:
        passed = await check_backend(lambda: BorrowedBackend(owner), skip=fresh)
        assert len(passed) == 9 and "cancelled_acquire" in passed
        borrowed = BorrowedBackend(owner)
        async with borrowed:
            pass
        slot = await owner.acquire_slot()  # the owner still serves after the wrapper closed
        assert (await slot.exec(ExecRequest("true"))).exit_code == 0
        await owner.release_slot(slot, reusable=True)
        assert owner.statistics().leased == 0 and borrowed.capacity == owner.capacity == 4


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_fake_backend_passes_the_stubborn_exec_check_on_the_real_clock() -> None:
    # Its worker thread runs in real time: a virtual clock would jump past every deadline.
    only = {"deadline_beats_a_stubborn_exec"}
    start = anyio.current_time()
    assert await check_backend(lambda: FakeBackend(), only=only, deadline=10) == sorted(only)
    assert anyio.current_time() - start < 5


class _NoLeaseBump(FakeBackend):
    """A broken backend: reset does not bump the lease, so stale handles still work."""

    async def _reset(self, phys):  # type: ignore[no-untyped-def]
        phys.files.clear()
        await anyio.lowlevel.checkpoint()


class _LeakyAcquire(FakeBackend):
    """A broken backend: a cancelled acquire after the pop leaks the slot."""

    async def acquire_slot(self, spec=None):  # type: ignore[no-untyped-def]
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


# -- the kit's own await points, cancelled ------------------------------------------------------


async def test_leak_check_cancelled_at_each_of_its_steps_leaves_nothing() -> None:
    """Cancel a leaky test run through the kit after k scheduling steps, for every k until the
    kit finishes first: in the test body, in the kit's settling rounds, in its cleanup. Either
    the leak is reported or the cancellation propagates, and nothing is left open either way:
    the slot released, the backend the test started closed, no task of the test running."""
    outcomes: list[str] = []
    for k in itertools.count():
        backend = FakeBackend(hosts=1, slots_per_host=2)
        pool = SlotPool(backend)
        checker = LeakChecker()
        checker.watch(backend, pool)

        async def ending() -> None:  # ends by itself: the kit settles it in its rounds
            for _ in range(5):
                await anyio.lowlevel.checkpoint()

        async def leaky(tg: anyio.abc.TaskGroup, backend: FakeBackend, pool: SlotPool) -> None:
            await backend.__aenter__()
            slot = await pool.slot().__aenter__()  # never exited: the kit closes it
            await slot.exec(ExecRequest("echo leaked"))
            tg.start_soon(ending)

        async def cancel_after(scope: anyio.CancelScope, steps: int) -> None:
            for _ in range(steps):
                await anyio.lowlevel.checkpoint()
            scope.cancel()

        outcome = "cancelled"
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_after, scope, k)  # before the test: not the test's task
                try:
                    await checker._run_test(leaky, {"tg": tg, "backend": backend, "pool": pool})
                except LeakError as exc:
                    outcome = "reported"
                    assert "SlotPool slot(s) left leased" in str(exc)
                scope.cancel()
        outcomes.append(outcome)
        assert_no_leaks(pools=[pool], backends=[backend])
        assert backend.statistics().hosts == 0, f"cancelled at step {k}: backend left running"
        if outcome == "reported" and k > 0:
            break
        assert k < 200, outcomes
    assert "cancelled" in outcomes and outcomes[-1] == "reported"


# -- the pytest plugin, used as an external project would use it ------------------------------

#: Leaky tests and what each must be reported as, shared by the pytest-trio and anyio projects.
#: Healthy tests run after the leaky ones: a leak must not break the loop for later tests.
_LEAKY_TESTS = """
import subprocess
import sys

import pytest

from structenv import ExecRequest, SlotPool, ToolExecutor


async def test_slot_left_open(structenv_fake_backend, structenv_leak_check):
    async with structenv_fake_backend:
        pool = SlotPool(structenv_fake_backend)
        structenv_leak_check.watch(pool)
        slot = await pool.slot().__aenter__()
        await slot.exec(ExecRequest("echo leaked"))


async def test_trajectory_left_open(structenv_fake_executor):
    traj = await structenv_fake_executor.trajectory().__aenter__()
    await traj.exec(ExecRequest("echo leaked"))


async def test_two_trajectories_left_open(structenv_fake_executor):
    # Siblings: the kit must close the newer one first, as nested `async with` would.
    await structenv_fake_executor.trajectory().__aenter__()
    traj = await structenv_fake_executor.trajectory().__aenter__()
    await traj.exec(ExecRequest("echo leaked"))


async def test_executor_not_exited(structenv_fake_backend, structenv_leak_check):
    await structenv_fake_backend.__aenter__()
    executor = ToolExecutor(structenv_fake_backend)
    structenv_leak_check.watch(executor)
    await executor.__aenter__()


async def test_task_left_running(task_group, structenv_leak_check):
    task_group.start_soon(sleep_forever)


async def test_child_process_left(structenv_leak_check):
    await start_process([sys.executable, "-c", "import sys; sys.stdin.read()"])


async def test_backend_not_closed(structenv_fake_backend):
    await structenv_fake_backend.__aenter__()


async def test_raw_lease_not_released(structenv_fake_backend):
    async with structenv_fake_backend:
        await structenv_fake_backend.acquire_slot()


async def test_failure_keeps_its_message(structenv_fake_executor):
    await structenv_fake_executor.trajectory().__aenter__()
    assert 1 + 1 == 3, "the test's own failure"


def test_sync_child_process_left(structenv_leak_check):
    subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)


async def test_task_left_to_its_owner(owned_group, structenv_leak_check):
    # Reported, but not cancelled by the kit: the fixture that owns the group ends it.
    import owner_state

    owner_state.CLOSING.clear()

    async def runs_until_stopped():
        try:
            await sleep_forever()
        finally:
            owner_state.STOPPED_BY.append("its owner" if owner_state.CLOSING else "the kit")

    owned_group.start_soon(runs_until_stopped)


def test_sync_the_task_left_running_was_stopped_by_its_owner():
    import owner_state

    assert owner_state.STOPPED_BY and set(owner_state.STOPPED_BY) == {"its owner"}


async def test_busy_but_clean(structenv_fake_executor):
    async def one(i):
        async with structenv_fake_executor.trajectory() as traj:
            result = await traj.exec(ExecRequest(f"echo {i}"))
            assert result.stdout == f"{i}\\n".encode()

    async with create_task_group() as tg:
        for i in range(8):
            tg.start_soon(one, i)


async def test_healthy_after_the_leaks(structenv_fake_executor, structenv_leak_check):
    async with structenv_fake_executor.trajectory() as traj:
        result = await traj.exec(ExecRequest("echo fine"))
    assert result.stdout == b"fine\\n"
    proc = await start_process(["true"])
    await proc.wait()
"""

#: Who stopped the task a test left running: the kit reports it; its owner (a fixture) ends it.
_OWNER_STATE = """
CLOSING = []
STOPPED_BY = []
"""

_TRIO_PROJECT = {
    "pyproject.toml": """
[tool.pytest.ini_options]
trio_mode = true
addopts = "-p structenv.testing.pytest_plugin"
""",
    "conftest.py": """
import pytest
import trio


@pytest.fixture
def task_group(nursery):
    return nursery


@pytest.fixture
async def owned_group():
    import owner_state

    async with trio.open_nursery() as nursery:
        yield nursery
        owner_state.CLOSING.append(True)
        nursery.cancel_scope.cancel()
""",
    "owner_state.py": _OWNER_STATE,
    "test_leaks.py": """
import trio
from trio import open_nursery as create_task_group
from trio import sleep_forever


async def start_process(argv):
    return await trio.lowlevel.open_process(argv, stdin=-1)

"""
    + _LEAKY_TESTS,
    "test_crash.py": """
import pytest
import trio

from structenv import ExecRequest


@pytest.fixture
async def crashing(nursery):
    async def crash():
        await trio.sleep(0)
        raise ValueError("the fixture crashed")

    nursery.start_soon(crash)


async def test_cancelled_by_a_crashing_fixture(crashing, structenv_fake_executor):
    # Cancelled inside a trajectory, inside the kit's wrapper: the crash is the report.
    async with structenv_fake_executor.trajectory() as traj:
        await traj.exec(ExecRequest("hang"))
""",
}

_ANYIO_PROJECT = {
    "pyproject.toml": """
[tool.pytest.ini_options]
anyio_mode = "auto"
""",
    "conftest.py": """
import anyio
import pytest

pytest_plugins = ["structenv.testing.pytest_plugin"]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.fixture
async def task_group():
    async with anyio.create_task_group() as tg:
        yield tg
        tg.cancel_scope.cancel()


@pytest.fixture
async def owned_group():
    import owner_state

    async with anyio.create_task_group() as tg:
        yield tg
        owner_state.CLOSING.append(True)
        tg.cancel_scope.cancel()
""",
    "owner_state.py": _OWNER_STATE,
    "test_leaks.py": """
import anyio
from anyio import create_task_group, sleep_forever


async def start_process(argv):
    return await anyio.open_process(argv, stdin=-1)
"""
    + _LEAKY_TESTS,
}

#: test name -> what its report must say (None: it must pass).
_EXPECTED = {
    "test_slot_left_open": "LeakError: 2 leaks: SlotPool slot(s) left leased: in_use=1",
    "test_trajectory_left_open": "LeakError: 3 leaks: 1 trajectory(ies) left open",
    "test_two_trajectories_left_open": "LeakError: 3 leaks: 2 trajectory(ies) left open",
    "test_executor_not_exited": "a ToolExecutor entered in the test was not exited; 2 task(s) "
    "started in the test left running: 'structenv._batcher.Batcher._watch_deadlines', "
    "'structenv._exec.ExecService._serve_batcher'",
    "test_task_left_running": "LeakError: 1 leak: 1 task(s) started in the test left running:",
    "test_child_process_left": "LeakError: 1 leak: child process(es) left running:",
    "test_backend_not_closed": "LeakError: 1 leak: a FakeBackend started in the test was not "
    "closed",
    "test_raw_lease_not_released": "LeakError: 1 leak: FakeBackend slot(s) left leased: leased=1",
    "test_failure_keeps_its_message": "structenv leak check, also: 3 leaks: 1 trajectory(ies)",
    "test_sync_child_process_left": "LeakError: 1 leak: child process(es) left running:",
    "test_task_left_to_its_owner": "LeakError: 1 leak: 1 task(s) started in the test left "
    "running: 'test_leaks.test_task_left_to_its_owner.<locals>.runs_until_stopped'",
    "test_sync_the_task_left_running_was_stopped_by_its_owner": None,
    "test_busy_but_clean": None,
    "test_healthy_after_the_leaks": None,
}


def _run_project(pytester: pytest.Pytester, files: dict[str, str]) -> dict[str, str]:
    """Run a project in a fresh pytest process; each test id -> its report text ("" = pass)."""
    for name, text in files.items():
        (pytester.path / name).parent.mkdir(parents=True, exist_ok=True)
        (pytester.path / name).write_text(textwrap.dedent(text).lstrip())
    result = pytester.runpytest_subprocess("-p", "no:randomly", "--junitxml=report.xml")
    assert result.ret in (0, 1), result.stdout.str()
    reports: dict[str, str] = {}
    for case in ElementTree.parse(pytester.path / "report.xml").getroot().iter("testcase"):
        texts = [(e.get("message") or "") + (e.text or "") for e in case]
        key = case.get("name", "")
        # A test that fails and errors at teardown gets two entries: keep both texts.
        reports[key] = reports.get(key, "") + "\n".join(t for t in texts if t)
    return reports


def _check_reports(reports: dict[str, str], ids: list[str]) -> None:
    for test, expected in _EXPECTED.items():
        # A sync test is not parametrized over event loops.
        for suffix in [""] if test.startswith("test_sync_") else ids:
            report = reports[test + suffix]
            if expected is None:
                assert report == "", f"{test}{suffix} should pass:\n{report}"
            else:
                assert expected in report, f"{test}{suffix}:\n{report}"
                # A leak is a leak report, never a confusing error about cancel scopes.
                assert "cancel scope" not in report, f"{test}{suffix}:\n{report}"
    assert "the test's own failure" in reports["test_failure_keeps_its_message" + ids[0]]


@pytest.mark.slow
def test_every_leak_is_reported_under_pytest_trio(pytester: pytest.Pytester) -> None:
    reports = _run_project(pytester, _TRIO_PROJECT)
    _check_reports(reports, [""])
    # A test cancelled inside the kit's wrapper reports its cause, not a leak.
    crash = reports["test_cancelled_by_a_crashing_fixture"]
    assert "ValueError: the fixture crashed" in crash
    assert "LeakError" not in crash and "cancel scope" not in crash.lower(), crash


@pytest.mark.slow
def test_every_leak_is_reported_under_the_anyio_plugin(pytester: pytest.Pytester) -> None:
    reports = _run_project(pytester, _ANYIO_PROJECT)
    _check_reports(reports, ["[asyncio]", "[trio]"])


def test_the_plugin_is_opt_in(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_plain="""
        import pytest

        NAMES = ["structenv_fake_backend", "fake_backend", "fake_executor"]

        @pytest.mark.parametrize("name", NAMES)
        def test_no_kit_fixture(request, name):
            with pytest.raises(pytest.FixtureLookupError):
                request.getfixturevalue(name)
        """
    )
    pytester.runpytest_subprocess("-p", "no:randomly").assert_outcomes(passed=3)


_DOC_BLOCK = re.compile(r"```(?:python|toml)\n# file: (trio|anyio)/(\S+)\n(.*?)```", re.DOTALL)


@pytest.mark.slow
@pytest.mark.parametrize(("project", "tests"), [("trio", 13), ("anyio", 25)])
def test_the_examples_in_docs_testing_md_run(
    pytester: pytest.Pytester, project: str, tests: int
) -> None:
    doc = (Path(__file__).parents[1] / "docs" / "testing.md").read_text()
    files = {name: text for where, name, text in _DOC_BLOCK.findall(doc) if where == project}
    assert "pyproject.toml" in files or "conftest.py" in files
    for name, text in files.items():
        (pytester.path / name).write_text(text)
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-W", "error")
    result.assert_outcomes(passed=tests)


def test_exec_request_wire_round_trip() -> None:
    request = ExecRequest("echo", cwd="sub", env={"A": "1"}, stdin=b"\x00\xff", timeout=3)
    assert ExecRequest.from_wire(request.to_wire()) == request
    with pytest.raises(TypeError):
        ExecRequest.from_wire({"command": 5})
    with pytest.raises(ValueError, match="timeout"):
        ExecRequest.from_wire({"command": "x", "timeout": 0})

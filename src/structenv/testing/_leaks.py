"""Leak checks: slots, trajectories, executors, backends, tasks and child processes.

:func:`assert_no_leaks` checks objects' statistics at one instant. :class:`LeakChecker` (the
``structenv_leak_check`` fixture of :mod:`structenv.testing.pytest_plugin`) also remembers
what was running when a test started, and checks *inside the event loop, as the test
returns*, before any fixture is torn down: it holds every async generator the test's task
opened, so an abandoned ``pool.slot()`` or ``trajectory()`` is still open (not finalised by
the loop's garbage-collection hooks), and a task the test started is still alive. After
reporting, it closes what the test left open in the test's own task, so the leak does not
corrupt the cancel scopes of later tests or fixtures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from types import AsyncGeneratorType
from typing import Any

import anyio

from .._executor import ToolExecutor
from .._pool import SlotPool
from ..abc import SandboxBackend

__all__ = ["LeakChecker", "LeakError", "assert_no_leaks", "child_processes", "cmdline"]

#: Scheduling rounds a finished test gives tasks that are ending anyway (a batch task that
#: has delivered its last result) before a task still alive counts as left running.
_SETTLE_ROUNDS = 50


class LeakError(AssertionError):
    """Something outlived the scope that created it."""


def cmdline(pid: int) -> bytes:
    """The NUL-separated command line of ``pid`` (empty if it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def child_processes(pid: int | None = None) -> list[int]:
    """Every live descendant of ``pid`` (default: this process), found by walking /proc.

    Zombies are included: an unreaped child is a leak too.
    """
    root = os.getpid() if pid is None else pid
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        fields = stat[stat.rindex(b")") + 2 :].split()
        parents.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    stack = [root]
    while stack:
        for child in parents.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def assert_no_leaks(
    *,
    pools: Iterable[SlotPool] = (),
    backends: Iterable[SandboxBackend] = (),
    executors: Iterable[ToolExecutor] = (),
    processes: bool = False,
) -> None:
    """Raise :class:`LeakError` if any slot is still leased or any child process is alive.

    Args:
        pools: Pools whose ``in_use`` and ``waiting`` must be 0 and acquires == releases.
        backends: Backends whose ``leased`` must be 0 and acquires == releases.
        executors: Executors with no open trajectory, nothing queued or in flight.
        processes: Also require that this process has no child processes at all.
    """
    problems = _object_problems(pools, backends, executors)
    if processes:
        children = child_processes()
        if children:
            problems.append(f"child processes left running: {_describe(children)}")
    if problems:
        raise LeakError(_message(problems))


def _object_problems(
    pools: Iterable[SlotPool],
    backends: Iterable[SandboxBackend],
    executors: Iterable[ToolExecutor],
) -> list[str]:
    problems: list[str] = []
    pools = list(pools)
    for executor in executors:
        if not executor.entered:
            continue  # never entered: nothing to leak
        stats = executor.statistics()
        if stats.active_trajectories:
            problems.append(
                f"{stats.active_trajectories} trajectory(ies) left open on a ToolExecutor "
                "(use `async with executor.trajectory() as traj:`)"
            )
        batcher = stats.batcher
        if batcher.in_flight or batcher.queued or batcher.waiting:
            problems.append(
                "ToolExecutor still has exec calls pending "
                f"(queued={batcher.queued}, in_flight={batcher.in_flight}, "
                f"waiting={batcher.waiting})"
            )
        if executor.pool not in pools:
            pools.append(executor.pool)
    for pool in pools:
        ps = pool.statistics()
        if ps.in_use or ps.waiting or ps.acquired != ps.released:
            problems.append(
                f"SlotPool slot(s) left leased: in_use={ps.in_use}, waiting={ps.waiting}, "
                f"acquired={ps.acquired}, released={ps.released} "
                "(use `async with pool.slot() as slot:`)"
            )
        elif ps.available != ps.size:
            problems.append(f"SlotPool lost permits: available={ps.available}, size={ps.size}")
    for backend in backends:
        bs = backend.statistics()
        if bs.leased or bs.acquires != bs.releases:
            problems.append(
                f"{type(backend).__name__} slot(s) left leased: leased={bs.leased}, "
                f"acquires={bs.acquires}, releases={bs.releases} "
                "(every acquire_slot() needs its release_slot())"
            )
    return problems


def _message(problems: list[str]) -> str:
    noun = "leak" if len(problems) == 1 else "leaks"
    return f"{len(problems)} {noun}: " + "; ".join(problems)


def _describe(pids: Iterable[int]) -> str:
    out = []
    for pid in pids:
        cmd = cmdline(pid).replace(b"\0", b" ").decode(errors="replace").strip() or "?"
        out.append(f"{pid} ({cmd[:60]})")
    return ", ".join(out)


def _backend_running(backend: SandboxBackend) -> bool:
    return backend.statistics().hosts > 0


def _executor_running(executor: ToolExecutor) -> bool:
    return executor.running


def _running(obj: SlotPool | SandboxBackend | ToolExecutor) -> bool:
    if isinstance(obj, SandboxBackend):
        return _backend_running(obj)
    if isinstance(obj, ToolExecutor):
        return _executor_running(obj)
    return True  # a pool has no life of its own: only its leases are checked


@dataclasses.dataclass(eq=False)
class _Watched:
    obj: SlotPool | SandboxBackend | ToolExecutor
    #: Running when watched: its owner (a fixture, say) closes it, not the test.
    was_running: bool


class LeakChecker:
    """What a test must leave as it found it; the ``structenv_leak_check`` fixture.

    Watched pools, backends and executors must have no slot leased, no trajectory open and no
    call pending when the test returns; a backend or executor that was not running when it
    was watched must be closed again. Tasks started during the test must have ended, and so
    must child processes (set :attr:`tasks` or :attr:`processes` to ``False`` for a test that
    leaves them to a fixture's teardown on purpose).

    Attributes:
        tasks: Check for tasks started during the test and still running.
        processes: Check for child processes started during the test and still alive.
    """

    def __init__(self) -> None:
        self.tasks = True
        self.processes = True
        self._watched: list[_Watched] = []
        self._children = set(child_processes())
        #: Set by the pytest plugin when it checks inside the loop (not at fixture teardown).
        self._in_loop = False

    def watch(self, *objs: SlotPool | SandboxBackend | ToolExecutor) -> None:
        """Check these when the test ends (and whenever :meth:`check` is called)."""
        for obj in objs:
            if not isinstance(obj, SlotPool | SandboxBackend | ToolExecutor):
                raise TypeError(f"cannot watch {obj!r}: not a SlotPool, backend or executor")
            self._watched.append(_Watched(obj, _running(obj)))

    def check(self) -> None:
        """Raise :class:`~structenv.testing.LeakError` now if anything leaked."""
        problems = self._problems()
        if problems:
            raise LeakError(_message(problems))

    def _problems(self) -> list[str]:
        pools = [w.obj for w in self._watched if isinstance(w.obj, SlotPool)]
        backends = [w.obj for w in self._watched if isinstance(w.obj, SandboxBackend)]
        executors = [w.obj for w in self._watched if isinstance(w.obj, ToolExecutor)]
        problems = _object_problems(pools, backends, executors)
        for w in self._watched:
            if w.was_running:
                continue
            if isinstance(w.obj, ToolExecutor) and _executor_running(w.obj):
                problems.append("a ToolExecutor entered in the test was not exited")
            elif isinstance(w.obj, SandboxBackend) and _backend_running(w.obj):
                problems.append(
                    f"a {type(w.obj).__name__} started in the test was not closed "
                    "(use `async with backend:`)"
                )
        if self.processes:
            left = [pid for pid in child_processes() if pid not in self._children]
            if left:
                problems.append(f"child process(es) left running: {_describe(left)}")
        return problems

    # -- the pytest plugin runs each async test through this ----------------------------------
    async def _run_test(self, test: Callable[..., Awaitable[Any]], kwargs: dict[str, Any]) -> None:
        """Run ``test`` in this task, check for leaks as it returns, close what it left open."""
        # What fixtures started before the test is theirs to close.
        for w in self._watched:
            w.was_running = _running(w.obj)
        self._children = set(child_processes())
        baseline = {_task_key(t): t for t in anyio.get_running_tasks()}
        generators = _GeneratorTracker()
        with generators:
            try:
                await test(**kwargs)
            except Exception as exc:
                problems = await self._finish(baseline, generators)
                if problems:
                    exc.add_note(f"structenv leak check, also: {_message(problems)}")
                raise
            except BaseException:
                # Cancelled (a crashing fixture, a deadline) or stopped: the cause is the
                # report, but what the test left open is still closed, in this task.
                await self._close_left_open(generators)
                raise
        problems = await self._finish(baseline, generators)
        if problems:
            raise LeakError(_message(problems))

    async def _finish(
        self, baseline: dict[tuple[int, int], anyio.TaskInfo], generators: _GeneratorTracker
    ) -> list[str]:
        # The tracker holds every generator the test opened, so letting tasks that are ending
        # anyway finish first cannot finalise an abandoned slot or trajectory behind our back.
        try:
            left = await _settled_new_tasks(baseline) if self.tasks else []
        except BaseException:  # cancelled while settling: close, then let it propagate
            await self._close_left_open(generators)
            raise
        problems = self._problems()
        if left:
            names = ", ".join(sorted(repr(t.name) for t in left))
            problems.append(f"{len(left)} task(s) started in the test left running: {names}")
        if problems:
            await self._close_left_open(generators)
        return problems

    async def _close_left_open(self, generators: _GeneratorTracker) -> None:
        """Close the test's abandoned generators, then watched executors and backends it
        started; every item is tried even if the test is being cancelled meanwhile.

        No cancel scope of ours wraps this: the generators hold scopes of this task that
        must unwind in order. Each object's own teardown is shielded and bounded.

        Cancellation: the first cancellation seen is re-raised once everything was tried.
        """
        cancelled: list[BaseException] = []
        await generators.close_open(cancelled)
        await self._close_watched(cancelled)
        if cancelled:
            raise cancelled[0]

    async def _close_watched(self, cancelled: list[BaseException]) -> None:
        # Executors before backends: the usual nesting. Best effort, like the generators.
        for kind in (ToolExecutor, SandboxBackend):
            for w in reversed(self._watched):
                if w.was_running or not isinstance(w.obj, kind) or not _running(w.obj):
                    continue
                try:
                    await w.obj.__aexit__(None, None, None)
                except RuntimeError:
                    # Not entered through ``async with`` (started by hand): stop it directly.
                    if isinstance(w.obj, SandboxBackend):
                        with contextlib.suppress(Exception):
                            await w.obj.aclose()
                except Exception:
                    pass  # the leak is being reported already
                except BaseException as exc:  # re-raised by _close_left_open
                    cancelled.append(exc)


def _task_key(task: anyio.TaskInfo) -> tuple[int, int]:
    # TaskInfo keeps its coroutine alive, so (task id, coroutine id) of a baseline task can
    # never be reused by a new task even if the task object's id is.
    return (task.id, id(task.coro))


def _is_asyncgen_finaliser(task: anyio.TaskInfo) -> bool:
    # The loops close abandoned async generators in tasks of their own.
    return type(task.coro).__name__ == "async_generator_athrow" or "_finalize_one" in getattr(
        task.coro, "__qualname__", ""
    )


async def _settled_new_tasks(
    baseline: dict[tuple[int, int], anyio.TaskInfo],
) -> list[anyio.TaskInfo]:
    current = anyio.get_current_task().id
    new: list[anyio.TaskInfo] = []
    for _ in range(_SETTLE_ROUNDS):
        new = [
            t
            for t in anyio.get_running_tasks()
            if t.id != current and _task_key(t) not in baseline and not _is_asyncgen_finaliser(t)
        ]
        if not new:
            break
        await anyio.lowlevel.checkpoint()
    return new


class _GeneratorTracker:
    """Remembers the async generators the current task starts, to close any left open.

    An abandoned ``async with pool.slot()`` or ``executor.trajectory()`` is a suspended async
    generator holding a cancel scope of this task. Left to the garbage collector, it is closed
    later in another task, which corrupts the cancel scope stacks of both; closed here, in
    this task and outermost first, it unwinds like the ``async with`` it should have been.
    """

    def __init__(self) -> None:
        self._task = anyio.get_current_task().id
        self._generators: list[
            tuple[AsyncGeneratorType[Any, Any], AsyncGeneratorType[Any, Any] | None]
        ] = []
        self._saved: Any = None

    def __enter__(self) -> None:
        self._saved = saved = sys.get_asyncgen_hooks()

        def firstiter(agen: AsyncGenerator[Any, Any]) -> None:
            try:
                mine = anyio.get_current_task().id == self._task
            except Exception:
                mine = False
            # An executor's or backend's own life (AsyncContextManagerMixin) is closed through
            # its __aexit__ by _close_watched, not by throwing GeneratorExit into its task group.
            if (
                mine
                and isinstance(agen, AsyncGeneratorType)
                and agen.ag_code.co_name != "__asynccontextmanager__"
            ):
                parent = next((g for g, _ in reversed(self._generators) if g.ag_running), None)
                self._generators.append((agen, parent))
            if saved.firstiter is not None:
                saved.firstiter(agen)

        sys.set_asyncgen_hooks(firstiter=firstiter, finalizer=saved.finalizer)

    def __exit__(self, *exc: object) -> None:
        sys.set_asyncgen_hooks(*self._saved)

    async def close_open(self, cancelled: list[BaseException]) -> None:
        """Close the suspended generators, outermost (then newest) first; a cancellation
        met on the way is appended to ``cancelled`` (for the caller to re-raise)."""
        closed: set[int] = set()
        while True:
            roots = [
                g
                for g, parent in self._generators
                if g.ag_frame is not None
                and not g.ag_running
                and id(g) not in closed
                and (parent is None or parent.ag_frame is None)
            ]
            if not roots:
                break
            agen = roots[-1]
            closed.add(id(agen))
            try:
                await agen.aclose()
            except Exception:
                pass  # the leak is being reported already; its cleanup is best effort
            except BaseException as exc:  # re-raised by the caller once all are closed
                cancelled.append(exc)
        self._generators.clear()

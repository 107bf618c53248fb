"""Leak assertions: slots, tasks and child processes must all be back to zero."""

from __future__ import annotations

import os
from collections.abc import Iterable

from .._executor import ToolExecutor
from .._pool import SlotPool
from ..abc import SandboxBackend

__all__ = ["LeakError", "assert_no_leaks", "child_processes", "cmdline"]


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
        executors: Executors with no active trajectory, nothing queued or in flight.
        processes: Also require that this process has no child processes.
    """
    problems: list[str] = []
    for executor in executors:
        stats = executor.statistics()
        if (
            stats.active_trajectories
            or stats.batcher.in_flight
            or stats.batcher.queued
            or stats.batcher.waiting
        ):
            problems.append(f"executor not idle: {stats}")
        pools = [*pools, executor.pool]
    for pool in pools:
        ps = pool.statistics()
        if ps.in_use or ps.waiting or ps.acquired != ps.released:
            problems.append(f"pool leaked slots: {ps}")
        elif ps.available != ps.size:
            problems.append(f"pool lost permits: {ps}")
    for backend in backends:
        bs = backend.statistics()
        if bs.leased or bs.acquires != bs.releases:
            problems.append(f"{type(backend).__name__} leaked slots: {bs}")
    if processes:
        children = child_processes()
        if children:
            problems.append(f"child processes left: {_describe(children)}")
    if problems:
        raise LeakError("; ".join(problems))


def _describe(pids: list[int]) -> str:
    out = []
    for pid in pids:
        cmd = cmdline(pid).replace(b"\0", b" ").decode(errors="replace").strip() or "?"
        out.append(f"{pid} ({cmd[:60]})")
    return ", ".join(out)

"""Dispatch overhead per call: executor -> batcher -> zero-latency FakeBackend.

N trajectories each make 20 sequential calls of an instant command, three ways in one run:

- ``exec``: ``Trajectory.exec(ExecRequest("true"))``, the slot-level path;
- ``call``: ``Trajectory.call(ToolCall("terminal", {"command": "true"}))``, the path a model
  takes: tool lookup, schema validation, the terminal tool building its request and formatting
  the observation, the same exec underneath;
- ``naive``: the exec workload through a batcher that allocates a reply memory stream per
  call (the original asyncio design's shape).

The time from the moment all trajectories hold their slot to the moment the last call returns,
divided by the number of calls, is µs/call (wall; its inverse is calls/s); the process CPU
time over the same span gives CPU µs/call, which a loaded shared machine disturbs less.
Per-call latencies give p50/p99. The ratios between the three, measured side by side, are the
claim; absolute numbers on a shared 2-core machine are noisy (the load average is recorded).
"""

from __future__ import annotations

import functools
import gc
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectSendStream

from .._config import ExecutorConfig
from .._executor import ToolExecutor
from .._types import ExecRequest, ExecResult, ToolCall
from ..abc import Slot
from ..testing import FakeBackend
from ._report import finish, machine_info, print_table, progress, summarize

__all__ = ["run"]

CALLS_PER_TRAJECTORY = 20
_TRUE = ExecRequest("true")
_CALL = ToolCall("terminal", {"command": "true"}, id="bench")

#: (wall seconds, CPU seconds, per-call latencies)
_Run = tuple[float, float, list[float]]


async def _exec(trajectories: int) -> _Run:
    return await _structured(trajectories, call=False)


async def _call(trajectories: int) -> _Run:
    return await _structured(trajectories, call=True)


async def _structured(trajectories: int, *, call: bool) -> _Run:
    hosts = 4 if trajectories >= 4 else 1
    backend = FakeBackend(hosts=hosts, slots_per_host=math.ceil(trajectories / hosts))
    config = ExecutorConfig(max_pending_calls=max(4096, trajectories))
    latencies: list[float] = []
    go = anyio.Event()
    ready = 0
    all_ready = anyio.Event()
    all_done = anyio.Event()
    async with backend, ToolExecutor(backend, config=config) as executor:

        async def member() -> None:
            nonlocal ready
            async with executor.trajectory() as traj:
                ready += 1
                if ready == trajectories:
                    all_ready.set()
                await go.wait()
                now = time.perf_counter
                record = latencies.append
                if call:
                    for _ in range(CALLS_PER_TRAJECTORY):
                        t0 = now()
                        await traj.call(_CALL)
                        record(now() - t0)
                else:
                    for _ in range(CALLS_PER_TRAJECTORY):
                        t0 = now()
                        await traj.exec(_TRUE)
                        record(now() - t0)
                if len(latencies) == trajectories * CALLS_PER_TRAJECTORY:
                    all_done.set()

        async with anyio.create_task_group() as tg:
            for _ in range(trajectories):
                tg.start_soon(member)
            await all_ready.wait()
            start, cpu = time.perf_counter(), time.process_time()
            go.set()
            # Measure until the last call returns (releases happen after, excluded).
            await all_done.wait()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return elapsed, cpu, latencies


class _NaiveBatcher:
    """The baseline: one shared channel, but a new reply memory stream for every call."""

    def __init__(self) -> None:
        self.send, self.recv = anyio.create_memory_object_stream[
            tuple[Slot, ExecRequest, MemoryObjectSendStream[ExecResult]]
        ](4096)

    async def exec(self, slot: Slot, request: ExecRequest) -> ExecResult:
        reply_send, reply_recv = anyio.create_memory_object_stream[ExecResult](1)
        with reply_recv:
            await self.send.send((slot, request, reply_send))
            return await reply_recv.receive()

    async def serve(self, backend: FakeBackend) -> None:
        async with anyio.create_task_group() as tg:
            async for slot, request, reply in self.recv:
                tg.start_soon(self._one, backend, slot, request, reply)

    @staticmethod
    async def _one(
        backend: FakeBackend,
        slot: Slot,
        request: ExecRequest,
        reply: MemoryObjectSendStream[ExecResult],
    ) -> None:
        with reply:
            await reply.send(await slot.exec(request))


async def _naive(trajectories: int) -> _Run:
    backend = FakeBackend(hosts=1, slots_per_host=trajectories)
    latencies: list[float] = []
    go = anyio.Event()
    all_done = anyio.Event()
    naive = _NaiveBatcher()
    async with backend, anyio.create_task_group() as service:
        service.start_soon(naive.serve, backend)

        async def member() -> None:
            slot = await backend.acquire_slot()
            try:
                await go.wait()
                now = time.perf_counter
                for _ in range(CALLS_PER_TRAJECTORY):
                    t0 = now()
                    await naive.exec(slot, _TRUE)
                    latencies.append(now() - t0)
                if len(latencies) == trajectories * CALLS_PER_TRAJECTORY:
                    all_done.set()
            finally:
                with anyio.move_on_after(5, shield=True):
                    await backend.release_slot(slot, reusable=True)

        async with anyio.create_task_group() as tg:
            for _ in range(trajectories):
                tg.start_soon(member)
            await anyio.wait_all_tasks_blocked()
            start, cpu = time.perf_counter(), time.process_time()
            go.set()
            await all_done.wait()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        naive.send.close()
    naive.recv.close()
    return elapsed, cpu, latencies


async def _measure(
    fn: Callable[[int], Any], trajectories: int, repeats: int, min_calls: int
) -> dict[str, float]:
    """Best of ``repeats`` runs, repeated more at small sizes to measure ``min_calls``."""
    await fn(min(trajectories, 100))  # warm-up: imports, caches, first-call binding
    best: _Run | None = None
    for _ in range(max(repeats, min_calls // (trajectories * CALLS_PER_TRAJECTORY))):
        gc.collect()
        result = await fn(trajectories)
        if best is None or result[0] < best[0]:
            best = result
    assert best is not None
    elapsed, cpu, latencies = best
    calls = trajectories * CALLS_PER_TRAJECTORY
    return {
        "us_per_call": elapsed / calls * 1e6,
        "cpu_us_per_call": cpu / calls * 1e6,
        "calls_per_s": calls / elapsed,
        **summarize(latencies),
    }


_PATHS: dict[str, Callable[[int], Any]] = {"exec": _exec, "call": _call, "naive": _naive}
FULL_SIZES = (10, 100, 1000, 10000)
#: ``--quick`` (docs/benchmarks.md promises about 30 s on a quiet 2-core machine).
QUICK_SIZES = (10, 100, 1000)


def run(
    *, quick: bool = False, out: Path, backends: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Run the dispatch benchmark, print a table, write ``out/dispatch.json`` and ``.png``.

    ``quick``: asyncio only, one repeat, fewer calls, up to 1,000 trajectories (10,000
    alone took 20-90 s here, most of the run).
    """
    if backends is None:
        backends = ("asyncio",) if quick else ("asyncio", "trio")
    sizes = QUICK_SIZES if quick else FULL_SIZES
    repeats = 1 if quick else 3
    min_calls = 2_000 if quick else 40_000
    load_before = os.getloadavg()
    rows: list[list[Any]] = []
    results: list[dict[str, Any]] = []
    for backend in backends:
        for n in sizes:
            progress(f"dispatch: {backend}, {n:,} trajectories")
            row: dict[str, Any] = {"backend": backend, "trajectories": n}
            for name, fn in _PATHS.items():
                row[name] = anyio.run(
                    functools.partial(_measure, fn, n, repeats, min_calls), backend=backend
                )
            row["call_over_exec"] = row["call"]["us_per_call"] / row["exec"]["us_per_call"]
            row["naive_over_call"] = row["naive"]["us_per_call"] / row["call"]["us_per_call"]
            results.append(row)
            rows.append(
                [
                    backend,
                    n,
                    row["exec"]["us_per_call"],
                    row["call"]["us_per_call"],
                    row["naive"]["us_per_call"],
                    row["exec"]["cpu_us_per_call"],
                    row["call"]["cpu_us_per_call"],
                    row["call"]["p50_us"],
                    row["call"]["p99_us"],
                    row["call_over_exec"],
                ]
            )

    def growth(path: str, b: str) -> float:
        per = {r["trajectories"]: r[path]["us_per_call"] for r in results if r["backend"] == b}
        return float(per[sizes[-1]] / per[sizes[0]])

    growths = {b: {p: growth(p, b) for p in ("exec", "call")} for b in backends}
    payload = {
        "benchmark": "dispatch",
        "calls_per_trajectory": CALLS_PER_TRAJECTORY,
        "quick": quick,
        "machine": machine_info(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "results": results,
        f"growth_10_to_{sizes[-1]}": growths,
        "targets": {
            "call_us_per_call_at_1000_asyncio": 15.0,
            "growth_max": 1.3,
            "call_over_exec_max": 1.5,
        },
    }
    print_table(
        "dispatch overhead per call (zero-latency FakeBackend): exec, call, naive side by side",
        [
            "backend",
            "N",
            "exec µs",
            "call µs",
            "naive µs",
            "exec CPU µs",
            "call CPU µs",
            "call p50 µs",
            "call p99 µs",
            "call/exec",
        ],
        rows,
    )
    print(
        f"growth 10 -> {sizes[-1]:,} trajectories: "
        + "; ".join(f"{b} exec {g['exec']:.2f}x call {g['call']:.2f}x" for b, g in growths.items())
    )
    print("load average before/after: " + f"{load_before} / {os.getloadavg()}")
    finish("dispatch", payload, out)
    return payload

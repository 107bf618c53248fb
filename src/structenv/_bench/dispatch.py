"""Dispatch overhead per tool call: executor -> batcher -> zero-latency FakeBackend.

N trajectories each make 20 sequential ``exec`` calls of an instant command. The time from
the moment all of them hold their slot to the moment the last call returns, divided by the
number of calls, is the per-call overhead of the structured path (µs/call; its inverse is
calls/s). Per-call latencies give p50/p99.

In the same run, the same workload goes through a *naive* batcher that allocates a fresh reply
memory stream per call (the design the brief measured at ~47 µs/call): the ratio between the
two is the claim, since absolute numbers on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import functools
import gc
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectSendStream

from .._config import ExecutorConfig
from .._executor import ToolExecutor
from .._types import ExecRequest, ExecResult
from ..abc import Slot
from ..testing import FakeBackend
from ._report import finish, machine_info, print_table, progress, summarize

__all__ = ["run"]

CALLS_PER_TRAJECTORY = 20
_TRUE = ExecRequest("true")


async def _structured(trajectories: int) -> tuple[float, list[float]]:
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
            start = time.perf_counter()
            go.set()
            # Measure until the last call returns (releases happen after, excluded).
            await all_done.wait()
            elapsed = time.perf_counter() - start
    return elapsed, latencies


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


async def _naive(trajectories: int) -> tuple[float, list[float]]:
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
            start = time.perf_counter()
            go.set()
            await all_done.wait()
            elapsed = time.perf_counter() - start
        naive.send.close()
    naive.recv.close()
    return elapsed, latencies


async def _measure(
    fn: Callable[[int], Any], trajectories: int, repeats: int, min_calls: int
) -> dict[str, float]:
    """Best of ``repeats`` runs, repeated more at small sizes to measure ``min_calls``."""
    await fn(min(trajectories, 100))  # warm-up: imports, caches, first-call binding
    best: tuple[float, list[float]] | None = None
    for _ in range(max(repeats, min_calls // (trajectories * CALLS_PER_TRAJECTORY))):
        gc.collect()
        result = await fn(trajectories)
        if best is None or result[0] < best[0]:
            best = result
    assert best is not None
    elapsed, latencies = best
    calls = trajectories * CALLS_PER_TRAJECTORY
    return {
        "us_per_call": elapsed / calls * 1e6,
        "calls_per_s": calls / elapsed,
        **summarize(latencies),
    }


def run(
    *, quick: bool = False, out: Path, backends: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Run the dispatch benchmark, print a table, write ``out/dispatch.json`` and ``.png``.

    ``quick``: asyncio only, fewer calls, the naive baseline up to 1,000 trajectories.
    """
    if backends is None:
        backends = ("asyncio",) if quick else ("asyncio", "trio")
    sizes = (10, 100, 1000, 10000)
    repeats = 1 if quick else 3
    min_calls = 2_000 if quick else 40_000
    # The naive baseline costs ~5x more; quick mode compares it up to 1,000 trajectories.
    naive_sizes = sizes[:3] if quick else sizes
    rows: list[list[Any]] = []
    results: list[dict[str, Any]] = []
    for backend in backends:
        for n in sizes:
            progress(f"dispatch: {backend}, {n:,} trajectories")
            structured = anyio.run(
                functools.partial(_measure, _structured, n, repeats, min_calls), backend=backend
            )
            if n in naive_sizes:
                naive = anyio.run(
                    functools.partial(_measure, _naive, n, repeats, min_calls), backend=backend
                )
            else:
                naive = {"us_per_call": math.nan}
            ratio = naive["us_per_call"] / structured["us_per_call"]
            results.append(
                {
                    "backend": backend,
                    "trajectories": n,
                    "structured": structured,
                    "naive_reply_stream": naive,
                    "speedup_vs_naive": ratio,
                }
            )
            rows.append(
                [
                    backend,
                    n,
                    structured["us_per_call"],
                    structured["calls_per_s"],
                    structured["p50_us"],
                    structured["p99_us"],
                    naive["us_per_call"],
                    ratio,
                ]
            )
    growth = {
        b: next(
            r["structured"]["us_per_call"]
            for r in results
            if r["backend"] == b and r["trajectories"] == sizes[-1]
        )
        / next(
            r["structured"]["us_per_call"]
            for r in results
            if r["backend"] == b and r["trajectories"] == sizes[0]
        )
        for b in backends
    }
    payload = {
        "benchmark": "dispatch",
        "calls_per_trajectory": CALLS_PER_TRAJECTORY,
        "quick": quick,
        "machine": machine_info(),
        "results": results,
        "growth_10_to_10000": growth,
        "targets": {"us_per_call_at_1000_asyncio": 15.0, "growth_max": 1.3},
    }
    print_table(
        "dispatch overhead per tool call (zero-latency FakeBackend)",
        ["backend", "N", "µs/call", "calls/s", "p50 µs", "p99 µs", "naive µs", "ratio"],
        rows,
    )
    print(
        "growth 10 -> 10,000 trajectories: " + ", ".join(f"{b} {g:.2f}x" for b, g in growth.items())
    )
    finish("dispatch", payload, out)
    return payload

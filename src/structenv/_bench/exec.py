"""Exec round trip: the full stack vs the slot API vs raw bubblewrap spawn vs fork/exec.

``structenv bench exec [--quick]`` runs it. Everything is measured in the same run, on the
same machine state, running the external program ``/bin/true`` (not a shell builtin):

- the full stack: ``Trajectory.exec`` -> batcher -> pool's slot -> sandbox server -> slot
  worker -> sandboxed process, with 1, 2, 16 and 64 concurrent trajectories;
- the slot API alone (client -> server -> worker), and the batched host path;
- a fresh ``bwrap ... /bin/true`` per command (what a naive sandbox pays);
- a plain ``fork/exec`` of ``/bin/true`` through ``anyio.run_process`` (what an async program
  pays without a sandbox);
- the layers underneath, each driven by a blocking loop in a thread (``_layers``): a bare
  ``posix_spawn`` + ``waitpid`` (the machine's floor), the slot worker alone in its sandbox,
  the sandbox server alone, and the cost of a process wake-up on the same or the other CPU.

``layers`` in the results subtracts neighbouring c1 medians: what the worker, the server hop,
the async client and the executor each add to a command.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio

from .._config import ExecutorConfig
from .._executor import ToolExecutor
from .._types import ExecRequest, ExecResult
from ..backends import LocalBackend
from ..sandbox import Isolation, RemoteSlot, bwrap_argv, default_uid_base, slot_uid
from . import _layers
from ._report import finish, print_table, progress
from ._report import measure_latencies as _measure
from ._report import summarize_ms as _summary

__all__ = ["run", "run_exec_bench"]

COMMAND = _layers.COMMAND
_T = TypeVar("_T")
TARGET_P50_MS = 1.0
TARGET_THROUGHPUT = 1500.0


async def _slot_api(quick: bool) -> dict[str, Any]:
    levels = (1, 16) if quick else (1, 2, 16, 64)
    total = 200 if quick else 4000
    hosts = 2
    results: dict[str, Any] = {}
    async with LocalBackend(hosts=hosts, slots_per_host=max(levels) // hosts) as backend:
        slots = [await backend.acquire_slot() for _ in range(max(levels))]
        request = ExecRequest(COMMAND, timeout=30)

        async def op(index: int) -> None:
            result = await slots[index].exec(request)
            if not result.ok:
                raise RuntimeError(f"benchmark command failed: {result}")

        await _measure(8, 20, op)  # warm up connections and page caches
        for c in levels:
            progress(f"exec: slot API, {c} concurrent callers")
            results[f"c{c}"] = await _measure(c, max(total // c, 20), op)
        # The batcher's path: one streamed request per host carrying every pending call.
        for c in levels[1:]:
            progress(f"exec: slot API batched, {c} slots")
            results[f"batched_c{c}"] = await _batched(backend, slots[:c], max(total // c, 10))
        for slot in slots:
            await backend.release_slot(slot, reusable=True)
    return results


async def _full_stack(quick: bool) -> dict[str, Any]:
    """Closed loop per trajectory through the executor, as an env's tool calls run."""
    levels = (1, 16) if quick else (1, 2, 16, 64)
    total = 200 if quick else 4000
    hosts = 2
    results: dict[str, Any] = {}
    config = ExecutorConfig(tool_deadline_grace=5)
    async with (
        LocalBackend(hosts=hosts, slots_per_host=max(levels) // hosts) as backend,
        ToolExecutor(backend, config=config) as executor,
    ):
        request = ExecRequest(COMMAND, timeout=30)
        for c in levels:
            progress(f"exec: full stack, {c} concurrent trajectories")
            latencies: list[float] = []

            async def trajectory(rounds: int, latencies: list[float] = latencies) -> None:
                async with executor.trajectory() as traj:
                    for _ in range(rounds):
                        start = time.perf_counter()
                        result = await traj.exec(request)
                        latencies.append(time.perf_counter() - start)
                        if not result.ok:
                            raise RuntimeError(f"benchmark command failed: {result}")

            async with anyio.create_task_group() as tg:  # warm-up
                for _ in range(c):
                    tg.start_soon(trajectory, 5, [])
            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(c):
                    tg.start_soon(trajectory, max(total // c, 20))
            results[f"c{c}"] = _summary(latencies, time.perf_counter() - start)
    return results


async def _batched(backend: LocalBackend, slots: list[Any], rounds: int) -> dict[str, float]:
    """Closed loop: each round sends one call per slot via ``backend.exec_batch``, one
    batch per host at once (``exec_batch`` takes one host's slots, as the batcher sends)."""
    request = ExecRequest(COMMAND, timeout=30)
    per_host: dict[str, list[Any]] = {}
    for slot in slots:
        per_host.setdefault(slot.host_id, []).append(slot)
    latencies: list[float] = []
    start = time.perf_counter()
    for _ in range(rounds):
        sent = time.perf_counter()

        def on_result(_: int, result: object, sent: float = sent) -> None:
            if not (isinstance(result, ExecResult) and result.ok):
                raise RuntimeError(f"benchmark command failed: {result}")
            latencies.append(time.perf_counter() - sent)

        async with anyio.create_task_group() as tg:
            for group in per_host.values():
                tg.start_soon(backend.exec_batch, [(slot, request) for slot in group], on_result)
    return _summary(latencies, time.perf_counter() - start)


async def _spawn(argv: list[str], quick: bool) -> dict[str, Any]:
    async def op(_: int) -> None:
        await anyio.run_process(argv, check=True)

    out: dict[str, Any] = {"c1": await _measure(1, 50 if quick else 500, op)}
    out["c16"] = await _measure(16, 10 if quick else 50, op)
    return out


async def _layers_below(quick: bool) -> dict[str, Any]:
    """The blocking drivers of ``_layers``, one after the other, each in a worker thread."""
    n = 100 if quick else 2000
    # One driver at a time, on a limiter of the harness's own (invariant 3).
    limiter = anyio.CapacityLimiter(1)

    async def run(driver: Callable[..., _T], *args: Any) -> _T:
        return await anyio.to_thread.run_sync(driver, *args, limiter=limiter)

    out: dict[str, Any] = {
        "posix_spawn_floor": {"c1": _summary(*await run(_layers.posix_spawn_floor, n))}
    }
    wakeups: dict[str, Any] = {}
    for name, same in (("same_cpu", True), ("other_cpu", False)):
        measured = await run(functools.partial(_layers.wakeup_rtt, n * 10, same_cpu=same))
        if measured is not None:
            wakeups[name] = _summary(*measured)
    out["wakeup_rtt"] = wakeups
    # The hardened worker and the pre-hardening command line, interleaved in rounds so
    # drift on a shared machine hits both alike: the cost of the sandbox hardening.
    samples: dict[bool, list[float]] = {True: [], False: []}
    walls = {True: 0.0, False: 0.0}
    rounds = 2 if quick else 4
    progress("exec: the layers underneath (spawn floor, wake-ups, worker, server)")
    with tempfile.TemporaryDirectory(prefix="structenv-bench-") as scratch:
        for _ in range(rounds):
            for hardened in (True, False):
                driver = functools.partial(
                    _layers.worker_only, n // rounds, scratch, hardened=hardened
                )
                latencies, wall = await run(driver)
                samples[hardened] += latencies
                walls[hardened] += wall
    out["worker_only"] = {"c1": _summary(samples[True], walls[True])}
    out["worker_unhardened"] = {"c1": _summary(samples[False], walls[False])}
    async with LocalBackend(hosts=1, slots_per_host=1) as backend:
        slot = await backend.acquire_slot()
        assert isinstance(slot, RemoteSlot) and isinstance(slot.client.address, str)
        body = slot._json(request=ExecRequest(COMMAND, timeout=30).to_wire())
        head = slot.client._head("POST", "/v1/exec", len(body), "application/json")
        driver = functools.partial(_layers.server_only, n, slot.client.address, head, body)
        out["server_only"] = {"c1": _summary(*await run(driver))}
        await backend.release_slot(slot, reusable=True)
    return out


async def run_exec_bench(quick: bool) -> dict[str, Any]:
    """Run the benchmark on the current async backend and return the results.

    Cancellation: the backend and any spawned process are torn down; nothing is returned.
    """
    load = os.getloadavg()  # other work on the machine skews every number below
    with tempfile.TemporaryDirectory(prefix="structenv-bench-") as scratch:
        uid = slot_uid(default_uid_base("bench"), 0)
        bwrap = bwrap_argv(Isolation(), scratch, [COMMAND], uid=uid)
        progress(f"exec: a fresh bwrap per command ({_backend_name()})")
        raw_bwrap = await _spawn(bwrap, quick)
    progress("exec: fork/exec without a sandbox")
    fork_exec = await _spawn([COMMAND], quick)
    below = await _layers_below(quick)
    full_stack = await _full_stack(quick)
    slot_api = await _slot_api(quick)
    best_p50 = full_stack["c1"]["p50_ms"]
    best_throughput = max(v["throughput_per_s"] for v in full_stack.values())
    return {
        "benchmark": "exec",
        "command": COMMAND,
        "quick": quick,
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "async_backend": _backend_name(),
            "load_average_at_start": load,
        },
        "full_stack": full_stack,
        "slot_api": slot_api,
        "raw_bwrap_spawn": raw_bwrap,
        "fork_exec": fork_exec,
        **below,
        "layers": _layer_costs(below, slot_api, full_stack),
        "targets": {"p50_ms": TARGET_P50_MS, "throughput_per_s": TARGET_THROUGHPUT},
        "meets_targets": {
            "p50": best_p50 <= TARGET_P50_MS,
            "throughput": best_throughput >= TARGET_THROUGHPUT,
        },
    }


def _layer_costs(
    below: dict[str, Any], slot_api: dict[str, Any], full_stack: dict[str, Any]
) -> dict[str, float]:
    """What each layer adds to the c1 median, in ms (differences of medians: indicative)."""
    chain = [
        ("posix_spawn", 0.0),
        ("worker", below["posix_spawn_floor"]["c1"]["p50_ms"]),
        ("server_hop", below["worker_only"]["c1"]["p50_ms"]),
        ("async_client", below["server_only"]["c1"]["p50_ms"]),
        ("executor", slot_api["c1"]["p50_ms"]),
    ]
    ends = [p50 for _, p50 in chain[1:]] + [full_stack["c1"]["p50_ms"]]
    return {name: round(end - start, 3) for (name, start), end in zip(chain, ends, strict=True)}


def run(*, quick: bool = False, out: Path) -> dict[str, Any]:
    """Run on asyncio (and trio unless ``quick``), print tables, write ``out/exec.json`` and
    ``out/exec.png``. ``quick``: asyncio only, 1 and 16 callers, a few hundred commands each."""
    backends = ("asyncio",) if quick else ("asyncio", "trio")
    runs = {b: anyio.run(run_exec_bench, quick, backend=b) for b in backends}
    rows: list[list[Any]] = []
    for backend, data in runs.items():
        for path in (
            "full_stack",
            "slot_api",
            "server_only",
            "worker_only",
            "worker_unhardened",
            "raw_bwrap_spawn",
            "fork_exec",
            "posix_spawn_floor",
            "wakeup_rtt",
        ):
            for level, stats in data[path].items():
                rows.append(
                    [
                        backend,
                        path,
                        level,
                        round(stats["p50_ms"] * 1e3),
                        round(stats["p99_ms"] * 1e3),
                        stats["throughput_per_s"],
                    ]
                )
    print_table(
        "exec round trip of /bin/true",
        ["backend", "path", "concurrency", "p50 µs", "p99 µs", "cmds/s"],
        rows,
    )
    print_table(
        "what each layer adds to one command (c1 medians, µs)",
        ["backend", *next(iter(runs.values()))["layers"]],
        [[b, *(round(v * 1e3) for v in d["layers"].values())] for b, d in runs.items()],
    )
    for backend, data in runs.items():
        after, before = data["worker_only"]["c1"], data["worker_unhardened"]["c1"]
        print(
            f"{backend}: the sandbox hardening on the worker layer, side by side: p50 "
            f"{after['p50_ms'] / before['p50_ms']:.3f}x, throughput "
            f"{after['throughput_per_s'] / before['throughput_per_s']:.3f}x "
            "(worker_only vs worker_unhardened; 1.0 = no cost)"
        )
    print(
        "layer costs are differences of medians measured separately: indicative only; a "
        "negative one is noise (that layer costs less than the run-to-run spread)"
    )
    payload = {"benchmark": "exec", "quick": quick, "runs": runs}
    finish("exec", payload, out)
    return payload


def _backend_name() -> str:
    import sniffio

    return sniffio.current_async_library()

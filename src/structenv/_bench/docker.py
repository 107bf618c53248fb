"""DockerBackend on the real engine, side by side with ``docker exec`` per command (the naive way).

Measured in one run, on the same containers:

* **cold start**: ``async with DockerBackend(min_hosts=1)`` until the first slot can be
  leased (create + start the container, the server's bwrap probe, every slot's worker).
* **warm acquire / release**: leasing a free slot (in memory) and giving it back (a reset on
  the server: kill the slot's processes, empty its workspace, new lease).
* **exec round trip**: ``/bin/true`` (an external program, not a shell builtin) on one slot,
  p50/p99, against the 3 ms p50 target; also on trio.
* **throughput** with 1, 4 and 8 containers (4 slots each, every slot busy in a loop).
* **reference**: the same exec on LocalBackend (the same server without a container).
* **naive**: the same ``/bin/true`` through the SDK's ``container.exec_run`` (one ``docker
  exec`` per command; runs unsandboxed in the container), latency and throughput with as many
  concurrent callers.

Needs the image (``structenv image build``). Writes ``benchmarks/results/docker.json``.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any

import anyio

from .._image import DEFAULT_TAG
from .._types import ExecRequest
from ..backends._docker import DockerBackend
from ..backends._local import LocalBackend
from ._report import finish, machine_info, print_table, progress, summarize

__all__ = ["run"]

_TRUE = ExecRequest("/bin/true", timeout=30)
SLOTS_PER_CONTAINER = 4


def _backend(image: str, **options: Any) -> DockerBackend:
    settings: dict[str, Any] = {
        "image": image,
        "slots_per_host": SLOTS_PER_CONTAINER,
        "memory_limit": 1 << 30,
        "workspace_size": 256 << 20,
        "pool": "bench",
    }
    settings.update(options)
    return DockerBackend(**settings)


async def _cold_start(image: str, repeats: int) -> dict[str, Any]:
    starts: list[float] = []
    closes: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend = _backend(image)
        async with backend:
            slot = await backend.acquire_slot()
            starts.append(time.perf_counter() - t0)
            await backend.release_slot(slot, reusable=True)
            t1 = time.perf_counter()
        closes.append(time.perf_counter() - t1)
    return {
        "start_ms": [round(s * 1e3, 1) for s in starts],
        "start_p50_ms": sorted(starts)[len(starts) // 2] * 1e3,
        "close_p50_ms": sorted(closes)[len(closes) // 2] * 1e3,
    }


async def _warm(image: str, calls: int) -> dict[str, Any]:
    acquire: list[float] = []
    release: list[float] = []
    exec_rt: list[float] = []
    async with _backend(image) as backend:
        for _ in range(min(calls, 300)):
            t0 = time.perf_counter()
            slot = await backend.acquire_slot()
            t1 = time.perf_counter()
            await backend.release_slot(slot, reusable=True)
            acquire.append(t1 - t0)
            release.append(time.perf_counter() - t1)
        slot = await backend.acquire_slot()
        try:
            for _ in range(20):
                await slot.exec(_TRUE)
            for _ in range(calls):
                t0 = time.perf_counter()
                result = await slot.exec(_TRUE)
                exec_rt.append(time.perf_counter() - t0)
                assert result.exit_code == 0, result
            sandboxed = result.sandboxed
        finally:
            with anyio.move_on_after(30, shield=True):
                await backend.release_slot(slot, reusable=True)
    return {
        "acquire": summarize(acquire),
        "release_reset": summarize(release),
        "exec_true": summarize(exec_rt),
        "exec_calls": calls,
        "sandboxed": sandboxed,
    }


async def _exec_local(calls: int) -> dict[str, float]:
    """The same exec on LocalBackend (same server, no container): the container's overhead."""
    return await _exec_trio("", calls, local=True)


async def _exec_trio(image: str, calls: int, *, local: bool = False) -> dict[str, float]:
    latencies: list[float] = []
    backend = (
        LocalBackend(hosts=1, slots_per_host=SLOTS_PER_CONTAINER) if local else _backend(image)
    )
    async with backend:
        slot = await backend.acquire_slot()
        try:
            for _ in range(20):
                await slot.exec(_TRUE)
            for _ in range(calls):
                t0 = time.perf_counter()
                await slot.exec(_TRUE)
                latencies.append(time.perf_counter() - t0)
        finally:
            with anyio.move_on_after(30, shield=True):
                await backend.release_slot(slot, reusable=True)
    return summarize(latencies)


async def _throughput(
    image: str, containers: int, seconds: float, naive_calls: int
) -> dict[str, Any]:
    t0 = time.perf_counter()
    async with _backend(
        image, min_hosts=containers, creation_concurrency=4, creation_rate=10
    ) as backend:
        started = time.perf_counter() - t0
        slots = [await backend.acquire_slot() for _ in range(backend.capacity)]
        latencies: list[float] = []
        done = 0
        deadline = 0.0

        async def loop(slot: Any) -> None:
            nonlocal done
            now = time.perf_counter
            while now() < deadline:
                t = now()
                await slot.exec(_TRUE)
                latencies.append(now() - t)
                done += 1

        try:
            deadline = time.perf_counter() + seconds
            begin = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for slot in slots:
                    tg.start_soon(loop, slot)
            elapsed = time.perf_counter() - begin
            naive = await _naive(backend, len(slots), naive_calls)
        finally:
            with anyio.move_on_after(30, shield=True):
                for slot in slots:
                    await backend.release_slot(slot, reusable=True)
    return {
        "containers": containers,
        "concurrent_slots": len(slots),
        "start_all_s": started,
        "structenv": {"cmds_per_s": done / elapsed, **summarize(latencies)},
        "naive_docker_exec": naive,
    }


async def _naive(backend: DockerBackend, callers: int, calls: int) -> dict[str, float]:
    """``container.exec_run('/bin/true')`` per command, from ``callers`` concurrent threads."""
    engine = backend._engine
    assert engine is not None
    client = engine.client
    containers = [client.containers.get(cid) for cid in backend.container_ids().values()]
    limiter = anyio.CapacityLimiter(callers)
    latencies: list[float] = []

    def one(container: Any) -> None:
        t = time.perf_counter()
        exit_code, _ = container.exec_run(["/bin/true"])
        latencies.append(time.perf_counter() - t)
        assert exit_code == 0

    async def caller(i: int) -> None:
        container = containers[i % len(containers)]
        for _ in range(max(1, calls // callers)):
            await anyio.to_thread.run_sync(functools.partial(one, container), limiter=limiter)

    begin = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(callers):
            tg.start_soon(caller, i)
    elapsed = time.perf_counter() - begin
    return {"cmds_per_s": len(latencies) / elapsed, **summarize(latencies)}


def run(*, quick: bool = False, out: Path, image: str = DEFAULT_TAG) -> dict[str, Any]:
    """Run the Docker benchmark, print tables, write ``out/docker.json`` and ``.png``.

    ``quick``: asyncio only, fewer calls, shorter throughput windows.
    """
    calls = 300 if quick else 3000
    seconds = 1.5 if quick else 5.0
    naive_calls = 16 if quick else 64
    progress(f"docker: cold starts of {image}")
    cold = anyio.run(_cold_start, image, 2 if quick else 5)
    progress("docker: warm acquire, release, exec")
    warm = anyio.run(_warm, image, calls)
    nan = {"p50_us": math.nan, "p99_us": math.nan, "mean_us": math.nan}
    if quick:
        trio_exec = nan
    else:
        progress("docker: exec on trio")
        trio_exec = anyio.run(_exec_trio, image, calls, backend="trio")
    progress("docker: exec on LocalBackend (reference)")
    local_exec = anyio.run(_exec_local, calls)
    progress("docker: naive docker exec")
    naive_single = anyio.run(_naive_latency, image, 20 if quick else 60)
    scaling = []
    for n in (1, 4, 8):
        progress(f"docker: throughput, {n} containers")
        scaling.append(anyio.run(_throughput, image, n, seconds, naive_calls))
    payload = {
        "benchmark": "docker",
        "quick": quick,
        "image": image,
        "machine": machine_info(),
        "slots_per_container": SLOTS_PER_CONTAINER,
        "sandboxed": warm["sandboxed"],
        "cold_start": cold,
        "warm": warm,
        "exec_true_trio": trio_exec,
        "exec_true_local_backend": local_exec,
        "naive_docker_exec_single": naive_single,
        "throughput": scaling,
        "targets": {"exec_p50_ms": 3.0},
        "notes": (
            "exec = /bin/true through the sandbox server in the container (bwrap slot, unix "
            "socket; sandboxed as reported); naive = container.exec_run per command (docker "
            "exec, unsandboxed inside the container). Latencies in microseconds."
        ),
    }
    print_table(
        "DockerBackend: single slot, /bin/true (µs)",
        ["what", "p50", "p99", "mean"],
        [
            ["warm acquire", *warm["acquire"].values()],
            ["release (reset)", *warm["release_reset"].values()],
            ["exec asyncio", *warm["exec_true"].values()],
            ["exec trio", *trio_exec.values()],
            ["exec LocalBackend (ref.)", *local_exec.values()],
            ["naive docker exec", *[naive_single[k] for k in ("p50_us", "p99_us", "mean_us")]],
        ],
    )
    print_table(
        "throughput, /bin/true, 4 slots per container",
        [
            "containers",
            "slots",
            "start s",
            "cmds/s",
            "p50 µs",
            "p99 µs",
            "naive cmds/s",
            "naive p50",
        ],
        [
            [
                r["containers"],
                r["concurrent_slots"],
                r["start_all_s"],
                r["structenv"]["cmds_per_s"],
                r["structenv"]["p50_us"],
                r["structenv"]["p99_us"],
                r["naive_docker_exec"]["cmds_per_s"],
                r["naive_docker_exec"]["p50_us"],
            ]
            for r in scaling
        ],
    )
    print(f"cold start p50 {cold['start_p50_ms']:.0f} ms (runs: {cold['start_ms']})")
    finish("docker", payload, out)
    return payload


async def _naive_latency(image: str, calls: int) -> dict[str, float]:
    async with _backend(image) as backend:
        return await _naive(backend, 1, calls)

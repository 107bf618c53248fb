"""RayBackend vs LocalBackend: exec round trip, throughput, and the time to start N hosts.

``structenv bench ray [--quick]`` starts a local Ray cluster (head + 2 worker nodes, on
loopback, no dashboard; ``ray.cluster_utils.Cluster``, shut down by its own handles — never
``ray stop``), then measures in the same run:

- **start N hosts**: ``async with RayBackend(min_hosts=N)`` (8 slots each) until it serves
  (N = 1, 2, 4);
- **exec round trip**: ``/bin/true`` on one slot, sequential, through RayBackend (TCP to the
  sandbox server on a worker node) and through LocalBackend (unix socket, same machine);
- **throughput**: 16 concurrent callers on 2 hosts x 8 slots, for both backends (the Ray one
  is the started 2-host backend of the start measurements).

Ray is only the control plane: the exec path is the same sandbox server and client for both,
so the difference is TCP + bearer token vs a unix socket.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio

from .._types import ExecRequest
from ..abc import SandboxBackend
from ..backends import LocalBackend, RayBackend
from ._report import machine_info, print_table, summarize, write_results

__all__ = ["measure", "run"]

_TRUE = ExecRequest("/bin/true", timeout=30)


async def _round_trip(backend: SandboxBackend, calls: int) -> dict[str, float]:
    slot = await backend.acquire_slot()
    try:
        latencies = []
        for _ in range(calls):
            t = time.perf_counter()
            result = await slot.exec(_TRUE)
            latencies.append(time.perf_counter() - t)
            assert result.exit_code == 0, result
    finally:
        await backend.release_slot(slot, reusable=True)
    return summarize(latencies)


async def _throughput(backend: SandboxBackend, callers: int, calls: int) -> dict[str, float]:
    slots = [await backend.acquire_slot() for _ in range(callers)]
    latencies: list[float] = []

    async def caller(i: int) -> None:
        for _ in range(max(1, calls // callers)):
            t = time.perf_counter()
            await slots[i].exec(_TRUE)
            latencies.append(time.perf_counter() - t)

    begin = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(callers):
            tg.start_soon(caller, i)
    elapsed = time.perf_counter() - begin
    for slot in slots:
        await backend.release_slot(slot, reusable=True)
    return {"cmds_per_s": len(latencies) / elapsed, **summarize(latencies)}


async def _exec_numbers(backend: SandboxBackend, calls: int, callers: int) -> dict[str, Any]:
    return {
        "round_trip": await _round_trip(backend, calls),
        f"throughput_{callers}": await _throughput(backend, callers, calls * 4),
    }


async def measure(
    *,
    calls: int,
    host_counts: tuple[int, ...] = (1, 2, 4),
    hosts: int = 2,
    slots_per_host: int = 8,
    callers: int = 16,
) -> dict[str, Any]:
    """Measure with the Ray this process is connected to (``ray.init`` done).

    ``host_counts``: the N of "start N hosts" (``slots_per_host`` slots each); round trip
    and throughput (``callers`` concurrent callers, ``calls * 4`` commands in all) on
    ``hosts`` x ``slots_per_host`` slots of each backend (the Ray one is the started
    backend of ``hosts`` hosts when ``hosts`` is one of ``host_counts``).
    """
    out: dict[str, Any] = {"start_hosts": []}
    for n in sorted({*host_counts, hosts}):
        t = time.perf_counter()
        async with RayBackend(min_hosts=n, slots_per_host=slots_per_host, num_cpus=0) as backend:
            if n in host_counts:
                out["start_hosts"].append(
                    {"hosts": n, "seconds": round(time.perf_counter() - t, 3)}
                )
            if n == hosts:
                out["ray"] = await _exec_numbers(backend, calls, callers)
    async with LocalBackend(hosts=hosts, slots_per_host=slots_per_host) as local:
        out["local"] = await _exec_numbers(local, calls, callers)
    return out


def run(*, quick: bool = False, out: Path) -> dict[str, Any]:
    """Start a local cluster, measure, print tables, write ``out/ray.json``."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # stay on loopback
    import ray
    from ray.cluster_utils import Cluster

    t = time.perf_counter()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2)
        cluster_s = time.perf_counter() - t
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            results = anyio.run(lambda: measure(calls=200 if quick else 2000))
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()  # type: ignore[no-untyped-call]
    payload = {
        "benchmark": "ray",
        "quick": quick,
        "machine": machine_info(),
        "cluster": {"nodes": 3, "start_seconds": round(cluster_s, 3)},
        **results,
        "notes": (
            "exec = /bin/true in a bwrap slot; ray = RayBackend (sandbox server started by a "
            "Ray actor on a worker node, TCP + bearer token on loopback), local = LocalBackend "
            "(unix socket). Latencies in microseconds; start_hosts = seconds until "
            "RayBackend(min_hosts=N) serves."
        ),
    }
    rows = []
    for name in ("ray", "local"):
        r = results[name]
        rows.append([f"{name} round trip", *(f"{v:.0f}" for v in r["round_trip"].values()), ""])
        tp = r["throughput_16"]
        rows.append(
            [f"{name} 16 callers", f"{tp['p50_us']:.0f}", f"{tp['p99_us']:.0f}",
             f"{tp['mean_us']:.0f}", f"{tp['cmds_per_s']:.0f}"]
        )  # fmt: skip
    print_table(
        "RayBackend vs LocalBackend: /bin/true (µs)", ["what", "p50", "p99", "mean", "/s"], rows
    )
    print_table(
        "RayBackend: time to start N hosts",
        ["hosts", "seconds"],
        [[str(s["hosts"]), f"{s['seconds']:.2f}"] for s in results["start_hosts"]],
    )
    print(f"wrote {write_results('ray', payload, out)}")
    return payload

"""A cold Local slot through the pool, two server trees side by side in one run.

``python3 benchmarks/cold_slot_pool.py --image TAG --tree OLD/src --tree src [--rounds N]``
(as root; the image's rootfs must be exported already, e.g. by ``structenv bench specs``)
starts one LocalBackend (1 host, 2 slots) per tree, its host's sandbox server running that
tree's code (``PYTHONPATH`` of the host process; the client is this checkout's), and then
alternates items between them, as the Local half of ``structenv bench specs`` does: a warm
item of the spec, every slot taken over by another spec, then a cold item of the spec
(``pool.slot(spec)``, a rebuild on a running host) and its first exec. Paired samples under
the same load; prints p50/p90/p99 per tree and the median paired difference, and writes
``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
from pathlib import Path
from typing import Any

import anyio

from structenv._bench.specs import _hold, _item_to_exec
from structenv._pool import SlotPool
from structenv._spec import SandboxSpec
from structenv.backends._local import LocalBackend


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1e3


async def _run(image: str, trees: list[str], rounds: int) -> dict[str, Any]:
    spec = SandboxSpec(image=image, name="task-image")
    other = SandboxSpec(env={"BENCH_OTHER": "1"}, name="other")
    out: dict[str, dict[str, list[float]]] = {
        t: {"warm_acquire": [], "cold_acquire": [], "cold_first_exec": []} for t in trees
    }
    async with contextlib.AsyncExitStack() as stack:
        pools = []
        for tree in trees:
            os.environ["PYTHONPATH"] = tree  # the host process LocalBackend starts
            backend = await stack.enter_async_context(LocalBackend(hosts=1, slots_per_host=2))
            await backend.prepare_spec(spec)
            pools.append((tree, backend, SlotPool(backend, acquire_timeout=600)))
        for _, _, pool in pools:
            await _item_to_exec(pool, spec)
        load0 = os.getloadavg()[0]
        for _ in range(rounds):
            for tree, backend, pool in pools:
                acquire, _ = await _item_to_exec(pool, spec)
                out[tree]["warm_acquire"].append(acquire)
                async with anyio.create_task_group() as tg:
                    for _ in range(backend.capacity):
                        tg.start_soon(_hold, pool, other)
                acquire, total = await _item_to_exec(pool, spec)
                out[tree]["cold_acquire"].append(acquire)
                out[tree]["cold_first_exec"].append(total)
        load1 = os.getloadavg()[0]
    return {"load_average": [load0, load1], "raw_seconds": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image", required=True)
    p.add_argument("--tree", action="append", required=True)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--json")
    args = p.parse_args()
    report = anyio.run(_run, args.image, args.tree, args.rounds)
    load0, load1 = report["load_average"]
    print(f"load average {load0:.2f} -> {load1:.2f} (1 min), 2 cores")
    raw = report["raw_seconds"]
    for tree, columns in raw.items():
        cells = [
            f"{name} p50 {_pct(v, 50):.1f} p90 {_pct(v, 90):.1f} p99 {_pct(v, 99):.1f}"
            for name, v in columns.items()
        ]
        print(f"{tree}: " + "; ".join(cells) + " (ms)")
    first, last = args.tree[0], args.tree[-1]
    pairs = zip(raw[first]["cold_acquire"], raw[last]["cold_acquire"], strict=True)
    median = statistics.median(a - b for a, b in pairs) * 1e3
    print(f"cold acquire, paired difference first - last tree: median {median:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

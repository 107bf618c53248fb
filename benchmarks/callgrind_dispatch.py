"""Instructions per call of the dispatch benchmark's workload, counted by callgrind.

    python benchmarks/callgrind_dispatch.py asyncio 1000 call   # or exec; trio; any N

Runs the workload of ``structenv bench dispatch`` (``FakeBackend`` with 4 hosts, N
trajectories of 20 sequential calls, after a warm-up run of 100 trajectories) under
``valgrind --tool=callgrind --instr-atstart=no`` and switches instrumentation on only over the
measured span (all trajectories hold their slot → the last call returned), through a tiny C
helper built with ``cc`` against ``valgrind/callgrind.h``. Prints the instructions per call;
the callgrind file is kept for ``callgrind_annotate``. Load does not change the count: this is
the before/after measurement of docs/benchmarks.md. Needs valgrind, its headers and a C
compiler.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CALLS = 20
_HELPER = r"""
#include <valgrind/callgrind.h>
void cg_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void cg_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS_AT("span"); }
"""


def _workload(loop: str, n: int, path: str, helper: str) -> None:
    import anyio

    from structenv import ExecRequest, ExecutorConfig, ToolCall, ToolExecutor
    from structenv.testing import FakeBackend

    lib = ctypes.CDLL(helper)
    request = ExecRequest("true")
    tool_call = ToolCall("terminal", {"command": "true"}, id="bench")

    async def run(size: int, measure: bool) -> None:
        backend = FakeBackend(hosts=4, slots_per_host=math.ceil(size / 4))
        config = ExecutorConfig(max_pending_calls=max(4096, size))
        ready = done = 0
        go, all_ready, all_done = anyio.Event(), anyio.Event(), anyio.Event()
        async with backend, ToolExecutor(backend, config=config) as executor:

            async def member() -> None:
                nonlocal ready, done
                async with executor.trajectory() as traj:
                    ready += 1
                    if ready == size:
                        all_ready.set()
                    await go.wait()
                    for _ in range(CALLS):
                        if path == "call":
                            await traj.call(tool_call)
                        else:
                            await traj.exec(request)
                    done += 1
                    if done == size:
                        all_done.set()

            async with anyio.create_task_group() as tg:
                for _ in range(size):
                    tg.start_soon(member)
                await all_ready.wait()
                gc.collect()
                if measure:
                    lib.cg_start()
                go.set()
                await all_done.wait()
                if measure:
                    lib.cg_stop()

    anyio.run(run, min(n, 100), False, backend=loop)
    anyio.run(run, n, True, backend=loop)


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--inside":
        _workload(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
        return 0
    if len(sys.argv) != 4 or sys.argv[3] not in ("exec", "call"):
        print("usage: callgrind_dispatch.py asyncio|trio N exec|call", file=sys.stderr)
        return 2
    loop, n, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    work = Path(tempfile.mkdtemp(prefix="callgrind-dispatch-"))
    (work / "helper.c").write_text(_HELPER)
    helper = work / "helper.so"
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", helper, work / "helper.c"], check=True)
    out = work / "callgrind.out"
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}.%p",
            sys.executable,
            __file__,
            "--inside",
            loop,
            str(n),
            path,
            str(helper),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ,
    )
    for dump in sorted(work.glob("callgrind.out.*")):
        text = dump.read_text(errors="replace")
        if "Trigger: Client Request: span" in text:
            total = int(next(x for x in text.splitlines() if x.startswith("totals:")).split()[1])
            print(f"{loop} {n} {path}: {total // (n * CALLS):,} instructions per call ({dump})")
            return 0
    print(f"no span dump in {work}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

"""Where a cold Local slot's time goes, per step of the server's rebuild, before and after.

``python3 benchmarks/cold_slot.py --rootfs DIR [--tree SRC ...] [--rounds R] [--chunks C]``
(as root) runs, for each source tree ``SRC`` (a ``src`` directory; default: this
checkout's), a child process that starts a sandbox server's slot in-process (its own mount
namespace, cgroups, seccomp, slot uid: what ``python -m structenv.sandbox`` does) and
rebuilds it ``R`` times for alternating specs on the image rootfs ``DIR`` (a cold slot:
``SlotRuntime.hard_reset(spec)`` then the first exec of ``/bin/true``). The trees run in
alternating chunks (``--chunks``), so the machine's drift hits all alike; the load average
is printed before and after.

Each step of the rebuild is timed by wrapping the runtime's functions (names missing from a
tree are skipped): wall and CPU (``time.process_time`` of the server process: its event
loop and its threads) milliseconds, p50 over the rebuilds. ``spawn->hello`` is from the
sandbox's spawn (bwrap under the cgroup's ``sh``) to the worker's hello.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: (module attribute path, label): functions timed when the tree has them.
STEPS = [
    ("_runtime.SlotRuntime._kill_sandbox", "kill old sandbox"),
    ("_runtime.SlotRuntime._reap", "reap old (background)"),
    ("_runtime.unmount", "unmount"),
    ("_runtime._wipe", "wipe workspace"),
    ("_runtime.SlotRuntime._drop_scratch", "drop /tmp,/dev/shm,pts"),
    ("_runtime.SlotRuntime._mount", "mounts"),
    ("_runtime.SlotRuntime._rootfs_setup", "rootfs accounts/shell"),
    ("_runtime.SlotCgroup", "cgroup setup"),
    ("_runtime.SlotRuntime._cgroup_for", "cgroup setup"),
    ("_seccomp.open_program", "seccomp program"),
    ("_runtime.slot_argv", "argv"),
]


def _child(rootfs: str, rounds: int, release_first: bool) -> None:
    import functools
    import inspect

    from structenv.sandbox import _bwrap, _runtime, _seccomp
    from structenv.sandbox._bwrap import private_mounts

    assert private_mounts(), "needs root (a mount namespace of its own)"
    import anyio

    from structenv._types import ExecRequest
    from structenv.sandbox._server import SandboxServer, ServerConfig

    modules = {"_runtime": _runtime, "_seccomp": _seccomp, "_bwrap": _bwrap}
    current: dict[str, list[float]] = {}

    def record(label: str, wall: float, cpu: float) -> None:
        acc = current.setdefault(label, [0.0, 0.0])
        acc[0] += wall
        acc[1] += cpu

    def wrap(path: str, label: str) -> None:
        mod, *attrs = path.split(".")
        owner: Any = modules[mod]
        for attr in attrs[:-1]:
            owner = getattr(owner, attr, None)
            if owner is None:
                return
        func = getattr(owner, attrs[-1], None)
        if func is None:
            return
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                t, c = time.perf_counter(), time.process_time()
                try:
                    return await func(*args, **kwargs)
                finally:
                    record(label, time.perf_counter() - t, time.process_time() - c)

            setattr(owner, attrs[-1], timed_async)
        else:

            @functools.wraps(func)
            def timed(*args: Any, **kwargs: Any) -> Any:
                t, c = time.perf_counter(), time.process_time()
                try:
                    return func(*args, **kwargs)
                finally:
                    record(label, time.perf_counter() - t, time.process_time() - c)

            setattr(owner, attrs[-1], timed)

    for path, label in STEPS:
        wrap(path, label)
    real_open, real_read = anyio.open_process, _runtime._Pipe.read_frame
    spawned: list[float] = []

    async def open_process(*args: Any, **kwargs: Any) -> Any:
        spawned[:] = [time.perf_counter(), time.process_time()]
        return await real_open(*args, **kwargs)

    async def read_frame(self: Any) -> Any:
        frame = await real_read(self)
        if spawned and frame.get("hello"):
            record(
                "spawn->hello", time.perf_counter() - spawned[0], time.process_time() - spawned[1]
            )
            spawned.clear()
        return frame

    anyio.open_process = open_process  # type: ignore[assignment]
    _runtime._Pipe.read_frame = read_frame  # type: ignore[method-assign]
    start = "_start" if hasattr(_runtime.SlotRuntime, "_start") else "start"
    wrap(f"_runtime.SlotRuntime.{start}", "start (total)")

    async def main() -> list[dict[str, list[float]]]:
        out: list[dict[str, list[float]]] = []
        with tempfile.TemporaryDirectory(dir="/var/tmp") as work:
            server = SandboxServer(
                ServerConfig(slots=1, workdir=work, socket_path=os.path.join(work, "s.sock"))
            )
            specs = [
                _runtime.SlotSpec(key=f"k{i}", rootfs=rootfs, env=(("BENCH", str(i)),))
                for i in range(2)
            ]
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve)
                rt = server.slots[0]
                true = ExecRequest("/bin/true", timeout=30)
                for i in range(rounds + 1):
                    if release_first:
                        # As the pool does: the slot was rebuilt for its last spec when its
                        # last lease was released, a moment before the cold acquire.
                        async with rt.reset_lock:
                            rt.lease += 1
                            await rt.hard_reset(specs[(i + 1) % 2])
                        await rt.exec(true)
                    current.clear()
                    t, c = time.perf_counter(), time.process_time()
                    async with rt.reset_lock:
                        rt.lease += 1
                        await rt.hard_reset(specs[i % 2])
                    t1, c1 = time.perf_counter(), time.process_time()
                    result = await rt.exec(true)
                    assert result.exit_code == 0, result
                    t2, c2 = time.perf_counter(), time.process_time()
                    current["cold acquire (hard_reset)"] = [t1 - t, c1 - c]
                    current["first exec"] = [t2 - t1, c2 - c1]
                    current["cold first exec"] = [t2 - t, c2 - c]
                    if i:  # the first rebuild leaves the default spec's slot
                        out.append({k: list(v) for k, v in current.items()})
                tg.cancel_scope.cancel()
        return out

    print(json.dumps(anyio.run(main)))


def _run_tree(
    tree: str, rootfs: str, rounds: int, release_first: bool
) -> list[dict[str, list[float]]]:
    env = dict(os.environ, PYTHONPATH=tree)
    argv = [sys.executable, __file__, "--child", "--rootfs", rootfs, "--rounds", str(rounds)]
    out = subprocess.run(
        [*argv, *(["--release-first"] if release_first else [])],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{tree}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rootfs", required=True)
    p.add_argument("--tree", action="append", default=[])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--chunks", type=int, default=3)
    p.add_argument("--child", action="store_true")
    p.add_argument(
        "--release-first",
        action="store_true",
        help="rebuild the slot for the other spec just before each timed one (the pool's "
        "release, then a cold acquire)",
    )
    p.add_argument("--json")
    args = p.parse_args()
    if args.child:
        _child(args.rootfs, args.rounds, args.release_first)
        return
    trees = args.tree or [str(ROOT / "src")]
    load0 = os.getloadavg()
    samples: dict[str, list[dict[str, list[float]]]] = {t: [] for t in trees}
    for _ in range(args.chunks):
        for tree in trees:
            samples[tree] += _run_tree(tree, args.rootfs, args.rounds, args.release_first)
    load1 = os.getloadavg()
    print(f"load average before {load0[0]:.2f} / after {load1[0]:.2f} (1 min), 2 cores")
    report: dict[str, Any] = {"load_before": load0[0], "load_after": load1[0], "trees": {}}
    for tree, rows in samples.items():
        labels = list(dict.fromkeys(k for r in rows for k in r))
        table = {}
        print(f"\n{tree}: {len(rows)} cold rebuilds; ms p50 wall / cpu (server process)")
        for label in labels:
            wall = statistics.median(r.get(label, [0, 0])[0] for r in rows) * 1e3
            cpu = statistics.median(r.get(label, [0, 0])[1] for r in rows) * 1e3
            p90 = sorted(r.get(label, [0, 0])[0] for r in rows)[int(len(rows) * 0.9)] * 1e3
            table[label] = {"p50_wall_ms": wall, "p90_wall_ms": p90, "p50_cpu_ms": cpu}
            print(f"  {label:30s} {wall:8.2f} / {cpu:6.2f}   (p90 wall {p90:.2f})")
        report["trees"][tree] = table
    # What is left, outside the server, on the same command lines: bwrap running a bare
    # interpreter (with the uid switch) vs. the worker up to its hello.
    from structenv._bench.specs import _breakdown

    report["spawn_breakdown_ms"] = _breakdown(args.rootfs, args.rounds)
    print(f"\nspawn breakdown (ms p50, outside the server): {report['spawn_breakdown_ms']}")
    report["load_end"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

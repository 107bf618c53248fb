"""Item to first exec, per sandbox spec: warm slot, cold slot, uncached image; Local vs Docker.

One run, side by side, on the same task image (the sandbox image itself, a real Debian
rootfs with python3, git and pytest, used as a *task* image):

* **warm**: the item's spec has a free slot built for it: ``pool.slot(spec)`` then the first
  exec (``/bin/true``). Target: acquire <= 1 ms at p50.
* **cold**: every free slot belongs to another spec: the coldest is rebuilt for this one (a
  new bwrap sandbox with the image's rootfs as ``/`` on a running host), then the first exec.
  Target (Local, cached image rootfs): <= 50 ms.
* **uncached image**: the image's rootfs is not in the cache: export (docker SDK) + cold slot.
* **breakdown** (Local): where a cold slot's time goes, measured outside the server on the
  same command lines: bwrap running ``/bin/true`` with the host's system vs with the image
  rootfs, and bwrap running the worker up to its hello (host interpreter vs host loader).

Writes ``<out>/specs.json`` (``structenv bench specs --out DIR``). Needs the sandbox image
(``structenv image build``).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from .._image import DEFAULT_TAG
from .._pool import SlotPool
from .._spec import SandboxSpec
from .._types import ExecRequest
from ..abc import SandboxBackend
from ._report import machine_info, print_table, summarize, write_results

__all__ = ["run"]

_TRUE = ExecRequest("/bin/true", timeout=30)


async def _item_to_exec(pool: SlotPool, spec: SandboxSpec | None) -> tuple[float, float]:
    """(acquire seconds, acquire + first exec seconds)."""
    t0 = time.perf_counter()
    async with pool.slot(spec) as slot:
        t1 = time.perf_counter()
        await slot.exec(_TRUE)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t0


async def _measure(
    backend: SandboxBackend, spec: SandboxSpec, rounds: int, *, uncached: bool = True
) -> dict[str, Any]:
    """``uncached``: drop the image's export first and time the first item with it (an export
    of the sandbox image takes 20-40 s here); without it (``--quick``) the export is timed
    only if there was none."""
    pool = SlotPool(backend, acquire_timeout=600)
    other = SandboxSpec(env={"BENCH_OTHER": "1"}, name="other")
    # Uncached: drop the image's export, then the first item of the spec.
    entry = _cache_entry(spec)
    if entry is not None and uncached:
        await anyio.to_thread.run_sync(shutil.rmtree, entry, True, limiter=anyio.CapacityLimiter(1))
    exported = entry is None or uncached
    t0 = time.perf_counter()
    await backend.prepare_spec(spec)
    prepare = time.perf_counter() - t0
    _, first = await _item_to_exec(pool, spec)
    first_item = prepare + first if exported else math.nan
    prepare = prepare if exported else math.nan
    warm_acquire: list[float] = []
    warm_total: list[float] = []
    cold_acquire: list[float] = []
    cold_total: list[float] = []
    for _ in range(rounds):
        a, t = await _item_to_exec(pool, spec)
        warm_acquire.append(a)
        warm_total.append(t)
        # Turn every slot over to the other spec, so the next item of ``spec`` is cold.
        async with anyio.create_task_group() as tg:
            for _ in range(backend.capacity):
                tg.start_soon(_hold, pool, other)
        a, t = await _item_to_exec(pool, spec)
        cold_acquire.append(a)
        cold_total.append(t)
    return {
        "load_average": os.getloadavg()[0],  # other work on the machine skews every number
        "uncached_ms": first_item * 1e3,
        "export_ms": prepare * 1e3,
        "warm_acquire": summarize(warm_acquire),
        "warm_first_exec": summarize(warm_total),
        "cold_acquire": summarize(cold_acquire),
        "cold_first_exec": summarize(cold_total),
        "stats": {
            label: {"hits": s.hits, "misses": s.misses, "cold_starts": s.cold_starts}
            for label, s in backend.statistics().specs.items()
        },
    }


async def _hold(pool: SlotPool, spec: SandboxSpec) -> None:
    async with pool.slot(spec) as slot:
        await slot.exec(_TRUE)
        await anyio.sleep(0.05)  # hold it so that every slot is taken over at once


def _cache_entry(spec: SandboxSpec) -> str | None:
    from ..backends._images import rootfs_entry

    assert spec.image is not None
    return rootfs_entry(spec.image)


def _spawn_ms(argv: list[str], pass_fds: tuple[int, ...] = (), *, until_hello: bool) -> float:
    t0 = time.perf_counter()
    with subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=pass_fds,
    ) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        if until_hello:
            proc.stdout.read(4)  # the worker's first frame header: it is up
            elapsed = time.perf_counter() - t0
            proc.kill()
        else:
            proc.wait()
            elapsed = time.perf_counter() - t0
    return elapsed * 1e3


def _breakdown(rootfs: str, rounds: int) -> dict[str, float]:
    """Cold-slot costs measured on the slot's own command lines (blocking)."""
    from ..sandbox import _seccomp
    from ..sandbox._bwrap import Isolation, bwrap_argv, default_uid_base, slot_uid, switch_uid
    from ..sandbox._rootfs import host_loader_argv
    from ..sandbox._runtime import Limits, SlotSpec, slot_argv

    out: dict[str, list[float]] = {}
    iso = Isolation()
    uid = slot_uid(default_uid_base("bench-specs"), 0)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:
        ws = os.path.join(scratch, "ws")
        os.makedirs(ws)
        if uid is not None:
            os.chown(ws, uid, uid)
        program = _seccomp.open_program(os.path.join(scratch, "seccomp.bpf"))
        os.close(program)
        image = SlotSpec(key="bench", rootfs=rootfs, path="/usr/bin:/bin")
        switched = switch_uid(uid)
        for _ in range(rounds):
            for name, spec in (("host", None), ("rootfs", image)):
                fd = _seccomp.open_program(os.path.join(scratch, "seccomp.bpf"))
                try:
                    if switched is not None:
                        # /bin/true cannot drop to the slot uid itself: python -c does it.
                        drop = (
                            "import os,sys; os.setgroups([]); "
                            f"os.setresgid({switched},{switched},{switched}); "
                            f"os.setresuid({switched},{switched},{switched})"
                        )
                        base = ["-I", "-S", "-c", drop]
                        command = (
                            host_loader_argv(base)
                            if spec is not None
                            else [os.path.realpath(_python()), *base]
                        )
                    else:
                        command = ["/bin/true"]
                    argv = bwrap_argv(
                        iso, ws, command, uid=uid, seccomp_fd=fd,
                        rootfs=spec.rootfs if spec else None,
                    )  # fmt: skip
                    out.setdefault(f"bwrap_python_{name}_ms", []).append(
                        _spawn_ms(argv, (fd,), until_hello=False)
                    )
                finally:
                    os.close(fd)
                fd = _seccomp.open_program(os.path.join(scratch, "seccomp.bpf"))
                try:
                    argv = slot_argv(
                        iso, ws, name="bench", limits=Limits(), uid=uid, seccomp_fd=fd,
                        spec=spec or SlotSpec(),
                    )  # fmt: skip
                    out.setdefault(f"worker_hello_{name}_ms", []).append(
                        _spawn_ms(argv, (fd,), until_hello=True)
                    )
                finally:
                    os.close(fd)
    return {k: sorted(v)[len(v) // 2] for k, v in out.items()}


def _python() -> str:
    import sys

    return sys.executable


def run(*, quick: bool = False, out: Path, image: str | None = None) -> dict[str, Any]:
    """Run the benchmark, print the tables, write ``out/specs.json``."""
    from ..backends._docker import DockerBackend
    from ..backends._local import LocalBackend

    image = image or os.environ.get("STRUCTENV_TEST_IMAGE") or DEFAULT_TAG
    rounds = 5 if quick else 20
    spec = SandboxSpec(image=image, name="task-image")
    _cache_entry(spec)  # a missing image is one line (ConfigError) before anything starts

    async def local() -> dict[str, Any]:
        async with LocalBackend(hosts=1, slots_per_host=2) as backend:
            return await _measure(backend, spec, rounds, uncached=not quick)

    async def docker() -> dict[str, Any]:
        async with DockerBackend(image=image, slots_per_host=2, pool="bench") as backend:
            return await _measure(backend, spec, rounds, uncached=not quick)

    results = {"local": anyio.run(local), "docker": anyio.run(docker)}
    entry = _cache_entry(spec)
    assert entry is not None
    breakdown = _breakdown(os.path.join(entry, "root"), 3 if quick else 10)
    rows = []
    for name, r in results.items():
        rows.append(
            [
                name,
                *(
                    r[column][p] / 1e3
                    for column in ("warm_acquire", "warm_first_exec", "cold_acquire",
                                   "cold_first_exec")
                    for p in ("p50_us", "p99_us")
                ),
                r["uncached_ms"],
                r["load_average"],
            ]
        )  # fmt: skip
    print_table(
        f"item -> first exec per spec ({image} as the task image; ms, p50 and p99)",
        ["backend", "warm acquire", "p99", "warm first exec", "p99", "cold acquire", "p99",
         "cold first exec", "p99", "uncached image", "load avg"],
        rows,
    )  # fmt: skip
    print_table(
        "where a cold Local slot's time goes (ms, p50, outside the server)",
        list(breakdown),
        [list(breakdown.values())],
    )
    payload = {"machine": machine_info(), "image": image, **results, "breakdown": breakdown}
    path = write_results("specs", payload, out)
    print(f"wrote {path}")
    return payload

"""Exec-path cost of the sandbox hardening of 2026-12-02, before and after in one run.

``python3 benchmarks/hardening_cost.py [--n N] [--rounds R]`` (as root, from the repository
root) measures the layer the hardening acts on: a slot's worker in its bwrap sandbox, sent
exec frames for ``/bin/true`` by a blocking loop, as ``structenv._bench._layers.worker_only``
does. The variants:

- ``A`` before: the worker of ``4d2ce7f`` under that commit's command line (``--unshare-all``,
  runs as uid 0 of a user namespace, no seccomp), both loaded from git at run time;
- ``B`` after, no seccomp: today's ``slot_argv`` with the slot's own uid, ``seccomp_fd=None``;
- ``C`` after: the same with the seccomp filter, the command line the sandbox server runs;
- ``D`` after, no ignored signals: ``C`` with a copy of today's worker whose ``_untouchable``
  leaves signal dispositions alone, so ``setsigdef`` of each ``posix_spawn`` holds the two
  signals Python ignores instead of the 58 today's worker ignores.

They run interleaved (A, B, C, D, A, B, ...) so machine drift hits all alike: ``--rounds``
rounds of ``--n`` round trips from one caller (c1) per variant, then as many rounds of
``--drivers`` workers per variant driven each by its own thread, ``--per-driver`` commands
each (the full stack's c16 throughput column of ``structenv bench exec`` is 16 trajectories
on 16 slots). CPU time per command is read from ``/proc`` for the workers (utime+stime) and
the commands they reaped (cutime+cstime). Last, a Python loop of ``getppid()`` inside each
sandbox prices one allowed system call (the seccomp filter's cost).

Every worker is killed and every temporary directory removed on the way out, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from structenv._bench._layers import COMMAND
from structenv._bench.exec import _summary as exec_summary
from structenv.sandbox import _runtime, _seccomp
from structenv.sandbox._bwrap import Isolation, default_uid_base, descendants, slot_uid
from structenv.sandbox._runtime import WORKER_PATH, Limits, slot_argv

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "4d2ce7f"
RESULTS = ROOT / "benchmarks" / "results" / "hardening.json"
_FRAME = struct.Struct(">I")
_TICK = os.sysconf("SC_CLK_TCK")
#: Run inside a sandbox: the best of 5 loops of 100,000 getppid() calls, ns per call.
_SYSCALL_PROBE = (
    "import os, time\n"
    "best = 1e9\n"
    "for _ in range(5):\n"
    "    t = time.perf_counter_ns()\n"
    "    for _ in range(100_000):\n"
    "        os.getppid()\n"
    "    best = min(best, (time.perf_counter_ns() - t) / 100_000)\n"
    "print(best)\n"
)
#: The line of today's worker that ignores every catchable signal (variant D drops it).
_IGNORE_LINE = "                signal.signal(sig, signal.SIG_IGN)\n"
VARIANTS = {
    "A": "before (4d2ce7f worker and command line)",
    "B": "after, no seccomp",
    "C": "after (uid, seccomp, read-only mounts, ignored signals)",
    "D": "after, no ignored signals",
}
RATIOS = {
    "C/A": "the whole hardening",
    "C/B": "the seccomp filter",
    "B/A": "the rest: uid switch, mounts, ignored signals, worker changes",
    "C/D": "ignored signals (setsigdef of 58 instead of 2 signals per spawn)",
}


class Worker:
    """One slot worker in its sandbox, driven synchronously over its pipes."""

    def __init__(self, argv: list[str], pass_fds: tuple[int, ...], tag: str) -> None:
        self.tag = tag
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, pass_fds=pass_fds
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in = self.proc.stdin.fileno()
        self._out = self.proc.stdout.fileno()
        frame = json.dumps(
            {"op": "exec", "id": 1, "command": COMMAND, "timeout": 30.0, "max_output": 1 << 16}
        ).encode()
        self._request = _FRAME.pack(len(frame)) + frame
        try:
            if not self._read_frame().get("hello"):
                raise RuntimeError(f"unexpected greeting from worker {tag}")
            self.pid = self._find_worker()
        except BaseException:
            self.stop()
            raise

    def _read_exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = os.read(self._out, size - len(data))
            if not chunk:
                raise RuntimeError(f"worker {self.tag} exited")
            data += chunk
        return data

    def _read_frame(self) -> dict[str, Any]:
        (size,) = _FRAME.unpack(self._read_exact(4))
        value: dict[str, Any] = json.loads(self._read_exact(size))
        return value

    def _find_worker(self) -> int:
        """Host pid of the worker (the sandbox's PID 1, a descendant of bwrap)."""
        for pid in descendants(self.proc.pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if WORKER_PATH.encode() in f.read():
                        return pid
            except OSError:
                continue
        raise RuntimeError(f"no worker process under bwrap {self.proc.pid}")

    def exec(self) -> None:
        os.write(self._in, self._request)
        result = self._read_frame().get("result")
        if not (isinstance(result, dict) and result.get("exit_code") == 0):
            raise RuntimeError(f"benchmark command failed in worker {self.tag}: {result}")

    def run(self, command: str) -> str:
        """Run one command in the sandbox and return its stdout."""
        frame = json.dumps(
            {"op": "exec", "id": 2, "command": command, "timeout": 60.0, "max_output": 1 << 16}
        ).encode()
        os.write(self._in, _FRAME.pack(len(frame)) + frame)
        result = self._read_frame().get("result")
        if not (isinstance(result, dict) and result.get("exit_code") == 0):
            raise RuntimeError(f"probe failed in worker {self.tag}: {result}")
        return base64.b64decode(result.get("stdout") or "").decode()

    def status(self) -> dict[str, str]:
        with open(f"/proc/{self.pid}/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)

    def cpu(self) -> tuple[float, float]:
        """Seconds of CPU of the worker itself and of the commands it has reaped."""
        with open(f"/proc/{self.pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rfind(b")") + 2 :].split()
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        return (utime + stime) / _TICK, (cutime + cstime) / _TICK

    def stop(self) -> None:
        """SIGKILL the sandbox's processes, then bwrap; reap bwrap and close the pipes."""
        for pid in descendants(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def _git_show(path: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{BASELINE}:{path}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def _load_module(name: str, source_path: str, scratch: str) -> types.ModuleType:
    """Import the baseline's version of a ``structenv.sandbox`` module under another name.

    Its relative imports resolve to today's package; the caller repoints what must be old.
    """
    file = os.path.join(scratch, f"{name}_{BASELINE}.py")
    Path(file).write_text(_git_show(source_path))
    module = types.ModuleType(f"structenv.sandbox.{name}_{BASELINE}")
    module.__file__ = file
    module.__package__ = "structenv.sandbox"
    sys.modules[module.__name__] = module  # dataclasses look their module up
    try:
        exec(compile(Path(file).read_text(), file, "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    return module


@dataclasses.dataclass
class Variant:
    key: str
    #: (index, workspace, tag) -> (argv, descriptors to pass and close after the spawn)
    build: Callable[[int, str, str], tuple[list[str], tuple[int, ...]]]
    workers: list[Worker] = dataclasses.field(default_factory=list)
    c1: list[list[float]] = dataclasses.field(default_factory=list)
    loaded: list[list[float]] = dataclasses.field(default_factory=list)
    throughput: list[float] = dataclasses.field(default_factory=list)
    #: (worker, commands) CPU seconds over all rounds, see _cpu
    cpu: tuple[float, float] = (0.0, 0.0)


def _variants(scratch: str) -> list[Variant]:
    old_bwrap = _load_module("_bwrap", "src/structenv/sandbox/_bwrap.py", scratch)
    old_runtime = _load_module("_runtime", "src/structenv/sandbox/_runtime.py", scratch)
    old_worker = os.path.join(scratch, f"worker_{BASELINE}.py")
    Path(old_worker).write_text(_git_show("src/structenv/sandbox/_worker.py"))
    # The old slot_argv imported today's bwrap_argv and worker file: point it at the old ones.
    old_runtime.bwrap_argv = old_bwrap.bwrap_argv
    old_runtime._WORKER_FILE = old_worker
    source = Path(_runtime._WORKER_FILE).read_text()
    if source.count(_IGNORE_LINE) != 1:
        raise RuntimeError("variant D: the worker's signal-ignoring line moved; update the script")
    quiet_worker = os.path.join(scratch, "worker_no_ignored_signals.py")
    Path(quiet_worker).write_text(source.replace(_IGNORE_LINE, _IGNORE_LINE[:16] + "pass\n"))
    for path in (old_worker, quiet_worker):
        os.chmod(path, 0o644)  # read by the slot's uid through a read-only bind
    base = default_uid_base("bench")

    def before(_: int, workspace: str, tag: str) -> tuple[list[str], tuple[int, ...]]:
        argv = old_runtime.slot_argv(
            old_bwrap.Isolation(), workspace, name=tag, limits=old_runtime.Limits()
        )
        assert "--unshare-all" in argv and "--seccomp" not in argv and old_worker in argv
        return argv, ()

    def after(
        seccomp: bool, worker: str | None
    ) -> Callable[[int, str, str], tuple[list[str], tuple[int, ...]]]:
        def build(index: int, workspace: str, tag: str) -> tuple[list[str], tuple[int, ...]]:
            uid = slot_uid(base, index)
            if uid is None:
                raise RuntimeError("run as root: the hardened slots need their own uids")
            os.chown(workspace, uid, uid)
            os.chmod(workspace, 0o755)
            fd = _seccomp.open_program(os.path.join(scratch, ".seccomp.bpf")) if seccomp else None
            argv = slot_argv(
                Isolation(), workspace, name=tag, limits=Limits(), uid=uid, seccomp_fd=fd
            )
            if worker is not None:
                at = argv.index(_runtime._WORKER_FILE)
                assert argv[at - 1 : at + 2] == ["--ro-bind", _runtime._WORKER_FILE, WORKER_PATH]
                argv[at] = worker
            return argv, (fd,) if fd is not None else ()

        return build

    return [
        Variant("A", before),
        Variant("B", after(False, None)),
        Variant("C", after(True, None)),
        Variant("D", after(True, quiet_worker)),
    ]


def _start(variant: Variant, count: int, scratch: str, offset: int) -> None:
    for i in range(count):
        tag = f"hardening-bench-{os.getpid()}-{variant.key}{i}"
        workspace = os.path.join(scratch, f"ws-{variant.key}{i}")
        os.mkdir(workspace, 0o755)
        # Each variant's slots get uids of their own, as the slots of one server do.
        argv, fds = variant.build(offset + i, workspace, tag)
        try:
            variant.workers.append(Worker(argv, fds, tag))
        finally:
            for fd in fds:
                os.close(fd)


def _check(variant: Variant) -> dict[str, Any]:
    """What the worker's /proc/<pid>/status says about its confinement (sanity check)."""
    status = variant.workers[0].status()
    return {
        "uid": int(status["Uid"].split()[0]),
        "seccomp": int(status["Seccomp"]),
        "seccomp_filters": int(status.get("Seccomp_filters", "0")),
        "ignored_signals": bin(int(status["SigIgn"], 16)).count("1"),
        "cap_eff": status["CapEff"],
    }


def _c1(worker: Worker, n: int) -> list[float]:
    latencies = []
    timer = time.perf_counter
    for _ in range(n):
        start = timer()
        worker.exec()
        latencies.append(timer() - start)
    return latencies


def _parallel(workers: list[Worker], per_driver: int) -> tuple[list[float], float]:
    """Each worker driven by its own thread; all latencies and the wall time of the lot."""
    latencies: list[list[float]] = [[] for _ in workers]
    errors: list[BaseException] = []
    gate = threading.Barrier(len(workers) + 1)

    def drive(index: int) -> None:
        try:
            gate.wait()
            latencies[index] = _c1(workers[index], per_driver)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=drive, args=(i,), daemon=True) for i in range(len(workers))]
    for thread in threads:
        thread.start()
    gate.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return [x for lat in latencies for x in lat], elapsed


def _syscall_ns(variants: list[Variant], repeats: int = 5) -> dict[str, float]:
    """ns per ``getppid()`` from Python inside each variant's sandbox (best of interleaved runs).

    An allowed system call walks the whole seccomp filter, so C - B is the filter's price per
    system call (the Python loop's own cost is the same in every variant).
    """
    command = shlex.join([os.path.realpath(sys.executable), "-I", "-S", "-c", _SYSCALL_PROBE])
    best = {v.key: float("inf") for v in variants}
    for _ in range(repeats):
        for v in variants:
            best[v.key] = min(best[v.key], float(v.workers[0].run(command)))
    return {k: round(ns, 1) for k, ns in best.items()}


def _summary(latencies: list[float]) -> dict[str, float]:
    # bench exec's own percentiles, so the numbers compare (throughput is measured apart).
    out = exec_summary(latencies, 1.0)
    del out["throughput_per_s"]
    return out


def _throughput_round(variant: Variant, per_driver: int) -> None:
    latencies, elapsed = _parallel(variant.workers, per_driver)
    variant.loaded.append(latencies)
    variant.throughput.append(len(latencies) / elapsed)


def _cpu(variant: Variant) -> tuple[float, float]:
    """CPU seconds so far of the variant's workers and of the commands they reaped.

    Read once before the first round and once after the last: /proc counts in clock ticks,
    and one tick (10 ms) per worker per reading averages out only over many commands.
    """
    readings = [w.cpu() for w in variant.workers]
    return sum(own for own, _ in readings), sum(reaped for _, reaped in readings)


def _report(variants: list[Variant], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for v in variants:
        commands = sum(map(len, v.c1)) + sum(map(len, v.loaded))
        total_time = sum(len(lat) / tput for lat, tput in zip(v.loaded, v.throughput, strict=True))
        out[v.key] = {
            "label": VARIANTS[v.key],
            "c1": _summary([x for lat in v.c1 for x in lat]),
            "c1_p50_ms_per_round": [_summary(lat)["p50_ms"] for lat in v.c1],
            f"c{args.drivers}": _summary([x for lat in v.loaded for x in lat]),
            "throughput_per_s": round(sum(len(lat) for lat in v.loaded) / total_time, 1),
            "throughput_per_round": [round(t, 1) for t in v.throughput],
            "cpu_us_per_command": {
                "worker": round(v.cpu[0] / commands * 1e6, 1),
                "command": round(v.cpu[1] / commands * 1e6, 1),
            },
        }
    ratios: dict[str, Any] = {}
    for name, meaning in RATIOS.items():
        top, bottom = (out[k] for k in name.split("/"))
        a, b = (next(v for v in variants if v.key == k) for k in name.split("/"))
        per_round_p50 = [
            _summary(x)["p50_ms"] / _summary(y)["p50_ms"] for x, y in zip(a.c1, b.c1, strict=True)
        ]
        per_round_tput = [x / y for x, y in zip(a.throughput, b.throughput, strict=True)]
        ratios[name] = {
            "meaning": meaning,
            "c1_p50": round(top["c1"]["p50_ms"] / bottom["c1"]["p50_ms"], 3),
            "c1_p50_delta_us": round((top["c1"]["p50_ms"] - bottom["c1"]["p50_ms"]) * 1e3),
            "throughput": round(top["throughput_per_s"] / bottom["throughput_per_s"], 3),
            "cpu_us_per_command_delta": round(
                sum(top["cpu_us_per_command"].values())
                - sum(bottom["cpu_us_per_command"].values()),
                1,
            ),
            "c1_p50_median_of_rounds": round(statistics.median(per_round_p50), 3),
            "throughput_median_of_rounds": round(statistics.median(per_round_tput), 3),
            "c1_p50_per_round": [round(r, 3) for r in per_round_p50],
            "throughput_per_round": [round(r, 3) for r in per_round_tput],
        }
    whole = ratios["C/A"]
    return {
        "variants": out,
        "ratios": ratios,
        "budget_10pct": {
            "c1_p50": whole["c1_p50"] <= 1.10,
            "throughput": whole["throughput"] >= 0.90,
        },
    }


def _print(result: dict[str, Any], drivers: int) -> None:
    print(f"{'variant':<58} {'c1 p50':>8} {'c1 p99':>8} {'cmds/s':>8} {'cpu/cmd':>9}")
    for key, v in result["variants"].items():
        cpu = sum(v["cpu_us_per_command"].values())
        print(
            f"{key} {v['label']:<56} {v['c1']['p50_ms']:>6.3f}ms {v['c1']['p99_ms']:>6.3f}ms"
            f" {v['throughput_per_s']:>8,.0f} {cpu:>7.0f}µs"
        )
    print(f"throughput: {drivers} workers, one driver thread each")
    for name, r in result["ratios"].items():
        print(
            f"{name:<4} p50 x{r['c1_p50']:.3f} ({r['c1_p50_delta_us']:+d} µs)  throughput"
            f" x{r['throughput']:.3f}  cpu {r['cpu_us_per_command_delta']:+.0f} µs/cmd"
            f"  (medians of per-round ratios: p50 x{r['c1_p50_median_of_rounds']:.3f},"
            f" throughput x{r['throughput_median_of_rounds']:.3f})  [{r['meaning']}]"
        )
    print(f"within 10%: {result['budget_10pct']}")


def _leftovers(prefix: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if prefix.encode() in f.read():
                        found.append(int(name))
            except OSError:
                continue
    return found


def _machine_cpu() -> tuple[float, float]:
    """Busy and stolen CPU seconds of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks, as Ctrl-C does


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="c1 round trips per variant per round")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--drivers", type=int, default=16, help="workers driven in parallel")
    parser.add_argument("--per-driver", type=int, default=40, help="commands per driver per round")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: variant A needs root's bwrap, B-D per-slot host uids")
    # Dispositions a shell left ignored (SIGINT, SIGQUIT in a background job) would be
    # inherited by every worker and reset by each of its spawns: start all variants clean.
    for sig in signal.valid_signals() - {signal.SIGPIPE, signal.SIGXFSZ}:  # Python's own
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    load_start = os.getloadavg()
    scratch = tempfile.mkdtemp(prefix="structenv-hardening-")
    variants: list[Variant] = []
    try:
        variants = _variants(scratch)
        for offset, v in enumerate(variants):
            _start(v, args.drivers, scratch, offset * args.drivers)
        checks = {v.key: _check(v) for v in variants}
        for v in variants:  # warm up every worker and the page cache
            for w in v.workers:
                _c1(w, 20)
        started = time.time()
        cpu_start = {v.key: _cpu(v) for v in variants}
        machine_start, mine_start, wall_start = _machine_cpu(), os.times(), time.monotonic()
        # All c1 rounds first: a c1 loop right after 16 busy workers was seen to run slower
        # (caches, CPU placement), which would blur the comparison with exec's worker row.
        for r in range(args.rounds):
            for v in variants:
                v.c1.append(_c1(v.workers[0], args.n))
            print(f"c1 round {r + 1}/{args.rounds} done", flush=True)
        for r in range(args.rounds):
            for v in variants:
                _throughput_round(v, args.per_driver)
            print(f"throughput round {r + 1}/{args.rounds} done", flush=True)
        for v in variants:
            now, then = _cpu(v), cpu_start[v.key]
            v.cpu = (now[0] - then[0], now[1] - then[1])
        wall = time.monotonic() - wall_start
        machine_end, mine_end = _machine_cpu(), os.times()
        ours = sum(sum(v.cpu) for v in variants) + sum(
            end - start for end, start in zip(mine_end[:2], mine_start[:2], strict=True)
        )
        # What else ran on the machine meanwhile: busy CPU not spent by this benchmark.
        others = {
            "other_busy_cpu_percent": round(
                100 * (machine_end[0] - machine_start[0] - ours) / (wall * (os.cpu_count() or 1)),
                1,
            ),
            "steal_cpu_percent": round(
                100 * (machine_end[1] - machine_start[1]) / (wall * (os.cpu_count() or 1)), 1
            ),
        }
        result = _report(variants, args)
        result["syscall_ns"] = _syscall_ns(variants)
    finally:
        for v in variants:
            for w in v.workers:
                try:
                    w.stop()
                except OSError as exc:  # keep stopping the others
                    print(f"warning: stopping worker {w.tag}: {exc!r}", file=sys.stderr)
        shutil.rmtree(scratch, ignore_errors=True)
        left = _leftovers(f"hardening-bench-{os.getpid()}-")
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if left:
            print(f"warning: killed {len(left)} leftover sandbox processes", file=sys.stderr)
    payload = {
        "benchmark": "hardening",
        "command": "python3 benchmarks/hardening_cost.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "baseline": BASELINE,
        "exec_command": COMMAND,
        "layer": "worker alone in its sandbox, blocking driver (_layers.worker_only)",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_at_start": [round(x, 2) for x in load_start],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            **others,
        },
        "checks": checks,
        **result,
    }
    _print(result, args.drivers)
    print(f"ns per getppid() in each sandbox: {result['syscall_ns']}")
    print(f"checks (worker status): {checks}")
    print(f"load average: start {load_start}, end {os.getloadavg()}; during the rounds {others}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

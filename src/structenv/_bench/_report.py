"""Shared helpers of the benchmarks: percentiles, machine info, JSON output, tables."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.table import Table

__all__ = [
    "NOISE_NOTE",
    "machine_info",
    "percentile",
    "print_table",
    "progress",
    "measure_latencies",
    "summarize",
    "summarize_ms",
    "write_results",
]

#: Printed after every run: how to read the numbers.
NOISE_NOTE = (
    "Reading the numbers: the machine is shared and its load moves absolute numbers by 10-20% "
    "between runs; compare ratios measured side by side in one run (the load average at the "
    "start is in the JSON). A median of a few hundred samples is good to a few percent; "
    "differences of medians (layer costs) are indicative only: a small or negative one means "
    "the layer costs less than the noise. '-' marks a cell that was not measured."
)

_started = time.monotonic()
_load_at_start = os.getloadavg()  # this module is imported as a benchmark starts


def progress(message: str) -> None:
    """One progress line on stderr (``structenv bench [12.3 s] message``), flushed."""
    elapsed = time.monotonic() - _started
    print(f"structenv bench [{elapsed:6.1f} s] {message}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def summarize(latencies: Sequence[float]) -> dict[str, float]:
    """p50/p99/mean of a list of seconds, in microseconds."""
    return {
        "p50_us": percentile(latencies, 50) * 1e6,
        "p99_us": percentile(latencies, 99) * 1e6,
        "mean_us": (statistics.fmean(latencies) * 1e6) if latencies else 0.0,
    }


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import anyio
    import trio

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_at_start": _load_at_start,  # other work skews every number
        "anyio": anyio.__version__ if hasattr(anyio, "__version__") else _version("anyio"),
        "trio": trio.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def write_results(name: str, payload: dict[str, Any], out_dir: Path) -> Path:
    """Write ``<out_dir>/<name>.json`` (NaN as ``null``) and return its absolute path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = (out_dir / f"{name}.json").resolve()
    path.write_text(json.dumps(_no_nan(payload), indent=2, sort_keys=True) + "\n")
    return path


def _no_nan(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_no_nan(v) for v in value]
    return value


def cell(value: Any) -> str:
    """A table cell: floats with thousands separators and one decimal, NaN/None as ``-``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return str(value)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a rich table to stdout, as wide as it needs (never cut at the terminal's width)."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*(cell(v) for v in row))
    console = Console()
    width = Console(width=10_000).measure(table).maximum
    if width > console.width:
        console = Console(width=width)
    console.print(table)


def finish(name: str, payload: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``out_dir/name.json`` and ``out_dir/name.png``, print both paths and how to read
    the numbers; return the paths written. A missing matplotlib skips the plot with one line."""
    from ._plots import write_plot

    written = [write_results(name, payload, out_dir)]
    try:
        written.append(write_plot(name, json.loads(written[0].read_text()), out_dir))
    except ImportError as exc:
        print(f"structenv bench: no plot: {exc}", file=sys.stderr)
    for path in written:
        print(f"wrote {path}")
    print(NOISE_NOTE)
    return written


def summarize_ms(latencies: list[float], elapsed: float) -> dict[str, float]:
    """p50/p99/mean latency (ms) and throughput (per s) of ``latencies`` over ``elapsed`` s."""
    n = len(latencies)
    return {
        "n": n,
        "p50_ms": round(percentile(latencies, 50) * 1e3, 3),
        "p99_ms": round(percentile(latencies, 99) * 1e3, 3),
        "mean_ms": round(statistics.fmean(latencies) * 1e3, 3) if latencies else 0.0,
        "throughput_per_s": round(n / elapsed, 1),
    }


async def measure_latencies(
    concurrency: int, per_worker: int, op: Callable[[int], Awaitable[None]]
) -> dict[str, float]:
    """Run ``op(i)`` ``per_worker`` times in each of ``concurrency`` tasks; summarize."""
    latencies: list[float] = []

    async def worker(index: int) -> None:
        for _ in range(per_worker):
            start = time.perf_counter()
            await op(index)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(concurrency):
            tg.start_soon(worker, i)
    return summarize_ms(latencies, time.perf_counter() - start)

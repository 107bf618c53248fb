"""Plot benchmarks/results/*.json into docs/img/*.png (needs matplotlib)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "img"


def _dispatch(data: dict[str, Any], plt: Any) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for backend in sorted({r["backend"] for r in data["results"]}):
        rows = [r for r in data["results"] if r["backend"] == backend]
        xs = [r["trajectories"] for r in rows]
        ax.plot(xs, [r["structured"]["us_per_call"] for r in rows], "o-", label=f"{backend}")
        naive = [(r["trajectories"], r["naive_reply_stream"]["us_per_call"]) for r in rows]
        naive = [(x, y) for x, y in naive if y == y]  # drop NaN (not measured)
        ax.plot(
            [x for x, _ in naive],
            [y for _, y in naive],
            "x--",
            label=f"{backend}, reply stream per call",
        )
    ax.axhline(15, color="grey", linestyle=":", label="target (asyncio, 1,000)")
    ax.set_xscale("log")
    ax.set_xlabel("concurrent trajectories (20 sequential calls each)")
    ax.set_ylabel("µs per call")
    ax.set_title("dispatch overhead per tool call, zero-latency backend")
    ax.legend(fontsize=8)
    path = OUT / "dispatch.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _exec(data: dict[str, Any], plt: Any) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = data.get("structenv", data.get("results", []))
    labels = [str(r.get("concurrency", r.get("label", "?"))) for r in rows]
    ax.bar(labels, [r.get("p50_ms", 0) for r in rows], label="p50")
    ax.bar(
        labels,
        [r.get("p99_ms", 0) - r.get("p50_ms", 0) for r in rows],
        bottom=[r.get("p50_ms", 0) for r in rows],
        alpha=0.4,
        label="p99",
    )
    ax.set_xlabel("concurrent trajectories")
    ax.set_ylabel("ms per exec of true")
    ax.set_title("exec round trip through the full stack (bwrap sandbox)")
    ax.legend()
    path = OUT / "exec.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(parents=True, exist_ok=True)
    plots = {"dispatch": _dispatch, "exec": _exec}
    for name, plot in plots.items():
        path = RESULTS / f"{name}.json"
        if path.exists():
            print(plot(json.loads(path.read_text()), plt))
    return 0


if __name__ == "__main__":
    sys.exit(main())

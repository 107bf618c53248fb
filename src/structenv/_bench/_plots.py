"""PNG plots of benchmark results (matplotlib, headless ``Agg``).

``structenv bench NAME --out DIR`` writes ``DIR/NAME.json`` and, through :func:`write_plot`,
``DIR/NAME.png``; ``benchmarks/plot.py`` redraws ``docs/img/`` from a checkout's
``benchmarks/results/``. matplotlib comes with the ``bench`` (and ``dev``) extra.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["write_plot"]


def write_plot(name: str, data: dict[str, Any], out_dir: Path) -> Path:
    """Draw ``data`` (the JSON of benchmark ``name``) into ``out_dir/name.png``; its path.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'structenv[bench]'``).
        KeyError: ``name`` has no plot.
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "plots need matplotlib: pip install 'structenv[bench]' (the JSON was written)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot: Callable[[dict[str, Any], Any], Any] = _PLOTS[name]
    fig = plot(data, plt)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = (out_dir / f"{name}.png").resolve()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _dispatch(data: dict[str, Any], plt: Any) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"exec": "o-", "call": "s-", "naive": "x--"}
    for backend in sorted({r["backend"] for r in data["results"]}):
        rows = [r for r in data["results"] if r["backend"] == backend]
        for path, style in styles.items():
            points = [(r["trajectories"], r[path]["us_per_call"]) for r in rows if path in r]
            points = [(x, y) for x, y in points if y is not None and y == y]  # not measured
            ax.plot(
                [x for x, _ in points], [y for _, y in points], style, label=f"{backend} {path}"
            )
    ax.axhline(15, color="grey", linestyle=":", label="call target (asyncio, 1,000)")
    ax.set_xscale("log")
    ax.set_xlabel("concurrent trajectories (20 sequential calls each)")
    ax.set_ylabel("µs per call")
    load = (data.get("load_average") or {}).get("before")
    where = f" (load average {load[0]:.0f})" if load else ""
    ax.set_title(f"dispatch per call: exec, call, naive{where}")
    ax.legend(fontsize=8)
    return fig


def _exec(data: dict[str, Any], plt: Any) -> Any:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for backend, run in data["runs"].items():
        full = run["full_stack"]
        levels = _levels(full)
        xs = [int(k[1:]) for k in levels]
        axes[0].plot(xs, [full[k]["p50_ms"] for k in levels], "o-", label=f"{backend} p50")
        axes[0].plot(xs, [full[k]["p99_ms"] for k in levels], "x--", label=f"{backend} p99")
        axes[1].plot(
            xs, [full[k]["throughput_per_s"] for k in levels], "o-", label=f"{backend} full stack"
        )
        floor = run.get("posix_spawn_floor", {}).get("c1")
        if floor:
            axes[0].axhline(
                floor["p50_ms"], linestyle=":", color="grey", label=f"{backend} posix_spawn floor"
            )
        for path, style in (("fork_exec", ":"), ("raw_bwrap_spawn", "-.")):
            ref = run[path]
            axes[1].plot(
                [int(k[1:]) for k in _levels(ref)],
                [ref[k]["throughput_per_s"] for k in _levels(ref)],
                "s" + style,
                label=f"{backend} {path}",
            )
    axes[0].axhline(1.0, color="red", linestyle="--", label="target p50")
    axes[1].axhline(1500, color="red", linestyle="--", label="target cmds/s")
    axes[0].set_ylabel("ms per exec of /bin/true")
    axes[0].set_xlabel("concurrent trajectories")
    axes[0].set_yscale("log")
    axes[0].set_xscale("log", base=2)
    axes[1].set_xscale("log", base=2)
    axes[0].legend(fontsize=7)
    axes[1].set_ylabel("commands per second")
    axes[1].set_xlabel("concurrent callers")
    axes[1].legend(fontsize=7)
    _exec_layers(data, axes[2])
    fig.suptitle("exec round trip through the full stack into bwrap sandboxes")
    return fig


def _levels(stats: dict[str, Any]) -> list[str]:
    """Concurrency keys (``c1``, ``c16``, ...) in numeric order (the JSON sorts them as text)."""
    return sorted((k for k in stats if k[1:].isdigit()), key=lambda k: int(k[1:]))


def _exec_layers(data: dict[str, Any], ax: Any) -> None:
    """Stacked bars: what each layer adds to one command at c1 (differences of medians;
    a negative difference is noise and drawn as 0)."""
    runs = [(b, r["layers"]) for b, r in data["runs"].items() if "layers" in r]
    if not runs:
        return
    names = ["posix_spawn", "worker", "server_hop", "async_client", "executor"]  # bottom up
    bottoms = [0.0] * len(runs)
    for name in names:
        heights = [max(0.0, layers[name]) for _, layers in runs]
        ax.bar([b for b, _ in runs], heights, bottom=bottoms, label=name.replace("_", " "))
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.axhline(1.0, color="red", linestyle="--", label="target p50")
    ax.set_ylabel("ms (c1 medians)")
    ax.set_title("where one command's time goes (differences of medians)", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], fontsize=7, loc="upper right", framealpha=0.9)
    ax.set_ylim(0, max(bottoms) * 1.35 or 1.0)


def _docker(data: dict[str, Any], plt: Any) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = data["throughput"]
    xs = [r["containers"] for r in rows]
    ax.plot(xs, [r["structenv"]["cmds_per_s"] for r in rows], "o-", label="structenv")
    ax.plot(xs, [r["naive_docker_exec"]["cmds_per_s"] for r in rows], "x--", label="docker exec")
    ax.set_xlabel(f"containers ({data.get('slots_per_container', '?')} slots each)")
    ax.set_ylabel("commands per second (/bin/true)")
    ax.set_yscale("log")
    ax.set_title("DockerBackend throughput vs a docker exec per command")
    ax.legend(fontsize=8)
    return fig


def _user(data: dict[str, Any], plt: Any) -> Any:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for path in ("full_stack", "slot_api"):
        stats = data[path]
        levels = _levels(stats)
        xs = [int(k[1:]) for k in levels]
        axes[0].plot(xs, [stats[k]["p50_ms"] for k in levels], "o-", label=f"{path} p50")
        axes[0].plot(xs, [stats[k]["p99_ms"] for k in levels], "x--", label=f"{path} p99")
        axes[1].plot(xs, [stats[k]["throughput_per_s"] for k in levels], "o-", label=path)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent callers")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("ms per command")
    axes[1].set_ylabel("commands per second")
    fig.suptitle(f"{data['backend']}: {data['command']}")
    return fig


_PLOTS: dict[str, Callable[[dict[str, Any], Any], Any]] = {
    "dispatch": _dispatch,
    "exec": _exec,
    "docker": _docker,
    "user": _user,
}

"""The benchmark harness as a user runs it: progress, --out (JSON + PNG), --backend, tables."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from structenv._bench import _report
from structenv._bench._plots import write_plot
from structenv._bench._user import load_factory
from structenv._cli import main
from structenv._exceptions import ConfigError
from structenv.testing import child_processes

RECORDED = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
PNG = b"\x89PNG\r\n\x1a\n"

USER_BACKEND = """
from structenv.backends import LocalBackend

def make():
    return LocalBackend(hosts=1, slots_per_host=2)

def not_a_backend():
    return object()
"""


def _env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "mybench.py").write_text(USER_BACKEND)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))


def test_user_backend_bench_from_a_fresh_process(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "structenv._cli", "bench", "exec", "--quick",
         "--backend", "mybench:make", "--command", "echo hi", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False, env=_env(tmp_path),
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Progress while it runs (stderr), the table and the paths (stdout).
    assert "structenv bench [" in proc.stderr and "full stack, 2 concurrent" in proc.stderr
    assert "mybench:make: echo hi" in proc.stdout
    assert f"wrote {out / 'user.json'}" in proc.stdout
    assert "Reading the numbers" in proc.stdout
    data = json.loads((out / "user.json").read_text())
    assert data["command"] == "echo hi" and data["backend"] == "mybench:make"
    assert len(data["machine"]["load_average_at_start"]) == 3
    assert set(data["slot_api"]) == set(data["full_stack"]) == {"c1", "c2"}
    for stats in (*data["slot_api"].values(), *data["full_stack"].values()):
        assert stats["n"] >= 60 and 0 < stats["p50_ms"] <= stats["p99_ms"]
    assert (out / "user.png").read_bytes().startswith(PNG)
    assert not child_processes()


def test_bench_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "dispatch", "--backend", "x:y", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "structenv bench: --backend works with `structenv bench exec` only\n"
    )
    assert main(["bench", "exec", "--command", "ls", "--out", str(tmp_path)]) == 2
    assert "--command works with --backend only" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="expected module:factory"):
        load_factory("nocolon")
    with pytest.raises(ConfigError, match="cannot import"):
        load_factory("no_such_module_xyz:make")
    with pytest.raises(ConfigError, match="has no attribute"):
        load_factory("structenv:no_such_factory")
    with pytest.raises(ConfigError, match="not callable"):
        load_factory("structenv._bench._report:NOISE_NOTE")


def test_a_factory_module_in_the_current_directory_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``structenv bench exec --backend mybench:make`` in the directory holding mybench.py, as
    docs/benchmarks.md shows it: the console script has no current directory on sys.path, so
    the module was not found (``structenv run MODULE:Env`` looks there too)."""
    (tmp_path / "mybench_in_cwd.py").write_text(USER_BACKEND)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    factory = load_factory("mybench_in_cwd:make")
    assert factory.__name__ == "make"
    sys.modules.pop("mybench_in_cwd", None)


def test_factory_must_return_a_backend(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "structenv._cli", "bench", "exec", "--quick",
         "--backend", "mybench:not_a_backend", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, check=False, env=_env(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "structenv bench: --backend mybench:not_a_backend: the factory returned object, "
        "not a structenv.abc.SandboxBackend"
    )


@pytest.mark.parametrize("name", ["dispatch", "exec", "docker"])
def test_plots_of_the_recorded_results(name: str, tmp_path: Path) -> None:
    data = json.loads((RECORDED / f"{name}.json").read_text())
    path = write_plot(name, data, tmp_path / "plots")
    assert path == (tmp_path / "plots" / f"{name}.png").resolve()
    assert path.read_bytes().startswith(PNG) and path.stat().st_size > 10_000


def test_tables_are_not_cut_and_nan_is_marked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    assert Console().width == 60
    row = ["asyncio", "a_rather_long_path_name", 123456789.123, math.nan, None, 7]
    _report.print_table("t", ["backend", "path", "big", "naive", "none", "n"], [row])
    printed = capsys.readouterr().out
    assert "123,456,789.1" in printed and "…" not in printed
    assert "nan" not in printed.lower() and " - " in printed
    path = _report.write_results("x", {"a": math.nan, "b": [math.inf, 1.5]}, tmp_path / "r")
    assert json.loads(path.read_text()) == {"a": None, "b": [None, 1.5]}  # valid JSON
    assert path.is_absolute()


@pytest.mark.anyio
async def test_bench_exec_batches_per_host() -> None:
    """``structenv bench exec``'s batched path sends one ``exec_batch`` per host (the backend
    refuses slots of two hosts in one batch; the quick run crashed on it)."""
    from structenv._bench.exec import _batched
    from structenv.backends import LocalBackend

    async with LocalBackend(hosts=2, slots_per_host=1) as backend:
        slots = [await backend.acquire_slot() for _ in range(2)]
        assert len({slot.host_id for slot in slots}) == 2
        try:
            stats = await _batched(backend, slots, 3)
        finally:
            for slot in slots:
                await backend.release_slot(slot, reusable=True)
    assert stats["n"] == 6


def test_quick_modes_are_small() -> None:
    """What keeps ``--quick`` near its promised time (docs/benchmarks.md): dispatch stops at
    1,000 trajectories (10,000 alone took 20-90 s here)."""
    from structenv._bench import dispatch

    assert max(dispatch.QUICK_SIZES) == 1000 and max(dispatch.FULL_SIZES) == 10000


@pytest.mark.docker
def test_bench_specs_without_its_image_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STRUCTENV_TEST_IMAGE", "structenv-sandbox:no-such-tag")
    assert main(["bench", "specs", "--quick", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "structenv bench: image 'structenv-sandbox:no-such-tag' does not exist in the local "
        "Docker Engine: build it with `structenv image build --tag "
        "structenv-sandbox:no-such-tag`\n"
    )

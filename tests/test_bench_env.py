"""``structenv bench env MODULE:Env`` as a user runs it: the shipped example env on the
LocalBackend from a fresh process (console script), and the one-line error for a bad spec."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import atroposlib  # noqa: F401  (the atropos extra is part of the dev install)
import pytest

from structenv.testing import child_processes

GROUPS, GROUP_SIZE = 3, 2


def _structenv() -> str:
    exe = shutil.which("structenv")
    assert exe is not None, "the structenv console script is not installed"
    return exe


def _user_env(cache: Path) -> dict[str, str]:
    return dict(os.environ, STRUCTENV_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1")


def test_bench_the_shipped_env_from_a_fresh_process(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [_structenv(), "bench", "env", "structenv.examples.shell_tasks:ShellTasksEnv",
         "--groups", str(GROUPS), "--group-size", str(GROUP_SIZE), "--out", str(out),
         "--env.backend", "local", "--env.agent_max_steps", "6"],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
        env=_user_env(tmp_path / "cache"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Progress lines (stderr); the table, the paths and how to read them (stdout).
    assert "structenv bench [" in proc.stderr
    assert f"group {GROUPS}/{GROUPS}: {GROUP_SIZE} trajectories" in proc.stderr
    assert f"ShellTasksEnv: {GROUPS} groups x {GROUP_SIZE}" in proc.stdout
    assert "traj p99 ms" in proc.stdout and "call p50 ms" in proc.stdout
    assert f"wrote {out / 'env.json'}" in proc.stdout and "Reading the numbers" in proc.stdout
    data = json.loads((out / "env.json").read_text())
    assert data["env"] == "structenv.examples.shell_tasks:ShellTasksEnv" and data["offline"]
    assert data["groups"] == GROUPS and data["trajectories"] == GROUPS * GROUP_SIZE
    assert data["failed_members"] == 0 and data["dropped_groups"] == 0
    assert 0.0 <= data["mean_score"] <= 1.0
    assert data["tool_calls"] >= data["trajectories"]  # every reference solution calls a tool
    seconds = data["collect_time_s"]
    assert 0 < seconds <= data["wall_time_s"]
    assert data["groups_per_s"] == pytest.approx(GROUPS / seconds, rel=0.01)
    assert data["trajectories_per_s"] == pytest.approx(GROUPS * GROUP_SIZE / seconds, rel=0.01)
    assert data["tool_calls_per_s"] == pytest.approx(data["tool_calls"] / seconds, rel=0.01)
    assert 0 < data["trajectory_p50_ms"] <= data["trajectory_p99_ms"] <= seconds * 1e3
    assert 0 < data["tool_call_p50_ms"] <= data["tool_call_p99_ms"]
    assert data["tool_call_p99_ms"] <= data["trajectory_p99_ms"]
    assert len(data["machine"]["load_average_at_start"]) == 3
    # The scored groups, as `structenv run` writes them.
    lines = (out / "ShellTasksEnv.jsonl").read_text().splitlines()
    assert len(lines) == GROUPS
    assert all(len(json.loads(line)["scores"]) == GROUP_SIZE for line in lines)
    assert not child_processes()


def test_bench_env_bad_spec_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [_structenv(), "bench", "env", "no_such_module_xyz:Env", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
        env=_user_env(tmp_path / "cache"),
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "structenv bench env: error: ConfigError: cannot import 'no_such_module_xyz': "
        "No module named 'no_such_module_xyz'"
    )
    assert not (tmp_path / "o").exists()

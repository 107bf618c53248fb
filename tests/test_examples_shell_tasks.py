"""Shell-tasks data and scoring: reference solutions pass, the seeded wrong ones do not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import atroposlib  # noqa: F401  (the atropos extra is part of the dev install)
import pytest

from structenv.agent import parse_hermes
from structenv.examples._shell_data import SHELL_TASKS, ShellTask
from structenv.examples.shell_tasks import _RUNNER, _junit_score, _runner_score


def _apply(task: ShellTask, workdir: Path, *, wrong: bool) -> float:
    """Play a solution on the host (write_file / terminal) and score it with the runner."""
    for path, text in task.files.items():
        (workdir / path).parent.mkdir(parents=True, exist_ok=True)
        (workdir / path).write_text(text)
    for step in task.solution:
        text = step.wrong if (wrong and step.wrong) else step.text
        for call in parse_hermes(text).calls:
            if call.name == "write_file":
                (workdir / call.arguments["path"]).write_text(call.arguments["content"])
            elif call.name == "terminal" and call.arguments["command"] != "sh run_tests.sh":
                subprocess.run(call.arguments["command"], shell=True, cwd=workdir, check=True)
    (workdir / "runner.py").write_text(_RUNNER)
    run = subprocess.run(
        [sys.executable, "runner.py"], cwd=workdir, capture_output=True, text=True, check=False
    )
    return _runner_score(run.stdout)


@pytest.mark.parametrize("task", SHELL_TASKS, ids=lambda t: t.id)
def test_reference_solution_passes_and_wrong_one_does_not(task: ShellTask, tmp_path: Path) -> None:
    assert task.test_files
    assert _apply(task, tmp_path / "start", wrong=True) < 1.0
    assert _apply(task, tmp_path / "ref", wrong=False) == 1.0
    # Every tool-calling step parses cleanly (the mistakes are seeded by the script).
    for step in task.solution:
        for text in filter(None, (step.text, step.wrong)):
            assert not parse_hermes(text).errors


def test_unsolved_workspace_scores_below_one(tmp_path: Path) -> None:
    task = SHELL_TASKS[0]
    for path, text in task.files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    (tmp_path / "runner.py").write_text(_RUNNER)
    run = subprocess.run(
        [sys.executable, "runner.py"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert _runner_score(run.stdout) < 1.0


def test_report_parsers() -> None:
    report = (
        b'<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="1" failures="1" '
        b'skipped="0" tests="4"></testsuite></testsuites>'
    )
    assert _junit_score(report) == 0.5
    assert _junit_score(b"<testsuite tests='0'/>") == 0.0
    assert _junit_score(b"not xml") == 0.0
    assert _runner_score("noise\n" + json.dumps({"passed": 2, "total": 3})) == pytest.approx(2 / 3)
    assert _runner_score("Traceback ...") == 0.0

"""Data-wrangling tasks: reference scripts produce the expected output, wrong ones score less."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import atroposlib  # noqa: F401  (the atropos extra is part of the dev install)
import pytest

from structenv.agent import parse_hermes
from structenv.examples.data_wrangling import DATA_TASKS, DataTask, score_output


def _produce(task: DataTask, workdir: Path, *, wrong: bool) -> bytes:
    workdir.mkdir()
    (workdir / task.input_path).write_text(task.input_data)
    for step in task.solution:
        text = step.wrong if (wrong and step.wrong) else step.text
        for call in parse_hermes(text).calls:
            if call.name == "write_file":
                (workdir / call.arguments["path"]).write_text(call.arguments["content"])
            elif call.name == "terminal":
                subprocess.run(call.arguments["command"], shell=True, cwd=workdir, check=True)
    return (workdir / task.output_path).read_bytes()


@pytest.mark.parametrize("task", DATA_TASKS, ids=lambda t: t.id)
def test_reference_matches_and_wrong_scores_less(task: DataTask, tmp_path: Path) -> None:
    expected = task.expected(task.input_data)
    assert score_output(expected, _produce(task, tmp_path / "ref", wrong=False)) == 1.0
    assert 0.0 <= score_output(expected, _produce(task, tmp_path / "bad", wrong=True)) < 1.0


def test_score_output_partial_credit() -> None:
    assert score_output(["a", "b"], b'["a", "b"]') == 1.0
    assert score_output(["a", "b"], b'["a", "x", "y"]') == pytest.approx(1 / 3)
    assert score_output({"x": 1.0, "y": 2}, json.dumps({"x": 1.0000001}).encode()) == 0.5
    assert score_output({"x": 1}, b"[1]") == 0.0
    assert score_output(["a"], b"not json") == 0.0
    assert score_output(3, b"3.0") == 1.0

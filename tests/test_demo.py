"""The main job: ``structenv demo`` (``structenv._demo.main``) end to end, as the README runs it."""

from __future__ import annotations

import json
from pathlib import Path

import atroposlib  # noqa: F401  (the atropos extra is part of the dev install)
import pytest

from structenv._demo import main
from structenv.testing import child_processes


def test_demo_runs_offline_and_writes_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STRUCTENV_CACHE_DIR", str(tmp_path / "cache"))  # fresh machine
    out = tmp_path / "out"
    code = main(["--groups", "3", "--group-size", "2", "--out", str(out), "--seed", "3"])
    assert code == 0
    jsonl = out / "shell-tasks.jsonl"
    assert "Content-Security-Policy" in (out / "shell-tasks.html").read_text()  # our viewer
    assert (tmp_path / "cache").is_dir()  # the tiny tokenizer was built on first use
    groups = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(groups) == 3
    for group in groups:
        assert len(group["tokens"]) == 2
        for t, m, lp in zip(
            group["tokens"], group["masks"], group["inference_logprobs"], strict=True
        ):
            assert t and len(t) == len(m) == len(lp)
    printed = capsys.readouterr().out
    for line in ("groups", "mean score", "tool calls", "wall time", str(jsonl)):
        assert line in printed
    assert not child_processes()


def test_demo_second_example_and_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(["--example", "data-wrangling", "--groups", "1", "--group-size", "2",
                 "--out", str(out), "--quiet"])  # fmt: skip
    assert code == 0
    assert len((out / "data-wrangling.jsonl").read_text().splitlines()) == 1
    assert main(["--groups", "0"]) == 2
    with pytest.raises(SystemExit):
        main(["--example", "nope"])


def test_readme_command_runs_as_a_console_script(tmp_path: Path) -> None:
    """``structenv demo`` exactly as the README's first command ends, in a fresh process."""
    import shutil
    import subprocess

    exe = shutil.which("structenv")
    assert exe is not None, "the structenv console script is not installed"
    proc = subprocess.run(
        [exe, "demo", "--groups", "1", "--group-size", "2", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mean score" in proc.stdout
    assert len((tmp_path / "o" / "shell-tasks.jsonl").read_text().splitlines()) == 1


def test_swe_images_with_a_relative_out_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``structenv demo --example swe-images`` with the default ``--out structenv-out`` (or
    any relative one) stopped at once: "paths in a spec must be absolute"."""
    from structenv import SandboxSpec
    from structenv._demo import _two_images

    monkeypatch.chdir(tmp_path)
    fields = _two_images("task:1", Path("structenv-out"))
    (dockerfile,) = fields["dockerfiles"]
    assert dockerfile == str(tmp_path / "structenv-out" / "swe-image-b" / "Dockerfile")
    assert SandboxSpec(dockerfile=dockerfile).dockerfile == dockerfile
    assert fields["images"] == ["task:1"]

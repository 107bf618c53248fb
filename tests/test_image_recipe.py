"""``structenv image build`` from an installed wheel: the recipe is package data, and a source
tree to install in the image is staged from the installed package (no checkout needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, unpacked as ``pip install --target`` lays it out."""
    wheels = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
         "-w", str(wheels), str(ROOT)],
        check=True, timeout=600,
    )  # fmt: skip
    (wheel,) = wheels.glob("structenv-*.whl")
    target = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(target)
    for data in ("_images/build.sh", "_images/Dockerfile", "templates/rollouts.html.j2"):
        assert f"structenv/{data}" in names, f"{data} is not in the wheel"
    return target


def test_recipe_and_source_from_an_installed_wheel(installed: Path, tmp_path: Path) -> None:
    code = (
        "import json, sys; from pathlib import Path; import structenv._image as i; "
        "print(json.dumps([i.__file__, str(i.recipe_dir()), str(i.source_dir(Path(sys.argv[1])))]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "STRUCTENV_IMAGES_DIR"}
    env["PYTHONPATH"] = str(installed)  # the unpacked wheel, not this checkout
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "stage")],
        capture_output=True, text=True, check=False, env=env, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    module, recipe, source = (Path(p) for p in json.loads(proc.stdout))
    assert module.is_relative_to(installed)
    assert recipe == installed / "structenv" / "_images"
    assert source == tmp_path / "stage"
    staged = tomllib.loads((source / "pyproject.toml").read_text())
    ours = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert staged["project"]["version"] == ours["project"]["version"]
    assert sorted(staged["project"]["dependencies"]) == sorted(ours["project"]["dependencies"])
    for name in ("sandbox/_server.py", "_images/build.sh", "py.typed"):
        assert (source / "src" / "structenv" / name).read_bytes() == (
            ROOT / "src" / "structenv" / name
        ).read_bytes()


def test_build_script_refuses_a_tree_that_is_not_structenv(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / "src" / "structenv" / "_images" / "build.sh"), "--source",
         str(tmp_path)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"build.sh: {tmp_path} is not a structenv source tree (no pyproject.toml and "
        "src/structenv; pass --source)"
    )


def test_image_and_policy_server_help_read_as_plain_text() -> None:
    for argv, prog in ((["image", "--help"], "structenv image"),
                       (["policy-server", "--help"], "structenv policy-server")):  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-m", "structenv._cli", *argv],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        assert proc.stdout.startswith(f"usage: {prog} ")
        assert "``" not in proc.stdout and ":class:" not in proc.stdout

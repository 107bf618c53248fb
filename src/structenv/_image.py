"""``structenv image build``: build the sandbox image locally, with no container registry.

The recipe is ``build.sh`` + ``Dockerfile``, shipped inside the package as
``structenv/_images/`` (a debootstrap'd Debian rootfs loaded with ``docker import``, then
structenv installed from wheels built on this host; see the script's header), so it works
from an installed wheel as from a checkout. From a checkout the image gets the checkout's
sources; from an installed wheel, a source tree is staged from the installed package (its
files and a ``pyproject.toml`` made from its metadata). This module runs the recipe. The
result is cached: the image is labelled with a hash of the sources and a rerun with unchanged
sources returns at once (about a second); the rootfs tarball and the dependency wheels are
cached under ``$STRUCTENV_CACHE_DIR`` (default ``~/.cache/structenv``).

To bring your own image, build anything whose entrypoint runs ``python3 -m structenv.sandbox``
with bubblewrap installed and pass its tag as ``DockerBackend(image=...)``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DEFAULT_TAG", "build_image", "main", "recipe_dir", "source_dir", "stage_source"]


def _default_tag() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"structenv-sandbox:{version('structenv')}"
    except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
        return "structenv-sandbox:latest"


#: ``structenv-sandbox:<installed structenv version>`` (what ``build.sh`` tags).
DEFAULT_TAG = _default_tag()


def recipe_dir() -> Path:
    """The directory holding ``build.sh`` and ``Dockerfile``: ``$STRUCTENV_IMAGES_DIR`` (your
    own recipe) or the one shipped in the package.

    Raises:
        FileNotFoundError: ``$STRUCTENV_IMAGES_DIR`` holds no ``build.sh`` and ``Dockerfile``.
    """
    custom = os.environ.get("STRUCTENV_IMAGES_DIR")
    path = Path(custom) if custom else _PACKAGE / "_images"
    if not ((path / "build.sh").is_file() and (path / "Dockerfile").is_file()):
        raise FileNotFoundError(f"{path} holds no build.sh and Dockerfile")
    return path


_PACKAGE = Path(__file__).resolve().parent


def source_dir(stage_in: Path) -> Path:
    """The structenv source tree to install in the image: the checkout this module runs from
    or, for an installed wheel, one staged under ``stage_in`` by :func:`stage_source`."""
    checkout = _PACKAGE.parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "src" / "structenv").is_dir():
        return checkout
    return stage_source(_PACKAGE, stage_in)


def stage_source(package: Path, into: Path) -> Path:
    """A buildable source tree of the installed ``structenv`` package at ``package``:
    ``into/src/structenv`` (its files) and ``into/pyproject.toml`` (name, version and
    dependencies from the installed metadata); returns ``into``."""
    import shutil
    from importlib.metadata import distribution

    dist = distribution("structenv")
    requires = [r for r in dist.requires or [] if "extra ==" not in r]
    shutil.copytree(
        package, into / "src" / "structenv", ignore=shutil.ignore_patterns("__pycache__")
    )
    deps = "".join(f"    {json.dumps(r)},\n" for r in requires)
    (into / "pyproject.toml").write_text(
        "[build-system]\n"
        'requires = ["hatchling>=1.21"]\n'
        'build-backend = "hatchling.build"\n\n'
        "[project]\n"
        'name = "structenv"\n'
        f"version = {json.dumps(dist.version)}\n"
        f'requires-python = ">=3.11"\n'
        f"dependencies = [\n{deps}]\n\n"
        "[tool.hatch.build.targets.wheel]\n"
        'packages = ["src/structenv"]\n'
    )
    return into


def build_image(
    tag: str = DEFAULT_TAG, *, force: bool = False, cache_dir: str | None = None
) -> str:
    """Build (or confirm up to date) the sandbox image; return its tag. Blocking.

    Raises:
        RuntimeError: The build failed (its log is on stderr).
    """
    import tempfile

    recipe = recipe_dir()
    with tempfile.TemporaryDirectory(prefix="structenv-image-src-") as stage:
        source = source_dir(Path(stage))
        argv = ["bash", str(recipe / "build.sh"), "--source", str(source), "--tag", tag]
        if force:
            argv.append("--force")
        if cache_dir:
            argv += ["--cache-dir", cache_dir]
        env = dict(os.environ, PYTHON=os.environ.get("PYTHON", sys.executable))
        proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"image build failed (exit {proc.returncode}); see the log above")
    return proc.stdout.decode().strip().splitlines()[-1]


def main(argv: Sequence[str] | None = None) -> int:
    """``structenv image build [--tag T] [--force] [--cache-dir D]``."""
    p = argparse.ArgumentParser(
        prog="structenv image",
        description="Build the sandbox image locally, with no container registry. The recipe "
        "ships with structenv (works from an installed wheel); the result is cached.",
    )
    sub = p.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="build the sandbox image (cached; no registry)")
    build.add_argument("--tag", default=DEFAULT_TAG, help=f"image tag (default {DEFAULT_TAG})")
    build.add_argument("--force", action="store_true", help="rebuild everything, rootfs too")
    build.add_argument("--cache-dir", help="cache for the rootfs tarball and wheels")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        tag = build_image(args.tag, force=args.force, cache_dir=args.cache_dir)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"structenv image build: {exc}", file=sys.stderr)
        return 1
    print(tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``structenv image build``: build the sandbox image locally, with no container registry.

The recipe is ``images/build.sh`` + ``images/Dockerfile`` in a source checkout (a debootstrap'd
Debian rootfs loaded with ``docker import``, then structenv installed from wheels built on this
host; see the script's header). This module finds the recipe and runs it. The result is cached:
the image is labelled with a hash of the sources and a rerun with unchanged sources returns at
once (about a second); the rootfs tarball and the dependency wheels are cached under
``$STRUCTENV_CACHE_DIR`` (default ``~/.cache/structenv``).

To bring your own image, build anything whose entrypoint runs ``python3 -m structenv.sandbox``
with bubblewrap installed and pass its tag as ``DockerBackend(image=...)``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DEFAULT_TAG", "build_image", "main", "recipe_dir"]


def _default_tag() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"structenv-sandbox:{version('structenv')}"
    except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
        return "structenv-sandbox:latest"


#: ``structenv-sandbox:<installed structenv version>`` (what ``images/build.sh`` tags).
DEFAULT_TAG = _default_tag()


def recipe_dir() -> Path:
    """The directory holding ``build.sh`` (``$STRUCTENV_IMAGES_DIR`` or the source checkout).

    Raises:
        FileNotFoundError: No recipe (structenv is installed from a wheel, not a checkout).
    """
    candidates = []
    if os.environ.get("STRUCTENV_IMAGES_DIR"):
        candidates.append(Path(os.environ["STRUCTENV_IMAGES_DIR"]))
    candidates.append(Path(__file__).resolve().parents[2] / "images")
    for path in candidates:
        if (path / "build.sh").is_file() and (path / "Dockerfile").is_file():
            return path
    raise FileNotFoundError(
        "images/build.sh not found: run from a structenv source checkout or set "
        "STRUCTENV_IMAGES_DIR to a directory holding build.sh and Dockerfile"
    )


def build_image(
    tag: str = DEFAULT_TAG, *, force: bool = False, cache_dir: str | None = None
) -> str:
    """Build (or confirm up to date) the sandbox image; return its tag. Blocking.

    Raises:
        RuntimeError: The build failed (its log is on stderr).
    """
    argv = ["bash", str(recipe_dir() / "build.sh"), "--tag", tag]
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
    p = argparse.ArgumentParser(prog="structenv image", description=__doc__.split("\n")[0])
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

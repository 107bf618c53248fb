"""An editable install's checkout, attacked from inside a real bwrap slot.

Default slots bind what editable installs make importable, so ``import mypkg`` works in a
slot as on the host. A flat-layout project installed with ``pip install -e`` lists its whole
checkout in a ``.pth`` file; binding that directory gave every slot the checkout's ``.git``,
``.env``, ``README`` and ``pyproject.toml``. Only the package directories may be bound.

The test makes a venv (with the machine's site-packages, so structenv and pytest are there),
installs a flat-layout checkout into it in editable mode (the ``.pth`` that ``pip install -e``
writes for it), and runs a LocalBackend with the venv's interpreter, as a user with that
install would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SECRET = "secret-token-4242"

DRIVER = textwrap.dedent(
    """
    import json, sys
    import anyio
    from structenv import ExecRequest
    from structenv.backends import LocalBackend

    CHECKOUT = sys.argv[1]
    ATTACK = f'''
    cat {CHECKOUT}/README.md {CHECKOUT}/pyproject.toml {CHECKOUT}/.env {CHECKOUT}/.git/config
    ls -a {CHECKOUT}
    '''
    WORKS = '''
    python3 -c "import flatpkg; print(flatpkg.VALUE)"
    printf 'import flatpkg\\\\ndef test_it():\\\\n    assert flatpkg.VALUE == 7\\\\n' \\
        > test_in_slot.py
    python3 -m pytest -q -p no:cacheprovider test_in_slot.py
    '''

    async def main():
        async with LocalBackend(hosts=1, slots_per_host=1) as backend:
            slot = await backend.acquire_slot()
            out = {}
            for name, command in (("attack", ATTACK), ("works", WORKS)):
                r = await slot.exec(ExecRequest(command, timeout=60))
                out[name] = {"exit": r.exit_code, "stdout": r.stdout.decode(),
                             "stderr": r.stderr.decode(), "sandboxed": r.sandboxed}
            await backend.release_slot(slot, reusable=False)
        print(json.dumps(out))

    anyio.run(main)
    """
)


@pytest.fixture(scope="module")
def venv_with_checkout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("editable")
    checkout = root / "checkout"
    (checkout / "flatpkg").mkdir(parents=True)
    (checkout / "flatpkg" / "__init__.py").write_text("VALUE = 7\n")
    (checkout / "README.md").write_text(f"readme {SECRET}\n")
    (checkout / ".env").write_text(f"API_KEY={SECRET}\n")
    (checkout / ".git").mkdir()
    (checkout / ".git" / "config").write_text(f"[remote] token = {SECRET}\n")
    (checkout / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            # {SECRET}
            [build-system]
            requires = ["hatchling"]
            build-backend = "hatchling.build"
            [project]
            name = "flatpkg"
            version = "0.1"
            [tool.hatch.build.targets.wheel]
            packages = ["flatpkg"]
            """
        )
    )
    venv = root / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True, timeout=120,
    )  # fmt: skip
    python = venv / "bin" / "python"
    # What `pip install -e` leaves for a flat layout (hatchling's and setuptools' static
    # mode): a .pth naming the checkout root, plus the metadata. Written directly: no build
    # backend or index is needed here.
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "_flatpkg.pth").write_text(f"{checkout}\n")
    info = site / "flatpkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flatpkg\nVersion: 0.1\n")
    (info / "RECORD").write_text("")
    return python, checkout


def test_a_slot_cannot_read_an_editable_checkout(
    venv_with_checkout: tuple[Path, Path], tmp_path: Path
) -> None:
    python, checkout = venv_with_checkout
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run(
        [str(python), "-c", DRIVER, str(checkout)], capture_output=True, text=True,
        timeout=300, check=False, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    attack, works = out["attack"], out["works"]
    assert attack["sandboxed"] and works["sandboxed"]
    # Nothing of the checkout but its package: no README, pyproject, .env, .git.
    assert SECRET not in attack["stdout"] + attack["stderr"], attack
    assert attack["stdout"].split() == [".", "..", "flatpkg"], attack
    # The install still works in the slot: the package imports and pytest runs.
    assert works["exit"] == 0, works
    assert works["stdout"].splitlines()[0] == "7" and "1 passed" in works["stdout"], works

"""Helpers shared by the sandbox-spec tests (no tests here): tiny root filesystems made from
the host's own programs, so no image or registry is needed."""

from __future__ import annotations

import os
import random
import shutil
import subprocess

import anyio
import pytest

from structenv import ConfigError, ExecRequest, SandboxSpec, SlotPool
from structenv.abc import SandboxBackend

#: Programs a test rootfs holds (with the libraries they load).
PROGRAMS = ("bash", "sh", "cat", "ls", "id", "echo", "touch", "ln", "readlink", "stat", "mkdir")


def _libraries(program: str) -> list[str]:
    out = subprocess.run(["ldd", program], capture_output=True, text=True, check=False).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        for part in parts:
            if part.startswith("/"):
                libs.append(part)
    return libs


def _copy(path: str, dest: str) -> None:
    target = os.path.join(dest, path.lstrip("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if not os.path.exists(target):
        shutil.copy2(os.path.realpath(path), target)


def make_rootfs(dest: str, programs: tuple[str, ...] = PROGRAMS, *, marker: str = "") -> str:
    """A minimal rootfs at ``dest``: the host's ``programs`` and their libraries under
    ``/usr``, ``/bin`` and ``/lib*`` as symlinks (merged /usr), ``/etc/passwd``, and
    ``/etc/marker`` holding ``marker``. Returns ``dest``."""
    os.makedirs(os.path.join(dest, "usr", "bin"), exist_ok=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        if not os.path.lexists(os.path.join(dest, link)):
            os.symlink(f"usr/{link}", os.path.join(dest, link))
    for name in ("lib", "lib64", "sbin"):
        os.makedirs(os.path.join(dest, "usr", name), exist_ok=True)
    for program in programs:
        path = shutil.which(program)
        assert path is not None, program
        real = os.path.realpath(path)
        shutil.copy2(real, os.path.join(dest, "usr", "bin", program))
        for lib in _libraries(real):
            _copy(lib, dest)
    os.makedirs(os.path.join(dest, "etc"), exist_ok=True)
    with open(os.path.join(dest, "etc", "passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\n")
    with open(os.path.join(dest, "etc", "group"), "w") as f:
        f.write("root:x:0:\n")
    with open(os.path.join(dest, "etc", "marker"), "w") as f:
        f.write(marker)
    return dest


def host_file_specs() -> list[tuple[SandboxSpec, str]]:
    """Specs that need files from the driver's machine (an image, a Dockerfile, a rootfs
    directory, binds), each with the name a refusal gives it: what a backend whose hosts run
    elsewhere (Nomad, Modal, Ray) refuses before anything runs."""
    return [
        (SandboxSpec(image="task:1"), "image"),
        (SandboxSpec(dockerfile="/t/Dockerfile"), "dockerfile"),
        (SandboxSpec(rootfs="/srv/rootfs"), "rootfs"),
        (SandboxSpec(binds=["/srv/data:/data"]), "binds"),
    ]


async def assert_host_file_spec_refused(
    backend: SandboxBackend, spec: SandboxSpec, what: str
) -> None:
    """``backend`` refuses ``spec`` with a one-line ConfigError naming ``what``, before
    anything runs, and still prepares specs that travel (env, workdir)."""
    name = type(backend).__name__
    with pytest.raises(ConfigError, match=f"{name} does not support a spec's {what}"):
        await backend.acquire_slot(spec)
    assert backend.statistics().acquires == 0
    await backend.prepare_spec(SandboxSpec(env={"A": "1"}, workdir="repo"))


async def cancel_mixed_specs_at_random(
    pool: SlotPool, specs: list[SandboxSpec | None], members: int, *, seed: int = 10
) -> None:
    """``members`` trajectories of specs drawn from ``specs`` each lease a slot, start
    processes that would outlive them, and are cancelled after a random delay (before the
    lease, during the cold start, during the exec); afterwards the pool holds nothing."""
    rng = random.Random(seed)

    async def member(spec: SandboxSpec | None, delay: float) -> None:
        with anyio.move_on_after(delay):
            async with pool.slot(spec) as slot:
                await slot.exec(ExecRequest("sleep 1000 & sleep 1001", timeout=60))

    async with anyio.create_task_group() as tg:
        for _ in range(members):
            tg.start_soon(member, rng.choice(specs), rng.choice((0, 0.001, 0.01, 0.05, 0.3)))
    stats = pool.statistics()
    assert stats.in_use == 0 and stats.waiting == 0 and stats.acquired == stats.released

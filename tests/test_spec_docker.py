"""Task images without a registry, on the real Docker Engine: an image's rootfs as a Local slot's
``/`` (exported once into the content-addressed cache), Dockerfiles built once per content
hash, and the same task image as a slot root inside the DockerBackend's sandbox container.

The test image is built here ``FROM scratch`` out of the host's own programs (no registry).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import stat
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import docker
import pytest

from spec_support import PROGRAMS, cancel_mixed_specs_at_random, make_rootfs
from structenv import ConfigError, ExecRequest, SandboxSpec, SlotPool
from structenv.backends._images import TASK_TAG, cache_dir, context_hash, export_rootfs
from structenv.testing import child_processes
from test_docker_support import containers_of, docker_backend, docker_image, wait_until
from test_sandbox_support import local_backend

_ = docker_image
pytestmark = [pytest.mark.anyio, pytest.mark.docker]


def rootfs_entry(image: str) -> str:
    """Where the rootfs cache keeps ``image``'s export (by image id)."""
    client = docker.from_env()
    try:
        digest = str(client.images.get(image).id).split(":")[-1]
    finally:
        client.close()
    return os.path.join(cache_dir(), "rootfs", digest)


@pytest.fixture(scope="module")
def task_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A tiny task image (bash, coreutils bits, a setuid-root ``id``), built FROM scratch."""
    context = tmp_path_factory.mktemp("image")
    root = make_rootfs(str(context / "rootfs"), marker="image")
    os.chmod(os.path.join(root, "usr", "bin", "id"), 0o4755)
    (context / "Dockerfile").write_text("FROM scratch\nCOPY rootfs/ /\nENV TASK=yes\n")
    digest = hashlib.sha256()
    for top, _, files in sorted(os.walk(context)):
        for name in sorted(files):
            digest.update(name.encode() + Path(top, name).read_bytes())
    tag = f"structenv-spectest:{digest.hexdigest()[:12]}"
    client = docker.from_env()
    try:
        client.images.build(path=str(context), tag=tag, rm=True, pull=False, network_mode="none")
        yield tag
    finally:
        client.close()


async def test_image_rootfs_on_local_and_dockerfiles(task_image: str, tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    (good / "Dockerfile").write_text(f"FROM {task_image}\nRUN echo built > /etc/built\n")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "Dockerfile").write_text(f"FROM {task_image}\nRUN echo the-reason >&2; exit 3\n")
    async with local_backend(slots_per_host=1) as backend:
        pool = SlotPool(backend)
        spec = SandboxSpec(image=task_image, name="image")
        async with pool.slot(spec) as slot:
            got = await slot.exec(ExecRequest('cat /etc/marker; echo " $TASK"; id -u'))
            marker, uid = got.stdout.decode().splitlines()
            assert marker == "image yes" and uid != "0"
        built = SandboxSpec(dockerfile=str(good / "Dockerfile"), name="built")
        async with pool.slot(built) as slot:
            assert (await slot.exec(ExecRequest("cat /etc/built"))).stdout == b"built\n"
        with pytest.raises(ConfigError, match=r"building .* failed: .*the-reason"):
            await backend.prepare_spec(SandboxSpec(dockerfile=str(bad / "Dockerfile")))
        with pytest.raises(ConfigError, match="does not exist in the local Docker Engine"):
            await backend.prepare_spec(SandboxSpec(image="structenv-no-such-image:0"))
        specs = backend.statistics().specs
        assert specs["image"].cold_starts == 1 and specs["built"].cold_starts == 1
    # The cache holds complete entries only, one per image, without setuid bits.
    built_tag = f"{TASK_TAG}:{context_hash(str(good / 'Dockerfile'), str(good))}"
    entries = [rootfs_entry(task_image), rootfs_entry(built_tag)]
    for entry in entries:
        mode = os.stat(os.path.join(entry, "root", "usr", "bin", "id")).st_mode
        assert not mode & (stat.S_ISUID | stat.S_ISGID)
    leftovers = os.listdir(os.path.dirname(entries[0]))
    assert not [e for e in leftovers if e.startswith(f".tmp-{os.getpid()}-")]
    # A second backend finds the export in the cache (nothing exported again).
    before = [os.stat(e).st_mtime_ns for e in entries]
    async with local_backend(slots_per_host=1) as backend:
        await backend.prepare_spec(SandboxSpec(image=task_image))
        await backend.prepare_spec(SandboxSpec(dockerfile=str(good / "Dockerfile")))
    assert [os.stat(e).st_mtime_ns for e in entries] == before


async def test_docker_default_toolchain_and_task_image_slots(
    task_image: str, docker_image: str
) -> None:
    del docker_image
    async with docker_backend(slots_per_host=2) as backend:
        pool = SlotPool(backend)
        async with pool.slot() as slot:
            got = await slot.exec(
                ExecRequest(
                    "set -e; python3 -m pytest --version; pytest --version; git --version; "
                    "echo a | grep a | sed s/a/b/; find . -maxdepth 0",
                    timeout=60,
                )
            )
            assert got.exit_code == 0, got.stderr
            assert b"pytest" in got.stdout and b"git version" in got.stdout
        spec = SandboxSpec(image=task_image, name="image")
        async with pool.slot(spec) as slot:
            got = await slot.exec(ExecRequest('cat /etc/marker; echo " $TASK"'))
            assert got.stdout == b"image yes\n"
            # uid 0 of a user namespace, with no capability and no way to gain one (the
            # setuid bit was dropped at export, and no_new_privs holds).
            got = await slot.exec(ExecRequest("cat /proc/self/status; ls -A /"))
            text = got.stdout.decode()
            assert "CapEff:\t0000000000000000" in text and "NoNewPrivs:\t1" in text
            assert "workspace" in text and "structenv-rootfs" not in text
        async with pool.slot(spec) as slot:
            assert (await slot.exec(ExecRequest("cat /etc/marker"))).stdout == b"image"
        with pytest.raises(ConfigError, match="outside the backend's bind_roots"):
            await backend.prepare_spec(SandboxSpec(binds=["/usr/share:/data"]))
        specs = backend.statistics().specs
        assert (specs["image"].hits, specs["image"].cold_starts) == (1, 1)


async def test_a_cancelled_export_leaves_a_complete_entry_or_none(task_image: str) -> None:
    """Cancelled before, during and after the export: the cache entry is complete or absent,
    and no temporary directory of this process is left (prepare_spec needs no running host)."""
    entry = rootfs_entry(task_image)
    await anyio.to_thread.run_sync(shutil.rmtree, entry, True)
    backend = local_backend(slots_per_host=1)
    for delay in (0.0, 0.02, 0.2):
        with anyio.move_on_after(delay):
            await backend.prepare_spec(SandboxSpec(image=task_image))
        if await anyio.Path(entry).exists():
            assert await anyio.Path(entry, "meta.json").is_file()
            assert await anyio.Path(entry, "root", "bin").exists()
        names = os.listdir(os.path.dirname(entry))
        assert not [n for n in names if n.startswith(f".tmp-{os.getpid()}-")]
    await backend.prepare_spec(SandboxSpec(image=task_image))
    assert await anyio.Path(entry, "meta.json").is_file()


async def test_docker_binds_and_rootfs_directories_come_from_bind_roots(
    tmp_path: Path, docker_image: str
) -> None:
    """Host directories under ``bind_roots`` are mounted read-only into the containers at the
    same paths; a spec's binds and rootfs directory from there work as on LocalBackend, with
    the same isolation; anything outside the roots is refused before anything runs."""
    del docker_image
    root = tmp_path / "allowed"
    data = root / "data"
    data.mkdir(parents=True)
    (data / "readme").write_text("shared")
    (data / "shadow-link").symlink_to("/etc/shadow")
    rootfs = make_rootfs(str(root / "rootfs"), marker="dir-rootfs")
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    async with docker_backend(slots_per_host=2, bind_roots=(str(root),)) as backend:
        pool = SlotPool(backend)
        binds = SandboxSpec(binds=[f"{data}:/data"], name="binds")
        async with pool.slot(binds) as slot:
            got = await slot.exec(ExecRequest("cat /data/readme; echo x > /data/new"))
            assert got.stdout == b"shared" and b"Read-only file system" in got.stderr, got
            got = await slot.exec(ExecRequest(f"ls {root}; cat /data/shadow-link"))
            assert got.exit_code != 0 and got.stdout == b"", got  # the root itself is not there
        on_dir = SandboxSpec(rootfs=rootfs, binds=[f"{data}:/data"], name="dir")
        async with pool.slot(on_dir) as slot:
            got = await slot.exec(ExecRequest("cat /etc/marker; echo; cat /data/readme"))
            assert got.stdout == b"dir-rootfs\nshared", got
            # As any Docker slot: uid 0 of its own user namespace, no capability, no way to
            # gain one, the seccomp filter on.
            got = await slot.exec(ExecRequest("cat /proc/self/status"))
            text = got.stdout.decode()
            assert "CapEff:\t0000000000000000" in text and "NoNewPrivs:\t1" in text
            assert "Seccomp:\t2" in text
            for target in ("/etc/marker", "/usr/bin/cat", "/data/readme", "/newfile"):
                got = await slot.exec(ExecRequest(f"echo x >> {target}"))
                assert got.exit_code != 0, target
        assert (data / "readme").read_text() == "shared" and not (data / "new").exists()
        assert (Path(rootfs) / "etc" / "marker").read_text() == "dir-rootfs"
        refused = [
            SandboxSpec(binds=[f"{outside}:/data"]),
            SandboxSpec(binds=[f"{root / 'escape'}:/data"]),  # a link out of the root
            SandboxSpec(rootfs=str(outside)),
            SandboxSpec(rootfs=str(data)),  # no /bin/sh
            SandboxSpec(binds=["/etc:/data"]),
        ]
        acquires = backend.statistics().acquires
        for spec in refused:
            with pytest.raises(ConfigError) as info:
                async with pool.slot(spec):
                    pytest.fail("a refused spec got a slot")
            message = str(info.value)
            assert "\n" not in message and (
                "outside the backend's bind_roots" in message
                or "refused" in message
                or "has no /bin/sh" in message
            ), message
        assert backend.statistics().acquires == acquires  # nothing ran for them
        assert set(backend.statistics().specs) == {"binds", "dir", "default"}


@pytest.mark.parametrize(
    ("roots", "message"),
    [
        (("/etc",), "bind root /etc: refused, it exposes /etc/shadow"),
        (("/usr/share",), "bind root /usr/share: refused, it overlaps /usr"),
        (("relative",), "must be an absolute path"),
        (("/no/such/dir",), "does not exist"),
    ],
)
async def test_docker_bad_bind_roots_stop_the_backend_before_any_container(
    roots: tuple[str, ...], message: str
) -> None:
    backend = docker_backend(bind_roots=roots)
    with pytest.raises(ConfigError, match=message):
        async with backend:
            pytest.fail("started with a refused bind root")
    assert containers_of(backend.run_id) == []


async def test_a_cancelled_build_leaves_a_complete_image_or_none(
    task_image: str, tmp_path: Path
) -> None:
    """A Dockerfile build cancelled at once or half-way: afterwards the image and its rootfs
    export are each complete or absent (the engine tags an image only when its build ends;
    the export is renamed into place), no temporary export of this process is left, and the
    next prepare finishes the job."""
    context = tmp_path / "ctx"
    context.mkdir()
    token = secrets.token_hex(6)
    (context / "Dockerfile").write_text(
        f"FROM {task_image}\n"
        "RUN i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done\n"  # a while (no sleep in it)
        f"RUN echo {token} > /etc/token\n"
    )
    spec = SandboxSpec(dockerfile=str(context / "Dockerfile"))
    tag = f"{TASK_TAG}:{context_hash(str(context / 'Dockerfile'), str(context))}"
    client = docker.from_env()
    backend = local_backend(slots_per_host=1)
    try:
        for delay in (0.0, 0.3):
            with anyio.move_on_after(delay):
                await backend.prepare_spec(spec)
            try:
                client.images.get(tag)
            except docker.errors.ImageNotFound:
                continue
            entry = rootfs_entry(tag)
            if await anyio.Path(entry).exists():
                assert await anyio.Path(entry, "meta.json").is_file()
                assert await anyio.Path(entry, "root", "etc", "token").read_text() == f"{token}\n"
            names = os.listdir(os.path.dirname(entry))
            assert not [n for n in names if n.startswith(f".tmp-{os.getpid()}-")]
        await backend.prepare_spec(spec)
        token_file = anyio.Path(rootfs_entry(tag), "root", "etc", "token")
        assert await token_file.read_text() == f"{token}\n"
    finally:
        with contextlib.suppress(docker.errors.DockerException):
            client.images.remove(tag, force=True)
        client.close()


async def test_cancelling_docker_trajectories_of_mixed_specs_leaks_nothing(
    task_image: str, tmp_path: Path, docker_image: str
) -> None:
    del docker_image
    data = tmp_path / "allowed"
    data.mkdir()
    (data / "readme").write_text("shared")
    specs = [
        None,
        SandboxSpec(image=task_image, name="image"),
        SandboxSpec(env={"X": "1"}, name="x"),
        SandboxSpec(binds=[f"{data}:/data"], name="binds"),
    ]
    async with docker_backend(slots_per_host=2, bind_roots=(str(data),)) as backend:
        run_id = backend.run_id
        pool = SlotPool(backend, acquire_timeout=120)
        await cancel_mixed_specs_at_random(pool, specs, 12)
        with anyio.fail_after(120):
            async with pool.slot(specs[1]) as slot:  # every slot is usable again
                assert (await slot.exec(ExecRequest("cat /etc/marker"))).stdout == b"image"
            async with pool.slot(specs[3]) as slot:
                assert (await slot.exec(ExecRequest("cat /data/readme"))).stdout == b"shared"
        assert backend.statistics().leased == 0
        ids = list(backend.container_ids().values())
        api = docker.from_env().api

        async def no_sleepers() -> bool:
            tops = [await anyio.to_thread.run_sync(api.top, i) for i in ids]
            return not any(
                "sleep 100" in " ".join(map(str, p)) for t in tops for p in t["Processes"]
            )

        await wait_until(no_sleepers, deadline=60)
        api.close()
    assert containers_of(run_id) == []


#: Seconds a cancelled build or export may take to return (prompt is well under 2 s; the
#: margin is for a loaded 2-core machine). Uncancellable, each took the whole build or export.
_PROMPT = 10.0


def _threads_in_images() -> list[str]:
    """Threads whose stack is inside ``backends/_images.py`` (a build or export running)."""
    found = []
    for ident, frame in sys._current_frames().items():
        files = {f.f_code.co_filename for f, _ in traceback.walk_stack(frame)}
        if any(name.endswith(os.path.join("backends", "_images.py")) for name in files):
            found.append(str(ident))
    return found


@pytest.fixture(scope="module")
def slow_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A task image with ``sleep``, tagged uniquely, removed afterwards."""
    context = tmp_path_factory.mktemp("slow")
    token = secrets.token_hex(6)
    make_rootfs(str(context / "rootfs"), (*PROGRAMS, "sleep"), marker=token)
    (context / "Dockerfile").write_text("FROM scratch\nCOPY rootfs/ /\n")
    yield from _built_image(str(context), f"structenv-spectest-slow:{token}")


@pytest.fixture(scope="module")
def big_image(docker_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The sandbox image (~250 MB of files: an export of seconds) plus a marker of this run,
    so no cached rootfs matches it; removed with its cache entry. (A 16 GiB sparse file made
    the export long but cost ~2 min and 16 GB of disk to build: the layer is not sparse.)"""
    context = tmp_path_factory.mktemp("big")
    token = secrets.token_hex(6)
    (context / "Dockerfile").write_text(f"FROM {docker_image}\nRUN echo {token} > /marker\n")
    yield from _built_image(str(context), f"structenv-spectest-big:{token}")


@pytest.fixture(scope="module")
def big_image_export_s(big_image: str) -> float:
    """Seconds a whole export of ``big_image`` takes on this machine now (its entry is then
    removed): what a cancellation that is not prompt would wait for."""
    started = time.monotonic()
    export_rootfs(big_image)
    took = time.monotonic() - started
    shutil.rmtree(rootfs_entry(big_image))
    return took


def _built_image(context: str, tag: str) -> Iterator[str]:
    client = docker.from_env()
    try:
        client.images.build(path=context, tag=tag, rm=True, pull=False, network_mode="none")
        yield tag
    finally:
        with contextlib.suppress(docker.errors.DockerException):
            shutil.rmtree(rootfs_entry(tag), ignore_errors=True)
            client.images.remove(tag, force=True)
        client.close()


async def _cancel_when(
    backend: Any, spec: SandboxSpec, started: Callable[[], Awaitable[bool]]
) -> float:
    """Prepare ``spec``, cancel it once ``started()`` holds; seconds from the cancel to the
    return."""
    scope = anyio.CancelScope()
    cancelled_at: list[float] = []

    async def prepare() -> None:
        with scope:
            await backend.prepare_spec(spec)

    with anyio.fail_after(300):
        async with anyio.create_task_group() as tg:
            tg.start_soon(prepare)
            await wait_until(started, deadline=240)
            cancelled_at.append(time.monotonic())
            scope.cancel()
    assert scope.cancelled_caught, "the build or export finished before it was cancelled"
    return time.monotonic() - cancelled_at[0]


async def test_a_cancelled_build_returns_promptly_and_leaves_nothing(
    slow_image: str, tmp_path: Path
) -> None:
    """Cancelled while a RUN step runs (a ``sleep 600``): prepare_spec returns at once, the
    engine abandons the build (its container goes, the image is never tagged), no thread is
    left building, no child process."""
    token = secrets.token_hex(6)
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {slow_image}\nRUN echo {token}; sleep 600\n")
    spec = SandboxSpec(dockerfile=str(context / "Dockerfile"))
    tag = f"{TASK_TAG}:{context_hash(str(context / 'Dockerfile'), str(context))}"
    client = docker.from_env()

    def build_containers() -> list[Any]:
        return [c for c in client.api.containers(all=True) if token in c.get("Command", "")]

    async def running() -> bool:
        return bool(await anyio.to_thread.run_sync(build_containers))

    async def gone() -> bool:
        return not await anyio.to_thread.run_sync(build_containers)

    backend = local_backend(slots_per_host=1)
    try:
        elapsed = await _cancel_when(backend, spec, running)
        assert elapsed < _PROMPT, f"the cancelled build took {elapsed:.1f} s to return"
        assert not _threads_in_images()
        assert not child_processes()
        await wait_until(gone, deadline=60)  # the engine removes the abandoned step's container
        with pytest.raises(docker.errors.ImageNotFound):
            client.images.get(tag)
    finally:
        with contextlib.suppress(docker.errors.DockerException):
            for c in build_containers():
                client.api.remove_container(c["Id"], force=True)
            client.images.remove(tag, force=True)
        client.close()


async def test_a_cancelled_export_returns_promptly_and_leaves_nothing(
    big_image: str, big_image_export_s: float
) -> None:
    """Cancelled while the image's files are being extracted: prepare_spec returns at once, and
    neither a cache entry nor the temporary export nor the export's container is left."""
    entry = rootfs_entry(big_image)
    root = os.path.dirname(entry)
    client = docker.from_env()
    image_id = client.images.get(big_image).id

    def temporary() -> list[str]:
        names = os.listdir(root) if os.path.isdir(root) else []
        return [n for n in names if n.startswith(f".tmp-{os.getpid()}-")]

    def big_started() -> bool:
        return any(os.path.exists(os.path.join(root, n, "root", "etc")) for n in temporary())

    async def extracting() -> bool:
        return await anyio.to_thread.run_sync(big_started)

    def export_containers() -> list[Any]:
        return list(client.api.containers(all=True, filters={"ancestor": image_id}))

    backend = local_backend(slots_per_host=1)
    try:
        elapsed = await _cancel_when(backend, SandboxSpec(image=big_image), extracting)
        # Cancelled early in the export (its /etc): a wait for the rest of it would take
        # most of a whole export's time, measured just before under the same load.
        assert elapsed < min(_PROMPT, big_image_export_s / 2), (
            f"the cancelled export took {elapsed:.1f} s to return "
            f"(a whole export: {big_image_export_s:.1f} s)"
        )
        assert not await anyio.Path(entry).exists() and not temporary()
        assert not export_containers()
        assert not _threads_in_images()
        assert not child_processes()
    finally:
        client.close()

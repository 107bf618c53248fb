"""Task images without a registry: build a Dockerfile once per content hash, export an image's
root filesystem once into a content-addressed cache.

Only the local engine is asked (through the docker SDK); nothing is ever pulled. An exported
rootfs lives in ``<cache>/rootfs/<image id>/root`` beside ``meta.json`` (the image's
environment). It is extracted into a temporary directory and renamed into place, so the cache
holds complete entries or none: an export that fails, is cancelled or whose process dies
leaves at most a ``.tmp-<pid>-*`` directory, removed by the next export once that pid is gone.

A build or an export runs in a worker thread (the docker SDK blocks). :class:`Stop` lets the
event loop stop it promptly when the awaiting task is cancelled (:func:`run_stoppable`): its
connection to the engine is shut down (a blocked read returns at once; the engine abandons a
build whose client went away, and tags an image only when its build completes) and the export
loop stops between members; the worker then removes what it made (the export's temporary
directory and container) before it returns, and the cancelled task waits for that.

Extraction is defensive, the image being untrusted: device nodes and FIFOs are dropped,
setuid/setgid bits and group/other write bits cleared, members that would land outside the
destination (through ``..``, an absolute name or a symlink extracted earlier) refused, hard
links only to a regular file already extracted (never to a symlink, a dropped member or
through one), owners kept as numbers (never looked up on the host).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import socket
import stat
import tarfile
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import anyio

from .._exceptions import ConfigError

__all__ = ["Stop", "build_dockerfile", "cache_dir", "export_rootfs", "run_stoppable"]

T = TypeVar("T")

#: Seconds a cancelled build or export is given to stop and remove what it made.
STOP_GRACE = 30.0


class Stopped(Exception):
    """A build or export was stopped by :meth:`Stop.stop` (its caller was cancelled)."""


class Stop:
    """Stops a blocking build or export from another thread.

    The worker registers each streamed engine response with :meth:`track` and calls
    :meth:`check` between steps; :meth:`stop` (any thread) shuts down the tracked connections
    so a read blocked on one returns at once, and makes every later :meth:`check` raise.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopped = False
        self._responses: list[Any] = []

    @property
    def stopped(self) -> bool:
        return self._stopped

    def track(self, response: Any) -> None:
        """Shut ``response``'s connection down on :meth:`stop` (at once if already stopped)."""
        with self._lock:
            self._responses.append(response)
            stopped = self._stopped
        if stopped:
            _shutdown(response)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            responses = list(self._responses)
        for response in responses:
            _shutdown(response)

    def check(self) -> None:
        """Raises:
        Stopped: :meth:`stop` was called."""
        if self._stopped:
            raise Stopped("stopped")


def _shutdown(response: Any) -> None:
    """Shut down the socket under a streamed ``requests`` response (``docker`` SDK): a read
    blocked on it in another thread returns at once (closing it would not wake the reader)."""
    fp = getattr(getattr(response, "raw", None), "_fp", None)
    raw = getattr(getattr(fp, "fp", None), "raw", None)
    sock = getattr(raw, "_sock", None)
    if not isinstance(sock, socket.socket):
        sock = getattr(getattr(getattr(response, "raw", None), "_connection", None), "sock", None)
    if isinstance(sock, socket.socket):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


async def run_stoppable(
    fn: Callable[[Stop], T], *, limiter: anyio.CapacityLimiter | None = None
) -> T:
    """``fn(stop)`` in a worker thread; when the caller is cancelled, ``stop`` is stopped and
    the worker awaited (shielded, at most :data:`STOP_GRACE` s) before the cancellation goes
    on, so whatever it was making is complete or removed when this returns.

    Cancellation: prompt (the worker's blocking engine call is interrupted, not awaited)."""
    stop = Stop()
    finished = threading.Event()

    def work() -> T:
        try:
            return fn(stop)
        finally:
            finished.set()

    try:
        return await anyio.to_thread.run_sync(work, limiter=limiter, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        stop.stop()
        with anyio.CancelScope(shield=True):
            # A thread of its own: never queued behind the work it waits for.
            await anyio.to_thread.run_sync(
                finished.wait, STOP_GRACE, abandon_on_cancel=True, limiter=anyio.CapacityLimiter(1)
            )
        raise


#: Tag prefix of images built from a spec's Dockerfile (``structenv-task:<content hash>``).
TASK_TAG = "structenv-task"
#: Most bytes of file data an export writes (and never more than leaves the cache's
#: filesystem :data:`EXPORT_DISK_RESERVE` of its size free): an image's sparse file costs
#: the image nothing and the export its full size.
EXPORT_MAX_BYTES = 64 << 30
#: Most members (files, directories, links) an export extracts.
EXPORT_MAX_FILES = 2_000_000
#: Share of the cache's filesystem an export always leaves free.
EXPORT_DISK_RESERVE = 0.05


def cache_dir() -> str:
    """``$STRUCTENV_CACHE_DIR`` or ``$XDG_CACHE_HOME/structenv`` or ``~/.cache/structenv``."""
    base = os.environ.get("STRUCTENV_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "structenv"
    )
    return os.path.realpath(base)


def _sdk() -> Any:
    """The docker SDK module (an extra: ``pip install 'structenv[docker]'``)."""
    try:
        import docker
        import docker.errors
    except ImportError:
        raise ConfigError(
            "a spec with an image or Dockerfile needs the docker SDK: "
            "pip install 'structenv[docker]'"
        ) from None
    return docker


def _client() -> Any:
    docker = _sdk()
    try:
        return docker.from_env()
    except docker.errors.DockerException as exc:
        raise ConfigError(f"a spec with an image needs a Docker Engine: {exc}") from None


def context_hash(dockerfile: str, context: str) -> str:
    """Digest of a Dockerfile and every file of its context (names, modes, contents)."""
    h = hashlib.sha256()
    with open(dockerfile, "rb") as f:
        h.update(f.read())
    for top, dirs, files in os.walk(context):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(top, name)
            st = os.lstat(path)
            h.update(f"\0{os.path.relpath(path, context)}\0{st.st_mode:o}\0".encode())
            if os.path.islink(path):
                h.update(os.readlink(path).encode())
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
    return h.hexdigest()[:16]


def build_dockerfile(
    dockerfile: str, context: str | None = None, *, stop: Stop | None = None
) -> str:
    """Build ``dockerfile`` once per content hash (blocking); return the image's tag.

    ``stop`` stops the build half-way (its connection to the engine is shut down; the engine
    abandons the build and never tags its image).

    Raises:
        ConfigError: The file or context is missing, or the build fails (with the tail of
            its log).
        Stopped: ``stop`` was stopped.
    """
    docker = _sdk()
    context = context or os.path.dirname(dockerfile)
    if not os.path.isfile(dockerfile):
        raise ConfigError(f"Dockerfile {dockerfile} does not exist")
    if not os.path.isdir(context):
        raise ConfigError(f"build context {context} is not a directory")
    tag = f"{TASK_TAG}:{context_hash(dockerfile, context)}"
    client = _client()
    if stop is not None:
        _track_streams(client, stop)
    try:
        try:
            client.images.get(tag)
            return tag
        except docker.errors.ImageNotFound:
            pass
        try:
            if stop is not None:
                stop.check()
            client.images.build(
                path=context,
                dockerfile=os.path.relpath(dockerfile, context),
                tag=tag,
                rm=True,
                forcerm=True,
                pull=False,
                network_mode="none",
                labels={"org.structenv.image": "task"},
            )
        except docker.errors.BuildError as exc:
            if stop is not None:
                stop.check()  # a stopped build ends as a cut stream: it was stopped
            lines = [str(c.get("stream") or c.get("error") or "").strip() for c in exc.build_log]
            tail = " | ".join(x for x in lines if x)[-600:]
            raise ConfigError(f"building {dockerfile} failed: {exc.msg}; log: {tail}") from None
        except Exception as exc:
            if stop is not None:
                stop.check()
            if isinstance(exc, docker.errors.APIError):
                raise ConfigError(f"building {dockerfile} failed: {exc}") from None
            raise
        return tag
    finally:
        client.close()


def _track_streams(client: Any, stop: Stop) -> None:
    """Have ``stop`` track every streamed response of ``client`` (the build's output)."""
    api = client.api
    helper = getattr(api, "_stream_helper", None)
    if helper is None:  # pragma: no cover - another SDK: a stop then waits for the build
        return

    def tracked(response: Any, *args: Any, **kwargs: Any) -> Any:
        stop.track(response)
        return helper(response, *args, **kwargs)

    api._stream_helper = tracked


class _ChunkReader(io.RawIOBase):
    """A file object over the byte chunks of a container's export."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _member_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    if member.ischr() or member.isblk() or member.isfifo():
        return None
    if member.islnk() and not _plain_file_in(dest, member.linkname):
        # tarfile links first, then chowns, chmods and touches the link *through* the path,
        # following symlinks: a hard link to an image's symlink ``s -> /etc/shadow`` made the
        # exporter (host root) chown and chmod 0755 the host's /etc/shadow. A link whose
        # target was dropped (a device) made tarfile extract the unfiltered target instead
        # (a device node in the cache). Only a regular file extracted earlier may be linked.
        return None
    return tarfile.tar_filter(member, dest)


def _plain_file_in(dest: str, name: str) -> bool:
    """Whether ``name`` is a regular file inside ``dest`` reached through directories only."""
    target = os.path.normpath(name)
    if os.path.isabs(target) or target == ".." or target.startswith("../"):
        return False
    path = os.path.join(os.path.realpath(dest), target)
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and os.path.realpath(path) == path


def _sweep(root: str) -> None:
    """Remove temporary directories of exports whose process is gone."""
    for name in os.listdir(root):
        if not name.startswith(".tmp-"):
            continue
        try:
            pid = int(name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def rootfs_entry(image: str, cache: str | None = None) -> str | None:
    """The cache entry of ``image``'s exported rootfs, or ``None`` if it was not exported
    (blocking; for reports such as ``structenv bench specs``).

    Raises:
        ConfigError: The image does not exist in the local Docker Engine.
    """
    docker = _sdk()
    client = _client()
    try:
        digest = str(client.images.get(image).id).split(":")[-1]
    except docker.errors.ImageNotFound:
        raise ConfigError(
            f"image {image!r} does not exist in the local Docker Engine: build it with "
            f"`structenv image build --tag {image}`"
        ) from None
    finally:
        client.close()
    path = os.path.join(cache or cache_dir(), "rootfs", digest)
    return path if os.path.isdir(path) else None


def _export_budget(path: str, max_bytes: int) -> int:
    """Bytes an export into ``path`` may write: ``max_bytes``, and never so much that less
    than :data:`EXPORT_DISK_RESERVE` of the filesystem stays free (it is the host's)."""
    fs = os.statvfs(path)
    free = fs.f_bavail * fs.f_frsize - int(fs.f_blocks * fs.f_frsize * EXPORT_DISK_RESERVE)
    return max(0, min(max_bytes, free))


def export_rootfs(
    image: str,
    cache: str | None = None,
    *,
    max_bytes: int = EXPORT_MAX_BYTES,
    max_files: int = EXPORT_MAX_FILES,
    stop: Stop | None = None,
) -> tuple[str, dict[str, str]]:
    """The rootfs directory of local image ``image`` and the image's environment (blocking).

    Exported on first use into ``<cache>/rootfs/<image id>``; later calls only look it up.
    An export stops at ``max_bytes`` of file data (less if the cache's filesystem would
    keep under :data:`EXPORT_DISK_RESERVE` free) or ``max_files`` members. ``stop`` stops
    it half-way (the partial export and its container are removed before this returns).

    Raises:
        Stopped: ``stop`` was stopped.
        ConfigError: The image does not exist in the local engine (no registry is asked),
            or its rootfs is over those limits.
    """
    docker = _sdk()
    root = os.path.join(cache or cache_dir(), "rootfs")
    os.makedirs(root, mode=0o755, exist_ok=True)
    client = _client()
    try:
        try:
            img = client.images.get(image)
        except docker.errors.ImageNotFound:
            raise ConfigError(
                f"image {image!r} does not exist in the local Docker Engine "
                "(structenv never pulls: build or load it first)"
            ) from None
        except docker.errors.APIError as exc:
            raise ConfigError(f"cannot look up image {image!r}: {exc}") from None
        digest = str(img.id).split(":")[-1]
        final = os.path.join(root, digest)
        env = _image_env(img.attrs)
        if os.path.isdir(final):
            return os.path.join(final, "root"), env
        _sweep(root)
        tmp = os.path.join(root, f".tmp-{os.getpid()}-{secrets.token_hex(4)}")
        os.makedirs(os.path.join(tmp, "root"), mode=0o755)
        container = response = None
        try:
            if stop is not None:
                stop.check()
            container = client.containers.create(img.id, entrypoint=["/"], command=[])
            # The export as a plain streamed response (the SDK's APIClient is a requests
            # session), so an export stopped half-way closes its connection at once.
            response = client.api.get(
                f"{client.api.base_url}/containers/{container.id}/export", stream=True
            )
            if stop is not None:
                stop.track(response)
            if not response.ok:
                raise ConfigError(
                    f"exporting image {image!r} failed: HTTP {response.status_code} "
                    f"{response.text[:300]}"
                )
            reader = io.BufferedReader(_ChunkReader(response.iter_content(1 << 20)), 1 << 20)
            budget = _export_budget(root, max_bytes)
            written = files = 0
            try:
                with tarfile.open(fileobj=reader, mode="r|") as tar:
                    for member in tar:
                        if stop is not None:
                            stop.check()
                        written += member.size if member.isreg() else 0
                        files += 1
                        if written > budget or files > max_files:
                            over = (
                                f"{max_files} files"
                                if files > max_files
                                else f"{budget} bytes (max_bytes {max_bytes}, and "
                                f"{EXPORT_DISK_RESERVE:.0%} of the disk stays free)"
                            )
                            raise ConfigError(
                                f"image {image!r} was not exported: "
                                f"its rootfs holds more than {over}"
                            )
                        try:
                            tar.extract(
                                member,
                                os.path.join(tmp, "root"),
                                numeric_owner=True,
                                filter=_member_filter,
                            )
                        except tarfile.FilterError:
                            continue  # a member that would escape the rootfs: not extracted
            except Exception:
                if stop is not None:
                    stop.check()  # a stopped export ends as a cut stream: it was stopped
                raise
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump({"image": image, "id": img.id, "env": env}, f)
            os.chmod(os.path.join(tmp, "root"), 0o755)
            try:
                os.rename(tmp, final)
            except OSError:
                if not os.path.isdir(final):  # another process won the race: keep theirs
                    raise
        finally:
            if response is not None:
                response.close()
            if container is not None:
                try:
                    container.remove(force=True)
                except docker.errors.APIError:
                    pass
            shutil.rmtree(tmp, ignore_errors=True)
        return os.path.join(final, "root"), env
    finally:
        client.close()


def _image_env(attrs: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in (attrs.get("Config") or {}).get("Env") or []:
        key, _, value = str(item).partition("=")
        if key and key != "HOSTNAME":
            env[key] = value
    return env

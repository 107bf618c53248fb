"""DockerBackend: sandbox hosts as Docker containers, each running the structenv sandbox server.

Every container runs ``python -m structenv.sandbox`` (the same server LocalBackend starts as a
process) serving S slots, and this backend talks to it with the same client
(:class:`~structenv.sandbox.HostClient`, :class:`~structenv.sandbox.RemoteSlot`). The Docker
SDK is only the control plane: create, inspect, kill, remove. Every SDK call is blocking, so it
runs in ``anyio.to_thread.run_sync`` under one :class:`anyio.CapacityLimiter`.

How the backend reaches the server:

* ``allow_network=False`` (the default) gives the container ``network_mode="none"``: it has
  only a loopback interface, so no TCP connection from this host can reach it. The server
  listens instead on a unix socket in a private host directory bind-mounted at
  ``/run/structenv`` (never visible to slots: bubblewrap only binds ``/usr``, ``/etc`` and
  the slot's workspace).
* ``allow_network=True`` puts the container on a Docker network (``bridge`` by default); the
  server listens on TCP ``0.0.0.0:8765`` inside the container with a bearer token, and the
  backend connects to the container's address on that network (no port is published).
  Slots never share the container's network namespace: each has its own, with slirp4netns
  NAT (``structenv.sandbox._netns``; the container gets ``/dev/net/tun``), and prohibit
  routes to the container's own addresses keep them away from the server's port.

Isolation: inside the container each slot still runs under bubblewrap. bwrap needs a user
namespace, which Docker's default seccomp profile forbids and its masked ``/proc`` paths make
un-mountable; so bwrap containers run with ``seccomp=unconfined`` and ``systempaths=unconfined``
but with every capability dropped except SETUID, SETGID and SETFCAP (needed to write the user
namespace's uid map) and ``no-new-privileges``. The server's start-up probe verifies from inside
each slot that capabilities are gone and the network is isolated; if it fails, the backend fails
closed (``require_sandbox=True``) or, when allowed, runs the slots unsandboxed and says so:
``sandboxed`` is ``True`` only when bwrap isolates every slot. The container boundary (its own
namespaces, cgroup limits, no network) is a second layer in both cases, but with
``sandboxed=False`` the slots of one container are not isolated from each other.

Per-slot cgroups (``slot_cgroups``): with a local engine using the cgroupfs driver on cgroup v1
(and runc), each container gets a parent cgroup of its own in the pids, memory and cpu
hierarchies, ``/sys/fs/cgroup/<controller>/structenv-docker/<container name>``, made by this
process (root) and passed as the container's ``cgroup_parent``; it carries the container's
overall limits. Its sibling directory ``slots`` is bind-mounted into the container at
``/run/structenv-cgroup/<controller>`` and the server makes each slot's cgroups there (the same
:class:`~structenv.sandbox._bwrap.SlotCgroup` limits as on a host: its share of the pids and
memory, equal cpu shares), so one slot's fork bomb, tmpfs or allocation hits only its own
limits. The server (uid 65533) writes that root-owned tree with ``CAP_DAC_OVERRIDE`` and moves
only its own processes (cgroup v1 lets an unprivileged writer move tasks of its own uid). The
cgroup directories are removed with the container (by :meth:`DockerBackend.aclose` or, for
dead runs, the reaper). Elsewhere the slots of a container share its cgroup.

Ownership and cleanup: containers carry labels naming this run and its owner process (host,
boot id, pid, pid start time; see :mod:`structenv.backends._ownership`). Closing the backend
removes every container of its run (found by label, so even one whose creation was
interrupted). If this process dies without closing (SIGKILL, OOM), its containers *stop* at
once: the backend holds each container's stdin open (attached before start), the kernel closes
it with the process, and the server (``--watch-stdin``) exits, killing every sandbox. The
stopped containers (and any left running when that switch could not work: a daemon restart,
``exit_with_owner=False``) are removed by the next backend that starts with ``reap_on_start``
or by ``structenv reap``; live runs' containers are never touched. If the process is forced to
exit (a second SIGINT/SIGTERM while the orderly shutdown runs), an emergency cleanup
(:mod:`structenv._emergency`) removes the run's containers, their cgroups and its socket
directory synchronously before the process exits."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import anyio
import anyio.abc
import tenacity

from .. import _emergency
from .._exceptions import BackendError, ConfigError, SandboxUnavailableError
from .._image import DEFAULT_TAG
from .._spec import SandboxSpec
from ..sandbox import _netns, _seccomp
from ..sandbox._bwrap import DEFAULT_PATH, SLOT_PTYS
from ..sandbox._bwrap import nofile_limit as nofile_limit_for
from ..sandbox._client import HostClient
from ..sandbox._runtime import SlotSpec, shm_inodes
from ._docker_reap import (
    DOCKER_CGROUP_PARENT,
    DOCKER_MOUNT,
    docker_cgroup_names,
    reap_docker,
    remove_docker_cgroups,
)
from ._hosted import Host, HostedBackend, plain_slot_spec
from ._options import DockerOptions, resolve_options
from ._ownership import LABEL_RUN, ReapReport, owner_labels

__all__ = ["DEFAULT_IMAGE", "DockerBackend", "reap_containers"]

logger = logging.getLogger("structenv.backends.docker")

#: The image ``structenv image build`` makes (``structenv/_images/build.sh``).
DEFAULT_IMAGE = DEFAULT_TAG
_MOUNT = DOCKER_MOUNT
_SOCKET = "sandbox.sock"
_PORT = 8765
_WORKDIR = "/var/tmp/structenv-sandbox"
#: Where a container sees the ``slots`` cgroup directories delegated to its server.
_CGROUP_MOUNT = "/run/structenv-cgroup"
#: Where a container sees the host's rootfs cache (read-only): a task image's exported root
#: filesystem becomes a slot's ``/`` inside the sandbox-image container.
_ROOTFS_MOUNT = "/.structenv-rootfs"
#: Where a bind root may not be mounted in a container: its system (the server's
#: interpreter, bwrap) and the directories the backend mounts there.
_CONTAINER_OWN = (
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc",
    _MOUNT, _WORKDIR, _ROOTFS_MOUNT, _CGROUP_MOUNT,
)  # fmt: skip
_CGROUP_V1 = "/sys/fs/cgroup"
_SLOT_CONTROLLERS = ("pids", "memory", "cpu")
_CFS_PERIOD = 100_000
#: Seconds to wait for a removed container's cgroups to empty (its processes being reaped).
_CGROUP_PATIENCE = 5.0
#: A forced exit's cleanup: the timeout of each Docker API call and the whole budget.
_EMERGENCY_API_TIMEOUT = 10
_EMERGENCY_BUDGET = 20.0
#: What the container's sandbox server keeps: it runs as uid 65533 (never host uid 0, which
#: could write host sysctls through the unmasked /proc bwrap needs) with these as ambient
#: capabilities: switching each slot to its own uid (SETUID/SETGID, before bwrap), tending
#: the slots' workspaces (CHOWN, DAC_OVERRIDE, FOWNER) and killing their processes (KILL).
#: Every slot process has none of them.
_SERVER_CAPS = ("SETUID", "SETGID", "SETFCAP", "CHOWN", "DAC_OVERRIDE", "FOWNER", "KILL")
_SERVER_UID = 65533
_BWRAP_SECURITY: dict[str, Any] = {
    "cap_drop": ["ALL"],
    "cap_add": list(_SERVER_CAPS),
    # container_profile() is added at creation (seccomp=<json>): Docker's default refuses
    # what bwrap needs, "unconfined" would allow everything else too.
    "security_opt": ["systempaths=unconfined", "no-new-privileges"],
}


def _server_entrypoint() -> list[str]:
    caps = ",".join(f"+{c.lower()}" for c in _SERVER_CAPS)
    return [
        "setpriv", f"--reuid={_SERVER_UID}", f"--regid={_SERVER_UID}", "--clear-groups",
        f"--inh-caps={caps}", f"--ambient-caps={caps}", "--",
        "python3", "-m", "structenv.sandbox",
    ]  # fmt: skip


_PLAIN_SECURITY: dict[str, Any] = {
    "cap_drop": ["NET_RAW", "MKNOD", "AUDIT_WRITE", "SETFCAP", "NET_BIND_SERVICE"],
    "security_opt": ["no-new-privileges"],
}
_T = TypeVar("_T")


def _docker() -> Any:
    import docker  # the only import of the SDK in structenv

    return docker


def _is_transient(exc: BaseException) -> bool:
    """The explicit list of Docker errors worth retrying: the engine was unreachable or busy.

    Never cancellation, never ``TimeoutError`` (a deadline the caller set), never a 4xx.
    """
    if not isinstance(exc, Exception) or isinstance(exc, TimeoutError):
        return False
    import requests

    if isinstance(
        exc, (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError)
    ):
        return True
    errors = _docker().errors
    if isinstance(exc, errors.APIError) and exc.status_code in (502, 503, 504):
        return True
    # "removal already in progress" / "container is restarting": the engine is mid-operation.
    return isinstance(exc, errors.APIError) and exc.status_code == 409 and "in progress" in str(exc)


def _is_gone(exc: BaseException) -> bool:
    errors = _docker().errors
    return isinstance(exc, errors.NotFound) or (
        isinstance(exc, errors.APIError) and exc.status_code == 409 and "in progress" in str(exc)
    )


class _Engine:
    """The Docker SDK behind a thread limiter, with retries of transient errors only."""

    def __init__(self, client: Any, *, concurrency: int, attempts: int) -> None:
        self.client = client
        self.limiter = anyio.CapacityLimiter(concurrency)
        self._attempts = attempts

    async def call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run a blocking SDK call in a worker thread, retrying transient errors.

        Cancellation: the thread is not abandoned (a create's result is never lost); the
        cancellation is delivered when the call returns.
        """
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(_is_transient),
            stop=tenacity.stop_after_attempt(self._attempts),
            wait=tenacity.wait_exponential(multiplier=0.1, max=2.0),
            sleep=anyio.sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await anyio.to_thread.run_sync(
                    functools.partial(fn, *args, **kwargs), limiter=self.limiter
                )
        raise AssertionError("unreachable")  # pragma: no cover


@dataclasses.dataclass(eq=False, kw_only=True)
class _Container(Host):
    docker_id: str
    hostdir: str
    stdin: Any = None  # our end of the container's stdin (owner-death switch), or None


class DockerBackend(HostedBackend):
    """Sandbox hosts as Docker containers (one sandbox server with S slots per container).

    Use as ``async with DockerBackend(...) as backend:``. See the module docstring for the
    transport, the isolation and what ``sandboxed`` means here.

    Options (fields of :class:`~structenv.backends.DockerOptions`, given as a model and/or
    keyword overrides; the host-pool ones are :class:`~structenv.backends.HostedOptions`'):
        image: An image whose entrypoint is ``python3 -m structenv.sandbox`` (build one with
            ``structenv image build``; bring your own by keeping that entrypoint).
        slots_per_host: Slots (isolated workspaces) per container.
        min_hosts: Containers kept running (started before ``__aenter__`` returns).
        max_hosts: Upper bound when scaling up on demand (default: ``min_hosts``).
            :attr:`capacity` is ``max_hosts * slots_per_host``.
        allow_network: Give containers a network (``network``); ``False`` means
            ``network_mode="none"``.
        network: The Docker network used when ``allow_network`` is true.
        require_sandbox: Fail closed at start if bubblewrap cannot isolate slots in the
            container. With ``False``, fall back to unsandboxed slots (``sandboxed=False``).
        isolation: ``"auto"``, ``"bwrap"`` or ``"none"`` (slots share the container).
        memory_limit: Bytes of memory per container (and of address space per command).
        pids_limit: Processes per container (contains fork bombs).
        cpus: CPUs per container (``None``: no quota).
        workspace_size: Bytes of tmpfs for the slots' workspaces, split evenly: each slot has
            its own tmpfs (its disk quota; counts as the container's memory).
        inode_limit: Files a slot's workspace and ``/tmp`` (per-slot tmpfs mounts of the
            container, wiped on every reset) may each hold (``nr_inodes``; ``/dev/shm`` a
            sixteenth; 0: the kernel's default). A reset's wipe takes time in proportion.
        nofile_limit: Open files per process (``RLIMIT_NOFILE``) of the slots. The kernel's
            file table is machine-wide, so all containers together (``max_hosts x
            pids_limit x nofile_limit``) may hold at most half of ``fs.file-max``; ``None``
            picks 1024 lowered to fit, and a value that does not fit is a ``ConfigError``.
        runtime: A Docker runtime, e.g. ``"runsc"`` for gVisor.
        slot_cgroups: Per-slot pids, memory and cpu cgroups inside each container (see the
            module docstring): ``"auto"`` (when the engine is local, cgroup v1 with the
            cgroupfs driver, runc, bwrap isolation, and this process may write the cgroup
            tree), ``"required"`` (fail at start otherwise) or ``"off"`` (slots share their
            container's cgroup). With them, each slot's memory limit is its share of
            ``memory_limit`` (like ``pids_limit``), one share staying with the server.
        run_id: Label of this run (default: random). Closing removes every container with it.
        pool: Label shared by runs of the same deployment (for ``purge_on_start``/reaping).
        reap_on_start: At start, remove containers of runs whose owner process is dead.
        purge_on_start: At start, remove *every* container of this ``pool``, even a live
            run's (for a deployment that must own its pool name exclusively).
        exit_with_owner: Hold each container's stdin open from this process; the server
            exits when it closes, so if this process dies (even by SIGKILL) its containers
            stop at once, sandboxes and all. Their stopped records are removed by the reaper.
        creation_concurrency: Containers being created at once.
        creation_rate: Container creations started per second at most.
        idle_timeout: Seconds a container above ``min_hosts`` may sit with every slot
            free before it is removed.
        health_interval: Seconds between health checks of each container.
        health_timeout: Seconds a health check may take.
        start_timeout: Seconds a container may take to become ready.
        reset_timeout: Seconds a slot reset may take before the slot is rebuilt instead.
        sdk_concurrency: Worker threads for Docker SDK calls (the limiter's size).
        sdk_attempts: Attempts per SDK call on transient errors (retried with backoff).
        api_timeout: HTTP timeout of each Docker API call (bounds every blocking SDK call).
        docker_url: Engine URL (default: from ``DOCKER_HOST``/the local socket).
        workdir: Host directory for the unix sockets (default: a 0700 dir under /var/tmp).
        max_output: Host-side cap on captured stdout/stderr per command.
        bind_roots: Host directories mounted read-only into every container at the same
            path (checked against the bind policy at start; a local engine and bwrap only).
            A spec's ``binds`` and ``rootfs`` directory must lie inside one of them
            (docs/environments.md); anything else is refused before anything runs.
    """

    def __init__(self, options: DockerOptions | None = None, /, **overrides: Any) -> None:
        o = resolve_options(DockerOptions, options, overrides)
        super().__init__(o)
        image, allow_network, network, isolation = o.image, o.allow_network, o.network, o.isolation
        memory_limit, pids_limit, cpus, workspace_size = (
            o.memory_limit, o.pids_limit, o.cpus, o.workspace_size
        )  # fmt: skip
        max_output, runtime, slot_cgroups, run_id, pool = (
            o.max_output, o.runtime, o.slot_cgroups, o.run_id, o.pool
        )  # fmt: skip
        reap_on_start, purge_on_start, exit_with_owner = (
            o.reap_on_start, o.purge_on_start, o.exit_with_owner
        )  # fmt: skip
        sdk_concurrency, sdk_attempts, api_timeout, docker_url, workdir = (
            o.sdk_concurrency, o.sdk_attempts, o.api_timeout, o.docker_url, o.workdir
        )  # fmt: skip
        self._nofile = nofile_limit_for(
            o.nofile_limit, pids=pids_limit, groups=o.host_bound,
            what=f"{o.host_bound} containers",
        )  # fmt: skip
        self._inodes = o.inode_limit
        self.image = image
        self._allow_network = allow_network
        self._network = network
        self._isolation = isolation
        self._mode = "none" if isolation == "none" else "bwrap"
        self._limits = (memory_limit, pids_limit, cpus, workspace_size, max_output)
        self._runtime = runtime
        self._slot_cgroups_opt = slot_cgroups
        self._slot_cgroups = False
        self.run_id = run_id or f"{os.getpid()}-{secrets.token_hex(4)}"
        self.pool_name = pool
        self._reap_on_start = reap_on_start
        self._purge_on_start = purge_on_start
        self._exit_with_owner = exit_with_owner
        self._sdk = (sdk_concurrency, sdk_attempts, api_timeout, docker_url)
        self._workdir_opt = workdir
        self._bind_roots_opt = o.bind_roots
        #: Real paths of ``bind_roots``, mounted read-only at the same path in every
        #: container (checked at start).
        self._bind_roots: tuple[str, ...] = ()
        self._root = ""
        #: The host's rootfs cache, mounted read-only into every container ("": none, the
        #: engine is not local, so task images cannot be used).
        self._rootfs_cache = ""
        self._token = secrets.token_urlsafe(32)
        self._engine: _Engine | None = None
        self._counter = 0
        self._emergency: int | None = None

    host_noun = "container"

    # -- properties -----------------------------------------------------------------------

    @property
    def sandboxed(self) -> bool:
        return self._mode == "bwrap"

    @property
    def allow_network(self) -> bool:
        return self._allow_network

    @property
    def transport(self) -> Literal["unix", "tcp"]:
        """How the backend reaches the servers: a bind-mounted unix socket or TCP + token."""
        return "tcp" if self._allow_network else "unix"

    @property
    def slot_cgroups(self) -> bool:
        """Whether each slot has cgroups of its own inside its container (decided at start)."""
        return self._slot_cgroups and self._mode == "bwrap"

    def container_ids(self) -> dict[str, str]:
        """Docker id of every running container of this backend, by host id."""
        return {
            c.id: c.docker_id for c in self._hosts.values() if c.alive and isinstance(c, _Container)
        }

    # -- lifecycle ------------------------------------------------------------------------

    async def _prepare(self) -> None:
        concurrency, attempts, api_timeout, url = self._sdk
        docker = _docker()
        make = (
            functools.partial(docker.DockerClient, base_url=url, timeout=int(api_timeout))
            if url
            else functools.partial(docker.from_env, timeout=int(api_timeout))
        )
        try:
            client = await anyio.to_thread.run_sync(make, limiter=self._fs_limiter)
        except docker.errors.DockerException as exc:
            raise BackendError(f"cannot reach the Docker Engine: {exc}") from exc
        self._engine = engine = _Engine(client, concurrency=concurrency, attempts=attempts)
        if not url or url.startswith("unix://"):
            from ._images import cache_dir

            cache = os.path.join(cache_dir(), "rootfs")
            await anyio.to_thread.run_sync(
                functools.partial(os.makedirs, cache, mode=0o755, exist_ok=True),
                limiter=self._fs_limiter,
            )
            self._rootfs_cache = cache
        if self._bind_roots_opt:
            if not self._rootfs_cache:
                raise ConfigError("bind_roots need a local Docker Engine (binds are host paths)")
            if self._isolation == "none":
                raise ConfigError("bind_roots need bwrap isolation in the containers")
            from .._spec import check_bind_roots

            self._bind_roots = await anyio.to_thread.run_sync(
                functools.partial(
                    check_bind_roots,
                    self._bind_roots_opt,
                    **self._bind_policy(),
                    reserved=_CONTAINER_OWN,
                ),
                limiter=self._fs_limiter,
            )
        try:
            await engine.call(client.images.get, self.image)
        except docker.errors.ImageNotFound as exc:
            tag = "" if self.image == DEFAULT_TAG else f" --tag {self.image}"
            raise BackendError(
                f"image {self.image!r} not found: build it with `structenv image build{tag}`"
            ) from exc
        except docker.errors.DockerException as exc:
            raise BackendError(f"cannot reach the Docker Engine: {exc}") from exc
        if self._reap_on_start:
            report = await engine.call(reap_docker, client, pool=None)
            if report.removed:
                logger.warning("removed %d container(s) of dead runs", len(report.removed))
        if self._purge_on_start:
            report = await engine.call(reap_docker, client, pool=self.pool_name, purge=True)
            if report.removed:
                logger.warning(
                    "purged %d container(s) of pool %s", len(report.removed), self.pool_name
                )
        if self._slot_cgroups_opt != "off":
            info = await engine.call(client.info)
            why = await anyio.to_thread.run_sync(
                self._cgroups_unusable, info, limiter=self._fs_limiter
            )
            if why and self._slot_cgroups_opt == "required":
                raise BackendError(f"per-slot cgroups are unavailable: {why}")
            if why:
                logger.info("slots of a container share its cgroup: %s", why)
            self._slot_cgroups = not why
        self._root = await anyio.to_thread.run_sync(self._make_root, limiter=self._fs_limiter)
        self._emergency = _emergency.register(self._force_cleanup)

    def _force_cleanup(self) -> None:
        """Emergency exit (second signal): remove the run's containers (found by label, and
        those this backend knows of), their cgroups and the socket directory, synchronously.

        Runs on the event loop's thread before ``os._exit``, possibly while the orderly
        teardown is half-way (a container already gone is fine). A client of its own, with a
        short timeout, bounds every call; the engine's client may be busy in worker threads.
        """
        _, _, _, url = self._sdk
        docker = _docker()
        deadline = time.monotonic() + _EMERGENCY_BUDGET
        try:
            client = (
                docker.DockerClient(base_url=url, timeout=_EMERGENCY_API_TIMEOUT)
                if url
                else docker.from_env(timeout=_EMERGENCY_API_TIMEOUT)
            )
        except Exception as exc:
            logger.error("emergency cleanup: cannot reach the Docker Engine: %r", exc)
            return
        ids = set(self.container_ids().values())
        try:
            listed = client.api.containers(
                all=True, quiet=True, filters={"label": f"{LABEL_RUN}={self.run_id}"}
            )
            ids.update(str(c["Id"]) for c in listed)
            for docker_id in sorted(ids):
                if time.monotonic() > deadline:
                    logger.error("emergency cleanup: out of time; `structenv reap` removes them")
                    break
                try:
                    client.api.remove_container(docker_id, force=True, v=True)
                except Exception as exc:
                    if not _is_gone(exc):
                        logger.error("cannot remove container %s: %r", docker_id[:12], exc)
        except Exception as exc:
            logger.error(
                "emergency cleanup: cannot list containers of run %s: %r", self.run_id, exc
            )
        finally:
            client.close()
        if self._slot_cgroups:
            mine = re.compile(re.escape(f"structenv-{self.run_id}-") + r"\d+")
            for name in sorted(filter(mine.fullmatch, docker_cgroup_names())):
                remove_docker_cgroups(
                    name, patience=max(0.0, min(2.0, deadline - time.monotonic()))
                )
        if self._root:
            shutil.rmtree(self._root, ignore_errors=True)

    def _cgroups_unusable(self, info: dict[str, Any]) -> str:
        """Why this process cannot give each slot cgroups of its own ("" if it can)."""
        if self._isolation == "none":
            return "isolation is 'none'"
        if self._runtime not in (None, "runc"):
            return f"runtime {self._runtime!r} does not use the host's cgroups"
        if info.get("CgroupDriver") != "cgroupfs" or str(info.get("CgroupVersion")) != "1":
            driver = f"{info.get('CgroupDriver')} v{info.get('CgroupVersion')}"
            return f"the engine's cgroups are {driver}, not cgroupfs v1"
        if info.get("Name") != socket.gethostname():
            return f"the engine runs on another host ({info.get('Name')!r})"
        for controller in _SLOT_CONTROLLERS:
            base = os.path.join(_CGROUP_V1, controller)
            if not os.path.isfile(os.path.join(base, "cgroup.procs")):
                return f"no v1 {controller} hierarchy at {base}"
            if not os.access(base, os.W_OK):
                return f"{base} is not writable by this process"
        return ""

    async def _launch_first(self) -> Host:
        try:
            return await self._launch_host()
        except SandboxUnavailableError as exc:
            if self._isolation != "auto" or self._require_sandbox:
                raise
            # Allowed by require_sandbox=False: say so loudly, and in every result.
            logger.warning("bubblewrap unusable in the container (%s): UNSANDBOXED slots", exc)
            self._mode = "none"
            return await self._launch_host()

    def _make_root(self) -> str:
        if self._workdir_opt:
            os.makedirs(self._workdir_opt, mode=0o700, exist_ok=True)
            return tempfile.mkdtemp(prefix="docker-", dir=self._workdir_opt)
        base = "/var/tmp" if os.path.isdir("/var/tmp") else None
        return tempfile.mkdtemp(prefix=f"structenv-docker-{os.getpid()}-", dir=base)

    def _bind_policy(self) -> dict[str, Any]:
        """What :func:`~structenv._spec.check_bind` refuses beyond its own list here."""
        from ._images import cache_dir
        from ._local import WORKDIR_PREFIX

        return {
            "denied": [p for p in (self._root, self._workdir_opt, cache_dir()) if p],
            "denied_prefixes": [os.path.join("/var/tmp", WORKDIR_PREFIX)],
        }

    async def _resolve_spec(self, spec: SandboxSpec) -> SlotSpec:
        """Check binds and a rootfs directory against the policy and ``bind_roots`` (the
        containers see those read-only at the same paths); build or export the spec's
        image into the rootfs cache (the containers see it read-only)."""
        plain = plain_slot_spec(spec)
        if not (spec.image or spec.dockerfile or spec.rootfs or spec.binds):
            return plain
        if self._mode != "bwrap" or not self._rootfs_cache:
            raise ConfigError(
                "a spec with an image, a rootfs or binds needs bwrap isolation in the "
                "containers and a local Docker Engine"
            )
        from .._spec import Bind, check_bind
        from ..sandbox._rootfs import confine_target, rootfs_shell
        from ._images import Stop, build_dockerfile, export_rootfs, run_stoppable

        policy = {**self._bind_policy(), "roots": self._bind_roots}

        def resolve(stop: Stop) -> SlotSpec:
            # Host paths inside a bind root are the same paths inside every container.
            binds = tuple((check_bind(b, **policy), b.target) for b in spec.binds)
            env = dict(plain.env)
            if spec.rootfs:
                rootfs = check_bind(
                    Bind(source=spec.rootfs, target="/rootfs"),
                    where=f"rootfs {spec.rootfs}",
                    **policy,
                )
                host_root = rootfs
            elif spec.image or spec.dockerfile:
                image = spec.image or build_dockerfile(
                    str(spec.dockerfile), spec.context, stop=stop
                )
                host_root, image_env = export_rootfs(
                    image, os.path.dirname(self._rootfs_cache), stop=stop
                )
                rootfs = _ROOTFS_MOUNT + host_root[len(self._rootfs_cache) :]
                env = {**image_env, **env}
            else:
                return dataclasses.replace(plain, binds=binds)
            try:
                rootfs_shell(host_root)
                for _, target in binds:
                    confine_target(host_root, target)  # the server resolves them again
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            path = env.pop("PATH", DEFAULT_PATH)
            return dataclasses.replace(
                plain, rootfs=rootfs, binds=binds, env=tuple(sorted(env.items())), path=path
            )

        return await run_stoppable(resolve, limiter=self._spec_limiter)

    async def _launch_host(self) -> Host:
        """Create one container and wait until its server serves.

        Cancellation: a container that was created is removed (shielded, bounded); one whose
        creation call was still running is removed by :meth:`aclose`'s sweep by label.
        """
        engine = self._engine
        assert engine is not None
        self._counter += 1
        name = f"structenv-{self.run_id}-{self._counter}"
        hostdir = os.path.join(self._root, name)
        docker_id: str | None = None
        stdin: Any = None
        cgroups = self.slot_cgroups
        try:
            await anyio.to_thread.run_sync(
                functools.partial(os.makedirs, hostdir, mode=0o700), limiter=self._fs_limiter
            )
            if cgroups:
                await anyio.to_thread.run_sync(self._make_cgroups, name, limiter=self._fs_limiter)
            here: list[str] = []
            if self._allow_network and self._mode == "bwrap":
                here = await anyio.to_thread.run_sync(_netns.local_ipv4, limiter=self._fs_limiter)
            create, host_config = self._create_spec(name, hostdir, cgroups=cgroups, prohibit=here)
            created, stdin = await engine.call(
                _create_and_start, engine.client.api, self.image, create, host_config
            )
            docker_id = created
            with anyio.fail_after(self.start_timeout):
                box = await self._wait_ready(created, name, hostdir)
        except BaseException as exc:
            _close_stdin(stdin)
            with anyio.move_on_after(self.close_grace, shield=True):
                if docker_id is not None:
                    await self._remove(docker_id)
                await anyio.to_thread.run_sync(
                    shutil.rmtree, hostdir, True, limiter=self._fs_limiter
                )
                if cgroups:
                    await self._remove_cgroups(name)
            if isinstance(exc, Exception) and not isinstance(
                exc, (BackendError, SandboxUnavailableError, TimeoutError)
            ):
                raise BackendError(f"sandbox container failed to start: {exc!r}") from exc
            if isinstance(exc, TimeoutError):
                raise BackendError(
                    f"sandbox container {name} not ready within {self.start_timeout}s"
                ) from exc
            raise
        box.stdin = stdin
        return box

    def _make_cgroups(self, name: str) -> None:
        """Make the container's parent cgroups, with its overall limits, and the ``slots``
        directories delegated to its server (blocking; see the module docstring).

        The slots' processes leave the container's own cgroup for their ``slots`` ones, so
        the container's limits are set here on the parent, which holds both.
        """
        memory, pids, cpus, _, _ = self._limits
        settings = {
            "pids": [("pids.max", str(pids))],
            "memory": [
                ("memory.limit_in_bytes", str(memory)),
                ("memory.memsw.limit_in_bytes", str(memory)),  # only where swap is accounted
            ],
            "cpu": [("cpu.cfs_quota_us", str(int(cpus * _CFS_PERIOD)))] if cpus else [],
        }
        for controller in _SLOT_CONTROLLERS:
            parent = os.path.join(_CGROUP_V1, controller, DOCKER_CGROUP_PARENT, name)
            os.makedirs(os.path.join(parent, "slots"), exist_ok=True)
            for key, value in settings[controller]:
                path = os.path.join(parent, key)
                if os.path.exists(path):
                    with open(path, "w") as f:
                        f.write(value)

    async def _remove_cgroups(self, name: str) -> None:
        if not await anyio.to_thread.run_sync(
            functools.partial(remove_docker_cgroups, name, patience=_CGROUP_PATIENCE),
            limiter=self._fs_limiter,
        ):
            logger.error("cgroups of container %s still busy: left for the reaper", name)

    def _create_spec(
        self, name: str, hostdir: str, *, cgroups: bool = False, prohibit: Sequence[str] = ()
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Arguments of ``create_container`` and of ``create_host_config``; ``prohibit``: the
        addresses of the Docker host (this process's, with a local engine)."""
        memory, pids, cpus, workspace, max_output = self._limits
        slot_space = max(workspace // self._slots_per, 1 << 20)
        # Each slot's share of the container's limits; one share stays with the server. With
        # cgroups of its own, a slot's pids and memory are its cgroup's limits; without, the
        # pids are enforced per slot uid (RLIMIT_NPROC counts that uid's processes) and the
        # disk by per-slot tmpfs sizes, while memory is shared by the container's slots.
        share = self._slots_per + 1
        tmp_size = max(memory // (4 * share), 16 << 20)

        def inodes(cap: int) -> str:
            return f",nr_inodes={cap}" if cap else ""

        command = [
            "--slots", str(self._slots_per), "--workdir", f"{_WORKDIR}/w", "--name", name[-40:],
            "--isolation", self._mode, "--max-output", str(max_output),
            "--pids", str(max(pids // share, 16)),
            "--tmp-size", str(tmp_size), "--nofile", str(self._nofile),
            "--inodes", str(self._inodes),
        ]  # fmt: skip
        if cgroups:
            command += [
                "--cgroup", "required", "--cgroup-root", _CGROUP_MOUNT,
                "--memory", str(max(memory // share, 64 << 20)),
            ]  # fmt: skip
            if cpus is not None:
                command += ["--cpus", str(cpus)]
        else:
            command += ["--cgroup", "off", "--memory", str(memory)]
        if self._allow_network or self._mode == "none":
            # With isolation "none" the container's own (absent) network is the isolation.
            command.append("--allow-network")
        if self._allow_network:
            command += ["--host", "0.0.0.0", "--port", str(_PORT), *self.options.budget_argv]
            if self._mode == "bwrap":
                # The Docker host's addresses are not local to the container, and its
                # bridge holds the host's gateway address and the other containers: a
                # networked slot reaches none of them.
                command += ["--prohibit-links"]
                if prohibit:
                    command += ["--prohibit", ",".join(prohibit)]
        else:
            command += ["--socket", f"{_MOUNT}/{_SOCKET}"]
        if self._exit_with_owner:
            command.append("--watch-stdin")
        create: dict[str, Any] = {
            "stdin_open": self._exit_with_owner,
            "command": command,
            "name": name,
            "labels": owner_labels(backend="docker", run_id=self.run_id, pool=self.pool_name),
            "environment": {"STRUCTENV_SANDBOX_TOKEN": self._token},
            "volumes": [_MOUNT],
        }
        binds: dict[str, dict[str, str]] = {hostdir: {"bind": _MOUNT, "mode": "rw"}}
        if self._mode == "bwrap" and self._rootfs_cache:
            binds[self._rootfs_cache] = {"bind": _ROOTFS_MOUNT, "mode": "ro"}
        for root in self._bind_roots:
            binds[root] = {"bind": root, "mode": "ro"}
        if cgroups:
            for controller in _SLOT_CONTROLLERS:
                slots = os.path.join(_CGROUP_V1, controller, DOCKER_CGROUP_PARENT, name, "slots")
                binds[slots] = {"bind": f"{_CGROUP_MOUNT}/{controller}", "mode": "rw"}
        host: dict[str, Any] = {
            "binds": binds,
            "init": True,
            # One tmpfs per slot: a slot that fills its workspace fills only its own quota.
            # Its /tmp and /dev/shm too (bwrap's own --tmpfs cannot cap inodes): the server
            # binds them in and wipes them on reset (see SlotRuntime.scratch).
            "tmpfs": {
                _WORKDIR: "rw,exec,size=64m",
                **{
                    f"{_WORKDIR}/w/slot-{i}{suffix}": f"rw,exec,nosuid,nodev,size={size}"
                    + inodes(cap)
                    + (",mode=1777" if suffix else "")
                    for i in range(self._slots_per)
                    for suffix, size, cap in (
                        ("", slot_space, self._inodes),
                        (".tmp", tmp_size, self._inodes),
                        (".shm", 64 << 20, shm_inodes(self._inodes)),
                    )
                },
            },
            "mounts": self._terminal_mounts(),
            "mem_limit": memory,
            "memswap_limit": memory,
            "pids_limit": pids,
            "network_mode": self._network if self._allow_network else "none",
            **(_BWRAP_SECURITY if self._mode == "bwrap" else _PLAIN_SECURITY),
        }
        if self._mode == "bwrap":
            host["security_opt"] = [
                *host["security_opt"],
                f"seccomp={_seccomp.container_profile()}",
            ]
            if self._allow_network:
                # Each networked slot's slirp4netns opens a tap device in the slot's own
                # network namespace (see structenv.sandbox._netns).
                host["devices"] = ["/dev/net/tun:/dev/net/tun:rwm"]
            create["entrypoint"] = _server_entrypoint()
        if cpus is not None:
            host["nano_cpus"] = int(cpus * 1e9)
        if cgroups:
            host["cgroup_parent"] = f"/{DOCKER_CGROUP_PARENT}/{name}"
        if self._runtime:
            host["runtime"] = self._runtime
        return create, host

    def _terminal_mounts(self) -> list[dict[str, Any]]:
        """Capped devpts instances for the container: its own ``/dev/pts`` and, with bwrap,
        one per slot at ``<workspace>.pts``, which the server binds over the slot's
        ``/dev/pts`` (see ``SlotRuntime.ptys``).

        Every devpts instance but the host's first shares ``kernel.pty.max`` minus
        ``kernel.pty.reserve`` (3,072 here): bwrap's own has no cap, and one slot opened
        them all. The server cannot mount (no ``CAP_SYS_ADMIN``) and Docker has no devpts
        option, but the engine's ``local`` volume driver mounts any filesystem type with
        the options given: an anonymous volume of type devpts with ``max=`` is a capped
        instance, mounted by the engine when the container starts and removed with it
        (``v=True``). gVisor (``runsc``) gets none: its terminals are its own, not the
        host's.
        """
        if self._runtime and "runsc" in self._runtime:
            return []

        def devpts(target: str, ptys: int) -> dict[str, Any]:
            options = f"nosuid,noexec,newinstance,ptmxmode=0666,mode=0620,gid=5,max={ptys}"
            driver = {
                "Name": "local",
                "Options": {"type": "devpts", "device": "devpts", "o": options},
            }
            return {
                "Type": "volume",
                "Target": target,
                "VolumeOptions": {"NoCopy": True, "DriverConfig": driver},
            }

        if self._mode != "bwrap":
            # The slots share the container's terminals: a slot's allowance each.
            return [devpts("/dev/pts", SLOT_PTYS * self._slots_per)]
        return [
            devpts("/dev/pts", SLOT_PTYS),  # the server's and `docker exec -t`'s only
            *(devpts(f"{_WORKDIR}/w/slot-{i}.pts", SLOT_PTYS) for i in range(self._slots_per)),
        ]

    async def _wait_ready(self, docker_id: str, name: str, hostdir: str) -> _Container:
        engine = self._engine
        assert engine is not None
        if self._allow_network:
            attrs = await engine.call(engine.client.api.inspect_container, docker_id)
            networks = attrs["NetworkSettings"]["Networks"]
            address = next(iter(networks.values()))["IPAddress"]
            client = HostClient(host=address, port=_PORT, token=self._token)
        else:
            client = HostClient(uds=os.path.join(hostdir, _SOCKET), token=self._token)
        try:
            sandboxed, slots = await self.probe_host(
                client, check=functools.partial(self._check_exited, docker_id)
            )
        except BaseException:
            with anyio.move_on_after(1, shield=True):
                await client.aclose()
            raise
        return _Container(
            id=name,
            docker_id=docker_id,
            hostdir=hostdir,
            client=client,
            sandboxed=sandboxed,
            slots=slots,
        )

    async def _check_exited(self, docker_id: str) -> None:
        """Raise if the container exited during start-up (with what its server said)."""
        engine = self._engine
        assert engine is not None
        attrs = await engine.call(engine.client.api.inspect_container, docker_id)
        if attrs["State"]["Status"] not in ("exited", "dead"):
            return
        logs = await engine.call(
            engine.client.api.logs, docker_id, stdout=True, stderr=True, tail=50
        )
        text = logs.decode(errors="replace")
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    info = json.loads(line)
                except ValueError:
                    continue
                if info.get("error") == "sandbox_unavailable":
                    raise SandboxUnavailableError(f"in the container: {info.get('message')}")
        raise BackendError(f"sandbox container exited during start-up: {text[-2000:]}")

    async def _stop_host(self, host: Host) -> None:
        assert isinstance(host, _Container)
        _close_stdin(host.stdin)
        await self._remove(host.docker_id)
        await anyio.to_thread.run_sync(shutil.rmtree, host.hostdir, True, limiter=self._fs_limiter)
        if self._slot_cgroups:
            await self._remove_cgroups(host.id)

    async def _finish(self) -> None:
        if self._engine is not None:
            await self._sweep()
            await anyio.to_thread.run_sync(self._engine.client.close, limiter=self._engine.limiter)
        if self._slot_cgroups:
            # Every container of the run is gone: so must be their cgroups, even those of
            # one whose launch was interrupted.
            mine = re.compile(re.escape(f"structenv-{self.run_id}-") + r"\d+")
            names = await anyio.to_thread.run_sync(docker_cgroup_names, limiter=self._fs_limiter)
            async with anyio.create_task_group() as tg:
                for name in sorted(filter(mine.fullmatch, names)):
                    tg.start_soon(self._remove_cgroups, name)
        if self._root:
            await anyio.to_thread.run_sync(
                shutil.rmtree, self._root, True, limiter=self._fs_limiter
            )
        if self._emergency is not None:
            _emergency.unregister(self._emergency)
            self._emergency = None

    async def _sweep(self) -> None:
        engine = self._engine
        assert engine is not None
        try:
            leftovers = await engine.call(
                engine.client.containers.list,
                all=True,
                sparse=True,
                filters={"label": f"{LABEL_RUN}={self.run_id}"},
            )
        except Exception as exc:
            logger.error("cannot list containers of run %s: %r", self.run_id, exc)
            return
        async with anyio.create_task_group() as tg:
            for container in leftovers:
                tg.start_soon(self._remove, str(container.id))

    async def _remove(self, docker_id: str) -> None:
        engine = self._engine
        assert engine is not None
        try:
            await engine.call(engine.client.api.remove_container, docker_id, force=True, v=True)
        except Exception as exc:
            if not _is_gone(exc):
                logger.error("cannot remove container %s: %r", docker_id[:12], exc)


def _close_stdin(stdin: Any) -> None:
    """Close our end of a container's stdin (the SDK's SocketIO and the socket under it)."""
    if stdin is not None:
        raw = getattr(stdin, "_sock", None)
        stdin.close()
        if raw is not None:
            raw.close()


def _create_and_start(
    api: Any, image: str, create: dict[str, Any], host: dict[str, Any]
) -> tuple[str, Any]:
    """Create and start a container (blocking); remove it again if it cannot start.

    With ``stdin_open``, our end of its stdin is attached before it starts and returned:
    the server (``--watch-stdin``) exits when this process closes it or dies.

    ``systempaths=unconfined`` has no SDK keyword: it is the empty MaskedPaths/ReadonlyPaths
    of the host config (what ``docker run --security-opt systempaths=unconfined`` sends).
    """
    host = dict(host)
    unmask = "systempaths=unconfined" in host.get("security_opt", [])
    if unmask:
        host["security_opt"] = [o for o in host["security_opt"] if o != "systempaths=unconfined"]
    config = api.create_host_config(**host)
    if unmask:
        config["MaskedPaths"] = []
        config["ReadonlyPaths"] = []
    docker_id = str(api.create_container(image, host_config=config, **create)["Id"])
    stdin = None
    try:
        if create.get("stdin_open"):
            stdin = api.attach_socket(docker_id, params={"stdin": 1, "stream": 1})
        api.start(docker_id)
    except BaseException:
        _close_stdin(stdin)
        api.remove_container(docker_id, force=True, v=True)
        raise
    return docker_id, stdin


# -- reaping ---------------------------------------------------------------------------------


def reap_containers(
    *, docker_url: str | None = None, pool: str | None = None, dry_run: bool = False
) -> ReapReport:
    """Remove containers left by dead structenv runs (blocking; ``structenv reap``).

    Only containers whose owner process is gone on this host are removed; live runs' and
    other hosts' containers are reported and left alone.
    """
    docker = _docker()
    client = docker.DockerClient(base_url=docker_url) if docker_url else docker.from_env()
    try:
        return reap_docker(client, pool=pool, dry_run=dry_run)
    finally:
        client.close()

"""LocalBackend: sandbox hosts as child processes of this one, slots isolated with bubblewrap.

Each host is a ``python -m structenv.sandbox`` process serving S slots over a private unix
socket. A host holds its stdin pipe open to us and exits when it reads end-of-file, so hosts
die with this process however it ends (even SIGKILL), and their sandboxes die with them
(``--die-with-parent``). A supervisor task per host notices a crash, quarantines the host's
slots (in-flight calls fail at once: their connections break) and starts a replacement.
The slot bookkeeping is :class:`~structenv.backends._hosted.HostedBackend`'s.

The run's work dir (``structenv-<pid>-*`` under ``/var/tmp``) holds an owner file
(:mod:`~structenv.backends._ownership` labels). It is removed on close; if this process is
killed outright (SIGKILL, a power cut), :func:`reap_workdirs` removes it once its owner is
gone: the next LocalBackend to start in the same base directory runs it (``reap_on_start``),
and so does ``structenv reap``. A live run's directory is never touched. If the process is
forced to exit (a second SIGINT/SIGTERM), an emergency cleanup (:mod:`structenv._emergency`)
kills the hosts and removes it synchronously.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import secrets
import signal
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from .. import _emergency
from .._exceptions import BackendError, ConfigError, SandboxUnavailableError, SlotBrokenError
from .._process import kill_child
from .._spec import SandboxSpec
from ..abc import Slot
from ..sandbox._bwrap import DEFAULT_PATH, remove_cgroup_tree
from ..sandbox._bwrap import nofile_limit as nofile_limit_for
from ..sandbox._client import HostClient
from ..sandbox._files import remove_tree
from ..sandbox._runtime import SlotSpec
from ._hosted import Host, HostedBackend, plain_slot_spec
from ._options import LocalOptions, resolve_options
from ._ownership import ReapReport, owner_labels, owner_state

if TYPE_CHECKING:
    from ._images import Stop

__all__ = ["LocalBackend", "reap_workdirs"]

#: The owner file in a run's work dir (JSON owner labels, see ``_ownership``).
OWNER_FILE = "owner.json"
#: Name prefix of a run's work dir in the default base directory.
WORKDIR_PREFIX = "structenv-"

logger = logging.getLogger("structenv.backends.local")

_START_ERRORS = (
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.BrokenResourceError,
    anyio.DelimiterNotFound,
    ValueError,
    KeyError,
    OSError,
)


@dataclasses.dataclass(eq=False, kw_only=True)
class _ProcHost(Host):
    proc: anyio.abc.Process
    workdir: str


class LocalBackend(HostedBackend):
    """Sandbox hosts running as local child processes.

    Takes :class:`~structenv.backends.LocalOptions` and/or keyword overrides of its fields
    (``LocalBackend(hosts=2, slots_per_host=8)``; ``hosts=N`` is short for
    ``min_hosts=max_hosts=N``). A host's crash is noticed at once (it is our child process)
    and it is replaced; health checks run every ``health_interval`` seconds besides.
    """

    _watch_hosts = True

    def __init__(self, options: LocalOptions | None = None, /, **overrides: Any) -> None:
        o = resolve_options(LocalOptions, options, overrides)
        super().__init__(o)
        self._allow_network = o.allow_network
        self._isolation = o.isolation
        self._bwrap = o.bwrap_path
        self._limits = (
            o.memory_limit, o.pids_limit, o.file_size_limit, o.cpu_time_limit, o.max_output
        )  # fmt: skip
        groups = o.host_bound * o.slots_per_host
        nofile = nofile_limit_for(
            o.nofile_limit, pids=o.pids_limit, groups=groups, what=f"{groups} slots"
        )
        self._slot_limits = (o.cpu_limit, o.disk_limit, o.tmp_limit, o.inode_limit, nofile)
        self._cgroup = o.cgroup
        self._workdir_opt = o.workdir
        self._reap_on_start = o.reap_on_start
        self._bind_roots_opt = o.bind_roots
        #: The real paths of ``bind_roots`` (checked at start); ``None``: no roots.
        self._bind_roots: tuple[str, ...] | None = None
        self._root = ""
        self._token = secrets.token_urlsafe(32)
        self._mode = "bwrap" if o.isolation != "none" else "none"
        self._counter = 0
        self._procs: set[anyio.abc.Process] = set()  # every host process not yet reaped
        self._emergency: int | None = None

    @property
    def sandboxed(self) -> bool:
        return self._mode == "bwrap"

    async def _prepare(self) -> None:
        if self._reap_on_start:
            report = await anyio.to_thread.run_sync(
                functools.partial(reap_workdirs, base=self._workdir_opt), limiter=self._fs_limiter
            )
            if report.removed:
                logger.warning("removed %d work dir(s) of dead runs", len(report.removed))
            for path, error in report.failed:
                logger.warning("cannot remove the work dir of a dead run %s: %s", path, error)
        self._root = await anyio.to_thread.run_sync(self._make_root, limiter=self._fs_limiter)
        self._emergency = _emergency.register(self._force_cleanup)
        if self._bind_roots_opt is not None:
            from .._spec import check_bind_roots

            self._bind_roots = await anyio.to_thread.run_sync(
                functools.partial(check_bind_roots, self._bind_roots_opt, **self._bind_policy()),
                limiter=self._fs_limiter,
            )

    def _bind_policy(self) -> dict[str, Any]:
        """What :func:`~structenv._spec.check_bind` refuses beyond its own list here."""
        from ._images import cache_dir

        return {
            "denied": [p for p in (self._root, self._workdir_opt, cache_dir()) if p],
            "denied_prefixes": [os.path.join(default_base() or "/tmp", WORKDIR_PREFIX)],
        }

    def _make_root(self) -> str:
        # mkdtemp makes it 0700: sockets and workspaces are private to this process's user,
        # and no sandbox ever sees anything of it but its own bound workspace.
        if self._workdir_opt:
            os.makedirs(self._workdir_opt, mode=0o700, exist_ok=True)
            root = tempfile.mkdtemp(prefix="run-", dir=self._workdir_opt)
        else:
            root = tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-", dir=default_base())
        labels = owner_labels(backend="local", run_id=os.path.basename(root), pool="local")
        tmp = os.path.join(root, f".{OWNER_FILE}.tmp")
        with open(tmp, "w") as f:
            json.dump(labels, f)
        os.rename(tmp, os.path.join(root, OWNER_FILE))  # never a half-written owner file
        return root

    def _force_cleanup(self) -> None:
        """Emergency exit (second signal): kill the hosts, remove their cgroups and the work
        dir, synchronously and bounded. Runs on the event loop's thread before ``os._exit``."""
        pids = [p.pid for p in self._procs if p.returncode is None]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5.0
        while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.01)  # the process is about to exit: nothing else to wait for
        if self._root:
            _remove_workdir(self._root, patience=2.0)

    async def _launch_host(self) -> Host:
        """Start one host process and wait until it serves.

        Cancellation: the half-started process is killed.
        """
        self._counter += 1
        host_id = f"se{os.getpid()}-{self._counter}-{secrets.token_hex(2)}"
        workdir = os.path.join(self._root, host_id)
        sock = os.path.join(self._root, f"{host_id}.sock")
        memory, pids, fsize, cpu, max_output = self._limits
        argv = [
            sys.executable, "-m", "structenv.sandbox", "--socket", sock, "--watch-stdin",
            "--slots", str(self._slots_per), "--workdir", workdir, "--name", host_id,
            "--isolation", self._mode, "--bwrap", self._bwrap, "--cgroup", self._cgroup,
            "--memory", str(memory), "--pids", str(pids), "--file-size", str(fsize),
            "--cpu-seconds", str(cpu), "--max-output", str(max_output),
            "--cpus", str(self._slot_limits[0]), "--disk", str(self._slot_limits[1]),
            "--tmp-size", str(self._slot_limits[2]), "--inodes", str(self._slot_limits[3]),
            "--nofile", str(self._slot_limits[4]),
        ]  # fmt: skip
        if self._allow_network:
            argv += ["--allow-network", *self.options.budget_argv]
        env = dict(os.environ, STRUCTENV_SANDBOX_TOKEN=self._token)
        # A session of its own: a signal to our process group (Ctrl-C) does not reach it.
        proc = await anyio.open_process(argv, env=env, stderr=None, start_new_session=True)
        self._procs.add(proc)
        client: HostClient | None = None
        try:
            assert proc.stdout is not None
            with anyio.fail_after(self.start_timeout):
                line = await BufferedByteReceiveStream(proc.stdout).receive_until(b"\n", 1 << 16)
            info = json.loads(line)
            if info.get("error") == "sandbox_unavailable":
                if (
                    self._isolation == "auto"
                    and not self._require_sandbox
                    and self._mode == "bwrap"
                ):
                    if not self._allow_network:
                        raise SandboxUnavailableError(
                            f"{info.get('message')}; allow_network=False needs isolation"
                        )
                    logger.warning("bubblewrap unusable (%s): running UNSANDBOXED", info["message"])
                    self._mode = "none"
                    await _terminate(proc)
                    return await self._launch_host()
                raise SandboxUnavailableError(str(info.get("message")))
            if not info.get("ready"):
                raise BackendError(f"sandbox host failed to start: {info}")
            client = HostClient(uds=sock, token=self._token)
            with anyio.fail_after(self.start_timeout):
                sandboxed, slots = await self.probe_host(client)
        except BaseException as exc:
            with anyio.move_on_after(10, shield=True):
                if client is not None:
                    await client.aclose()
                await _terminate(proc)
                self._procs.discard(proc)
            if isinstance(exc, _START_ERRORS):
                raise BackendError(f"sandbox host failed to start: {exc!r}") from exc
            raise
        return _ProcHost(
            id=host_id, client=client, sandboxed=sandboxed, slots=slots, proc=proc, workdir=workdir
        )

    async def _wait_exit(self, host: Host) -> None:
        assert isinstance(host, _ProcHost)
        await host.proc.wait()

    async def _stop_host(self, host: Host) -> None:
        assert isinstance(host, _ProcHost)
        await _terminate(host.proc)
        self._procs.discard(host.proc)
        await anyio.to_thread.run_sync(
            _cleanup_host_files, host.id, host.workdir, limiter=self._fs_limiter
        )

    async def _finish(self) -> None:
        if self._root:
            await anyio.to_thread.run_sync(
                functools.partial(remove_tree, self._root, keep_root=False),
                limiter=self._fs_limiter,
            )
        if self._emergency is not None:
            _emergency.unregister(self._emergency)
            self._emergency = None

    async def _resolve_spec(self, spec: SandboxSpec) -> SlotSpec:
        """Check binds against the policy, find or export the rootfs, check its shell.

        Cancellation: prompt; a build or export under way is stopped and what it made removed
        (:func:`~structenv.backends._images.run_stoppable`)."""
        from ._images import run_stoppable

        return await run_stoppable(
            functools.partial(self._resolve_blocking, spec), limiter=self._spec_limiter
        )

    def _resolve_blocking(self, spec: SandboxSpec, stop: Stop | None = None) -> SlotSpec:
        from .._spec import Bind, check_bind
        from ..sandbox._rootfs import confine_target, rootfs_shell
        from ._images import cache_dir

        plain = plain_slot_spec(spec)
        needs_bwrap = spec.rootfs or spec.image or spec.dockerfile or spec.binds
        if needs_bwrap and self._mode != "bwrap":
            raise ConfigError("a spec with a rootfs, an image or binds needs bwrap isolation")
        cache = cache_dir()
        policy = {**self._bind_policy(), "roots": self._bind_roots}
        binds = tuple((check_bind(b, **policy), b.target) for b in spec.binds)
        rootfs: str | None = None
        env = dict(plain.env)
        if spec.rootfs:
            rootfs = check_bind(
                Bind(source=spec.rootfs, target="/rootfs"), where=f"rootfs {spec.rootfs}", **policy
            )
        elif spec.image or spec.dockerfile:
            from ._images import build_dockerfile, export_rootfs

            image = spec.image or build_dockerfile(str(spec.dockerfile), spec.context, stop=stop)
            rootfs, image_env = export_rootfs(image, cache, stop=stop)
            env = {**image_env, **env}
        if rootfs is None:
            return dataclasses.replace(plain, binds=binds)
        try:
            rootfs_shell(rootfs)
            for _, target in binds:
                confine_target(rootfs, target)  # the server resolves them again at start
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        path = env.pop("PATH", DEFAULT_PATH)
        return dataclasses.replace(
            plain, rootfs=rootfs, binds=binds, env=tuple(sorted(env.items())), path=path
        )

    def workspace_path(self, slot: Slot) -> str:
        """Host directory of a slot's workspace (for diagnostics and tests; never shared
        with other slots)."""
        host, state = self._lookup(slot)
        if not isinstance(host, _ProcHost) or state is None:
            raise SlotBrokenError(f"slot {slot.id} has no running host")
        # Through the host's root: its workspaces may be mounts in its own mount namespace.
        return f"/proc/{host.proc.pid}/root{os.path.join(host.workdir, f'slot-{state.index}')}"

    def host_pids(self) -> dict[str, int]:
        """Process id of every running host (for supervision tests and diagnostics)."""
        return {
            h.id: h.proc.pid for h in self._hosts.values() if h.alive and isinstance(h, _ProcHost)
        }


async def _terminate(proc: anyio.abc.Process) -> None:
    """Close the host's stdin (it exits and kills its sandboxes); SIGKILL if it lingers."""
    if proc.stdin is not None:
        with anyio.move_on_after(1):
            await proc.stdin.aclose()
    with anyio.move_on_after(10):
        await proc.wait()
    if proc.returncode is None:
        kill_child(proc)
        await proc.wait()
    await proc.aclose()


def _cleanup_host_files(host_id: str, workdir: str) -> None:
    """Remove a stopped host's cgroups (left behind if it was killed) and workspaces."""
    remove_cgroup_tree(host_id, patience=5.0)
    remove_tree(workdir, keep_root=False)  # slot-written trees: any depth, any mode


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for its parent has exited)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


def _remove_workdir(root: str, *, patience: float) -> bool:
    """Remove a run's work dir and the cgroups of its hosts (named like their directories)."""
    try:
        entries = os.listdir(root)
    except FileNotFoundError:
        return True
    except OSError:
        entries = []
    for name in entries:
        if os.path.isdir(os.path.join(root, name)):
            remove_cgroup_tree(name, patience=patience)
    return remove_tree(root, keep_root=False)


def default_base() -> str | None:
    """Where runs' work dirs go by default (``/var/tmp``; the temp dir if it is missing)."""
    return "/var/tmp" if os.path.isdir("/var/tmp") else None


def reap_workdirs(*, base: str | None = None, dry_run: bool = False) -> ReapReport:
    """Remove the work dirs (and host cgroups) of local runs whose owner process is gone.

    Looks at ``structenv-*`` directories in ``base`` (default: where LocalBackend puts them)
    and at ``run-*`` directories when ``base`` is a ``workdir=`` given to LocalBackend. A
    directory is removed only if its owner file says its owner is dead on this host (pid
    gone, pid reused or the machine rebooted); live runs', other hosts' and directories
    without a readable owner file (not structenv's, or a run killed while creating it) are
    left alone. Blocking.
    """
    base = base or default_base() or tempfile.gettempdir()
    removed: list[str] = []
    alive: list[str] = []
    foreign: list[str] = []
    failed: list[tuple[str, str]] = []
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        names = []
    for name in names:
        if not name.startswith((WORKDIR_PREFIX, "run-")):
            continue
        path = os.path.join(base, name)
        try:
            with open(os.path.join(path, OWNER_FILE)) as f:
                labels = json.load(f)
            state = owner_state({str(k): str(v) for k, v in dict(labels).items()})
        except (OSError, ValueError, TypeError):
            continue  # not a structenv work dir (or not ours to judge)
        if state == "alive":
            alive.append(path)
        elif state == "foreign":
            foreign.append(path)
        elif state == "dead":
            if dry_run or _remove_workdir(path, patience=5.0):
                removed.append(path)
            else:
                failed.append((path, "could not remove every entry"))
    return ReapReport(
        removed=tuple(removed),
        alive=tuple(alive),
        foreign=tuple(foreign),
        failed=tuple(failed),
        dry_run=dry_run,
    )

"""One slot inside the sandbox server: its sandbox process, worker connection and reset logic.

The worker speaks length-prefixed JSON frames over its stdin/stdout pipes; many requests may
be in flight at once (a batch can run several commands in one slot), so replies are matched by
id. Everything the worker says is untrusted (a command runs with the worker's uid): frames are
size-bounded, results are re-validated and re-capped here, and a reset is verified from outside
through the pids cgroup and a listing of the workspace.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import functools
import json
import os
import struct
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.abc

from .._exceptions import SandboxUnavailableError
from .._process import kill_child
from .._types import ExecRequest, ExecResult
from . import _seccomp, _worker
from ._bwrap import (
    DEFAULT_PATH,
    OPTIONAL_CONTROLLERS,
    WORKSPACE,
    CgroupError,
    Isolation,
    SlotCgroup,
    bwrap_argv,
    descendants,
    has_private_mounts,
    kill_tree,
    mount_devpts,
    mount_quota,
    mount_tmpfs,
    privilege,
    switch_uid,
    unmount,
)
from ._files import remove_tree
from ._netns import (
    budget_argv,
    budget_script,
    check_nat,
    connected_ipv4,
    local_ipv4,
    nat_argv,
    read_child_pid,
    route_argv,
    route_script,
)
from ._rootfs import confine_target, resolve_in, rootfs_accounts, rootfs_shell

__all__ = ["Limits", "SlotBroken", "SlotRuntime", "SlotSpec", "slot_argv"]

_HEADER = struct.Struct(">I")
#: Extra seconds past a command's own deadline before the server stops trusting the worker.
BACKSTOP = 5.0
#: Where the worker is bound (read-only) inside the sandbox: its bytecode, compiled once per
#: server (see :func:`compiled_worker`).
WORKER_PATH = "/.structenv/worker.pyc"
#: The worker program on the host (compiled and bound into every slot at :data:`WORKER_PATH`).
WORKER_FILE = os.path.realpath(_worker.__file__)
_COMPILED: dict[str, str] = {}


def compiled_worker(directory: str) -> str:
    """The worker compiled once into ``directory`` (the server's work dir), as a ``.pyc``.

    A script run as ``python worker.py`` is compiled on every start: tens of milliseconds
    of every slot's cold start on a loaded machine. Python runs a ``.pyc`` file directly.
    """
    path = _COMPILED.get(directory)
    if path is None or not os.path.exists(path):
        import py_compile

        path = os.path.join(directory, ".worker.pyc")
        py_compile.compile(
            WORKER_FILE,
            cfile=path,
            doraise=True,
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        )
        os.chmod(path, 0o644)
        _COMPILED[directory] = path
    return path


#: A slot's cgroups are ``<name><suffix>``: a rebuild puts the new sandbox in one that no
#: dying sandbox holds (see ``SlotRuntime._retire``).
_CGROUP_SUFFIXES = ("", "-b", "-c")

#: Bound on waiting for a worker to acknowledge a kill after a cancelled request.
KILL_GRACE = 2.0


class SlotBroken(Exception):
    """The slot's worker is gone or misbehaved; only a hard reset can revive it."""


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits of a slot (0 = unlimited).

    ``memory`` is per process (address space) and per slot (memory cgroup, tmpfs included);
    ``pids`` per slot; ``cpus`` is the slot's CPU bandwidth in cores (cgroup quota);
    ``file_size``, ``cpu_seconds`` and ``nofile`` are hard rlimits of every command;
    ``tmp_size``/``shm_size`` size the slot's private ``/tmp`` and ``/dev/shm``; ``disk`` is
    the workspace's quota (a tmpfs of its own where the server may mount one, see
    :class:`SlotRuntime`; its pages also count against ``memory``). ``inodes`` caps the
    files of each of the slot's tmpfs (workspace, ``/tmp``; ``/dev/shm`` a sixteenth of it)
    where the server mounts them itself or the container runtime does: how long a reset
    takes to free them grows with their number (see ``_bwrap.mount_tmpfs``).
    """

    memory: int = 2 << 30
    pids: int = 256
    file_size: int = 1 << 30
    cpu_seconds: int = 0
    nofile: int = 1024
    max_output: int = 16 << 20
    cpus: float = 1.0
    tmp_size: int = 1 << 30
    shm_size: int = 64 << 20
    disk: int = 2 << 30
    inodes: int = 65536


_LIMIT_FIELDS = ("memory", "pids", "cpus", "file_size", "cpu_seconds")


@dataclasses.dataclass(frozen=True, slots=True)
class SlotSpec:
    """A slot's environment as the server builds it (a resolved ``SandboxSpec``).

    The backend resolves a spec (exports its image, checks its binds against the policy)
    and sends this over the wire; the server checks the rootfs again (a ``/bin/sh``) and
    builds the slot from it.

    Attributes:
        key: The spec's key (``SandboxSpec.key``); ``""`` for the default slot.
        rootfs: Root filesystem directory as the server sees it (``None``: the host system).
        binds: Extra read-only ``(server path, slot path)`` binds.
        env: Environment variables of every command.
        path: ``PATH`` (``""``: the default, the interpreter's directory first).
        path_prefix: Directories put before ``path``.
        workdir: Where commands start, relative to the workspace.
        limits: Overrides of the server's :class:`Limits` (``memory``, ``pids``, ``cpus``,
            ``file_size``, ``cpu_seconds``).
    """

    key: str = ""
    rootfs: str | None = None
    binds: tuple[tuple[str, str], ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    path: str = ""
    path_prefix: tuple[str, ...] = ()
    workdir: str | None = None
    limits: tuple[tuple[str, float], ...] = ()

    def to_wire(self) -> dict[str, Any]:
        """The JSON form sent with ``/v1/reset``."""
        return {
            "key": self.key,
            "rootfs": self.rootfs,
            "binds": [list(b) for b in self.binds],
            "env": dict(self.env),
            "path": self.path,
            "path_prefix": list(self.path_prefix),
            "workdir": self.workdir,
            "limits": dict(self.limits),
        }

    @classmethod
    def from_wire(cls, data: Any) -> SlotSpec:
        """Inverse of :meth:`to_wire`; ``ValueError``/``TypeError`` on bad input."""
        if not isinstance(data, dict):
            raise TypeError("spec must be an object")
        rootfs = data.get("rootfs")
        if rootfs is not None and (not isinstance(rootfs, str) or not os.path.isabs(rootfs)):
            raise ValueError("spec rootfs must be an absolute path")
        binds = tuple((str(a), str(b)) for a, b in data.get("binds") or ())
        for src, dst in binds:
            if not (os.path.isabs(src) and os.path.isabs(dst)):
                raise ValueError("spec binds must be absolute paths")
        env = tuple(sorted((str(k), str(v)) for k, v in dict(data.get("env") or {}).items()))
        limits = tuple(
            sorted((str(k), float(v)) for k, v in dict(data.get("limits") or {}).items())
        )
        if any(k not in _LIMIT_FIELDS or v < 0 for k, v in limits):
            raise ValueError(f"spec limits are {', '.join(_LIMIT_FIELDS)} (>= 0)")
        workdir = data.get("workdir")
        if workdir is not None:
            norm = os.path.normpath(str(workdir))
            if os.path.isabs(norm) or norm.startswith(".."):
                raise ValueError("spec workdir must be relative to the workspace")
            workdir = norm
        return cls(
            key=str(data.get("key") or ""),
            rootfs=rootfs,
            binds=binds,
            env=env,
            path=str(data.get("path") or ""),
            path_prefix=tuple(str(p) for p in data.get("path_prefix") or ()),
            workdir=workdir,
            limits=limits,
        )

    def apply(self, limits: Limits) -> Limits:
        """``limits`` with this spec's overrides."""
        if not self.limits:
            return limits
        changes: dict[str, Any] = {k: (v if k == "cpus" else int(v)) for k, v in self.limits}
        return dataclasses.replace(limits, **changes)


#: The default slot: the host's read-only system.
DEFAULT_SPEC = SlotSpec()


def within_file_budget(limits: Limits, base: Limits) -> Limits:
    """``limits`` (a spec's overrides of ``base``) with ``nofile`` lowered so that ``nofile x
    pids`` stays within what ``base`` allows: the backend sized ``base`` to its share of the
    machine's file table (see ``_bwrap.nofile_limit``), and a spec may raise ``pids``."""
    if base.pids <= 0 or limits.nofile <= 0 or limits.pids <= base.pids:
        return limits
    nofile = max(base.nofile * base.pids // limits.pids, 16) if limits.pids > 0 else 16
    return dataclasses.replace(limits, nofile=min(limits.nofile, nofile))


def default_path() -> str:
    """``PATH`` of a default slot: the interpreter's directory first, so ``python3``,
    ``pytest`` and ``pip`` are the ones the host runs structenv with."""
    here = os.path.dirname(sys.executable)
    return DEFAULT_PATH if here in DEFAULT_PATH.split(":") else f"{here}:{DEFAULT_PATH}"


def shm_inodes(inodes: int) -> int:
    """The inode cap of a slot's ``/dev/shm``: a sixteenth of the others' (POSIX shared
    memory and semaphores need few files; every file is time a reset spends freeing)."""
    return max(inodes // 16, 1024) if inodes > 0 else 0


def slot_argv(
    iso: Isolation,
    workspace: str,
    *,
    name: str,
    limits: Limits,
    uid: int | None = None,
    seccomp_fd: int | None = None,
    accounts: str | None = None,
    spec: SlotSpec = DEFAULT_SPEC,
    shell: str = "/bin/bash",
    scratch: bool = False,
    ptys: bool = False,
    info_fd: int | None = None,
    block_fd: int | None = None,
) -> list[str]:
    """The command line of a slot: its worker, as PID 1 of a bwrap sandbox if sandboxed.

    The worker speaks length-prefixed JSON frames on its stdin/stdout (see ``_worker``).
    ``uid`` is the slot's host uid (see ``_bwrap.slot_uid``), ``seccomp_fd`` a descriptor of
    the seccomp program that the spawned process must inherit. With ``scratch``, the slot's
    ``/tmp`` and ``/dev/shm`` are the tmpfs mounted at ``<workspace>.tmp`` and
    ``<workspace>.shm`` (see :attr:`SlotRuntime.scratch`) instead of bwrap's; with
    ``ptys``, its ``/dev/pts`` is the capped devpts at ``<workspace>.pts``. ``info_fd`` and
    ``block_fd`` are bwrap's ``--info-fd`` (the sandbox's pid, for its cgroups and a
    networked slot's NAT) and ``--block-fd`` (a networked slot's, see ``_netns``).
    """
    path = ":".join([*spec.path_prefix, spec.path or default_path()])
    env = {
        "PATH": path,
        "HOME": WORKSPACE if iso.sandboxed else workspace,
        "LANG": "C.UTF-8",
        "TERM": "xterm-256color",
        "SHELL": shell,
        # The name the slot's uid has inside (see _bwrap.write_accounts).
        "USER": "sandbox" if iso.sandboxed and switch_uid(uid) is not None else "root",
    }
    env.update(spec.env)
    config = {
        "pid1": iso.sandboxed,
        "shell": shell,
        "workdir": spec.workdir,
        "uid": switch_uid(uid) if iso.sandboxed else None,
        "workspace": WORKSPACE if iso.sandboxed else workspace,
        "tag": name,
        "env": env,
        "limits": {
            "as": limits.memory,
            "fsize": limits.file_size,
            "cpu": limits.cpu_seconds,
            "nofile": limits.nofile,
            "nproc": limits.pids if uid is not None else 0,
        },
    }
    program = WORKER_PATH if iso.sandboxed else WORKER_FILE
    if iso.sandboxed and spec.rootfs is not None:
        from ._rootfs import host_loader_argv

        argv = host_loader_argv(["-I", "-S", program, json.dumps(config)])
    else:
        argv = [os.path.realpath(sys.executable), "-I", "-S", program, json.dumps(config)]
    if not iso.sandboxed:
        return argv
    return bwrap_argv(
        iso, workspace, argv, extra_ro=[(compiled_worker(os.path.dirname(workspace)),
        WORKER_PATH)], uid=uid,
        seccomp_fd=seccomp_fd, tmp_size=limits.tmp_size, shm_size=limits.shm_size,
        accounts=accounts, rootfs=spec.rootfs, binds=spec.binds, path=path,
        tmp=workspace + ".tmp" if scratch else None,
        shm=workspace + ".shm" if scratch else None,
        pts=workspace + ".pts" if ptys else None,
        info_fd=info_fd, block_fd=block_fd,
    )  # fmt: skip


class _Reply:
    __slots__ = ("event", "value")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.value: dict[str, Any] | None = None


class _Pipe:
    """The server's ends of a worker's stdin/stdout pipes, non-blocking, with framing."""

    def __init__(self, write_fd: int, read_fd: int) -> None:
        self.write_fd = write_fd
        self.read_fd = read_fd
        self._buf = bytearray()

    def try_write(self, data: bytes) -> int:
        """Write what fits without blocking; return the number of bytes written."""
        if self.write_fd < 0:
            raise OSError("pipe closed")
        try:
            return os.write(self.write_fd, data)
        except BlockingIOError:
            return 0

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.write_fd < 0:
                raise OSError("pipe closed")
            try:
                view = view[os.write(self.write_fd, view) :]
            except BlockingIOError:
                await anyio.wait_writable(self.write_fd)

    async def _fill(self, need: int) -> None:
        while len(self._buf) < need:
            if self.read_fd < 0:
                raise EOFError
            try:
                chunk = os.read(self.read_fd, 1 << 20)
            except BlockingIOError:
                await anyio.wait_readable(self.read_fd)
                continue
            if not chunk:
                raise EOFError
            self._buf += chunk

    async def read_frame(self) -> dict[str, Any]:
        await self._fill(4)
        (size,) = _HEADER.unpack_from(self._buf)
        if size > _worker.MAX_FRAME:
            raise ValueError("worker frame too large")
        await self._fill(4 + size)
        value = json.loads(bytes(self._buf[4 : 4 + size]))
        del self._buf[: 4 + size]
        if not isinstance(value, dict):
            raise ValueError("worker frame is not an object")
        return value

    def close_write(self) -> None:
        if self.write_fd >= 0:
            fd, self.write_fd = self.write_fd, -1
            anyio.notify_closing(fd)
            os.close(fd)

    def close_read(self) -> None:
        if self.read_fd >= 0:
            fd, self.read_fd = self.read_fd, -1
            os.close(fd)


@dataclasses.dataclass(eq=False, slots=True)
class _Joined:
    """A sandbox's move into its cgroups (see ``SlotRuntime._join``): done, and why not."""

    done: anyio.Event = dataclasses.field(default_factory=anyio.Event)
    error: str = ""


@dataclasses.dataclass(eq=False, slots=True)
class _Old:
    """A killed sandbox still being reaped in the slot's background (see ``hard_reset``)."""

    proc: anyio.abc.Process | None
    nat: anyio.abc.Process | None
    cgroup: SlotCgroup | None
    name: str
    #: Set when every process of it is gone, then when its cgroup is removed too.
    dead: anyio.Event = dataclasses.field(default_factory=anyio.Event)
    done: anyio.Event = dataclasses.field(default_factory=anyio.Event)


class SlotRuntime:
    """A slot's sandbox: start, exec, reset (soft then verified, or hard), stop."""

    def __init__(
        self,
        *,
        index: int,
        name: str,
        workspace: str,
        isolation: Isolation,
        limits: Limits,
        use_cgroup: bool,
        task_group: anyio.abc.TaskGroup,
        lease: int,
        cgroup_name: str = "",
        cgroup_root: str | None = None,
        cgroup_controllers: Sequence[str] = OPTIONAL_CONTROLLERS,
        uid: int | None = None,
        seccomp_path: str = "",
        accounts: str | None = None,
        spec: SlotSpec = DEFAULT_SPEC,
        limiter: anyio.CapacityLimiter | None = None,
    ) -> None:
        self.index = index
        #: Threads for this slot's blocking lifecycle work (mounts, wipes, kills): the
        #: server passes one limiter shared by its slots; a lone slot gets its own.
        self.limiter = limiter if limiter is not None else anyio.CapacityLimiter(1)
        #: What the slot's sandbox is built from; changed only by :meth:`hard_reset`.
        self.spec = spec
        self.name = name
        self.cgroup_name = cgroup_name or name
        self.workspace = workspace
        self.iso = isolation
        self.limits = limits
        self.use_cgroup = use_cgroup
        self._tg = task_group
        self.lease = lease
        self.cgroup_root = cgroup_root
        #: The optional controllers (memory, cpu) this server's slots use: decided once, at
        #: start (``SlotCgroup.controllers``); a write to one of them that fails is fatal.
        self.cgroup_controllers = tuple(cgroup_controllers)
        self.uid = uid
        #: Whether this server moves a sandbox into its cgroups itself (SlotCgroup.join):
        #: root only (elsewhere the sandbox's uid is not the server's).
        self._join_outside = isolation.sandboxed and uid is not None and privilege() == "root"
        self.seccomp_path = seccomp_path
        self.accounts = accounts
        #: The workspace is a tmpfs of its own (a quota), remounted empty on every reset;
        #: only in a server with a mount namespace of its own (``python -m
        #: structenv.sandbox``), so no mount can outlive it.
        self.quota = isolation.sandboxed and limits.disk > 0 and has_private_mounts()
        #: The slot's /tmp and /dev/shm are tmpfs with an inode cap at ``<workspace>.tmp``
        #: and ``.shm``: mounted here and remounted on every reset (``"mount"``), or mounted
        #: by the container runtime and wiped on every reset (``"wipe"``); ``""``: bwrap's.
        self.scratch = "mount" if isolation.sandboxed and has_private_mounts() else ""
        #: The slot's /dev/pts is a devpts capped at ``SLOT_PTYS`` at ``<workspace>.pts``:
        #: mounted here and remounted on every reset (``"mount"``) or mounted by the
        #: container runtime (``"provided"``: a terminal dies with its processes, so the
        #: instance is empty again once the slot's processes are); ``""``: bwrap's, uncapped.
        self.ptys = self.scratch
        self.state = "down"
        self.terminal_state: dict[str, Any] = {}
        self._proc: anyio.abc.Process | None = None
        #: A networked slot's slirp4netns and the write end of its --exit-fd pipe.
        self._nat: anyio.abc.Process | None = None
        self._nat_exit = -1
        self._pipe: _Pipe | None = None
        self._cgroup: SlotCgroup | None = None
        #: The cgroup name the next sandbox joins. A reset that overlaps the old sandbox's
        #: teardown with the new one's start moves on to another of the slot's names, so
        #: the new sandbox never shares a cgroup (or its pids count) with the old one's.
        self._cgroup_now = self.cgroup_name
        #: Killed sandboxes not reaped yet (their processes, NAT and cgroup).
        self._old: list[_Old] = []
        #: The rootfs accounts files written for this slot: (rootfs, what they were made
        #: from), so a rebuild for the same rootfs does not write them again.
        self._accounts_made: tuple[str, tuple[tuple[int, ...], ...]] | None = None
        self._baseline = 0
        self._worker_pid = 0
        self._errors = bytearray()
        self._pending: dict[int, _Reply] = {}
        self._next_id = 1
        self._send_lock = anyio.Lock()
        self.reset_lock = anyio.Lock()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the sandbox and wait for the worker's hello.

        Cancellation: whatever was spawned is killed before the cancellation propagates.
        """
        await self._start(fresh=False)

    async def _start(self, *, fresh: bool) -> None:
        """:meth:`start`; with ``fresh``, the slot's mounts are first detached (the old
        sandbox keeps its own, unreachable from here, until it is reaped) and mounted anew.

        Cancellation: as :meth:`start`; mounts made are the slot's (the next reset detaches
        them, :meth:`stop` too).
        """
        prepare = functools.partial(self._prepare, self.spec, fresh=fresh)
        # One thread hop for all the blocking setup: each hop costs milliseconds of
        # scheduling on a loaded machine.
        shell, accounts, spec = await anyio.to_thread.run_sync(prepare, limiter=self.limiter)
        for old in list(self._old):
            if old.cgroup is not None and old.name == self._cgroup_now:
                # Two resets within one teardown: the cgroup this sandbox joins must hold
                # nothing of an old one (its pids count, its processes).
                await old.done.wait()
        limits = within_file_budget(spec.apply(self.limits), self.limits)
        cgroup = None
        if self.use_cgroup:
            # Before any descriptor is opened. Never a slot without a limit it was given:
            # it stays down (the reset that rebuilt it answers why; at start, no server).
            try:
                cgroup = SlotCgroup(
                    self._cgroup_now,
                    pids_max=limits.pids,
                    memory_max=limits.memory,
                    cpus=limits.cpus,
                    root=self.cgroup_root,
                    controllers=self.cgroup_controllers,
                )
            except CgroupError as exc:
                raise SlotBroken(str(exc)) from None
        # Opened here, not in a thread: tens of microseconds, and a descriptor returned by
        # a thread whose caller was cancelled meanwhile would be lost.
        seccomp_fd = _seccomp.open_program(self.seccomp_path) if self.iso.sandboxed else -1
        # A networked slot: bwrap reports the sandbox's pid on info_w and holds it on
        # block_r until its NAT is attached (see _attach_nat).
        nat = self.iso.sandboxed and self.iso.allow_network
        # A root server moves the sandbox into its cgroups from outside while bwrap and the
        # worker start (SlotCgroup.join): the join's RCU grace period then overlaps them
        # instead of preceding bwrap. Elsewhere the sandbox joins before it forks (wrap).
        join = cgroup is not None and self._join_outside
        info_r, info_w = os.pipe() if nat or join else (-1, -1)
        block_r, block_w = os.pipe() if nat else (-1, -1)
        argv = slot_argv(
            self.iso, self.workspace, name=self.name, limits=limits, uid=self.uid,
            seccomp_fd=seccomp_fd if seccomp_fd >= 0 else None, accounts=accounts,
            spec=spec, shell=shell, scratch=bool(self.scratch), ptys=bool(self.ptys),
            info_fd=info_w if info_w >= 0 else None, block_fd=block_r if block_r >= 0 else None,
        )  # fmt: skip
        if cgroup is not None:
            self._cgroup = cgroup
            if not join:
                argv = cgroup.wrap(argv)
        joined: _Joined | None = None
        # Raw non-blocking pipes, waited on with anyio.wait_readable/wait_writable: the
        # subprocess stream wrappers cost a few hundred microseconds per round trip here.
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        for fd in (in_w, out_r, info_r):
            if fd >= 0:
                os.set_blocking(fd, False)
        self._pipe = _Pipe(in_w, out_r)
        try:
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
            try:
                # stderr is a pipe of its own, never the server's: a command that reached
                # the worker's descriptors must find no host file there (see _drain).
                # Shielded: a spawn cancelled half-way (trio) would leave a process nobody
                # holds; it takes milliseconds, and the except below kills what it made.
                with anyio.CancelScope(shield=True):
                    proc = self._proc = await anyio.open_process(
                        argv, env=env, stdin=in_r, stdout=out_w, stderr=subprocess.PIPE,
                        pass_fds=tuple(fd for fd in (seccomp_fd, info_w, block_r) if fd >= 0),
                    )  # fmt: skip
            finally:
                for fd in (in_r, out_w, seccomp_fd, info_w, block_r):
                    if fd >= 0:
                        os.close(fd)
            self._errors = bytearray()
            drained = anyio.Event()
            self._tg.start_soon(self._drain, proc, self._errors, drained)
            with anyio.fail_after(30):
                try:
                    pid = await read_child_pid(info_r) if info_r >= 0 else 0
                    if join:
                        assert cgroup is not None
                        joined = _Joined()
                        self._tg.start_soon(self._join, cgroup, pid, proc.pid, joined)
                    if nat:
                        await self._attach_nat(pid, block_w, nofile=limits.nofile)
                    hello = await self._pipe.read_frame()
                except EOFError:
                    with anyio.move_on_after(KILL_GRACE):
                        await drained.wait()  # bwrap's or the worker's last words
                    raise SlotBroken(f"the slot's sandbox did not start: {self.stderr()}") from None
                if joined is not None:
                    # Nothing is sent to the worker before: it forks nothing until asked.
                    await joined.done.wait()
                    if joined.error:
                        raise SlotBroken(joined.error)
            if not hello.get("hello"):
                raise SlotBroken(f"unexpected worker greeting: {hello!r}")
            for old in list(self._old):
                # Started side by side, handed out only once every process of the old
                # sandbox is gone: it counts against the slot uid's process limit
                # (RLIMIT_NPROC) and holds memory until then. Usually long done by now.
                await old.dead.wait()
            self._worker_pid = proc.pid
            self._baseline = len(self._cgroup.procs()) if self._cgroup else 0
            self.state = "ready"
            self._tg.start_soon(self._read_loop, self._pipe, proc)
        except BaseException:
            with anyio.move_on_after(KILL_GRACE, shield=True):
                if joined is not None:
                    await joined.done.wait()  # a write still to come would find no one
                await self._kill_sandbox()
            raise
        finally:
            for fd in (info_r, block_w):
                if fd >= 0:
                    os.close(fd)

    async def _join(self, cgroup: SlotCgroup, pid: int, parent: int, joined: _Joined) -> None:
        """Move the starting sandbox into its cgroups (in the slot's background, so its
        start goes on meanwhile); :meth:`_start` waits for ``joined`` before the first
        request.

        Cancellation: none (a thread that is not abandoned): the write is done or failed.
        """
        try:
            await anyio.to_thread.run_sync(cgroup.join, pid, parent, limiter=self.limiter)
        except CgroupError as exc:
            joined.error = str(exc)
        finally:
            joined.done.set()

    async def _attach_nat(self, pid: int, block_w: int, *, nofile: int) -> None:
        """Give the (blocked) sandbox ``pid`` its own outbound-only network, then let it run.

        Adds the ``prohibit`` routes and the budget of new flows (nftables) to its namespace,
        starts slirp4netns (in the slot's cgroups, ending when :attr:`_nat_exit` closes) and
        waits for its ready signal. The caller owns (and closes) both descriptors; ``nofile``
        is the slot's descriptor limit, slirp4netns's too.

        Raises:
            EOFError: bwrap exited before reporting the sandbox's pid.
            SlotBroken: the routes or slirp4netns failed (the message says which).

        Cancellation: the caller kills the sandbox and the NAT (``_kill_sandbox``).
        """
        nat_path, ip, nft = check_nat()
        mode = privilege() if self.uid is not None else "user"
        iso = self.iso
        script = route_script(
            await anyio.to_thread.run_sync(local_ipv4, limiter=self.limiter),
            iso.prohibit,
            await anyio.to_thread.run_sync(connected_ipv4, limiter=self.limiter)
            if iso.prohibit_links
            else (),
        )
        routes = await anyio.run_process(
            route_argv(ip, pid, mode=mode, uid=self.uid), input=script.encode(), check=False
        )
        if routes.returncode != 0:
            err = routes.stderr.decode(errors="replace").strip()[-300:]
            raise SlotBroken(f"cannot set the networked slot's routes (ip -batch): {err}")
        # Before slirp4netns: the slot's first packet already meets its budget.
        budget = await anyio.run_process(
            budget_argv(nft, pid, mode=mode, uid=self.uid),
            input=budget_script(iso.connection_rate, iso.connection_burst).encode(),
            check=False,
        )
        if budget.returncode != 0:
            err = budget.stderr.decode(errors="replace").strip()[-300:]
            raise SlotBroken(f"cannot load the networked slot's connection budget (nft): {err}")
        ready_r, ready_w = os.pipe()
        exit_r, self._nat_exit = os.pipe()
        try:
            argv = nat_argv(
                nat_path, pid, ready_fd=ready_w, exit_fd=exit_r, mode=mode, uid=self.uid,
                nofile=nofile,
            )  # fmt: skip
            if self._cgroup is not None:
                argv = self._cgroup.wrap(argv)
            with anyio.CancelScope(shield=True):  # as the sandbox's spawn in start()
                nat = self._nat = await anyio.open_process(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, pass_fds=(ready_w, exit_r),
                )  # fmt: skip
        finally:
            os.close(ready_w)
            os.close(exit_r)
        try:
            done = anyio.Event()
            self._tg.start_soon(self._drain, nat, self._errors, done)
            os.set_blocking(ready_r, False)
            while True:
                try:
                    ready = os.read(ready_r, 1)
                    break
                except BlockingIOError:
                    await anyio.wait_readable(ready_r)
        finally:
            os.close(ready_r)
        if ready != b"1":
            with anyio.move_on_after(KILL_GRACE):
                await done.wait()
            raise SlotBroken(f"slirp4netns failed for the networked slot: {self.stderr()}")
        os.write(block_w, b"1")

    def _rootfs_setup(self, spec: SlotSpec) -> tuple[str, str | None, tuple[tuple[str, str], ...]]:
        """The rootfs's shell, accounts files naming this slot's uid, and the spec's binds
        with their targets resolved inside the rootfs (blocking; see ``confine_target``)."""
        assert spec.rootfs is not None
        try:
            shell = rootfs_shell(spec.rootfs)
            binds = tuple((src, confine_target(spec.rootfs, dst)) for src, dst in spec.binds)
        except ValueError as exc:
            raise SlotBroken(str(exc)) from None
        accounts = None
        if self.accounts is not None and self.uid is not None:
            directory = os.path.join(os.path.dirname(self.accounts), f".accounts-{self.index}")
            made = (spec.rootfs, _accounts_source(spec.rootfs))
            if made != self._accounts_made or not os.path.isfile(os.path.join(directory, "group")):
                # Written atomically (a sandbox still dying keeps the files it bound).
                self._accounts_made = None
                rootfs_accounts(spec.rootfs, directory, [self.uid])
                self._accounts_made = made
            accounts = directory
        return shell, accounts, binds

    def _prepare(self, spec: SlotSpec, *, fresh: bool) -> tuple[str, str | None, SlotSpec]:
        """Everything blocking before a sandbox's spawn (one thread hop): with ``fresh``,
        detach the slot's mounts; mount what is not mounted; the rootfs's shell, accounts
        and binds. Returns the shell, the accounts directory and the spec to build."""
        if fresh:
            self._detach_mounts()
        self._mount(spec.workdir)
        if spec.rootfs is None:
            return "/bin/bash", self.accounts, spec
        shell, accounts, binds = self._rootfs_setup(spec)
        return shell, accounts, dataclasses.replace(spec, binds=binds)

    def _detach_mounts(self) -> None:
        """Detach (``MNT_DETACH``) the workspace quota, ``/tmp``, ``/dev/shm`` and devpts
        from the server's namespace, so :meth:`_mount` mounts new, empty ones. A retired
        sandbox keeps the old instances in its own namespace until it dies; nothing here
        reaches them, and the kernel frees them with it."""
        paths = [self.workspace] if self.quota else []
        if self.scratch == "mount":
            paths += [self.workspace + ".tmp", self.workspace + ".shm"]
        if self.ptys == "mount":
            paths.append(self.workspace + ".pts")
        for path in paths:
            for _ in range(8):  # stacked mounts come off one at a time
                if not os.path.ismount(path):
                    break
                unmount(path)
            else:
                raise SlotBroken(f"cannot detach the slot's mount at {path}")

    def _mount(self, workdir: str | None) -> None:
        """Mount what is not mounted yet: the workspace quota and the scratch tmpfs."""
        limits = self.limits
        if self.quota and not os.path.ismount(self.workspace):
            mount_quota(self.workspace, size=limits.disk, uid=self.uid, inodes=limits.inodes)
        _own_workspace(self.workspace, self.uid, workdir)
        # Per-slot tmpfs the container runtime mounted (DockerBackend), with their caps.
        provided = all(os.path.ismount(self.workspace + s) for s in (".tmp", ".shm"))
        if self.iso.sandboxed and not self.scratch and provided:
            self.scratch = "wipe"
        pts = self.workspace + ".pts"
        if self.iso.sandboxed and not self.ptys and os.path.ismount(pts):
            self.ptys = "provided"  # DockerBackend's per-slot devpts volume
        if self.scratch == "mount":
            for suffix, size, inodes in (
                (".tmp", limits.tmp_size, limits.inodes),
                (".shm", limits.shm_size, shm_inodes(limits.inodes)),
            ):
                if not os.path.ismount(self.workspace + suffix):
                    mount_tmpfs(
                        self.workspace + suffix, size=size, inodes=inodes, uid=None, mode=0o1777
                    )
        if self.ptys == "mount" and not os.path.ismount(pts):
            mount_devpts(pts)

    def _drop_scratch(self) -> bool:
        """After every process of the slot is gone: empty its /tmp and /dev/shm (and drop
        its devpts)."""
        for path in (self.workspace + ".tmp", self.workspace + ".shm"):
            if self.scratch == "mount":
                unmount(path)
            elif self.scratch == "wipe" and not _wipe(path, mode=0o1777):
                return False
        if self.ptys == "mount":
            unmount(self.workspace + ".pts")
        return True

    def stderr(self) -> str:
        """The last bytes the sandbox (bwrap or the worker) wrote to its stderr."""
        return self._errors.decode(errors="replace").strip() or "(no message)"

    async def _drain(self, proc: anyio.abc.Process, errors: bytearray, done: anyio.Event) -> None:
        """Keep the last 2 KiB of the sandbox's stderr in ``errors`` (bounded: it is
        slot-writable). The buffer is the sandbox's own: a sandbox retired by a reset and
        still dying never writes into its successor's."""
        assert proc.stderr is not None
        try:
            async for chunk in proc.stderr:
                errors += chunk
                del errors[:-2048]
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            done.set()

    async def _read_loop(self, pipe: _Pipe, proc: anyio.abc.Process) -> None:
        try:
            while True:
                frame = await pipe.read_frame()
                reply = self._pending.get(int(frame.get("id", -1)))
                if reply is not None and reply.value is None:
                    reply.value = frame
                    reply.event.set()
        except (EOFError, OSError, ValueError, TypeError, KeyError):
            pass  # the worker exited, or sent garbage and can no longer be trusted
        finally:
            pipe.close_read()
        if self._proc is proc:
            self.state = "broken"
            self._fail_pending()

    def _fail_pending(self) -> None:
        for reply in self._pending.values():
            if reply.value is None:
                reply.value = {"error": "worker gone"}
                reply.event.set()

    def _detach(self) -> tuple[anyio.abc.Process | None, anyio.abc.Process | None]:
        """Take the sandbox and its NAT off the slot (returned: they are the caller's to
        kill and reap), fail its pending requests and close its pipe and NAT exit pipe."""
        proc, self._proc = self._proc, None
        nat, self._nat = self._nat, None
        self.state = "down"
        self._fail_pending()
        if self._pipe is not None:
            self._pipe.close_write()
        if self._nat_exit >= 0:
            # slirp4netns's --exit-fd: it exits at once (the caller's SIGKILL makes sure).
            fd, self._nat_exit = self._nat_exit, -1
            os.close(fd)
        return proc, nat

    async def _kill_sandbox(self) -> None:
        proc, nat = self._detach()
        if nat is not None:
            kill_child(nat)
            with anyio.move_on_after(KILL_GRACE, shield=True):
                await nat.wait()
                await nat.aclose()
        if proc is not None:
            if not self.iso.sandboxed:
                await anyio.to_thread.run_sync(kill_tree, proc.pid, limiter=self.limiter)
            # SIGKILL of the outer bwrap makes the sandbox's PID 1 die (--die-with-parent),
            # and the kernel then kills every process of the PID namespace.
            kill_child(proc)
            if self._cgroup:
                self._cgroup.kill_all()
            # Reaped and closed even when the reset that called us is cancelled: SIGKILL
            # was sent, so this is bounded by the kernel's teardown of the sandbox.
            with anyio.move_on_after(KILL_GRACE, shield=True):
                await proc.wait()
                await proc.aclose()
        if self._cgroup:
            delay = 0.001
            while self._cgroup.procs():
                self._cgroup.kill_all()
                await anyio.sleep(delay)  # bounded by the caller's deadline
                delay = min(delay * 2, 0.05)

    def _retire(self) -> None:
        """Kill the sandbox (signals only, no wait) and reap it in the slot's background:
        the next sandbox joins another of the slot's cgroups, so it never holds the old
        processes (see :meth:`_start`)."""
        proc, nat = self._detach()
        cgroup, self._cgroup = self._cgroup, None
        if nat is not None:
            kill_child(nat)
        if proc is not None:
            kill_child(proc)  # the PID namespace dies with its PID 1 (--die-with-parent)
        if cgroup is not None:
            cgroup.kill_all()
        if proc is None and nat is None and cgroup is None:
            return
        old = _Old(proc, nat, cgroup, self._cgroup_now)
        self._old.append(old)
        if cgroup is not None:
            # The next name whose cgroup no dying sandbox holds. A cgroup is removable only
            # once its last process is reaped (the sandbox's PID 1, by the host's init, a
            # moment after bwrap): a release's rebuild followed at once by a cold one for
            # another spec would otherwise wait for that.
            names = [self.cgroup_name + suffix for suffix in _CGROUP_SUFFIXES]
            busy = {o.name for o in self._old if o.cgroup is not None}
            at = names.index(self._cgroup_now) if self._cgroup_now in names else 0
            ring = names[at + 1 :] + names[: at + 1]
            self._cgroup_now = next((n for n in ring if n not in busy), ring[0])
        self._tg.start_soon(self._reap, old)

    async def reaped(self) -> None:
        """Wait until every sandbox retired by a reset is gone (processes, cgroup): a reset
        returns once their processes are; their cgroups are removed a moment later.

        Cancellation: nothing changes; the reaping goes on.
        """
        while self._old:
            await self._old[0].done.wait()

    async def _reap(self, old: _Old) -> None:
        """Wait for a retired sandbox to die, then remove its cgroup (in the slot's
        background; :meth:`stop` finishes what a cancelled one left).

        Cancellation: what is left stays in ``_old`` for :meth:`stop`.
        """
        if old.nat is not None:
            with anyio.move_on_after(KILL_GRACE, shield=True):
                await old.nat.wait()
                await old.nat.aclose()
            old.nat = None
        if old.proc is not None:
            # SIGKILL was sent: bounded by the kernel's teardown of the sandbox.
            with anyio.move_on_after(KILL_GRACE, shield=True):
                await old.proc.wait()
                await old.proc.aclose()
            old.proc = None
        if old.cgroup is not None:
            delay = 0.001
            while old.cgroup.procs():
                old.cgroup.kill_all()
                await anyio.sleep(delay)  # the kernel is tearing the sandbox down
                delay = min(delay * 2, 0.05)
            old.dead.set()
            delay = 0.005
            while not old.cgroup.remove():
                await anyio.sleep(delay)  # until the host's init reaps the sandbox's PID 1
                delay = min(delay * 2, 0.1)
            old.cgroup = None
        old.dead.set()
        if old in self._old:
            self._old.remove(old)
        old.done.set()

    async def stop(self) -> None:
        """Kill the sandbox and remove its cgroup.

        Cancellation: call under a shield; a half-stopped slot is left for the caller's
        cgroup cleanup.
        """
        await self._kill_sandbox()
        for old in list(self._old):
            await self._reap(old)
        if self.quota:
            await anyio.to_thread.run_sync(unmount, self.workspace, limiter=self.limiter)
        if self.scratch == "mount":
            await anyio.to_thread.run_sync(self._drop_scratch, limiter=self.limiter)
        if self._cgroup:
            delay = 0.005
            while not self._cgroup.remove():
                await anyio.sleep(delay)  # until the host's init reaps the sandbox's PID 1
                delay = min(delay * 2, 0.1)
            self._cgroup = None

    # -- requests -------------------------------------------------------------------------

    async def _send(self, message: dict[str, Any]) -> None:
        pipe = self._pipe
        if pipe is None or self.state != "ready":
            raise SlotBroken("slot is not running")
        data = json.dumps(message, separators=(",", ":")).encode()
        frame = _HEADER.pack(len(data)) + data
        try:
            if not self._send_lock.locked():
                # Fast path: nobody is mid-frame, and a non-blocking write of a small frame
                # completes at once. Only a partial write needs the lock (and awaits).
                written = pipe.try_write(frame)
                if written == len(frame):
                    return
                frame = frame[written:]
                async with self._send_lock:
                    await pipe.write(frame)
                return
            async with self._send_lock:
                await pipe.write(frame)
        except OSError as exc:
            raise SlotBroken("worker pipe closed") from exc

    def _new_reply(self) -> tuple[int, _Reply]:
        mid = self._next_id
        self._next_id += 1
        reply = _Reply()
        self._pending[mid] = reply
        return mid, reply

    async def exec_wire(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one command given as a validated wire dict; return the result's wire dict.

        The hot path stays in wire form (base64 strings are checked and forwarded, not
        decoded and re-encoded).

        Cancellation: the worker is told to kill the command's whole process tree (bounded by
        ``KILL_GRACE``) before the cancellation propagates.
        """
        cap = min(int(request["max_output"]), self.limits.max_output)
        mid, reply = self._new_reply()
        try:
            await self._send({**request, "op": "exec", "id": mid, "max_output": cap})
            with anyio.move_on_after(float(request["timeout"]) + BACKSTOP):
                await reply.event.wait()
            if reply.value is None:
                # The worker missed its own deadline by seconds: it is stuck or subverted.
                self.state = "broken"
                with anyio.move_on_after(KILL_GRACE, shield=True):
                    await self._kill_sandbox()
                raise SlotBroken("worker did not enforce the deadline")
        except BaseException:
            if reply.value is None and self.state == "ready":
                with anyio.move_on_after(KILL_GRACE, shield=True):
                    await self._send({"op": "kill", "id": mid})
                    await reply.event.wait()
            raise
        finally:
            del self._pending[mid]
        return _check_result(reply.value, cap, self.iso.sandboxed)

    async def exec(self, request: ExecRequest) -> ExecResult:
        """Run one command in the slot (object form of :meth:`exec_wire`).

        Cancellation: as :meth:`exec_wire`.
        """
        return ExecResult.from_wire(await self.exec_wire(request.to_wire()))

    async def terminal_call(self, command: str, *, env: dict[str, str], limit: float) -> ExecResult:
        """Run a helper command (tmux client) in the slot; see :meth:`exec`.

        Cancellation: as :meth:`exec`.
        """
        return await self.exec(ExecRequest(command=command, env=env, timeout=limit))

    async def end_processes(self) -> list[int]:
        """Sandboxed slots only: have the worker (PID 1 of the slot) kill every other process
        of the slot and reap them; the workspace and the lease stay. Running commands are
        answered with an error (``"the slot's processes were ended"``).

        The kill comes from the worker itself, which is not dumpable and cannot be signalled
        from inside: no process is spawned for it, so none of the slot's processes can stop
        it, ptrace it or write into its memory before it acts.

        Returns:
            The pids (in the slot's PID namespace) that survived: ``[]`` when only the
            worker is left.

        Raises:
            SandboxUnavailableError: The slot is unsandboxed (nothing is killed).
            SlotBroken: The slot is not running, or its worker did not answer in time or
                answered nonsense: the slot is then broken (its next reset rebuilds it).

        Cancellation: the worker may or may not have ended the processes (it finishes what
        it started); the slot stays usable either way.
        """
        if not self.iso.sandboxed:
            raise SandboxUnavailableError(
                "an unsandboxed slot cannot end its processes: they share the server's uid "
                "and are not confined to a PID namespace"
            )
        self.terminal_state.clear()  # its tmux server is one of the processes
        mid, reply = self._new_reply()
        try:
            await self._send({"op": "end", "id": mid})
            with anyio.move_on_after(10):
                await reply.event.wait()
        finally:
            del self._pending[mid]
        value = reply.value
        if value is None:
            # SIGKILL from PID 1 and a reap take milliseconds: the worker is stuck.
            self.state = "broken"
            with anyio.move_on_after(KILL_GRACE, shield=True):
                await self._kill_sandbox()
            raise SlotBroken("the worker did not end the slot's processes")
        left = value.get("left")
        if "error" in value or not isinstance(left, list):
            raise SlotBroken(str(value.get("error", "malformed answer to end"))[:500])
        # The worker's word is the kernel's here: kill(-1) from PID 1 reaches every process
        # of its namespace, and its /proc lists exactly them. (The slot's cgroup cannot say
        # more: it also holds what commands sent after this one have started meanwhile.)
        return sorted(p for p in left if type(p) is int)[:64]

    async def soft_reset(self) -> bool:
        """Unsandboxed slots only: kill every process, wipe the workspace, verify from outside.

        Returns ``False`` if anything could not be verified (the caller then hard-resets).

        Cancellation: the slot is in an unknown state; the caller hard-resets it.
        """
        self.terminal_state.clear()
        if self.state != "ready" or self.iso.sandboxed:
            # A sandboxed slot is always rebuilt: only a new sandbox is provably free of
            # what commands could have left in it (IPC objects, tmpfs pages, a subverted
            # worker), and it costs one bwrap start per lease, not per command.
            return False
        mid, reply = self._new_reply()
        try:
            await self._send({"op": "reset", "id": mid})
            with anyio.move_on_after(10):
                await reply.event.wait()
        except SlotBroken:
            return False
        finally:
            del self._pending[mid]
        value = reply.value
        if value is None or value.get("ok") is not True:
            return False
        if not await anyio.to_thread.run_sync(_wipe, self.workspace, limiter=self.limiter):
            return False
        if self._cgroup is not None:
            return len(self._cgroup.procs()) == self._baseline
        if not self.iso.sandboxed:
            return not await anyio.to_thread.run_sync(
                descendants, self._worker_pid, limiter=self.limiter
            )
        return True

    async def hard_reset(self, spec: SlotSpec | None = None) -> None:
        """Destroy the sandbox, wipe the workspace from outside and start a fresh one (built
        from ``spec`` when given: how a slot changes spec).

        In a server with a mount namespace of its own, the new sandbox starts while the old
        one dies (fresh mounts, another of the slot's cgroups; see :meth:`_retire`), and this
        returns once the old one's processes are gone.

        Cancellation: the slot is left down (``state != "ready"``); a later reset retries.
        """
        self.terminal_state.clear()
        if spec is not None:
            self.spec = spec
        if self.quota and self.scratch == "mount" and self.ptys == "mount":
            # Everything the next sandbox gets is new (its mounts, namespaces and cgroup),
            # so the old one is killed and reaped in the slot's background while it starts.
            self._retire()
            await self._start(fresh=True)
            return
        await self._kill_sandbox()
        if self.quota:
            # Every process of the slot is dead: drop the whole tmpfs (whatever its depth,
            # size or permissions) and let start() mount an empty one.
            await anyio.to_thread.run_sync(unmount, self.workspace, limiter=self.limiter)
        wipe = functools.partial(_wipe, self.workspace, fresh=True)
        if not await anyio.to_thread.run_sync(wipe, limiter=self.limiter):
            raise SlotBroken("cannot empty the workspace")
        if not await anyio.to_thread.run_sync(self._drop_scratch, limiter=self.limiter):
            raise SlotBroken("cannot empty the slot's /tmp or /dev/shm")
        await self.start()


def _capped(value: Any, cap: int) -> tuple[str, bool]:
    """A base64 field of at most ``cap`` decoded bytes (re-cut only if the worker lied)."""
    if not isinstance(value, str):
        return "", False
    if len(value) <= 4 * ((cap + 2) // 3):
        return value, False
    data = base64.b64decode(value)
    return base64.b64encode(data[:cap]).decode(), len(data) > cap


def _check_result(frame: dict[str, Any] | None, cap: int, sandboxed: bool) -> dict[str, Any]:
    """Validate a worker reply into an ExecResult wire dict (never trust its sizes or types)."""
    if frame is None or "result" not in frame:
        error = "worker gone" if frame is None else str(frame.get("error", "no result"))[:500]
        raise SlotBroken(error)
    r = frame["result"]
    if not isinstance(r, dict):
        raise SlotBroken("malformed worker result")
    stdout, out_cut = _capped(r.get("stdout"), cap)
    stderr, err_cut = _capped(r.get("stderr"), cap)
    exit_code, sig, duration = r.get("exit_code"), r.get("signal"), r.get("duration")
    failure = r.get("error")
    return {
        "exit_code": exit_code if type(exit_code) is int else None,
        "signal": sig if type(sig) is int else None,
        "stdout": stdout,
        "stderr": stderr,
        "stdout_truncated": r.get("stdout_truncated") is True or out_cut,
        "stderr_truncated": r.get("stderr_truncated") is True or err_cut,
        "duration": float(duration) if isinstance(duration, (int, float)) else 0.0,
        "timed_out": r.get("timed_out") is True,
        "sandboxed": sandboxed,
        "error": str(failure)[:500] if failure is not None else None,
    }


def _accounts_source(root: str) -> tuple[tuple[int, ...], ...]:
    """What a rootfs's accounts files are made from: the identity and version of its
    ``/etc/passwd`` and ``/etc/group`` (``()`` for a missing one)."""
    out = []
    for name in ("passwd", "group"):
        inside = resolve_in(root, f"/etc/{name}")
        try:
            st = os.lstat(inside) if inside is not None else None
        except OSError:
            st = None
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) if st else ())
    return tuple(out)


def _own_workspace(path: str, uid: int | None, workdir: str | None = None) -> None:
    """Create the workspace, owned by the slot's uid (0755: bwrap, capability-less root,
    must enter it; no other slot ever sees its host path), and the spec's ``workdir`` in it
    (the workspace is empty here: just wiped, nothing of the slot runs)."""
    os.makedirs(path, mode=0o755, exist_ok=True)
    if uid is not None:
        os.chown(path, uid, uid)
    os.chmod(path, 0o755)
    if workdir:
        parts = [p for p in workdir.split("/") if p and p != "."]
        here = path
        for part in parts:
            here = os.path.join(here, part)
            os.makedirs(here, mode=0o755, exist_ok=True)
            if uid is not None:
                os.chown(here, uid, uid)


#: Inode flags (``chattr``) the owner of a directory may set without a capability: none
#: may carry over from one lease to the next on the workspace's root.
_OWNER_FLAGS = 0x1 | 0x2 | 0x4 | 0x8 | 0x40 | 0x80 | 0x4000 | 0x10000 | 0x20000 | 0x800000
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602


def _wipe(root: str, *, fresh: bool = False, mode: int = 0o755) -> bool:
    """Empty ``root`` from the host side (iterative, fd-based, never follows symlinks,
    whatever the depth or permissions of the tree) and leave nothing of the last lease on
    the root itself. True if that worked.

    The root is the one inode a reset does not remove, and its owner (the slot) can mark
    it: extended attributes (``user.*``, ACLs), ``chattr`` flags, times, and on ext4 its
    generation number. With ``fresh`` (no process of the slot is left, and the next
    sandbox binds the path anew) a plain directory is replaced by a new one; otherwise, and
    for a mount point (a container's per-slot tmpfs), the root is scrubbed instead.
    """
    os.makedirs(root, mode=0o755, exist_ok=True)
    if not remove_tree(root, keep_root=True):
        return False
    try:
        if fresh and not os.path.ismount(root):
            os.rmdir(root)
            os.mkdir(root, 0o755)
            return True
        return _scrub(root, mode)
    except OSError:
        return False


def _scrub(root: str, mode: int = 0o755) -> bool:
    """Reset what the slot could have set on directory ``root``; whether it is clean."""
    import array
    import fcntl

    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        marks = ("user.", "system.posix_acl_")
        for name in os.listxattr(fd):
            if name.startswith(marks):
                os.removexattr(fd, name)
        flags = array.array("i", [0])
        try:
            fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags)
            if flags[0] & _OWNER_FLAGS:
                flags[0] &= ~_OWNER_FLAGS
                fcntl.ioctl(fd, _FS_IOC_SETFLAGS, flags)
        except OSError as exc:
            if exc.errno not in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        os.utime(fd)
        os.fchmod(fd, mode)
        return not os.listdir(fd) and not any(n.startswith(marks) for n in os.listxattr(fd))
    finally:
        os.close(fd)

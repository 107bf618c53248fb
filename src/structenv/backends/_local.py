"""LocalBackend: sandbox hosts as child processes of this one, slots isolated with bubblewrap.

Each host is a ``python -m structenv.sandbox`` process serving S slots over a private unix
socket. A host holds its stdin pipe open to us and exits when it reads end-of-file, so hosts
die with this process however it ends (even SIGKILL), and their sandboxes die with them
(``--die-with-parent``). A supervisor task per host notices a crash, quarantines the host's
slots (in-flight calls fail at once: their connections break) and starts a replacement.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Sequence
from types import TracebackType
from typing import Literal, Self

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from .._exceptions import BackendError, ConfigError, SandboxUnavailableError, SlotBrokenError
from .._types import DEFAULT_MAX_OUTPUT, ExecRequest
from ..abc import BackendStatistics, ResultCallback, SandboxBackend, Slot
from ..sandbox._bwrap import remove_cgroup_tree
from ..sandbox._client import HostClient, RemoteSlot, error_from_response, stream_batch

__all__ = ["LocalBackend"]

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


@dataclasses.dataclass(slots=True, eq=False)
class _SlotState:
    index: int
    lease: int
    state: str = "free"  # free | leased | resetting | broken


@dataclasses.dataclass(slots=True, eq=False)
class _Host:
    id: str
    proc: anyio.abc.Process
    client: HostClient
    workdir: str
    sandboxed: bool
    slots: list[_SlotState]
    alive: bool = True


class LocalBackend(SandboxBackend):
    """Sandbox hosts running as local child processes.

    Args:
        hosts: Number of sandbox-server processes.
        slots_per_host: Slots (isolated workspaces) per host.
        allow_network: Give commands the host's network. ``False`` requires network isolation.
        require_sandbox: Fail closed (:class:`~structenv.SandboxUnavailableError`) at start if
            bubblewrap isolation is unusable. With ``False`` and no isolation, commands run
            unsandboxed and every result says ``sandboxed=False``.
        isolation: ``"auto"`` (bwrap, or none if allowed), ``"bwrap"`` or ``"none"``
            (unsandboxed on purpose; needs ``require_sandbox=False`` and ``allow_network``).
        bwrap_path: The bubblewrap binary.
        memory_limit: Bytes of address space per process and of memory per slot (cgroup).
        pids_limit: Processes per slot (v1 pids cgroup; contains fork bombs).
        file_size_limit: Largest file a command may write.
        cpu_time_limit: CPU seconds per process (0: none).
        max_output: Host-side cap on captured stdout/stderr per command.
        cgroup: ``"auto"``, ``"required"`` or ``"off"``: use of per-slot v1 cgroups.
        workdir: Private directory for sockets and workspaces (default: a new 0700 directory
            under ``/var/tmp``, removed on close). Sandboxes only ever see their own workspace.
        reset_timeout: Seconds a reset may take before the slot is destroyed instead.
        start_timeout: Seconds a host may take to start.
    """

    def __init__(
        self,
        *,
        hosts: int = 1,
        slots_per_host: int = 4,
        allow_network: bool = False,
        require_sandbox: bool = True,
        isolation: Literal["auto", "bwrap", "none"] = "auto",
        bwrap_path: str = "bwrap",
        memory_limit: int = 2 << 30,
        pids_limit: int = 256,
        file_size_limit: int = 1 << 30,
        cpu_time_limit: int = 0,
        max_output: int = max(DEFAULT_MAX_OUTPUT, 16 << 20),
        cgroup: Literal["auto", "required", "off"] = "auto",
        workdir: str | None = None,
        reset_timeout: float = 20.0,
        start_timeout: float = 60.0,
    ) -> None:
        if hosts < 1 or slots_per_host < 1:
            raise ConfigError("hosts and slots_per_host must be >= 1")
        if isolation not in ("auto", "bwrap", "none"):
            raise ConfigError(f"unknown isolation {isolation!r}")
        if isolation == "none" and require_sandbox:
            raise ConfigError("isolation='none' needs require_sandbox=False")
        self._n_hosts = hosts
        self._slots_per_host = slots_per_host
        self._allow_network = allow_network
        self._require_sandbox = require_sandbox
        self._isolation = isolation
        self._bwrap = bwrap_path
        self._limits = (memory_limit, pids_limit, file_size_limit, cpu_time_limit, max_output)
        self._cgroup = cgroup
        self._workdir_opt = workdir
        self.reset_timeout = reset_timeout
        self.start_timeout = start_timeout
        self._root = ""
        self._token = secrets.token_urlsafe(32)
        self._hosts: dict[str, _Host] = {}
        self._mode = "bwrap" if isolation != "none" else "none"
        self._changed = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._closed = False
        self._failure: BaseException | None = None
        self._counter = 0
        self._replacing = 0
        self._stats = {"acquires": 0, "releases": 0, "leased": 0, "resets_failed": 0}
        self._stats.update(destroyed=0, hosts_replaced=0)

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._n_hosts * self._slots_per_host

    @property
    def sandboxed(self) -> bool:
        return self._mode == "bwrap"

    async def __aenter__(self) -> Self:
        # The supervisors' task group must enclose the ``async with`` body, so it is entered
        # here and exited in __aexit__ (same task, properly nested), after the shielded
        # aclose() of the base class has stopped every host.
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        try:
            return await super().__aenter__()
        except BaseException:
            self._tg = None
            # Shield the (prompt, cancelled) exit of the supervisors from outer cancellation;
            # a separate move_on_after scope cannot be used: it would not nest with ``tg``.
            tg.cancel_scope.shield = True
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await super().__aexit__(exc_type, exc, tb)
        finally:
            tg, self._tg = self._tg, None
            if tg is not None:
                # Only supervisors run in it and the hosts are stopped: exiting is immediate.
                # Shielded as above (the body may be exiting because it was cancelled).
                tg.cancel_scope.shield = True
                tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)

    async def _start(self) -> None:
        if self._tg is None:
            raise RuntimeError("use LocalBackend as `async with LocalBackend(...) as backend:`")
        self._root = await anyio.to_thread.run_sync(self._make_root)
        first = await self._spawn_host()
        if not first.sandboxed and self._require_sandbox:
            raise SandboxUnavailableError("sandbox host started without isolation")
        async with anyio.create_task_group() as starters:
            for _ in range(self._n_hosts - 1):
                starters.start_soon(self._spawn_host)

    def _make_root(self) -> str:
        # mkdtemp makes it 0700: sockets and workspaces are private to this process's user,
        # and no sandbox ever sees anything of it but its own bound workspace.
        if self._workdir_opt:
            os.makedirs(self._workdir_opt, mode=0o700, exist_ok=True)
            return tempfile.mkdtemp(prefix="run-", dir=self._workdir_opt)
        base = "/var/tmp" if os.path.isdir("/var/tmp") else None
        return tempfile.mkdtemp(prefix=f"structenv-{os.getpid()}-", dir=base)

    async def _spawn_host(self) -> _Host:
        """Start one host and its supervisor.

        Cancellation: the half-started process is killed.
        """
        self._counter += 1
        host_id = f"se{os.getpid()}-{self._counter}-{secrets.token_hex(2)}"
        workdir = os.path.join(self._root, host_id)
        sock = os.path.join(self._root, f"{host_id}.sock")
        memory, pids, fsize, cpu, max_output = self._limits
        argv = [
            sys.executable, "-m", "structenv.sandbox", "--socket", sock, "--watch-stdin",
            "--slots", str(self._slots_per_host), "--workdir", workdir, "--name", host_id,
            "--isolation", self._mode, "--bwrap", self._bwrap, "--cgroup", self._cgroup,
            "--memory", str(memory), "--pids", str(pids), "--file-size", str(fsize),
            "--cpu-seconds", str(cpu), "--max-output", str(max_output),
        ]  # fmt: skip
        if self._allow_network:
            argv.append("--allow-network")
        env = dict(os.environ, STRUCTENV_SANDBOX_TOKEN=self._token)
        proc = await anyio.open_process(argv, env=env, stderr=None)
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
                    return await self._spawn_host()
                raise SandboxUnavailableError(str(info.get("message")))
            if not info.get("ready"):
                raise BackendError(f"sandbox host failed to start: {info}")
            client = HostClient(uds=sock, token=self._token)
            status, body = await client.request("GET", "/v1/health")
            if status != 200:
                raise error_from_response(status, body)
            health = json.loads(body)
            slots = [_SlotState(s["index"], int(s["lease"])) for s in health["slots"]]
            if self._closed:  # aclose() ran meanwhile: it will not see this host
                raise BackendError("backend closed while a host was starting")
        except BaseException as exc:
            with anyio.move_on_after(10, shield=True):
                if client is not None:
                    await client.aclose()
                await _terminate(proc)
            if isinstance(exc, _START_ERRORS):
                raise BackendError(f"sandbox host failed to start: {exc!r}") from exc
            raise
        host = _Host(host_id, proc, client, workdir, bool(info.get("sandboxed")), slots)
        self._hosts[host_id] = host
        assert self._tg is not None
        self._tg.start_soon(self._supervise, host)
        self._notify()
        return host

    async def _supervise(self, host: _Host) -> None:
        await host.proc.wait()
        if self._closed:
            return
        logger.error("sandbox host %s died (exit %s); replacing it", host.id, host.proc.returncode)
        self._replacing += 1
        try:
            self._retire(host)
            self._stats["hosts_replaced"] += 1
            await anyio.to_thread.run_sync(_cleanup_host_files, host.id, host.workdir)
            for attempt in range(3):
                try:
                    await self._spawn_host()
                    return
                except (BackendError, SandboxUnavailableError, OSError) as exc:
                    logger.error("replacing sandbox host failed (try %d): %r", attempt + 1, exc)
                    await anyio.sleep(0.5 * 2**attempt)
            self._failure = BackendError("sandbox hosts keep failing to start")
        finally:
            self._replacing -= 1
            self._notify()

    def _retire(self, host: _Host) -> None:
        """Forget a dead host: none of its slots is ever handed out again."""
        host.alive = False
        for s in host.slots:
            if s.state != "leased":
                s.state = "broken"
        self._hosts.pop(host.id, None)
        self._notify()

    async def aclose(self) -> None:
        """Stop every host (their sandboxes die with them) and remove the work directory.

        Cancellation: shielded and bounded; hosts that do not exit in time are killed.
        """
        if self._closed:
            return
        self._closed = True
        self._notify()
        with anyio.move_on_after(self.close_grace, shield=True):
            async with anyio.create_task_group() as tg:
                for host in list(self._hosts.values()):
                    tg.start_soon(self._stop_host, host)
            if self._root:
                await anyio.to_thread.run_sync(shutil.rmtree, self._root, True)
        # Supervisors see ``_closed`` and return as their hosts exit; the task group itself is
        # exited by __aexit__ (cancelling it here would cancel the ``async with`` body too).

    async def _stop_host(self, host: _Host) -> None:
        host.alive = False
        await host.client.aclose()
        await _terminate(host.proc)
        await anyio.to_thread.run_sync(_cleanup_host_files, host.id, host.workdir)

    # -- slots ----------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _take_free(self) -> RemoteSlot | None:
        best: tuple[int, _Host, _SlotState] | None = None
        for host in self._hosts.values():
            if not host.alive:
                continue
            free = [s for s in host.slots if s.state == "free"]
            # Spread across hosts: take from the host with the most free slots.
            if free and (best is None or len(free) > best[0]):
                best = (len(free), host, free[0])
        if best is None:
            return None
        _, host, state = best
        state.state = "leased"
        self._stats["acquires"] += 1
        self._stats["leased"] += 1
        return RemoteSlot(
            client=host.client,
            index=state.index,
            id=f"{host.id}/{state.index}",
            host_id=host.id,
            lease=state.lease,
            sandboxed=host.sandboxed,
        )

    async def acquire_slot(self) -> Slot:
        """Lease a clean slot, waiting (event-driven) until one is free.

        Raises:
            BackendError: The backend is closed or its hosts cannot be started.

        Cancellation: nothing is leased (the only await is the wait for a free slot).
        """
        while True:
            if self._closed:
                raise BackendError("backend is closed")
            if self._failure is not None and not self._hosts:
                raise BackendError("no sandbox host is running") from self._failure
            slot = self._take_free()
            if slot is not None:
                return slot
            await self._changed.wait()

    def _lookup(self, slot: Slot) -> tuple[_Host | None, _SlotState | None]:
        host = self._hosts.get(slot.host_id)
        if host is None or not isinstance(slot, RemoteSlot):
            return None, None
        return host, host.slots[slot.index]

    async def release_slot(self, slot: Slot, *, reusable: bool) -> None:
        """Reset the slot for the next owner, or destroy it (new sandbox, new lease).

        Cancellation: the slot is quarantined and rebuilt in the background; it is never
        handed out before that finishes.
        """
        self._stats["releases"] += 1
        self._stats["leased"] -= 1
        host, state = self._lookup(slot)
        if host is None or state is None or not host.alive:
            self._stats["destroyed"] += 1  # its host is gone, and the slot with it
            return
        state.state = "resetting"
        hard = not reusable or not slot.reusable
        body = json.dumps({"slot": state.index, "lease": slot.lease, "hard": hard}).encode()
        try:
            with anyio.fail_after(self.reset_timeout):
                status, data = await host.client.request("POST", "/v1/reset", body)
            if status != 200:
                raise error_from_response(status, data)
            state.lease = int(json.loads(data)["lease"])
        except BaseException as exc:
            if not hard:
                self._stats["resets_failed"] += 1
            self._stats["destroyed"] += 1
            if self._tg is not None and not self._closed:
                self._tg.start_soon(self._destroy, host, state)
            if not isinstance(exc, Exception):
                raise  # cancellation: never converted
            logger.warning("reset of %s failed (%r); destroying it", slot.id, exc)
            return
        if hard:
            self._stats["destroyed"] += 1
        state.state = "free"
        self._notify()

    async def _destroy(self, host: _Host, state: _SlotState) -> None:
        """Rebuild a quarantined slot from scratch (control-plane reset, no lease needed)."""
        body = json.dumps({"slot": state.index, "lease": None, "hard": True}).encode()
        try:
            with anyio.fail_after(self.start_timeout):
                status, data = await host.client.request("POST", "/v1/reset", body)
            if status != 200:
                raise error_from_response(status, data)
            state.lease = int(json.loads(data)["lease"])
        except Exception as exc:
            logger.error("slot %s/%d cannot be rebuilt (%r); retired", host.id, state.index, exc)
            state.state = "broken"
            self._notify()
            return
        if host.alive:
            state.state = "free"
        self._notify()

    async def exec_batch(
        self, calls: Sequence[tuple[Slot, ExecRequest]], on_result: ResultCallback
    ) -> None:
        """Run calls with one streamed request per host; results arrive as each finishes.

        Cancellation: the hosts kill every unfinished command; ``on_result`` is not called
        for them.
        """
        groups: dict[str, list[tuple[int, int, int, ExecRequest]]] = {}
        for i, (slot, request) in enumerate(calls):
            host, _ = self._lookup(slot)
            if host is None or not host.alive or not isinstance(slot, RemoteSlot):
                on_result(i, SlotBrokenError(f"slot {slot.id} has no running host"))
                continue
            groups.setdefault(host.id, []).append((i, slot.index, slot.lease, request))
        async with anyio.create_task_group() as tg:
            for host_id, group in groups.items():
                tg.start_soon(stream_batch, self._hosts[host_id].client, group, on_result)

    def statistics(self) -> BackendStatistics:
        usable = sum(
            1 for h in self._hosts.values() if h.alive for s in h.slots if s.state != "broken"
        )
        s = self._stats
        return BackendStatistics(
            hosts=sum(1 for h in self._hosts.values() if h.alive),
            capacity=usable,
            leased=s["leased"],
            acquires=s["acquires"],
            releases=s["releases"],
            resets_failed=s["resets_failed"],
            destroyed=s["destroyed"],
            hosts_replaced=s["hosts_replaced"],
        )

    def workspace_path(self, slot: Slot) -> str:
        """Host directory of a slot's workspace (for diagnostics and tests; never shared
        with other slots)."""
        host, state = self._lookup(slot)
        if host is None or state is None:
            raise SlotBrokenError(f"slot {slot.id} has no running host")
        return os.path.join(host.workdir, f"slot-{state.index}")

    def host_pids(self) -> dict[str, int]:
        """Process id of every running host (for supervision tests and diagnostics)."""
        return {h.id: h.proc.pid for h in self._hosts.values() if h.alive}


async def _terminate(proc: anyio.abc.Process) -> None:
    """Close the host's stdin (it exits and kills its sandboxes); SIGKILL if it lingers."""
    if proc.stdin is not None:
        with anyio.move_on_after(1):
            await proc.stdin.aclose()
    with anyio.move_on_after(10):
        await proc.wait()
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
    await proc.aclose()


def _cleanup_host_files(host_id: str, workdir: str) -> None:
    """Remove a stopped host's cgroups (left behind if it was killed) and workspaces."""
    remove_cgroup_tree(host_id, patience=5.0)
    shutil.rmtree(workdir, ignore_errors=True)

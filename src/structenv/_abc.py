"""The backend protocol: what a sandbox backend and its slots implement.

A *backend* is the control plane: it starts sandbox hosts, hands out slots and tears everything
down. A *slot* is one isolated workspace on one host, leased to one trajectory at a time. The
:class:`~structenv.SlotPool` is the only caller of :meth:`SandboxBackend.acquire_slot` and
:meth:`SandboxBackend.release_slot`; it guarantees they are paired whatever is cancelled.

Every slot handle carries a *lease generation*. Resetting a slot bumps its generation on the
host, so an operation sent with an older lease (a late reset, an exec from a cancelled caller)
is refused with :class:`~structenv.StaleLeaseError` instead of touching the next owner's
workspace.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Self

import anyio
from anyio import AsyncContextManagerMixin

from ._exceptions import ConfigError
from ._types import ExecRequest, ExecResult

if TYPE_CHECKING:
    from ._spec import SandboxSpec

__all__ = [
    "BackendStatistics",
    "FileEntry",
    "ResultCallback",
    "SandboxBackend",
    "Slot",
    "SpecStatistics",
]

#: Receives ``(index, result_or_exception)`` for each call of a batch as soon as it finishes.
ResultCallback = Callable[[int, "ExecResult | Exception"], None]


@dataclasses.dataclass(frozen=True, slots=True)
class FileEntry:
    """One entry of :meth:`Slot.list_files` (path relative to the workspace root)."""

    path: str
    size: int
    is_dir: bool


@dataclasses.dataclass(frozen=True, slots=True)
class SpecStatistics:
    """Counters of one :class:`~structenv.SandboxSpec` in a backend.

    Attributes:
        hits: Acquires served by a warm slot already built for the spec.
        misses: Acquires that found no warm slot of the spec (a slot was rebuilt for it).
        cold_starts: Slots (re)built for the spec from another spec.
        warm: Free slots of the spec right now.
        leased: Slots of the spec leased right now.
        prepare_seconds: Seconds spent preparing the spec (image build/export, checks).
    """

    hits: int = 0
    misses: int = 0
    cold_starts: int = 0
    warm: int = 0
    leased: int = 0
    prepare_seconds: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class BackendStatistics:
    """Counters every backend reports.

    Attributes:
        hosts: Sandbox hosts currently running.
        capacity: Slots that can be leased at once right now.
        leased: Slots currently leased (acquired and not yet released).
        acquires: Total successful :meth:`SandboxBackend.acquire_slot` calls.
        releases: Total :meth:`SandboxBackend.release_slot` calls.
        resets_failed: Resets that failed or timed out (those slots were destroyed).
        destroyed: Slots destroyed instead of reset (quarantined, broken, or not reusable).
        hosts_replaced: Hosts that died and were replaced.
        specs: Per-spec counters, by :attr:`SandboxSpec.label` (the default spec: ``"default"``).
    """

    hosts: int
    capacity: int
    leased: int
    acquires: int
    releases: int
    resets_failed: int = 0
    destroyed: int = 0
    hosts_replaced: int = 0
    specs: Mapping[str, SpecStatistics] = dataclasses.field(default_factory=dict)


class Slot(ABC):
    """A leased, isolated workspace on one sandbox host.

    Attributes:
        id: Stable identifier of the physical slot (``"<host>/<index>"``).
        host_id: The host the slot lives on; the batcher groups calls per host.
        lease: Lease generation this handle was issued with.
        reusable: Set to ``False`` when the slot's state is no longer trusted (a cancelled or
            timed-out exec, a fault); the pool then asks the backend to destroy it rather than
            reset it.
        sandboxed: Whether commands in this slot run under isolation.
    """

    __slots__ = ("host_id", "id", "lease", "reusable", "sandboxed")

    def __init__(self, *, id: str, host_id: str, lease: int, sandboxed: bool) -> None:
        self.id = id
        self.host_id = host_id
        self.lease = lease
        self.reusable = True
        self.sandboxed = sandboxed

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} lease={self.lease}>"

    @abstractmethod
    async def exec(self, request: ExecRequest) -> ExecResult:
        """Run one command in the slot. A nonzero exit is data, not an exception.

        Raises:
            StaleLeaseError: This handle's lease is no longer current.
            SlotBrokenError: The slot's host is gone.

        Cancellation: the command may have started; the implementation makes the host kill its
        process tree (e.g. by dropping the connection). The caller must mark the slot
        ``reusable = False``.
        """

    @abstractmethod
    async def reset(self) -> None:
        """Kill every process of the slot, empty its workspace and bump its lease.

        Raises:
            StaleLeaseError: The lease is not current (someone else owns the slot now).

        Cancellation: the slot is in an unknown state; the pool quarantines it.
        """

    @abstractmethod
    async def end_processes(self) -> list[int]:
        """Kill every process of the slot, reap them and report the survivors; the workspace
        and the lease stay, and the slot stays usable for the next command.

        For a verifier that must run alone in the slot a trajectory used: whatever its
        commands left running (``&``, ``nohup``, ``setsid``, double forks, a tmux server) is
        ended. The kill must come from something no process of the slot can stop, signal,
        ptrace or write into (the sandbox server's worker, PID 1 of the slot): a command run
        for the purpose could be raced by them. Commands of the slot still running are
        answered with an error (``exit_code None``, ``error`` set).

        Returns:
            The pids still alive afterwards (``[]``: none but the slot's own machinery).

        Raises:
            SandboxUnavailableError: The slot is unsandboxed (its commands are not confined
                to the slot, so no kill can claim to reach them all): nothing is killed.
            StaleLeaseError: This handle's lease is no longer current (nothing is killed).
            SlotBrokenError: The slot's host is gone, or the slot broke doing it.

        Cancellation: the processes may or may not have been ended (the request may have
        reached the host); the workspace, the lease and the slot's reusability are unchanged.
        """

    @abstractmethod
    async def read_file(self, path: str, *, max_bytes: int = 1 << 20) -> bytes:
        """Read a file from the workspace (binary-safe, confined to the workspace).

        Raises:
            FileNotFoundError, IsADirectoryError: As for local files.
            PermissionError: The path escapes the workspace.
            ValueError: The file is larger than ``max_bytes``.

        Cancellation: no state changes.
        """

    @abstractmethod
    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Create or replace a workspace file, making parent directories.

        Raises:
            PermissionError: The path escapes the workspace.

        Cancellation: the file is either absent, old, or complete (written atomically).
        """

    @abstractmethod
    async def list_files(self, path: str = ".") -> list[FileEntry]:
        """List a workspace directory recursively (paths relative to the workspace).

        Cancellation: no state changes.
        """


class SandboxBackend(AsyncContextManagerMixin, ABC):
    """A control plane that hands out :class:`Slot` s. Use it as an async context manager.

    Entering starts it (hosts, workers); leaving tears everything down, shielded and bounded,
    whatever happened inside. A backend is entered once: entering it again (while it runs or
    after it stopped) raises ``RuntimeError``. Implementers provide :meth:`_start`,
    :meth:`aclose`, :meth:`acquire_slot`, :meth:`release_slot`, :meth:`statistics` and
    :attr:`capacity`; one that needs a task group around its whole life overrides
    :meth:`__asynccontextmanager__` and enters ``super().__asynccontextmanager__()`` inside it.
    """

    #: Seconds entering may spend cleaning up after a failed or cancelled start.
    close_grace: float = 30.0

    #: Whether :meth:`Slot.exec` returns promptly when cancelled. A backend whose exec blocks
    #: in a worker thread (``anyio.to_thread.run_sync``) sets it to ``False``: the batcher
    #: then keeps every call's client-side deadline with its watchdog instead of a cancel
    #: scope around exec (docs/adding-a-backend.md).
    cancellable_exec: bool = True

    _entered: bool = False

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncIterator[Self]:
        if self._entered:
            raise RuntimeError(f"this {type(self).__name__} was already entered (enter it once)")
        self._entered = True
        try:
            await self._start()
        except BaseException:
            with anyio.move_on_after(self.close_grace, shield=True):
                await self.aclose()
            raise
        try:
            yield self
        finally:
            with anyio.move_on_after(self.close_grace, shield=True):
                await self.aclose()

    @abstractmethod
    async def _start(self) -> None:
        """Start hosts; raise :class:`~structenv.SandboxUnavailableError` if isolation that the
        configuration requires is unusable.

        Cancellation: :meth:`__aenter__` calls :meth:`aclose` to undo a partial start.
        """

    @abstractmethod
    async def aclose(self) -> None:
        """Stop every host and destroy every slot. Idempotent.

        Cancellation: implementations shield their own teardown and bound it in time.
        """

    @property
    @abstractmethod
    def capacity(self) -> int:
        """How many slots may be leased at once (the pool never asks for more)."""

    @property
    def sandboxed(self) -> bool:
        """Whether this backend's slots run under isolation."""
        return True

    @property
    def allow_network(self) -> bool:
        """Whether this backend's slots can reach the network."""
        return False

    async def prepare_spec(self, spec: SandboxSpec) -> None:
        """Make ``spec`` ready ahead of its first slot (build or export its image, check it).

        The default accepts only the default spec. Backends that support specs override it;
        :meth:`acquire_slot` prepares a spec on first use anyway.

        Raises:
            ConfigError: The spec is unusable here (the message says why), before anything
                of it runs.

        Cancellation: nothing half-made is kept (a cache entry is complete or absent).
        """
        if not spec.is_default:
            raise ConfigError(f"{type(self).__name__} does not support sandbox specs")

    @abstractmethod
    async def acquire_slot(self, spec: SandboxSpec | None = None) -> Slot:
        """Lease a clean slot of ``spec`` (``None``: the backend's default), waiting for one
        if all are busy or hosts are starting. A slot built for one spec is never handed
        out for another.

        Raises:
            ConfigError: ``spec`` is unusable (see :meth:`prepare_spec`).
            BackendError: No slot can be made (hosts cannot start).

        Cancellation: never leaks a half-made slot: either the slot is returned or nothing
        was leased.
        """

    @abstractmethod
    async def release_slot(self, slot: Slot, *, reusable: bool) -> None:
        """Give a leased slot back: reset it (``reusable=True``) or destroy it.

        Called exactly once per successful :meth:`acquire_slot`, under a shield and a deadline
        set by the pool. A slot whose reset fails must never be handed out again.

        Cancellation: the slot is treated as quarantined: it is destroyed, never reused.
        """

    async def exec_batch(
        self, calls: Sequence[tuple[Slot, ExecRequest]], on_result: ResultCallback
    ) -> None:
        """Run calls for slots of one host, delivering each result as soon as it is ready.

        ``on_result(i, result_or_exception)`` is called synchronously once per call; a slow
        call never holds back the others' results. Backends with a remote host override this
        to use one round trip; the default runs :meth:`Slot.exec` concurrently.

        Cancellation: every unfinished call is cancelled as in :meth:`Slot.exec`;
        ``on_result`` is not called for them.
        """

        async def run(i: int, slot: Slot, request: ExecRequest) -> None:
            try:
                result: ExecResult | Exception = await slot.exec(request)
            except Exception as exc:
                result = exc
            on_result(i, result)

        async with anyio.create_task_group() as tg:
            for i, (slot, request) in enumerate(calls):
                tg.start_soon(run, i, slot, request)

    @abstractmethod
    def statistics(self) -> BackendStatistics:
        """A snapshot of the backend's counters."""

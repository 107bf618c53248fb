"""FakeBackend: an in-memory backend for tests, with latency, failure and hang injection.

It follows the backend contract exactly (leases, resets, quarantine, cancellation) so the pool,
batcher and executor can be tested without processes. It is a test tool: features that talk
to real sandboxes are tested against :class:`~structenv.backends.LocalBackend`.

Commands are a tiny language, separated by ``;``::

    true | noop            exit 0, instantly
    echo WORDS             print WORDS and a newline
    exit N                 exit with status N
    sleep S                sleep S seconds (respects the request's deadline)
    hang                   sleep forever (until the deadline or a kill)
    write PATH TEXT        create a workspace file
    cat PATH               print a workspace file
    broken                 raise SlotBrokenError (an infrastructure failure)
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

import anyio

from .._exceptions import BackendError, SlotBrokenError, StaleLeaseError
from .._spec import SandboxSpec
from .._types import ExecRequest, ExecResult
from ..abc import BackendStatistics, FileEntry, ResultCallback, SandboxBackend, Slot

__all__ = ["ExecHandler", "FakeBackend", "FakeSlot"]

_OK = ExecResult(exit_code=0, sandboxed=True)


class ExecHandler(Protocol):
    """Replaces the command interpreter of a :class:`FakeBackend`."""

    async def __call__(self, slot: FakeSlot, request: ExecRequest) -> ExecResult: ...


@dataclasses.dataclass(eq=False)
class _PhysicalSlot:
    id: str
    host_id: str
    generation: int = 0
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    running: set[anyio.CancelScope] = dataclasses.field(default_factory=set)
    #: Commands killed by :meth:`FakeSlot.end_processes` (answered with an error).
    ended: set[anyio.CancelScope] = dataclasses.field(default_factory=set)
    destroyed: bool = False

    def kill_all(self) -> None:
        for scope in self.running:
            scope.cancel()
        self.running.clear()


class FakeSlot(Slot):
    """A slot of a :class:`FakeBackend`."""

    __slots__ = ("_backend", "_phys")

    def __init__(self, backend: FakeBackend, phys: _PhysicalSlot) -> None:
        super().__init__(id=phys.id, host_id=phys.host_id, lease=phys.generation, sandboxed=True)
        self._backend = backend
        self._phys = phys

    @property
    def files(self) -> dict[str, bytes]:
        """The workspace contents (for assertions in tests)."""
        return self._phys.files

    def _check(self) -> None:
        if self._phys.destroyed:
            raise SlotBrokenError(f"slot {self.id} was destroyed")
        if self.lease != self._phys.generation:
            raise StaleLeaseError(
                f"slot {self.id}: lease {self.lease} is stale (now {self._phys.generation})"
            )

    async def exec(self, request: ExecRequest) -> ExecResult:
        """Run a fake command. Cancellation: the command is abandoned (as if killed)."""
        self._check()
        self._backend.execs += 1
        instant = self._backend._instant(request)
        if instant is not None:
            await anyio.lowlevel.checkpoint()
            return instant
        return await self._backend._run(self, request)

    async def reset(self) -> None:
        """Reset the workspace. Cancellation: the slot is quarantined by the pool."""
        self._check()
        await self._backend._reset(self._phys)
        # The owner's own reset keeps its lease current; everyone else's handle is now stale.
        self.lease = self._phys.generation

    async def end_processes(self) -> list[int]:
        """Kill the slot's running commands (answered with an error); files and lease stay.

        Cancellation: the commands may or may not have been killed; nothing else changes.
        """
        self._check()
        self._backend.ends += 1
        await anyio.lowlevel.checkpoint()
        self._check()
        self._phys.ended |= self._phys.running
        self._phys.kill_all()
        return []

    async def read_file(self, path: str, *, max_bytes: int = 1 << 20) -> bytes:
        """Read a fake workspace file. Cancellation: no state changes."""
        self._check()
        await anyio.lowlevel.checkpoint()
        _confine(path)
        try:
            data = self._phys.files[path]
        except KeyError:
            raise FileNotFoundError(path) from None
        if len(data) > max_bytes:
            raise ValueError(f"{path} is {len(data)} bytes, over the {max_bytes} byte cap")
        return data

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Write a fake workspace file. Cancellation: the file is old or complete."""
        self._check()
        await anyio.lowlevel.checkpoint()
        _confine(path)
        self._phys.files[path] = bytes(data)

    async def list_files(self, path: str = ".") -> list[FileEntry]:
        """List fake workspace files. Cancellation: no state changes."""
        self._check()
        await anyio.lowlevel.checkpoint()
        prefix = "" if path in (".", "") else path.rstrip("/") + "/"
        return [
            FileEntry(path=name, size=len(data), is_dir=False)
            for name, data in sorted(self._phys.files.items())
            if name.startswith(prefix)
        ]


def _confine(path: str) -> None:
    if path.startswith("/") or ".." in path.split("/"):
        raise PermissionError(f"{path!r} escapes the workspace")


class FakeBackend(SandboxBackend):
    """An in-memory :class:`~structenv.abc.SandboxBackend` with fault injection.

    Args:
        hosts: Number of fake hosts.
        slots_per_host: Slots on each host.
        exec_latency: Seconds every non-instant command takes on top of its own sleeps.
        acquire_latency: Seconds :meth:`acquire_slot` takes.
        reset_latency: Seconds a reset takes.
        fail_reset: Called with the slot id before each reset; return ``True`` to make the
            reset fail (the slot must then be destroyed, never reused).
        hang_reset: Like ``fail_reset`` but the reset hangs forever (until the pool's
            release deadline cancels it).
        handler: Replaces the command interpreter.
    """

    def __init__(
        self,
        *,
        hosts: int = 1,
        slots_per_host: int = 4,
        exec_latency: float = 0.0,
        acquire_latency: float = 0.0,
        reset_latency: float = 0.0,
        fail_reset: Callable[[str], bool] | None = None,
        hang_reset: Callable[[str], bool] | None = None,
        handler: ExecHandler | None = None,
    ) -> None:
        if hosts < 1 or slots_per_host < 1:
            raise ValueError("hosts and slots_per_host must be >= 1")
        self._hosts = hosts
        self._slots_per_host = slots_per_host
        self.exec_latency = exec_latency
        self.acquire_latency = acquire_latency
        self.reset_latency = reset_latency
        self.fail_reset = fail_reset
        self.hang_reset = hang_reset
        self.handler = handler
        self.acquires = 0
        self.releases = 0
        self.execs = 0
        self.resets = 0
        self.ends = 0
        self.resets_failed = 0
        self.destroyed = 0
        self.started = False
        self.closed = False
        self._free: deque[_PhysicalSlot] = deque()
        self._leased: set[_PhysicalSlot] = set()
        self._slot_freed = anyio.Event()
        self._serial = 0

    # -- lifecycle -------------------------------------------------------------------------
    async def _start(self) -> None:
        await anyio.lowlevel.checkpoint()
        for h in range(self._hosts):
            for s in range(self._slots_per_host):
                self._free.append(_PhysicalSlot(id=f"fake{h}/{s}", host_id=f"fake{h}"))
        self.started = True

    async def aclose(self) -> None:
        """Destroy every slot. Idempotent. Cancellation: nothing to await; always complete."""
        self.closed = True
        for phys in (*self._free, *self._leased):
            phys.kill_all()
            phys.destroyed = True
        self._free.clear()
        await anyio.lowlevel.checkpoint_if_cancelled()

    @property
    def capacity(self) -> int:
        return self._hosts * self._slots_per_host

    def statistics(self) -> BackendStatistics:
        return BackendStatistics(
            hosts=self._hosts if self.started and not self.closed else 0,
            capacity=self.capacity,
            leased=len(self._leased),
            acquires=self.acquires,
            releases=self.releases,
            resets_failed=self.resets_failed,
            destroyed=self.destroyed,
        )

    # -- slots -----------------------------------------------------------------------------
    async def acquire_slot(self, spec: SandboxSpec | None = None) -> FakeSlot:
        """Lease a free fake slot (default spec only). Cancellation: nothing is leased."""
        if spec is not None:
            await self.prepare_spec(spec)
        if not self.started or self.closed:
            raise BackendError("FakeBackend is not running")
        if self.acquire_latency:
            await anyio.sleep(self.acquire_latency)
        else:
            await anyio.lowlevel.checkpoint()
        while not self._free:
            await self._slot_freed.wait()
        # Synchronous from here on: the lease is recorded atomically with the pop.
        phys = self._free.popleft()
        self._leased.add(phys)
        self.acquires += 1
        return FakeSlot(self, phys)

    async def release_slot(self, slot: Slot, *, reusable: bool) -> None:
        """Reset (or destroy) and return the slot. Cancellation: the slot is destroyed."""
        assert isinstance(slot, FakeSlot)
        phys = slot._phys
        if phys not in self._leased:
            raise BackendError(f"{slot!r} released twice or never leased")
        self.releases += 1
        ok = False
        try:
            if reusable and not phys.destroyed and slot.lease == phys.generation:
                try:
                    await self._reset(phys)
                    ok = True
                except BackendError:
                    self.resets_failed += 1
        finally:
            # Bookkeeping must finish even when the reset was cancelled (quarantine).
            self._leased.discard(phys)
            if ok:
                self._free.append(phys)
            else:
                self._replace(phys)
            self._slot_freed.set()
            self._slot_freed = anyio.Event()

    def _replace(self, phys: _PhysicalSlot) -> None:
        phys.kill_all()
        phys.destroyed = True
        self.destroyed += 1
        if not self.closed:
            self._serial += 1
            fresh = _PhysicalSlot(
                id=phys.id, host_id=phys.host_id, generation=phys.generation + 1_000_000
            )
            self._free.append(fresh)

    async def _reset(self, phys: _PhysicalSlot) -> None:
        self.resets += 1
        phys.kill_all()
        if self.hang_reset is not None and self.hang_reset(phys.id):
            await anyio.sleep(math.inf)
        if self.reset_latency:
            await anyio.sleep(self.reset_latency)
        else:
            await anyio.lowlevel.checkpoint()
        if self.fail_reset is not None and self.fail_reset(phys.id):
            raise BackendError(f"injected reset failure on {phys.id}")
        phys.files.clear()
        phys.generation += 1

    # -- execution -------------------------------------------------------------------------
    def _instant(self, request: ExecRequest) -> ExecResult | None:
        if self.handler is None and not self.exec_latency and request.command in ("true", "noop"):
            return _OK
        return None

    async def exec_batch(
        self, calls: Sequence[tuple[Slot, ExecRequest]], on_result: ResultCallback
    ) -> None:
        """Instant commands answer inline; the rest run concurrently (see base class)."""
        slow: list[tuple[int, Slot, ExecRequest]] = []
        for i, (slot, request) in enumerate(calls):
            assert isinstance(slot, FakeSlot)
            result = self._instant(request)
            if result is None:
                slow.append((i, slot, request))
                continue
            try:
                slot._check()
            except Exception as exc:
                on_result(i, exc)
                continue
            self.execs += 1
            on_result(i, result)
        if not slow:
            await anyio.lowlevel.checkpoint()
            return
        await super().exec_batch(
            [(slot, request) for _, slot, request in slow],
            lambda j, result: on_result(slow[j][0], result),
        )

    async def _run(self, slot: FakeSlot, request: ExecRequest) -> ExecResult:
        phys = slot._phys
        start = anyio.current_time()
        scope = anyio.CancelScope()
        phys.running.add(scope)
        out: list[bytes] = []
        code = 0
        result: ExecResult | None = None
        try:
            with scope, anyio.move_on_after(request.timeout) as deadline:
                if self.exec_latency:
                    await anyio.sleep(self.exec_latency)
                if self.handler is not None:
                    result = await self.handler(slot, request)
                else:
                    code = await self._interpret(phys, request.command, out)
        finally:
            phys.running.discard(scope)
        ended = scope in phys.ended
        phys.ended.discard(scope)
        duration = anyio.current_time() - start
        if deadline.cancelled_caught:
            return ExecResult(
                exit_code=None,
                signal=9,
                timed_out=True,
                duration=duration,
                stdout=b"".join(out),
                sandboxed=True,
            )
        if scope.cancelled_caught:
            return ExecResult(
                exit_code=None,
                signal=9,
                duration=duration,
                stdout=b"".join(out),
                sandboxed=True,
                error="the slot's processes were ended" if ended else None,
            )
        if result is not None:
            return result
        stdout = b"".join(out)
        truncated = len(stdout) > request.max_output
        return ExecResult(
            exit_code=code,
            stdout=stdout[: request.max_output],
            stdout_truncated=truncated,
            duration=duration,
            sandboxed=True,
        )

    async def _interpret(self, phys: _PhysicalSlot, command: str, out: list[bytes]) -> int:
        await anyio.lowlevel.checkpoint()
        for part in command.split(";"):
            word, _, rest = part.strip().partition(" ")
            if word in ("", "true", "noop"):
                continue
            if word == "echo":
                out.append(rest.encode() + b"\n")
            elif word == "exit":
                return int(rest)
            elif word == "sleep":
                await anyio.sleep(float(rest))
            elif word == "hang":
                await anyio.sleep(math.inf)
            elif word == "write":
                path, _, text = rest.partition(" ")
                phys.files[path] = text.encode()
            elif word == "cat":
                if rest not in phys.files:
                    out.append(f"cat: {rest}: No such file\n".encode())
                    return 1
                out.append(phys.files[rest])
            elif word == "broken":
                raise SlotBrokenError(f"injected fault on {phys.id}")
            else:
                out.append(f"{word}: command not found\n".encode())
                return 127
        return 0

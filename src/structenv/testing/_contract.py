"""The backend contract suite: ``await check_backend(factory)`` for any backend.

Every backend (fake, local, docker, nomad, modal) must pass it; a new backend's first test is::

    @pytest.mark.anyio
    async def test_contract():
        await check_backend(lambda: MyBackend(...))

Each check gets a fresh backend from ``factory`` and a deadline, so a hang is a failure.
Commands are limited to what both bash and the fake's mini-language understand.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Awaitable, Callable, Collection, Sequence

import anyio
import anyio.lowlevel
import anyio.to_thread

from .._config import ExecutorConfig
from .._exceptions import SandboxUnavailableError, SlotBrokenError, StaleLeaseError
from .._spec import SandboxSpec
from .._types import ExecRequest, ExecResult
from ..abc import BackendStatistics, FileEntry, ResultCallback, SandboxBackend, Slot

__all__ = ["BackendFactory", "check_backend"]

BackendFactory = Callable[[], SandboxBackend]
_Check = Callable[[SandboxBackend], Awaitable[None]]


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _balanced(backend: SandboxBackend) -> None:
    stats = backend.statistics()
    _expect(stats.leased == 0, f"slots still leased: {stats}")
    _expect(stats.acquires == stats.releases, f"acquires != releases: {stats}")


async def _lifecycle(backend: SandboxBackend) -> None:
    stats = backend.statistics()
    _expect(backend.capacity >= 1, "capacity must be >= 1 once started")
    _expect(stats.hosts >= 1, f"no host running after start: {stats}")


async def _pairing(backend: SandboxBackend) -> None:
    slots = [await backend.acquire_slot() for _ in range(backend.capacity)]
    _expect(len({s.id for s in slots}) == len(slots), "two leases share one slot")
    _expect(backend.statistics().leased == len(slots), "leased count is wrong")
    for slot in slots:
        await backend.release_slot(slot, reusable=True)
    _balanced(backend)


async def _exec_is_data(backend: SandboxBackend) -> None:
    slot = await backend.acquire_slot()
    try:
        ok = await slot.exec(ExecRequest("echo hello", timeout=10))
        _expect(ok.exit_code == 0 and b"hello" in ok.stdout, f"echo failed: {ok}")
        failed = await slot.exec(ExecRequest("exit 3", timeout=10))
        _expect(failed.exit_code == 3 and failed.error is None, f"exit 3 not data: {failed}")
        _expect(ok.sandboxed == slot.sandboxed, "result's sandboxed flag disagrees with slot")
    finally:
        with anyio.move_on_after(30, shield=True):
            await backend.release_slot(slot, reusable=True)
    _balanced(backend)


async def _files(backend: SandboxBackend) -> None:
    slot = await backend.acquire_slot()
    try:
        payload = b"\x00\xff binary \xc3\x28 data\n"
        await slot.write_file("dir/data.bin", payload)
        _expect(await slot.read_file("dir/data.bin") == payload, "binary round trip failed")
        names = [e.path for e in await slot.list_files(".")]
        _expect(any(n.endswith("data.bin") for n in names), f"list_files misses it: {names}")
        for bad in ("../escape", "/etc/passwd"):
            try:
                await slot.write_file(bad, b"x")
            except PermissionError:
                pass
            else:
                raise AssertionError(f"write to {bad!r} was not refused")
        try:
            await slot.read_file("missing-file")
        except FileNotFoundError:
            pass
        else:
            raise AssertionError("reading a missing file did not raise FileNotFoundError")
    finally:
        with anyio.move_on_after(30, shield=True):
            await backend.release_slot(slot, reusable=True)
    _balanced(backend)


async def _reset_and_stale_lease(backend: SandboxBackend) -> None:
    slot = await backend.acquire_slot()
    await slot.write_file("left-behind.txt", b"secret")
    await slot.reset()
    names = [e.path for e in await slot.list_files(".")]
    _expect(names == [], f"reset left files behind: {names}")
    old_lease = slot.lease
    await backend.release_slot(slot, reusable=True)
    # The handle is now stale: it must not reach whoever holds the slot next.
    stale = slot
    _expect(stale.lease == old_lease, "release must not rewrite the old handle's lease")
    for op in ("exec", "end_processes", "reset"):
        try:
            if op == "exec":
                await stale.exec(ExecRequest("echo stale", timeout=5))
            elif op == "end_processes":
                await stale.end_processes()
            else:
                await stale.reset()
        except (StaleLeaseError, SlotBrokenError):
            pass
        else:
            raise AssertionError(f"stale {op} after release was not refused")
    _balanced(backend)


async def _end_processes(backend: SandboxBackend) -> None:
    # A running command is ended with an error; the workspace, the lease and the slot stay.
    slot = await backend.acquire_slot()
    try:
        if not slot.sandboxed:
            try:
                await slot.end_processes()
            except SandboxUnavailableError:
                return
            raise AssertionError("an unsandboxed slot claimed to end its processes")
        await slot.write_file("kept.txt", b"kept")
        lease = slot.lease
        _expect(await slot.end_processes() == [], "an idle slot has survivors")
        results: list[ExecResult] = []

        async def run() -> None:
            results.append(await slot.exec(ExecRequest("sleep 30", timeout=60)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            # Until the command is seen running (an end that came first finds nothing).
            while not results:
                left = await slot.end_processes()
                _expect(left == [], f"processes survived end_processes: {left}")
        (ended,) = results
        _expect(
            ended.exit_code is None and ended.error is not None,
            f"a running command was not ended with an error: {ended}",
        )
        _expect(slot.lease == lease, "end_processes changed the lease")
        _expect(await slot.read_file("kept.txt") == b"kept", "end_processes touched files")
        alive = await slot.exec(ExecRequest("echo alive", timeout=10))
        _expect(alive.exit_code == 0, f"slot unusable after end_processes: {alive}")
    finally:
        with anyio.move_on_after(30, shield=True):
            await backend.release_slot(slot, reusable=True)
    _balanced(backend)


async def _deadline_is_data(backend: SandboxBackend) -> None:
    slot = await backend.acquire_slot()
    try:
        start = anyio.current_time()
        result = await slot.exec(ExecRequest("sleep 30", timeout=0.3))
        took = anyio.current_time() - start
        _expect(result.timed_out and result.exit_code is None, f"not timed out: {result}")
        _expect(took < 10, f"deadline of 0.3 s took {took:.1f} s")
    finally:
        with anyio.move_on_after(30, shield=True):
            await backend.release_slot(slot, reusable=True)
    _balanced(backend)


async def _cancelled_exec(backend: SandboxBackend) -> None:
    slot = await backend.acquire_slot()
    try:
        with anyio.move_on_after(0.2):
            await slot.exec(ExecRequest("sleep 30", timeout=60))
            raise AssertionError("sleep 30 finished inside 0.2 s")
        slot.reusable = False
    finally:
        with anyio.move_on_after(30, shield=True):
            await backend.release_slot(slot, reusable=slot.reusable)
    _balanced(backend)
    # The backend must still serve: the destroyed slot's capacity comes back.
    again = [await backend.acquire_slot() for _ in range(backend.capacity)]
    result = await again[0].exec(ExecRequest("echo alive", timeout=10))
    _expect(result.exit_code == 0, f"backend unusable after a cancelled exec: {result}")
    for s in again:
        await backend.release_slot(s, reusable=True)
    _balanced(backend)


async def _cancelled_acquire(backend: SandboxBackend) -> None:
    held = [await backend.acquire_slot() for _ in range(backend.capacity)]
    with anyio.move_on_after(0.2) as scope:
        extra = await backend.acquire_slot()
        raise AssertionError(f"acquired {extra!r} beyond capacity")
    _expect(scope.cancelled_caught, "acquire beyond capacity did not wait")
    _expect(backend.statistics().leased == len(held), "cancelled acquire leaked a slot")
    for s in held:
        await backend.release_slot(s, reusable=True)
    _balanced(backend)


async def _batch_streams(backend: SandboxBackend) -> None:
    held: list[Slot] = [await backend.acquire_slot() for _ in range(backend.capacity)]
    # One batch is the calls of one host (the batcher groups them): two slots of one host
    # if there are, else one slot twice.
    first = held[0]
    slots = [first, next((s for s in held[1:] if s.host_id == first.host_id), first)]
    order: list[int] = []
    results: dict[int, ExecResult | Exception] = {}

    def on_result(i: int, result: ExecResult | Exception) -> None:
        order.append(i)
        results[i] = result

    try:
        calls = [(slots[0], ExecRequest("sleep 1", timeout=10))]
        calls += [(slots[-1], ExecRequest(f"exit {n}", timeout=10)) for n in (0, 5)]
        await backend.exec_batch(calls, on_result)
        _expect(order[-1] == 0, f"the slow call held back fast ones: order {order}")
        codes = [
            r.exit_code if isinstance(r, ExecResult) else r for _, r in sorted(results.items())
        ]
        _expect(codes == [0, 0, 5], f"wrong batch results: {codes}")
    finally:
        with anyio.move_on_after(30, shield=True):
            for s in held:
                await backend.release_slot(s, reusable=True)
    _balanced(backend)


class _StubbornSlot(Slot):
    """Wraps a slot; its exec blocks in a worker thread that cancellation cannot interrupt."""

    __slots__ = ("_gate", "_limiter", "inner")

    def __init__(self, inner: Slot, gate: threading.Event) -> None:
        super().__init__(
            id=inner.id, host_id=inner.host_id, lease=inner.lease, sandboxed=inner.sandboxed
        )
        self.inner = inner
        self._gate = gate
        self._limiter = anyio.CapacityLimiter(4)

    async def exec(self, request: ExecRequest) -> ExecResult:
        # What docs/adding-a-backend.md recommends for a blocking SDK: a worker thread. The
        # thread is not cancellable; it ends when the check opens the gate.
        await anyio.to_thread.run_sync(self._gate.wait, 60, limiter=self._limiter)
        return ExecResult(exit_code=0, stdout=b"late\n", sandboxed=self.sandboxed)

    async def reset(self) -> None:
        await self.inner.reset()

    async def end_processes(self) -> list[int]:
        return await self.inner.end_processes()

    async def read_file(self, path: str, *, max_bytes: int = 1 << 20) -> bytes:
        return await self.inner.read_file(path, max_bytes=max_bytes)

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        await self.inner.write_file(path, data, mode=mode)

    async def list_files(self, path: str = ".") -> list[FileEntry]:
        return await self.inner.list_files(path)


class BorrowedBackend(SandboxBackend):
    """A started backend lent to code that enters and closes backends (a contract check, a
    fixture shared by several tests): entering and closing it do nothing, everything else
    goes to ``inner``, which its owner keeps open and closes.

    ``check_backend(lambda: BorrowedBackend(started), skip={"lifecycle", "idempotent_close"})``
    runs the checks that need no fresh backend against one started backend.
    """

    def __init__(self, inner: SandboxBackend) -> None:
        self.inner = inner
        self.cancellable_exec = inner.cancellable_exec

    async def _start(self) -> None:
        await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await anyio.lowlevel.checkpoint()

    @property
    def capacity(self) -> int:
        return self.inner.capacity

    @property
    def sandboxed(self) -> bool:
        return self.inner.sandboxed

    @property
    def allow_network(self) -> bool:
        return self.inner.allow_network

    async def prepare_spec(self, spec: SandboxSpec) -> None:
        await self.inner.prepare_spec(spec)

    async def acquire_slot(self, spec: SandboxSpec | None = None) -> Slot:
        return await self.inner.acquire_slot(spec)

    async def release_slot(self, slot: Slot, *, reusable: bool) -> None:
        await self.inner.release_slot(slot, reusable=reusable)

    async def exec_batch(
        self, calls: Sequence[tuple[Slot, ExecRequest]], on_result: ResultCallback
    ) -> None:
        await self.inner.exec_batch(calls, on_result)

    def statistics(self) -> BackendStatistics:
        return self.inner.statistics()


class _StubbornBackend(BorrowedBackend):
    """The backend under test, with every exec stuck in a thread; declares it."""

    def __init__(self, inner: SandboxBackend, gate: threading.Event) -> None:
        super().__init__(inner)
        self.cancellable_exec = False
        self.gate = gate
        self.released: list[bool] = []

    async def acquire_slot(self, spec: SandboxSpec | None = None) -> Slot:
        return _StubbornSlot(await self.inner.acquire_slot(spec), self.gate)

    async def release_slot(self, slot: Slot, *, reusable: bool) -> None:
        assert isinstance(slot, _StubbornSlot)
        self.released.append(reusable)
        await self.inner.release_slot(slot.inner, reusable=reusable)

    # Each exec on its own (the ABC's default), through the stubborn slots.
    exec_batch = SandboxBackend.exec_batch


async def _deadline_beats_a_stubborn_exec(backend: SandboxBackend) -> None:
    # The client-side deadline (timeout + tool_deadline_grace) holds even when exec ignores
    # cancellation, on the default (express) lane too: the call returns timed_out at the
    # deadline, not when the thread ends, and the slot is retired, not reset.
    from .._executor import ToolExecutor  # the executor is a layer above the backends

    gate = threading.Event()
    stubborn = _StubbornBackend(backend, gate)
    config = ExecutorConfig(
        tool_deadline_grace=0.2, require_sandbox=False, allow_network=backend.allow_network
    )
    try:
        async with stubborn, ToolExecutor(stubborn, config=config) as executor:
            async with executor.trajectory() as traj:
                start = anyio.current_time()
                result = await traj.exec(ExecRequest("echo late", timeout=0.3))
                took = anyio.current_time() - start
                gate.set()
            _expect(result.timed_out and result.error is not None, f"not timed out: {result}")
            _expect(took < 5, f"a deadline of 0.5 s took {took:.1f} s: it waited for exec")
            _expect(stubborn.released == [False], f"slot not retired: {stubborn.released}")
    finally:
        gate.set()
    _balanced(backend)


async def _idempotent_close(backend: SandboxBackend) -> None:
    await backend.aclose()
    await backend.aclose()


_CHECKS: dict[str, _Check] = {
    "lifecycle": _lifecycle,
    "pairing": _pairing,
    "exec_is_data": _exec_is_data,
    "files": _files,
    "reset_and_stale_lease": _reset_and_stale_lease,
    "end_processes": _end_processes,
    "deadline_is_data": _deadline_is_data,
    "cancelled_exec": _cancelled_exec,
    "cancelled_acquire": _cancelled_acquire,
    "batch_streams": _batch_streams,
    "deadline_beats_a_stubborn_exec": _deadline_beats_a_stubborn_exec,
    "idempotent_close": _idempotent_close,
}


async def check_backend(
    factory: BackendFactory,
    *,
    only: set[str] | None = None,
    skip: Collection[str] = (),
    deadline: float = 60.0,
) -> list[str]:
    """Run the contract suite; return the names of the checks that passed.

    Args:
        factory: Makes a fresh, unstarted backend for each check.
        only: Run just these checks (default: all).
        skip: Leave these checks out. Under a virtual clock, skip
            ``deadline_beats_a_stubborn_exec``: its worker thread runs in real time, and the
            clock jumps past every deadline while the loop waits for it.
        deadline: Seconds each check may take (a hang fails the check).

    Raises:
        AssertionError: A check failed; the message names it.

    Cancellation: the backend under test is closed (its ``__aexit__`` is shielded).
    """
    passed: list[str] = []
    for name, check in _CHECKS.items():
        if (only is not None and name not in only) or name in skip:
            continue
        try:
            with anyio.fail_after(deadline if math.isfinite(deadline) else None):
                async with factory() as backend:
                    await check(backend)
        except AssertionError as exc:
            raise AssertionError(f"backend contract check {name!r} failed: {exc}") from exc
        except TimeoutError as exc:
            raise AssertionError(f"backend contract check {name!r} hung") from exc
        passed.append(name)
    return passed

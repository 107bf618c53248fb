"""SlotPool: the one code path that leases and releases sandbox slots."""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio

from ._exceptions import ConfigError, SlotAcquireTimeout
from .abc import SandboxBackend, Slot

if TYPE_CHECKING:
    from ._spec import SandboxSpec

__all__ = ["PoolStatistics", "SlotPool"]

log = logging.getLogger("structenv.pool")


@dataclasses.dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of a :class:`SlotPool`.

    Attributes:
        size: Slots the pool may lease at once.
        in_use: Slots leased right now (between acquire and the end of release).
        waiting: Tasks queued for a slot.
        available: Free permits (``size - in_use`` whenever no acquire is half-way).
        acquired: Total slots handed out.
        released: Total slots given back (every acquire is paired with one release).
        quarantined: Releases whose reset failed or timed out: a fault; the slot is destroyed.
        discarded: Releases of slots marked not reusable (a call cancelled mid-command, a
            timed-out or broken call): destroyed instead of reset, by design, not a fault.
        acquire_timeouts: Acquires that gave up at the deadline.
    """

    size: int
    in_use: int
    waiting: int
    available: int
    acquired: int
    released: int
    quarantined: int
    discarded: int
    acquire_timeouts: int


class _Waiter:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.granted = False


class SlotPool:
    """Leases slots from a backend with FIFO fairness, a real deadline and guaranteed release.

    Args:
        backend: A started backend.
        size: Maximum slots leased at once (default: the backend's capacity; never more).
        acquire_timeout: Seconds a caller may wait for a slot before
            :class:`~structenv.SlotAcquireTimeout`.
        release_timeout: Seconds a release (reset) may take; past it the slot is quarantined.
    """

    def __init__(
        self,
        backend: SandboxBackend,
        *,
        size: int | None = None,
        acquire_timeout: float = 60.0,
        release_timeout: float = 30.0,
    ) -> None:
        capacity = backend.capacity
        if size is None:
            size = capacity
        if size < 1:
            raise ConfigError(f"pool size must be >= 1, got {size}")
        if size > capacity:
            raise ConfigError(f"pool size {size} exceeds the backend's capacity {capacity}")
        if not acquire_timeout > 0 or not release_timeout > 0:
            raise ConfigError("acquire_timeout and release_timeout must be > 0")
        self._backend = backend
        self._size = size
        self._acquire_timeout = acquire_timeout
        self._release_timeout = release_timeout
        self._free = size
        self._waiters: deque[_Waiter] = deque()
        self._in_use = 0
        self._acquired = 0
        self._released = 0
        self._quarantined = 0
        self._discarded = 0
        self._acquire_timeouts = 0

    @property
    def backend(self) -> SandboxBackend:
        """The backend the slots come from."""
        return self._backend

    def statistics(self) -> PoolStatistics:
        """A snapshot of the pool's counters."""
        return PoolStatistics(
            size=self._size,
            in_use=self._in_use,
            waiting=len(self._waiters),
            available=self._free,
            acquired=self._acquired,
            released=self._released,
            quarantined=self._quarantined,
            discarded=self._discarded,
            acquire_timeouts=self._acquire_timeouts,
        )

    @asynccontextmanager
    async def slot(self, spec: SandboxSpec | None = None) -> AsyncIterator[Slot]:
        """Lease a slot of ``spec`` (default: the backend's) for the duration of the block.

        Waits in FIFO order for at most ``acquire_timeout`` seconds, then raises
        :class:`~structenv.SlotAcquireTimeout`. On exit the slot is released exactly once,
        under a shield and within ``release_timeout``: reset when ``slot.reusable``,
        destroyed otherwise or when the reset fails or overruns (quarantine).

        Slots of every spec share the pool's permits, its FIFO queue and its deadline; the
        backend keeps warm slots per spec and never hands a slot of one spec to another.

        Cancellation: cancelled while waiting, nothing is leased and the queue position is
        given up; cancelled inside the block, the slot is still released before the
        cancellation propagates.
        """
        if spec is not None and not spec.is_default:
            # Outside the acquire deadline: a first use may build or export an image.
            await self._backend.prepare_spec(spec)
        slot = await self._acquire(spec)
        try:
            yield slot
        finally:
            await self._release(slot)

    async def _acquire(self, spec: SandboxSpec | None) -> Slot:
        start = anyio.current_time()
        permit = False
        slot: Slot | None = None
        try:
            with anyio.move_on_after(self._acquire_timeout):
                await self._take_permit()
                permit = True
                if spec is None or spec.is_default:
                    slot = await self._backend.acquire_slot()
                else:
                    slot = await self._backend.acquire_slot(spec)
            if slot is None:
                self._acquire_timeouts += 1
                raise SlotAcquireTimeout(
                    pool_size=self._size,
                    in_use=self._in_use,
                    waiters=len(self._waiters) + 1,
                    waited=anyio.current_time() - start,
                )
        except BaseException:
            if permit and slot is None:
                self._give_permit()
            raise
        self._in_use += 1
        self._acquired += 1
        return slot

    async def _take_permit(self) -> None:
        # Cancellation is checked before the permit is taken and never after (trio's
        # checkpoint idiom), so a cancelled acquire can never hold a permit.
        await anyio.lowlevel.checkpoint_if_cancelled()
        if self._free and not self._waiters:
            self._free -= 1
            await anyio.lowlevel.cancel_shielded_checkpoint()
            return
        waiter = _Waiter()
        self._waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                # Granted and cancelled in the same instant: hand the permit on.
                self._give_permit()
            else:
                self._waiters.remove(waiter)
            raise

    def _give_permit(self) -> None:
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.granted = True
            waiter.event.set()
        else:
            self._free += 1

    async def _release(self, slot: Slot) -> None:
        reusable = slot.reusable
        finished = False
        try:
            with anyio.move_on_after(self._release_timeout, shield=True):
                await self._backend.release_slot(slot, reusable=reusable)
                finished = True
        finally:
            if not finished:
                self._quarantined += 1
                log.warning("release of %r failed or overran; slot quarantined", slot)
            elif not reusable:
                self._discarded += 1
            self._in_use -= 1
            self._released += 1
            self._give_permit()

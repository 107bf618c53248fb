"""HostedBackend: the slot bookkeeping shared by every backend whose hosts run the sandbox server.

Local processes, Docker containers, Nomad allocations and Modal sandboxes all run the same
sandbox server (``python -m structenv.sandbox``) and differ only in how one host is started,
watched and stopped. This module owns everything else: hosts -> slots bookkeeping, leasing,
reset/destroy on release, broken-host handling (a dead host's in-flight calls fail at once
through :meth:`HostClient.abort`), one streamed ``exec_batch`` request per batch (the batcher
groups calls per host), health checks, scaling
between ``min_hosts`` and ``max_hosts`` through a creation limiter, and statistics.

A subclass implements :meth:`HostedBackend._launch_host` (start ONE host, wait until it
serves, return its :class:`Host`) and :meth:`HostedBackend._stop_host`, plus optional hooks.
Bookkeeping is synchronous (it cannot be interrupted half-way); I/O comes after.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Self

import anyio
import anyio.abc

from .._exceptions import BackendError, ConfigError, SandboxUnavailableError, SlotBrokenError
from .._spec import SandboxSpec
from .._types import ExecRequest, ExecResult
from ..abc import BackendStatistics, ResultCallback, SandboxBackend, Slot, SpecStatistics
from ..sandbox._client import HostClient, RemoteSlot, error_from_response, stream_batch
from ..sandbox._runtime import DEFAULT_SPEC, SlotSpec
from ._options import HostedOptions

__all__ = ["Host", "HostedBackend", "SlotState"]

logger = logging.getLogger("structenv.backends")


@dataclasses.dataclass(slots=True, eq=False)
class SlotState:
    """One slot of a host as the backend sees it."""

    index: int
    lease: int
    state: str = "free"  # free | leased | resetting | broken
    spec: str = ""  # key of the spec the slot's sandbox is built from ("": the default)
    used: float = 0.0  # when it was last leased (LRU: the coldest slot changes spec first)


@dataclasses.dataclass(eq=False, kw_only=True)
class Host:
    """One running sandbox server; subclasses add what they need to stop it."""

    id: str
    client: HostClient
    sandboxed: bool
    slots: list[SlotState]
    alive: bool = True
    failures: int = 0
    idle_since: float = 0.0


class HostedBackend(SandboxBackend):
    """Hosts running the sandbox server, each serving ``slots_per_host`` slots.

    Args:
        options: The host-pool options (:class:`~structenv.backends.HostedOptions` or a
            subclass: slots per host, min/max hosts, creation limits, timeouts).
    """

    #: Name used in messages ("container", "allocation", ...).
    host_noun = "host"

    def __init__(self, options: HostedOptions) -> None:
        self.options = options
        self._slots_per = options.slots_per_host
        self._min = options.min_hosts
        self._max = options.host_bound
        self._require_sandbox = options.require_sandbox
        self._create_limiter = anyio.CapacityLimiter(options.creation_concurrency)
        #: Blocking host-side file and cgroup work (work dirs, rmtree, cgroup setup): its own
        #: threads, so a slow teardown never starves the SDK calls or a spec export.
        self._fs_limiter = anyio.CapacityLimiter(4)
        #: Rootfs exports and spec resolution (image builds, ``docker export``): heavy on
        #: disk and CPU, two at a time (a cached one is quick).
        self._spec_limiter = anyio.CapacityLimiter(2)
        self._create_interval = 1.0 / options.creation_rate
        self._next_create = 0.0
        self.idle_timeout = options.idle_timeout
        self.health_interval = options.health_interval
        self.health_timeout = options.health_timeout
        self.start_timeout = options.start_timeout
        self.reset_timeout = options.reset_timeout
        self._hosts: dict[str, Host] = {}
        self._creating: set[anyio.CancelScope] = set()
        self._spawning = 0  # background creations scheduled (counted before they start)
        self._changed = anyio.Event()
        self._check_now = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._closed = False
        self._failure: BaseException | None = None
        self._backoff_until = 0.0
        self._backoff = 0.0
        self._waiters = 0
        self._stats = {"acquires": 0, "releases": 0, "leased": 0, "resets_failed": 0}
        self._stats.update(destroyed=0, hosts_replaced=0, created=0, removed=0, scaled_down=0)
        #: Resolved specs by key; a key is present only once its preparation completed.
        self._specs: dict[str, SlotSpec] = {"": DEFAULT_SPEC}
        self._spec_labels: dict[str, str] = {"": "default"}
        self._spec_locks: dict[str, anyio.Lock] = {}
        #: spec key -> (attempts made, the last attempt's error if it failed)
        self._spec_attempts: dict[str, tuple[int, ConfigError | None]] = {}
        self._spec_stats: dict[str, dict[str, float]] = {}

    # -- subclass hooks -------------------------------------------------------------------

    async def _prepare(self) -> None:
        """Before the first host: connect to the control plane, reap, make directories."""

    @abstractmethod
    async def _launch_host(self) -> Host:
        """Start ONE host and wait until it serves (see :meth:`probe_host`).

        Cancellation: the half-started host is stopped and nothing of it remains.
        """

    async def _resolve_spec(self, spec: SandboxSpec) -> SlotSpec:
        """Turn a spec into what the hosts build slots from (export images, check binds).

        The default supports what every host can do by itself: environment, ``PATH``,
        working directory and limits. Backends that can give hosts a root filesystem or
        binds override it.

        Raises:
            ConfigError: The spec cannot be used here.
        """
        for what in ("image", "dockerfile", "rootfs", "binds"):
            if getattr(spec, what):
                raise ConfigError(f"{type(self).__name__} does not support a spec's {what}")
        return plain_slot_spec(spec)

    @abstractmethod
    async def _stop_host(self, host: Host) -> None:
        """Stop a retired host and remove what it left (never raises ordinary errors)."""

    async def _finish(self) -> None:
        """After every host is stopped: sweep leftovers, close control-plane clients."""

    async def _launch_first(self) -> Host:
        """Start the first host (override to fall back to unsandboxed hosts when allowed)."""
        return await self._launch_host()

    async def _wait_exit(self, host: Host) -> None:
        """Return when ``host`` is known to have died (used when :attr:`_watch_hosts`)."""
        await anyio.sleep_forever()

    #: Start a :meth:`_wait_exit` watcher per host (for hosts whose death can be awaited).
    _watch_hosts = False

    def _accepting(self, host: Host) -> bool:
        """Whether new leases may go to ``host`` (e.g. it has enough lifetime left)."""
        return True

    def _idle_victims(self, idle: list[Host], excess: int) -> list[Host]:
        """Which idle hosts to stop when scaling down (default: idle the longest)."""
        return sorted(idle, key=lambda h: h.idle_since)[:excess]

    async def _host_removed(self, host: Host, *, scaled_down: bool) -> None:
        """Called (instead of nothing) before :meth:`_stop_host`, e.g. to shrink a job."""

    # -- properties -----------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._max * self._slots_per

    def statistics(self) -> BackendStatistics:
        live = [h for h in self._hosts.values() if h.alive]
        specs: dict[str, SpecStatistics] = {}
        for key, label in self._spec_labels.items():
            c = self._spec_stats.get(key, {})
            states = [st.state for h in live for st in h.slots if st.spec == key]
            specs[label] = SpecStatistics(
                hits=int(c.get("hits", 0)),
                misses=int(c.get("misses", 0)),
                cold_starts=int(c.get("cold_starts", 0)),
                warm=states.count("free"),
                leased=states.count("leased"),
                prepare_seconds=c.get("prepare_seconds", 0.0),
            )
        s = self._stats
        return BackendStatistics(
            hosts=len(live),
            capacity=sum(1 for h in live for slot in h.slots if slot.state != "broken"),
            leased=s["leased"],
            acquires=s["acquires"],
            releases=s["releases"],
            resets_failed=s["resets_failed"],
            destroyed=s["destroyed"],
            hosts_replaced=s["hosts_replaced"],
            specs=specs,
        )

    def scaling_statistics(self) -> dict[str, int]:
        """Hosts created, removed, scaled down for idleness, being created now."""
        s = self._stats
        return {
            "created": s["created"],
            "removed": s["removed"],
            "scaled_down": s["scaled_down"],
            "creating": max(len(self._creating), self._spawning),
        }

    # -- lifecycle ------------------------------------------------------------------------

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncIterator[Self]:
        # The maintenance task group encloses the ``async with`` body; it is cancelled (and
        # shielded from outer cancellation, so the exit is prompt and complete) only after
        # the base class's shielded aclose() has stopped every host. What the start or the
        # body raised is re-raised after the group, as is: the group would wrap it in an
        # exception group, and the body's errors are not the maintenance tasks' errors.
        raised: BaseException | None = None
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                async with super().__asynccontextmanager__():
                    yield self
            except BaseException as exc:
                raised = exc
            finally:
                self._tg = None
                tg.cancel_scope.shield = True
                tg.cancel_scope.cancel()
        if raised is not None:
            try:
                raise raised
            finally:
                raised = None  # no reference cycle through the traceback

    async def _start(self) -> None:
        if self._tg is None:
            name = type(self).__name__
            raise RuntimeError(f"use {name} as `async with {name}(...) as backend:`")
        await self._prepare()
        first = await self._create(first=True)
        if not first.sandboxed and self._require_sandbox:
            raise SandboxUnavailableError(f"sandbox {self.host_noun} started without isolation")
        async with anyio.create_task_group() as starters:
            for _ in range(self._min - 1):
                starters.start_soon(self._create)
        self._tg.start_soon(self._maintain)

    async def _create(self, *, first: bool = False) -> Host:
        """Start one host through the creation limiter (concurrency + rate) and register it.

        Cancellation: the half-started host is stopped (by :meth:`_launch_host`).
        """
        with anyio.CancelScope() as scope:
            self._creating.add(scope)
            try:
                async with self._create_limiter:
                    now = anyio.current_time()
                    start_at = max(now, self._next_create)
                    self._next_create = start_at + self._create_interval
                    await anyio.sleep(start_at - now)
                    if self._closed:
                        raise BackendError("backend is closed")
                    host = await (self._launch_first() if first else self._launch_host())
                    self._stats["created"] += 1
                    if self._closed:  # aclose() ran meanwhile: it will not see this host
                        with anyio.move_on_after(self.close_grace, shield=True):
                            await self._discard(host)
                        raise BackendError(f"backend closed while starting a {self.host_noun}")
                    host.idle_since = anyio.current_time()
                    self._hosts[host.id] = host
                    self._backoff = 0.0
                    if self._watch_hosts:
                        assert self._tg is not None
                        self._tg.start_soon(self._supervise, host)
                    return host
            finally:
                self._creating.discard(scope)
                self._notify()
        raise BackendError(f"backend closed while starting a {self.host_noun}")

    async def probe_host(
        self, client: HostClient, *, check: Callable[[], Awaitable[None]] | None = None
    ) -> tuple[bool, list[SlotState]]:
        """Poll ``/v1/health`` until the server answers; return ``(sandboxed, slots)``.

        ``check`` runs every half second meanwhile and raises if the host died starting.
        The caller bounds it (``fail_after(start_timeout)``).

        Cancellation: nothing to undo (the caller owns ``client``).
        """
        delay, checked = 0.01, anyio.current_time()
        while True:
            try:
                status, body = await client.request("GET", "/v1/health")
            except anyio.BrokenResourceError:
                pass
            else:
                if status != 200:
                    raise error_from_response(status, body)
                health = json.loads(body)
                slots = [
                    SlotState(s["index"], int(s["lease"]), spec=str(s.get("spec") or ""))
                    for s in health["slots"]
                ]
                return bool(health.get("sandboxed")), slots
            if check is not None and anyio.current_time() - checked > 0.5:
                checked = anyio.current_time()
                await check()
            await anyio.sleep(delay)
            delay = min(delay * 1.5, 0.1)

    async def aclose(self) -> None:
        """Stop every host and everything it runs. Idempotent.

        Cancellation: shielded and bounded by ``close_grace``.
        """
        if self._closed:
            return
        self._closed = True
        self._notify()
        with anyio.move_on_after(self.close_grace, shield=True):
            for scope in list(self._creating):
                scope.cancel()
            while self._creating:  # creations clean up after themselves: let them return
                await self._changed.wait()
            hosts = list(self._hosts.values())
            for host in hosts:
                self._retire(host)
            async with anyio.create_task_group() as tg:
                for host in hosts:
                    tg.start_soon(self._discard, host)
            await self._finish()

    async def _discard(self, host: Host, *, scaled_down: bool = False) -> None:
        await host.client.aclose()
        await self._host_removed(host, scaled_down=scaled_down)
        await self._stop_host(host)
        self._stats["removed"] += 1

    def _retire(self, host: Host) -> None:
        """Forget a host: none of its slots is handed out again; calls in flight on it fail
        with SlotBrokenError at once (synchronous: cannot be interrupted half-way)."""
        host.alive = False
        for s in host.slots:
            if s.state != "leased":
                s.state = "broken"
        host.client.abort()
        self._hosts.pop(host.id, None)
        self._notify()

    def _host_lost(self, host: Host, why: str) -> None:
        if not host.alive or self._closed:
            return
        logger.error("sandbox %s %s is dead (%s); replacing it", self.host_noun, host.id, why)
        self._stats["hosts_replaced"] += 1
        self._retire(host)
        assert self._tg is not None
        self._tg.start_soon(self._discard, host)
        self._scale_up()

    # -- maintenance: supervision, health, scaling ----------------------------------------

    async def _supervise(self, host: Host) -> None:
        await self._wait_exit(host)
        self._host_lost(host, "exited")

    async def _maintain(self) -> None:
        while not self._closed:
            with anyio.move_on_after(self.health_interval):
                await self._check_now.wait()
            self._check_now = anyio.Event()
            async with anyio.create_task_group() as tg:
                for host in list(self._hosts.values()):
                    tg.start_soon(self._health_check, host)
            self._scale_down()
            self._scale_up()

    async def _health_check(self, host: Host) -> None:
        ok = False
        with anyio.move_on_after(self.health_timeout):
            try:
                status, _ = await host.client.request("GET", "/v1/health")
                ok = status == 200
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                host.failures += 1  # refused / reset: the server is gone, count it twice
        if ok:
            host.failures = 0
            return
        host.failures += 1
        if host.failures >= 2:
            self._host_lost(host, "health check failed")

    def _scale_down(self) -> None:
        if self._waiters:
            return
        now = anyio.current_time()
        live = [h for h in self._hosts.values() if h.alive]
        excess = len(live) - self._min
        idle = [
            h
            for h in live
            if all(s.state == "free" for s in h.slots) and now - h.idle_since > self.idle_timeout
        ]
        if excess <= 0 or not idle:
            return
        for host in self._idle_victims(idle, excess):
            logger.info("stopping idle sandbox %s %s", self.host_noun, host.id)
            self._stats["scaled_down"] += 1
            self._retire(host)
            assert self._tg is not None
            self._tg.start_soon(functools.partial(self._discard, host, scaled_down=True))

    def _scale_up(self) -> None:
        """Start creations so running + starting hosts cover demand (>= min, <= max)."""
        if self._closed or self._tg is None or anyio.current_time() < self._backoff_until:
            return
        demand = self._stats["leased"] + self._waiters
        # Hosts not accepting leases (near the end of their lifetime) drain and do not count.
        live = [h for h in self._hosts.values() if h.alive and self._accepting(h)]
        free = sum(1 for h in live for s in h.slots if s.state in ("free", "resetting"))
        target = len(live)
        if self._waiters > free:
            target = max(target, math.ceil(demand / self._slots_per))
        target = min(self._max, max(self._min, target))
        for _ in range(target - len(live) - self._spawning):
            self._spawning += 1
            self._tg.start_soon(self._create_in_background)

    async def _create_in_background(self) -> None:
        try:
            await self._create()
        except Exception as exc:  # a failed start is retried (backoff), never fatal here
            if self._closed:
                return
            logger.error("starting a sandbox %s failed: %r", self.host_noun, exc)
            self._failure = exc
            self._backoff = min(30.0, max(0.5, self._backoff * 2))
            self._backoff_until = anyio.current_time() + self._backoff
        finally:
            self._spawning -= 1
            self._notify()

    # -- slots ----------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _take_free(self, key: str = "") -> RemoteSlot | None:
        best: tuple[int, Host, SlotState] | None = None
        for host in self._hosts.values():
            if not host.alive or not self._accepting(host):
                continue
            free = [s for s in host.slots if s.state == "free" and s.spec == key]
            # Spread across hosts: take from the host with the most free slots.
            if free and (best is None or len(free) > best[0]):
                best = (len(free), host, free[0])
        if best is None:
            return None
        _, host, state = best
        return self._lease(host, state)

    def _lease(self, host: Host, state: SlotState) -> RemoteSlot:
        state.state = "leased"
        state.used = anyio.current_time()
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

    def _take_coldest(self) -> tuple[Host, SlotState] | None:
        """The free slot of any spec leased longest ago (LRU), marked as being rebuilt."""
        best: tuple[float, Host, SlotState] | None = None
        for host in self._hosts.values():
            if not host.alive or not self._accepting(host):
                continue
            for state in host.slots:
                if state.state == "free" and (best is None or state.used < best[0]):
                    best = (state.used, host, state)
        if best is None:
            return None
        _, host, state = best
        state.state = "resetting"
        return host, state

    def _spec_count(self, key: str, what: str, amount: float = 1) -> None:
        counters = self._spec_stats.setdefault(key, {})
        counters[what] = counters.get(what, 0) + amount

    async def prepare_spec(self, spec: SandboxSpec) -> None:
        """Resolve ``spec`` once (build or export its image, check its binds and rootfs).

        Concurrent callers of one spec wait for the first; a failure is not cached (the
        next caller tries again) and leaves nothing half-made. Callers that were waiting for
        an attempt that failed with ``ConfigError`` get its error rather than trying again.

        Raises:
            ConfigError: The spec is unusable here.

        Cancellation: nothing is cached; what a build or export made is removed.
        """
        await self._prepared(spec)

    async def _prepared(self, spec: SandboxSpec | None) -> str:
        if spec is None or spec.is_default:
            return ""
        key = spec.key
        if key in self._specs:
            return key
        lock = self._spec_locks.setdefault(key, anyio.Lock())
        seen, _ = self._spec_attempts.get(key, (0, None))
        async with lock:
            attempts, failed = self._spec_attempts.get(key, (0, None))
            if failed is not None and attempts > seen:
                # An attempt that failed while this caller waited for it: its error, not one
                # more attempt (a group of 16 built a failing Dockerfile 16 times in a row).
                raise ConfigError(str(failed))
            if key not in self._specs:
                start = anyio.current_time()
                try:
                    resolved = await self._resolve_spec(spec)
                except ConfigError as exc:
                    self._spec_attempts[key] = (attempts + 1, exc)
                    raise
                self._spec_attempts.pop(key, None)
                self._specs[key] = dataclasses.replace(resolved, key=key)
                self._spec_labels[key] = spec.label
                self._spec_count(key, "prepare_seconds", anyio.current_time() - start)
        return key

    async def acquire_slot(self, spec: SandboxSpec | None = None) -> Slot:
        """Lease a clean slot of ``spec``; scale up (through the creation limiter) if all
        are busy.

        A warm slot of the spec is a hit. Otherwise the free slot leased longest ago, of
        any spec, is rebuilt for this one (a miss and a cold start: one sandbox start on a
        running host, no new host). A slot's spec changes only in such a rebuild, so a slot
        of one spec is never handed out for another.

        Raises:
            ConfigError: The spec is unusable here (its rootfs has no shell, ...).
            BackendError: The backend is closed, or no host runs and none can be started.

        Cancellation: nothing is leased. A slot being rebuilt for the spec is destroyed
        and rebuilt in the background. A host whose start this call triggered keeps
        starting and joins the backend (stopped on scale-down or close).
        """
        key = await self._prepared(spec)
        self._waiters += 1
        try:
            while True:
                if self._closed:
                    raise BackendError("backend is closed")
                slot = self._take_free(key)
                if slot is not None:
                    self._spec_count(key, "hits")
                    return slot
                coldest = self._take_coldest()
                if coldest is not None:
                    self._spec_count(key, "misses")
                    slot = await self._respec(*coldest, key)
                    if slot is not None:
                        return slot
                    continue
                starting = self._creating or self._spawning
                if self._failure is not None and not self._hosts and not starting:
                    raise BackendError(f"no sandbox {self.host_noun} is running") from (
                        self._failure
                    )
                self._scale_up()
                await self._changed.wait()
        finally:
            self._waiters -= 1

    async def _respec(self, host: Host, state: SlotState, key: str) -> RemoteSlot | None:
        """Rebuild a free slot (marked ``resetting``) for spec ``key`` and lease it.

        Returns ``None`` if the host failed (the slot is rebuilt in the background and the
        caller looks again).

        Raises:
            ConfigError: The spec's sandbox cannot start (the slot keeps its old spec).

        Cancellation: the slot is destroyed and rebuilt in the background.
        """
        spec = self._specs[key].to_wire()
        body = {"slot": state.index, "lease": state.lease, "hard": True, "spec": spec}
        done = False
        try:
            with anyio.fail_after(self.reset_timeout):
                status, data = await host.client.request(
                    "POST", "/v1/reset", json.dumps(body).encode()
                )
            if status == 422:
                reply = json.loads(data)
                state.lease = int(reply["lease"])
                done = True
                self._free(host, state)
                raise ConfigError(str(reply.get("message", "bad sandbox spec")))
            if status != 200:
                raise error_from_response(status, data)
            state.lease = int(json.loads(data)["lease"])
            state.spec = key
            self._spec_count(key, "cold_starts")
            done = True
        except Exception as exc:
            if isinstance(exc, ConfigError):
                raise
            logger.warning("rebuilding %s/%d for a spec failed (%r)", host.id, state.index, exc)
            return None
        finally:
            if not done:
                self._stats["destroyed"] += 1
                if self._tg is not None and not self._closed:
                    self._tg.start_soon(self._destroy, host, state)
                self._check_now.set()
        return self._lease(host, state)

    def _lookup(self, slot: Slot) -> tuple[Host | None, SlotState | None]:
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
            self._notify()
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
            if isinstance(exc, anyio.BrokenResourceError):
                self._check_now.set()  # the host may be dead: check it now
            if not isinstance(exc, Exception):
                raise  # cancellation: never converted
            logger.warning("reset of %s failed (%r); destroying it", slot.id, exc)
            return
        if hard:
            self._stats["destroyed"] += 1
        self._free(host, state)

    def _free(self, host: Host, state: SlotState) -> None:
        if host.alive:
            state.state = "free"
            if all(s.state == "free" for s in host.slots):
                host.idle_since = anyio.current_time()
        self._notify()

    async def _destroy(self, host: Host, state: SlotState) -> None:
        """Rebuild a quarantined slot from scratch (control-plane reset, no lease needed)."""
        body = json.dumps({"slot": state.index, "lease": None, "hard": True}).encode()
        try:
            with anyio.fail_after(self.start_timeout):
                status, data = await host.client.request("POST", "/v1/reset", body)
            if status != 200:
                raise error_from_response(status, data)
            reply = json.loads(data)
            state.lease = int(reply["lease"])
            state.spec = str(reply.get("spec", state.spec))
        except Exception as exc:
            logger.error("slot %s/%d cannot be rebuilt (%r); retired", host.id, state.index, exc)
            state.state = "broken"
            self._check_now.set()
            self._notify()
            return
        self._free(host, state)

    async def exec_batch(
        self, calls: Sequence[tuple[Slot, ExecRequest]], on_result: ResultCallback
    ) -> None:
        """Run calls of one host with one streamed request; results arrive as each finishes.

        Raises:
            ValueError: The calls' slots are on more than one host (the batcher groups them).

        Calls on a host that dies get :class:`~structenv.SlotBrokenError` as soon as the
        backend notices (connection loss, a failed health check or the host's exit).

        Cancellation: the hosts kill every unfinished command; ``on_result`` is not called
        for them.
        """
        if not calls:
            await anyio.lowlevel.checkpoint()
            return
        host_id = calls[0][0].host_id
        if any(slot.host_id != host_id for slot, _ in calls):
            # The batcher groups per host; grouping again here would be a second task group
            # per batch for nothing (one exec shape: one batch, one host, one request).
            raise ValueError("exec_batch takes the slots of one host; the batcher groups them")
        group: list[tuple[int, int, int, ExecRequest]] = []
        host: Host | None = None
        for i, (slot, request) in enumerate(calls):
            host, _ = self._lookup(slot)
            if host is None or not host.alive or not isinstance(slot, RemoteSlot):
                on_result(i, SlotBrokenError(f"slot {slot.id} has no running {self.host_noun}"))
                continue
            group.append((i, slot.index, slot.lease, request))
        if not group or host is None:
            await anyio.lowlevel.checkpoint()
            return

        def deliver(i: int, value: ExecResult | Exception) -> None:
            if isinstance(value, SlotBrokenError):
                self._check_now.set()
            on_result(i, value)

        await stream_batch(host.client, group, deliver)


def plain_slot_spec(spec: SandboxSpec) -> SlotSpec:
    """The parts of ``spec`` every host can apply by itself (no rootfs, no binds)."""
    limits = {k: v for k, v in spec.limits.model_dump().items() if v is not None}
    return SlotSpec(
        key=spec.key,
        env=tuple(sorted(spec.env.items())),
        path_prefix=spec.path,
        workdir=spec.workdir,
        limits=tuple(sorted((k, float(v)) for k, v in limits.items())),
    )

"""RayBackend: sandbox hosts as Ray actors, each running the sandbox server on its node.

Each host is one Ray actor (:class:`~structenv.backends._ray_node.HostActor`). It starts a
cleanup process (:mod:`._ray_supervisor`) that starts ``python -m structenv.sandbox`` on the
actor's node, listening on TCP (the node's Ray IP, a free port) with a per-run bearer token,
and returns the address. From then on Ray is out of the exec path: commands, resets and health
checks go straight to the server through the same client and data plane as every other
backend. ``ray`` is imported only by :mod:`._ray_node`, when a RayBackend starts.

* **Which Ray.** The one this process already uses (``ray.init`` called by the user's job,
  or inside a Ray actor), else ``ray.init(address=...)`` with ``address`` (``"auto"``,
  ``HOST:PORT``, ``ray://HOST:PORT``; ``None``: a local Ray). A Ray this backend did not
  start is never shut down; one it started is shut down on close.
* **Lifetime.** Host actors are non-detached by default: owned by whoever entered the
  backend (a driver, or an actor of the user's job), they die with it, and a host's cleanup
  process (whose stdin is a pipe from the actor) then stops the sandbox server (and with it
  every bwrap sandbox) and removes the work dir on that node. ``detached=True`` makes them
  outlive the owner; ``structenv reap --ray`` removes those of dead runs.
* **Placement.** ``num_cpus``/``memory_mb``/``resources`` per host, ``label_selector`` (node
  labels), or ``placement`` — a placement group of ``max_hosts`` bundles (``STRICT_SPREAD``:
  one host per node; ``PACK``...) reserved at start, host ``i`` in a free bundle.
* **Faults.** The backend awaits each actor's ``wait()`` call: when the actor or its node
  dies, that call fails, the host is declared dead, its in-flight calls fail at once with
  :class:`~structenv.SlotBrokenError` (their connections are aborted), and a replacement is
  started (as for any hosted backend: scaling between ``min_hosts`` and ``max_hosts``).
* **Trio and asyncio.** See :func:`._ray_node.await_ref`: no thread per call.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from types import ModuleType
from typing import Any

import anyio

from .._exceptions import BackendError, ConfigError, SandboxUnavailableError
from ..sandbox._client import HostClient
from ._hosted import Host, HostedBackend
from ._options import RayOptions, resolve_options

__all__ = ["RayBackend"]

logger = logging.getLogger("structenv.backends.ray")


def _import_node() -> ModuleType:
    try:
        from . import _ray_node
    except ImportError as exc:
        raise ConfigError(f"RayBackend needs ray: pip install structenv[ray] ({exc})") from exc
    return _ray_node


@dataclasses.dataclass(eq=False, kw_only=True)
class _ActorHost(Host):
    actor: Any
    name: str
    node_id: str
    node_ip: str
    pid: int
    root: str
    bundle: int | None


class RayBackend(HostedBackend):
    """Sandbox hosts as Ray actors (see the module docstring).

    Takes :class:`~structenv.backends.RayOptions` (the shared host-pool options plus Ray's:
    ``address``, ``num_cpus``, ``memory_mb``, ``resources``, ``label_selector``,
    ``placement``, ``detached``...), as a model and/or keyword overrides.
    """

    host_noun = "Ray host"
    _watch_hosts = True

    def __init__(self, options: RayOptions | None = None, /, **overrides: Any) -> None:
        o = resolve_options(RayOptions, options, overrides)
        super().__init__(o)
        self._o = o
        self.run_id = o.run_id or f"{os.getpid()}-{secrets.token_hex(4)}"
        self._token = secrets.token_urlsafe(32)
        self._mode = "none" if o.isolation == "none" else "bwrap"
        self._node: ModuleType | None = None
        self._started_ray = False
        self._group: Any = None
        self._free_bundles: list[int] = []
        self._counter = 0
        # Blocking Ray calls run in worker threads through limiters of their own (never
        # anyio's default one, which other code may exhaust): ray.get where a ref cannot be
        # awaited (Ray Client without futures; a host's wait() may hold a token for its whole
        # life), and the control calls (ray.kill, removing the placement group, ray.shutdown),
        # kept apart so that teardown never queues behind those long waits.
        self._limiter = anyio.CapacityLimiter(o.get_concurrency)
        self._control_limiter = anyio.CapacityLimiter(4)
        self._actors: dict[str, Any] = {}  # every actor created and not yet killed

    @property
    def sandboxed(self) -> bool:
        return self._mode == "bwrap"

    def host_nodes(self) -> dict[str, str]:
        """Ray node id of every live host, by host id."""
        return {
            h.id: h.node_id for h in self._hosts.values() if h.alive and isinstance(h, _ActorHost)
        }

    def host_actors(self) -> dict[str, Any]:
        """Actor handle of every live host, by host id (for fault tests and diagnostics)."""
        return {
            h.id: h.actor for h in self._hosts.values() if h.alive and isinstance(h, _ActorHost)
        }

    # -- lifecycle hooks --------------------------------------------------------------------

    async def _prepare(self) -> None:
        node = self._node = _import_node()
        o = self._o
        # On this thread: ray.init installs signal handlers (main thread only). It blocks
        # the loop once, while connecting; a job that called ray.init itself pays nothing.
        self._started_ray = node.connect(o.address, o.namespace)
        if o.placement is not None:
            bundle: dict[str, float] = {"CPU": o.num_cpus, **o.resources}
            if o.memory_mb:
                bundle["memory"] = float(o.memory_mb << 20)
            bundle = {k: v for k, v in bundle.items() if v}
            if not bundle:
                raise ConfigError("placement needs num_cpus, memory_mb or resources per host")
            self._group = node.make_placement_group(
                o.placement, self._max, bundle, f"structenv-{self.run_id}"
            )
            self._free_bundles = list(range(self._max))
            try:
                with anyio.fail_after(o.start_timeout):
                    await node.await_ref(self._group.ready(), self._limiter)
            except TimeoutError:
                raise BackendError(
                    f"placement group ({o.placement}, {self._max} x {bundle}) not ready within "
                    f"{o.start_timeout}s: the cluster cannot place it"
                ) from None

    def _argv(self) -> list[str]:
        o = self._o
        argv = [
            "--host", o.bind_host or "{node_ip}", "--port", "0",
            "--slots", str(self._slots_per), "--isolation", self._mode,
            "--cgroup", o.cgroup, "--memory", str(o.memory_limit), "--pids", str(o.pids_limit),
            "--cpus", str(o.cpu_limit), "--disk", str(o.disk_limit),
            "--max-output", str(o.max_output),
        ]  # fmt: skip
        if o.allow_network:
            argv += ["--allow-network", *o.budget_argv]
        return argv

    async def _launch_host(self) -> Host:
        """Create one host actor, start its sandbox server, wait until it serves.

        Cancellation: the actor is killed (its cleanup process removes what it started).
        """
        node = self._node
        assert node is not None
        o = self._o
        self._counter += 1
        name = f"{node.ACTOR_PREFIX}{self.run_id}-{self._counter}"
        bundle = None
        if self._group is not None:
            if not self._free_bundles:  # pragma: no cover - max_hosts bounds the hosts
                raise BackendError("no free bundle in the placement group")
            bundle = self._free_bundles.pop(0)
        env = {"STRUCTENV_SANDBOX_TOKEN": self._token, "STRUCTENV_RAY_RUN": self.run_id}
        if o.workdir:
            env["STRUCTENV_RAY_BASE"] = o.workdir
        argv = [f"ray{self.run_id}-{self._counter}", *self._argv()]
        actor = node.spawn_host(
            name=name,
            namespace=o.namespace,
            argv=argv,
            env=env,
            labels=node.labels_for(self.run_id),
            num_cpus=o.num_cpus,
            memory=(o.memory_mb << 20) if o.memory_mb else None,
            resources=o.resources,
            label_selector=o.label_selector,
            group=self._group,
            bundle=bundle or 0,
            detached=o.detached,
        )
        self._actors[name] = actor
        client: HostClient | None = None
        began = anyio.current_time()
        try:
            with anyio.fail_after(self.start_timeout):
                info = await node.await_ref(actor.start.remote(), self._limiter)
                started = anyio.current_time()
                if info.get("error") == "sandbox_unavailable":
                    raise SandboxUnavailableError(f"Ray host {name}: {info.get('message')}")
                if "error" in info or not info.get("ready"):
                    raise BackendError(f"Ray host {name} failed to start: {info}")
                client = HostClient(host=info["host"], port=int(info["port"]), token=self._token)
                sandboxed, slots = await self.probe_host(client)
            now = anyio.current_time()
            logger.debug(
                "Ray host %s: server started in %.2fs, serving %.2fs later (node %s)",
                name, started - began, now - started, info["node_ip"],
            )  # fmt: skip
        except BaseException as exc:
            with anyio.move_on_after(10, shield=True):
                if client is not None:
                    await client.aclose()
                await self._kill(name, actor, bundle)
            if isinstance(exc, TimeoutError):
                raise BackendError(
                    f"Ray host {name} did not serve within {self.start_timeout}s (no node with "
                    "the resources/labels asked for?)"
                ) from None
            if isinstance(exc, node.ActorDiedError):
                raise BackendError(f"Ray host {name} died starting: {exc}") from exc
            raise
        return _ActorHost(
            id=name,
            client=client,
            sandboxed=sandboxed,
            slots=slots,
            actor=actor,
            name=name,
            node_id=str(info["node_id"]),
            node_ip=str(info["node_ip"]),
            pid=int(info["pid"]),
            root=str(info["root"]),
            bundle=bundle,
        )

    async def _kill(self, name: str, actor: Any, bundle: int | None) -> None:
        assert self._node is not None
        await anyio.to_thread.run_sync(self._node.kill, actor, limiter=self._control_limiter)
        self._actors.pop(name, None)
        if bundle is not None:
            self._free_bundles.append(bundle)

    async def _wait_exit(self, host: Host) -> None:
        assert isinstance(host, _ActorHost) and self._node is not None
        try:
            await self._node.await_ref(host.actor.wait.remote(), self._limiter)
        except self._node.RayError as exc:
            if host.alive:  # not one being stopped by us
                logger.error("Ray host %s died: %s", host.id, str(exc).splitlines()[0])

    async def _host_removed(self, host: Host, *, scaled_down: bool) -> None:
        # Its bundle may take a replacement now: Ray starts that once the old actor is gone.
        if isinstance(host, _ActorHost) and host.bundle is not None:
            self._free_bundles.append(host.bundle)

    async def _stop_host(self, host: Host) -> None:
        """Stop the server (its work dir is removed on the node), then kill the actor."""
        assert isinstance(host, _ActorHost) and self._node is not None
        began = anyio.current_time()
        with anyio.move_on_after(15):
            try:
                await self._node.await_ref(host.actor.stop.remote(), self._limiter)
            except self._node.RayError:
                pass  # dead already: its cleanup process has done the work
        stopped = anyio.current_time()
        await self._kill(host.name, host.actor, None)  # its bundle: see _host_removed
        logger.debug(
            "Ray host %s: stopped in %.2fs, killed %.2fs later",
            host.id, stopped - began, anyio.current_time() - stopped,
        )  # fmt: skip

    async def _finish(self) -> None:
        node = self._node
        if node is None:
            return
        for name, actor in list(self._actors.items()):  # never left behind
            await self._kill(name, actor, None)
        if self._group is not None:
            await anyio.to_thread.run_sync(
                node.remove_group, self._group, limiter=self._control_limiter
            )
            self._group = None
        if self._started_ray:
            await anyio.to_thread.run_sync(node.shutdown, limiter=self._control_limiter)
            self._started_ray = False

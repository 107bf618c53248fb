"""ModalBackend: sandbox hosts as Modal Sandboxes, each running the structenv sandbox server.

Each Modal Sandbox runs ``python3 -m structenv.sandbox`` (S slots) as its command, listening
on port 8765 with a per-run bearer token; Modal exposes the port through an encrypted tunnel
(``encrypted_ports``) and the backend reaches it over TLS with the same client every backend
uses. Only Modal's async API is used (``.aio`` methods), so no thread is needed; ``modal`` is
imported only when a ModalBackend starts (install the extra: ``pip install structenv[modal]``).

Calls used: ``modal.App.lookup.aio(name, create_if_missing=True)``,
``modal.Image.from_registry(image)``, ``modal.Secret.from_dict({...})`` (the token),
``modal.Sandbox.create.aio(*cmd, app=, image=, secrets=, timeout=, block_network=,
encrypted_ports=, cpu=, memory=)``, ``sandbox.set_tags.aio(tags)``, ``sandbox.tunnels.aio()``,
``sandbox.poll.aio()``, ``sandbox.terminate.aio()``, and for reaping ``modal.Sandbox.list.aio(
app_id=, tags=)`` + ``sandbox.get_tags.aio()``.

Behaviour:

* ``allow_network=False`` sets ``block_network=True`` (tunnels still work: they go through
  Modal). Inside, slots are still isolated by bubblewrap when the image allows it (Modal runs
  gVisor, where bwrap usually cannot work: use ``isolation="none"`` with
  ``require_sandbox=False``; the Modal sandbox is then the isolation boundary for its slots).
* Creations go through the creation limiter: ``creation_rate`` (default 5/s, Modal's limit)
  and ``creation_concurrency``.
* Lifetime: a sandbox lives ``sandbox_lifetime`` seconds (Modal's ``timeout``), at least
  ``trajectory_deadline + scoring_buffer``. A slot is only leased from a sandbox with at least
  that much life left, so a trajectory never outlives its sandbox; idle sandboxes past that
  point are replaced.
* Every sandbox is tagged with owner labels (:mod:`structenv.backends._ownership`);
  ``reap_on_start`` and :func:`reap_sandboxes` terminate those of dead owners on this host only.

Real usage (``modal token new`` first)::

    async with ModalBackend(app_name="structenv", image="registry/structenv-sandbox:1",
                            min_hosts=2, max_hosts=32, isolation="none",
                            require_sandbox=False) as backend: ...

Tests use :mod:`structenv.testing._modal_fake` (a fake of this small client surface whose
sandboxes are local sandbox-server processes); the real service is not reachable from CI.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import secrets
from typing import Any

import anyio

from .._exceptions import BackendError, ConfigError
from ..sandbox._client import HostClient
from ._hosted import Host, HostedBackend
from ._options import ModalOptions, resolve_options
from ._ownership import (
    LABEL_MANAGED,
    LABEL_POOL,
    ReapReport,
    current_owner,
    owner_labels,
    owner_state,
)

__all__ = ["ModalBackend", "reap_sandboxes"]

logger = logging.getLogger("structenv.backends.modal")

_PORT = 8765


def _import_modal() -> Any:
    try:
        import modal  # the only import of the Modal SDK in structenv
    except ImportError as exc:
        raise ConfigError(
            "ModalBackend needs the modal extra: pip install structenv[modal]"
        ) from exc
    return modal


@dataclasses.dataclass(eq=False, kw_only=True)
class _Box(Host):
    sandbox: Any
    expires_at: float


class ModalBackend(HostedBackend):
    """Sandbox hosts as Modal Sandboxes (see the module docstring).

    Options (fields of :class:`~structenv.backends.ModalOptions`, given as a model and/or keyword
    overrides):
        app_name: Modal App the sandboxes belong to (created if missing).
        image: Registry image containing the sandbox server (``python3 -m structenv.sandbox``).
        slots_per_host, min_hosts, max_hosts: Slots per sandbox and scaling bounds.
        allow_network: ``False`` sets ``block_network=True``.
        require_sandbox: Fail closed if bubblewrap cannot isolate slots in the sandbox.
        isolation: ``"bwrap"`` or ``"none"``.
        cpu, memory_mb: Resources per sandbox.
        trajectory_deadline, scoring_buffer: A slot is leased only from a sandbox with this
            much lifetime left.
        sandbox_lifetime: Modal ``timeout`` of each sandbox (default: twice the minimum).
        creation_rate: Sandbox creations per second (Modal allows about 5).
        run_id, pool: Labels (tags) of this run and deployment.
        reap_on_start: Terminate sandboxes of dead owners at start.
        tunnel_tls: Speak TLS to the tunnel (Modal's ``encrypted_ports``: keep it on; the
            test fake's tunnels are plain TCP).
        modal_module: The ``modal`` module or a stand-in (tests); default: ``import modal``.
        creation_concurrency, idle_timeout, health_interval, health_timeout, start_timeout,
        reset_timeout: As for :class:`HostedBackend`.
        max_output: Host-side cap on captured stdout/stderr per command.
    """

    host_noun = "Modal sandbox"

    def __init__(self, options: ModalOptions | None = None, /, **overrides: Any) -> None:
        o = resolve_options(ModalOptions, options, overrides)
        super().__init__(o)
        app_name, image, allow_network, isolation = (
            o.app_name, o.image, o.allow_network, o.isolation
        )  # fmt: skip
        cpu, memory_mb, max_output = o.cpu, o.memory_mb, o.max_output
        run_id, pool, reap_on_start, tunnel_tls, modal_module = (
            o.run_id, o.pool, o.reap_on_start, o.tunnel_tls, o.modal_module
        )  # fmt: skip
        self.min_life = o.trajectory_deadline + o.scoring_buffer
        lifetime = 2 * self.min_life if o.sandbox_lifetime is None else o.sandbox_lifetime
        self.app_name = app_name
        self.image = image
        self._allow_network = allow_network
        self._mode = isolation
        self._resources = (cpu, memory_mb, max_output)
        self.lifetime = lifetime
        self.run_id = run_id or f"{os.getpid()}-{secrets.token_hex(4)}"
        self.pool_name = pool
        self._reap_on_start = reap_on_start
        self._tls = tunnel_tls
        self._modal = modal_module
        self._token = secrets.token_urlsafe(32)
        self._app: Any = None
        self._counter = 0

    @property
    def sandboxed(self) -> bool:
        return self._mode == "bwrap"

    def sandbox_ids(self) -> dict[str, str]:
        """Modal object id of every live sandbox, by host id."""
        return {
            h.id: str(h.sandbox.object_id)
            for h in self._hosts.values()
            if h.alive and isinstance(h, _Box)
        }

    def command(self) -> list[str]:
        """The sandbox's command: the sandbox server on the tunnelled port."""
        _, memory_mb, max_output = self._resources
        argv = [
            "python3", "-m", "structenv.sandbox", "--host", "0.0.0.0", "--port", str(_PORT),
            "--slots", str(self._slots_per), "--workdir", "/tmp/structenv-slots",
            "--isolation", self._mode, "--cgroup", "off", "--memory", str(memory_mb << 20),
            "--max-output", str(max_output),
        ]  # fmt: skip
        if self._allow_network or self._mode == "none":
            # block_network is then the network boundary
            argv += ["--allow-network", *self.options.budget_argv]
        return argv

    async def _prepare(self) -> None:
        if self._modal is None:
            self._modal = _import_modal()
        modal = self._modal
        self._app = await modal.App.lookup.aio(self.app_name, create_if_missing=True)
        if self._reap_on_start:
            report = await reap_sandboxes(modal, self._app, pool=self.pool_name)
            if report.removed:
                logger.warning("terminated %d Modal sandbox(es) of dead runs", len(report.removed))

    async def _launch_host(self) -> Host:
        """Create one Modal sandbox and wait until its server answers through the tunnel.

        Cancellation: a sandbox that was created is terminated (shielded, bounded).
        """
        modal = self._modal
        cpu, memory_mb, _ = self._resources
        self._counter += 1
        name = f"structenv-{self.run_id}-{self._counter}"
        sandbox: Any = None
        client: HostClient | None = None
        try:
            sandbox = await modal.Sandbox.create.aio(
                *self.command(),
                app=self._app,
                image=modal.Image.from_registry(self.image),
                secrets=[modal.Secret.from_dict({"STRUCTENV_SANDBOX_TOKEN": self._token})],
                timeout=math.ceil(self.lifetime),
                block_network=not self._allow_network,
                encrypted_ports=[_PORT],
                cpu=cpu,
                memory=memory_mb,
            )
            expires_at = anyio.current_time() + self.lifetime
            await sandbox.set_tags.aio(
                owner_labels(backend="modal", run_id=self.run_id, pool=self.pool_name)
            )
            with anyio.fail_after(self.start_timeout):
                tunnel = (await sandbox.tunnels.aio())[_PORT]
                client = HostClient(
                    host=tunnel.host, port=int(tunnel.port), token=self._token, tls=self._tls
                )

                async def check() -> None:
                    code = await sandbox.poll.aio()
                    if code is not None:
                        raise BackendError(f"Modal sandbox {name} exited ({code}) starting")

                sandboxed, slots = await self.probe_host(client, check=check)
        except BaseException as exc:
            with anyio.move_on_after(self.close_grace, shield=True):
                if client is not None:
                    await client.aclose()
                if sandbox is not None:
                    await _terminate(sandbox)
            if isinstance(exc, TimeoutError):
                raise BackendError(f"{name} not serving within {self.start_timeout}s") from exc
            if isinstance(exc, Exception) and not isinstance(exc, BackendError):
                raise BackendError(f"Modal sandbox failed to start: {exc!r}") from exc
            raise
        return _Box(
            id=name,
            client=client,
            sandboxed=sandboxed,
            slots=slots,
            sandbox=sandbox,
            expires_at=expires_at,
        )

    def _accepting(self, host: Host) -> bool:
        return isinstance(host, _Box) and host.expires_at - anyio.current_time() >= self.min_life

    async def _health_check(self, host: Host) -> None:
        if not self._accepting(host) and all(s.state == "free" for s in host.slots):
            logger.info("replacing Modal sandbox %s near the end of its lifetime", host.id)
            self._stats["scaled_down"] += 1
            self._retire(host)
            assert self._tg is not None
            self._tg.start_soon(self._discard, host)
            return
        await super()._health_check(host)

    async def _stop_host(self, host: Host) -> None:
        assert isinstance(host, _Box)
        await _terminate(host.sandbox)


async def _terminate(sandbox: Any) -> None:
    try:
        await sandbox.terminate.aio()
    except Exception as exc:  # already gone, or the API is unreachable: logged, not fatal
        logger.error("cannot terminate Modal sandbox %s: %r", sandbox.object_id, exc)


async def reap_sandboxes(modal: Any, app: Any, *, pool: str | None = None) -> ReapReport:
    """Terminate structenv sandboxes of ``app`` whose owner process (on this host) is dead.

    Cancellation: sandboxes already terminated stay so; the rest are left for the next run.
    """
    removed: list[str] = []
    alive: list[str] = []
    foreign: list[str] = []
    failed: list[tuple[str, str]] = []
    me = current_owner()
    wanted = {LABEL_MANAGED: "1", **({LABEL_POOL: pool} if pool is not None else {})}
    async for sandbox in modal.Sandbox.list.aio(app_id=app.app_id, tags=wanted):
        sid = str(sandbox.object_id)
        state = owner_state(await sandbox.get_tags.aio(), me=me)
        if state != "dead":
            (alive if state == "alive" else foreign).append(sid)
            continue
        try:
            await sandbox.terminate.aio()
        except Exception as exc:
            failed.append((sid, repr(exc)))
            continue
        removed.append(sid)
    return ReapReport(tuple(removed), tuple(alive), tuple(foreign), tuple(failed))

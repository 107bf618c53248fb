"""NomadBackend: sandbox hosts as the allocations of one Nomad job, over Nomad's HTTP API.

The backend registers a service job (``structenv-<run id>``) with one task group whose ``Count``
allocations each run the structenv sandbox server (S slots) on a dynamic port ``http``, with a
bearer token; it then talks to each server with the same client as every other backend. Nomad is
only the control plane: register (``PUT /v1/jobs``), discover running allocations and their
address (``GET /v1/job/:id/allocations``, ``GET /v1/allocation/:id``), scale between
``min_hosts`` and ``max_hosts`` (``POST /v1/job/:id/scale``; Nomad removes the
allocations with the highest name indices, so only those are chosen for scale-down), replace
dead allocations (Nomad reschedules a failed one; a hung one is stopped with
``POST /v1/allocation/:id/stop``), and purge (``DELETE /v1/job/:id?purge=true``) on start (the
same job id) and on close. Every API call carries ``X-Nomad-Token`` and is retried (tenacity)
on transient errors only: connection failures, 5xx and 429 — never cancellation, never a
deadline. All calls are idempotent (absolute counts, purge of a gone job is success).

Task drivers (``driver=``):

* ``"docker"`` (default): ``config.image`` is a structenv sandbox image (``structenv image
  build``, pushed to a registry your clients can pull) whose entrypoint is the sandbox server;
  the same security options as :class:`DockerBackend` (all capabilities dropped but SETUID,
  SETGID, SETFCAP, seccomp/systempaths unconfined for bubblewrap). The Nomad clients'
  docker plugin must allow them (``allow_caps``, ``allow_privileged = false`` is fine).
* ``"raw_exec"``: runs ``apptainer exec --containall <apptainer_image> python3 -m
  structenv.sandbox ...`` on the client (raw_exec must be enabled on it).

Running against a real cluster::

    export NOMAD_ADDR=https://nomad.example:4646 NOMAD_TOKEN=...   # token: submit-job,
    # read-job, scale-job and alloc-lifecycle in the namespace
    async with NomadBackend(image="registry.example/structenv-sandbox:1", min_hosts=2,
                            max_hosts=16, slots_per_host=8) as backend: ...

This process must reach the clients' addresses on the dynamic ports (same network, or a VPN);
traffic is plain HTTP with a per-run bearer token, so keep it on a private network. The token
travels in the job's ``Env`` (visible to holders of ``read-job``). The task itself needs a
network (``network_mode = "none"`` would make the server unreachable), so with
``allow_network=False`` network isolation comes from bubblewrap's own network namespace in each
slot (the server's start-up probe checks it; ``isolation="none"`` then fails closed unless
``require_sandbox=False``). Owner labels (see :mod:`structenv.backends._ownership`) go in the job's
``Meta``: :func:`reap_jobs` (and ``reap_on_start``) purges jobs of dead owners on this host
only.

Tests use :mod:`structenv.testing._nomad_fake` (a fake agent whose allocations are real sandbox
server processes); no Nomad binary exists on the development machines.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import secrets
from typing import Any

import anyio
import httpx
import tenacity

from .._exceptions import BackendError
from ..sandbox._client import HostClient
from ._hosted import Host, HostedBackend
from ._options import NomadOptions, resolve_options
from ._ownership import (
    LABEL_MANAGED,
    LABEL_POOL,
    ReapReport,
    current_owner,
    owner_labels,
    owner_state,
)

__all__ = ["NomadAPIError", "NomadBackend", "reap_jobs"]

logger = logging.getLogger("structenv.backends.nomad")

_GROUP = "sandbox"
_TASK = "server"
_INDEX = re.compile(r"\[(\d+)\]$")


class NomadAPIError(BackendError):
    """Nomad answered an error (``status``: the HTTP status)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Nomad API error {status}: {message}")
        self.status = status


def _is_transient(exc: BaseException) -> bool:
    """The explicit list of errors worth retrying: never cancellation, never a deadline."""
    if isinstance(exc, NomadAPIError):
        return exc.status == 429 or exc.status >= 500
    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError))


class _Nomad:
    """Nomad's HTTP API with retries of transient errors."""

    def __init__(self, client: httpx.AsyncClient, *, attempts: int) -> None:
        self.http = client
        self._attempts = attempts

    async def call(
        self, method: str, path: str, *, body: Any = None, params: dict[str, str] | None = None
    ) -> Any:
        """One idempotent API call; returns the decoded JSON answer.

        Cancellation: the request is abandoned (it may have reached Nomad: every call is
        idempotent, and close purges the job whatever happened).
        """
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(_is_transient),
            stop=tenacity.stop_after_attempt(self._attempts),
            wait=tenacity.wait_exponential(multiplier=0.05, max=2.0),
            sleep=anyio.sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                response = await self.http.request(method, path, json=body, params=params)
                if response.status_code >= 400:
                    raise NomadAPIError(response.status_code, response.text[:500])
                return response.json()
        raise AssertionError("unreachable")  # pragma: no cover


@dataclasses.dataclass(eq=False, kw_only=True)
class _Allocation(Host):
    alloc_id: str
    index: int


class NomadBackend(HostedBackend):
    """Sandbox hosts as allocations of a Nomad job (see the module docstring).

    Options (fields of :class:`~structenv.backends.NomadOptions`, given as a model and/or keyword
    overrides):
        address: Nomad HTTP API address (default ``$NOMAD_ADDR`` or ``http://127.0.0.1:4646``).
        token: ACL token (default ``$NOMAD_TOKEN``).
        namespace, region: Nomad namespace and region (``None``: the agent's defaults).
        image: The sandbox image (docker driver).
        driver: ``"docker"`` or ``"raw_exec"`` (apptainer).
        apptainer_image: Image (e.g. a ``.sif`` path) for ``raw_exec``.
        datacenters: Where allocations may run.
        slots_per_host: Slots per allocation.
        min_hosts, max_hosts: Scaling bounds (allocations).
        allow_network: Slots may reach the network.
        require_sandbox: Fail closed if bubblewrap cannot isolate slots.
        isolation: ``"bwrap"`` or ``"none"`` (slots share the allocation).
        cpu: CPU MHz per allocation; memory_mb: memory per allocation.
        run_id: This run's id (job id ``structenv-<run_id>``).
        pool: Label shared by runs of one deployment.
        purge_on_start: Purge a job with the same id before registering (default true).
        reap_on_start: Purge jobs of this pool whose owner process here is dead.
        poll_interval: Seconds between allocation listings while waiting for one.
        api_attempts: Attempts per API call on transient errors.
        api_timeout: HTTP timeout of each API call.
        creation_rate, creation_concurrency, idle_timeout, health_interval, health_timeout,
        start_timeout, reset_timeout: As for :class:`HostedBackend`.
        max_output: Host-side cap on captured stdout/stderr per command.
    """

    host_noun = "allocation"

    def __init__(self, options: NomadOptions | None = None, /, **overrides: Any) -> None:
        o = resolve_options(NomadOptions, options, overrides)
        super().__init__(o)
        address, token, namespace, region = o.address, o.token, o.namespace, o.region
        image, driver, apptainer_image, datacenters = (
            o.image, o.driver, o.apptainer_image, o.datacenters
        )  # fmt: skip
        allow_network, isolation, cpu, memory_mb, max_output = (
            o.allow_network, o.isolation, o.cpu, o.memory_mb, o.max_output
        )  # fmt: skip
        run_id, pool, purge_on_start, reap_on_start = (
            o.run_id, o.pool, o.purge_on_start, o.reap_on_start
        )  # fmt: skip
        poll_interval, api_attempts, api_timeout = o.poll_interval, o.api_attempts, o.api_timeout
        self.address = address or os.environ.get("NOMAD_ADDR") or "http://127.0.0.1:4646"
        self._acl = token if token is not None else os.environ.get("NOMAD_TOKEN")
        self._params = {k: v for k, v in (("namespace", namespace), ("region", region)) if v}
        self.image = image
        self._driver = driver
        self._apptainer = apptainer_image
        self._datacenters = list(datacenters)
        self._allow_network = allow_network
        self._mode = isolation
        self._resources = (cpu, memory_mb, max_output)
        self.run_id = run_id or f"{os.getpid()}-{secrets.token_hex(4)}"
        self.job_id = f"structenv-{self.run_id}"
        self.pool_name = pool
        self._purge_on_start = purge_on_start
        self._reap_on_start = reap_on_start
        self.poll_interval = poll_interval
        self._api_opts = (api_attempts, api_timeout)
        self._token = secrets.token_urlsafe(32)
        self._api: _Nomad | None = None
        self._registered = False
        self._count = 0
        self._launching = 0
        self._claimed: set[str] = set()

    @property
    def sandboxed(self) -> bool:
        return self._mode == "bwrap"

    def allocation_ids(self) -> dict[str, str]:
        """Nomad allocation id of every live host, by host id."""
        return {
            h.id: h.alloc_id for h in self._hosts.values() if h.alive and isinstance(h, _Allocation)
        }

    # -- the job --------------------------------------------------------------------------

    def job_spec(self, count: int) -> dict[str, Any]:
        """The job registered with Nomad (JSON job specification)."""
        cpu, memory_mb, max_output = self._resources
        server = [
            "--host", "0.0.0.0", "--port", "${NOMAD_PORT_http}", "--slots", str(self._slots_per),
            "--workdir", "${NOMAD_TASK_DIR}/slots", "--name", "${NOMAD_ALLOC_INDEX}",
            "--isolation", self._mode, "--cgroup", "off", "--memory", str(memory_mb << 20),
            "--max-output", str(max_output),
        ]  # fmt: skip
        if self._allow_network:
            server += ["--allow-network", *self.options.budget_argv]
        config: dict[str, Any]
        if self._driver == "docker":
            config = {
                "image": self.image,
                "args": server,
                "ports": ["http"],
                "cap_drop": ["ALL"],
                "cap_add": ["SETUID", "SETGID", "SETFCAP"],
                "security_opt": ["seccomp=unconfined", "systempaths=unconfined"],
                "init": True,
            }
        else:
            config = {
                "command": "apptainer",
                "args": [
                    "exec", "--containall", "--cleanenv", "--env",
                    "STRUCTENV_SANDBOX_TOKEN=${STRUCTENV_SANDBOX_TOKEN}",
                    str(self._apptainer), "python3", "-m", "structenv.sandbox", *server,
                ],
            }  # fmt: skip
        meta = owner_labels(backend="nomad", run_id=self.run_id, pool=self.pool_name)
        return {
            "ID": self.job_id,
            "Name": self.job_id,
            "Type": "service",
            "Datacenters": self._datacenters,
            "Meta": meta,
            "TaskGroups": [
                {
                    "Name": _GROUP,
                    "Count": count,
                    "Networks": [{"DynamicPorts": [{"Label": "http"}]}],
                    "RestartPolicy": {"Attempts": 0, "Mode": "fail"},
                    "ReschedulePolicy": {"Unlimited": True, "Delay": 1_000_000_000},
                    "Tasks": [
                        {
                            "Name": _TASK,
                            "Driver": self._driver,
                            "Config": config,
                            "Env": {"STRUCTENV_SANDBOX_TOKEN": self._token},
                            "Resources": {"CPU": cpu, "MemoryMB": memory_mb},
                            "KillTimeout": 5_000_000_000,
                        }
                    ],
                }
            ],
        }

    # -- lifecycle ------------------------------------------------------------------------

    async def _prepare(self) -> None:
        attempts, timeout = self._api_opts
        headers = {"X-Nomad-Token": self._acl} if self._acl else {}
        http = httpx.AsyncClient(
            base_url=self.address, headers=headers, timeout=timeout, params=self._params
        )
        self._api = api = _Nomad(http, attempts=attempts)
        if self._reap_on_start:
            report = await reap_jobs(api, pool=self.pool_name)
            if report.removed:
                logger.warning("purged %d Nomad job(s) of dead runs", len(report.removed))
        if self._purge_on_start:
            await self._purge()
        self._count = self._min
        self._registered = True  # before the call: if it is interrupted, close purges
        await api.call("PUT", "/v1/jobs", body={"Job": self.job_spec(self._count)})

    async def _purge(self) -> None:
        assert self._api is not None
        try:
            await self._api.call("DELETE", f"/v1/job/{self.job_id}", params={"purge": "true"})
        except NomadAPIError as exc:
            if exc.status != 404:
                raise

    async def _scale(self, count: int) -> None:
        assert self._api is not None
        body = {"Count": count, "Target": {"Group": _GROUP}, "Message": "structenv scaling"}
        await self._api.call("POST", f"/v1/job/{self.job_id}/scale", body=body)

    async def _launch_host(self) -> Host:
        """Wait for a running allocation nobody serves yet (asking Nomad for one more when
        the job's count does not cover it) and for its server.

        Cancellation: nothing is claimed; an allocation asked for stays part of the job
        (used by the next launch, shrunk by scale-down, purged on close).
        """
        api = self._api
        assert api is not None
        self._launching += 1
        alloc_id: str | None = None
        client: HostClient | None = None
        try:
            want = min(self._max, sum(1 for h in self._hosts.values() if h.alive) + self._launching)
            if want > self._count:
                self._count = want
                await self._scale(want)
            with anyio.fail_after(self.start_timeout):
                while True:
                    stubs = await api.call("GET", f"/v1/job/{self.job_id}/allocations")
                    free = [
                        s
                        for s in stubs
                        if s.get("ClientStatus") == "running"
                        and s.get("DesiredStatus") == "run"
                        and s["ID"] not in self._claimed
                    ]
                    if free:
                        stub = min(free, key=_index)
                        alloc_id = str(stub["ID"])
                        self._claimed.add(alloc_id)
                        break
                    await anyio.sleep(self.poll_interval)
                alloc = await api.call("GET", f"/v1/allocation/{alloc_id}")
                ip, port = _address(alloc)
                client = HostClient(host=ip, port=port, token=self._token)
                sandboxed, slots = await self.probe_host(
                    client, check=lambda: self._check_running(str(alloc_id))
                )
        except BaseException as exc:
            if client is not None:
                with anyio.move_on_after(1, shield=True):
                    await client.aclose()
            if alloc_id is not None:
                self._claimed.discard(alloc_id)
            if isinstance(exc, TimeoutError):
                raise BackendError(
                    f"no Nomad allocation of {self.job_id} served within {self.start_timeout}s"
                ) from exc
            if isinstance(exc, (httpx.HTTPError, KeyError, ValueError)):
                raise BackendError(f"Nomad allocation failed to start: {exc!r}") from exc
            raise
        finally:
            self._launching -= 1
        index = _index(stub)
        return _Allocation(
            id=f"{self.job_id}[{index}]-{alloc_id[:8]}",
            client=client,
            sandboxed=sandboxed,
            slots=slots,
            alloc_id=alloc_id,
            index=index,
        )

    async def _check_running(self, alloc_id: str) -> None:
        assert self._api is not None
        alloc = await self._api.call("GET", f"/v1/allocation/{alloc_id}")
        if alloc.get("ClientStatus") != "running":
            raise BackendError(f"allocation {alloc_id} is {alloc.get('ClientStatus')}")

    def _idle_victims(self, idle: list[Host], excess: int) -> list[Host]:
        # Nomad stops the highest name indices when the count shrinks: only those may go.
        live = sorted(
            (h for h in self._hosts.values() if h.alive and isinstance(h, _Allocation)),
            key=lambda h: h.index,
            reverse=True,
        )
        victims: list[Host] = []
        for host in live[:excess]:
            if host not in idle or self._launching:
                break
            victims.append(host)
        return victims

    async def _host_removed(self, host: Host, *, scaled_down: bool) -> None:
        assert isinstance(host, _Allocation) and self._api is not None
        if self._closed:
            return  # the purge stops everything at once
        try:
            if scaled_down:
                self._count = max(self._min, self._count - 1)
                await self._scale(self._count)
            else:  # dead or hung: make Nomad replace it (harmless if it already failed)
                await self._api.call("POST", f"/v1/allocation/{host.alloc_id}/stop")
        except (BackendError, httpx.HTTPError) as exc:
            logger.error("Nomad call for allocation %s failed: %r", host.alloc_id, exc)

    async def _stop_host(self, host: Host) -> None:
        pass  # the scheduler stops allocations (scale, stop, purge)

    async def _finish(self) -> None:
        if self._api is None:
            return
        try:
            if self._registered:
                await self._purge()
        except (BackendError, httpx.HTTPError) as exc:
            logger.error("cannot purge Nomad job %s: %r", self.job_id, exc)
        finally:
            with anyio.move_on_after(5, shield=True):
                await self._api.http.aclose()


def _index(stub: dict[str, Any]) -> int:
    match = _INDEX.search(str(stub.get("Name", "")))
    return int(match[1]) if match else 0


def _address(alloc: dict[str, Any]) -> tuple[str, int]:
    """The ``http`` port's host address of an allocation (new and legacy layouts)."""
    shared = (alloc.get("AllocatedResources") or {}).get("Shared") or {}
    for port in shared.get("Ports") or []:
        if port.get("Label") == "http" and port.get("HostIP"):
            return str(port["HostIP"]), int(port["Value"])
    networks = shared.get("Networks") or (alloc.get("Resources") or {}).get("Networks") or []
    for network in networks:
        for port in network.get("DynamicPorts") or []:
            if port.get("Label") == "http":
                return str(network["IP"]), int(port["Value"])
    raise BackendError(f"allocation {alloc.get('ID')} has no 'http' port")


async def reap_jobs(api: _Nomad, *, pool: str | None = None, dry_run: bool = False) -> ReapReport:
    """Purge structenv jobs whose owner process (on this host) is dead.

    Cancellation: jobs already purged stay purged; the rest are left for the next run.
    """
    removed: list[str] = []
    alive: list[str] = []
    foreign: list[str] = []
    failed: list[tuple[str, str]] = []
    me = current_owner()
    for stub in await api.call("GET", "/v1/jobs", params={"prefix": "structenv-"}):
        job_id = str(stub["ID"])
        meta = stub.get("Meta") or (await api.call("GET", f"/v1/job/{job_id}")).get("Meta") or {}
        if meta.get(LABEL_MANAGED) != "1" or (pool is not None and meta.get(LABEL_POOL) != pool):
            continue
        state = owner_state(meta, me=me)
        if state != "dead":
            (alive if state == "alive" else foreign).append(job_id)
            continue
        if not dry_run:
            try:
                await api.call("DELETE", f"/v1/job/{job_id}", params={"purge": "true"})
            except NomadAPIError as exc:
                if exc.status != 404:
                    failed.append((job_id, repr(exc)))
                    continue
        removed.append(job_id)
    return ReapReport(tuple(removed), tuple(alive), tuple(foreign), tuple(failed), dry_run)

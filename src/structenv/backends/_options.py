"""Backend options: one frozen pydantic model per backend, sharing :class:`HostedOptions`.

Every hosted backend (its hosts run the sandbox server) takes the same host-pool options —
slots per host, min/max hosts, start and health timeouts, creation limits — declared once
here, plus a model of its own fields. A backend is built from a model, from keyword overrides,
or both::

    LocalBackend(hosts=2, slots_per_host=8)
    DockerBackend(DockerOptions(image="me/sandbox:1"), max_hosts=4)

The same models validate ``backend_options`` of an env config (YAML or ``--env.backend_options.
<name>`` flags), so a typo or an out-of-range value fails before anything starts, as one
:class:`~structenv.ConfigError` line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .._exceptions import ConfigError
from .._image import DEFAULT_TAG
from .._types import DEFAULT_MAX_OUTPUT
from ..sandbox._netns import (
    DEFAULT_CONNECTION_BURST,
    DEFAULT_CONNECTION_RATE,
    MAX_CONNECTION_BURST,
    MAX_CONNECTION_RATE,
)

__all__ = [
    "DockerOptions",
    "HostedOptions",
    "LocalOptions",
    "ModalOptions",
    "NomadOptions",
    "RayOptions",
    "resolve_options",
]

_MAX_OUTPUT = max(DEFAULT_MAX_OUTPUT, 16 << 20)


def _paths_from_text(value: Any) -> Any:
    """A list field given as text (a ``--env.backend_options.bind_roots /a,/b`` flag or a YAML
    string) is comma-separated, as the spec's ``binds``; a JSON list is parsed by the flag."""
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return value


class HostedOptions(BaseModel):
    """The host-pool options every hosted backend shares.

    Attributes:
        slots_per_host: Slots (isolated workspaces) per sandbox host.
        min_hosts: Hosts kept running (started before ``__aenter__`` returns).
        max_hosts: Upper bound when scaling up on demand (``None``: ``min_hosts``).
        allow_network: Slots may reach the network.
        connection_rate: New outbound connections a networked slot may start per second
            (TCP connection attempts and non-TCP packets, one budget; 1..1000). Enforced by
            nftables in the slot's own network namespace; the excess is dropped (a connect
            waits for its SYN's retransmission, a datagram fails with ``EPERM``). Each one
            holds a host port in ``TIME_WAIT`` for 60 s and a conntrack entry for up to
            120 s: the default, 20, lets one slot hold at most ~1,300 ports and ~2,500
            entries (docs/design.md, "A networked slot's flow budget"). Lower it when many
            networked slots share a host with a trainer reaching the same servers.
        connection_burst: Connections a networked slot may start at once beyond the rate
            (1..10000; default 100).
        require_sandbox: Fail closed if the first host runs without isolation.
        creation_concurrency: Hosts being started at once.
        creation_rate: Host starts per second at most.
        idle_timeout: Seconds a host above ``min_hosts`` may sit idle before it is stopped.
        health_interval: Seconds between health checks of each host.
        health_timeout: Seconds a health check may take.
        start_timeout: Seconds a host may take to serve.
        reset_timeout: Seconds a slot reset may take before the slot is rebuilt instead.
        max_output: Host-side cap on captured stdout/stderr per command (bytes).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    slots_per_host: int = Field(default=4, ge=1)
    min_hosts: int = Field(default=1, ge=1)
    max_hosts: int | None = Field(default=None, ge=1)
    allow_network: bool = False
    connection_rate: int = Field(default=DEFAULT_CONNECTION_RATE, ge=1, le=MAX_CONNECTION_RATE)
    connection_burst: int = Field(default=DEFAULT_CONNECTION_BURST, ge=1, le=MAX_CONNECTION_BURST)
    require_sandbox: bool = True
    creation_concurrency: int = Field(default=4, ge=1)
    creation_rate: float = Field(default=10.0, gt=0)
    idle_timeout: float = Field(default=60.0, gt=0)
    health_interval: float = Field(default=1.0, gt=0)
    health_timeout: float = Field(default=5.0, gt=0)
    start_timeout: float = Field(default=60.0, gt=0)
    reset_timeout: float = Field(default=20.0, gt=0)
    max_output: int = Field(default=_MAX_OUTPUT, ge=1)

    @property
    def budget_argv(self) -> list[str]:
        """The sandbox server's flags for a networked slot's budget of new connections."""
        return [
            "--connection-rate", str(self.connection_rate),
            "--connection-burst", str(self.connection_burst),
        ]  # fmt: skip

    @property
    def host_bound(self) -> int:
        """``max_hosts``, or ``min_hosts`` when it is not set."""
        return self.min_hosts if self.max_hosts is None else self.max_hosts

    @model_validator(mode="after")
    def _check_hosts(self) -> Self:
        if self.host_bound < self.min_hosts:
            raise ValueError(f"max_hosts ({self.max_hosts}) < min_hosts ({self.min_hosts})")
        isolation = getattr(self, "isolation", None)
        if isolation == "none" and self.require_sandbox:
            raise ValueError("isolation='none' needs require_sandbox=False")
        return self


class LocalOptions(HostedOptions):
    """:class:`~structenv.backends.LocalBackend`: hosts are child processes of this one.

    ``hosts=N`` is short for ``min_hosts=max_hosts=N``.

    Attributes:
        isolation: ``"auto"`` (bwrap, or none if allowed), ``"bwrap"`` or ``"none"``
            (unsandboxed on purpose; needs ``require_sandbox=False`` and ``allow_network``).
        bwrap_path: The bubblewrap binary.
        memory_limit: Bytes of address space per process and of memory per slot (cgroup).
        pids_limit: Processes per slot (v1 pids cgroup; contains fork bombs).
        file_size_limit: Largest file a command may write.
        cpu_time_limit: CPU seconds per process (0: none).
        cpu_limit: CPU cores per slot (cgroup quota; every slot also has an equal weight).
        disk_limit: Bytes of a slot's workspace (its own tmpfs; root only).
        tmp_limit: Bytes of a slot's private ``/tmp``.
        inode_limit: Files a slot's workspace and ``/tmp`` may each hold (``nr_inodes``;
            ``/dev/shm`` a sixteenth; root only, 0: no cap). Freeing them is what a reset
            waits for: 1.5 M files took the kernel over 20 s, a full slot under 2 s
            (docs/design.md, threat model).
        nofile_limit: Open files per process of a slot (``RLIMIT_NOFILE``). The kernel's file
            table is machine-wide, so all slots together (``max_hosts x slots_per_host x
            pids_limit x nofile_limit``) may hold at most half of ``fs.file-max``; ``None``
            picks 1024 lowered to fit, and a value that does not fit is a ``ConfigError``.
        cgroup: ``"auto"``, ``"required"`` or ``"off"``: use of per-slot v1 cgroups.
        workdir: Private directory for sockets and workspaces (default: a new 0700 directory
            under ``/var/tmp``, removed on close).
        reap_on_start: At start, remove the work dirs (and host cgroups) of runs whose owner
            process is dead, in the base directory this backend's own goes to.
        bind_roots: Host directories a spec's ``binds`` and ``rootfs`` must lie in (``None``:
            anywhere the bind policy allows; ``()``: nowhere). Checked at start.
    """

    creation_concurrency: int = Field(default=4, ge=1)
    creation_rate: float = Field(default=1000.0, gt=0)
    health_interval: float = Field(default=5.0, gt=0)
    isolation: Literal["auto", "bwrap", "none"] = "auto"
    bwrap_path: str = "bwrap"
    memory_limit: int = 2 << 30
    pids_limit: int = 256
    file_size_limit: int = 1 << 30
    cpu_time_limit: int = 0
    cpu_limit: float = 1.0
    disk_limit: int = 2 << 30
    tmp_limit: int = 1 << 30
    inode_limit: int = Field(default=65536, ge=0)
    nofile_limit: int | None = None
    cgroup: Literal["auto", "required", "off"] = "auto"
    workdir: str | None = None
    reap_on_start: bool = True
    bind_roots: tuple[str, ...] | None = None

    _bind_roots_from_text = field_validator("bind_roots", mode="before")(_paths_from_text)

    @model_validator(mode="before")
    @classmethod
    def _hosts_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and "hosts" in data:
            data = dict(data)
            hosts = data.pop("hosts")
            if "min_hosts" in data or "max_hosts" in data:
                raise ValueError("give hosts or min_hosts/max_hosts, not both")
            data["min_hosts"] = data["max_hosts"] = hosts
            data.setdefault("creation_concurrency", max(4, int(hosts)))
        return data


class DockerOptions(HostedOptions):
    """:class:`~structenv.backends.DockerBackend`: hosts are containers (see its docstring)."""

    image: str = DEFAULT_TAG
    network: str = "bridge"
    isolation: Literal["auto", "bwrap", "none"] = "auto"
    memory_limit: int = 2 << 30
    pids_limit: int = 1024
    cpus: float | None = None
    workspace_size: int = 1 << 30
    #: Files per slot tmpfs (workspace and ``/tmp``; ``/dev/shm`` a sixteenth); 0: no cap.
    inode_limit: int = Field(default=65536, ge=0)
    #: Open files per process; ``max_hosts x pids_limit x nofile`` stays within half of
    #: ``fs.file-max`` (``None``: 1024 lowered to fit; a value that does not fit is refused).
    nofile_limit: int | None = None
    runtime: str | None = None
    slot_cgroups: Literal["auto", "required", "off"] = "auto"
    run_id: str | None = None
    pool: str = "default"
    reap_on_start: bool = True
    purge_on_start: bool = False
    exit_with_owner: bool = True
    sdk_concurrency: int = Field(default=8, ge=1)
    sdk_attempts: int = Field(default=4, ge=1)
    api_timeout: float = Field(default=30.0, gt=0)
    docker_url: str | None = None
    workdir: str | None = None
    #: Host directories mounted read-only into every container at the same path: a spec's
    #: ``binds`` and ``rootfs`` must lie in one of them (checked before anything runs).
    bind_roots: tuple[str, ...] = ()

    _bind_roots_from_text = field_validator("bind_roots", mode="before")(_paths_from_text)

    @model_validator(mode="after")
    def _check_cgroups(self) -> Self:
        if self.slot_cgroups == "required" and self.isolation == "none":
            raise ValueError("slot_cgroups='required' needs bwrap isolation")
        return self


class NomadOptions(HostedOptions):
    """:class:`~structenv.backends.NomadBackend`: hosts are allocations of a Nomad job."""

    creation_concurrency: int = Field(default=8, ge=1)
    start_timeout: float = Field(default=300.0, gt=0)
    address: str | None = None
    token: str | None = None
    namespace: str | None = None
    region: str | None = None
    image: str = DEFAULT_TAG
    driver: Literal["docker", "raw_exec"] = "docker"
    apptainer_image: str | None = None
    datacenters: tuple[str, ...] = ("*",)
    _datacenters_from_text = field_validator("datacenters", mode="before")(_paths_from_text)
    isolation: Literal["bwrap", "none"] = "bwrap"
    cpu: int = Field(default=1000, ge=1)
    memory_mb: int = Field(default=2048, ge=1)
    run_id: str | None = None
    pool: str = "default"
    purge_on_start: bool = True
    reap_on_start: bool = True
    poll_interval: float = Field(default=0.5, gt=0)
    api_attempts: int = Field(default=5, ge=1)
    api_timeout: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _check_driver(self) -> Self:
        if self.driver == "raw_exec" and not self.apptainer_image:
            raise ValueError("driver='raw_exec' needs apptainer_image")
        return self


class ModalOptions(HostedOptions):
    """:class:`~structenv.backends.ModalBackend`: hosts are Modal Sandboxes."""

    creation_concurrency: int = Field(default=8, ge=1)
    creation_rate: float = Field(default=5.0, gt=0)
    health_interval: float = Field(default=2.0, gt=0)
    health_timeout: float = Field(default=10.0, gt=0)
    start_timeout: float = Field(default=180.0, gt=0)
    app_name: str = "structenv"
    image: str = DEFAULT_TAG
    isolation: Literal["bwrap", "none"] = "bwrap"
    cpu: float = Field(default=1.0, gt=0)
    memory_mb: int = Field(default=2048, ge=1)
    trajectory_deadline: float = Field(default=600.0, gt=0)
    scoring_buffer: float = Field(default=60.0, ge=0)
    sandbox_lifetime: float | None = None
    run_id: str | None = None
    pool: str = "default"
    reap_on_start: bool = True
    tunnel_tls: bool = True
    modal_module: Any = None

    @model_validator(mode="after")
    def _check_lifetime(self) -> Self:
        life = self.sandbox_lifetime
        if life is not None and life < self.trajectory_deadline + self.scoring_buffer:
            raise ValueError("sandbox_lifetime < trajectory_deadline + scoring_buffer")
        return self


class RayOptions(HostedOptions):
    """:class:`~structenv.backends.RayBackend`: hosts are Ray actors (see its docstring).

    Attributes:
        address: Ray cluster to connect to when this process has not called ``ray.init``
            (``"auto"``, ``"HOST:PORT"`` or ``"ray://HOST:PORT"``); ``None``: use the running
            Ray, or ``ray.init()`` a local one. The backend never shuts down a Ray it did not
            start.
        namespace: Ray namespace of the host actors (needed to find detached ones).
        num_cpus: CPUs each host actor reserves (its node must have them free).
        memory_mb: Memory each host actor reserves (``None``: no reservation).
        resources: Custom Ray resources each host reserves (``{"sandbox": 1}``).
        label_selector: Node labels a host must run on (``{"pool": "sandbox"}``; Ray's
            actor ``label_selector``, Ray >= 2.49).
        placement: ``None`` (Ray's scheduler), ``"STRICT_SPREAD"`` (one host per node),
            ``"SPREAD"``, ``"PACK"`` or ``"STRICT_PACK"``: a placement group of ``max_hosts``
            bundles is reserved up front and host ``i`` goes to bundle ``i``.
        detached: Detached actors (they outlive this process; ``structenv reap --ray``
            removes those of dead runs). Default: owned by whoever entered the backend.
        isolation: ``"bwrap"`` (``"auto"`` is the same here: no fallback to unsandboxed
            hosts on a remote node) or ``"none"`` (needs ``require_sandbox=False``).
        memory_limit, pids_limit, cpu_limit, disk_limit, cgroup: As for ``LocalOptions``,
            applied by the sandbox server on each node.
        workdir: Base directory for hosts' work dirs on each node (default ``/var/tmp``).
        run_id: Label of this run (actor names ``structenv-<run_id>-<n>``).
        bind_host: Address the sandbox servers listen on (default: the node's Ray IP).
        get_concurrency: Threads bridging Ray calls to Trio when the done-callback bridge
            cannot be used (Ray Client).
    """

    start_timeout: float = Field(default=120.0, gt=0)
    address: str | None = None
    namespace: str = "structenv"
    num_cpus: float = Field(default=1.0, ge=0)
    memory_mb: int | None = Field(default=None, ge=1)
    resources: dict[str, float] = Field(default_factory=dict)
    label_selector: dict[str, str] = Field(default_factory=dict)
    placement: Literal["STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK"] | None = None
    detached: bool = False
    isolation: Literal["auto", "bwrap", "none"] = "auto"
    memory_limit: int = 2 << 30
    pids_limit: int = 256
    cpu_limit: float = 1.0
    disk_limit: int = 2 << 30
    cgroup: Literal["auto", "required", "off"] = "auto"
    workdir: str | None = None
    run_id: str | None = None
    bind_host: str | None = None
    get_concurrency: int = Field(default=16, ge=1)

    @model_validator(mode="after")
    def _check_placement(self) -> Self:
        if self.placement is not None and self.label_selector:
            raise ValueError("give placement or label_selector, not both")
        return self


_O = TypeVar("_O", bound=HostedOptions)


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def resolve_options(model: type[_O], options: _O | None, overrides: Mapping[str, Any]) -> _O:
    """``options`` (or the defaults) with ``overrides`` applied, validated.

    Raises:
        ConfigError: An unknown option, a wrong type or an inconsistent combination.
    """
    if options is not None and not isinstance(options, model):
        raise ConfigError(f"expected {model.__name__}, got {type(options).__name__}")
    try:
        if options is None:
            return model.model_validate(dict(overrides))
        if not overrides:
            return options
        data = options.model_dump(exclude_unset=True)
        if "hosts" in overrides:  # LocalOptions' shorthand replaces both bounds
            data.pop("min_hosts", None)
            data.pop("max_hosts", None)
        return model.model_validate({**data, **overrides})
    except ValidationError as exc:
        raise ConfigError(f"{model.__name__}: {_one_line(exc)}") from None

"""Backend selection by name: a small registry of factories, failing closed on unknown names.

``local``, ``docker`` and ``nomad`` are built in; ``modal`` is available when the ``modal`` SDK
is installed (the ``modal`` extra). Asking for a backend that is not available here is a
:class:`~structenv.ConfigError` saying so, raised before anything starts (never a silent
fallback to another backend). A backend package registers itself with
:func:`register_backend`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
from collections.abc import Callable, Mapping
from typing import Any

from .._exceptions import ConfigError
from ..abc import SandboxBackend

__all__ = [
    "KNOWN_BACKENDS",
    "BackendFactory",
    "BackendSettings",
    "available_backends",
    "create_backend",
    "register_backend",
]

#: Backend names the configuration accepts (whether or not they are available here).
KNOWN_BACKENDS: tuple[str, ...] = ("local", "docker", "nomad", "modal")


@dataclasses.dataclass(frozen=True, slots=True)
class BackendSettings:
    """What an environment asks of its backend; each factory maps it to its own options.

    Attributes:
        slots_per_host: Slots (isolated workspaces) per sandbox host.
        min_hosts: Hosts started up front.
        max_hosts: Upper bound for backends that scale (a fixed-size backend starts
            ``min_hosts``).
        allow_network: Slots may reach the network.
        require_sandbox: Fail closed if isolation is unavailable.
        require_stateful_sandbox: Fail closed if the isolated stateful terminal (tmux inside
            the slot's sandbox) is unavailable.
        options: Backend-specific extras, passed through untouched.
    """

    slots_per_host: int = 4
    min_hosts: int = 1
    max_hosts: int = 1
    allow_network: bool = False
    require_sandbox: bool = True
    require_stateful_sandbox: bool = False
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.slots_per_host < 1:
            raise ConfigError("slots_per_host must be >= 1")
        if self.min_hosts < 1:
            raise ConfigError("min_hosts must be >= 1")
        if self.max_hosts < self.min_hosts:
            raise ConfigError(f"max_hosts ({self.max_hosts}) < min_hosts ({self.min_hosts})")


#: Builds a (not yet started) backend from settings; raises ConfigError on unusable settings.
BackendFactory = Callable[[BackendSettings], SandboxBackend]


def _local(settings: BackendSettings) -> SandboxBackend:
    from ..backends import LocalBackend

    if settings.require_stateful_sandbox:
        if not settings.require_sandbox:
            raise ConfigError("require_stateful_sandbox needs require_sandbox")
        if shutil.which("tmux") is None:
            raise ConfigError(
                "require_stateful_sandbox is set but tmux is not installed on this host"
            )
    return LocalBackend(
        hosts=settings.min_hosts,
        slots_per_host=settings.slots_per_host,
        allow_network=settings.allow_network,
        require_sandbox=settings.require_sandbox,
        **dict(settings.options),
    )


def _docker(settings: BackendSettings) -> SandboxBackend:
    from ..backends import DockerBackend

    if settings.require_stateful_sandbox and not settings.require_sandbox:
        raise ConfigError("require_stateful_sandbox needs require_sandbox")
    return DockerBackend(
        slots_per_container=settings.slots_per_host,
        min_containers=settings.min_hosts,
        max_containers=settings.max_hosts,
        allow_network=settings.allow_network,
        require_sandbox=settings.require_sandbox,
        **dict(settings.options),
    )


def _nomad(settings: BackendSettings) -> SandboxBackend:
    from ..backends import NomadBackend

    if settings.require_stateful_sandbox and not settings.require_sandbox:
        raise ConfigError("require_stateful_sandbox needs require_sandbox")
    return NomadBackend(
        slots_per_allocation=settings.slots_per_host,
        min_allocations=settings.min_hosts,
        max_allocations=settings.max_hosts,
        allow_network=settings.allow_network,
        require_sandbox=settings.require_sandbox,
        **dict(settings.options),
    )


def _modal(settings: BackendSettings) -> SandboxBackend:
    from ..backends import ModalBackend

    if settings.require_stateful_sandbox and not settings.require_sandbox:
        raise ConfigError("require_stateful_sandbox needs require_sandbox")
    return ModalBackend(
        slots_per_sandbox=settings.slots_per_host,
        min_sandboxes=settings.min_hosts,
        max_sandboxes=settings.max_hosts,
        allow_network=settings.allow_network,
        require_sandbox=settings.require_sandbox,
        **dict(settings.options),
    )


_REGISTRY: dict[str, BackendFactory] = {
    "local": _local,
    "docker": _docker,
    "nomad": _nomad,
    "modal": _modal,
}
#: Backends that need an optional SDK (module name), and the extra that installs it.
_REQUIRES: dict[str, tuple[str, str]] = {"modal": ("modal", "modal")}


def _installed(name: str) -> bool:
    module, _ = _REQUIRES.get(name, ("", ""))
    return not module or importlib.util.find_spec(module) is not None


def register_backend(name: str, factory: BackendFactory, *, replace: bool = False) -> None:
    """Make backend ``name`` available to :func:`create_backend`.

    Raises:
        ConfigError: ``name`` is already registered and ``replace`` is false.
    """
    if name in _REGISTRY and not replace:
        raise ConfigError(f"backend {name!r} is already registered")
    _REGISTRY[name] = factory


def available_backends() -> list[str]:
    """Names :func:`create_backend` can build on this installation."""
    return sorted(name for name in _REGISTRY if _installed(name))


def check_backend(name: str) -> None:
    """Raise :class:`~structenv.ConfigError` unless backend ``name`` can be built here."""
    if name in _REGISTRY and _installed(name):
        return
    if name in _REGISTRY:
        raise ConfigError(
            f"backend {name!r} is not available: its SDK is not installed "
            f"(pip install structenv[{_REQUIRES[name][1]}])"
        )
    if name in KNOWN_BACKENDS:
        raise ConfigError(
            f"backend {name!r} is not available in this version of structenv "
            f"(available: {', '.join(available_backends())})"
        )
    raise ConfigError(
        f"backend {name!r} is not available: unknown backend "
        f"(available: {', '.join(available_backends())})"
    )


def create_backend(name: str, settings: BackendSettings) -> SandboxBackend:
    """Build backend ``name`` (not started: enter it with ``async with``).

    Raises:
        ConfigError: The backend is unknown, not available yet, or rejects the settings.
    """
    check_backend(name)
    return _REGISTRY[name](settings)

"""Backends by name: each name maps to its class and its options model.

``local``, ``docker`` and ``nomad`` are always available; ``modal`` and ``ray`` when their SDK
is installed (the ``modal`` / ``ray`` extras). Asking for a backend that is not available here
is a :class:`~structenv.ConfigError` saying so, raised before anything starts (never a silent
fallback to another backend). Env configs select a backend by name and give its options as a
mapping validated by the entry's model (:func:`backend_options`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
from collections.abc import Callable, Mapping
from typing import Any

from .._exceptions import ConfigError
from ..abc import SandboxBackend
from ._docker import DockerBackend
from ._local import LocalBackend
from ._modal import ModalBackend
from ._nomad import NomadBackend
from ._options import (
    DockerOptions,
    HostedOptions,
    LocalOptions,
    ModalOptions,
    NomadOptions,
    RayOptions,
    resolve_options,
)
from ._ray import RayBackend

__all__ = [
    "KNOWN_BACKENDS",
    "BackendEntry",
    "available_backends",
    "backend_entry",
    "backend_options",
    "create_backend",
    "register_backend",
]


@dataclasses.dataclass(frozen=True, slots=True)
class BackendEntry:
    """One backend in the registry.

    Attributes:
        name: Its name in configs (``backend: docker``).
        factory: Builds it from a validated options model (usually the backend class).
        options: Its pydantic options model.
        requires: A module that must be importable for it to work (its SDK), or ``None``.
        extra: The pip extra installing that module.
    """

    name: str
    factory: Callable[[Any], SandboxBackend]
    options: type[HostedOptions]
    requires: str | None = None
    extra: str | None = None

    @property
    def installed(self) -> bool:
        return self.requires is None or importlib.util.find_spec(self.requires) is not None


_REGISTRY: dict[str, BackendEntry] = {
    e.name: e
    for e in (
        BackendEntry("local", LocalBackend, LocalOptions),
        BackendEntry("docker", DockerBackend, DockerOptions),
        BackendEntry("nomad", NomadBackend, NomadOptions),
        BackendEntry("modal", ModalBackend, ModalOptions, requires="modal", extra="modal"),
        BackendEntry("ray", RayBackend, RayOptions, requires="ray", extra="ray"),
    )
}

#: Backend names structenv ships (whether or not their SDK is installed here).
KNOWN_BACKENDS: tuple[str, ...] = tuple(_REGISTRY)


def register_backend(entry: BackendEntry, *, replace: bool = False) -> None:
    """Make a backend available by name.

    Raises:
        ConfigError: ``entry.name`` is already registered and ``replace`` is false.
    """
    if entry.name in _REGISTRY and not replace:
        raise ConfigError(f"backend {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry


def available_backends() -> list[str]:
    """Names :func:`create_backend` can build on this installation."""
    return sorted(name for name, entry in _REGISTRY.items() if entry.installed)


def backend_entry(name: str) -> BackendEntry:
    """The registry entry of backend ``name``, if it can be built here.

    Raises:
        ConfigError: Unknown, or its SDK is not installed.
    """
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ConfigError(
            f"backend {name!r} is not available: unknown backend "
            f"(available: {', '.join(available_backends())})"
        )
    if not entry.installed:
        raise ConfigError(
            f"backend {name!r} is not available: its SDK is not installed "
            f"(pip install structenv[{entry.extra}])"
        )
    return entry


def backend_options(name: str, options: Mapping[str, Any] | None = None) -> HostedOptions:
    """Validate ``options`` for backend ``name`` (its options model; unknown keys fail).

    Raises:
        ConfigError: Unknown or unavailable backend, or invalid options (one line).
    """
    entry = _REGISTRY.get(name)
    if entry is None:
        backend_entry(name)  # raises the message
        raise AssertionError("unreachable")  # pragma: no cover
    return resolve_options(entry.options, None, dict(options or {}))


def create_backend(
    name: str,
    options: HostedOptions | Mapping[str, Any] | None = None,
    *,
    require_stateful_sandbox: bool = False,
) -> SandboxBackend:
    """Build backend ``name`` (not started: enter it with ``async with``).

    Args:
        name: A registered backend name.
        options: Its options model, or a mapping validated by it.
        require_stateful_sandbox: Fail closed unless the isolated stateful terminal (tmux
            inside the slot's sandbox) can work (needs ``require_sandbox``; locally, tmux).

    Raises:
        ConfigError: The backend is unknown, not available, or rejects the options.
    """
    entry = backend_entry(name)
    if not isinstance(options, HostedOptions):
        options = backend_options(name, options)
    elif not isinstance(options, entry.options):
        raise ConfigError(f"backend {name!r} takes {entry.options.__name__}")
    if require_stateful_sandbox:
        if not options.require_sandbox:
            raise ConfigError("require_stateful_sandbox needs require_sandbox")
        if name == "local" and shutil.which("tmux") is None:
            raise ConfigError(
                "require_stateful_sandbox is set but tmux is not installed on this host"
            )
    return entry.factory(options)

"""Control planes: start, watch and stop sandbox hosts, and hand out their slots.

Importing this package imports no SDK: ``docker`` is imported when a DockerBackend starts,
``modal`` when a ModalBackend starts, ``ray`` when a RayBackend starts; the Nomad backend only
needs httpx. Each backend takes one frozen options model (:mod:`._options`); the registry
(:mod:`._registry`) maps backend names to both.
"""

from ._docker import DockerBackend as DockerBackend
from ._hosted import HostedBackend as HostedBackend
from ._local import LocalBackend as LocalBackend
from ._modal import ModalBackend as ModalBackend
from ._nomad import NomadBackend as NomadBackend
from ._options import DockerOptions as DockerOptions
from ._options import HostedOptions as HostedOptions
from ._options import LocalOptions as LocalOptions
from ._options import ModalOptions as ModalOptions
from ._options import NomadOptions as NomadOptions
from ._options import RayOptions as RayOptions
from ._ray import RayBackend as RayBackend
from ._registry import BackendEntry as BackendEntry
from ._registry import available_backends as available_backends
from ._registry import backend_entry as backend_entry
from ._registry import create_backend as create_backend
from ._registry import register_backend as register_backend

__all__ = [
    "BackendEntry",
    "DockerBackend",
    "DockerOptions",
    "HostedBackend",
    "HostedOptions",
    "LocalBackend",
    "LocalOptions",
    "ModalBackend",
    "ModalOptions",
    "NomadBackend",
    "NomadOptions",
    "RayBackend",
    "RayOptions",
    "available_backends",
    "backend_entry",
    "create_backend",
    "register_backend",
]

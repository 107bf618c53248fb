"""Control planes: start, watch and stop sandbox hosts, and hand out their slots.

Importing this package imports no SDK: ``docker`` is imported when a DockerBackend starts,
``modal`` when a ModalBackend starts; the Nomad backend only needs httpx.
"""

from ._docker import DockerBackend as DockerBackend
from ._hosted import HostedBackend as HostedBackend
from ._local import LocalBackend as LocalBackend
from ._modal import ModalBackend as ModalBackend
from ._nomad import NomadBackend as NomadBackend

__all__ = ["DockerBackend", "HostedBackend", "LocalBackend", "ModalBackend", "NomadBackend"]

"""Control planes: start, watch and stop sandbox hosts, and hand out their slots."""

from ._docker import DockerBackend as DockerBackend
from ._local import LocalBackend as LocalBackend

__all__ = ["DockerBackend", "LocalBackend"]

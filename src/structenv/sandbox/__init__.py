"""The sandbox data plane: the server that runs on every sandbox host, and its client.

Run a host with ``python -m structenv.sandbox --socket PATH --slots N``; talk to it with
:class:`HostClient` and :class:`RemoteSlot`. Backends (local processes, containers) only
start, watch and stop these servers.

The lower-level names (how one slot's bwrap command line, uid and seccomp filter are made, and
the isolation probe) are public for backend authors, ``structenv doctor`` and the benchmark
harness, which measures each layer of a slot on its own.
"""

from ._bwrap import CGROUP_V1 as CGROUP_V1
from ._bwrap import Isolation as Isolation
from ._bwrap import bwrap_argv as bwrap_argv
from ._bwrap import default_uid_base as default_uid_base
from ._bwrap import probe_report as probe_report
from ._bwrap import slot_uid as slot_uid
from ._client import HostClient as HostClient
from ._client import RemoteSlot as RemoteSlot
from ._rootfs import host_prefixes as host_prefixes
from ._runtime import WORKER_FILE as WORKER_FILE
from ._runtime import Limits as Limits
from ._runtime import slot_argv as slot_argv
from ._seccomp import open_program as open_seccomp_program
from ._server import SandboxServer as SandboxServer
from ._server import ServerConfig as ServerConfig

__all__ = [
    "CGROUP_V1",
    "HostClient",
    "Isolation",
    "Limits",
    "RemoteSlot",
    "SandboxServer",
    "ServerConfig",
    "WORKER_FILE",
    "bwrap_argv",
    "default_uid_base",
    "host_prefixes",
    "open_seccomp_program",
    "probe_report",
    "slot_argv",
    "slot_uid",
]

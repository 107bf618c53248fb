"""The sandbox data plane: the server that runs on every sandbox host, and its client.

Run a host with ``python -m structenv.sandbox --socket PATH --slots N``; talk to it with
:class:`HostClient` and :class:`RemoteSlot`. Backends (local processes, containers) only
start, watch and stop these servers.
"""

from ._bwrap import Isolation as Isolation
from ._client import HostClient as HostClient
from ._client import RemoteSlot as RemoteSlot
from ._runtime import Limits as Limits
from ._server import SandboxServer as SandboxServer
from ._server import ServerConfig as ServerConfig

__all__ = ["HostClient", "Isolation", "Limits", "RemoteSlot", "SandboxServer", "ServerConfig"]

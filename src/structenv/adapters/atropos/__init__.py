"""The Atropos adapter: :class:`AgentEnv`, an Atropos ``BaseEnv`` with sandboxed tool calls.

This package is the only part of structenv that imports atroposlib. It needs the optional
``structenv[atropos]`` extra and runs on asyncio only (atroposlib uses aiohttp and
``asyncio.create_task``). Everything an env needs from atroposlib is re-exported here
(``APIServerConfig``), so env modules import atroposlib through structenv or not at all.
"""

from atroposlib.envs.base import APIServerConfig as APIServerConfig

from ..._logging import unpin_atroposlib_loggers
from ._config import AgentEnvConfig as AgentEnvConfig
from ._config import AgentEnvStatistics as AgentEnvStatistics
from ._config import GroupReport as GroupReport
from ._env import AgentEnv as AgentEnv
from ._policy import AtroposPolicy as AtroposPolicy
from ._policy import open_atropos_policy as open_atropos_policy

# atroposlib pins its env loggers at DEBUG on import; let them follow the application's
# logging configuration instead (structenv itself configures none: see _logging.py).
unpin_atroposlib_loggers()

__all__ = [
    "APIServerConfig",
    "AgentEnv",
    "AgentEnvConfig",
    "AgentEnvStatistics",
    "AtroposPolicy",
    "GroupReport",
    "open_atropos_policy",
]

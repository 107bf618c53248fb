"""Adapters that plug structenv into RL frameworks.

``structenv.adapters.atropos`` holds :class:`~structenv.adapters.atropos.AgentEnv`, an Atropos
``BaseEnv`` that runs each group of trajectories in one task group with sandboxed tool calls.
It needs the optional ``structenv[atropos]`` extra and runs on asyncio only (atroposlib uses
aiohttp and ``asyncio.create_task``), so it is imported only when asked for::

    from structenv.adapters.atropos import AgentEnv, AgentEnvConfig

This package itself never imports atroposlib: the pieces that do not need it (the workspace
helper handed to hooks, token sequences and group assembly) live here and are usable and
testable on Trio too. Backends are selected by name through :mod:`structenv.backends`'
registry (``create_backend``).
"""

from ._sequence import MemberOutcome as MemberOutcome
from ._sequence import TokenSequence as TokenSequence
from ._sequence import build_scored_group as build_scored_group
from ._sequence import retokenize_messages as retokenize_messages
from ._workspace import ExecTool as ExecTool

__all__ = [
    "ExecTool",
    "MemberOutcome",
    "TokenSequence",
    "build_scored_group",
    "retokenize_messages",
]

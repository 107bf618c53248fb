"""Example environments built on :class:`~structenv.adapters.atropos.AgentEnv`.

* :mod:`structenv.examples.shell_tasks` — ``ShellTasksEnv``: fix a small repo or produce a
  file; the workspace is prepared per trajectory and the task's tests run inside the same
  slot to score it (fraction passing).
* :mod:`structenv.examples.data_wrangling` — ``DataWranglingEnv``: transform an input file
  into JSON; scored by comparing the produced file with the expected output.

Both need ``structenv[atropos]`` and are imported on first use (this package does not import
atroposlib). Their reference solutions (``shell_task_solutions()``,
``data_wrangling_solutions()``) drive the scripted policy server of ``structenv demo``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DataWranglingEnv", "ShellTasksEnv"]

_LAZY = {
    "ShellTasksEnv": "structenv.examples.shell_tasks",
    "DataWranglingEnv": "structenv.examples.data_wrangling",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

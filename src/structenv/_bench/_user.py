"""``structenv bench exec --backend module:factory``: the exec benchmark on your backend.

``factory`` is a callable taking no arguments that returns an **unstarted**
:class:`~structenv.abc.SandboxBackend` (a class works, or a function that builds one with
your options). The harness starts it, then measures one command (``--command``, default
``/bin/true``) in a closed loop per caller at 1, 2, 4, ... callers up to the backend's
capacity (at most 64), two ways:

- ``slot_api``: slots leased from the backend directly, ``slot.exec`` (your backend alone);
- ``full_stack``: trajectories of a :class:`~structenv.ToolExecutor` over it, ``traj.exec``
  (what an env's tool calls pay: executor, batcher, pool, your backend).

Results: ``DIR/user.json`` and ``DIR/user.png``. Each level's p50/p99 and commands per second;
a command that fails stops the run with its result.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio

from .._config import ExecutorConfig
from .._exceptions import ConfigError
from .._executor import ToolExecutor
from .._types import ExecRequest
from ..abc import SandboxBackend
from ._report import machine_info, progress
from ._report import measure_latencies as _loop
from ._report import summarize_ms as _summary

__all__ = ["load_factory", "run_user_bench"]


def load_factory(spec: str) -> Callable[[], SandboxBackend]:
    """The callable named by ``module:attribute`` (``pkg.mod:make_backend``).

    Raises:
        ConfigError: A malformed spec, a module or attribute that does not exist.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--backend {spec!r}: expected module:factory (e.g. mypkg.bench:make)")
    if os.getcwd() not in sys.path:  # as `python -m` and `structenv run` would: the console
        sys.path.insert(0, os.getcwd())  # script alone does not look in the current directory
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--backend {spec!r}: cannot import {module_name} ({exc})") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ConfigError(f"--backend {spec!r}: {module_name} has no attribute {attr}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ConfigError(f"--backend {spec!r}: {attr} is not callable")
    return factory


def _levels(capacity: int, quick: bool) -> list[int]:
    top = min(capacity, 4 if quick else 64)
    levels = [1]
    while levels[-1] * 2 <= top:
        levels.append(levels[-1] * 2)
    if levels[-1] != top:
        levels.append(top)
    return levels


def _check(result: Any, command: str) -> None:
    if not getattr(result, "ok", False):
        raise RuntimeError(f"benchmark command {command!r} failed: {result}")


async def run_user_bench(
    factory: Callable[[], SandboxBackend], *, command: str, quick: bool, name: str = ""
) -> dict[str, Any]:
    """Measure ``command`` on the backend ``factory()`` builds (see the module docstring).

    Cancellation: slots are released and the backend stopped by its own ``__aexit__``.
    """
    backend = factory()
    if not isinstance(backend, SandboxBackend):
        raise ConfigError(
            f"--backend {name}: the factory returned {type(backend).__name__}, "
            "not a structenv.abc.SandboxBackend"
        )
    total = 120 if quick else 2000
    request = ExecRequest(command, timeout=60)
    slot_api: dict[str, Any] = {}
    full_stack: dict[str, Any] = {}
    progress(f"starting {type(backend).__name__}")
    async with backend:
        levels = _levels(max(1, backend.capacity), quick)
        slots: list[Any] = []
        try:
            for _ in range(levels[-1]):
                slots.append(await backend.acquire_slot())

            async def op(index: int) -> None:
                _check(await slots[index].exec(request), command)

            await _loop(1, 3, op)  # warm-up
            for c in levels:
                progress(f"slot API, {c} concurrent callers")
                slot_api[f"c{c}"] = await _loop(c, max(total // c, 10), op)
        finally:
            with anyio.CancelScope(shield=True):
                for slot in slots:
                    await backend.release_slot(slot, reusable=True)
        async with ToolExecutor(backend, config=ExecutorConfig(tool_deadline_grace=5)) as ex:
            for c in levels:
                progress(f"full stack, {c} concurrent trajectories")
                latencies: list[float] = []

                async def trajectory(rounds: int, into: list[float]) -> None:
                    async with ex.trajectory() as traj:
                        for _ in range(rounds):
                            start = time.perf_counter()
                            _check(await traj.exec(request), command)
                            into.append(time.perf_counter() - start)

                start = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for _ in range(c):
                        tg.start_soon(trajectory, max(total // c, 10), latencies)
                full_stack[f"c{c}"] = _summary(latencies, time.perf_counter() - start)
    return {
        "benchmark": "user",
        "backend": name or type(backend).__name__,
        "command": command,
        "quick": quick,
        "machine": machine_info(),
        "slot_api": slot_api,
        "full_stack": full_stack,
    }

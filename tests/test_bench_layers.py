"""The exec benchmark's layer drivers: real processes, real sandboxes, nothing left behind."""

from __future__ import annotations

import functools
from collections.abc import Callable

import anyio
import pytest

from structenv import ExecRequest
from structenv._bench import _layers
from structenv._bench._report import summarize_ms
from structenv._bench.exec import _layer_costs, _layers_below
from structenv.backends import LocalBackend
from structenv.sandbox import RemoteSlot
from structenv.testing import child_processes, cmdline

pytestmark = pytest.mark.anyio


def _check(measured: tuple[list[float], float] | None, n: int) -> None:
    assert measured is not None
    latencies, elapsed = measured
    assert len(latencies) == n
    assert all(0 < t <= elapsed for t in latencies)


async def test_spawn_worker_and_wakeup_drivers(tmp_path: object) -> None:
    run = anyio.to_thread.run_sync
    _check(await run(_layers.posix_spawn_floor, 5), 5)
    _check(await run(_layers.worker_only, 5, str(tmp_path)), 5)
    # The pre-hardening command line, measured beside it for the cost of the hardening.
    _check(await run(functools.partial(_layers.worker_only, 5, str(tmp_path), hardened=False)), 5)
    _check(await run(functools.partial(_layers.wakeup_rtt, 5, same_cpu=True)), 5)
    _check(await run(functools.partial(_layers.wakeup_rtt, 5, same_cpu=False)), 5)
    assert child_processes() == []


async def test_server_driver_against_a_real_host() -> None:
    async with LocalBackend(hosts=1, slots_per_host=1) as backend:
        slot = await backend.acquire_slot()
        assert isinstance(slot, RemoteSlot) and isinstance(slot.client.address, str)
        body = slot._json(request=ExecRequest("/bin/true").to_wire())
        head = slot.client._head("POST", "/v1/exec", len(body), "application/json")
        driver = functools.partial(_layers.server_only, 5, slot.client.address, head, body)
        _check(await anyio.to_thread.run_sync(driver), 5)
        # A failing command is reported, not timed.
        bad = slot._json(request=ExecRequest("/bin/false").to_wire())
        failing = functools.partial(_layers.server_only, 1, slot.client.address, head, bad)
        with pytest.raises(RuntimeError, match="failed on the server"):
            await anyio.to_thread.run_sync(failing)
        await backend.release_slot(slot, reusable=True)


@pytest.mark.parametrize("delay", [0.0, 0.3, 1.0])
async def test_cancelled_drivers_leave_no_process(tmp_path: object, delay: float) -> None:
    drivers: list[Callable[[], object]] = [
        functools.partial(_layers.worker_only, 10**7, str(tmp_path)),
        functools.partial(_layers.wakeup_rtt, 10**9, same_cpu=False),
    ]
    for driver in drivers:
        with anyio.move_on_after(delay) as scope:
            await anyio.to_thread.run_sync(driver)
        assert scope.cancelled_caught
        assert [cmdline(p) for p in child_processes()] == []


@pytest.mark.parametrize("delay", [0.1, 0.5, 1.0, 1.5, 2.5])
async def test_cancelled_layer_run_leaves_no_process(delay: float) -> None:
    # Cancelled at different phases (spawn floor, wake-ups, worker, host start, server).
    with anyio.move_on_after(delay):
        await _layers_below(quick=True)
    assert [cmdline(p) for p in child_processes()] == []


def test_layer_costs_are_differences_of_neighbouring_medians() -> None:
    def at(p50: float) -> dict[str, dict[str, float]]:
        return {"c1": summarize_ms([p50 / 1e3], 1.0)}

    below = {"posix_spawn_floor": at(0.6), "worker_only": at(0.8), "server_only": at(1.1)}
    costs = _layer_costs(below, at(1.2), at(1.35))
    assert costs == {
        "posix_spawn": 0.6,
        "worker": 0.2,
        "server_hop": 0.3,
        "async_client": 0.1,
        "executor": 0.15,
    }

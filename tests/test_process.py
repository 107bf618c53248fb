"""kill_child: SIGKILL without reaping, so asyncio's child watcher never loses a status."""

from __future__ import annotations

import logging
import signal

import anyio
import anyio.lowlevel
import pytest

from structenv._process import kill_child
from structenv.testing import child_processes

pytestmark = pytest.mark.anyio


async def test_killing_children_as_they_exit_loses_no_status(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A child killed right as it exits: with ``Process.kill()`` asyncio's watcher logged
    "Unknown child process pid N, will report returncode 255" for about 1 in 5 here."""
    caplog.set_level(logging.WARNING, logger="asyncio")
    codes = set()
    for _ in range(40):
        proc = await anyio.open_process(["true"])
        for _ in range(3):  # let it exit, but kill before the loop has reaped it
            await anyio.lowlevel.checkpoint()
        kill_child(proc)
        codes.add(await proc.wait())
        kill_child(proc)  # reaped: a no-op, never a signal to a reused pid
        await proc.aclose()
    assert codes <= {0, -signal.SIGKILL}
    assert not [r for r in caplog.records if "Unknown child process" in r.getMessage()]
    assert not child_processes()


async def test_kill_child_kills_a_running_child() -> None:
    proc = await anyio.open_process(["sleep", "30"])
    kill_child(proc, signal.SIGTERM)
    with anyio.fail_after(30):
        assert await proc.wait() == -signal.SIGTERM
    await proc.aclose()

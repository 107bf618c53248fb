"""``run_until_signal`` in-process, on asyncio and trio: the first SIGTERM/SIGINT cancels the
work once and ends in :class:`Interrupted`; results, errors and outer cancellation pass through;
the signal handlers are restored. (Real commands under signals: ``test_cli_process.py``.)"""

from __future__ import annotations

import functools
import os
import signal

import anyio
import anyio.lowlevel
import pytest

from structenv._main import Interrupted, report_error, run_until_signal

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_first_signal_cancels_the_work_and_its_cleanup_runs_once(
    signum: signal.Signals, capsys: pytest.CaptureFixture[str]
) -> None:
    before = signal.getsignal(signum)
    cleanups: list[str] = []

    async def work() -> None:
        os.kill(os.getpid(), signum)  # the receiver is open before the work starts
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.lowlevel.checkpoint()  # a shielded teardown step still runs
                cleanups.append("teardown")

    with pytest.raises(Interrupted) as info:
        await run_until_signal(work, prog="prog")
    assert cleanups == ["teardown"]
    assert info.value.exit_status == 128 + signum
    assert capsys.readouterr().err == (
        f"prog: {signum.name} received; shutting down (send it again to stop at once)\n"
    )
    assert report_error(info.value, prog="prog") == 128 + signum
    assert capsys.readouterr().err == ""  # its line was printed when the signal arrived
    assert signal.getsignal(signum) == before


async def test_result_error_and_outer_cancellation_pass_through() -> None:
    async def answer(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        return x + 1

    assert await run_until_signal(answer, 41, prog="p") == 42

    async def fail() -> None:
        raise KeyError("bug")

    with pytest.raises(KeyError):  # the error itself, not an exception group
        await run_until_signal(fail, prog="p")

    started = anyio.Event()
    finished: list[str] = []

    async def forever() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            finished.append("cancelled")

    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(run_until_signal, forever, prog="p"))
        await started.wait()
        tg.cancel_scope.cancel()
    assert finished == ["cancelled"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

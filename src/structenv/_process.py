"""Killing a child process without stealing its exit status from the event loop.

``anyio.abc.Process.kill()`` on asyncio ends in ``subprocess.Popen.send_signal``, which first
calls ``Popen.poll()``: a ``waitpid`` that reaps the child if it has just exited. asyncio's
child watcher (a thread per child on Python 3.11, blocked in its own ``waitpid``) then finds
no child and logs ``Unknown child process pid N, will report returncode 255`` — at shutdown,
when hosts and sandboxes are killed right as they exit, and ``wait()`` returns 255 instead
of the real status. :func:`kill_child` sends the signal with ``os.kill`` and leaves reaping to
the event loop, on asyncio and trio alike.
"""

from __future__ import annotations

import os
import signal

import anyio.abc

__all__ = ["kill_child"]


def kill_child(proc: anyio.abc.Process, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` (default SIGKILL) to ``proc`` unless it has been reaped; never reaps it.

    A child that exited but is not reaped yet is a zombie: its pid cannot be reused, so the
    signal reaches nothing else. (The event loop records the status just after reaping; in
    that instant the pid could in principle be reused, the same window ``Popen`` has.)
    """
    if proc.returncode is not None:
        return
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass

"""Slow downloads and builds started in the background when the session starts (no tests here).

The vLLM venv (minutes of ``uv pip install``, mostly network and disk) and the Docker sandbox
image (~2 min of ``docker build``) are needed only by a few modules, late in the run or after
a minute of other tests. ``tests/conftest.py`` starts each one as a child process as soon as
collection shows a selected test needs it; the fixture that needs it calls :func:`wait`
before doing the same work itself (which then finds it cached, or redoes it and fails loudly
with its own error). Whatever is still running when the session ends is killed as a group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

#: Running (or finished) prefetches by name: the process and its log file.
_JOBS: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

HERE = Path(__file__).resolve().parent


def start(name: str, code: str) -> None:
    """Run ``code`` (Python, in ``tests/``) in the background as prefetch ``name``."""
    if name in _JOBS:
        return
    log = Path(tempfile.mkstemp(prefix=f"structenv-prefetch-{name}-", suffix=".log")[1])
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=HERE,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() kills uv or docker too
            preexec_fn=die_with_parent,
        )
    _JOBS[name] = (process, log)


def wait(name: str) -> None:
    """Wait for prefetch ``name`` if it was started; raise with its log's tail if it failed.

    Raises:
        RuntimeError: The prefetch exited non-zero (the message ends with its last lines).
    """
    job = _JOBS.get(name)
    if job is None:
        return
    process, log = job
    if process.wait() != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"the {name} prefetch failed (exit {process.returncode}):\n{tail}")


def stop() -> None:
    """Kill every prefetch still running (the session ends) and remove the logs."""
    for process, log in _JOBS.values():
        if process.poll() is None:
            kill_group(process)
        log.unlink(missing_ok=True)
    _JOBS.clear()


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM ``process``'s group (it leads one), SIGKILL after 20 s, and reap it; nothing
    of the group outlives it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # whatever the group left behind


def die_with_parent() -> None:
    """``preexec_fn``: the child is SIGKILLed when the test run dies without teardown (the
    hang guard's ``os._exit``, SIGKILL), instead of eating the machine's CPU for hours."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)

"""Slow downloads and builds started in the background when the session starts (no tests here).

The vLLM venv (minutes of ``uv pip install``, mostly network and disk) and the Docker sandbox
image (~2 min of ``docker build``) are needed only by a few modules, late in the run or after
a minute of other tests. ``tests/conftest.py`` starts each one as soon as collection shows a
selected test needs it; the fixture that needs it calls :func:`wait` before doing the same
work itself (which then finds it cached, or redoes it and fails loudly with its own error).
Whatever is still running when the session ends is killed as a group.

A prefetch is not a descendant of the test run: it is double-forked (and killed with its
group if the run dies), because the leak checks count the run's descendants
(``structenv.testing.child_processes``), and a running prefetch, or a finished one not
reaped yet, is not a process any test leaked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Run by the launcher: fork, and in the grandchild run the prefetch, report its pid, watch
#: the test run (SIGKILL to the whole group when it dies) and leave the exit status in a file.
_LAUNCHER = r"""
import os, select, signal, subprocess, sys, threading
code, status, log, run = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if os.fork():
    os._exit(0)
watch = os.pidfd_open(run)
print(os.getpid(), flush=True)
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)

def orphaned():
    select.select([watch], [], [])
    os.killpg(0, signal.SIGKILL)

threading.Thread(target=orphaned, daemon=True).start()
with open(log, "wb") as out:
    rc = subprocess.run([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL).returncode
with open(status + ".tmp", "w") as f:
    f.write(str(rc))
os.rename(status + ".tmp", status)
"""


@dataclasses.dataclass
class _Job:
    pid: int  # the prefetch (the launcher's grandchild)
    group: int  # its process group (the launcher's pid)
    status: Path
    log: Path


#: Prefetches started by this test run, by name.
_JOBS: dict[str, _Job] = {}


def start(name: str, code: str) -> None:
    """Run ``code`` (Python, in ``tests/``) in the background as prefetch ``name``."""
    if name in _JOBS:
        return
    scratch = Path(tempfile.mkdtemp(prefix=f"structenv-prefetch-{name}-"))
    status, log = scratch / "status", scratch / "log"
    launcher = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, code, str(status), str(log), str(os.getpid())],
        cwd=HERE,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=True,  # its own group: stop() kills uv or docker with it
    )
    assert launcher.stdout is not None
    with launcher.stdout:
        line = launcher.stdout.readline()
    launcher.wait()
    if not line.strip():
        raise RuntimeError(f"the {name} prefetch did not start (exit {launcher.returncode})")
    _JOBS[name] = _Job(int(line), launcher.pid, status, log)


def _wait_exit(pid: int, timeout: float | None) -> bool:
    """Whether process ``pid`` (not a child) is gone within ``timeout`` seconds."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def wait(name: str) -> None:
    """Wait for prefetch ``name`` if it was started; raise with its log's tail if it failed.

    Raises:
        RuntimeError: The prefetch exited non-zero or died (the message ends with its log).
    """
    job = _JOBS.get(name)
    if job is None:
        return
    _wait_exit(job.pid, None)
    try:
        code = int(job.status.read_text())
    except (OSError, ValueError):
        code = None
    if code != 0:
        try:
            tail = "\n".join(job.log.read_text(errors="replace").splitlines()[-30:])
        except OSError:
            tail = "(no log)"
        what = "died" if code is None else f"failed (exit {code})"
        raise RuntimeError(f"the {name} prefetch {what}:\n{tail}")


def stop() -> None:
    """Kill every prefetch still running (the session ends) and remove their files."""
    for job in _JOBS.values():
        if not job.status.exists():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.group, signal.SIGTERM)
            if not _wait_exit(job.pid, 20):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(job.group, signal.SIGKILL)
                _wait_exit(job.pid, 20)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.group, signal.SIGKILL)  # whatever the group left behind
        for path in (job.status, job.log):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            job.status.parent.rmdir()
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

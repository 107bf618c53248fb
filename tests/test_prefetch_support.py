"""The test suite's background prefetches (tests/prefetch_support.py) fail loudly, are no
descendants of the test run (its leak checks count those) and leave nothing running."""

from __future__ import annotations

import os
import signal
import time

import pytest

import prefetch_support
from structenv.testing import child_processes


def test_a_failed_prefetch_raises_with_its_logs_tail() -> None:
    prefetch_support.start("t-fail", "print('the reason'); raise SystemExit(3)")
    try:
        assert child_processes() == []  # neither running nor a zombie of ours
        with pytest.raises(RuntimeError, match=r"t-fail prefetch failed \(exit 3\):\nthe reason"):
            prefetch_support.wait("t-fail")
    finally:
        prefetch_support.stop()


def test_a_prefetch_that_succeeds_is_waited_for() -> None:
    prefetch_support.start("t-ok", "import time; time.sleep(0.2)")
    try:
        prefetch_support.wait("t-ok")
        assert prefetch_support._JOBS["t-ok"].status.read_text() == "0"
        assert child_processes() == []
    finally:
        prefetch_support.stop()


def test_a_killed_prefetch_is_reported_as_died() -> None:
    prefetch_support.start("t-die", "import time; time.sleep(600)")
    try:
        os.kill(prefetch_support._JOBS["t-die"].pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="t-die prefetch died"):
            prefetch_support.wait("t-die")
    finally:
        prefetch_support.stop()


def test_stop_kills_a_running_prefetch_and_its_children() -> None:
    code = (
        "import subprocess, time; subprocess.Popen(['sleep', '1234.5']); "
        "print('spawned', flush=True); time.sleep(600)"
    )
    prefetch_support.start("t-hang", code)
    job = prefetch_support._JOBS["t-hang"]
    assert child_processes() == []
    deadline = time.monotonic() + 60
    while not job.log.exists() or b"spawned" not in job.log.read_bytes():
        assert time.monotonic() < deadline  # a file: there is no event to wait on
        time.sleep(0.01)
    prefetch_support.stop()
    assert _live_members(job.group) == []  # (a zombie is left for init to reap)
    assert not job.log.exists()
    prefetch_support.wait("t-hang")  # forgotten: nothing to wait for


def _live_members(pgid: int) -> list[int]:
    """The processes of group ``pgid`` that are not zombies."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(pid))
    return found

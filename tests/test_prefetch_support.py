"""The test suite's background prefetches (tests/prefetch_support.py) fail loudly and leave
nothing running."""

from __future__ import annotations

import os
import time

import pytest

import prefetch_support


def test_a_failed_prefetch_raises_with_its_logs_tail() -> None:
    prefetch_support.start("t-fail", "print('the reason'); raise SystemExit(3)")
    try:
        with pytest.raises(RuntimeError, match=r"t-fail prefetch failed \(exit 3\):\nthe reason"):
            prefetch_support.wait("t-fail")
    finally:
        prefetch_support.stop()


def test_stop_kills_a_running_prefetch_and_its_children() -> None:
    code = (
        "import subprocess, sys, time; subprocess.Popen(['sleep', '1234.5']); "
        "print('spawned', flush=True); time.sleep(600)"
    )
    prefetch_support.start("t-hang", code)
    process, log = prefetch_support._JOBS["t-hang"]
    deadline = time.monotonic() + 60
    while b"spawned" not in log.read_bytes():  # a file: there is no event to wait on
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.01)
    prefetch_support.stop()
    assert process.returncode is not None
    assert _live_members(process.pid) == []  # (a zombie is left for init to reap)
    assert not log.exists()
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

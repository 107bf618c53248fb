"""Owner identity of the reaper: alive, dead, reused pid, rebooted host, other host.
(No engine needed: the labels are checked against this machine's processes.)"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from structenv.backends._ownership import (
    LABEL_OWNER_BOOT,
    LABEL_OWNER_HOST,
    LABEL_OWNER_PID,
    LABEL_OWNER_START,
    current_owner,
    owner_labels,
    owner_state,
    process_start_time,
)


def test_own_labels_are_alive() -> None:
    labels = owner_labels(backend="docker", run_id="r", pool="p")
    assert labels[LABEL_OWNER_PID] == str(os.getpid())
    assert owner_state(labels) == "alive"


def test_exited_process_is_dead() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    start = process_start_time(proc.pid)
    proc.wait()
    labels = owner_labels(backend="docker", run_id="r", pool="p")
    labels[LABEL_OWNER_PID] = str(proc.pid)
    labels[LABEL_OWNER_START] = start or "1"
    assert process_start_time(proc.pid) is None
    assert owner_state(labels) == "dead"


def test_reused_pid_is_dead() -> None:
    # The parent process is alive, but it is not the process that made the resource.
    labels = owner_labels(backend="docker", run_id="r", pool="p")
    labels[LABEL_OWNER_PID] = str(os.getppid())
    assert process_start_time(os.getppid()) is not None  # the parent is alive
    labels[LABEL_OWNER_START] = "12345"  # a different start time than the live parent's
    assert owner_state(labels) == "dead"
    me = dataclasses.replace(current_owner(), start="0")
    assert owner_state(owner_labels(backend="d", run_id="r", pool="p"), me=me) == "dead"


def test_rebooted_host_is_dead() -> None:
    labels = owner_labels(backend="docker", run_id="r", pool="p")
    labels[LABEL_OWNER_BOOT] = "another-boot"
    assert owner_state(labels) == "dead"


@pytest.mark.parametrize(
    ("key", "value", "state"),
    [
        (LABEL_OWNER_HOST, "some-other-host", "foreign"),
        (LABEL_OWNER_PID, "not-a-pid", "invalid"),
        (LABEL_OWNER_START, "", "invalid"),
    ],
)
def test_other_hosts_and_bad_labels_are_never_reaped(key: str, value: str, state: str) -> None:
    labels = owner_labels(backend="docker", run_id="r", pool="p")
    labels[key] = value
    assert owner_state(labels) == state


def test_start_time_of_live_and_missing_pids() -> None:
    start = process_start_time(os.getpid())
    assert start is not None and start.isdigit()
    assert process_start_time(2**22 + 1) is None

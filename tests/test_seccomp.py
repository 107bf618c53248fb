"""The seccomp program slots run under, and the profile of a container that runs bwrap."""

from __future__ import annotations

import json
import os
from pathlib import Path

from structenv.sandbox import _seccomp


def test_a_stale_program_file_is_replaced_not_trusted(tmp_path: Path) -> None:
    path = str(tmp_path / "filter.bpf")
    (tmp_path / "filter.bpf").write_bytes(b"\0" * 8)  # e.g. an allow-everything program
    fd = _seccomp.open_program(path)
    try:
        assert os.read(fd, 1 << 16) == _seccomp.filter_program()
    finally:
        os.close(fd)
    assert os.stat(path).st_mode & 0o777 == 0o600
    # Each sandbox gets a descriptor of its own, at the start of the program.
    first, second = _seccomp.open_program(path), _seccomp.open_program(path)
    try:
        assert os.read(first, 1 << 16) == os.read(second, 1 << 16) != b""
    finally:
        os.close(first)
        os.close(second)


def test_container_profile_allows_only_what_bwrap_needs() -> None:
    profile = json.loads(_seccomp.container_profile())
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    rule, vsock = profile["syscalls"]
    assert rule["action"] == "SCMP_ACT_ERRNO"
    assert vsock["names"] == ["socket"] and vsock["action"] == "SCMP_ACT_ERRNO"
    assert vsock["args"] == [{"index": 0, "value": _seccomp.AF_VSOCK, "op": "SCMP_CMP_EQ"}]
    refused = set(rule["names"])
    assert {"keyctl", "add_key", "io_uring_setup", "bpf", "ptrace", "kexec_load"} <= refused
    assert not refused & _seccomp.BWRAP_NEEDS
    assert "vm86" not in refused  # names this architecture does not have are left out

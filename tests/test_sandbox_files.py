"""Workspace files (confinement, binary safety, caps, archive) and the tmux terminal."""

from __future__ import annotations

import io
import os
import tarfile

import anyio
import pytest

from structenv import ExecRequest
from structenv.backends import LocalBackend
from test_sandbox_support import backend

pytestmark = pytest.mark.anyio
__all__ = ["backend"]


async def test_binary_files_round_trip(backend: LocalBackend) -> None:
    slot = await backend.acquire_slot()
    data = b"\x00\xff\xfe" + bytes(range(256)) * 100
    await slot.write_file("/workspace/deep/er/f.bin", data, mode=0o750)
    assert await slot.read_file("deep/er/f.bin") == data
    seen = await slot.exec(ExecRequest("stat -c %a deep/er/f.bin; sha256sum deep/er/f.bin"))
    assert seen.stdout.startswith(b"750\n")
    entries = {e.path: e for e in await slot.list_files()}
    assert entries["deep"].is_dir and entries["deep/er/f.bin"].size == len(data)
    assert [e.path for e in await slot.list_files("deep/er")] == ["deep/er/f.bin"]
    # No temporary files are left by the atomic write.
    assert sorted(os.listdir(os.path.join(backend.workspace_path(slot), "deep/er"))) == ["f.bin"]
    await backend.release_slot(slot, reusable=True)


async def test_traversal_and_symlinks_refused(backend: LocalBackend) -> None:
    slot = await backend.acquire_slot()
    await slot.exec(
        ExecRequest("ln -s /etc/passwd link; ln -s / root; ln -s .. up; mkdir d; echo x > d/f")
    )
    for path in ("../x", "d/../../x", "/etc/passwd", "link", "root/etc/passwd", "up/x"):
        with pytest.raises(PermissionError):
            await slot.read_file(path)
    for path in ("../x", "/etc/cron.d/x", "root/tmp/x", "up/escaped", "root/x/y"):
        with pytest.raises(PermissionError):
            await slot.write_file(path, b"nope")
    with pytest.raises(PermissionError):
        await slot.list_files("root")
    with pytest.raises(FileNotFoundError):
        await slot.read_file("missing")
    with pytest.raises(IsADirectoryError):
        await slot.read_file("d")
    with pytest.raises(ValueError, match="limit"):
        await slot.read_file("d/f", max_bytes=1)
    # Writing over a symlink replaces the link itself, never its target.
    await slot.write_file("link", b"mine")
    assert (await slot.exec(ExecRequest("cat link; test -L link || echo regular"))).stdout == (
        b"mineregular\n"
    )
    assert not (await anyio.Path("/etc/passwd").read_bytes()).startswith(b"mine")
    await backend.release_slot(slot, reusable=True)


async def test_archive(backend: LocalBackend) -> None:
    slot = await backend.acquire_slot()
    await slot.exec(ExecRequest("mkdir -p a/b && echo hi > a/b/c && ln -s /etc/passwd a/l"))
    data = await slot.archive()  # type: ignore[attr-defined]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = {m.name: m for m in tar.getmembers()}
        assert names["a/l"].issym() and names["a/l"].linkname == "/etc/passwd"
        member = tar.extractfile("a/b/c")
        assert member is not None and member.read() == b"hi\n"
    await backend.release_slot(slot, reusable=True)


async def test_terminal_is_stateful(backend: LocalBackend) -> None:
    slot = await backend.acquire_slot()
    term = slot.terminal  # type: ignore[attr-defined]
    await term("start")
    first = await term("run", command="mkdir -p sub && cd sub && export FOO=bar")
    assert first["exit_code"] == 0
    second = await term("run", command="pwd; echo $FOO")
    assert second["exit_code"] == 0
    assert "/workspace/sub" in second["output"] and "bar" in second["output"]
    assert (await term("run", command="false"))["exit_code"] == 1
    slow = await term("run", command="sleep 5", timeout=0.5)
    assert slow["timed_out"] and slow["exit_code"] is None
    await term("send_keys", keys="C-c", literal=False, enter=False)
    await term("send_keys", keys="echo typed-$((40+2))")
    after = await term("run", command="true")
    assert after["exit_code"] == 0
    captured = await term("capture")
    assert "typed-42" not in captured["output"]  # already returned by the previous call
    await term("stop")
    # The terminal ran inside the slot's sandbox: same namespace, same workspace.
    procs = await slot.exec(ExecRequest("ps -e -o comm="))
    assert b"tmux" not in procs.stdout
    await backend.release_slot(slot, reusable=True)

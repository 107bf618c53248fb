"""Workspace file operations on hostile trees: depth, width, special files, modes, races.

The functions under test are blocking and run in the server on the host side of the
workspace, so these tests call them directly on ``tmp_path`` trees.
"""

from __future__ import annotations

import io
import json
import os
import resource
import socket
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from structenv.sandbox import _files

DEPTH = 10_000
#: Small files in one directory for the removal test. Removing 100,000 takes ~2 s here, but
#: creating them took 6 s on an idle 2-core VM's ext4 disk and 27 s under a parallel test run.
MANY = 20_000
#: Unprivileged uid/gid for the parts root would pass by bypassing permission checks.
NOBODY = 65534


def _chain(root: Path, depth: int) -> Path:
    """``root/d/d/.../d`` (``depth`` levels) built with ``mkdirat``, as no path could be."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            f.write(b"bottom")
        os.symlink(str(root.parent / "outside"), "out", dir_fd=fd)
    finally:
        os.close(fd)
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the workspace with a canary that must survive everything."""
    return _outside(tmp_path)


def _outside(base: Path) -> Path:
    out = base / "outside"
    out.mkdir()
    (out / "canary").write_bytes(b"alive")
    return out


def _deep(base: Path) -> Iterator[Path]:
    """A workspace ``DEPTH`` directories deep, ending in a file and a symlink to ``outside``."""
    canary = _outside(base) / "canary"
    ws = base / "ws"
    ws.mkdir()
    yield _chain(ws, DEPTH)
    # shutil.rmtree (pytest's cleanup) recurses too; GNU rm does not.
    subprocess.run(["rm", "-rf", str(ws)], check=True)
    assert canary.read_bytes() == b"alive"


@pytest.fixture(scope="module")
def deep_shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """:func:`_deep`, built once for the tests that only read it."""
    yield from _deep(tmp_path_factory.mktemp("deep"))


@pytest.fixture
def deep(tmp_path: Path) -> Iterator[Path]:
    """:func:`_deep`, for a test that changes it."""
    yield from _deep(tmp_path)


@pytest.fixture
def few_fds() -> Iterator[None]:
    """A descriptor limit far below ``DEPTH``: one open directory per level cannot fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 128), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_deep_tree_is_listed(deep_shared: Path, few_fds: None) -> None:
    deep = deep_shared
    entries = _files.list_files(str(deep), ".", 100_000)
    assert len(entries) == DEPTH + 2
    path = ""
    for entry in entries[:DEPTH]:
        path = path + "/d" if path else "d"
        assert entry == {"path": path, "size": 0, "is_dir": True}
    assert entries[DEPTH:] == [
        {"path": path + "/f", "size": 6, "is_dir": False},
        {"path": path + "/out", "size": len(str(deep.parent / "outside")), "is_dir": False},
    ]
    # A sub-path, and the entry bound.
    assert _files.list_files(str(deep), "d/d/d", 100_000)[0]["path"] == "d/d/d/d"
    with pytest.raises(ValueError, match="more than 100 entries"):
        _files.list_files(str(deep), ".", 100)


def test_deep_tree_is_archived(deep_shared: Path, few_fds: None) -> None:
    deep = deep_shared
    data = _files.archive(str(deep), 1 << 30)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        assert len(members) == DEPTH + 2
        assert all(m.isdir() for m in members[:DEPTH])
        assert members[DEPTH - 1].name == "/".join(["d"] * DEPTH)
        bottom = tar.extractfile(members[DEPTH])
        assert bottom is not None and bottom.read() == b"bottom"
        assert members[DEPTH + 1].issym()
        assert members[DEPTH + 1].linkname == str(deep.parent / "outside")
    # The bound counts the tar's headers, which grow with the square of the depth.
    with pytest.raises(ValueError, match="over"):
        _files.archive(str(deep), 1 << 20)


def test_deep_tree_is_removed(deep: Path, few_fds: None) -> None:
    assert _files.remove_tree(str(deep), keep_root=True)
    assert os.listdir(deep) == []
    assert (deep.parent / "outside" / "canary").read_bytes() == b"alive"
    assert _files.remove_tree(str(deep), keep_root=False)
    assert not deep.exists()


def test_many_files_are_removed(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "many").mkdir(parents=True)
    fd = os.open(ws / "many", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(MANY):
            os.mknod(f"f{i}", stat.S_IFREG | 0o644, dir_fd=fd)
    finally:
        os.close(fd)
    (ws / "many" / "sub").mkdir()
    (ws / "many" / "sub" / "x").write_bytes(b"x")
    assert _files.remove_tree(str(ws), keep_root=True)
    assert os.listdir(ws) == []


def test_special_entries(tmp_path: Path, outside: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "dir").mkdir(parents=True)
    os.mkfifo(ws / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(ws / "sock"))
    try:
        os.mknod(ws / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        devices = ["null"]
    except PermissionError:
        devices = []  # no CAP_MKNOD here
    (ws / "root").symlink_to("/")
    (ws / "dir" / "escape").symlink_to(outside)
    (ws / "dir" / "fifo-link").symlink_to(ws / "fifo")

    entries = _files.list_files(str(ws), ".", 100)
    # FIFOs, sockets and devices are listed from their lstat, never opened (a FIFO would
    # block); the symlink to / is listed as what it is and not followed.
    assert [(e["path"], e["is_dir"]) for e in entries] == [
        ("dir", True),
        *[(name, False) for name in sorted(["fifo", *devices, "root", "sock"])],
        ("dir/escape", False),
        ("dir/fifo-link", False),
    ]
    with pytest.raises(PermissionError):
        _files.list_files(str(ws), "root", 100)

    with tarfile.open(fileobj=io.BytesIO(_files.archive(str(ws), 1 << 20))) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert sorted(members) == ["dir", "dir/escape", "dir/fifo-link", "root"]
    assert members["root"].issym() and members["root"].linkname == "/"
    assert members["dir/escape"].linkname == str(outside)

    # A symlink given as the tree is not a directory to empty, and is removed as a link.
    (tmp_path / "link").symlink_to(outside)
    assert not _files.remove_tree(str(tmp_path / "link"), keep_root=True)
    assert _files.remove_tree(str(tmp_path / "link"), keep_root=False)
    assert not (tmp_path / "link").is_symlink()

    assert _files.remove_tree(str(ws), keep_root=False)
    assert not ws.exists()
    assert (outside / "canary").read_bytes() == b"alive"
    assert os.path.isdir("/etc")
    # A missing tree is already removed, and never an empty directory.
    assert _files.remove_tree(str(ws), keep_root=False)
    assert not _files.remove_tree(str(ws), keep_root=True)


def test_setuid_and_setgid_are_stripped(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(ws / "sh", 0o6755)
    (ws / "shared").mkdir()
    os.chmod(ws / "shared", 0o2775)
    (ws / "tmp").mkdir()
    os.chmod(ws / "tmp", 0o1777)
    with tarfile.open(fileobj=io.BytesIO(_files.archive(str(ws), 1 << 20))) as tar:
        modes = {m.name: m.mode for m in tar.getmembers()}
    assert modes == {"sh": 0o755, "shared": 0o775, "tmp": 0o1777}

    _files.write_file(str(ws), "w", b"x", 0o6755)
    assert stat.S_IMODE(os.stat(ws / "w").st_mode) == 0o755
    _files.write_file(str(ws), "w", b"x", 0o1755)
    assert stat.S_IMODE(os.stat(ws / "w").st_mode) == 0o1755


def test_walk_does_not_follow_a_swap(tmp_path: Path, outside: Path) -> None:
    """A directory renamed away mid-walk, a symlink in its place: nothing outside is read.

    Deep in the walk, the levels near the top have had their descriptors closed; climbing
    back to one with subdirectories left to visit re-opens it by name from an open ancestor,
    which must refuse the symlink (and a look-alike directory) rather than follow it.
    """
    (outside / "y" / "leak").mkdir(parents=True)
    for swap in ("symlink", "directory"):
        ws = tmp_path / swap
        path = ws / "a"
        for _ in range(40):
            (path / "y").mkdir(parents=True)
            path = path / "x"
        path.mkdir()
        seen: list[str] = []
        swapped = False
        root_fd = os.open(ws, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for _fd, entries in _files._walk(root_fd, "", 1 << 20):
                seen += [rel for _name, rel, _st in entries]
                if not entries and not swapped:  # the bottom
                    swapped = True
                    os.rename(ws / "a", ws / "moved")
                    if swap == "symlink":
                        (ws / "a").symlink_to(outside)
                    else:
                        (ws / "a" / "y" / "leak").mkdir(parents=True)
        finally:
            os.close(root_fd)
        assert swapped
        assert not [rel for rel in seen if "leak" in rel]
        # Levels reached from descriptors still open (the deepest) carried on.
        assert "/".join(["a", *["x"] * 39, "y"]) in seen


_UNPRIVILEGED = r"""
import io, json, os, sys, tarfile
from structenv.sandbox import _files

os.chdir(sys.argv[1])
uid = int(sys.argv[2])
privileged = os.geteuid() == 0
if privileged:
    # A directory its unprivileged user cannot empty (root's, 0o755), under 30 levels each
    # with a file that it can remove.
    path = "hard"
    for _ in range(30):
        os.makedirs(path)
        open(path + "/file", "w").close()
        os.chown(path, uid, uid)
        path += "/y"
    os.makedirs(path)
    open(path + "/f", "w").close()
    os.setgroups([])
    os.setgid(int(sys.argv[2]))
    os.setuid(int(sys.argv[2]))

def write(path):
    with open(path, "wb") as f:
        f.write(b"data")

os.makedirs("ws/locked/inner")
write("ws/locked/inner/f")
write("ws/locked/g")
os.makedirs("ws/readonly")
write("ws/readonly/f")
write("ws/secret.txt")
write("ws/ok.txt")
deep = "ws/deep" + "/d" * 40
os.makedirs(deep + "/locked/x")
write(deep + "/locked/x/f")
for path, mode in [
    ("ws/locked/inner", 0), ("ws/locked", 0), (deep + "/locked", 0), ("ws/readonly", 0o500),
    ("ws/secret.txt", 0), ("ws", 0o500),
]:
    os.chmod(path, mode)
out = {"listed": [(e["path"], e["is_dir"]) for e in _files.list_files("ws", ".", 1000)]}
with tarfile.open(fileobj=io.BytesIO(_files.archive("ws", 1 << 20))) as tar:
    out["archived"] = tar.getnames()
out["emptied"] = _files.remove_tree("ws", keep_root=True)
out["left"] = os.listdir("ws")
os.makedirs("gone/a/b")
os.chmod("gone/a", 0)
os.chmod("gone", 0)
out["removed"] = _files.remove_tree("gone", keep_root=False)
out["gone"] = not os.path.lexists("gone")
if privileged:
    out["stuck"] = _files.remove_tree("hard", keep_root=False)
    out["stuck_left"] = [name for _, _, files in os.walk("hard") for name in files]
print(json.dumps(out))
"""


def test_unreadable_directories_unprivileged(tmp_path: Path) -> None:
    """``chmod 000`` trees, as their unprivileged owner sees them (root bypasses the modes).

    The child imports as root, then drops to an unprivileged uid inside ``tmp_path``.
    """
    if os.geteuid() == 0:
        os.chown(tmp_path, NOBODY, NOBODY)
    done = subprocess.run(
        [sys.executable, "-c", _UNPRIVILEGED, str(tmp_path), str(NOBODY)],
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    out = json.loads(done.stdout)
    listed = dict(map(tuple, out["listed"]))
    deep = "deep" + "/d" * 40
    # Listed, not descended into, no error.
    assert listed["locked"] is True and listed[deep + "/locked"] is True
    assert "locked/g" not in listed and deep + "/locked/x" not in listed
    assert listed["readonly/f"] is False and listed["secret.txt"] is False
    # What cannot be read is left out of the archive rather than failing it.
    archived = set(out["archived"])
    assert {"locked", "ok.txt", "readonly/f", deep + "/locked"} <= archived
    assert "secret.txt" not in archived and "locked/g" not in archived
    # Removal chmods its way through (0o700 through the parent's descriptor) and renames the
    # locked directory below its descent depth up to the root first.
    assert out["emptied"] is True and out["left"] == []
    assert out["removed"] is True and out["gone"] is True
    if os.geteuid() == 0:
        # What cannot be removed is reported, and everything else is still removed.
        assert out["stuck"] is False and out["stuck_left"] == ["f"]

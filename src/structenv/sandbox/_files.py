"""Workspace file operations, confined to the slot's workspace directory.

These run in the server, outside the sandbox, on the host directory that is bound at
``/workspace`` inside it, while commands in the sandbox may be changing that directory at the
same moment. Every path is therefore resolved one component at a time with ``openat`` and
``O_NOFOLLOW`` from a descriptor of the workspace root: ``..`` is refused outright and a
symlink anywhere on the path is refused rather than followed, so no race can redirect an
operation outside the workspace. Writes go to a temporary file renamed into place (atomic).
All functions are blocking; the server runs them in worker threads.
"""

from __future__ import annotations

import io
import os
import secrets
import stat
import tarfile
from typing import Any

from ._bwrap import WORKSPACE

__all__ = ["archive", "list_files", "read_file", "write_file"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def split_path(path: str) -> list[str]:
    """Workspace-relative components of ``path``; raise ``PermissionError`` if it escapes.

    Absolute paths are accepted only under ``/workspace`` (the path commands see).
    """
    if "\0" in path:
        raise PermissionError("NUL in path")
    if path.startswith("/"):
        if path != WORKSPACE and not path.startswith(WORKSPACE + "/"):
            raise PermissionError(f"{path!r} is outside the workspace")
        path = path[len(WORKSPACE) :]
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise PermissionError(f"{path!r} contains '..'")
    return parts


def _open_dir(root: str, parts: list[str], *, create: bool = False) -> int:
    """A descriptor of directory ``root/parts`` reached without following any symlink."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts:
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if _is_link(fd, part):
                    raise PermissionError(f"symlink in path: {part!r}") from exc
                raise
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _open_file(root: str, parts: list[str], flags: int, mode: int = 0) -> int:
    dfd = _open_dir(root, parts[:-1])
    try:
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
    except OSError as exc:
        if _is_link(dfd, parts[-1]):
            raise PermissionError(f"{'/'.join(parts)!r} is a symlink") from exc
        raise
    finally:
        os.close(dfd)


def read_file(root: str, path: str, max_bytes: int) -> bytes:
    """Read a regular file of at most ``max_bytes`` bytes."""
    parts = split_path(path)
    if not parts:
        raise IsADirectoryError(path)
    fd = _open_file(root, parts, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(st.st_mode):
            raise PermissionError(f"{path!r} is not a regular file")
        if st.st_size > max_bytes:
            raise ValueError(f"{path!r} is {st.st_size} bytes, over the {max_bytes} byte limit")
        chunks = []
        remaining = max_bytes + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise ValueError(f"{path!r} grew over the {max_bytes} byte limit")
        return data
    finally:
        os.close(fd)


def write_file(root: str, path: str, data: bytes, mode: int) -> None:
    """Create or atomically replace a file, creating parent directories."""
    parts = split_path(path)
    if not parts:
        raise IsADirectoryError(path)
    dfd = _open_dir(root, parts[:-1], create=True)
    tmp = f".structenv-{secrets.token_hex(8)}.tmp"
    try:
        try:
            st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(path)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode & 0o7777)
        finally:
            os.close(fd)
        os.rename(tmp, parts[-1], src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        raise
    finally:
        os.close(dfd)


def list_files(root: str, path: str, max_entries: int) -> list[dict[str, Any]]:
    """Recursive listing (``path``, ``size``, ``is_dir``) relative to the workspace root."""
    parts = split_path(path)
    dfd = _open_dir(root, parts)
    prefix = "/".join(parts)
    out: list[dict[str, Any]] = []
    try:
        for dirpath, dirnames, filenames, fd in os.fwalk(".", dir_fd=dfd, follow_symlinks=False):
            rel = os.path.normpath(os.path.join(prefix, dirpath))
            rel = "" if rel == "." else rel
            for name in sorted(dirnames) + sorted(filenames):
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    continue
                is_dir = stat.S_ISDIR(st.st_mode)
                entry = os.path.join(rel, name) if rel else name
                out.append({"path": entry, "size": 0 if is_dir else st.st_size, "is_dir": is_dir})
                if len(out) >= max_entries:
                    raise ValueError(f"more than {max_entries} entries")
    finally:
        os.close(dfd)
    return out


def archive(root: str, max_bytes: int) -> bytes:
    """A tar of the whole workspace (symlinks stored as links, never followed)."""
    buf = io.BytesIO()
    total = 0
    dfd = _open_dir(root, [])
    try:
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for dirpath, dirnames, filenames, fd in os.fwalk(
                ".", dir_fd=dfd, follow_symlinks=False
            ):
                for name in sorted(dirnames) + sorted(filenames):
                    arcname = os.path.normpath(os.path.join(dirpath, name))
                    try:
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    except OSError:
                        continue
                    info = tarfile.TarInfo(arcname)
                    info.mode = st.st_mode & 0o7777
                    info.mtime = int(st.st_mtime)
                    if stat.S_ISDIR(st.st_mode):
                        info.type = tarfile.DIRTYPE
                        tar.addfile(info)
                    elif stat.S_ISLNK(st.st_mode):
                        info.type = tarfile.SYMTYPE
                        info.linkname = os.readlink(name, dir_fd=fd)
                        tar.addfile(info)
                    elif stat.S_ISREG(st.st_mode):
                        total += st.st_size
                        if total > max_bytes:
                            raise ValueError(f"workspace is over {max_bytes} bytes")
                        ffd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
                        with os.fdopen(ffd, "rb") as f:
                            info.size = os.fstat(ffd).st_size
                            tar.addfile(info, f)
    finally:
        os.close(dfd)
    return buf.getvalue()

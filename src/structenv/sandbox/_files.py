"""Workspace file operations, confined to the slot's workspace directory.

These run in the server, outside the sandbox, on the host directory that is bound at
``/workspace`` inside it, while commands in the sandbox may be changing that directory at the
same moment. Every path is therefore resolved one component at a time with ``openat`` and
``O_NOFOLLOW`` from a descriptor of the workspace root: ``..`` is refused outright and a
symlink anywhere on the path is refused rather than followed, so no race can redirect an
operation outside the workspace. Writes go to a temporary file renamed into place (atomic).
All functions are blocking; the server runs them in worker threads.

Trees are walked iteratively, never recursively, with a bounded number of open descriptors, so
a hostile tree of any depth costs neither the Python stack nor the process's descriptor table
(see :func:`_walk` and :func:`remove_tree`). Special files are never opened: a FIFO would block.
Setuid and setgid bits never leave this module (archives, ``write_file``'s mode).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import secrets
import stat
import tarfile
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from ._bwrap import WORKSPACE

__all__ = ["archive", "list_files", "read_file", "remove_tree", "write_file"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Mode bits that may leave this module: permissions and the sticky bit, never setuid/setgid.
_MODE_MASK = 0o1777


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
    """A descriptor of directory ``root/parts`` reached without following any symlink.

    Directories it creates belong to the workspace's owner (the slot's uid), as if the slot
    had made them.
    """
    fd = os.open(root, _DIR_FLAGS)
    owner = os.fstat(fd)
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
                _give(nxt, owner)
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


def _give(fd: int, owner: os.stat_result) -> None:
    """Hand a file the server made to the workspace's owner (a no-op for that owner)."""
    try:
        os.fchown(fd, owner.st_uid, owner.st_gid)
    except PermissionError:
        pass  # an unprivileged server owns its workspaces already


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


def _read_upto(fd: int, limit: int) -> bytes:
    """At most ``limit`` bytes from ``fd`` (fewer at end of file)."""
    chunks = []
    remaining = limit
    while remaining > 0:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


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
        data = _read_upto(fd, max_bytes + 1)
        if len(data) > max_bytes:
            raise ValueError(f"{path!r} grew over the {max_bytes} byte limit")
        return data
    finally:
        os.close(fd)


def write_file(root: str, path: str, data: bytes, mode: int) -> None:
    """Create or atomically replace a file, creating parent directories.

    Setuid and setgid are dropped from ``mode``: only permissions and the sticky bit apply.
    """
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
            os.fchmod(fd, mode & _MODE_MASK)
            _give(fd, os.stat(root))  # the slot may change its files, like its own
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
    """Recursive listing (``path``, ``size``, ``is_dir``) relative to the workspace root.

    Each directory's entries come sorted, directories first, before those of its
    subdirectories. A directory that cannot be opened is listed but not descended into.
    """
    parts = split_path(path)
    dfd = _open_dir(root, parts)
    out: list[dict[str, Any]] = []
    try:
        with contextlib.closing(_walk(dfd, "/".join(parts), max_entries)) as walk:
            for _fd, entries in walk:
                for _name, rel, st in entries:
                    is_dir = stat.S_ISDIR(st.st_mode)
                    out.append({"path": rel, "size": 0 if is_dir else st.st_size, "is_dir": is_dir})
                    if len(out) > max_entries:
                        raise ValueError(f"more than {max_entries} entries")
    finally:
        os.close(dfd)
    return out


def archive(root: str, max_bytes: int) -> bytes:
    """A tar of the whole workspace, at most ``max_bytes`` bytes, headers included.

    Directories, regular files and symlinks (stored as links, never followed) are kept; FIFOs,
    sockets, devices and whatever cannot be opened are skipped. Modes lose setuid and setgid.
    """
    buf = io.BytesIO()
    dfd = _open_dir(root, [])
    try:
        with (
            # Every entry stored costs a 512-byte header at least: more entries than that
            # cannot fit, and the walk stops before reading them all into memory.
            contextlib.closing(_walk(dfd, "", max_bytes // tarfile.BLOCKSIZE)) as walk,
            tarfile.open(fileobj=buf, mode="w") as tar,
        ):
            for fd, entries in walk:
                for name, rel, st in entries:
                    info = tarfile.TarInfo(rel)
                    content = None
                    if stat.S_ISDIR(st.st_mode):
                        info.type = tarfile.DIRTYPE
                    elif stat.S_ISLNK(st.st_mode):
                        info.type = tarfile.SYMTYPE
                        try:
                            info.linkname = os.readlink(name, dir_fd=fd)
                        except OSError:
                            continue  # gone or replaced since the listing
                    elif stat.S_ISREG(st.st_mode):
                        opened = _read_regular(fd, name, max_bytes - buf.tell())
                        if opened is None:
                            continue
                        st, data = opened
                        info.size = len(data)
                        content = io.BytesIO(data)
                    else:
                        continue
                    info.mode = st.st_mode & _MODE_MASK
                    info.mtime = int(st.st_mtime)
                    tar.addfile(info, content)
                    if buf.tell() > max_bytes:
                        raise ValueError(f"the workspace archive is over {max_bytes} bytes")
    finally:
        os.close(dfd)
    if buf.tell() > max_bytes:  # the end-of-archive blocks
        raise ValueError(f"the workspace archive is over {max_bytes} bytes")
    return buf.getvalue()


def _read_regular(dir_fd: int, name: str, limit: int) -> tuple[os.stat_result, bytes] | None:
    """Status and content of regular file ``name``; None if it cannot be opened or is no file.

    ``O_NONBLOCK`` keeps a FIFO swapped in after the listing from blocking the open, and the
    ``fstat`` of the opened descriptor decides; a file that shrinks while read is stored short.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        if st.st_size > limit:
            raise ValueError(f"the workspace archive is over its byte limit at {name!r}")
        return st, _read_upto(fd, st.st_size)
    finally:
        os.close(fd)


# -- the walker ------------------------------------------------------------------------------

#: The walker keeps the descriptors of the deepest ``_WINDOW`` levels open, plus a logarithmic
#: set of ancestors (see :func:`_keep`); any other level is re-opened from the nearest open
#: ancestor when it is needed again.
_WINDOW = 8

_Entry = tuple[str, str, os.stat_result]  # name, path relative to the workspace root, lstat


@dataclass(slots=True)
class _Frame:
    name: str  # the component in the parent directory
    ident: tuple[int, int]  # (st_dev, st_ino) of the directory first opened
    fd: int  # -1 while closed to stay within the descriptor budget
    #: Subdirectories still to visit, (name, path relative to the workspace root), last first.
    pending: list[tuple[str, str]] = field(default_factory=list)


def _keep(level: int, depth: int) -> bool:
    """Whether the walker at ``depth`` keeps the descriptor of its ancestor at ``level``.

    Kept: the root, the deepest ``_WINDOW`` levels, and every ``depth`` with its low ``k``
    bits cleared (``k`` = 0, 1, 2, ...): at most ``_WINDOW + log2(depth) + 1`` descriptors.
    Climbing back up then re-opens each level from a kept ancestor at most ``2**k`` levels
    above it, where ``k`` is the number of trailing zero bits of the level just left: on a
    comb of depth D that is O(D log D) ``openat`` calls in all, instead of O(D**2).
    """
    if level == 0 or depth - level < _WINDOW:
        return True
    k = (depth ^ level).bit_length()
    return (depth >> k) << k == level


def _trim(stack: list[_Frame]) -> None:
    """Close the descriptors that the walker, one level deeper, no longer keeps.

    Going down from ``depth - 1`` to ``depth`` drops the level leaving the window and the
    prefixes of ``depth - 1`` that are not prefixes of ``depth``; climbing up never adds a
    level to close, so the kept set stays within :func:`_keep` without rescanning the stack.
    """
    depth = len(stack) - 1
    zeros = (depth & -depth).bit_length() - 1
    for level in (depth - _WINDOW, *(((depth - 1) >> k) << k for k in range(zeros))):
        if 0 < level < depth and stack[level].fd >= 0 and not _keep(level, depth):
            os.close(stack[level].fd)
            stack[level].fd = -1


def _reopen(stack: list[_Frame]) -> bool:
    """Re-open the top frame from its nearest open ancestor, one component at a time.

    Each level must still be the directory first visited there (same device and inode); if
    one was renamed or replaced meanwhile, the frames from it down are dropped with their
    unvisited subdirectories and False is returned. Every ``openat`` starts from a descriptor
    inside the root and refuses symlinks, so a concurrent swap cannot lead outside it.
    """
    depth = len(stack) - 1
    top = depth - 1
    while stack[top].fd < 0:
        top -= 1
    parent = stack[top].fd
    spare = -1  # an intermediate descriptor that its frame does not keep
    try:
        for level in range(top + 1, depth + 1):
            frame = stack[level]
            try:
                fd = os.open(frame.name, _DIR_FLAGS, dir_fd=parent)
            except OSError:
                del stack[level:]
                return False
            try:
                st = os.fstat(fd)
                same = (st.st_dev, st.st_ino) == frame.ident
            except OSError:
                same = False
            if not same:
                os.close(fd)
                del stack[level:]
                return False
            if spare >= 0:
                os.close(spare)
                spare = -1
            if _keep(level, depth):
                frame.fd = fd
            else:
                spare = fd
            parent = fd
    finally:
        if spare >= 0:
            os.close(spare)
    return True


class _TooMany(Exception):
    """A directory holds more entries than the walk has room for."""


def _scan(fd: int, rel: str, room: int) -> list[_Entry]:
    """The entries of directory ``fd``, sorted, directories first (``lstat``, never opened).

    Raises:
        _TooMany: It has more than ``room`` entries (a hostile directory may hold
            millions: they are never all read into the server's memory).
    """
    dirs: list[tuple[str, os.stat_result]] = []
    others: list[tuple[str, os.stat_result]] = []
    with os.scandir(fd) as it:
        for count, entry in enumerate(it):
            if count >= room:
                raise _TooMany
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # vanished or not searchable: skipped, as a vanished entry
            (dirs if stat.S_ISDIR(st.st_mode) else others).append((entry.name, st))
    dirs.sort(key=lambda e: e[0])
    others.sort(key=lambda e: e[0])
    head = rel + "/" if rel else ""
    return [(name, head + name, st) for name, st in dirs + others]


def _walk(
    root_fd: int, root_rel: str, max_entries: int
) -> Generator[tuple[int, list[_Entry]], None, None]:
    """Pre-order walk below ``root_fd``: ``(dir_fd, entries)`` per directory reached.

    Raises ``ValueError`` as soon as it has met more than ``max_entries`` entries in all, so
    time and memory are bounded by the limit, not by the tree.

    ``dir_fd`` is valid until the next step. Iterative, so no depth reaches the Python stack;
    at most ``_WINDOW + log2(depth) + 1`` descriptors are open besides ``root_fd`` (which the
    caller owns). Subdirectories are opened with ``O_NOFOLLOW | O_DIRECTORY`` relative to their
    parent's descriptor, so symlinks, FIFOs and devices are never opened; one that cannot be
    opened (unreadable, vanished, replaced) is listed by its parent and not descended into.
    Close the generator (``contextlib.closing``) to release descriptors when stopping early.
    """
    st = os.fstat(root_fd)
    stack = [_Frame("", (st.st_dev, st.st_ino), root_fd)]
    try:
        entries = _scan(root_fd, root_rel, max_entries)
        seen = len(entries)  # entries met so far: the walk stops past ``max_entries``
        stack[0].pending = _subdirs(entries)
        yield root_fd, entries
        while stack:
            top = stack[-1]
            if not top.pending:
                if len(stack) > 1 and top.fd >= 0:
                    os.close(top.fd)
                stack.pop()
                continue
            if top.fd < 0 and not _reopen(stack):
                continue
            name, rel = top.pending.pop()
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=top.fd)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                entries = _scan(fd, rel, max_entries - seen)
            except OSError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            seen += len(entries)
            stack.append(_Frame(name, (st.st_dev, st.st_ino), fd, _subdirs(entries)))
            _trim(stack)
            yield fd, entries
    except _TooMany:
        raise ValueError(f"more than {max_entries} entries") from None
    finally:
        for frame in stack[1:]:
            if frame.fd >= 0:
                os.close(frame.fd)


def _subdirs(entries: list[_Entry]) -> list[tuple[str, str]]:
    return [(name, rel) for name, rel, st in reversed(entries) if stat.S_ISDIR(st.st_mode)]


# -- removal ---------------------------------------------------------------------------------

#: Removal descends at most this many levels; deeper non-empty directories are renamed up
#: into the root and removed from there, so depth costs neither descriptors nor re-opens.
_RM_DEPTH = 16
#: Passes over one directory (a pass re-reads it) before removal gives up on it.
_RM_PASSES = 4


@dataclass(slots=True)
class _RmFrame:
    fd: int
    name: str  # the component in the parent directory
    pending: list[tuple[str, bool]] = field(default_factory=list)  # (name, is a directory)
    passes: int = 0
    progress: bool = False  # something was removed during the current pass
    stuck: set[str] = field(default_factory=set)  # subdirectories given up on: not re-entered


def remove_tree(path: str, *, keep_root: bool) -> bool:
    """Remove the tree at ``path`` (or only its contents if ``keep_root``); whether it worked.

    ``path`` is trusted (a host path); what lies below it may be hostile and still changing.
    Iterative and fd-based: every entry is reached with ``openat``/``unlinkat`` relative to
    its parent's descriptor, symlinks are removed and never followed, and a mount point (a
    directory on another device) is neither descended into nor removed. At most
    ``_RM_DEPTH + 1`` descriptors are open at any depth: a directory deeper than that is
    renamed into the root and taken from there. A directory its owner made unreadable or
    unwritable (``chmod 000``) is chmod'ed ``0o700`` and retried, which needs no privilege
    for the owner; the root itself may be left ``0o700``.

    Returns True when ``path`` is gone (``keep_root=False``: also if it never existed, or
    was a file or symlink, which is unlinked) or is an empty directory (``keep_root=True``).
    """
    try:
        fd = _open_fixing(None, path)
    except FileNotFoundError:
        return not keep_root
    except OSError as exc:
        if keep_root or exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            return False
        return _gone(_call(os.unlink, path, None))
    try:
        emptied = _empty(fd)
    finally:
        os.close(fd)
    if keep_root or not emptied:
        return emptied
    return _gone(_call(os.rmdir, path, None))


def _empty(root: int) -> bool:
    """Empty directory ``root``; whether it ended empty (see :func:`remove_tree`)."""
    device = os.fstat(root).st_dev
    stack = [_RmFrame(root, "")]
    while True:
        top = stack[-1]
        if top.pending:
            name, is_dir = top.pending.pop()
            if name not in top.stuck and _remove_entry(stack, name, is_dir, device):
                top.progress = True
            continue
        try:
            with os.scandir(top.fd) as it:
                left = [(e.name, _is_dir(e)) for e in it]
        except OSError:
            left = None
        if left == []:
            if len(stack) == 1:
                return True
            stack.pop()
            os.close(top.fd)
            if _gone(_fixing(os.rmdir, top.name, stack[-1].fd)):
                stack[-1].progress = True
        elif left is None or top.passes >= _RM_PASSES or (top.passes and not top.progress):
            if len(stack) == 1:
                return False
            stack.pop()  # give up on this directory; its parent's pass goes on
            os.close(top.fd)
            stack[-1].stuck.add(top.name)
        else:
            top.pending, top.passes, top.progress = left, top.passes + 1, False


def _remove_entry(stack: list[_RmFrame], name: str, is_dir: bool, device: int) -> bool:
    """Remove ``name`` from the top frame's directory, or hand it on; whether it left it.

    A non-empty directory is pushed as a new frame (False: it leaves when that frame is
    done) or, below ``_RM_DEPTH``, renamed into the root and queued there (True).
    """
    dir_fd = stack[-1].fd
    if not is_dir:
        err = _fixing(os.unlink, name, dir_fd)
        if err != errno.EISDIR:
            return _gone(err)
    err = _fixing(os.rmdir, name, dir_fd)
    if err == errno.ENOTDIR:  # replaced by a file since the listing
        return _gone(_fixing(os.unlink, name, dir_fd))
    if err not in (errno.ENOTEMPTY, errno.EEXIST):
        return _gone(err)
    if len(stack) > _RM_DEPTH:
        moved = _move_to_root(stack[0].fd, dir_fd, name)
        if moved:
            stack[0].pending.append((moved, True))
        return moved is not None
    try:
        fd = _open_fixing(dir_fd, name)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            return _gone(_fixing(os.unlink, name, dir_fd))
        return False
    try:
        same_device = os.fstat(fd).st_dev == device
    except OSError:
        same_device = False
    if not same_device:
        os.close(fd)
        return False
    stack.append(_RmFrame(fd, name))
    return False


def _move_to_root(root: int, dir_fd: int, name: str) -> str | None:
    """Rename ``name`` into the root under a fresh name: that name, "" if gone, None if stuck."""
    new = f".structenv-rm-{secrets.token_hex(8)}"
    for attempt in range(2):
        try:
            os.rename(name, new, src_dir_fd=dir_fd, dst_dir_fd=root)
            return new
        except FileNotFoundError:
            return ""
        except PermissionError:
            if attempt:
                return None
            # Moving a directory rewrites its ``..``: it needs write access to both parents
            # and to itself.
            _fix_mode(dir_fd, name)
            for fd in (dir_fd, root):
                with contextlib.suppress(OSError):
                    os.fchmod(fd, 0o700)
        except OSError:
            return None
    return None


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _call(func: Callable[..., object], name: str, dir_fd: int | None) -> int:
    """``func(name, dir_fd=dir_fd)``'s errno, 0 on success."""
    try:
        func(name, dir_fd=dir_fd)
    except OSError as exc:
        return exc.errno or errno.EIO
    return 0


def _fixing(func: Callable[..., object], name: str, dir_fd: int) -> int:
    """:func:`_call`, retried once after making directory ``dir_fd`` writable if refused."""
    err = _call(func, name, dir_fd)
    if err in (errno.EACCES, errno.EPERM):
        try:
            os.fchmod(dir_fd, 0o700)
        except OSError:
            return err
        err = _call(func, name, dir_fd)
    return err


def _gone(err: int) -> bool:
    return err in (0, errno.ENOENT)


def _open_fixing(dir_fd: int | None, name: str) -> int:
    """Open directory ``name`` (no symlink), after chmod'ing it ``0o700`` if it is refused."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        if not _fix_mode(dir_fd, name):
            raise
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def _fix_mode(dir_fd: int | None, name: str) -> bool:
    """Chmod directory ``name`` ``0o700`` without following a symlink swapped in for it.

    ``chmod`` has no working no-follow flag on Linux: the ``O_PATH`` descriptor pins the very
    directory (it needs no read permission on it) and ``/proc/self/fd`` reaches it.
    """
    try:
        fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        os.chmod(f"/proc/self/fd/{fd}", 0o700)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True

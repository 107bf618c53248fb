"""Slots whose ``/`` is a root filesystem directory (an exported image or a user's directory).

The slot's root is a fresh tmpfs (made read-only at the end) holding one read-only bind per
top-level entry of the rootfs (symlinks are recreated as symlinks, never followed on the
host), so the rootfs directory is never written to, needs no mount points of its own, and the
sandbox's own ``/proc``, ``/dev``, ``/tmp``, ``/workspace`` and ``/.structenv`` sit beside it.

The worker does not need the image's interpreter: the server's own Python (its ``/usr``, its
prefix and the dynamic loader) is bound read-only at :data:`HOST_ROOT` and started through the
host's loader with an explicit library path (``ld.so --library-path``), which is not
inherited: the commands the worker starts run the image's programs with the image's
libraries. Paths inside the rootfs are always resolved confined to it (:func:`resolve_in`),
so a symlink in an image never makes the server read a host file.
"""

from __future__ import annotations

import glob
import os
import stat
import sys
from collections.abc import Sequence

__all__ = [
    "host_prefixes",
    "HOST_ROOT",
    "confine_target",
    "host_loader_argv",
    "resolve_in",
    "rootfs_argv",
    "rootfs_shell",
]

#: Where the server's interpreter is bound inside an image-rootfs slot.
HOST_ROOT = "/.structenv/host"
#: Top-level names of a rootfs that the sandbox provides itself.
_OWN = {"proc", "dev", "sys", "tmp", "workspace", ".structenv", "run"}


def host_prefixes() -> list[str]:
    """Directories outside ``/usr`` the Python interpreter needs (e.g. a pyenv prefix)."""
    found: list[str] = []
    for p in (sys.base_prefix, sys.prefix, os.path.dirname(os.path.dirname(sys.executable))):
        real = os.path.realpath(p)
        if real == "/usr" or real.startswith("/usr/") or real == "/":
            continue
        if not any(real == f or real.startswith(f + "/") for f in found):
            found.append(real)
    return found


def resolve_in(root: str, path: str, *, hops: int = 40) -> str | None:
    """The host path of ``path`` inside ``root``, following symlinks as the slot would.

    Absolute link targets are taken relative to ``root``; ``..`` never leaves it. Returns
    ``None`` if a component is missing or the links loop.
    """
    parts = [p for p in path.split("/") if p and p != "."]
    done: list[str] = []
    while parts:
        name = parts.pop(0)
        if name == "..":
            if done:
                done.pop()
            continue
        here = os.path.join(root, *done, name)
        try:
            st = os.lstat(here)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            hops -= 1
            if hops < 0:
                return None
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        done.append(name)
    return os.path.join(root, *done)


def confine_target(root: str, target: str, *, hops: int = 40) -> str:
    """The path a bind's ``target`` names inside ``root``, with no symlink left in it.

    bwrap builds the slot's mounts before it enters the new root, so it follows a symlink in
    a mount point's path from the *host's* view: an image's ``/data -> /oldroot/etc`` (or
    ``../oldroot/etc``) made the privileged bwrap create a spec bind's mount point
    (``/data/input``) in the host's ``/etc``. Links are resolved here as the slot sees them
    (absolute targets relative to ``root``, ``..`` never above it), so bwrap is handed a
    path that is plain directories inside the slot's root; components that do not exist are
    kept as given (bwrap makes them in the slot's own root).

    Raises:
        ValueError: The links loop, a non-directory is in the way, or the target lands on the
            sandbox's own mounts (``/proc``, ``/workspace``, ``/.structenv``, ...) or ``/``.
    """
    parts = [p for p in os.path.normpath(target).split("/") if p and p != "."]
    done: list[str] = []
    while parts:
        name = parts.pop(0)
        if name == "..":
            if done:
                done.pop()
            continue
        if not done and name in _OWN:
            done, parts = [name, *parts], []  # the sandbox's own; refused below
            break
        here = os.path.join(root, *done, name)
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            st = None
        if st is None:
            if ".." in parts:
                raise ValueError(f"bind target {target}: '..' after a missing directory")
            done += [name, *parts]
            break
        if stat.S_ISLNK(st.st_mode):
            hops -= 1
            if hops < 0:
                raise ValueError(f"bind target {target}: too many symlinks in the rootfs")
            link = os.readlink(here)
            if link.startswith("/"):
                done = []
            parts = [p for p in link.split("/") if p and p != "."] + parts
            continue
        if parts and not stat.S_ISDIR(st.st_mode):
            raise ValueError(f"bind target {target}: /{'/'.join([*done, name])} is not a directory")
        done.append(name)
    if not done or done[0] in _OWN:
        raise ValueError(
            f"bind target {target} resolves to /{'/'.join(done)} in the rootfs, over the "
            "sandbox's own mounts"
        )
    return "/" + "/".join(done)


def rootfs_shell(root: str) -> str:
    """The shell commands run with in ``root``: ``/bin/bash`` if it has one, else ``/bin/sh``.

    Raises:
        ValueError: ``root`` is not a directory or holds no executable ``/bin/sh``.
    """
    if not os.path.isdir(root):
        raise ValueError(f"rootfs {root} is not a directory")
    for shell in ("/bin/bash", "/bin/sh"):
        found = resolve_in(root, shell)
        if found is not None and os.path.isfile(found) and os.stat(found).st_mode & 0o111:
            return shell
    raise ValueError(f"rootfs {root} has no /bin/sh")


def _loader() -> str:
    """The host's dynamic loader (the interpreter's PT_INTERP, found by name)."""
    for pattern in ("/lib64/ld-linux-*.so.*", "/lib/ld-linux-*.so.*", "/lib/ld-musl-*.so.*"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise OSError("no dynamic loader found on the host (/lib64/ld-linux-*.so.*)")


def _host_dirs() -> list[tuple[str, str]]:
    """(host path, path inside the slot) of what the server's interpreter needs."""
    binds = [("/usr", f"{HOST_ROOT}/usr")]
    for name in ("lib", "lib64", "lib32"):
        path = os.path.join("/", name)
        if os.path.isdir(path) and not os.path.islink(path):
            binds.append((path, f"{HOST_ROOT}/{name}"))
    binds += [(p, HOST_ROOT + p) for p in host_prefixes()]
    return binds


def host_loader_argv(args: Sequence[str]) -> list[str]:
    """Run the server's interpreter (at :data:`HOST_ROOT`) with ``args`` inside an
    image-rootfs slot, through the host's loader (its library path is not inherited)."""
    loader = os.path.realpath(_loader())
    multiarch = getattr(sys.implementation, "_multiarch", "")
    libs = []
    for base in ("/lib", "/usr/lib", "/lib64", "/usr/lib64"):
        if multiarch:
            libs.append(f"{HOST_ROOT}{base}/{multiarch}")
        libs.append(f"{HOST_ROOT}{base}")
    libs += [f"{HOST_ROOT}{p}/lib" for p in host_prefixes()]
    python = HOST_ROOT + os.path.realpath(sys.executable)
    return [HOST_ROOT + loader, "--library-path", ":".join(libs), python, *args]


def rootfs_argv(root: str, accounts: str | None) -> list[str]:
    """bwrap arguments that make ``root`` the slot's read-only ``/`` plus the host loader.

    Must come right after bwrap's namespace options (before ``/proc``, ``/dev``, ``/tmp``).
    """
    argv = ["--tmpfs", "/"]
    for name in sorted(os.listdir(root)):
        if name in _OWN:
            continue
        path = os.path.join(root, name)
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            argv += ["--symlink", os.readlink(path), f"/{name}"]
        elif stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
            argv += ["--ro-bind", path, f"/{name}"]
    for name in ("passwd", "group"):
        inside = resolve_in(root, f"/etc/{name}")
        if accounts is not None and inside is not None and os.path.isfile(inside):
            # The target is the resolved path inside the slot, so bwrap mounts over the file
            # itself (a symlinked /etc/passwd is never followed on the host).
            argv += ["--ro-bind", os.path.join(accounts, name), "/" + os.path.relpath(inside, root)]
    argv += ["--dir", "/run", "--perms", "0755", "--dir", HOST_ROOT]
    made = {HOST_ROOT}
    for src, dst in _host_dirs():
        parent = os.path.dirname(dst)
        chain = []
        while parent not in made and parent != "/":
            chain.append(parent)
            parent = os.path.dirname(parent)
        for directory in reversed(chain):
            made.add(directory)
            argv += ["--perms", "0755", "--dir", directory]
        argv += ["--ro-bind", src, dst]
    for name in ("lib", "lib64", "lib32", "bin", "sbin"):
        link = os.path.join("/", name)
        if os.path.islink(link):
            argv += ["--symlink", os.readlink(link), f"{HOST_ROOT}/{name}"]
    return argv


def rootfs_accounts(root: str, directory: str, uids: Sequence[int]) -> str:
    """Write ``passwd``/``group`` for ``root``: its own, plus user ``sandbox`` per slot uid."""
    os.makedirs(directory, mode=0o755, exist_ok=True)
    for name, line in (
        ("passwd", "sandbox:x:{uid}:{uid}:structenv slot:/workspace:/bin/sh"),
        ("group", "sandbox:x:{uid}:"),
    ):
        inside = resolve_in(root, f"/etc/{name}")
        text = ""
        if inside is not None and os.path.isfile(inside):
            with open(inside, errors="replace") as f:
                text = f.read(1 << 20)
        if text and not text.endswith("\n"):
            text += "\n"
        text += "".join(line.format(uid=uid) + "\n" for uid in uids)
        path = os.path.join(directory, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.chmod(path + ".tmp", 0o644)
        os.replace(path + ".tmp", path)
    return directory

"""Isolation plumbing: the bubblewrap command line, the start-up probe and per-slot cgroups.

Two escapes were demonstrated on this kind of machine when root runs bwrap naively (see
``SANDBOX_NOTES.md``): a capable uid 0 remounting ``/`` read-write, and ``--ro-bind / /``
exposing host unix sockets such as ``/run/docker.sock``. The command line built here therefore
always drops every capability and builds the slot's root from a short list of read-only binds;
``/``, ``/run`` and the host's ``/tmp`` are never bound. The probe runs that exact command line
once at start-up and checks, from inside, what it promises (no capabilities, loopback only), so
a host that cannot isolate fails closed instead of running commands unconfined.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence

import anyio

from .._exceptions import SandboxUnavailableError

__all__ = ["Isolation", "SlotCgroup", "bwrap_argv", "host_prefixes", "kill_tree", "probe"]

#: Path of the slot's workspace inside the sandbox.
WORKSPACE = "/workspace"
#: Host files that could hold secrets readable by uid 0 inside; masked with /dev/null.
_MASKED = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers")
CGROUP_V1 = "/sys/fs/cgroup"


@dataclasses.dataclass(frozen=True, slots=True)
class Isolation:
    """How slots are isolated.

    Attributes:
        mode: ``"bwrap"`` or ``"none"`` (unsandboxed; only when explicitly configured).
        bwrap: Path of the bubblewrap binary.
        allow_network: Share the host's network namespace.
    """

    mode: str = "bwrap"
    bwrap: str = "bwrap"
    allow_network: bool = False

    @property
    def sandboxed(self) -> bool:
        return self.mode == "bwrap"


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


def bwrap_argv(
    iso: Isolation,
    workspace: str,
    command: Sequence[str],
    *,
    extra_ro: Sequence[tuple[str, str]] = (),
) -> list[str]:
    """The bubblewrap command line that runs ``command`` as PID 1 of a fresh slot sandbox.

    ``extra_ro`` adds read-only ``(host path, sandbox path)`` binds (the worker program).
    """
    argv = [
        iso.bwrap,
        "--unshare-all",
        "--cap-drop", "ALL",
        "--die-with-parent",
        "--new-session",
        "--as-pid-1",
        "--hostname", "sandbox",
        "--ro-bind", "/usr", "/usr",
    ]  # fmt: skip
    if iso.allow_network:
        argv.append("--share-net")
    for link in ("bin", "lib", "lib32", "lib64", "libx32", "sbin"):
        target = os.path.join("/", link)
        if os.path.islink(target):
            argv += ["--symlink", os.readlink(target), target]
        elif os.path.isdir(target):
            argv += ["--ro-bind", target, target]
    argv += ["--ro-bind", "/etc", "/etc"]
    for secret in _MASKED + tuple(glob.glob("/etc/ssh/ssh_host_*_key")):
        if os.path.isfile(secret):
            argv += ["--ro-bind", "/dev/null", secret]
    for prefix in host_prefixes():
        argv += ["--ro-bind", prefix, prefix]
    for src, dst in extra_ro:
        argv += ["--ro-bind", src, dst]
    argv += [
        "--proc", "/proc",
        "--dev", "/dev",
        "--tmpfs", "/tmp",
        "--bind", workspace, WORKSPACE,
        "--chdir", WORKSPACE,
        "--clearenv",
        "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin",
        "--",
        *command,
    ]  # fmt: skip
    return argv


async def probe(iso: Isolation, scratch: str) -> dict[str, object]:
    """Run the real sandbox command line once and check its promises from inside.

    Raises:
        SandboxUnavailableError: bwrap is missing or fails, capabilities survive, or the
            network is not isolated although ``allow_network`` is false.

    Cancellation: the probe process is killed; nothing is left.
    """
    if not iso.sandboxed:
        return {"sandboxed": False}
    if shutil.which(iso.bwrap) is None:
        raise SandboxUnavailableError(f"bubblewrap not found at {iso.bwrap!r}")
    os.makedirs(scratch, exist_ok=True)
    script = (
        "grep CapEff /proc/self/status; cat /proc/net/dev; echo pid=$$; "
        "for p in /run /var/run/docker.sock /tmp/.X11-unix; do [ -e $p ] && echo VISIBLE=$p; done; "
        "exit 0"
    )
    argv = bwrap_argv(iso, scratch, ["/bin/sh", "-c", script])
    try:
        with anyio.fail_after(30):
            proc = await anyio.run_process(argv, check=False)
    except (OSError, TimeoutError) as exc:
        raise SandboxUnavailableError(f"cannot run bubblewrap: {exc}") from exc
    out = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise SandboxUnavailableError(f"bubblewrap failed (exit {proc.returncode}): {err}")
    cap_lines = [ln for ln in out.splitlines() if ln.startswith("CapEff:")]
    if not cap_lines or int(cap_lines[0].split()[1], 16) != 0:
        raise SandboxUnavailableError("capabilities were not dropped inside the sandbox")
    interfaces = [ln.split(":")[0].strip() for ln in out.splitlines() if ":" in ln[:20]]
    interfaces = [i for i in interfaces if i and not i.startswith(("Inter", "face", "CapEff"))]
    if not iso.allow_network and interfaces != ["lo"]:
        raise SandboxUnavailableError(f"network not isolated (interfaces: {interfaces})")
    if "VISIBLE=" in out:
        raise SandboxUnavailableError("host runtime paths are visible inside the sandbox")
    if "pid=1" not in out:
        raise SandboxUnavailableError("the sandbox did not get its own PID namespace")
    return {"sandboxed": True, "interfaces": interfaces}


class SlotCgroup:
    """A v1 pids (and, when available, memory) cgroup holding one slot's processes.

    Made by the server outside the sandbox; the sandbox cannot see or change it. The pids
    limit is what contains a fork bomb (``RLIMIT_NPROC`` is ignored for uid 0), and the
    process count is how a reset is verified from outside.
    """

    def __init__(self, name: str, *, pids_max: int, memory_max: int) -> None:
        self.pids = os.path.join(CGROUP_V1, "pids", "structenv", name)
        self.memory: str | None = os.path.join(CGROUP_V1, "memory", "structenv", name)
        os.makedirs(self.pids, exist_ok=True)
        with open(os.path.join(self.pids, "pids.max"), "w") as f:
            f.write(str(pids_max) if pids_max > 0 else "max")
        try:
            assert self.memory is not None
            os.makedirs(self.memory, exist_ok=True)
            if memory_max > 0:
                with open(os.path.join(self.memory, "memory.limit_in_bytes"), "w") as f:
                    f.write(str(memory_max))
        except OSError:
            self.memory = None

    @staticmethod
    def available() -> bool:
        """Whether a v1 pids hierarchy is mounted and writable here."""
        base = os.path.join(CGROUP_V1, "pids")
        return os.path.isfile(os.path.join(base, "cgroup.procs")) and os.access(base, os.W_OK)

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """Prefix ``argv`` so the process joins the cgroups *before* it forks anything."""
        script = 'echo $$ > "$1" && { [ -z "$2" ] || echo $$ > "$2"; } && shift 2 && exec "$@"'
        mem = os.path.join(self.memory, "cgroup.procs") if self.memory else ""
        return ["/bin/sh", "-c", script, "sh", os.path.join(self.pids, "cgroup.procs"), mem, *argv]

    def procs(self) -> list[int]:
        """PIDs (host namespace) currently in the slot's pids cgroup."""
        try:
            with open(os.path.join(self.pids, "cgroup.procs")) as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def kill_all(self) -> None:
        """SIGKILL every process in the cgroup (the sandbox's PID 1 first)."""
        for pid in self.procs():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self) -> bool:
        """Delete the cgroup directories; ``False`` if one is still busy.

        A cgroup stays busy until its last process is *reaped*, and the sandbox's PID 1 is
        reaped by the host's init after its bwrap parent dies, a moment later: callers retry.
        """
        done = True
        for path in (self.pids, self.memory):
            if path:
                try:
                    os.rmdir(path)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        done = False
        return done


def remove_cgroup_tree(name: str, *, patience: float = 0.0) -> bool:
    """Remove ``structenv/<name>`` and its children in every hierarchy (blocking).

    Retries for up to ``patience`` seconds while a cgroup is still busy (see
    :meth:`SlotCgroup.remove`). Returns whether everything is gone.
    """
    deadline = time.monotonic() + patience
    delay = 0.005
    while not _remove_tree_once(name) and time.monotonic() < deadline:
        time.sleep(delay)  # runs in a worker thread; bounded by ``patience``
        delay = min(delay * 2, 0.1)
    return _remove_tree_once(name)


def _remove_tree_once(name: str) -> bool:
    gone = True
    for controller in ("pids", "memory"):
        root = os.path.join(CGROUP_V1, controller, "structenv", name)
        if not os.path.isdir(root):
            continue
        for entry in os.listdir(root):
            path = os.path.join(root, entry)
            if os.path.isdir(path):
                try:
                    os.rmdir(path)
                except OSError:
                    gone = False
        try:
            os.rmdir(root)
        except FileNotFoundError:
            pass
        except OSError:
            gone = False
    return gone


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(name))
    return children


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (host view, one /proc walk)."""
    children = _children_map()
    out: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def kill_tree(pid: int) -> None:
    """SIGSTOP then SIGKILL ``pid`` and all its descendants (used for unsandboxed workers)."""
    seen: set[int] = set()
    for _ in range(16):
        new = [p for p in [pid, *descendants(pid)] if p not in seen]
        if not new:
            break
        for p in new:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        seen.update(new)
    for p in seen:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass

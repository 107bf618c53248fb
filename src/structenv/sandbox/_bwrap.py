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

import ctypes
import dataclasses
import errno
import glob
import hashlib
import json
import os
import select
import shutil
import signal
import sys
import time
from collections.abc import Sequence

import anyio

from .._exceptions import SandboxUnavailableError
from ._netns import DEFAULT_CONNECTION_BURST, DEFAULT_CONNECTION_RATE
from ._rootfs import host_prefixes

__all__ = [
    "CgroupError",
    "Isolation",
    "SlotCgroup",
    "bwrap_argv",
    "default_uid_base",
    "host_prefixes",
    "kill_tree",
    "has_private_mounts",
    "mount_devpts",
    "mount_quota",
    "mount_tmpfs",
    "nofile_limit",
    "privilege",
    "probe",
    "private_mounts",
    "probe_report",
    "rmdir_all",
    "slot_uid",
    "switch_uid",
    "unmount",
    "write_accounts",
]

#: ``PATH`` of a slot by default (the interpreter's directory is put first, see ``slot_argv``).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Path of the slot's workspace inside the sandbox.
WORKSPACE = "/workspace"
#: Host files that could hold secrets readable by uid 0 inside; masked with /dev/null.
_MASKED = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers")
CGROUP_V1 = "/sys/fs/cgroup"
#: The v1 hierarchies a slot's cgroups live in.
_CONTROLLERS = ("pids", "memory", "cpu")
#: Controllers a slot uses when their hierarchy is mounted (pids is always required).
OPTIONAL_CONTROLLERS = ("memory", "cpu")
_CFS_PERIOD = 100_000
#: Bytes of TCP socket buffers a slot may hold (see :class:`SlotCgroup`).
TCP_MEMORY = 64 << 20
#: Pseudo-terminals a slot may hold at once (its own devpts instance, see :func:`mount_devpts`).
SLOT_PTYS = 64
#: Host uids reserved per sandbox server (one per slot).
UID_BLOCK = 4096


@dataclasses.dataclass(frozen=True, slots=True)
class Isolation:
    """How slots are isolated.

    Attributes:
        mode: ``"bwrap"`` or ``"none"`` (unsandboxed; only when explicitly configured).
        bwrap: Path of the bubblewrap binary.
        allow_network: Give each slot outbound network access: its own network namespace
            with user-mode NAT (``_netns``), never the server's namespace.
        prohibit: IPv4 addresses or networks a networked slot must not reach besides the
            server's own (a container's server is told the Docker host's addresses).
        prohibit_links: Also prohibit every network the server's namespace is directly
            connected to (a container's bridge: the Docker host's gateway address and the
            other containers on it).
        connection_rate: New outbound flows (TCP connection attempts, non-TCP packets) a
            networked slot may start per second; the excess is dropped in the slot's own
            namespace (``_netns.budget_script``).
        connection_burst: Flows a networked slot may start at once beyond the rate.
    """

    mode: str = "bwrap"
    bwrap: str = "bwrap"
    allow_network: bool = False
    prohibit: tuple[str, ...] = ()
    prohibit_links: bool = False
    connection_rate: int = DEFAULT_CONNECTION_RATE
    connection_burst: int = DEFAULT_CONNECTION_BURST

    @property
    def sandboxed(self) -> bool:
        return self.mode == "bwrap"


_EDITABLE: list[str] | None = None
#: Never bound as an editable install's source, whatever a ``.pth`` file says.
_NOT_SOURCES = ("/", "/proc", "/sys", "/dev", "/run", "/var/run", "/etc", "/root", "/home", "/tmp")


def editable_sources() -> list[str]:
    """What editable installs into this interpreter make importable: the paths to bind.

    Read from its site-packages: for a directory listed in a ``*.pth`` file, its top-level
    packages (directories with an ``__init__.py``), modules (``*.py`` and extension modules
    with an importable name) and ``*.egg-info`` metadata, never the directory itself; for
    setuptools' ``__editable___*_finder.py`` modules, each package or module path of their
    ``MAPPING``. Bound read-only into default slots, so ``python3 -c "import mypkg"`` works
    there as on the host, while the rest of a checkout (``.git``, ``.env``, ``README``,
    ``pyproject.toml``, credentials next to the code) stays out (docs/design.md, threat
    model). Hidden entries, homes, ``/etc``, ``/tmp`` and kernel directories are never bound.
    """
    global _EDITABLE
    if _EDITABLE is not None:
        return _EDITABLE
    import ast
    import re
    import sysconfig

    site = sysconfig.get_paths().get("purelib", "")
    candidates: list[str] = []
    for pth in sorted(glob.glob(os.path.join(site, "*.pth"))):
        try:
            with open(pth) as f:
                lines = f.read(1 << 16).splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith("/") and os.path.isdir(line.strip()):
                candidates += _importable_entries(line.strip())
    for finder in sorted(glob.glob(os.path.join(site, "__editable___*_finder.py"))):
        try:
            with open(finder) as f:
                text = f.read(1 << 20)
            match = re.search(r"^MAPPING\s*(?::[^=]*)?=\s*(\{.*?\})\s*$", text, re.M | re.S)
            mapping = ast.literal_eval(match.group(1)) if match else {}
        except (OSError, ValueError, SyntaxError):
            continue
        candidates += [str(v) for v in dict(mapping).values()]
    found: list[str] = []
    for path in candidates:
        real = os.path.realpath(path)
        if not os.path.exists(real) or real in _NOT_SOURCES:
            continue
        if any(real.startswith(p + "/") for p in _NOT_SOURCES[1:7]):
            continue
        if os.path.basename(real).startswith("."):
            continue
        if real not in found and not any(real.startswith(f + "/") for f in found):
            found.append(real)
    _EDITABLE = found
    return found


def _importable_entries(directory: str) -> list[str]:
    """The top-level packages, modules and egg-info of a ``sys.path`` directory."""
    out: list[str] = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return out
    for name in names:
        path = os.path.join(directory, name)
        if name.startswith("."):
            continue
        if os.path.isdir(path):
            if name.endswith(".egg-info") or (
                name.isidentifier() and os.path.isfile(os.path.join(path, "__init__.py"))
            ):
                out.append(path)
        elif name.split(".", 1)[0].isidentifier() and name.endswith((".py", ".so", ".pyd")):
            out.append(path)
    return out


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1], 16) for ln in f if ln.startswith("CapEff:"))


def privilege() -> str:
    """How this process can give a slot its own unprivileged uid.

    - ``"root"``: root with ``CAP_SYS_ADMIN`` (a host). bwrap runs privileged and the slot's
      first process (the worker, or the probe) switches to the slot uid before it reads any
      input; bwrap grants it ``CAP_SETUID``/``CAP_SETGID`` for that and nothing else, and the
      switch clears them. Host paths need not be reachable by the slot uid.
    - ``"setpriv"``: ``CAP_SETUID`` and ``CAP_SETGID`` without ``CAP_SYS_ADMIN`` (the server
      of a container, uid 65533 with ambient capabilities): ``setpriv`` drops to the slot uid,
      then bwrap builds the sandbox in a user namespace.
    - ``"user"``: neither; slots run as this (unprivileged) uid in a user namespace.
    """
    caps = _effective_caps()
    if os.geteuid() == 0 and caps & (1 << 21):
        return "root"
    if caps & (1 << 6) and caps & (1 << 7):  # CAP_SETGID, CAP_SETUID
        return "setpriv"
    return "user"


def slot_uid(base: int, index: int) -> int | None:
    """The host uid slot ``index`` runs as, or ``None`` when this process cannot switch uids.

    Only a process that may switch uids can hand a sandbox its own; an unprivileged server's
    slots run as its own (already unprivileged) uid, each in its own user namespace.
    """
    return base + index if privilege() != "user" else None


def switch_uid(uid: int | None) -> int | None:
    """The uid the slot's first process must switch to itself (see :func:`privilege`)."""
    return uid if uid is not None and privilege() == "root" else None


def write_accounts(directory: str, uids: Sequence[int]) -> str:
    """Write ``passwd``/``group`` files: the host's, plus user ``sandbox`` for each slot uid.

    Tools that look their user up (``whoami``, git, ssh) then work in a slot whose uid is
    not root. Returns ``directory``; the files are world-readable, like the host's.
    """
    os.makedirs(directory, mode=0o755, exist_ok=True)
    for name, line in (
        ("passwd", "sandbox:x:{uid}:{uid}:structenv slot:/workspace:/bin/bash"),
        ("group", "sandbox:x:{uid}:"),
    ):
        with open(f"/etc/{name}") as f:
            host = f.read()
        extra = "".join(line.format(uid=uid) + "\n" for uid in uids)
        path = os.path.join(directory, name)
        with open(path + ".tmp", "w") as f:
            f.write(host if host.endswith("\n") or not host else host + "\n")
            f.write(extra)
        os.chmod(path + ".tmp", 0o644)
        os.replace(path + ".tmp", path)
    return directory


def default_uid_base(name: str) -> int:
    """A block of :data:`UID_BLOCK` host uids for the server called ``name``.

    Far above any real account (2^30 + a hash), so a slot shares its uid with no host user
    and, unless two servers' hashes collide, with no slot of another server on the machine.
    """
    digest = hashlib.blake2b(name.encode(), digest_size=4).digest()
    return (1 << 30) + (int.from_bytes(digest, "big") % (1 << 16)) * UID_BLOCK


def bwrap_argv(
    iso: Isolation,
    workspace: str,
    command: Sequence[str],
    *,
    extra_ro: Sequence[tuple[str, str]] = (),
    uid: int | None = None,
    seccomp_fd: int | None = None,
    tmp: str | None = None,
    shm: str | None = None,
    tmp_size: int = 1 << 30,
    shm_size: int = 64 << 20,
    accounts: str | None = None,
    rootfs: str | None = None,
    binds: Sequence[tuple[str, str]] = (),
    path: str = DEFAULT_PATH,
    pts: str | None = None,
    info_fd: int | None = None,
    block_fd: int | None = None,
) -> list[str]:
    """The command line that runs ``command`` as PID 1 of a fresh slot sandbox.

    The sandbox always has a network namespace of its own (loopback only); a networked
    slot's NAT is attached to it through ``info_fd``/``block_fd`` (see ``_netns``), and a
    root server moves it into its cgroups through ``info_fd`` (see ``SlotCgroup.join``).

    Args:
        extra_ro: Read-only ``(host path, sandbox path)`` binds (the worker program).
        uid: Host uid (and gid) the slot runs as (root only, see :func:`slot_uid`). Under
            :func:`privilege` ``"root"``, ``command`` must switch to it itself (the worker
            and the probe do, first thing); under ``"setpriv"`` it is switched to before
            bwrap starts.
        seccomp_fd: Descriptor of the seccomp program (see ``_seccomp``), read by bwrap.
        tmp: Host directory bound at ``/tmp``; default a private tmpfs of ``tmp_size``
            bytes (charged to the slot's memory cgroup). bwrap's own tmpfs has no inode
            cap (``--tmpfs`` takes only a size): a server that can mount gives each slot a
            tmpfs of its own with ``nr_inodes`` here instead (see :func:`mount_tmpfs`).
        shm: Host directory bound at ``/dev/shm``, as ``tmp``.
        shm_size: Bytes of the private tmpfs at ``/dev/shm`` (without ``shm``).
        accounts: Directory holding ``passwd`` and ``group`` to bind over the host's (see
            :func:`write_accounts`), so the slot's uid has a name.
        rootfs: Host directory to use as the slot's read-only ``/`` instead of the host's
            system (see ``_rootfs``); ``command`` must then run through the host loader.
        binds: Extra read-only ``(host path, sandbox path)`` binds of the spec, already
            checked against the bind policy (``structenv._spec.check_bind``).
        path: ``PATH`` of the sandbox's first process.
        pts: A devpts instance (see :func:`mount_devpts`) bound at ``/dev/pts`` instead of
            bwrap's, which has no cap on its terminals.
        info_fd: Descriptor bwrap writes the sandbox's pid to (JSON, then closes it).
        block_fd: Descriptor bwrap's child reads before it runs ``command``.
    """
    if uid is None and os.geteuid() == 0:
        raise ValueError("root must run a sandbox under an unprivileged uid (see slot_uid)")
    argv: list[str] = []
    mode = privilege() if uid is not None else "user"
    if mode == "setpriv":
        argv += [
            "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--",
        ]  # fmt: skip
    argv.append(iso.bwrap)
    if mode == "root":
        # No user namespace (``--unshare-all`` would make one mapping only uid 0, where the
        # switch is impossible): the worker becomes a plain unprivileged host uid, and
        # seccomp refuses it any new user namespace.
        argv += [
            "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup", "--cap-drop", "ALL",
            "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
        ]  # fmt: skip
    else:
        argv += ["--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
        argv += ["--uid", "0", "--gid", "0"]
    argv += [
        "--die-with-parent",
        "--new-session",
        "--as-pid-1",
        "--hostname", "sandbox",
    ]  # fmt: skip
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    if info_fd is not None:
        # The server reads the sandbox's pid here (it moves it into its cgroups, see
        # SlotCgroup.join); a networked slot's also blocks until its NAT is attached.
        argv += ["--info-fd", str(info_fd)]
    if block_fd is not None:
        argv += ["--block-fd", str(block_fd)]
    prefixes: list[tuple[str, str]] = []
    if rootfs is not None:
        from ._rootfs import rootfs_argv

        argv += rootfs_argv(rootfs, accounts)
    else:
        argv += ["--ro-bind", "/usr", "/usr"]
        for link in ("bin", "lib", "lib32", "lib64", "libx32", "sbin"):
            target = os.path.join("/", link)
            if os.path.islink(target):
                argv += ["--symlink", os.readlink(target), target]
            elif os.path.isdir(target):
                argv += ["--ro-bind", target, target]
        argv += ["--ro-bind", "/etc", "/etc"]
        if accounts is not None:
            for name in ("passwd", "group"):
                argv += ["--ro-bind", os.path.join(accounts, name), f"/etc/{name}"]
        for secret in _MASKED + tuple(glob.glob("/etc/ssh/ssh_host_*_key")):
            if os.path.isfile(secret):
                argv += ["--ro-bind", "/dev/null", secret]
        prefixes = [(p, p) for p in host_prefixes()]
        prefixes += [
            (p, p)
            for p in editable_sources()
            if not any(p == q or p.startswith(q + "/") for q, _ in prefixes)
        ]
    argv += [
        "--proc", "/proc",
        # bwrap covers only /proc/sys/irq and /proc/bus: the rest of /proc/sys is read-only
        # too (writes by mode are what uid 0 needs for core_pattern and friends).
        "--ro-bind", "/proc/sys", "/proc/sys",
        "--dev", "/dev",
    ]  # fmt: skip
    if pts is not None:
        argv += ["--dev-bind", pts, "/dev/pts"]  # /dev/ptmx is bwrap's link to pts/ptmx
    if shm is None:
        argv += ["--perms", "1777", "--size", str(shm_size), "--tmpfs", "/dev/shm"]
    else:
        argv += ["--bind", shm, "/dev/shm"]
    if tmp is None:
        argv += ["--perms", "1777", "--size", str(tmp_size), "--tmpfs", "/tmp"]
    else:
        argv += ["--bind", tmp, "/tmp"]
    # After /tmp: an interpreter prefix (a venv) under the host's /tmp stays visible.
    made: set[str] = set()
    for src, dst in [*prefixes, *extra_ro, *binds]:
        # bwrap would create missing parents as private as the host's (/root is 0700): make
        # them traversable, since the slot's uid must reach the interpreter it runs.
        parent = os.path.dirname(dst)
        chain = []
        while parent not in ("/", "") and parent not in made:
            chain.append(parent)
            parent = os.path.dirname(parent)
        for directory in reversed(chain):
            made.add(directory)
            argv += ["--perms", "0755", "--dir", directory]
        argv += ["--ro-bind", src, dst]
    argv += [
        "--bind", workspace, WORKSPACE,
        # Nothing outside /workspace, /tmp and /dev/shm is writable: a slot can leave no file
        # behind in /, /dev or /var for the next lease.
        "--remount-ro", "/dev",
        "--remount-ro", "/",
        "--chdir", WORKSPACE,
        "--clearenv",
        "--setenv", "PATH", path,
        "--",
        *command,
    ]  # fmt: skip
    return argv


#: What the probe checks from inside, with the slot's own interpreter (printed as JSON).
_PROBE = r"""
import ctypes, errno, json, os, sys
if sys.argv[1:]:
    uid = int(sys.argv[1])
    os.setgroups([]); os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid)
    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
    ctypes.CDLL(None).capset(hdr, (ctypes.c_uint32 * 6)())
libc = ctypes.CDLL(None, use_errno=True)
def refused(nr, *args):
    r = libc.syscall(nr, *args)
    return r == -1 and ctypes.get_errno() in (errno.EPERM, errno.ENOSYS, errno.EACCES)
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
fds = sorted(int(f) for f in os.listdir("/proc/self/fd"))
out = {
    "pid": os.getpid(),
    "cap_eff": int(status["CapEff"].strip(), 16) | int(status["CapPrm"].strip(), 16)
               | int(status["CapInh"].strip(), 16) | int(status["CapAmb"].strip(), 16),
    "seccomp": int(status["Seccomp"].strip()),
    "no_new_privs": int(status["NoNewPrivs"].strip()),
    "fds": fds,
    "interfaces": [l.split(":")[0].strip() for l in open("/proc/net/dev").readlines()[2:]],
    "visible": [p for p in ("/run", "/var/run/docker.sock", "/tmp/.X11-unix")
                if os.path.lexists(p)],
    "sysctl_writable": [p for p in ("/proc/sys/kernel/core_pattern", "/proc/sys/vm/drop_caches",
                                    "/proc/sysrq-trigger") if os.access(p, os.W_OK)],
    "root_writable": os.access("/", os.W_OK) or os.access("/dev", os.W_OK),
    "keys": len(open("/proc/keys").read().splitlines()),
    "unshare_user": not refused(272, 0x10000000),
    "keyctl": not refused(250, 0, 0, 0, 0, 0),
    "ptrace": not refused(101, 0, 0, 0, 0),  # PTRACE_TRACEME: allowed unless filtered
    "io_uring": not refused(425, 1, 0),
}
open("/workspace/.probe-owner", "w").close()
print(json.dumps(out))
"""


async def probe(
    iso: Isolation, scratch: str, *, uid: int | None = None, seccomp_path: str | None = None
) -> dict[str, object]:
    """Run the real sandbox command line once and check every promise from inside and out.

    The properties (each a reason to refuse to start when it fails): no capabilities, a
    seccomp filter and no-new-privs, no host uid 0 (checked from the host: the owner of a
    file the probe creates), no inherited descriptors, read-only ``/proc/sys`` and root, no
    visible keyrings, no nested user namespace, keyctl/ptrace/io_uring refused, loopback
    only (a networked slot gets its NAT later, see ``_netns``), no host runtime paths, a
    private PID namespace.

    Raises:
        SandboxUnavailableError: bwrap or setpriv is missing or fails, or a property does not
            hold; the message names it.

    Cancellation: the probe process is killed; nothing is left.
    """
    if not iso.sandboxed:
        return {"sandboxed": False}
    tools = [(iso.bwrap, "bubblewrap")]
    if uid is not None and privilege() == "setpriv":
        tools.append(("setpriv", "util-linux"))
    for tool, package in tools:
        if shutil.which(tool) is None:
            raise SandboxUnavailableError(f"{tool} not found (apt-get install -y {package})")
    if iso.allow_network:
        from ._netns import budget_script, check_nat

        check_nat()
        try:
            budget_script(iso.connection_rate, iso.connection_burst)
        except ValueError as exc:
            raise SandboxUnavailableError(str(exc)) from None
    report = await probe_report(iso, scratch, uid=uid, seccomp_path=seccomp_path)
    failed = [f"{name}: {detail}" for name, (ok, detail) in report.items() if not ok]
    if failed:
        raise SandboxUnavailableError(
            "sandbox property missing: "
            + "; ".join(failed)
            + " (`structenv doctor` checks each property on this machine)"
        )
    return {"sandboxed": True, "properties": sorted(report)}


def _probe_setup(
    iso: Isolation, scratch: str, uid: int | None, seccomp_path: str | None
) -> tuple[int, list[str]]:
    from . import _seccomp

    os.makedirs(scratch, exist_ok=True)
    for entry in os.listdir(scratch):
        os.unlink(os.path.join(scratch, entry))
    if uid is not None:
        os.chown(scratch, uid, uid)
    path = seccomp_path or os.path.join(os.path.dirname(scratch), ".seccomp.bpf")
    fd = _seccomp.open_program(path)
    command = [os.path.realpath(sys.executable), "-I", "-S", "-c", _PROBE]
    switch = switch_uid(uid)
    if switch is not None:
        command.append(str(switch))
    return fd, bwrap_argv(iso, scratch, command, uid=uid, seccomp_fd=fd)


async def probe_report(
    iso: Isolation, scratch: str, *, uid: int | None, seccomp_path: str | None = None
) -> dict[str, tuple[bool, str]]:
    """Every property :func:`probe` checks: name -> (holds, detail).

    Raises:
        SandboxUnavailableError: The sandbox did not run at all.

    Cancellation: the probe process is killed; nothing is left.
    """

    # A limiter of its own: one probe's setup thread at a time per call site, never
    # waiting behind another subsystem's threads.
    fd, argv = await anyio.to_thread.run_sync(
        _probe_setup, iso, scratch, uid, seccomp_path, limiter=anyio.CapacityLimiter(1)
    )
    try:
        with anyio.fail_after(30):
            proc = await anyio.run_process(argv, check=False, pass_fds=(fd,))
    except (OSError, TimeoutError) as exc:
        raise SandboxUnavailableError(f"cannot run bubblewrap: {exc}") from exc
    finally:
        os.close(fd)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-500:]
        raise SandboxUnavailableError(f"bubblewrap failed (exit {proc.returncode}): {err}")
    try:
        got = json.loads(proc.stdout.decode().strip().splitlines()[-1])
        owner = os.stat(os.path.join(scratch, ".probe-owner")).st_uid
    except (ValueError, IndexError, OSError) as exc:
        raise SandboxUnavailableError(f"the sandbox probe gave no report: {exc!r}") from exc
    ifaces = got["interfaces"]
    return {
        "no host uid 0": (owner != 0, f"a slot's files are owned by host uid {owner}"),
        "capabilities dropped": (got["cap_eff"] == 0, f"CapEff {got['cap_eff']:#x}"),
        "seccomp filter": (got["seccomp"] == 2, f"seccomp mode {got['seccomp']}"),
        "no new privileges": (got["no_new_privs"] == 1, f"NoNewPrivs {got['no_new_privs']}"),
        "no inherited descriptors": (got["fds"] == [0, 1, 2, 3], f"descriptors {got['fds']}"),
        "read-only kernel settings": (
            not got["sysctl_writable"],
            f"writable: {got['sysctl_writable'] or 'none'}",
        ),
        "read-only root": (not got["root_writable"], "/ and /dev are read-only"),
        "private keyrings": (got["keys"] == 0, f"{got['keys']} keys visible"),
        "no nested user namespace": (not got["unshare_user"], "unshare(CLONE_NEWUSER) refused"),
        "keyctl refused": (not got["keyctl"], "keyctl() refused"),
        "ptrace refused": (not got["ptrace"], "ptrace() refused"),
        "io_uring refused": (not got["io_uring"], "io_uring_setup() refused"),
        "network isolated": (
            ifaces == ["lo"],
            "loopback only" if ifaces == ["lo"] else f"interfaces: {ifaces}",
        ),
        "host paths hidden": (not got["visible"], f"visible: {got['visible'] or 'none'}"),
        "own PID namespace": (got["pid"] == 1, f"the sandbox's first process is pid {got['pid']}"),
    }


class SlotCgroup:
    """The v1 pids, memory and cpu cgroups holding one slot's processes.

    Made by the server outside the sandbox; the sandbox cannot see or change them. The pids
    limit is what contains a fork bomb (``RLIMIT_NPROC`` is per uid and ignored for root),
    the memory limit counts the slot's tmpfs pages too, and the cpu group gives every slot
    an equal weight and at most ``cpus`` cores, so 32 spinning sessions in one slot cannot
    starve its siblings or the host. The process count is how a reset is verified from
    outside. pids is required; memory and cpu are used when their hierarchies are mounted
    (:meth:`controllers`, decided once per server and reported by it and by ``structenv
    doctor``). A limit that cannot be *written* is never skipped: the constructor raises
    :class:`CgroupError` and the slot does not start (a kernel refuses, e.g., ``EBUSY`` for a
    memory limit below what is still charged, ``EINVAL`` for a cpu quota above a parent's).
    """

    def __init__(
        self,
        name: str,
        *,
        pids_max: int,
        memory_max: int,
        cpus: float = 0.0,
        root: str | None = None,
        controllers: Sequence[str] = OPTIONAL_CONTROLLERS,
    ) -> None:
        self.root = root
        self.pids = self._make("pids", name, {"pids.max": str(pids_max) if pids_max > 0 else "max"})
        self.memory: str | None = None
        self.cpu: str | None = None
        if "memory" in controllers:
            memory = {"memory.limit_in_bytes": str(memory_max)} if memory_max > 0 else {}
            self.memory = self._make("memory", name, memory)
            # cgroup v1 charges TCP buffers only to a cgroup with a TCP limit, set before the
            # sockets exist; uncharged, they count only against the host-wide tcp_mem, so one
            # slot's stalled loopback connections (4 MB each) could starve every TCP socket
            # on the machine. (Unix sockets and pipes are charged to memory already.)
            tcp = min(memory_max, TCP_MEMORY) if memory_max > 0 else TCP_MEMORY
            if os.path.exists(os.path.join(self.memory, "memory.kmem.tcp.limit_in_bytes")):
                self._set(self.memory, "memory", "memory.kmem.tcp.limit_in_bytes", str(tcp))
        if "cpu" in controllers:
            quota = int(cpus * _CFS_PERIOD) if cpus > 0 else -1
            self.cpu = self._make(
                "cpu",
                name,
                {
                    "cpu.shares": "1024",
                    "cpu.cfs_period_us": str(_CFS_PERIOD),
                    "cpu.cfs_quota_us": str(quota),
                },
            )

    @staticmethod
    def controllers(root: str | None = None) -> tuple[str, ...]:
        """The optional controllers (memory, cpu) whose v1 hierarchy is mounted here (under
        ``root``): the ones a server's slots use."""
        bases = {c: os.path.join(root or CGROUP_V1, c) for c in OPTIONAL_CONTROLLERS}
        return tuple(c for c, b in bases.items() if os.path.isfile(os.path.join(b, "cgroup.procs")))

    def _make(self, controller: str, name: str, settings: dict[str, str]) -> str:
        path = os.path.join(_cgroup_base(controller, self.root), name)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise CgroupError(
                f"cannot make the slot's {controller} cgroup {path}: {os.strerror(exc.errno or 0)}"
            ) from None
        for key, value in settings.items():
            self._set(path, controller, key, value)
        return path

    @staticmethod
    def _set(path: str, controller: str, key: str, value: str) -> None:
        try:
            _write(path, key, value)
        except OSError as exc:
            hint = _HINTS.get((key, exc.errno or 0), "")
            raise CgroupError(
                f"cannot set {key}={value} in the slot's {controller} cgroup {path}: "
                f"{os.strerror(exc.errno or 0)}{hint}; the slot does not start without it"
            ) from None

    @property
    def paths(self) -> list[str]:
        """The slot's directory in every hierarchy it uses."""
        return [p for p in (self.pids, self.memory, self.cpu) if p]

    @staticmethod
    def available(root: str | None = None) -> bool:
        """Whether a v1 pids hierarchy is mounted and writable here (under ``root``).

        Checked with the effective ids and capabilities, as the writes will be: a server with
        ``CAP_DAC_OVERRIDE`` but a non-root uid (in a container) may write a root-owned tree.
        """
        base = os.path.join(CGROUP_V1, "pids") if root is None else _cgroup_base("pids", root)
        return os.path.isfile(os.path.join(base, "cgroup.procs")) and os.access(
            base, os.W_OK, effective_ids=os.access in os.supports_effective_ids
        )

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """Prefix ``argv`` so the process joins the cgroups *before* it forks anything."""
        script = 'for g in $1; do echo $$ > "$g/cgroup.procs" || exit 125; done; shift; exec "$@"'
        return ["/bin/sh", "-c", script, "sh", " ".join(self.paths), *argv]

    def join(self, pid: int, parent: int) -> None:
        """Move ``pid``, a sandbox's first process (bwrap ``parent``'s child, from its
        ``--info-fd``), into the cgroups from outside, while it starts (blocking: on cgroup
        v1 the first write waits for an RCU grace period, 5-10 ms).

        Only for a sandbox whose first process forks nothing before the server lets it
        (the worker: not before its first request, which is sent only after this returns)
        and only by root (a v1 ``cgroup.procs`` write moves another uid's process only for
        euid 0). Before the writes, the pid must still be ``parent``'s child; after them,
        still the same process (a pidfd): a pid freed and taken again in between (32768
        pids allocated in a few microseconds) is what is not checked.

        Raises:
            CgroupError: The process is gone or not ``parent``'s child, or a write failed.
        """
        gone = f"the sandbox (pid {pid}) exited before it joined its cgroups"
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            raise CgroupError(gone) from None
        try:
            if _parent_pid(pid) != parent:
                raise CgroupError(f"{gone} (bwrap {parent} is not its parent)")
            for path in self.paths:
                try:
                    _write(path, "cgroup.procs", str(pid))
                except OSError as exc:
                    why = os.strerror(exc.errno or 0)
                    raise CgroupError(f"cannot move the sandbox into {path}: {why}") from None
            if select.select([pidfd], [], [], 0)[0]:
                raise CgroupError(gone)
        finally:
            os.close(pidfd)

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
        return rmdir_all(self.paths)


class CgroupError(OSError):
    """A slot's cgroup limit could not be applied (the slot must not run without it)."""


_HINTS = {
    ("memory.limit_in_bytes", errno.EBUSY): " (below the memory still charged to it)",
    ("cpu.cfs_quota_us", errno.EINVAL): " (above a parent cgroup's quota: the container's cpus?)",
}


def rmdir_all(paths: Sequence[str]) -> bool:
    """``rmdir`` each path in order; whether every one is gone (missing counts as gone)."""
    done = True
    for path in paths:
        try:
            os.rmdir(path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                done = False
    return done


def _write(directory: str, name: str, value: str) -> None:
    with open(os.path.join(directory, name), "w") as f:
        f.write(value)


def _parent_pid(pid: int) -> int:
    """``pid``'s parent (``/proc/PID/stat``; 0 if it is gone)."""
    fields = _stat_fields(str(pid))
    return int(fields[1]) if fields else 0


def _stat_fields(pid: str) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state, ppid, ...), or
    ``None`` if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name, in parentheses, may hold anything: the fields follow its last ")".
    return stat[stat.rindex(b")") + 2 :].split()


def _cgroup_base(controller: str, root: str | None) -> str:
    """The directory holding the servers' cgroups in ``controller``: by default
    ``/sys/fs/cgroup/<controller>/structenv``; under a delegated ``root`` (a subtree
    bind-mounted into a container) ``<root>/<controller>``."""
    if root is None:
        return os.path.join(CGROUP_V1, controller, "structenv")
    return os.path.join(root, controller)


def remove_cgroup_tree(name: str, *, patience: float = 0.0, root: str | None = None) -> bool:
    """Remove ``<name>`` and its children in every hierarchy (blocking).

    ``root`` is where the cgroups were made (see :func:`_cgroup_base`).
    Retries for up to ``patience`` seconds while a cgroup is still busy (see
    :meth:`SlotCgroup.remove`). Returns whether everything is gone.
    """
    deadline = time.monotonic() + patience
    delay = 0.005
    while not _remove_tree_once(name, root) and time.monotonic() < deadline:
        time.sleep(delay)  # runs in a worker thread; bounded by ``patience``
        delay = min(delay * 2, 0.1)
    return _remove_tree_once(name, root)


def _remove_tree_once(name: str, base: str | None) -> bool:
    gone = True
    for controller in _CONTROLLERS:
        root = os.path.join(_cgroup_base(controller, base), name)
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


#: Share of the machine's file table (``fs.file-max``) all slots of a backend may hold.
FILE_TABLE_SHARE = 0.5
#: RLIMIT_NOFILE of a slot's processes unless configured (lowered to fit the budget).
DEFAULT_NOFILE = 1024
_MIN_NOFILE = 64


def nofile_limit(
    nofile: int | None, *, pids: int, groups: int, what: str, file_max: int | None = None
) -> int:
    """The RLIMIT_NOFILE for ``groups`` process groups (slots, or containers) of ``pids``
    processes each, so that together they hold at most :data:`FILE_TABLE_SHARE` of the
    machine's file table.

    The file table is machine-wide: a slot may hold ``nofile x pids`` open files, and when
    ``fs.file-max`` is reached every non-root process on the machine gets ``ENFILE``.
    ``None`` picks :data:`DEFAULT_NOFILE`, lowered to fit. Computed when a backend is made.

    Raises:
        ConfigError: an explicit ``nofile`` does not fit, or not even 64 would; the one-line
            message names the numbers.
    """
    from .._exceptions import ConfigError

    if file_max is None:
        try:
            with open("/proc/sys/fs/file-max") as f:
                file_max = int(f.read())
        except (OSError, ValueError):
            return nofile or DEFAULT_NOFILE
    per_group = int(file_max * FILE_TABLE_SHARE) // max(groups, 1)
    fits = per_group // max(pids, 1)
    budget = (
        f"{what}: {pids} processes x nofile must stay within {per_group} open files "
        f"(fs.file-max {file_max} x {FILE_TABLE_SHARE} / {groups})"
    )
    if nofile is not None:
        if nofile * pids > per_group:
            raise ConfigError(f"{budget}, so nofile {nofile} > {fits}: lower nofile or pids")
        return nofile
    if fits < _MIN_NOFILE:
        raise ConfigError(
            f"{budget}, so nofile {fits} < {_MIN_NOFILE}: lower pids or slots "
            "(or raise fs.file-max)"
        )
    return min(DEFAULT_NOFILE, fits)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


#: Whether this process made its own mount namespace (:func:`private_mounts`): only then does
#: a server mount workspace quotas, which then cannot outlive it however it dies.
_PRIVATE_MOUNTS = False


def private_mounts() -> bool:
    """Move this process into a mount namespace of its own, if it may (idempotent).

    Must run while the process has one thread (before the event loop starts). Everything
    it mounts from then on vanishes with it, even on SIGKILL; the host's mounts stay
    visible. Returns whether this process has such a namespace.
    """
    global _PRIVATE_MOUNTS
    if _PRIVATE_MOUNTS or privilege() != "root":
        return _PRIVATE_MOUNTS
    libc = _libc()
    if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
        return False
    # MS_REC | MS_PRIVATE: our mounts do not propagate back to the host's namespace.
    if libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None) != 0:
        return False
    _PRIVATE_MOUNTS = True
    return True


def has_private_mounts() -> bool:
    """Whether :func:`private_mounts` gave this process its own mount namespace."""
    return _PRIVATE_MOUNTS


def mount_quota(path: str, *, size: int, uid: int | None, inodes: int = 0) -> None:
    """Mount a fresh tmpfs of ``size`` bytes at ``path``: a workspace with a hard quota.

    Needs ``CAP_SYS_ADMIN`` (see :func:`privilege`). The tmpfs is ``nosuid,nodev``, owned by
    the slot's uid; its pages are charged to the memory cgroup of whoever writes them (the
    slot). Unmounting it frees everything at once, however deep or large the tree.
    ``inodes`` caps its number of files (see :func:`mount_tmpfs`).
    """
    try:
        mount_tmpfs(path, size=size, inodes=inodes, uid=uid, mode=0o755)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot mount the workspace quota at {path}: {os.strerror(exc.errno or 0)}"
            " (disk_limit=0 runs without a per-slot quota)",
        ) from None


def mount_tmpfs(path: str, *, size: int, inodes: int, uid: int | None, mode: int) -> None:
    """Mount a fresh ``nosuid,nodev`` tmpfs at ``path`` (needs ``CAP_SYS_ADMIN``).

    ``inodes`` (``nr_inodes``; 0: the kernel's default, half the machine's pages) caps the
    files it can hold. Without a cap, a slot's 1.5 M empty files (1.5 GB of kernel memory,
    within its memory limit) took the kernel over 20 s to free when the sandbox died,
    longer than a reset may take; a capped tmpfs answers ``ENOSPC`` instead.
    """
    os.makedirs(path, mode=0o755, exist_ok=True)
    owner = f",uid={uid},gid={uid}" if uid is not None else ""
    cap = f",nr_inodes={inodes}" if inodes > 0 else ""
    options = f"size={size},mode={mode:o}{owner}{cap}".encode()
    flags = 0x2 | 0x4  # MS_NOSUID | MS_NODEV
    if _libc().mount(b"tmpfs", path.encode(), b"tmpfs", flags, options) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot mount a tmpfs at {path}: {os.strerror(err)}")


def mount_devpts(path: str, *, ptys: int = SLOT_PTYS) -> None:
    """Mount a devpts instance of its own at ``path``, holding at most ``ptys`` terminals
    (needs ``CAP_SYS_ADMIN``).

    Terminals are machine-wide: every devpts instance but the host's first shares
    ``kernel.pty.max`` minus ``kernel.pty.reserve`` (3,072 here), and bwrap's ``--dev`` mounts
    one without a cap, so one slot opened them all (three processes of 1,021) and every
    other slot's ``tmux`` failed. ``max=`` caps the instance.
    """
    os.makedirs(path, mode=0o755, exist_ok=True)
    options = f"newinstance,ptmxmode=0666,mode=0620,max={ptys}".encode()
    flags = 0x2 | 0x8  # MS_NOSUID | MS_NOEXEC
    if _libc().mount(b"devpts", path.encode(), b"devpts", flags, options) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot mount a devpts at {path}: {os.strerror(err)}")


def unmount(path: str) -> None:
    """Detach the filesystem mounted at ``path`` (no error if nothing is mounted there)."""
    if os.path.ismount(path) and _libc().umount2(path.encode(), 2) != 0:  # MNT_DETACH
        err = ctypes.get_errno()
        raise OSError(err, f"cannot unmount {path}: {os.strerror(err)}")


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(name)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(name))
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

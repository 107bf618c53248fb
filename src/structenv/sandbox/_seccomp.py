"""The seccomp filter every slot process runs under (built with libseccomp, loaded by bwrap).

The filter allows by default and refuses a list of system calls with ``EPERM``: what Docker's
default profile refuses (kernel modules, mounts, namespaces, keyrings, ptrace and cross-process
memory access, clock and swap changes, reboot, BPF, perf, ...), plus io_uring (a large attack
surface that bypasses per-syscall filtering), kernel AIO (its event budget is machine-wide),
vsock sockets (not namespaced: they reach a VM's hypervisor from a slot without a network),
netlink's kernel device events (broadcast to a host's slots) and the whole keyring API (the
kernel's keyrings are not namespaced: a key added in a slot lives on after it). Calls of other
architectures' ABIs (i386, x32) kill the process: a filter for one ABI says nothing about
another's numbers.

Namespaces are refused twice: bwrap's ``--disable-userns`` stops nested user namespaces, and
``unshare``/``setns`` and ``clone`` with any ``CLONE_NEW*`` flag are refused here. ``clone3``
passes its flags in memory, which seccomp cannot inspect, so it answers ``ENOSYS`` and the C
library falls back to ``clone``.

The program is built once per process with :func:`filter_program` and handed to bwrap as a
file descriptor (``--seccomp FD``); bwrap also sets ``PR_SET_NO_NEW_PRIVS``.
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile

from .._exceptions import SandboxUnavailableError

__all__ = ["REFUSED", "container_profile", "filter_program"]

#: System calls a slot can never make (refused with EPERM). Names unknown to this
#: architecture (e.g. ``vm86``) are skipped.
REFUSED = (
    # kernel modules, kexec, reboot, swap, accounting, quotas
    "init_module", "finit_module", "delete_module", "create_module", "query_module",
    "get_kernel_syms", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "acct",
    "quotactl", "quotactl_fd", "nfsservctl", "uselib", "ustat", "sysfs", "_sysctl", "vm86",
    "vm86old", "syslog", "lookup_dcookie",
    # clocks
    "settimeofday", "stime", "clock_settime", "clock_adjtime", "adjtimex",
    # mounts and namespaces
    "mount", "umount", "umount2", "pivot_root", "unshare", "setns", "fsopen", "fsconfig",
    "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr", "name_to_handle_at",
    "open_by_handle_at", "chroot",
    # other processes' memory and descriptors
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "process_madvise",
    # keyrings (not namespaced)
    "add_key", "request_key", "keyctl",
    # io_uring, BPF, perf, userfaultfd, fanotify
    "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "perf_event_open",
    "userfaultfd", "fanotify_init",
    # kernel AIO: its event budget (fs.aio-max-nr, 65,536) is machine-wide and a slot took
    # all of it, so io_setup failed with EAGAIN for every other process (glibc's POSIX AIO
    # uses threads, not these)
    "io_setup", "io_destroy", "io_submit", "io_cancel", "io_getevents", "io_pgetevents",
    # NUMA placement and raw I/O ports
    "mbind", "set_mempolicy", "migrate_pages", "move_pages", "ioperm", "iopl",
    # host identity
    "sethostname", "setdomainname",
)  # fmt: skip

#: The socket family no slot may open (see :func:`filter_program`).
AF_VSOCK = 40
#: ``socket(AF_NETLINK, *, NETLINK_KOBJECT_UEVENT)``: the kernel's device event feed.
AF_NETLINK = 16
NETLINK_KOBJECT_UEVENT = 15

_CLONE_NEW = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
    "CLONE_NEWTIME": 0x00000080,
}


@functools.cache
def filter_program() -> bytes:
    """The compiled BPF program (raw ``struct sock_filter`` array) for ``bwrap --seccomp``.

    Raises:
        SandboxUnavailableError: libseccomp (``libseccomp.so.2``) cannot be loaded.
    """
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as exc:  # pragma: no cover - depends on the machine
        raise SandboxUnavailableError(
            f"cannot load libseccomp ({exc}); install libseccomp2 to run sandboxed"
        ) from exc
    refuse = sc.ERRNO(errno.EPERM)
    filt = sc.SyscallFilter(defaction=sc.ALLOW)
    for name in REFUSED:
        try:
            filt.add_rule(refuse, name)
        except (ValueError, RuntimeError):
            continue  # not a system call on this architecture
    for flag in _CLONE_NEW.values():
        filt.add_rule(refuse, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    filt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    # vsock ignores network namespaces: a slot without a network could still talk to the
    # hypervisor (CID 2) of a VM host. Docker's default profile refuses the family too.
    filt.add_rule(refuse, "socket", sc.Arg(0, sc.EQ, AF_VSOCK))
    # The kernel broadcasts its device events (uevents) to every network namespace owned
    # by the initial user namespace, which a host's slots are (root's bwrap makes no user
    # namespace), and any uid may listen: a slot saw the host's block, network and bdi
    # devices come and go, among them each tmpfs another slot's reset mounts and each
    # container's veth. Nothing in a slot needs them (no udev runs there).
    filt.add_rule(
        refuse,
        "socket",
        sc.Arg(0, sc.EQ, AF_NETLINK),
        sc.Arg(2, sc.EQ, NETLINK_KOBJECT_UEVENT),
    )
    with tempfile.TemporaryFile() as f:
        filt.export_bpf(f)
        f.seek(0)
        program = f.read()
    if not program or len(program) % 8:
        raise SandboxUnavailableError("libseccomp produced no usable filter")
    return program


#: What bwrap itself needs to build a sandbox (refused to slots, allowed to a container's
#: sandbox server): namespaces, mounts, the new root and the sandbox's hostname.
BWRAP_NEEDS = frozenset(
    {"unshare", "setns", "mount", "umount", "umount2", "pivot_root", "chroot", "sethostname"}
)

_DOCKER_ARCH = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}


def container_profile() -> str:
    """A Docker seccomp profile (JSON) for a container whose slots run under bwrap.

    Docker's default profile refuses the namespaces and mounts bwrap needs, so instead of
    ``seccomp=unconfined`` the container gets this: :data:`REFUSED` minus
    :data:`BWRAP_NEEDS`, other ABIs refused. Every slot then runs under the full filter.
    """
    import json
    import platform

    import pyseccomp as sc

    names = sorted(
        name
        for name in REFUSED
        if name not in BWRAP_NEEDS and sc.resolve_syscall(sc.Arch.NATIVE, name) >= 0
    )
    arch = _DOCKER_ARCH.get(platform.machine(), "SCMP_ARCH_NATIVE")
    profile = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": [arch],
        "syscalls": [
            {"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM},
            {
                "names": ["socket"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": errno.EPERM,
                "args": [{"index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_EQ"}],
            },
        ],
    }
    return json.dumps(profile, separators=(",", ":"))


def open_program(path: str) -> int:
    """Write the program to ``path`` (0600) unless it is there already, and return a fresh
    read descriptor on it.

    bwrap reads the program from its descriptor to the end, so every sandbox needs its own
    descriptor (a shared one would be at end-of-file for the second sandbox). A file left by
    another version of this filter is replaced, never trusted.
    """
    program = filter_program()
    try:
        with open(path, "rb") as f:
            current = f.read(len(program) + 1)
    except FileNotFoundError:
        current = b""
    if current != program:
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, program)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    return os.open(path, os.O_RDONLY)

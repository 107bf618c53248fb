"""``structenv doctor``: which isolation features work on this machine.

Every check runs the real thing (a bubblewrap sandbox, a cgroup, a tmux session, a request to
the Docker socket) rather than looking for binaries, because the failure modes that matter here
are permission and kernel configuration problems that only show up when you try.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import subprocess
import tempfile

import anyio

from ._exceptions import SandboxUnavailableError
from .sandbox import CGROUP_V1, Isolation, default_uid_base, probe_report, slot_uid

__all__ = ["Check", "doctor", "format_report"]


@dataclasses.dataclass(frozen=True, slots=True)
class Check:
    """The outcome of one check."""

    name: str
    ok: bool
    detail: str


def _run(argv: list[str], timeout: float = 20.0) -> tuple[int, str]:
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return -1, str(exc)
    out = (proc.stdout + proc.stderr).decode(errors="replace").strip()
    return proc.returncode, out


def _bwrap_checks(bwrap: str, scratch: str) -> list[Check]:
    path = shutil.which(bwrap)
    if path is None:
        return [Check("bwrap", False, "not installed (apt-get install -y bubblewrap)")]
    checks = [Check("bwrap", True, path)]
    # The very probe a sandbox server runs at start-up, with a slot's uid and seccomp filter:
    # one list of properties, so the doctor cannot pass what the server would refuse.
    uid = slot_uid(default_uid_base(f"doctor-{os.getpid()}"), 0)
    try:
        report = anyio.run(
            functools.partial(
                probe_report, Isolation(bwrap=bwrap), os.path.join(scratch, "probe"), uid=uid
            )
        )
    except SandboxUnavailableError as exc:
        return [*checks, Check("bwrap sandbox", False, str(exc)[-300:])]
    return checks + [Check(name, ok, detail) for name, (ok, detail) in report.items()]


#: Per controller: a setting to probe it with and what it gives a slot.
_CGROUP_PROBES = {
    "pids": ("pids.max", "8", "per-slot pids.max (fork-bomb containment)"),
    "memory": ("memory.limit_in_bytes", str(64 << 20), "per-slot memory limit (tmpfs included)"),
    "cpu": ("cpu.shares", "1024", "per-slot equal cpu weight and quota"),
}


def _cgroup_checks() -> list[Check]:
    """One check per v1 controller a slot uses. pids is required; without memory or cpu,
    slots run without those limits (``cgroup="required"`` then refuses to start)."""
    checks = []
    for controller, (key, value, gives) in _CGROUP_PROBES.items():
        name = f"{controller} cgroup (v1)"
        base = os.path.join(CGROUP_V1, controller)
        if not os.path.isfile(os.path.join(base, "cgroup.procs")):
            lack = "" if controller == "pids" else ": slots run without this limit"
            checks.append(Check(name, False, f"{base} is not a v1 {controller} hierarchy{lack}"))
            continue
        probe = os.path.join(base, f"structenv-doctor-{os.getpid()}")
        try:
            os.makedirs(probe, exist_ok=True)
            with open(os.path.join(probe, key), "w") as f:
                f.write(value)
        except OSError as exc:
            checks.append(Check(name, False, str(exc)))
        else:
            checks.append(Check(name, True, gives))
        finally:
            try:
                os.rmdir(probe)
            except OSError:
                pass
    return checks


def _tmux_check(scratch: str) -> Check:
    if shutil.which("tmux") is None:
        return Check("tmux", False, "not installed")
    sock = os.path.join(scratch, "tmux.sock")
    code, out = _run(["tmux", "-S", sock, "new-session", "-d", "-s", "doctor", "true"])
    _run(["tmux", "-S", sock, "kill-server"])
    version = _run(["tmux", "-V"])[1]
    return Check("tmux", code == 0, version if code == 0 else out)


def _docker_check() -> Check:
    import socket

    path = "/var/run/docker.sock"
    if not os.path.exists(path):
        return Check("docker engine", False, f"{path} not found")
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = s.recv(256)
    except OSError as exc:
        return Check("docker engine", False, str(exc))
    ok = reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n")[0]
    return Check("docker engine", ok, "reachable" if ok else reply[:80].decode(errors="replace"))


#: What a default slot must run (issue 10): each is looked up on the slot's own PATH.
TOOLCHAIN = ("python3", "pytest", "git", "bash", "ls", "cat", "grep", "sed", "find")

_TOOLCHAIN_SCRIPT = (
    "for t in " + " ".join(TOOLCHAIN) + '; do command -v $t >/dev/null || echo "missing $t"; '
    "done; python3 -c 'import platform; print(\"python3\", platform.python_version())'; "
    "python3 -m pytest --version 2>&1 | head -1; git --version"
)


async def _toolchain(bwrap: str) -> Check:
    from ._pool import SlotPool
    from ._types import ExecRequest
    from .backends import LocalBackend

    async with LocalBackend(hosts=1, slots_per_host=1, bwrap_path=bwrap) as backend:
        async with SlotPool(backend).slot() as slot:  # released shielded and bounded
            got = await slot.exec(ExecRequest(_TOOLCHAIN_SCRIPT, timeout=60))
    lines = got.stdout.decode(errors="replace").split("\n")
    missing = [line.split()[1] for line in lines if line.startswith("missing ")]
    found = ", ".join(line.strip() for line in lines if line and not line.startswith("missing "))
    if missing:
        return Check("sandbox toolchain", False, f"missing in a default slot: {missing}; {found}")
    return Check("sandbox toolchain", True, f"{found}, bash, coreutils, grep, sed, find")


def _toolchain_check(bwrap: str) -> Check:
    """Run a real default LocalBackend slot and look for the tools it promises."""
    try:
        return anyio.run(_toolchain, bwrap)
    except Exception as exc:  # reported, never raised: the doctor lists what fails
        return Check("sandbox toolchain", False, f"{type(exc).__name__}: {exc}"[-300:])


async def _network(bwrap: str) -> Check:
    from ._pool import SlotPool
    from ._types import ExecRequest
    from .backends import LocalBackend
    from .sandbox._netns import DEFAULT_CONNECTION_BURST, DEFAULT_CONNECTION_RATE

    async with LocalBackend(
        hosts=1, slots_per_host=1, bwrap_path=bwrap, allow_network=True
    ) as backend:
        async with SlotPool(backend).slot() as slot:  # released shielded and bounded
            got = await slot.exec(ExecRequest("ip -4 -o addr show dev tap0", timeout=30))
    out = got.stdout.decode(errors="replace").split()
    if got.exit_code != 0 or "inet" not in out:
        return Check("slot network", False, f"no tap0 in a networked slot: {got.stderr!r}"[:300])
    rate, burst = DEFAULT_CONNECTION_RATE, DEFAULT_CONNECTION_BURST
    return Check(
        "slot network",
        True,
        f"own namespace, slirp4netns NAT ({out[out.index('inet') + 1]}), budget of "
        f"{rate} new connections/s, burst {burst} (nftables)",
    )


def _network_check(bwrap: str) -> Check:
    """``allow_network=True``: a real networked slot gets its own namespace with NAT and its
    budget of new connections (``slirp4netns``, ``iproute2`` and ``nftables``)."""
    from .sandbox._netns import check_nat

    try:
        check_nat()
        return anyio.run(_network, bwrap)
    except SandboxUnavailableError as exc:
        return Check("slot network", False, str(exc))
    except Exception as exc:  # reported, never raised: the doctor lists what fails
        return Check("slot network", False, f"{type(exc).__name__}: {exc}"[-300:])


#: Checks whose failure does not stop LocalBackend from isolating slots.
_OPTIONAL = (
    "tmux",
    "docker engine",
    "sandbox toolchain",
    "slot network",
    "memory cgroup (v1)",
    "cpu cgroup (v1)",
)


def doctor(*, bwrap: str = "bwrap") -> list[Check]:
    """Run every isolation check and the default slot's toolchain (blocking; a second or
    two: the toolchain runs in a real slot)."""
    with tempfile.TemporaryDirectory(prefix="structenv-doctor-") as scratch:
        checks = _bwrap_checks(bwrap, scratch)
        checks.extend(_cgroup_checks())
        checks.append(_tmux_check(scratch))
    if all(c.ok for c in checks if c.name not in _OPTIONAL):
        checks.append(_toolchain_check(bwrap))
        checks.append(_network_check(bwrap))
    checks.append(_docker_check())
    return checks


def format_report(checks: list[Check]) -> str:
    """A human-readable table of :func:`doctor` results."""
    width = max(len(c.name) for c in checks)
    lines = [f"{'ok ' if c.ok else 'NO '} {c.name:<{width}}  {c.detail}" for c in checks]
    sandbox_ok = all(c.ok for c in checks if c.name not in _OPTIONAL)
    lines.append("")
    lines.append(
        "LocalBackend isolation: available"
        if sandbox_ok
        else "LocalBackend isolation: UNAVAILABLE (require_sandbox=True will refuse to start)"
    )
    return "\n".join(lines)

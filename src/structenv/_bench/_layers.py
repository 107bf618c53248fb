"""Synchronous drivers for the layers under the exec path (``structenv bench exec``).

Each driver measures one layer with nothing above it: no event loop, no async client, a
blocking loop in a worker thread. Side by side with the full stack in the same run they say
where an exec's time goes:

- ``posix_spawn_floor``: ``posix_spawn`` + ``waitpid`` of the command, the machine's floor;
- ``worker_only``: a slot's worker in its bwrap sandbox (the exact command line the sandbox
  server runs), driven over its pipes;
- ``server_only``: a real sandbox server's ``POST /v1/exec`` over its unix socket, one
  keep-alive connection, a hand-rolled blocking HTTP/1.1 client;
- ``wakeup_rtt``: a one-byte pipe ping-pong with a child process pinned to the same or to the
  other CPU, the price of every process hop on the path.

Every loop checks for cancellation of the calling task between iterations and kills what it
started on the way out.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable

from anyio.from_thread import check_cancelled

from ..sandbox import (
    WORKER_FILE,
    Isolation,
    Limits,
    default_uid_base,
    host_prefixes,
    open_seccomp_program,
    slot_argv,
    slot_uid,
)

__all__ = ["posix_spawn_floor", "server_only", "wakeup_rtt", "worker_only"]

COMMAND = "/bin/true"
_FRAME = struct.Struct(">I")


def _timed(n: int, op: Callable[[], None]) -> tuple[list[float], float]:
    """Run ``op`` ``n`` times; return the latencies and the whole loop's duration."""
    latencies: list[float] = []
    timer = time.perf_counter
    loop_start = timer()
    for _ in range(n):
        check_cancelled()
        start = timer()
        op()
        latencies.append(timer() - start)
    return latencies, timer() - loop_start


def posix_spawn_floor(n: int) -> tuple[list[float], float]:
    """``posix_spawn`` + ``waitpid`` of the command: no sandbox, no pipes, no event loop."""

    def op() -> None:
        os.waitpid(os.posix_spawn(COMMAND, [COMMAND], {}), 0)

    return _timed(n, op)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


def _unhardened_argv(workspace: str) -> list[str]:
    """The slot command line as it was before the sandbox hardening (2026-12-01), for
    ``bench exec``'s side-by-side cost of it: bwrap as root with a writable root and a plain
    ``/tmp``, no seccomp filter, no uid of the slot's own; today's worker inside."""
    config: dict[str, object] = {"pid1": True, "workspace": "/workspace", "tag": "bench"}
    worker = WORKER_FILE
    argv = ["bwrap", "--unshare-all", "--cap-drop", "ALL", "--die-with-parent", "--new-session"]
    argv += ["--as-pid-1", "--ro-bind", "/usr", "/usr"]
    for link in ("bin", "lib", "lib64", "sbin"):
        target = "/" + link
        if os.path.islink(target):
            argv += ["--symlink", os.readlink(target), target]
    argv += ["--ro-bind", "/etc", "/etc"]
    for prefix in host_prefixes():
        argv += ["--ro-bind", prefix, prefix]
    argv += ["--ro-bind", worker, "/.structenv/worker.py", "--proc", "/proc", "--dev", "/dev"]
    argv += ["--tmpfs", "/tmp", "--bind", workspace, "/workspace", "--chdir", "/workspace"]
    python = os.path.realpath(sys.executable)
    return [*argv, "--", python, "-I", "-S", "/.structenv/worker.py", json.dumps(config)]


def worker_only(n: int, workspace: str, *, hardened: bool = True) -> tuple[list[float], float]:
    """A slot worker in its bwrap sandbox, sent exec frames over its stdin pipe.

    ``hardened=False`` runs it under the pre-hardening command line (:func:`_unhardened_argv`).
    """
    # A real slot's command line: its own uid and the seccomp filter, as the server runs it.
    uid = slot_uid(default_uid_base("bench"), 0)
    if uid is not None:
        os.chown(workspace, uid if hardened else 0, uid if hardened else 0)
        os.chmod(workspace, 0o755)
    fd = open_seccomp_program(os.path.join(os.path.dirname(workspace), ".seccomp.bpf"))
    try:
        argv = (
            slot_argv(Isolation(), workspace, name="bench", limits=Limits(), uid=uid, seccomp_fd=fd)
            if hardened
            else _unhardened_argv(workspace)
        )
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, pass_fds=(fd,)
        )
    finally:
        os.close(fd)
    assert proc.stdin is not None and proc.stdout is not None
    send, receive = proc.stdin.write, proc.stdout.read

    def read_frame() -> dict[str, object]:
        header = receive(4)
        if len(header) < 4:
            raise RuntimeError("the slot worker exited")
        (size,) = _FRAME.unpack(header)
        value: dict[str, object] = json.loads(receive(size))
        return value

    frame = json.dumps(
        {"op": "exec", "id": 1, "command": COMMAND, "timeout": 30.0, "max_output": 1 << 16}
    ).encode()
    request = _FRAME.pack(len(frame)) + frame

    def op() -> None:
        send(request)
        result = read_frame().get("result")
        if not (isinstance(result, dict) and result.get("exit_code") == 0):
            raise RuntimeError(f"benchmark command failed in the worker: {result}")

    try:
        if not read_frame().get("hello"):
            raise RuntimeError("unexpected greeting from the slot worker")
        return _timed(n, op)
    finally:
        _stop(proc)


def server_only(n: int, path: str, head: bytes, body: bytes) -> tuple[list[float], float]:
    """``POST /v1/exec`` to a real sandbox server over its unix socket, blocking calls.

    ``head`` is the request head (with the server's bearer token), ``body`` the exec request.
    """
    request = head + body
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        buf = bytearray()

        def op() -> None:
            sock.sendall(request)
            while (end := buf.find(b"\r\n\r\n")) < 0:
                _receive_into(sock, buf)
            lines = bytes(buf[:end]).split(b"\r\n")
            del buf[: end + 4]
            length = next(
                int(line.split(b":", 1)[1])
                for line in lines
                if line[:15].lower() == b"content-length:"
            )
            while len(buf) < length:
                _receive_into(sock, buf)
            answer = json.loads(bytes(buf[:length]))
            del buf[:length]
            if not lines[0].startswith(b"HTTP/1.1 200 ") or answer.get("exit_code") != 0:
                raise RuntimeError(f"benchmark command failed on the server: {answer}")

        return _timed(n, op)


def _receive_into(sock: socket.socket, buf: bytearray) -> None:
    data = sock.recv(1 << 16)
    if not data:
        raise RuntimeError("the sandbox server closed the connection")
    buf += data


_ECHO = (
    "import os, sys\n"
    "os.sched_setaffinity(0, {int(sys.argv[1])})\n"
    "while (b := os.read(0, 1)):\n"
    "    os.write(1, b)\n"
)


def wakeup_rtt(n: int, *, same_cpu: bool) -> tuple[list[float], float] | None:
    """One-byte pipe round trips with a child pinned to this thread's CPU or the other one.

    ``None`` on a one-CPU machine when ``same_cpu`` is false.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if not same_cpu and len(cpus) < 2:
        return None
    mine, theirs = cpus[0], cpus[0] if same_cpu else cpus[1]
    previous = os.sched_getaffinity(0)
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _ECHO, str(theirs)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,
    )
    assert proc.stdin is not None and proc.stdout is not None
    send, receive = proc.stdin.write, proc.stdout.read

    def op() -> None:
        send(b"x")
        if receive(1) != b"x":
            raise RuntimeError("the echo child exited")

    try:
        os.sched_setaffinity(0, {mine})  # this thread only (Linux: pid 0 is the caller)
        op()  # the child has pinned itself once it answers
        return _timed(n, op)
    finally:
        os.sched_setaffinity(0, previous)
        _stop(proc)

"""The per-slot worker: a small stdlib-only program living inside the slot's sandbox.

The sandbox server starts one worker per slot (``python -I -S -c <this file> <config>``) as
PID 1 of the slot's PID namespace, so every process of the slot is its descendant and orphans
are reparented to it. It reads length-prefixed JSON frames from stdin and writes replies to
stdout; commands are spawned with ``posix_spawn`` (vfork-fast) so a command costs one
fork+exec, not a bwrap setup.

The worker is *inside* the trust boundary of the sandbox: a command runs with the same uid and
could tamper with it. The server therefore treats every reply as untrusted input (bounded
frames, validated fields) and verifies resets from outside (pids cgroup, workspace listing).

Operations (``op`` field): ``exec``, ``kill`` (kill one command's process tree), ``end``
(kill every other process of the slot, reap them and name what is left; the running commands
are answered with an error; how ``Slot.end_processes`` ends what a trajectory left running
without spawning a process a command could race), ``reset`` (the same; only unsandboxed
slots use it: a sandboxed slot is rebuilt instead), ``ping``.
"""

from __future__ import annotations

import os
import resource
import select
import sys
import time
from _struct import Struct
from binascii import a2b_base64, b2a_base64

# Only C modules and os: a worker's start-up is most of a cold slot. Not ``json`` (it imports
# ``re``, hence ``enum``, ``functools`` and ``collections``), nor ``signal`` (``enum``), nor
# ``ctypes`` (tens of classes), nor ``typing``: each cost a cold slot tens of milliseconds on
# a loaded machine. Frames go through ``_json``'s C scanner and encoder (:func:`_codec`).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from typing import Any
else:
    import _signal as signal  # what ``signal`` wraps in enums

HEADER = Struct(">I")
MAX_FRAME = 64 << 20
#: After the main process exits, how long to keep reading output that background children
#: still hold open before returning (they keep running; the deadline/reset kills them).
DRAIN_SECONDS = 0.05
READ_CHUNK = 1 << 16

#: Characters that have no special meaning to bash in an unquoted word. A command made only
#: of such words (separated by blanks) is run by bash as a plain exec, so the worker execs it
#: directly and saves bash's own start-up (~0.8 ms here), which is most of an exec round trip.
#: (Checked with ``str.strip``: a regex match costs more, with the engine cold every command.)
_WORD_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" + "_@%+=:,./-"
_BLANKS = " \t"
_BUILTIN_WORDS = (
    ". : [ alias bg bind break builtin caller case cd command compgen complete compopt "
    "continue coproc declare dirs disown do done echo elif else enable esac eval exec exit "
    "export false fc fg fi for function getopts hash help history if in jobs kill let local "
    "logout mapfile popd printf pushd pwd read readarray readonly return select set shift "
    "shopt source suspend test then time times trap true type typeset ulimit umask unalias "
    "unset until wait while"
)
_BASH_BUILTINS = frozenset(_BUILTIN_WORDS.split())

_INF = float("inf")


def _codec() -> tuple[Any, Any]:
    """``(encode, decode)`` of compact JSON: what ``json.JSONEncoder(separators=(",", ":"))``
    and ``json.JSONDecoder`` do, through the C scanner and encoder of ``_json`` (which
    ``json`` itself uses), without importing ``json``. Falls back to ``json`` where ``_json``
    differs (another interpreter or version): checked on a sample before use."""
    try:
        import _json

        class _Context:
            strict = True
            object_hook = None
            object_pairs_hook = None
            parse_float = float
            parse_int = int
            parse_constant = {"-Infinity": -_INF, "Infinity": _INF, "NaN": _INF - _INF}.__getitem__

        scan = _json.make_scanner(_Context())  # type: ignore[arg-type]  # duck-typed

        def unknown(o: object) -> None:
            raise TypeError(f"{type(o).__name__} is not JSON serializable")

        iterencode = _json.make_encoder(
            None, unknown, _json.encode_basestring_ascii, None, ":", ",", False, False, True
        )

        def encode(value: object) -> str:
            return "".join(iterencode(value, 0))

        def decode(text: str) -> Any:
            text = text.strip(" \t\n\r")
            try:
                value, end = scan(text, 0)
            except StopIteration:
                raise ValueError("malformed JSON frame") from None
            if end != len(text):
                raise ValueError("extra data after a JSON frame")
            return value

        sample = {"a": [1, -2.5, True, None, '\u00e9\n"x'], "b": {}, "c": ""}
        text = '{"a":[1,-2.5,true,null,"\\u00e9\\n\\"x"],"b":{},"c":""}'
        if encode(sample) != text or decode(text) != sample:
            raise ValueError("_json differs")
        return encode, decode
    except Exception:
        import json

        return json.JSONEncoder(separators=(",", ":")).encode, json.JSONDecoder().decode


#: One encoder and decoder for all frames.
_encode, _decode = _codec()
_JSON_BOOL = ("false", "true")


def _bash_reads(name: str) -> bool:
    """Whether an environment variable changes what bash does with a plain command."""
    return name.startswith("BASH") or name in ("ENV", "SHELLOPTS")


class Command:
    """One running command and its captured output."""

    __slots__ = (
        "cap",
        "deadline",
        "err",
        "err_fd",
        "err_total",
        "exit_time",
        "id",
        "killed",
        "out",
        "out_fd",
        "out_total",
        "pid",
        "start",
        "status",
        "stdin_data",
        "stdin_fd",
        "tag",
        "timed_out",
        "writers",
    )

    def __init__(self, cid: int, cap: int, start: float, deadline: float, tag: str) -> None:
        self.id = cid
        self.cap = cap
        self.start = start
        self.deadline = deadline
        self.tag = tag
        self.pid = 0
        self.out = bytearray()
        self.err = bytearray()
        self.out_total = 0
        self.err_total = 0
        self.out_fd = self.err_fd = -1  # read ends of its output pipes (-1: closed)
        self.writers: tuple[int, ...] = ()  # the worker's copies of their write ends
        self.stdin_fd = -1
        self.stdin_data = b""
        self.status: int | None = None
        self.exit_time = 0.0
        self.timed_out = False
        self.killed = False


#: What an fd registered in the worker's epoll set is (the values of ``Worker.fds``).
_STDOUT, _STDERR, _STDIN = 0, 1, 2


class Worker:
    """The worker's event loop (single-threaded, one epoll set).

    The hot path is tuned for short commands: a ``true`` costs one spawn, two pipes, two
    sleeps (for the request, for the exit) and one reply write. Epoll is used directly
    (``selectors`` costs measurable time per command here); reads go into one preallocated
    buffer (a fresh 1 MiB ``bytes`` per read cost an mmap, page faults and a munmap with a TLB
    shootdown); fds leave the epoll set by being closed; the reply is formatted by hand; and
    the command is answered in the iteration that reaps it (see :meth:`exited`). Python code
    run once per command is cold every time (the command ran in between), so each C function
    it touches costs several times its warm price: fewer of them is the main saving.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.pid1 = bool(config.get("pid1"))
        self.workspace = str(config["workspace"])
        #: The shell of commands: bash, or /bin/sh in an image without bash.
        self.shell = str(config.get("shell") or "/bin/bash")
        #: Where commands start when the request names no cwd (relative to the workspace).
        self.workdir = str(config.get("workdir") or "")
        self.base_env = {str(k): str(v) for k, v in config.get("env", {}).items()}
        self.base_env_bashy = any(map(_bash_reads, self.base_env))
        self.tag = str(config.get("tag", "se"))
        self.ep = select.epoll()
        #: fd -> (command, _STDOUT/_STDERR/_STDIN) for every registered command pipe.
        self.fds: dict[int, tuple[Command, int]] = {}
        self.outbox: list[bytes] = []
        self.doomed: list[int] = []  # fds to close after the next write (see _close)
        # Only *ignored* signals survive exec (handled ones are reset by the kernel), so only
        # those need resetting in the child; fewer sigactions make each spawn cheaper.
        self.sigdef: tuple[int, ...] = ()
        self.commands: dict[int, Command] = {}
        self.by_pid: dict[int, Command] = {}
        self.inbuf = bytearray()
        self.rbuf = bytearray(READ_CHUNK)
        self.rview = memoryview(self.rbuf)
        self.due = _INF  # when the earliest deadline or drain ends (see _next_timeout)
        #: Set by the SIGCHLD handler: some child (a command or a reparented orphan) exited.
        self.child_exited = False
        #: PATH value -> its directories, or None if bash would search it differently.
        self.path_dirs: dict[str, tuple[str, ...] | None] = {}
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.me = os.getpid()
        self._apply_limits(config.get("limits", {}))

    def _apply_limits(self, limits: dict[str, int]) -> None:
        # Set here, inherited by every command, hard = soft: a command cannot raise them
        # (``ulimit -f unlimited`` fails). The CPU limit is per process, so the worker's own
        # (tiny) CPU use does not eat into a command's budget; the worker survives passing
        # it because it handles SIGXCPU (handlers reset on exec).
        names = {"as": "RLIMIT_AS", "fsize": "RLIMIT_FSIZE", "cpu": "RLIMIT_CPU"}
        names.update(nofile="RLIMIT_NOFILE", nproc="RLIMIT_NPROC")
        for key, name in names.items():
            value = int(limits.get(key) or 0)
            if value > 0:
                res = getattr(resource, name)
                _, hard = resource.getrlimit(res)
                if hard != resource.RLIM_INFINITY:
                    value = min(value, hard)
                resource.setrlimit(res, (value, value))

    # -- protocol -------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        """Queue a frame; :meth:`flush` writes all frames of a loop iteration at once."""
        data = _encode(message).encode()
        self.outbox.append(HEADER.pack(len(data)) + data)

    def flush(self) -> None:
        data = self.outbox[0] if len(self.outbox) == 1 else b"".join(self.outbox)
        self.outbox.clear()
        n = os.write(1, data)
        if n < len(data):
            view = memoryview(data)[n:]
            while view:
                n = os.write(1, view)
                view = view[n:]
        if self.doomed:
            self._close_doomed()

    def on_input(self) -> None:
        n = os.readv(0, [self.rbuf])
        if not n:
            self.kill_everything()
            sys.exit(0)
        if self.inbuf:
            self.inbuf += self.rview[:n]
            data: bytearray = self.inbuf
            end = len(data)
        else:
            data, end = self.rbuf, n  # the common case: whole frames, parsed in place
        messages = []
        pos = 0
        while end - pos >= 4:
            (size,) = HEADER.unpack_from(data, pos)
            if size > MAX_FRAME:
                sys.exit(2)
            if end - pos - 4 < size:
                break
            messages.append(_decode(data[pos + 4 : pos + 4 + size].decode()))
            pos += 4 + size
        if data is self.inbuf:
            del self.inbuf[:pos]
        elif pos < end:
            self.inbuf = bytearray(self.rview[pos:end])
        for message in messages:
            self.handle(message)

    def handle(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        mid = int(msg.get("id", 0))
        if op == "exec":
            self.start_command(mid, msg)
        elif op == "kill":
            cmd = self.commands.get(mid)
            if cmd is not None and not cmd.killed:
                self.kill_tree(cmd)
        elif op == "end":
            self.send({"id": mid, **self.end_all("the slot's processes were ended")})
        elif op == "reset":
            self.send({"id": mid, **self.end_all("the slot was reset")})
        elif op == "ping":
            self.send({"id": mid, "ok": True, "pid": self.me})

    # -- commands -------------------------------------------------------------------------

    def _argv(self, command: str, env: dict[str, str], extra: Any) -> tuple[str, list[str]]:
        """The program and argv to spawn: the command itself if bash would just exec it (with
        argv[0] the word as typed, as bash passes it), else bash -c.

        No access/stat checks on the program: if it cannot be exec'd, the spawn fails and
        :meth:`start_command` falls back to bash, which then does (and reports) exactly what
        it always would.
        """
        if (
            command
            and command[0] in _WORD_CHARS
            and not command.strip(_WORD_CHARS + _BLANKS)
            and not self.base_env_bashy
            and not (extra and any(map(_bash_reads, extra)))
        ):
            words = command.split()
            first = words[0]
            if "=" not in first and first not in _BASH_BUILTINS:
                if "/" in first:
                    return first, words  # a path: bash would exec it as is
                path = self._which(first, env.get("PATH"))
                if path is not None:
                    return path, words
        return self.shell, [self.shell, "-c", command]

    def _which(self, name: str, path: str | None) -> str | None:
        """The first ``name`` in ``path`` that is executable (bash's lookup, give or take:
        a directory found here fails to spawn and falls back to bash)."""
        if path is None:
            return None
        dirs = self.path_dirs.get(path, ())
        if dirs == ():
            parts = tuple(path.split(":"))
            # Empty or relative entries mean "relative to the cwd" to bash: leave those to it.
            dirs = parts if all(p.startswith("/") for p in parts) else None
            if len(self.path_dirs) < 64:
                self.path_dirs[path] = dirs
        if dirs is None:
            return None
        for d in dirs:
            candidate = f"{d}/{name}"
            if os.access(candidate, os.X_OK):
                return candidate
        return None

    def start_command(self, cid: int, msg: dict[str, Any]) -> None:
        now = time.monotonic()
        tag = f"{self.tag}.{cid}"
        cmd = Command(cid, int(msg["max_output"]), now, now + float(msg["timeout"]), tag)
        sub = msg.get("cwd") or self.workdir
        cwd = os.path.join(self.workspace, sub) if sub else self.workspace
        env = self.base_env.copy()
        extra = msg.get("env")
        if extra:
            env.update(extra)
        env["PWD"] = cwd
        env["STRUCTENV_EXEC_TAG"] = tag
        command = str(msg["command"])
        program, argv = self._argv(command, env, extra)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        os.set_blocking(out_r, False)
        os.set_blocking(err_r, False)
        stdin_src = self.devnull
        in_r = -1
        if msg.get("stdin") is not None:
            cmd.stdin_data = a2b_base64(msg["stdin"])
            in_r, cmd.stdin_fd = os.pipe()
            stdin_src = in_r
        actions = [
            (os.POSIX_SPAWN_DUP2, stdin_src, 0),
            (os.POSIX_SPAWN_DUP2, out_w, 1),
            (os.POSIX_SPAWN_DUP2, err_w, 2),
        ]
        try:
            if sub:
                os.chdir(cwd)
            try:
                try:
                    cmd.pid = os.posix_spawn(
                        program, argv, env, file_actions=actions, setsid=True,
                        setsigdef=self.sigdef, setsigmask=(),
                    )  # fmt: skip
                except OSError:
                    if program == self.shell:
                        raise
                    argv = [self.shell, "-c", command]
                    cmd.pid = os.posix_spawn(
                        argv[0], argv, env, file_actions=actions, setsid=True,
                        setsigdef=self.sigdef, setsigmask=(),
                    )  # fmt: skip
            finally:
                if sub:
                    os.chdir(self.workspace)
        except (OSError, ValueError) as exc:
            # ValueError: a NUL in the environment or the directory, or ``=`` in a variable's
            # name (posix_spawn and chdir refuse them before any system call). The server
            # refuses such requests; the worker must survive one anyway, or a single tool
            # argument would take the slot down.
            for fd in (out_r, out_w, err_r, err_w, cmd.stdin_fd):
                if fd >= 0:
                    os.close(fd)
            self.send({"id": cid, "result": {"exit_code": None, "error": f"spawn failed: {exc}"}})
            return
        finally:
            if in_r >= 0:
                os.close(in_r)
        self.commands[cid] = cmd
        self.by_pid[cmd.pid] = cmd
        # The worker keeps its copies of the write ends until the process has exited: the
        # pipes then cannot hang up before the exit, so a short command wakes the loop once
        # (its SIGCHLD) rather than up to three times (two hang-ups, then the SIGCHLD), and
        # its output is read right after it is reaped (see exited). Hence non-blocking reads.
        cmd.writers = (out_w, err_w)
        cmd.out_fd, cmd.err_fd = out_r, err_r
        register, fds = self.ep.register, self.fds
        register(out_r, select.EPOLLIN)
        fds[out_r] = (cmd, _STDOUT)
        register(err_r, select.EPOLLIN)
        fds[err_r] = (cmd, _STDERR)
        if cmd.stdin_fd >= 0:
            # Non-blocking: a partial write must not stall the loop on a slow reader.
            os.set_blocking(cmd.stdin_fd, False)
            register(cmd.stdin_fd, select.EPOLLOUT)
            fds[cmd.stdin_fd] = (cmd, _STDIN)

    def _close(self, fd: int) -> None:
        """Forget a registered fd. It is closed once this iteration's answers are written:
        closing the last reference to a pipe frees it, which takes a few microseconds."""
        del self.fds[fd]
        self.doomed.append(fd)

    def _close_doomed(self) -> None:
        for fd in self.doomed:
            os.close(fd)  # (this also drops it from the epoll set)
        self.doomed.clear()

    def on_stdin(self, cmd: Command, fd: int) -> None:
        try:
            n = os.write(fd, cmd.stdin_data[: 1 << 16])
            cmd.stdin_data = cmd.stdin_data[n:]
        except BlockingIOError:
            return
        except OSError:
            cmd.stdin_data = b""
        if not cmd.stdin_data:
            self._close(fd)
            cmd.stdin_fd = -1

    def read_output(self, cmd: Command, fd: int, is_out: bool) -> int:
        """Read once from an output pipe: the byte count, 0 at its end (it is then closed),
        or -1 if it is empty for now."""
        try:
            n = os.readv(fd, [self.rbuf])
        except BlockingIOError:
            return -1
        if not n:
            self._close(fd)
            if is_out:
                cmd.out_fd = -1
            else:
                cmd.err_fd = -1
            return 0
        buf = cmd.out if is_out else cmd.err
        room = cmd.cap - len(buf)
        if room > 0:
            buf += self.rview[: min(n, room)]
        if is_out:
            cmd.out_total += n
        else:
            cmd.err_total += n
        return n

    def exited(self, cmd: Command, status: int) -> None:
        """The command's process has exited: read the rest of its output and answer, unless
        background children still hold its pipes (then they get DRAIN_SECONDS, see _tick)."""
        cmd.status = status
        cmd.exit_time = time.monotonic()
        for fd in cmd.writers:
            os.close(fd)
        cmd.writers = ()
        for fd, is_out in ((cmd.out_fd, True), (cmd.err_fd, False)):
            if fd >= 0:
                for _ in range(16):  # bounded: a background child may write forever
                    if self.read_output(cmd, fd, is_out) <= 0:
                        break
        if cmd.out_fd < 0 and cmd.err_fd < 0:
            self.complete(cmd)

    def complete(self, cmd: Command) -> None:
        """Answer a command whose process has exited (and whose output is read or drained)."""
        if cmd.timed_out or cmd.killed:
            self.kill_tree(cmd)  # what is left of it (background children)
        self.finish(cmd)

    def finish(self, cmd: Command, error: str | None = None) -> None:
        for fd in (cmd.out_fd, cmd.err_fd, cmd.stdin_fd):
            if fd >= 0:
                self._close(fd)
        for fd in cmd.writers:
            os.close(fd)
        cmd.out_fd = cmd.err_fd = cmd.stdin_fd = -1
        cmd.writers = ()
        del self.commands[cmd.id]
        self.by_pid.pop(cmd.pid, None)
        status = cmd.status
        exit_code = sig = "null"
        if status is not None:
            if os.WIFSIGNALED(status):
                sig = str(os.WTERMSIG(status))
            else:
                exit_code = str(os.waitstatus_to_exitcode(status))
        duration = (cmd.exit_time or time.monotonic()) - cmd.start
        # Formatted by hand: a few fixed-type fields, and the json encoder is by far the
        # slowest part of answering a short command (its code is cold after every command).
        out = b2a_base64(cmd.out, newline=False).decode() if cmd.out else ""
        err = b2a_base64(cmd.err, newline=False).decode() if cmd.err else ""
        data = (
            f'{{"id":{cmd.id},"result":{{"exit_code":{exit_code},"signal":{sig},'
            f'"stdout":"{out}","stderr":"{err}",'
            f'"stdout_truncated":{_JSON_BOOL[cmd.out_total > len(cmd.out)]},'
            f'"stderr_truncated":{_JSON_BOOL[cmd.err_total > len(cmd.err)]},'
            f'"duration":{duration!r},"timed_out":{_JSON_BOOL[cmd.timed_out]},'
            f'"error":{"null" if error is None else _encode(error)}}}}}'
        ).encode()
        self.outbox.append(HEADER.pack(len(data)) + data)

    def reap(self) -> None:
        """Collect every exited child: commands, and orphans reparented to the worker."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            cmd = self.by_pid.get(pid)
            if cmd is not None and cmd.status is None:
                self.exited(cmd, status)
                if self.outbox:
                    self.flush()  # answer before looking further (usually: an ECHILD)

    def _on_sigchld(self, _signum: int, _frame: Any) -> None:
        self.child_exited = True

    # -- killing --------------------------------------------------------------------------

    def _scan(self) -> dict[int, tuple[int, int, int]]:
        """pid -> (ppid, pgid, sid) for every visible process except the worker."""
        table: dict[int, tuple[int, int, int]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == self.me:
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()
            table[int(name)] = (int(fields[1]), int(fields[2]), int(fields[3]))
        return table

    def _tagged(self, pid: int, tag: bytes) -> bool:
        """Whether the process's environment carries ``tag`` (exactly, or as a prefix if it
        ends with a dot)."""
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                entries = f.read().split(b"\0")
        except OSError:
            return False
        if tag.endswith(b"."):
            return any(e.startswith(tag) for e in entries)
        return tag in entries

    def _collect(self, roots: set[int], tag: bytes | None, descend_from_me: bool) -> set[int]:
        """Processes in the trees of ``roots`` (by parent, group, session or tag)."""
        table = self._scan()
        found: set[int] = set()
        for pid, (_ppid, pgid, sid) in table.items():
            hit = pid in roots or pgid in roots or sid in roots
            if not hit and tag is not None:
                hit = self._tagged(pid, tag)  # only read environ when needed
            if hit:
                found.add(pid)
        parents = set(found) | roots
        if descend_from_me:
            parents.add(self.me)
        changed = True
        while changed:
            changed = False
            for pid, (ppid, _pgid, _sid) in table.items():
                if pid not in found and ppid in parents:
                    found.add(pid)
                    parents.add(pid)
                    changed = True
        return found

    def _stop_then_kill(self, roots: set[int], tag: bytes | None, everything: bool) -> None:
        # Freeze first so nothing can fork while we look, rescan until no new process shows
        # up, then kill the frozen set at once.
        stopped: set[int] = set()
        for _ in range(64):
            new = self._collect(roots | stopped, tag, everything) - stopped
            if not new:
                break
            for pid in new:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
            stopped |= new
        for pid in stopped | roots:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill_tree(self, cmd: Command) -> None:
        """Kill a command, its descendants, its session/group and anything carrying its tag."""
        cmd.killed = True
        roots = {cmd.pid} if cmd.status is None else set()
        self._stop_then_kill(roots | {cmd.pid}, ("STRUCTENV_EXEC_TAG=" + cmd.tag).encode(), False)

    def kill_everything(self) -> None:
        if self.pid1:
            # PID 1 of a namespace: kill(-1) reaches every other process in it, including
            # setsid/double-forked ones; the kernel guarantees nothing escapes the namespace.
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            # Unsandboxed: the worker is a child subreaper, so every process ever started
            # here stays its descendant.
            self._stop_then_kill(set(), f"STRUCTENV_EXEC_TAG={self.tag}.".encode(), True)

    def end_all(self, error: str) -> dict[str, Any]:
        """Kill every other process, reap them, answer the running commands with ``error``;
        ``{"ok", "left"}``: the pids still there (as PID 1 only: else ``[]``, unverified).

        Runs in the worker, PID 1 of the slot: no process is spawned for it, so there is
        nothing a command could stop, ptrace or write into between its start and the kill.
        """
        self.kill_everything()
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            cmd = self.by_pid.get(pid)
            if cmd is not None and cmd.status is None:
                cmd.status = status
                cmd.exit_time = time.monotonic()
        for cmd in list(self.commands.values()):
            self.finish(cmd, error=error)
        left = sorted(self._scan()) if self.pid1 else []
        return {"ok": not left, "left": left}

    # -- loop -----------------------------------------------------------------------------

    def run(self) -> None:
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        # The handler only flags the exit; the loop reaps once per iteration. The wakeup fd
        # makes epoll return when the signal arrives while the loop sleeps.
        signal.signal(signal.SIGCHLD, self._on_sigchld)
        signal.signal(signal.SIGXCPU, lambda *_: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.set_wakeup_fd(wfd)
        self.sigdef = tuple(
            s for s in signal.valid_signals() if signal.getsignal(s) == signal.SIG_IGN
        )
        self.ep.register(rfd, select.EPOLLIN)
        self.ep.register(0, select.EPOLLIN)
        self.send({"hello": True, "pid": self.me})
        self.flush()
        poll, fds = self.ep.poll, self.fds
        while True:
            timeout = self._next_timeout()
            request = False
            for fd, _ in poll(timeout):
                if fd == 0:
                    request = True  # after the pipes: a new command may reuse a closed fd
                elif fd == rfd:
                    os.readv(rfd, [self.rbuf])  # once: level-triggered, more shows up again
                else:
                    entry = fds.get(fd)
                    if entry is not None:  # else closed earlier in this batch
                        cmd, kind = entry
                        if kind == _STDIN:
                            self.on_stdin(cmd, fd)
                        elif (
                            not self.read_output(cmd, fd, kind == _STDOUT)
                            and cmd.status is not None
                            and cmd.out_fd < 0
                            and cmd.err_fd < 0
                        ):
                            self.complete(cmd)
            if self.child_exited:
                self.child_exited = False
                self.reap()
            if self.commands and time.monotonic() >= self.due:
                self._tick()
            if request:
                if self.outbox:
                    self.flush()  # answers first: spawning takes a while
                self.on_input()
            if self.outbox:
                self.flush()
            if self.doomed:
                self._close_doomed()  # before the next poll, which would report them again

    def _next_timeout(self) -> float:
        """Seconds until the next deadline or drain end (-1: none); sets :attr:`due`."""
        if not self.commands:
            self.due = _INF
            return -1
        self.due = min(
            (c.exit_time + DRAIN_SECONDS) if c.status is not None else c.deadline
            for c in self.commands.values()
        )
        return max(0.0, self.due - time.monotonic())

    def _tick(self) -> None:
        now = time.monotonic()
        for cmd in list(self.commands.values()):
            if cmd.status is not None:
                if now >= cmd.exit_time + DRAIN_SECONDS:
                    self.complete(cmd)
            elif now >= cmd.deadline and not cmd.timed_out:
                cmd.timed_out = True
                self.kill_tree(cmd)
                cmd.deadline = now + 5.0  # re-kill if it somehow survives


HEADER_V3 = Struct("=II")


def _libc(name: str, *args: int | bytes) -> int:
    """Call the C library's ``int name(...)`` with int and buffer arguments.

    Through ``_ctypes`` itself, declaring the one return type needed: importing ``ctypes``
    costs a cold slot ~15 ms (it defines its whole type system). ``ctypes`` where
    ``_ctypes`` differs (another interpreter or version).
    """
    try:
        import _ctypes

        class CInt(_ctypes._SimpleCData):  # type: ignore[type-arg]  # ctypes.c_int
            _type_ = "i"

        class Function(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
            _restype_ = CInt

        class Library:  # what ctypes.CDLL(None) holds
            _handle = _ctypes.dlopen(None, _ctypes.RTLD_LOCAL)  # type: ignore[arg-type]

        function = Function((name, Library()))  # type: ignore[arg-type]
    except Exception:
        import ctypes

        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    result = function(*args)
    return result if type(result) is int else -1


def _become(uid: int) -> None:
    """Switch to the slot's unprivileged uid for good and shed every capability.

    Runs before the worker reads any input: nothing a command sends ever runs as host root.
    The switch from uid 0 clears the permitted, effective and ambient sets; ``capset``
    clears the inheritable one too.
    """
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    header = HEADER_V3.pack(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    if _libc("capset", header, bytes(24)) != 0:  # 2 x (effective, permitted, inheritable)
        sys.exit(3)


def _untouchable() -> None:
    """Make the worker immune to the commands it runs (they share its uid).

    Not dumpable: no ptrace, and ``/proc/<worker>/{mem,fd,environ,...}`` belong to root. Every
    catchable signal is ignored (SIGCHLD and SIGXCPU get no-op handlers in :meth:`Worker.run`);
    as PID 1 of its namespace it cannot receive SIGKILL or SIGSTOP from inside at all.
    """
    if _libc("prctl", 4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE, 0
        sys.exit(3)
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGXCPU):
            try:
                signal.signal(sig, signal.SIG_IGN)
            except (OSError, ValueError):
                pass


def main() -> None:
    """Entry point: ``python -I -S <this file> <config-json>``."""
    config = _decode(sys.argv[1])
    if config.get("uid") is not None:
        _become(int(config["uid"]))
    _untouchable()
    os.chdir(config["workspace"])
    if not config.get("pid1"):
        # PR_SET_CHILD_SUBREAPER: orphans of commands are reparented to the worker, so
        # "every descendant of the worker" is every process the slot ever started.
        _libc("prctl", 36, 1, 0, 0, 0)
    Worker(config).run()


if __name__ == "__main__":
    main()

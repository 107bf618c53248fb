"""The sandbox server: one process per sandbox host, managing N isolated slots.

Wire protocol (HTTP/1.1, JSON unless noted, ``Authorization: Bearer <token>`` on every request
when the server has a token; TCP servers must have one)::

    GET  /v1/health                               -> {name, pid, sandboxed,
                                                      slots: [{index, lease, state}]}
    POST /v1/exec        {slot, lease, request}   -> ExecResult wire dict
    POST /v1/exec_batch  {calls: [{slot, lease, request}]}
                                                  -> 200 NDJSON, one line per call as it
                                                     finishes: {index, result} |
                                                     {index, error: {status, kind, message}}
    POST /v1/reset       {slot, lease, hard, spec?} -> {lease, mode: "soft"|"hard"}
                         (spec: rebuild the slot from it; 422 bad_spec + lease if it fails)
                                                     (lease null + hard: control-plane
                                                     destroy of an unleased slot)
    POST /v1/end_processes {slot, lease}          -> {left: [pid, ...]} (sandboxed slots:
                                                     the worker kills every other process
                                                     of the slot; workspace and lease stay;
                                                     400 unsandboxed otherwise)
    POST /v1/files/read?slot&lease&path&max_bytes -> raw bytes
    POST /v1/files/write?slot&lease&path&mode     (raw body) -> {size}
    POST /v1/files/list  {slot, lease, path}      -> {entries: [{path, size, is_dir}]}
    POST /v1/archive?slot&lease                   -> application/x-tar
    POST /v1/terminal    {slot, lease, action, ...} -> {output, [exit_code, timed_out]}

Errors are ``{error: kind, message}`` with 400 bad_request/unsandboxed, 401 unauthorized, 403
permission_denied, 404 not_found/no_slot, 409 stale_lease, 413 too_large, 503 slot_broken.
A client that disconnects before an exec/batch/terminal answer cancels it: the command's whole
process tree is killed.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
from anyio.abc import TaskStatus

from .._exceptions import SandboxUnavailableError
from .._http import (
    _STREAM_ERRORS,
    ConnectionLimits,
    HTTPError,
    Listener,
    Request,
    Responder,
    open_listener,
)
from .._types import DEFAULT_MAX_OUTPUT
from . import _files
from ._bwrap import (
    CGROUP_V1,
    OPTIONAL_CONTROLLERS,
    UID_BLOCK,
    Isolation,
    SlotCgroup,
    default_uid_base,
    probe,
    remove_cgroup_tree,
    slot_uid,
    switch_uid,
    write_accounts,
)
from ._runtime import Limits, SlotBroken, SlotRuntime, SlotSpec
from ._terminal import terminal_action

__all__ = ["ServerConfig", "SandboxServer"]

logger = logging.getLogger("structenv.sandbox")


#: The HTTP layer's defaults: a head deadline, an idle timeout (``HostClient`` retires its
#: pooled connections well before it), caps on connections without the token.
_LIMITS = ConnectionLimits()


@dataclasses.dataclass(frozen=True, slots=True)
class ServerConfig:
    """Configuration of one sandbox server.

    Attributes:
        slots: Number of slots.
        workdir: Host directory holding the slots' workspaces (not visible to sandboxes).
        socket_path: Listen on this unix socket (mode 0600) ...
        host, port: ... or on TCP (``127.0.0.1`` by default; a token is then required).
        token: Bearer token every request must carry (``None``: no auth, unix socket only).
        isolation: How slots are isolated.
        limits: Per-command limits.
        cgroup: ``"auto"`` (use v1 pids/memory cgroups if present), ``"required"`` or ``"off"``.
        cgroup_root: Make the slots' cgroups in ``<cgroup_root>/<controller>/<name>/<i>`` (a
            subtree delegated to this server, e.g. bind-mounted into its container) instead
            of ``/sys/fs/cgroup/<controller>/structenv/<name>/<i>`` (a rebuild that
            overlaps the old sandbox's teardown moves slot ``i`` between ``<i>``, ``<i>-b``
            and ``<i>-c``).
        name: Host name used for cgroup names and exec tags.
        max_body: Largest accepted request body (bounds file writes).
        uid_base: First of the host uids the slots run as (slot ``i`` gets ``uid_base + i``;
            root only). Default: a block derived from ``name`` (see ``default_uid_base``).
    """

    slots: int = 4
    workdir: str = "/var/tmp/structenv-sandbox"
    socket_path: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None
    isolation: Isolation = dataclasses.field(default_factory=Isolation)
    limits: Limits = dataclasses.field(default_factory=Limits)
    cgroup: str = "auto"
    cgroup_root: str | None = None
    name: str = dataclasses.field(default_factory=lambda: f"h{os.getpid()}-{secrets.token_hex(3)}")
    max_body: int = 64 << 20
    uid_base: int | None = None


_FILE_ERRORS: list[tuple[type[BaseException], int, str]] = [
    (PermissionError, 403, "permission_denied"),
    (IsADirectoryError, 400, "is_a_directory"),
    (FileNotFoundError, 404, "not_found"),
    (NotADirectoryError, 404, "not_found"),
    (ValueError, 413, "too_large"),
    (OSError, 500, "os_error"),
]


class SandboxServer:
    """Serves the sandbox protocol for a set of slots (see the module docstring)."""

    def __init__(self, config: ServerConfig) -> None:
        if config.token is None and config.socket_path is None:
            raise ValueError("a TCP sandbox server requires a bearer token")
        self.config = config
        self.slots: list[SlotRuntime] = []
        self.port = config.port
        self._fs_limiter = anyio.CapacityLimiter(4)
        #: The slots' blocking lifecycle work (mounts, wipes, kills, cgroups), apart from
        #: the clients' file requests so a file-heavy client cannot hold up a reset.
        self._slot_limiter = anyio.CapacityLimiter(8)
        self._routes: dict[tuple[str, str], Callable[[Request, Responder], Awaitable[None]]] = {
            ("GET", "/v1/health"): self._health,
            ("POST", "/v1/exec"): self._exec,
            ("POST", "/v1/exec_batch"): self._exec_batch,
            ("POST", "/v1/reset"): self._reset,
            ("POST", "/v1/end_processes"): self._end_processes,
            ("POST", "/v1/files/read"): self._read,
            ("POST", "/v1/files/write"): self._write,
            ("POST", "/v1/files/list"): self._list,
            ("POST", "/v1/archive"): self._archive,
            ("POST", "/v1/terminal"): self._terminal,
        }

    async def serve(
        self, *, task_status: TaskStatus[dict[str, Any]] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Probe isolation, start every slot, then serve until cancelled.

        Raises:
            SandboxUnavailableError: The configured isolation does not work here.

        Cancellation: every slot's sandbox is killed, cgroups and the socket are removed
        (shielded, bounded) before the cancellation propagates.
        """
        cfg = self.config
        iso = cfg.isolation
        if not iso.sandboxed and not iso.allow_network:
            raise SandboxUnavailableError("allow_network=False needs network isolation (bwrap)")
        os.makedirs(cfg.workdir, mode=0o700, exist_ok=True)
        uid_base = cfg.uid_base if cfg.uid_base is not None else default_uid_base(cfg.name)
        if cfg.slots >= UID_BLOCK:
            raise ValueError(f"at most {UID_BLOCK - 1} slots per sandbox server")

        def uid_of(index: int) -> int | None:
            return slot_uid(uid_base, index) if iso.sandboxed else None

        if uid_of(0) is not None:
            # Traversable (not listable) for the slot uids: under setpriv, bwrap runs as
            # the slot's uid and must reach its workspace. Each workspace is 0700 and owned
            # by its own slot's uid; sandboxes never see host paths once they run.
            os.chmod(cfg.workdir, 0o711)
        seccomp_path = os.path.join(cfg.workdir, ".seccomp.bpf")
        accounts = None
        if uid_of(0) is not None and switch_uid(uid_of(0)) is not None:
            uids = [u for u in map(uid_of, range(cfg.slots)) if u is not None]
            accounts = await anyio.to_thread.run_sync(
                write_accounts,
                os.path.join(cfg.workdir, ".accounts"),
                uids,
                limiter=self._slot_limiter,
            )
        features = await probe(
            iso,
            os.path.join(cfg.workdir, ".probe"),
            uid=uid_of(UID_BLOCK - 1),
            seccomp_path=seccomp_path,
        )
        use_cgroup = cfg.cgroup != "off" and SlotCgroup.available(cfg.cgroup_root)
        controllers = SlotCgroup.controllers(cfg.cgroup_root) if use_cgroup else ()
        where = cfg.cgroup_root or CGROUP_V1
        if cfg.cgroup == "required" and not use_cgroup:
            raise SandboxUnavailableError(
                f"a v1 pids cgroup is required but not available ({where})"
            )
        missing = [c for c in OPTIONAL_CONTROLLERS if c not in controllers]
        if cfg.cgroup == "required" and missing:
            raise SandboxUnavailableError(
                f"per-slot cgroups are required but the v1 {' and '.join(missing)} hierarchy"
                f" is not mounted ({where}); cgroup='auto' runs slots without those limits"
            )
        if use_cgroup and missing:
            logger.warning(
                "no v1 %s hierarchy at %s: slots run without those limits",
                " and ".join(missing),
                where,
            )
        features["cgroup"] = use_cgroup
        features["cgroup_controllers"] = ["pids", *controllers] if use_cgroup else []
        listener = await self._listen()
        try:
            async with anyio.create_task_group() as tg:
                for i in range(cfg.slots):
                    self.slots.append(
                        SlotRuntime(
                            index=i,
                            name=f"{cfg.name}-{i}",
                            workspace=os.path.join(cfg.workdir, f"slot-{i}"),
                            isolation=iso,
                            limits=cfg.limits,
                            use_cgroup=use_cgroup,
                            task_group=tg,
                            lease=secrets.randbelow(1 << 30) + 1,
                            cgroup_name=f"{cfg.name}/{i}",
                            cgroup_root=cfg.cgroup_root,
                            cgroup_controllers=controllers,
                            uid=uid_of(i),
                            seccomp_path=seccomp_path,
                            accounts=accounts,
                            limiter=self._slot_limiter,
                        )
                    )
                async with anyio.create_task_group() as starters:
                    for rt in self.slots:
                        starters.start_soon(rt.start)
                tg.start_soon(
                    functools.partial(
                        listener.serve,
                        self._handle,
                        max_body=cfg.max_body,
                        token=cfg.token,
                        limits=_LIMITS,
                    )
                )
                task_status.started(
                    {"name": cfg.name, "port": self.port, "pid": os.getpid(), **features}
                )
        finally:
            with anyio.move_on_after(10, shield=True):
                await listener.aclose()
                async with anyio.create_task_group() as stoppers:
                    for rt in self.slots:
                        stoppers.start_soon(rt.stop)
            with anyio.move_on_after(5, shield=True):
                await anyio.to_thread.run_sync(
                    functools.partial(
                        remove_cgroup_tree, cfg.name, patience=4, root=cfg.cgroup_root
                    ),
                    limiter=self._slot_limiter,
                )
            if cfg.socket_path:
                try:
                    os.unlink(cfg.socket_path)
                except OSError:
                    pass

    async def _listen(self) -> Listener:
        cfg = self.config
        listener = open_listener(path=cfg.socket_path, host=cfg.host, port=cfg.port)
        self.port = listener.port
        return listener

    # -- dispatch -------------------------------------------------------------------------

    async def _handle(self, request: Request, respond: Responder) -> None:
        route = self._routes.get((request.method, request.path))
        if route is None:
            raise HTTPError(404, "not_found", f"no route {request.method} {request.path}")
        try:
            await route(request, respond)
        except SlotBroken as exc:
            raise HTTPError(503, "slot_broken", str(exc)) from exc
        except (HTTPError, *_STREAM_ERRORS):
            raise
        except Exception as exc:
            # A bug in one request must not take down every slot of the host.
            logger.exception("internal error serving %s", request.path)
            raise HTTPError(500, "internal", repr(exc)) from exc

    def _slot(self, slot: Any, lease: Any) -> SlotRuntime:
        try:
            rt = self.slots[int(slot)]
        except (TypeError, ValueError, IndexError) as exc:
            raise HTTPError(404, "no_slot", f"no slot {slot!r}") from exc
        if lease is None or str(lease) != str(rt.lease):
            raise HTTPError(409, "stale_lease", f"lease {lease} is not current for slot {slot}")
        return rt

    def _ready(self, rt: SlotRuntime) -> SlotRuntime:
        if rt.state != "ready":
            raise HTTPError(503, "slot_broken", f"slot {rt.index} is {rt.state}")
        return rt

    # -- routes ---------------------------------------------------------------------------

    async def _health(self, request: Request, respond: Responder) -> None:
        slots = [
            {"index": rt.index, "lease": rt.lease, "state": rt.state, "spec": rt.spec.key}
            for rt in self.slots
        ]
        await respond.send_json(
            200,
            {
                "name": self.config.name,
                "pid": os.getpid(),
                "sandboxed": self.config.isolation.sandboxed,
                "slots": slots,
            },
        )

    async def _exec(self, request: Request, respond: Responder) -> None:
        body = request.json()
        rt = self._ready(self._slot(body.get("slot"), body.get("lease")))
        req = _parse_exec(body.get("request"))
        result: list[dict[str, Any]] = []

        async def work() -> None:
            result.append(await rt.exec_wire(req))

        await respond.run_watched(work)
        if result:
            await respond.send_json(200, result[0])

    async def _exec_batch(self, request: Request, respond: Responder) -> None:
        calls = request.json().get("calls")
        if not isinstance(calls, list) or len(calls) > 4096:
            raise HTTPError(400, "bad_request", "calls must be a list of at most 4096 calls")
        await respond.start_stream()
        # Finished lines are queued and written by one flusher: a line goes out as soon as
        # the flusher gets to it, and lines that finish together share one write (and one
        # wake-up of the client) instead of queueing behind a lock one by one.
        pending: list[bytes] = []
        ready = anyio.Event()
        remaining = len(calls)

        async def one(i: int, call: Any) -> None:
            nonlocal remaining
            line: dict[str, Any]
            try:
                if not isinstance(call, dict):
                    raise HTTPError(400, "bad_request", "call must be an object")
                rt = self._ready(self._slot(call.get("slot"), call.get("lease")))
                result = await rt.exec_wire(_parse_exec(call.get("request")))
                line = {"index": i, "result": result}
            except HTTPError as exc:
                line = {"index": i, "error": _err(exc.status, exc.kind, exc.message)}
            except SlotBroken as exc:
                line = {"index": i, "error": _err(503, "slot_broken", str(exc))}
            pending.append(json.dumps(line, separators=(",", ":")).encode() + b"\n")
            remaining -= 1
            ready.set()

        async def flush(scope: anyio.CancelScope) -> None:
            nonlocal ready
            while remaining or pending:
                await ready.wait()
                ready = anyio.Event()
                data = b"".join(pending)
                pending.clear()
                try:
                    await respond.send_chunk(data)
                except _STREAM_ERRORS:
                    respond.disconnected = True
                    scope.cancel()
                    return

        async def work() -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(flush, tg.cancel_scope)
                for i, call in enumerate(calls):
                    tg.start_soon(one, i, call)

        await respond.run_watched(work)
        if not respond.disconnected:
            await respond.end_stream()

    async def _reset(self, request: Request, respond: Responder) -> None:
        body = request.json()
        hard = bool(body.get("hard"))
        lease = body.get("lease")
        if lease is None and hard:
            try:
                rt = self.slots[int(body.get("slot"))]  # type: ignore[arg-type]
            except (TypeError, ValueError, IndexError) as exc:
                raise HTTPError(404, "no_slot", "no such slot") from exc
        else:
            rt = self._slot(body.get("slot"), lease)
        spec = None
        if body.get("spec") is not None:
            try:
                spec = SlotSpec.from_wire(body["spec"])
            except (TypeError, ValueError) as exc:
                raise HTTPError(400, "bad_request", f"bad spec: {exc}") from exc
            if spec.rootfs is not None and not self.config.isolation.sandboxed:
                raise HTTPError(400, "bad_request", "a rootfs spec needs isolation (bwrap)")
            if spec != rt.spec:
                hard = True
        async with rt.reset_lock:
            if lease is not None:
                self._slot(rt.index, lease)  # re-check: a concurrent reset may have won
            # Bump first: from here on, requests carrying the old lease are refused.
            rt.lease += 1
            mode = "soft"
            ok = False
            if not hard:
                with anyio.move_on_after(15):
                    ok = await rt.soft_reset()
            if not ok:
                mode = "hard"
                previous = rt.spec
                try:
                    with anyio.fail_after(60):
                        await rt.hard_reset(spec)
                except (TimeoutError, OSError, SlotBroken) as exc:
                    if spec is None or spec == previous:
                        rt.state = "broken"
                        raise HTTPError(503, "slot_broken", f"cannot rebuild slot: {exc}") from exc
                    # The new spec cannot run here: give the slot its old one back, so a
                    # bad spec costs its caller an error and the slot nothing.
                    try:
                        with anyio.fail_after(60):
                            await rt.hard_reset(previous)
                    except (TimeoutError, OSError, SlotBroken) as again:
                        rt.state = "broken"
                        raise HTTPError(
                            503, "slot_broken", f"cannot rebuild slot: {again}"
                        ) from again
                    await respond.send_json(
                        422,
                        {
                            "error": "bad_spec",
                            "message": f"cannot start a slot of this spec: {exc}",
                            "lease": rt.lease,
                        },
                    )
                    return
        await respond.send_json(200, {"lease": rt.lease, "mode": mode, "spec": rt.spec.key})

    async def _end_processes(self, request: Request, respond: Responder) -> None:
        body = request.json()
        lease = body.get("lease")
        rt = self._slot(body.get("slot"), lease)
        # Under the reset lock, the lease checked again inside: a stale handle's request
        # that waited for a reset must not reach the next owner's processes.
        async with rt.reset_lock:
            self._ready(self._slot(rt.index, lease))
            try:
                left = await rt.end_processes()
            except SandboxUnavailableError as exc:
                raise HTTPError(400, "unsandboxed", str(exc)) from exc
        await respond.send_json(200, {"left": left})

    async def _fs(self, func: Callable[..., Any], *args: Any) -> Any:
        try:
            return await anyio.to_thread.run_sync(
                functools.partial(func, *args), limiter=self._fs_limiter
            )
        except OSError as exc:
            for kind, status, name in _FILE_ERRORS:
                if isinstance(exc, kind):
                    raise HTTPError(status, name, str(exc)) from exc
            raise
        except ValueError as exc:
            raise HTTPError(413, "too_large", str(exc)) from exc

    async def _read(self, request: Request, respond: Responder) -> None:
        q = request.query
        rt = self._slot(q.get("slot"), q.get("lease"))
        max_bytes = min(int(q.get("max_bytes", 1 << 20)), self.config.max_body)
        data = await self._fs(_files.read_file, rt.workspace, q.get("path", ""), max_bytes)
        await respond.send(200, data, "application/octet-stream")

    async def _write(self, request: Request, respond: Responder) -> None:
        q = request.query
        rt = self._slot(q.get("slot"), q.get("lease"))
        mode = int(q.get("mode", "420"))
        await self._fs(_files.write_file, rt.workspace, q.get("path", ""), request.body, mode)
        await respond.send_json(200, {"size": len(request.body)})

    async def _list(self, request: Request, respond: Responder) -> None:
        body = request.json()
        rt = self._slot(body.get("slot"), body.get("lease"))
        path = str(body.get("path") or ".")
        entries = await self._fs(_files.list_files, rt.workspace, path, 100_000)
        await respond.send_json(200, {"entries": entries})

    async def _archive(self, request: Request, respond: Responder) -> None:
        q = request.query
        rt = self._slot(q.get("slot"), q.get("lease"))
        data = await self._fs(_files.archive, rt.workspace, self.config.max_body)
        await respond.send(200, data, "application/x-tar")

    async def _terminal(self, request: Request, respond: Responder) -> None:
        body = request.json()
        rt = self._ready(self._slot(body.get("slot"), body.get("lease")))
        answer: list[dict[str, Any]] = []

        async def work() -> None:
            answer.append(await terminal_action(rt, body))

        await respond.run_watched(work)
        if answer:
            await respond.send_json(200, answer[0])


def _err(status: int, kind: str, message: str) -> dict[str, Any]:
    return {"status": status, "kind": kind, "message": message}


def _env_entry(name: Any, value: Any) -> bool:
    """Whether ``name=value`` can be an environment entry (no NUL anywhere, no ``=`` in the
    name): the kernel's format, which posix_spawn enforces by refusing the whole command."""
    return (
        isinstance(name, str)
        and isinstance(value, str)
        and bool(name)
        and "=" not in name
        and "\0" not in name
        and "\0" not in value
    )


def _parse_exec(data: Any) -> dict[str, Any]:
    """Validate an exec request's wire dict (cheaply: it is on every call's path)."""
    if not isinstance(data, dict):
        raise HTTPError(400, "bad_request", "request must be an object")
    command, cwd, env, stdin = (
        data.get("command"),
        data.get("cwd"),
        data.get("env"),
        data.get("stdin"),
    )
    try:
        timeout = float(data.get("timeout", 60.0))
        max_output = int(data.get("max_output", DEFAULT_MAX_OUTPUT))
        if stdin is not None:
            base64.b64decode(stdin, validate=True)
    except (TypeError, ValueError) as exc:
        raise HTTPError(400, "bad_request", f"invalid exec request: {exc}") from exc
    if (
        not isinstance(command, str)
        or not (cwd is None or isinstance(cwd, str))
        or not (env is None or isinstance(env, dict))
        or not all(_env_entry(k, v) for k, v in (env or {}).items())
        or not timeout > 0
        or max_output < 0
        or "\0" in command
        or (cwd is not None and "\0" in cwd)
    ):
        raise HTTPError(400, "bad_request", "invalid exec request")
    return {
        "command": command,
        "cwd": cwd,
        "env": env or {},
        "stdin": stdin,
        "timeout": timeout,
        "max_output": max_output,
    }

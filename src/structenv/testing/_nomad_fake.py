"""A FAKE Nomad agent: the subset of Nomad's HTTP API that NomadBackend uses, for tests only.

No Nomad binary can be installed on the machines structenv is developed on, so the Nomad
backend is tested against this fake. It is a real HTTP server on 127.0.0.1 (h11, anyio) and its
allocations are real processes: each one runs ``python -m structenv.sandbox`` on this machine
with the task's arguments (``${NOMAD_PORT_<label>}`` and friends interpolated), so the data plane
under test is the real one. What is faked is Nomad's scheduling, not the sandbox.

Endpoints (JSON shapes follow Nomad's API documentation; only the fields used are filled):

* ``PUT|POST /v1/jobs`` (``{"Job": {...}}``) register or update; ``GET /v1/jobs?prefix=``.
* ``GET /v1/job/:id`` (404 ``job not found``), ``DELETE /v1/job/:id[?purge=true]``.
* ``GET /v1/job/:id/allocations``: ``AllocationListStub`` s (``ID``, ``Name`` =
  ``job.group[i]``, ``DesiredStatus``, ``ClientStatus``, ``TaskStates``, ...).
* ``POST /v1/job/:id/scale`` (``{"Count": n, "Target": {"Group": g}}``).
* ``GET /v1/allocation/:id``: adds ``AllocatedResources.Shared.Ports``/``Networks`` and
  ``Resources.Networks`` (``IP``, ``DynamicPorts``); ``POST /v1/allocation/:id/stop``.
* ACL: with a ``token``, requests without ``X-Nomad-Token`` equal to it get 403.

Scheduling, simplified and synchronous where Nomad is eventually consistent: registering or
scaling places ``Count`` allocations (name indices ``0..Count-1``) and stops those at higher
indices, as Nomad does; an allocation whose process exits while it should run becomes
``failed`` and is rescheduled at once as a new allocation with the same name index (Nomad
waits a reschedule delay); ``DELETE`` stops every allocation and waits for its process to exit
before answering. Tasks: the ``docker`` driver's ``config.args`` (the image's entrypoint is the
sandbox server) or, for ``raw_exec``, the arguments after ``structenv.sandbox`` in
``config.command`` + ``config.args`` (e.g. an ``apptainer exec`` line). The image, resources
and security options are recorded, not enforced. The fake adds ``--watch-stdin`` so its
processes die with the test process.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from .._http import HTTPError, Request, Responder, open_listener
from .._process import kill_child

__all__ = ["FakeAllocation", "NomadFake", "open_nomad_fake"]

_ALLOC = re.compile(r"^/v1/allocation/([0-9a-f-]+)(/stop)?$")
_JOB = re.compile(r"^/v1/job/([^/]+)(/allocations|/scale)?$")


@dataclasses.dataclass(eq=False)
class FakeAllocation:
    """One allocation and the process running its task."""

    id: str
    job_id: str
    group: str
    task: str
    index: int
    port: int
    create_index: int
    desired: str = "run"  # run | stop
    client: str = "pending"  # pending | running | complete | failed | lost
    pid: int | None = None
    exit_code: int | None = None
    previous: str | None = None
    stopping: bool = False  # the scheduler killed it (vs. the task dying on its own)
    crashed: bool = False  # killed from outside (kill_allocation): failed, whatever follows
    stopped: anyio.Event = dataclasses.field(default_factory=anyio.Event)
    kill: anyio.Event = dataclasses.field(default_factory=anyio.Event)

    def stub(self) -> dict[str, Any]:
        dead = self.client in ("complete", "failed", "lost")
        state = "dead" if dead else ("running" if self.client == "running" else "pending")
        return {
            "ID": self.id,
            "EvalID": str(uuid.uuid4()),
            "Name": f"{self.job_id}.{self.group}[{self.index}]",
            "Namespace": "default",
            "NodeID": "fake-node",
            "NodeName": "fake-node",
            "JobID": self.job_id,
            "JobType": "service",
            "TaskGroup": self.group,
            "DesiredStatus": self.desired,
            "DesiredDescription": "",
            "ClientStatus": self.client,
            "ClientDescription": "",
            "PreviousAllocation": self.previous or "",
            "TaskStates": {
                self.task: {
                    "State": state,
                    "Failed": self.client == "failed",
                    "Restarts": 0,
                    "Events": [],
                }
            },
            "CreateIndex": self.create_index,
            "ModifyIndex": self.create_index,
        }

    def full(self) -> dict[str, Any]:
        ports = [{"Label": "http", "Value": self.port, "To": 0, "HostIP": "127.0.0.1"}]
        network = {
            "Mode": "host",
            "IP": "127.0.0.1",
            "DynamicPorts": [{"Label": "http", "Value": self.port, "To": 0}],
        }
        return {
            **self.stub(),
            "AllocatedResources": {"Shared": {"Ports": ports, "Networks": [network]}},
            "Resources": {"Networks": [network]},
        }


@dataclasses.dataclass(eq=False)
class _Job:
    spec: dict[str, Any]
    stopped: bool = False
    version: int = 0

    @property
    def id(self) -> str:
        return str(self.spec["ID"])

    @property
    def group(self) -> dict[str, Any]:
        return dict(self.spec["TaskGroups"][0])


class NomadFake:
    """State of the fake agent (see the module docstring); build it with
    :func:`open_nomad_fake`.

    Attributes:
        address: ``http://127.0.0.1:<port>``, what ``NOMAD_ADDR`` would be.
        token: The ACL token requests must carry, or ``None``.
        requests: ``(method, path)`` of every request, in order.
        scale_requests: Every ``Count`` asked through the scale endpoint.
        purged: Job ids purged.
    """

    def __init__(self, tg: anyio.abc.TaskGroup, *, token: str | None) -> None:
        self._tg = tg
        self._limiter = anyio.CapacityLimiter(4)  # allocations' work dirs
        self.address = ""
        self.token = token
        self.jobs: dict[str, _Job] = {}
        self.allocs: dict[str, FakeAllocation] = {}
        self.requests: list[tuple[str, str]] = []
        self.scale_requests: list[int] = []
        self.purged: list[str] = []
        self._index = 1000
        self._errors: list[int] = []
        self._ports: set[int] = set()

    # -- test controls --------------------------------------------------------------------

    def fail_next(self, *statuses: int) -> None:
        """Answer the next requests with these HTTP statuses (e.g. 503, 429) instead."""
        self._errors.extend(statuses)

    def running(self, job_id: str) -> list[FakeAllocation]:
        """Allocations of ``job_id`` whose process is running."""
        return [a for a in self.allocs.values() if a.job_id == job_id and a.client == "running"]

    def live_processes(self) -> list[int]:
        """Pids of every allocation process still alive."""
        return [a.pid for a in self.allocs.values() if a.pid is not None and a.exit_code is None]

    def kill_allocation(self, alloc_id: str) -> None:
        """SIGKILL an allocation's process (a crashed task): it becomes ``failed`` and is
        rescheduled."""
        alloc = self.allocs[alloc_id]
        if alloc.pid is not None and alloc.exit_code is None:
            # Marked first: a stop request that reaches the fake before it has reaped the
            # process must not turn a crash into a clean "complete".
            alloc.crashed = True
            os.kill(alloc.pid, 9)

    # -- scheduling -----------------------------------------------------------------------

    def _next_index(self) -> int:
        self._index += 1
        return self._index

    def _free_port(self) -> int:
        import socket

        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in self._ports:
                self._ports.add(port)
                return port

    def _reconcile(self, job: _Job) -> None:
        count = 0 if job.stopped else int(job.group.get("Count", 1))
        live = [a for a in self.allocs.values() if a.job_id == job.id and a.desired == "run"]
        taken = {a.index for a in live}
        for alloc in live:
            if alloc.index >= count:
                self._stop(alloc)
        for index in range(count):
            if index not in taken:
                self._place(job, index)

    def _place(self, job: _Job, index: int, previous: str | None = None) -> None:
        group = job.group
        task = group["Tasks"][0]
        alloc = FakeAllocation(
            id=str(uuid.uuid4()),
            job_id=job.id,
            group=str(group["Name"]),
            task=str(task["Name"]),
            index=index,
            port=self._free_port(),
            create_index=self._next_index(),
            previous=previous,
        )
        self.allocs[alloc.id] = alloc
        self._tg.start_soon(self._run, job, alloc, task)

    def _stop(self, alloc: FakeAllocation) -> None:
        alloc.desired = "stop"
        alloc.kill.set()

    def _argv(self, alloc: FakeAllocation, task: dict[str, Any]) -> list[str]:
        config = task.get("Config") or {}
        args = [str(a) for a in config.get("args") or []]
        if task.get("Driver") == "raw_exec":
            line = [str(config.get("command", "")), *args]
            marker = [i for i, a in enumerate(line) if a == "structenv.sandbox"]
            if not marker:
                raise HTTPError(400, "bad_request", "raw_exec task must run structenv.sandbox")
            args = line[marker[0] + 1 :]
        elif task.get("Driver") != "docker":
            raise HTTPError(400, "bad_request", f"driver {task.get('Driver')!r} not faked")
        values = {
            "NOMAD_PORT_http": str(alloc.port),
            "NOMAD_HOST_PORT_http": str(alloc.port),
            "NOMAD_IP_http": "127.0.0.1",
            "NOMAD_ALLOC_ID": alloc.id,
            "NOMAD_ALLOC_INDEX": str(alloc.index),
            "NOMAD_ALLOC_DIR": f"/var/tmp/nomad-fake/{alloc.id}/alloc",
            "NOMAD_TASK_DIR": f"/var/tmp/nomad-fake/{alloc.id}/local",
        }
        out = [re.sub(r"\$\{(\w+)\}", lambda m: values.get(m[1], m[0]), a) for a in args]
        return [sys.executable, "-m", "structenv.sandbox", *out, "--watch-stdin"]

    async def _run(self, job: _Job, alloc: FakeAllocation, task: dict[str, Any]) -> None:
        env = dict(os.environ)
        env.update({str(k): str(v) for k, v in (task.get("Env") or {}).items()})
        workdir = f"/var/tmp/nomad-fake/{alloc.id}"
        try:
            argv = self._argv(alloc, task)
            await anyio.to_thread.run_sync(os.makedirs, workdir, 0o700, True, limiter=self._limiter)
            if alloc.desired == "stop":
                return
            async with await anyio.open_process(argv, env=env, stderr=None) as proc:
                alloc.pid = proc.pid
                try:
                    assert proc.stdout is not None
                    stdout = BufferedByteReceiveStream(proc.stdout)
                    async with anyio.create_task_group() as tg:

                        async def watch_ready() -> None:
                            with anyio.move_on_after(60):
                                try:
                                    line = await stdout.receive_until(b"\n", 1 << 16)
                                    info = json.loads(line)
                                except (anyio.EndOfStream, anyio.IncompleteRead, ValueError):
                                    return  # it died starting: the exit is what counts
                                if info.get("ready") and alloc.desired == "run":
                                    alloc.client = "running"

                        async def killer() -> None:
                            await alloc.kill.wait()
                            if proc.returncode is None:
                                alloc.stopping = True
                                kill_child(proc)

                        tg.start_soon(watch_ready)
                        tg.start_soon(killer)
                        alloc.exit_code = await proc.wait()
                        tg.cancel_scope.cancel()
                except BaseException:
                    with anyio.move_on_after(5, shield=True):
                        kill_child(proc)
                        await proc.wait()
                    raise
        except (OSError, ValueError, anyio.EndOfStream, anyio.IncompleteRead, HTTPError):
            alloc.exit_code = alloc.exit_code if alloc.exit_code is not None else -1
        finally:
            with anyio.move_on_after(5, shield=True):
                await anyio.to_thread.run_sync(_rmtree, workdir, limiter=self._limiter)
            self._ports.discard(alloc.port)
            if not alloc.crashed and (
                alloc.stopping or (alloc.pid is None and alloc.desired == "stop")
            ):
                alloc.client = "complete"
            elif alloc.desired == "stop":
                alloc.client = "failed"  # died on its own; already replaced (stop endpoint)
            else:
                alloc.client = "failed"
                alloc.desired = "stop"
                current = self.jobs.get(job.id)
                count = int(current.group.get("Count", 1)) if current else 0
                if current is job and not job.stopped and alloc.index < count:
                    self._place(job, alloc.index, previous=alloc.id)  # reschedule
            alloc.stopped.set()

    # -- HTTP -----------------------------------------------------------------------------

    async def handle(self, request: Request, respond: Responder) -> None:
        self.requests.append((request.method, request.path))
        if self.token is not None and request.headers.get("x-nomad-token") != self.token:
            await respond.send(403, b"Permission denied", "text/plain")
            return
        if self._errors:
            status = self._errors.pop(0)
            await respond.send(status, b"fake transient error", "text/plain")
            return
        try:
            value = await self._route(request)
        except KeyError as exc:
            await respond.send(404, f"{exc.args[0]} not found".encode(), "text/plain")
            return
        except HTTPError as exc:
            await respond.send(exc.status, exc.message.encode(), "text/plain")
            return
        await respond.send_json(200, value)

    async def _route(self, request: Request) -> Any:
        method, path = request.method, request.path
        if path == "/v1/jobs":
            if method in ("PUT", "POST"):
                return self._register(request.json())
            prefix = request.query.get("prefix", "")
            return [self._job_stub(j) for j in self.jobs.values() if j.id.startswith(prefix)]
        if m := _ALLOC.match(path):
            alloc = self.allocs.get(m[1])
            if alloc is None:
                raise KeyError("alloc")
            if m[2] and method in ("POST", "PUT"):
                if alloc.desired == "run":
                    self._stop(alloc)
                    job = self.jobs.get(alloc.job_id)
                    if job is not None and not job.stopped:
                        self._place(job, alloc.index, previous=alloc.id)
                return {"EvalID": str(uuid.uuid4()), "Index": self._next_index()}
            return alloc.full()
        if m := _JOB.match(path):
            job = self.jobs.get(m[1])
            if job is None:
                raise KeyError("job")
            if m[2] == "/allocations":
                return [a.stub() for a in self.allocs.values() if a.job_id == job.id]
            if m[2] == "/scale" and method in ("POST", "PUT"):
                return self._scale(job, request.json())
            if method == "DELETE":
                return await self._deregister(job, purge=request.query.get("purge") == "true")
            return self._job_view(job)
        raise HTTPError(404, "not_found", f"no route {method} {path}")

    def _register(self, body: dict[str, Any]) -> dict[str, Any]:
        spec = body.get("Job")
        if not isinstance(spec, dict) or not spec.get("ID") or not spec.get("TaskGroups"):
            raise HTTPError(400, "bad_request", "Job with ID and TaskGroups required")
        groups = spec["TaskGroups"]
        if len(groups) != 1 or len(groups[0].get("Tasks") or []) != 1:
            raise HTTPError(400, "bad_request", "the fake runs one group with one task")
        old = self.jobs.get(spec["ID"])
        job = _Job(dict(spec), version=old.version + 1 if old else 0)
        self.jobs[job.id] = job
        self._reconcile(job)
        return self._eval()

    def _scale(self, job: _Job, body: dict[str, Any]) -> dict[str, Any]:
        count = body.get("Count")
        target = body.get("Target") or {}
        if not isinstance(count, int) or count < 0:
            raise HTTPError(400, "bad_request", "Count must be a non-negative integer")
        if target.get("Group") != job.group["Name"]:
            raise HTTPError(400, "bad_request", f"unknown group {target.get('Group')!r}")
        self.scale_requests.append(count)
        job.spec["TaskGroups"][0]["Count"] = count
        job.version += 1
        self._reconcile(job)
        return self._eval()

    async def _deregister(self, job: _Job, *, purge: bool) -> dict[str, Any]:
        job.stopped = True
        allocs = [a for a in self.allocs.values() if a.job_id == job.id]
        for alloc in allocs:
            if alloc.desired == "run":
                self._stop(alloc)
        for alloc in allocs:
            await alloc.stopped.wait()
        if purge:
            self.purged.append(job.id)
            del self.jobs[job.id]
            for alloc in allocs:
                self.allocs.pop(alloc.id, None)
        return self._eval()

    def _eval(self) -> dict[str, Any]:
        index = self._next_index()
        return {
            "EvalID": str(uuid.uuid4()),
            "EvalCreateIndex": index,
            "JobModifyIndex": index,
            "Warnings": "",
            "Index": index,
        }

    def _status(self, job: _Job) -> str:
        if job.stopped:
            return "dead"
        return "running" if self.running(job.id) else "pending"

    def _job_stub(self, job: _Job) -> dict[str, Any]:
        return {
            "ID": job.id,
            "Name": job.spec.get("Name", job.id),
            "Type": "service",
            "Status": self._status(job),
            "Stop": job.stopped,
            "Meta": job.spec.get("Meta") or {},
            "JobModifyIndex": job.version,
        }

    def _job_view(self, job: _Job) -> dict[str, Any]:
        return {
            **job.spec,
            "Status": self._status(job),
            "Stop": job.stopped,
            "Version": job.version,
        }


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def open_nomad_fake(*, token: str | None = None) -> AsyncIterator[NomadFake]:
    """Run a fake Nomad agent on 127.0.0.1 for the duration of the block.

    On exit every allocation process is killed and waited for.

    Cancellation: as on exit; nothing outlives the block.
    """
    listener = open_listener(host="127.0.0.1", port=0)
    async with listener, anyio.create_task_group() as tg:
        fake = NomadFake(tg, token=token)
        fake.address = f"http://127.0.0.1:{listener.port}"
        tg.start_soon(functools.partial(listener.serve, fake.handle, max_body=1 << 20, token=None))
        try:
            yield fake
        finally:
            for alloc in fake.allocs.values():
                alloc.desired = "stop"
                alloc.kill.set()
            with anyio.move_on_after(10, shield=True):
                for alloc in list(fake.allocs.values()):
                    if alloc.pid is not None and not alloc.stopped.is_set():
                        await alloc.stopped.wait()
            tg.cancel_scope.cancel()

"""A FAKE of the small part of the ``modal`` client that ModalBackend uses — for tests only.

It is not Modal and proves nothing about Modal's service; it proves that ModalBackend drives
that API surface correctly. Its sandboxes are real: each runs this machine's
``python -m structenv.sandbox`` with the arguments that followed ``structenv.sandbox`` in the
sandbox command (``--host``/``--port`` rewritten to 127.0.0.1 and a free port, which its
"tunnel" reports, in plain TCP: use ``tunnel_tls=False``). The secret's values become the
process environment; ``timeout`` kills the process when it expires, as Modal does.

Surface: ``App.lookup.aio(name, create_if_missing=)``, ``Image.from_registry``,
``Secret.from_dict``, ``Sandbox.create.aio(*cmd, app=, image=, secrets=, timeout=,
block_network=, encrypted_ports=, cpu=, memory=)``, ``Sandbox.list.aio(app_id=, tags=)``, and
on a sandbox ``object_id``, ``set_tags.aio``, ``get_tags.aio``, ``tunnels.aio``, ``poll.aio``,
``terminate.aio``. Use :func:`open_modal_fake` and pass the result as ``modal_module``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc

from .._process import kill_child

__all__ = ["FakeModal", "FakeSandbox", "open_modal_fake"]


class _Aio:
    """``method.aio(...)``: Modal's spelling of the async variant."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.aio = fn


@dataclasses.dataclass
class _App:
    name: str
    app_id: str


@dataclasses.dataclass
class _Tunnel:
    host: str
    port: int


class FakeSandbox:
    """One fake Modal sandbox: a real local sandbox-server process."""

    def __init__(self, fake: FakeModal, app: _App, kwargs: dict[str, Any], port: int) -> None:
        self.object_id = f"sb-{uuid.uuid4().hex[:12]}"
        self._limiter = fake.limiter
        self.app = app
        self.options = kwargs
        self.port = port
        self.tags: dict[str, str] = {}
        self.created_at = anyio.current_time()
        self.returncode: int | None = None
        self.pid: int | None = None
        self.done = anyio.Event()
        self._stop = anyio.Event()
        self.set_tags = _Aio(self._set_tags)
        self.get_tags = _Aio(self._get_tags)
        self.tunnels = _Aio(self._tunnels)
        self.poll = _Aio(self._poll)
        self.terminate = _Aio(self._terminate)

    async def _set_tags(self, tags: dict[str, str]) -> None:
        self.tags = dict(tags)

    async def _get_tags(self) -> dict[str, str]:
        return dict(self.tags)

    async def _tunnels(self) -> dict[int, _Tunnel]:
        return {int(p): _Tunnel("127.0.0.1", self.port) for p in self.options["encrypted_ports"]}

    async def _poll(self) -> int | None:
        return self.returncode

    async def _terminate(self) -> None:
        self._stop.set()
        await self.done.wait()

    def kill(self) -> None:
        """The sandbox dies (SIGKILL of its process)."""
        if self.pid is not None and self.returncode is None:
            os.kill(self.pid, 9)

    async def run(
        self, argv: list[str], env: dict[str, str], lifetime: float, workdir: str
    ) -> None:
        try:
            async with await anyio.open_process(argv, env=env, stderr=None) as proc:
                self.pid = proc.pid
                with anyio.move_on_after(lifetime):
                    async with anyio.create_task_group() as tg:

                        async def stopper() -> None:
                            await self._stop.wait()
                            tg.cancel_scope.cancel()

                        tg.start_soon(stopper)
                        await proc.wait()
                        tg.cancel_scope.cancel()
                with anyio.move_on_after(5, shield=True):
                    kill_child(proc)
                    await proc.wait()
                self.returncode = proc.returncode
        finally:
            if self.returncode is None:
                self.returncode = -9
            with anyio.move_on_after(5, shield=True):
                await anyio.to_thread.run_sync(shutil.rmtree, workdir, True, limiter=self._limiter)
            self.done.set()


class FakeModal:
    """Stands in for the ``modal`` module (see the module docstring).

    Attributes:
        sandboxes: Every sandbox created, in order.
    """

    def __init__(self, tg: anyio.abc.TaskGroup) -> None:
        self._tg = tg
        self.limiter = anyio.CapacityLimiter(4)  # the sandboxes' work-dir removals
        self.sandboxes: list[FakeSandbox] = []
        self._apps: dict[str, _App] = {}
        fake = self

        class App:
            lookup = _Aio(fake._lookup)

        class Image:
            @staticmethod
            def from_registry(tag: str) -> dict[str, str]:
                return {"registry": tag}

        class Secret:
            @staticmethod
            def from_dict(values: dict[str, str]) -> dict[str, str]:
                return dict(values)

        class Sandbox:
            create = _Aio(fake._create)
            list = _Aio(fake._list)

        self.App, self.Image, self.Secret, self.Sandbox = App, Image, Secret, Sandbox

    def running(self) -> list[FakeSandbox]:
        """Sandboxes whose process has not exited."""
        return [s for s in self.sandboxes if not s.done.is_set()]

    async def _lookup(self, name: str, *, create_if_missing: bool = False) -> _App:
        if name not in self._apps:
            if not create_if_missing:
                raise LookupError(f"app {name!r} not found")
            self._apps[name] = _App(name, f"ap-{uuid.uuid4().hex[:12]}")
        return self._apps[name]

    async def _create(self, *cmd: str, app: _App, **kwargs: Any) -> FakeSandbox:
        if "structenv.sandbox" not in cmd:
            raise ValueError("the fake only runs the structenv sandbox server")
        args = list(cmd[cmd.index("structenv.sandbox") + 1 :])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        for flag, value in (("--host", "127.0.0.1"), ("--port", str(port))):
            if flag in args:
                args[args.index(flag) + 1] = value
        workdir = f"/var/tmp/modal-fake-{uuid.uuid4().hex[:8]}"
        if "--workdir" in args:  # one directory per fake sandbox (Modal's are separate)
            args[args.index("--workdir") + 1] = workdir
        env = dict(os.environ)
        for secret in kwargs.get("secrets") or []:
            env.update(secret)
        sandbox = FakeSandbox(self, app, kwargs, port)
        self.sandboxes.append(sandbox)
        argv = [sys.executable, "-m", "structenv.sandbox", *args, "--watch-stdin"]
        lifetime = float(kwargs.get("timeout", 300))
        self._tg.start_soon(sandbox.run, argv, env, lifetime, workdir)
        return sandbox

    async def _list(
        self, *, app_id: str | None = None, tags: dict[str, str] | None = None
    ) -> AsyncIterator[FakeSandbox]:
        for sandbox in list(self.sandboxes):
            if sandbox.done.is_set() or (app_id is not None and sandbox.app.app_id != app_id):
                continue
            if all(sandbox.tags.get(k) == v for k, v in (tags or {}).items()):
                yield sandbox


@asynccontextmanager
async def open_modal_fake() -> AsyncIterator[FakeModal]:
    """A fake ``modal`` module whose sandboxes are local processes, for the block's duration.

    Cancellation: every fake sandbox's process is killed on exit, whatever happened.
    """
    async with anyio.create_task_group() as tg:
        fake = FakeModal(tg)
        try:
            yield fake
        finally:
            tg.cancel_scope.cancel()

"""A reference ToolServer: serve Python functions as external tools over HTTP.

It speaks the protocol :class:`~structenv.tools.ToolServerClient` uses (see there), requires a
bearer token when one is given, validates arguments against each tool's JSON schema, and
turns a tool's exception into an error result (the client's caller sees data, not a crash).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import jsonschema

from .._http import HTTPError, Request, Responder, open_listener

__all__ = ["ServedTool", "ToolServer", "serve_tool_server"]

log = logging.getLogger("structenv.tools.server")

#: Largest request body the server accepts.
MAX_BODY = 1 << 20


@dataclasses.dataclass(frozen=True)
class ServedTool:
    """A Python coroutine function offered as a tool.

    Attributes:
        name: Tool name.
        description: What the model is told.
        parameters: JSON schema of the arguments object.
        run: ``async def run(arguments) -> str``; raising is reported as a tool error.
    """

    name: str
    description: str
    parameters: Mapping[str, Any]
    run: Callable[[Mapping[str, Any]], Awaitable[str]]


@dataclasses.dataclass
class ToolServer:
    """A running tool server (from :func:`serve_tool_server`)."""

    url: str
    calls: int = 0


@asynccontextmanager
async def serve_tool_server(
    tools: Sequence[ServedTool],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
) -> AsyncIterator[ToolServer]:
    """Serve ``tools`` on ``host:port`` (0: an ephemeral port) for the duration of the block.

    Cancellation: the listener and every connection are closed; calls in progress are
    cancelled.
    """
    by_name = {tool.name: tool for tool in tools}
    validators = {
        t.name: jsonschema.validators.validator_for(t.parameters)(dict(t.parameters)) for t in tools
    }
    specs = [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description,
                "parameters": dict(t.parameters),
            },
        }
        for t in tools
    ]
    listener = open_listener(host=host, port=port)
    server = ToolServer(url=f"http://{host}:{listener.port}")

    async def handle(request: Request, respond: Responder) -> None:
        if request.method == "GET" and request.path == "/tools":
            await respond.send_json(200, {"tools": specs})
            return
        if request.method != "POST" or request.path != "/call":
            raise HTTPError(404, "not_found", f"no route {request.method} {request.path}")
        body = request.json()
        name, arguments = body.get("name"), body.get("arguments", {})
        tool = by_name.get(name) if isinstance(name, str) else None
        if tool is None:
            await respond.send_json(
                200, {"content": f"error: unknown tool {name!r}", "error": "unknown_tool"}
            )
            return
        error = jsonschema.exceptions.best_match(validators[tool.name].iter_errors(arguments))
        if error is not None:
            await respond.send_json(
                200, {"content": f"error: {error.message}", "error": "invalid_arguments"}
            )
            return
        server.calls += 1
        try:
            content = await tool.run(arguments)
        except Exception as exc:
            log.warning("tool %s failed", tool.name, exc_info=True)
            await respond.send_json(200, {"content": f"error: {exc}", "error": "tool_error"})
            return
        await respond.send_json(200, {"content": content, "error": None})

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(listener.serve, handle, max_body=MAX_BODY, token=token))
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()

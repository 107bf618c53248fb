"""Client for an external ToolServer: tools that do not run in the sandbox.

Wire protocol (JSON over HTTP, ``Authorization: Bearer <token>``)::

    GET  /tools   -> {"tools": [<OpenAI function spec>, ...]}
    POST /call    {"name": str, "arguments": {...}} -> {"content": str, "error": str | null}

Only connection failures are retried (the request never reached the server); a call may not
be idempotent, so nothing that reached the server is sent twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import anyio
import httpx
import tenacity

from .._exceptions import ProtocolError, StructEnvError
from .._types import ToolCall, ToolResult
from ._base import Tool, ToolContext

__all__ = ["ExternalTool", "ToolServerClient", "ToolServerError"]


class ToolServerError(StructEnvError):
    """The tool server could not be reached or refused the request."""


class ToolServerClient:
    """Calls tools on an external ToolServer. Use as an async context manager.

    Args:
        url: Base URL, e.g. ``http://127.0.0.1:8700``.
        token: Bearer token sent with every request.
        connect_retries: Attempts for connection failures.
    """

    def __init__(self, url: str, *, token: str | None = None, connect_retries: int = 3) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # Deadlines come from the caller's cancel scopes, so httpx's own timeout is off.
        self._client = httpx.AsyncClient(base_url=url, headers=headers, timeout=None)
        self._retries = connect_retries

    async def __aenter__(self) -> Self:
        await self._client.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close connections. Cancellation: shielded and bounded; connections are dropped."""
        with anyio.move_on_after(5, shield=True):
            await self._client.aclose()

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(httpx.ConnectError),
            stop=tenacity.stop_after_attempt(self._retries),
            wait=tenacity.wait_exponential(multiplier=0.05, max=1.0),
            sleep=anyio.sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    response = await self._client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise ToolServerError(f"tool server unreachable: {exc!r}") from exc
        if response.status_code != 200:
            raise ToolServerError(
                f"tool server answered {response.status_code}: {response.text[:200]}"
            )
        try:
            return response.json()
        except ValueError as exc:
            raise ProtocolError(f"tool server sent invalid JSON: {response.text[:200]!r}") from exc

    async def list_tools(self) -> list[ExternalTool]:
        """The tools the server offers.

        Cancellation: nothing changes.
        """
        data = await self._request("GET", "/tools")
        try:
            return [
                ExternalTool(
                    name=spec["function"]["name"],
                    description=spec["function"].get("description", ""),
                    parameters=spec["function"].get("parameters", {"type": "object"}),
                )
                for spec in data["tools"]
            ]
        except (KeyError, TypeError) as exc:
            raise ProtocolError(f"malformed tool list: {data!r:.200}") from exc

    async def call(self, call: ToolCall) -> ToolResult:
        """Run one call on the server; a tool failure is a result.

        Raises:
            ToolServerError: The server is unreachable or answered an HTTP error.
            ProtocolError: The answer is not valid JSON of the expected shape.

        Cancellation: the request may or may not have reached the server; nothing is retried.
        """
        data = await self._request(
            "POST", "/call", {"name": call.name, "arguments": dict(call.arguments)}
        )
        if not isinstance(data, Mapping) or not isinstance(data.get("content"), str):
            raise ProtocolError(f"malformed tool result: {data!r:.200}")
        error = data.get("error")
        return ToolResult(
            call.id, call.name, data["content"], error=None if error is None else "tool_error"
        )


class ExternalTool(Tool):
    """A tool served by the external ToolServer."""

    in_sandbox = False

    def __init__(self, *, name: str, description: str, parameters: Mapping[str, Any]) -> None:
        self.name = name
        self.description = description
        self.parameters = parameters

    async def run(self, ctx: ToolContext, call: ToolCall) -> ToolResult:
        """Forward the call. Cancellation: the server may have run it."""
        server = ctx.tool_server
        if server is None:
            return ToolResult(
                call.id, call.name, "error: no tool server configured", error="tool_error"
            )
        try:
            return await server.call(call)
        except (ToolServerError, ProtocolError) as exc:
            return ToolResult(call.id, call.name, f"error: {exc}", error="tool_error")

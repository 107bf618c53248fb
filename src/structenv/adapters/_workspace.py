"""ExecTool: what workspace-setup and verification hooks get to act inside a trajectory's slot."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._executor import Trajectory
from .._types import ExecRequest, ExecResult, ToolCall, ToolResult

__all__ = ["ExecTool"]


class ExecTool:
    """Runs commands, tools and file operations in one trajectory's leased slot.

    Handed to :meth:`AgentEnv.setup_trajectory_workspace` and
    :meth:`AgentEnv.verify_and_score_trajectory`. Calling it like the original design's
    ``exec_tool`` runs a tool call (``await exec_tool(ToolCall("terminal", {...}))``); the
    helpers cover what hooks usually need. Everything goes through the executor (batcher and
    deadlines included) and is valid only while the trajectory holds its slot.

    Attributes:
        trajectory_id: The trajectory this acts for.
    """

    __slots__ = ("_traj", "trajectory_id")

    def __init__(self, trajectory: Trajectory) -> None:
        self._traj = trajectory
        self.trajectory_id = trajectory.id

    @property
    def trajectory(self) -> Trajectory:
        """The executor's trajectory object (slot, tool calls, specs)."""
        return self._traj

    async def __call__(self, call: ToolCall) -> ToolResult:
        """Run one tool call as the model would (schema-checked; failures are results).

        Cancellation: as :meth:`structenv.Trajectory.call`.
        """
        return await self._traj.call(call)

    async def tool(self, name: str, **arguments: Any) -> ToolResult:
        """Run tool ``name`` with keyword arguments.

        Cancellation: as :meth:`structenv.Trajectory.call`.
        """
        return await self._traj.call(ToolCall(name, arguments, id=f"{self.trajectory_id}-hook"))

    async def run(
        self,
        command: str,
        *,
        time_limit: float = 60.0,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        """Run a shell command in the workspace root; a nonzero exit is data.

        ``time_limit`` is enforced by the sandbox host, which kills the command's process
        tree when it passes (the result then says ``timed_out``).

        Cancellation: the command's process tree is killed and the slot is not reused.
        """
        request = ExecRequest(command, env=dict(env or {}), stdin=stdin, timeout=time_limit)
        return await self._traj.exec(request)

    async def write_file(self, path: str, data: str | bytes, *, mode: int = 0o644) -> None:
        """Create or replace a workspace file (atomic).

        Cancellation: the file is either old or complete.
        """
        payload = data.encode() if isinstance(data, str) else data
        await self._traj.slot.write_file(path, payload, mode=mode)

    async def read_file(self, path: str, *, max_bytes: int = 1 << 20) -> bytes:
        """Read a workspace file (at most ``max_bytes``).

        Raises:
            OSError: The file does not exist or is not readable.

        Cancellation: nothing changes.
        """
        return await self._traj.slot.read_file(path, max_bytes=max_bytes)

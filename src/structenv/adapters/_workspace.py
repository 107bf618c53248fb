"""ExecTool: what workspace-setup and verification hooks get to act inside a trajectory's slot."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio

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

    async def end_processes(self, *, time_limit: float = 30.0) -> None:
        """End every process the trajectory's commands left running in its slot.

        A command's background jobs (``&``, ``nohup``, ``setsid``, double forks, a ``tmux``
        server) outlive it and keep running as the slot's uid until the slot is released. A
        verification step in the same slot must call this first: a process the model left
        behind can otherwise rewrite the files the verifier restores, or its report, between
        the verifier's commands, and write into their memory (``/proc/PID/mem`` needs only
        the same uid). In a sandboxed slot the slot's worker, PID 1 of its PID namespace,
        kills every other process itself (:meth:`structenv.abc.Slot.end_processes`): no
        process is spawned for it, so none is there for a left process to stop or rewrite
        before the kill. The workspace stays; commands of the trajectory still running
        come back with an error. An unsandboxed slot shares the server's uid and makes no
        such claim: nothing is killed there.

        Raises:
            RuntimeError: A process of the slot survived (one line naming the pids).
            TimeoutError: The slot did not answer within ``time_limit`` seconds.

        Cancellation: the processes may or may not have been ended; the slot stays usable
        (its release rebuilds it anyway).
        """
        slot = self._traj.slot
        if not slot.sandboxed:
            return
        with anyio.fail_after(time_limit):
            left = await slot.end_processes()
        if left:
            pids = " ".join(map(str, left))
            raise RuntimeError(f"processes of slot {slot.id} survived: still running: {pids}")

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

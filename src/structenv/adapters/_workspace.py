"""ExecTool: what workspace-setup and verification hooks get to act inside a trajectory's slot."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._executor import Trajectory
from .._types import ExecRequest, ExecResult, ToolCall, ToolResult

__all__ = ["ExecTool"]

#: Kills every other process of the slot's PID namespace, then checks that only PID 1 (the
#: worker) and this shell are left alive (a killed process may still be exiting: retried).
_END_PROCESSES = r"""
n=0
while :; do
  kill -KILL -1 2>/dev/null
  left=
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    if [ "$p" = 1 ] || [ "$p" = "$$" ]; then continue; fi
    read -r s < "$d/stat" 2>/dev/null || continue
    case ${s##*) } in Z*|X*) ;; *) left="$left $p" ;; esac
  done
  [ -z "$left" ] && exit 0
  n=$((n + 1))
  if [ "$n" -ge 200 ]; then echo "still running:$left"; exit 1; fi
  sleep 0.01
done
"""


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
        the same uid). In a sandboxed slot (its own PID namespace and uid) ``kill -KILL -1``
        reaches exactly the slot's processes; the worker, PID 1, is immune. An unsandboxed
        slot shares the server's uid and makes no such claim: nothing is killed there.

        Raises:
            RuntimeError: A process of the slot survived (one line naming the pids).

        Cancellation: as :meth:`run`.
        """
        if not self._traj.slot.sandboxed:
            return
        result = await self.run(_END_PROCESSES, time_limit=time_limit)
        if not result.ok:
            detail = (result.stdout + result.stderr).decode(errors="replace").strip()
            raise RuntimeError(f"processes of slot {self._traj.slot.id} survived: {detail}")

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

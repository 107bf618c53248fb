"""SweTasksEnv: SWE-style items — a git repo in the workspace, the agent edits it, pytest verifies.

Each item is a tiny Python repository with a failing test (the ``fix-*`` tasks of
``_shell_data``), written into the slot and committed with ``git`` before the agent starts, as
SWE-bench-style harnesses do. After the agent finishes, the tests are restored and
``python3 -m pytest`` runs **in the same slot**; the score is the fraction that pass, and the
agent's change is ``git diff`` (logged).

Nothing is probed or installed: it relies on the default slot toolchain (``python3 -m pytest``,
``pytest``, ``git``, ``bash`` and coreutils work in a default LocalBackend or DockerBackend
slot; see docs/environments.md). Each item may also run in an image of its own:
``images`` (a list of local image names) and ``dockerfiles`` (Dockerfiles built once per
content hash) are cycled through, item by item, as ``AgentTask.sandbox`` — one run whose items
use different images (``structenv demo --example swe-images``). Those images need ``python3``
with pytest and ``git``.

Run it against a model with the env's Atropos CLI (flags as in ``shell_tasks``)::

    python -m structenv.examples.swe_tasks process --env.backend docker \\
        --env.images structenv-sandbox:0.1.0 ...
"""

from __future__ import annotations

import itertools
import logging
import sys
from typing import Any

from pydantic import Field

from .. import SandboxSpec
from ..adapters import ExecTool
from ..agent import AgentResult, AgentTask
from .shell_tasks import ShellTasksEnv, ShellTasksEnvConfig

__all__ = ["SWE_TASK_IDS", "SweTasksEnv", "SweTasksEnvConfig", "main"]

log = logging.getLogger("structenv.examples.swe_tasks")

#: The repo-fixing tasks (a failing test to make pass).
SWE_TASK_IDS = ("fix-add", "fix-fizzbuzz", "fix-slugify", "fix-parse-kv")
_GIT = "git -c user.name=structenv -c user.email=env@structenv -c init.defaultBranch=main"


class SweTasksEnvConfig(ShellTasksEnvConfig):
    """:class:`ShellTasksEnvConfig` for repo tasks, plus per-item images.

    Attributes:
        images: Local images the items run in, cycled item by item (empty: ``sandbox``).
        dockerfiles: Dockerfiles built once per content hash, cycled after ``images``.
    """

    task_ids: list[str] | None = Field(
        default_factory=lambda: list(SWE_TASK_IDS), description="Repo tasks to use."
    )
    images: list[str] = Field(
        default_factory=list, description="Images of the items, cycled (comma-separated)."
    )
    dockerfiles: list[str] = Field(
        default_factory=list, description="Dockerfiles of the items, cycled after images."
    )


class SweTasksEnv(ShellTasksEnv):
    """Fix a failing test in a git repo; pytest in the same slot scores the fix."""

    name = "structenv_swe_tasks"
    env_config_cls = SweTasksEnvConfig
    config: SweTasksEnvConfig

    def __init__(self, config: SweTasksEnvConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        specs: list[SandboxSpec | None] = list(self._spec_list())
        self._specs = itertools.cycle(specs or [None])
        self._item_specs: dict[str, SandboxSpec | None] = {}
        self._counter = itertools.count()

    async def setup_agent_env(self) -> None:
        """Prepare every image up front (a bad one fails here, before any item runs).

        Cancellation: propagates; prepared images stay cached.
        """
        self.check_mode, self.check_python = "pytest", "python3"
        for spec in self._spec_list():
            await self.executor.pool.backend.prepare_spec(spec)

    def _spec_list(self) -> list[SandboxSpec]:
        c = self.config
        return [SandboxSpec(image=i, name=i) for i in c.images] + [
            SandboxSpec(dockerfile=d, name=d) for d in c.dockerfiles
        ]

    async def get_next_item(self) -> str:
        """The next task id, tagged with a sequence number (its image is chosen from it).

        Cancellation: nothing to undo.
        """
        task = next(self._items)
        item = f"{task}#{next(self._counter)}"
        self._item_specs[item] = next(self._specs)
        return item

    def build_task(self, item: Any) -> AgentTask:
        base = super().build_task(str(item).split("#")[0])
        return AgentTask(
            prompt=base.prompt,
            system=base.system,
            id=base.id,
            sandbox=self._item_specs.get(str(item)),
        )

    async def setup_trajectory_workspace(
        self, item: Any, *, trajectory_id: str, exec_tool: ExecTool
    ) -> None:
        """Write the repo and commit it (the agent's change is then ``git diff``).

        Cancellation: the slot is released and not reused.
        """
        await super().setup_trajectory_workspace(
            str(item).split("#")[0], trajectory_id=trajectory_id, exec_tool=exec_tool
        )
        result = await exec_tool.run(
            f"{_GIT} init -q . && {_GIT} add -A && {_GIT} commit -qm task", time_limit=60
        )
        if not result.ok:
            raise RuntimeError(f"git in the slot failed: {result.stderr.decode()[-300:]}")

    async def verify_and_score_trajectory(
        self, item: Any, result: AgentResult, *, trajectory_id: str, exec_tool: ExecTool
    ) -> float:
        """Log the agent's ``git diff``, restore the tests, run pytest; fraction passed.

        Cancellation: the slot is released and not reused.
        """
        diff = await exec_tool.run(f"{_GIT} diff --stat", time_limit=60)
        log.info("%s changed: %s", trajectory_id, diff.stdout.decode(errors="replace").strip())
        return await super().verify_and_score_trajectory(
            str(item).split("#")[0], result, trajectory_id=trajectory_id, exec_tool=exec_tool
        )


def main(argv: list[str] | None = None) -> int:
    """Atropos CLI of this env (``serve`` / ``process`` / ``evaluate``)."""
    return SweTasksEnv.cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())

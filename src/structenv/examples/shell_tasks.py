"""ShellTasksEnv: fix a small repo or produce a file, verified by running its tests in the slot.

Each task (see ``_shell_data.py``) is a tiny workspace written into the trajectory's slot by
:meth:`ShellTasksEnv.setup_trajectory_workspace`: source files, ``tests/test_*.py`` and a
``run_tests.sh`` helper the agent may call. After the agent finishes,
:meth:`ShellTasksEnv.verify_and_score_trajectory` runs in the same slot: it restores the test
files (edits to them do not count), runs them and only them (a test file the model adds does
not count) and scores the fraction that pass (0.0-1.0).

Running the tests inside the sandbox: the env probes the slot at startup for a Python with
pytest. With :class:`~structenv.backends.LocalBackend` the interpreter running structenv is
bound read-only into every sandbox, so ``sys.executable -m pytest`` works when pytest is
installed (it is with ``structenv[dev]``). If no sandbox Python has pytest, the env falls back
to a ~20-line built-in runner executed with the sandbox's ``python3`` that calls every
``test_*`` function (plain-assert tests only) and says so in the log (``check="runner"``).
Verification first ends every process the model left in the slot, restores the tests, and
runs them with no ``conftest.py``, ini file, plugin autoload, user site (``HOME`` is the
workspace), cached bytecode, package ``__init__.py`` above the tests, workspace module ahead
of pytest or the standard library, and a report name the model cannot know; the tests still
import the model's code into
pytest's process, where it can write the report: a training signal, not a defence against an
adversarial model (docs/design.md, known gaps; ``tests/test_verify_tamper.py``).

Run it (any OpenAI-compatible / vLLM endpoint)::

    python -m structenv.examples.shell_tasks process \\
        --env.tokenizer_name <hf tokenizer> --env.total_steps 8 --env.group_size 4 \\
        --env.use_wandb False --env.data_path_to_save_groups out/shell.jsonl \\
        --openai.base_url http://HOST:8000/v1 --openai.model_name <model> \\
        --openai.api_key <key or any string> --openai.tokenizer_name <hf tokenizer> \\
        --openai.server_type vllm --openai.health_check False

(``process`` forces ``use_wandb`` on unless ``--env.use_wandb False`` is given, and the
OpenAI client refuses to start without some ``--openai.api_key``.) ``serve`` takes the same
flags plus ``--env.rollout_server_url`` of atroposlib's ``run-api``.

``structenv demo`` runs the same env offline against a scripted policy server.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import shlex
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import Field

from .. import ConfigError
from ..adapters import ExecTool
from ..adapters.atropos import AgentEnv, AgentEnvConfig, APIServerConfig
from ..agent import AgentResult, AgentTask
from ..testing import ReplayStep, task_marker
from ._shell_data import SHELL_TASKS, ShellTask, shell_task_solutions

__all__ = ["ShellTasksEnv", "ShellTasksEnvConfig", "main"]

log = logging.getLogger("structenv.examples.shell_tasks")

SYSTEM_PROMPT = (
    "You are working in a sandboxed Linux workspace with a small project. Use the tools to "
    "inspect and change files and to run commands. Run the tests with `sh run_tests.sh`. "
    "When you are done, reply with a short summary and no tool call."
)

#: Where pytest's report goes: a name made for each verification, never known to the
#: model. A fixed one could be the model's file: a forged report in a ``.structenv/`` it
#: made read-only (0555, the report 0444) could be neither removed nor overwritten by the
#: verifier's commands (the slot's uid), pytest failed to write and the forgery scored
#: 1.0 (red team, round 4).
_REPORT = ".structenv/report-{}.xml"
_RUNNER_PATH = ".structenv/runner.py"
_RUNNER = """\
import importlib.util, json, pathlib, sys, traceback
sys.path.append(".")
passed = total = 0
paths = [pathlib.Path(p) for p in sys.argv[1:]] or sorted(pathlib.Path("tests").glob("test_*.py"))
for path in paths:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception:
        traceback.print_exc()
        total += 1
        continue
    for name in sorted(dir(module)):
        test = getattr(module, name)
        if name.startswith("test") and callable(test):
            total += 1
            try:
                test()
            except Exception:
                print("FAILED", path.name, name)
                traceback.print_exc()
            else:
                passed += 1
                print("PASSED", path.name, name)
print(json.dumps({"passed": passed, "total": total}))
sys.exit(0 if total and passed == total else 1)
"""
#: The tests' interpreter loads nothing the model left outside the tests' own imports:
#: no plugin, no user site (``HOME`` is the workspace, so ``~/.local/.../site-packages``
#: and its ``.pth`` files are the model's), and ``-c``/a script path does not put the
#: workspace first on ``sys.path`` (a ``pytest.py`` there would replace pytest; Python
#: 3.11+). The workspace is *appended* to ``sys.path`` (the tests import the model's
#: modules from it), never put first: pytest's ``-o pythonpath=$PWD`` put it ahead of the
#: standard library, and a workspace ``readline.py`` (or ``pdb.py``, ``code.py``, ...,
#: which pytest imports after that) ran in pytest's process and forged the report of tests
#: that import nothing of the model's. ``--import-mode=importlib`` puts no ``tests/`` on
#: ``sys.path`` either (the default put it first: a ``tests/shutil.py`` would replace the
#: ``shutil`` a test imports) and, unlike ``append``, a ``test_calc.py`` of the model's own
#: next to ``calc.py`` does not take the task's test's module name (a collection error,
#: scored 0). Tests cannot import a sibling module of ``tests/``. No cached bytecode is
#: read (``PYTHONPYCACHEPREFIX`` is a path under ``/dev/null``, which no one can create):
#: Python and pytest accept a ``__pycache__/*.pyc`` whose header
#: holds the *source's hash*, and the model knows the restored tests' text, so a
#: ``tests/__pycache__`` pyc of passing tests it wrote stood in for them (2 of 2 passed
#: for a failing task, pytest and the built-in runner alike).
_PYTEST_ENV = {
    "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONNOUSERSITE": "1",
    "PYTHONPYCACHEPREFIX": "/dev/null/structenv",
    "PYTHONSAFEPATH": "1",
}
#: pytest, with the workspace appended to ``sys.path`` (see ``_PYTEST_ENV``).
_PYTEST_MAIN = "import os, sys, pytest; sys.path.append(os.getcwd()); sys.exit(pytest.main())"


class ShellTasksEnvConfig(AgentEnvConfig):
    """:class:`AgentEnvConfig` plus the task selection and the test runner.

    Attributes:
        task_ids: Tasks to cycle through (``None``: all of them).
        check: ``"pytest"``, ``"runner"`` (built-in plain-assert runner) or ``"auto"``
            (pytest if a sandbox Python has it).
        check_python: Interpreter to run tests with (``None``: probe ``sys.executable``,
            then ``python3``).
        check_timeout_s: Deadline of one test run.
    """

    task_ids: list[str] | None = Field(
        default=None, description="Tasks to use (None: all; as a flag: comma-separated)."
    )
    check: Literal["auto", "pytest", "runner"] = Field(
        default="auto", description="How tests run in the sandbox."
    )
    check_python: str | None = Field(default=None, description="Python used to run tests.")
    check_timeout_s: float = Field(default=60.0, gt=0, description="Deadline of a test run.")


class ShellTasksEnv(AgentEnv):
    """Small deterministic shell/repo tasks scored by their tests, run inside the slot."""

    name = "structenv_shell_tasks"
    env_config_cls = ShellTasksEnvConfig
    config: ShellTasksEnvConfig

    def __init__(
        self,
        config: ShellTasksEnvConfig,
        server_configs: list[APIServerConfig],
        slurm: bool = False,
        testing: bool = False,
    ) -> None:
        known = {t.id: t for t in SHELL_TASKS}
        wanted = config.task_ids if config.task_ids is not None else list(known)
        unknown = [t for t in wanted if t not in known]
        if unknown or not wanted:
            raise ConfigError(f"unknown task ids {unknown}; known: {sorted(known)}")
        self.tasks: dict[str, ShellTask] = {t: known[t] for t in wanted}
        super().__init__(config, server_configs, slurm=slurm, testing=testing)
        self._items = itertools.cycle(list(self.tasks))
        self.check_mode: Literal["pytest", "runner"] = "runner"
        self.check_python = "python3"

    async def setup_agent_env(self) -> None:
        """Probe the sandbox for a Python that can run the tests.

        Raises:
            ConfigError: ``check="pytest"`` but no sandbox Python has pytest, or no Python
                at all.

        Cancellation: the probe's slot is released; nothing else changes.
        """
        candidates = [self.config.check_python] if self.config.check_python else []
        candidates += [sys.executable, "python3"]
        async with self.executor.trajectory("probe-python") as traj:
            probe = ExecTool(traj)
            if self.config.check != "runner":
                for python in candidates:
                    result = await probe.run(f"{shlex.quote(python)} -c 'import pytest'")
                    if result.ok:
                        self.check_mode, self.check_python = "pytest", python
                        log.info("tests run with pytest (%s)", python)
                        return
                if self.config.check == "pytest":
                    raise ConfigError("check='pytest' but no sandbox Python can import pytest")
            for python in candidates:
                if (await probe.run(f"{shlex.quote(python)} -c pass")).ok:
                    self.check_mode, self.check_python = "runner", python
                    log.warning("pytest is not available in the sandbox: using the built-in runner")
                    return
        raise ConfigError("no Python interpreter is usable inside the sandbox")

    @classmethod
    def offline_solutions(cls, config: AgentEnvConfig) -> dict[str, list[ReplayStep]]:
        """The reference solutions (``structenv run ...:ShellTasksEnv --offline``)."""
        del config
        return shell_task_solutions()

    async def get_next_item(self) -> str:
        """The next task id (cycling through the tasks in order).

        Cancellation: nothing to undo.
        """
        return next(self._items)

    def build_task(self, item: Any) -> AgentTask:
        task = self.tasks[str(item)]
        prompt = f"{task.instruction}\n\n{task_marker(task.id)}"
        return AgentTask(prompt=prompt, system=SYSTEM_PROMPT, id=task.id)

    def _test_command(self, *, report: str = "", files: Iterable[str] = ()) -> str:
        """The test run: ``files`` (the task's own: a test file the model added is not
        run), or every test under ``tests`` (``run_tests.sh``); pytest writes a JUnit
        report to ``report`` if given."""
        python = shlex.quote(self.check_python)
        targets = " ".join(map(shlex.quote, files))
        if self.check_mode == "runner":
            return f"{python} {_RUNNER_PATH} {targets}".rstrip()
        extra = f" --junitxml={shlex.quote(report)}" if report else ""
        return (
            f"{python} -c {shlex.quote(_PYTEST_MAIN)} -q -p no:cacheprovider --noconftest "
            f"-c /dev/null --import-mode=importlib --rootdir=. {targets or 'tests'}{extra}"
        )

    async def setup_trajectory_workspace(
        self, item: Any, *, trajectory_id: str, exec_tool: ExecTool
    ) -> None:
        """Write the task's files and ``run_tests.sh`` into the slot.

        Cancellation: the slot is released and not reused.
        """
        task = self.tasks[str(item)]
        for path, text in task.files.items():
            await exec_tool.write_file(path, text)
        env = "".join(f"{k}={v} " for k, v in _PYTEST_ENV.items())
        await exec_tool.write_file(
            "run_tests.sh", f"#!/bin/sh\n{env}exec {self._test_command()}\n", mode=0o755
        )
        if self.check_mode == "runner":
            await exec_tool.write_file(_RUNNER_PATH, _RUNNER)

    async def verify_and_score_trajectory(
        self, item: Any, result: AgentResult, *, trajectory_id: str, exec_tool: ExecTool
    ) -> float:
        """Restore the tests, run them in the slot, return the fraction that pass.

        The processes the model left in the slot are ended first.

        Cancellation: the slot is released and not reused.
        """
        task = self.tasks[str(item)]
        # First: nothing the model started may run alongside (it would rewrite what is
        # restored next, or the report).
        await exec_tool.end_processes()
        try:
            for path, text in task.test_files.items():
                await exec_tool.write_file(path, text)
            if self.check_mode == "runner":
                await exec_tool.write_file(_RUNNER_PATH, _RUNNER)
        except OSError as exc:
            if isinstance(exc, (TimeoutError, ConnectionError)):
                raise  # the sandbox, not the model: a harness failure, never a score of 0
            # The model's workspace is in the way (a directory where a test file goes, a
            # file where .structenv/ goes): its outcome, scored, not a harness failure (an
            # exception here failed the whole group, which was then not trained on).
            log.info("%s: cannot restore the tests (%s): score 0", trajectory_id, exc)
            return 0.0
        if self.check_mode == "runner":
            run = await exec_tool.run(
                self._test_command(files=task.test_files),
                env=_PYTEST_ENV,
                time_limit=self.config.check_timeout_s,
            )
            return _runner_score(run.stdout.decode(errors="replace"))
        # pytest imports the package a test file is in (each directory up from it that has
        # an __init__.py) into its own process: a tests/__init__.py the model left forged
        # the report of tests that import nothing of the model's (red team, round 4).
        markers = _package_markers(task.test_files).difference(task.files)
        if markers:
            await exec_tool.run("rm -f -- " + " ".join(map(shlex.quote, sorted(markers))))
        path = _REPORT.format(secrets.token_hex(8))
        await exec_tool.run(
            self._test_command(report=path, files=task.test_files),
            env=_PYTEST_ENV,
            time_limit=self.config.check_timeout_s,
        )
        try:
            report = await exec_tool.read_file(path)
        except (OSError, ValueError) as exc:
            log.info("%s: no test report (%s): score 0", trajectory_id, exc)
            return 0.0
        return _junit_score(report)


def _package_markers(files: Iterable[str]) -> set[str]:
    """The ``__init__.py`` of every directory from each file's up to the workspace's."""
    markers: set[str] = set()
    for path in files:
        parts = path.split("/")[:-1]
        markers.update("/".join([*parts[:i], "__init__.py"]) for i in range(len(parts) + 1))
    return markers


def _junit_score(report: bytes) -> float:
    """Fraction of passed tests in a pytest JUnit XML report (0.0 if unreadable)."""
    try:
        root = ET.fromstring(report)
    except ET.ParseError:
        return 0.0
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return 0.0
    total = int(suite.get("tests", "0"))
    bad = sum(int(suite.get(k, "0")) for k in ("failures", "errors", "skipped"))
    return max(0.0, (total - bad) / total) if total else 0.0


def _runner_score(stdout: str) -> float:
    """Fraction of passed tests from the built-in runner's last JSON line."""
    import json

    for line in reversed(stdout.strip().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("total"):
            return float(data.get("passed", 0)) / float(data["total"])
        return 0.0
    return 0.0


def main(argv: list[str] | None = None) -> int:
    """Atropos CLI of this env (``serve`` / ``process`` / ``evaluate``), as BaseEnv.cli().

    ``argv`` replaces ``sys.argv[1:]`` (atroposlib reads ``sys.argv`` itself).
    """
    return ShellTasksEnv.cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())

"""The verification step runs in the trajectory's own slot, after the model's commands.

Attacks a model (an optimizer of its score) can leave behind for ``verify_and_score_trajectory``
of the example envs (``ShellTasksEnv``, inherited by ``SweTasksEnv``), run in real slots:
each plays the model's commands, then the env's real verification, and checks the score is
the honest one. The unsolved ``fix-add`` task passes 1 of its 3 tests.

What holds and what does not is in docs/design.md ("Known gaps"): the tests run the model's
code in pytest's own process, so that code can always forge the report (the xfail below).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from typing import Literal, cast

import anyio
import anyio.lowlevel
import pytest

from structenv import ToolExecutor
from structenv.abc import SandboxBackend
from structenv.adapters import ExecTool
from structenv.agent import AgentResult
from structenv.examples._shell_data import SHELL_TASKS
from structenv.examples.shell_tasks import ShellTasksEnv, ShellTasksEnvConfig
from test_docker_support import docker_backend, docker_image
from test_sandbox_support import local_backend

_ = docker_image
pytestmark = pytest.mark.anyio

Mode = Literal["pytest", "runner"]
TASK = next(t for t in SHELL_TASKS if t.id == "fix-add")
HONEST = 1 / 3

#: A perfect JUnit report, and a test file that passes whatever ``calc.py`` says.
_FORGED_REPORT = '<testsuite name="pytest" tests="3" failures="0" errors="0" skipped="0"/>'
_FORGED_TESTS = "".join(f"def test_{n}():\n    pass\n\n\n" for n in "abc")


def _env(python: str, mode: Mode = "pytest") -> ShellTasksEnv:
    """The env's verification (pytest or its built-in runner), without a trainer or a
    tokenizer."""
    env = object.__new__(ShellTasksEnv)
    env.config = ShellTasksEnvConfig()
    env.tasks = {TASK.id: TASK}
    env.check_mode, env.check_python = mode, python
    return env


@contextlib.asynccontextmanager
async def _backend(kind: str) -> AsyncIterator[tuple[SandboxBackend, str]]:
    if kind == "local":
        async with local_backend(slots_per_host=1) as b:
            yield b, sys.executable
    else:
        async with docker_backend(slots_per_host=1) as b:
            yield b, "python3"


async def _play(
    kind: str,
    commands: list[str],
    request: pytest.FixtureRequest,
    files: dict[str, str] | None = None,
    mode: Mode = "pytest",
) -> tuple[float, bytes, str]:
    """Write the task, the model's ``files``, run its ``commands``, verify: (score, processes
    left, tests)."""
    if kind == "docker":
        request.getfixturevalue("docker_image")  # built once per session
    async with _backend(kind) as (b, python), ToolExecutor(b) as executor:
        async with executor.trajectory("tamper") as traj:
            tool = ExecTool(traj)
            assert traj.slot.sandboxed
            for path, text in {**TASK.files, **(files or {})}.items():
                await tool.write_file(path, text)
            for command in commands:
                done = await tool.run(command, time_limit=30)
                assert done.ok, done
            score = await _env(python, mode).verify_and_score_trajectory(
                TASK.id, cast(AgentResult, None), trajectory_id="tamper", exec_tool=tool
            )
            left = await tool.run(_OTHERS)
            try:
                tests = (await tool.read_file("tests/test_calc.py")).decode()
            except IsADirectoryError:
                tests = "(a directory)"
    return score, left.stdout, tests


#: The slot's processes but its worker (PID 1) and this command's own.
_OTHERS = "ps -eo pid=,ppid=,args= | awk -v me=$$ '$1 != 1 && $1 != me && $2 != me'"

_BACKENDS = ["local", pytest.param("docker", marks=pytest.mark.docker)]

#: Left running by the model: rewrites the restored tests and the report, every 10 ms, from
#: a double-forked ``setsid`` process (no parent, no session, no terminal) and a ``nohup``.
_LINGER = [
    f"printf %s '{_FORGED_TESTS}' > .t && printf %s '{_FORGED_REPORT}' > .r && mkdir -p .structenv",
    "(setsid sh -c 'while :; do cp .t tests/test_calc.py; cp .r .structenv/report.xml;"
    " sleep 0.01; done' >/dev/null 2>&1 </dev/null &)",
    "nohup sh -c 'while :; do cp .r .structenv/report.xml; sleep 0.01; done' >/dev/null 2>&1 &",
    # The attack runs (its effect is visible) before the model's turn ends.
    "until cmp -s .t tests/test_calc.py; do sleep 0.01; done",
]


@pytest.mark.parametrize("kind", _BACKENDS)
async def test_a_process_left_running_cannot_rewrite_the_verification(
    kind: str, request: pytest.FixtureRequest
) -> None:
    score, left, tests = await _play(kind, _LINGER, request)
    assert score == pytest.approx(HONEST), score
    assert left == b"", left.decode()
    assert tests == TASK.files["tests/test_calc.py"]


@pytest.mark.parametrize("steps", [0, 1, 2, 5, 10, 20, 40])
async def test_a_cancelled_end_processes_leaks_nothing(steps: int) -> None:
    # Cancelled after ``steps`` scheduling steps (before, during or after the kill): the
    # lease ends, its slot is released, and no process of the model survives the release.
    async with local_backend(slots_per_host=1) as b, ToolExecutor(b) as executor:
        with anyio.CancelScope() as scope:
            async with executor.trajectory("cancel") as traj:
                tool = ExecTool(traj)
                await tool.run("(setsid sleep 1000 &)")

                async def cancel_after() -> None:
                    for _ in range(steps):
                        await anyio.lowlevel.checkpoint()
                    scope.cancel()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(cancel_after)
                    await tool.end_processes()
                    await anyio.sleep_forever()
        assert scope.cancelled_caught
        stats = executor.pool.statistics()
        assert stats.in_use == 0 and stats.acquired == stats.released, stats
        assert b.statistics().leased == 0, b.statistics()
        async with executor.trajectory("after") as traj:
            left = await ExecTool(traj).run(_OTHERS)
        assert left.stdout == b"", left


#: Python code the model leaves for the verifier's interpreter: at its exit, after pytest
#: wrote the report, it writes a perfect one.
_FORGER = f"""import atexit, os
def _forge():
    if os.path.isdir(".structenv"):
        with open(".structenv/report.xml", "w") as f:
            f.write({_FORGED_REPORT!r})
atexit.register(_forge)
"""


@pytest.mark.parametrize("kind", _BACKENDS)
async def test_a_user_site_pth_does_not_run_in_the_verification(
    kind: str, request: pytest.FixtureRequest
) -> None:
    # HOME is the workspace, so ~/.local/lib/pythonX.Y/site-packages is the model's, and a
    # .pth file there runs in every later python3 of the slot, the verifier's included.
    plant = (
        "d=$(python3 -c 'import site; print(site.getusersitepackages())') && mkdir -p \"$d\" "
        '&& mv forger.py "$d/" && echo \'import forger\' > "$d/zz.pth" '
        "&& python3 -c 'import forger'"
    )
    score, _, _ = await _play(kind, [plant], request, {"forger.py": _FORGER})
    assert score == pytest.approx(HONEST), score


@pytest.mark.parametrize("kind", _BACKENDS)
async def test_a_workspace_pytest_module_does_not_replace_pytest(
    kind: str, request: pytest.FixtureRequest
) -> None:
    # ``python3 -m pytest`` puts the working directory (the workspace) first on sys.path.
    fake = f"import os\nos.makedirs('.structenv', exist_ok=True)\n{_FORGER}"
    score, _, _ = await _play(kind, [], request, {"pytest.py": fake})
    assert score == pytest.approx(HONEST), score


@pytest.mark.xfail(
    strict=True,
    reason="the tests import the model's code into pytest's own process, which can then "
    "write the report (or patch pytest): known gap, docs/design.md",
)
async def test_the_models_own_module_cannot_forge_the_report(
    request: pytest.FixtureRequest,
) -> None:
    calc = TASK.files["calc.py"] + _FORGER
    score, _, _ = await _play("local", [], request, {"calc.py": calc})
    assert score == pytest.approx(HONEST), score


@pytest.mark.parametrize("mode", ["pytest", "runner"])
@pytest.mark.parametrize("kind", _BACKENDS)
async def test_a_test_file_the_model_adds_does_not_count(
    kind: str, mode: Mode, request: pytest.FixtureRequest
) -> None:
    # Restoring the task's tests undoes edits to them; a file of 50 passing tests next to
    # them was collected with them (51 of 53: 0.96).
    more = "".join(f"def test_{n}():\n    pass\n\n\n" for n in range(50))
    score, _, _ = await _play(kind, [], request, {"tests/test_more.py": more}, mode)
    assert score == pytest.approx(HONEST), score


@pytest.mark.parametrize("mode", ["pytest", "runner"])
@pytest.mark.parametrize("kind", _BACKENDS)
async def test_a_workspace_in_the_way_of_the_verifier_scores_zero(
    kind: str, mode: Mode, request: pytest.FixtureRequest
) -> None:
    # A directory where a test file is restored, a file where .structenv/ goes: the
    # verification raised IsADirectoryError, which failed the whole group (a harness
    # failure: not trained on, and in process mode the end of the run) instead of
    # scoring the model's outcome.
    block = ["rm tests/test_calc.py && mkdir -p tests/test_calc.py/x && touch .structenv"]
    score, _, _ = await _play(kind, block, request, mode=mode)
    assert score == 0.0


class _LostSandbox:
    """An ExecTool whose sandbox stops answering while the tests are restored."""

    def __init__(self, exc: OSError) -> None:
        self.exc = exc

    async def end_processes(self) -> None:
        pass

    async def write_file(self, path: str, data: str | bytes, *, mode: int = 0o644) -> None:
        raise self.exc


@pytest.mark.parametrize("exc", [TimeoutError("timed out"), ConnectionResetError("reset")])
async def test_a_lost_sandbox_while_restoring_is_a_harness_failure_not_a_zero(
    exc: OSError,
) -> None:
    env = _env(sys.executable)
    tool = cast(ExecTool, _LostSandbox(exc))
    with pytest.raises(type(exc)):
        await env.verify_and_score_trajectory(
            TASK.id, AgentResult.__new__(AgentResult), trajectory_id="t", exec_tool=tool
        )

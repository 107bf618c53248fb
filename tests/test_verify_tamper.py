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
import platform
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal, cast

import anyio
import anyio.lowlevel
import pytest

from structenv import ExecRequest, ExecResult, ToolExecutor
from structenv.abc import SandboxBackend
from structenv.adapters import ExecTool
from structenv.agent import AgentResult
from structenv.examples._shell_data import SHELL_TASKS
from structenv.examples.shell_tasks import ShellTasksEnv, ShellTasksEnvConfig
from structenv.testing import child_processes
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


#: The slot's processes but its worker (PID 1) and this shell, with their command lines:
#: bash builtins only (no ``ps`` in every image, and no process of its own to list).
_OTHERS = r"""for d in /proc/[0-9]*; do
  p=${d#/proc/}
  { [ "$p" = 1 ] || [ "$p" = $$ ]; } && continue
  read -r s < "$d/stat" 2>/dev/null || continue
  a=
  while IFS= read -r -d '' w; do a="$a $w"; done < "$d/cmdline" 2>/dev/null
  echo "$p$a"
done"""


def _assert_honest(score: float, left: bytes, tests: str) -> None:
    """No process of the model's outlived the verification, the task's tests were restored,
    and the unsolved task scored what it honestly scores."""
    assert left == b"", left.decode()
    assert tests == TASK.files["tests/test_calc.py"]
    assert score == pytest.approx(HONEST), score


_BACKENDS = ["local", pytest.param("docker", marks=pytest.mark.docker)]

#: Left running by the model: rewrites the restored tests and the report, every 10 ms, from
#: a double-forked ``setsid`` process (no parent, no session, no terminal) and a ``nohup``.
_LINGER = [
    f"printf %s '{_FORGED_TESTS}' > .t && printf %s '{_FORGED_REPORT}' > .r && mkdir -p .structenv",
    "(setsid sh -c 'while :; do cp .t tests/test_calc.py;"
    " for f in .structenv/*.xml; do cp .r $f; done; sleep 0.01; done'"
    " >/dev/null 2>&1 </dev/null &)",
    "nohup sh -c 'while :; do for f in .structenv/*.xml; do cp .r $f; done; sleep 0.01; done'"
    " >/dev/null 2>&1 &",
    # The attack runs (its effect is visible) before the model's turn ends.
    "until cmp -s .t tests/test_calc.py; do sleep 0.01; done",
]


@pytest.mark.parametrize("kind", _BACKENDS)
async def test_a_process_left_running_cannot_rewrite_the_verification(
    kind: str, request: pytest.FixtureRequest
) -> None:
    _assert_honest(*await _play(kind, _LINGER, request))


#: Left running by the model (python, three processes that spawn nothing): keep forging the
#: tests and the report, and take over every process of the slot started after them that
#: they can open (same uid, dumpable): SIGSTOP, then ``exit_group(0)`` written at its resume
#: address through ``/proc/PID/mem``, then SIGCONT. A kill run as a command of the slot
#: (``kill -KILL -1`` in a shell, as ``end_processes`` did) exits 0 having killed nothing.
#: (Three, spinning: they share the slot's CPU quota with that shell, which then starts
#: slower, and one of them sees it sooner.)
_HIJACKER = f"""import os, signal, time
# nop; nop; xor edi, edi; mov eax, 231 (exit_group); syscall: from pc - 2 (a restarted
# system call goes back to its syscall instruction) or from pc.
CODE = bytes.fromhex("9090" "31ff" "b8e7000000" "0f05")
tests, report = {_FORGED_TESTS!r}, {_FORGED_REPORT!r}
seen = {{int(p) for p in os.listdir("/proc") if p.isdigit()}}
os.makedirs(".structenv", exist_ok=True)
forger = os.fork() and os.fork()  # three processes; the first one also forges
session = os.getsid(0)  # the hijackers' own (they spare each other)
if forger:
    open(".hijacker-ready", "w").close()

def take(pid):
    try:
        if os.getsid(pid) == session:
            return True
        mem = os.open(f"/proc/{{pid}}/mem", os.O_RDWR)  # refused before its exec
    except OSError:
        return False
    try:
        os.kill(pid, signal.SIGSTOP)
        while True:
            with open(f"/proc/{{pid}}/stat") as f:
                stat = f.read()
            if stat[stat.rfind(")") + 2] in "tT":
                break
        with open(f"/proc/{{pid}}/syscall") as f:
            pc = int(f.read().split()[-1], 16)
        os.pwrite(mem, CODE, pc - 2)
        os.kill(pid, signal.SIGCONT)
    except (OSError, ValueError):
        pass
    finally:
        os.close(mem)
    return True

due = 0.0
while True:
    if forger and time.monotonic() >= due:
        due = time.monotonic() + 0.005
        reports = [f".structenv/{{n}}" for n in os.listdir(".structenv") if n.endswith(".xml")]
        for name, text in [("tests/test_calc.py", tests), *((r, report) for r in reports)]:
            try:
                with open(name, "w") as f:
                    f.write(text)
            except OSError:
                pass
    for p in os.listdir("/proc"):
        if p.isdigit() and int(p) not in seen and take(int(p)):
            seen.add(int(p))
"""

#: The model's commands: start the hijacker (double-forked, setsid) and wait until it runs.
_HIJACK = [
    "(setsid python3 hijacker.py >/dev/null 2>&1 </dev/null &)",
    "until [ -e .hijacker-ready ]; do sleep 0.01; done",
]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the hijacker's code is x86-64")
@pytest.mark.parametrize("kind", _BACKENDS)
async def test_a_process_left_running_cannot_hijack_end_processes(
    kind: str, request: pytest.FixtureRequest
) -> None:
    # With the kill run as a command of the slot, the hijacker made it exit 0 and stayed:
    # the verification then read its forged tests and report (scored 1.0). A race the
    # hijackers won in 18 of 20 cases (5 runs of the 4 variants) against that shell; the
    # worker's kill spawns nothing to race.
    _assert_honest(*await _play(kind, _HIJACK, request, {"hijacker.py": _HIJACKER}))


#: Every way a command leaves a process behind, and a file the model wrote.
_LEAVE = [
    "echo kept > kept.txt",
    "(setsid sleep 1000 >/dev/null 2>&1 </dev/null &)",
    "nohup sleep 1000 >/dev/null 2>&1 &",
    "sleep 1000 >/dev/null 2>&1 & disown",
    "( (sleep 1000 >/dev/null 2>&1 &) & )",
    "setsid -f sh -c 'trap \"\" TERM HUP; exec sleep 1000' >/dev/null 2>&1",
]


@pytest.mark.parametrize("kind", _BACKENDS)
async def test_end_processes_ends_everything_and_keeps_the_slot(
    kind: str, request: pytest.FixtureRequest
) -> None:
    # Background, nohup, setsid and double-forked processes are all gone; a command still
    # running comes back with an error; the files stay and the slot runs the next command.
    if kind == "docker":
        request.getfixturevalue("docker_image")
    async with _backend(kind) as (b, _), ToolExecutor(b) as executor:
        async with executor.trajectory("end") as traj:
            tool = ExecTool(traj)
            for command in _LEAVE:
                assert (await tool.run(command)).ok
            before = await tool.run(_OTHERS)
            assert before.stdout.count(b"sleep 1000") >= 5, before.stdout.decode()
            running: list[ExecResult] = []

            async def run() -> None:
                running.append(await tool.run("touch started; exec sleep 1000", time_limit=60))

            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                assert (await tool.run("until [ -e started ]; do sleep 0.01; done")).ok
                await tool.end_processes()
            (ended,) = running
            assert ended.exit_code is None and ended.error is not None, ended
            assert "ended" in ended.error
            left = await tool.run(_OTHERS)
            assert left.ok and left.stdout == b"", left.stdout.decode()
            assert await tool.read_file("kept.txt") == b"kept\n"
            assert (await tool.run("echo again")).stdout == b"again\n"
            await tool.end_processes()  # again, with nothing left: fine
        assert b.statistics().leased == 0


async def _cancel_after(
    steps: int, scope: anyio.CancelScope, operation: Callable[[], Awaitable[object]]
) -> None:
    """Run ``operation``; cancel ``scope`` after ``steps`` checkpoints (at one of its await
    points, or after it)."""

    async def cancel_after() -> None:
        for _ in range(steps):
            await anyio.lowlevel.checkpoint()
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(cancel_after)
        await operation()
        await anyio.sleep_forever()


@pytest.mark.parametrize("steps", [0, 1, 2, 5, 10, 20, 40])
async def test_a_cancelled_end_processes_leaks_nothing(steps: int) -> None:
    # Cancelled after ``steps`` scheduling steps (before, during or after the kill): the
    # lease ends, its slot is released, and no process of the model survives the release.
    async with local_backend(slots_per_host=1) as b, ToolExecutor(b) as executor:
        with anyio.CancelScope() as scope:
            async with executor.trajectory("cancel") as traj:
                tool = ExecTool(traj)
                await tool.run("(setsid sleep 1000 &)")
                await _cancel_after(steps, scope, tool.end_processes)
        assert scope.cancelled_caught
        stats = executor.pool.statistics()
        assert stats.in_use == 0 and stats.acquired == stats.released, stats
        assert b.statistics().leased == 0, b.statistics()
        async with executor.trajectory("after") as traj:
            left = await ExecTool(traj).run(_OTHERS)
        assert left.stdout == b"", left
    assert child_processes() == []


_CANCEL_STEPS = [
    *(pytest.param("local", k, id=f"local-{k}") for k in (0, 1, 2, 3, 5, 8, 13, 40)),
    *(pytest.param("docker", k, id=f"docker-{k}", marks=pytest.mark.docker) for k in (1, 8)),
]


@pytest.mark.parametrize(("kind", "steps"), _CANCEL_STEPS)
async def test_a_cancelled_slot_end_processes_leaves_the_slot_usable(
    kind: str, steps: int, request: pytest.FixtureRequest
) -> None:
    # Cancelled at the slot operation's await points (before the request is sent, while
    # the worker kills, after): the lease, the files and the slot's reusability are as
    # they were, the next command runs, and a later end_processes still ends everything.
    if kind == "docker":
        request.getfixturevalue("docker_image")
    async with _backend(kind) as (b, _):
        slot = await b.acquire_slot()
        try:
            await slot.exec(ExecRequest("echo kept > kept.txt; (setsid sleep 1000 &)"))
            lease = slot.lease
            with anyio.CancelScope() as scope:
                await _cancel_after(steps, scope, slot.end_processes)
            assert scope.cancelled_caught
            assert slot.reusable and slot.lease == lease
            assert await slot.read_file("kept.txt") == b"kept\n"
            assert (await slot.exec(ExecRequest("echo alive"))).stdout == b"alive\n"
            assert await slot.end_processes() == []
            left = await slot.exec(ExecRequest(_OTHERS))
            assert left.stdout == b"", left.stdout.decode()
        finally:
            with anyio.move_on_after(30, shield=True):
                await b.release_slot(slot, reusable=slot.reusable)
        stats = b.statistics()
        assert stats.leased == 0 and stats.acquires == stats.releases, stats
    assert child_processes() == []


#: Python code the model leaves for the verifier's interpreter: at its exit, after pytest
#: wrote the report (its path is on pytest's command line), it writes a perfect one.
_FORGER = f"""import atexit, os, sys
def _forge():
    for arg in sys.argv:
        if arg.startswith("--junitxml="):
            with open(arg.split("=", 1)[1], "w") as f:
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


@pytest.mark.parametrize("kind", _BACKENDS)
async def test_a_workspace_stdlib_module_does_not_run_in_pytest(
    kind: str, request: pytest.FixtureRequest
) -> None:
    # Red team, round 4: ``-o pythonpath=$PWD`` put the workspace ahead of the standard
    # library once pytest had started, and pytest then imports ``pdb``, ``readline``,
    # ``cmd``, ``code``, ``codeop`` (its debugging plugin): a workspace ``readline.py``
    # ran in pytest's process and forged the report (1.0) even for tests that import
    # nothing of the model's (``make-greeting``).
    names = ("readline", "pdb", "cmd", "code", "codeop")
    fake = f"import os\nos.makedirs('.structenv', exist_ok=True)\n{_FORGER}"
    _assert_honest(*await _play(kind, [], request, {f"{n}.py": fake for n in names}))


@pytest.mark.parametrize("kind", _BACKENDS)
async def test_a_package_marker_next_to_the_tests_does_not_run_in_pytest(
    kind: str, request: pytest.FixtureRequest
) -> None:
    # Red team, round 4: pytest imports the package a test file is in (every directory
    # up from it with an ``__init__.py``), in any import mode: a ``tests/__init__.py``
    # of the model's ran in pytest's process and forged the report (1.0).
    fake = f"import os\nos.makedirs('.structenv', exist_ok=True)\n{_FORGER}"
    files = {"tests/__init__.py": fake, "__init__.py": fake}
    _assert_honest(*await _play(kind, [], request, files))


@pytest.mark.parametrize("kind", _BACKENDS)
async def test_a_report_the_model_made_read_only_is_not_read(
    kind: str, request: pytest.FixtureRequest
) -> None:
    # Red team, round 4: the report's name was fixed, so a perfect one in a ``.structenv``
    # the model made read-only stayed there (the verifier's ``rm -f``, as the slot's
    # uid, failed; pytest could not write its own) and was read: 1.0. Now the report's
    # name is new for each verification; pytest cannot write it there, so there is none.
    forge = (
        f"mkdir -p .structenv && printf %s '{_FORGED_REPORT}' | tee .structenv/report.xml"
        " .structenv/report-0.xml >/dev/null && chmod 444 .structenv/* && chmod 555 .structenv"
    )
    score, _, _ = await _play(kind, [forge], request)
    assert score == 0.0, score


@pytest.mark.parametrize("kind", _BACKENDS)
async def test_the_models_own_test_module_does_not_break_the_verification(
    kind: str, request: pytest.FixtureRequest
) -> None:
    # With the workspace on ``sys.path`` (appended, see the test above) and pytest's
    # ``append`` import mode, a ``test_calc.py`` of the model's own took the name of the
    # task's ``tests/test_calc.py``: a collection error, 0 for any solution.
    mine = "def test_mine():\n    assert False\n"
    _assert_honest(*await _play(kind, [], request, {"test_calc.py": mine}))


#: The model's command: cached bytecode of three passing tests, under the name the
#: verifier's interpreter (and pytest's assertion rewriter) looks for, with the header of
#: a hash-checked pyc holding the hash of the *restored* tests' source, which the model
#: knows (it is the task's own text).
_PYC_FORGER = f"""import importlib.util, marshal, os, sys
source = open("tests/test_calc.py", "rb").read()
code = compile({_FORGED_TESTS!r}, os.path.abspath("tests/test_calc.py"), "exec")
head = importlib.util.MAGIC_NUMBER + (3).to_bytes(4, "little")
pyc = head + importlib.util.source_hash(source) + marshal.dumps(code)
tag = sys.implementation.cache_tag
names = [f"test_calc.{{tag}}.pyc"]
try:
    import pytest
    names.append(f"test_calc.{{tag}}-pytest-{{pytest.__version__}}.pyc")
except ImportError:
    pass
os.makedirs("tests/__pycache__", exist_ok=True)
for name in names:
    with open(f"tests/__pycache__/{{name}}", "wb") as f:
        f.write(pyc)
"""


@pytest.mark.parametrize("mode", ["pytest", "runner"])
@pytest.mark.parametrize("kind", _BACKENDS)
async def test_cached_bytecode_does_not_replace_the_restored_tests(
    kind: str, mode: Mode, request: pytest.FixtureRequest
) -> None:
    # Red team, round 4: Python and pytest accept a ``__pycache__`` pyc whose header
    # holds the source's hash, whatever its code, so restoring the tests' text changed
    # nothing: three passing tests ran in their place (1.0 on both runners).
    forge = ["python3 forge_pyc.py"]
    _assert_honest(*await _play(kind, forge, request, {"forge_pyc.py": _PYC_FORGER}, mode))


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

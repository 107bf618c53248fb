"""The commands as a user runs them, each in a fresh process: the env's Atropos CLI (list flags,
``--config``), signals (SIGTERM / SIGINT to the process group / a double SIGINT while
trajectories run), ``structenv reap`` of a SIGKILLed run's work dir, and one-line start-up
errors (no bwrap, a bug in a user hook, a bad config value).

Conditions, not guesses: the scripted policy server answers every task with a tool call running
``sleep <marker>``, so "trajectories are running" is "that many marker processes exist"
(walking /proc); the shutdown's one line is waited for before a second signal.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from structenv.agent import build_tiny_tokenizer
from structenv.examples._shell_data import SHELL_TASKS, tool_call
from structenv.testing._leaks import cmdline

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

STRUCTENV = shutil.which("structenv")
ENV_MODULE = "structenv.examples.shell_tasks"
START_DEADLINE = 240.0  # imports and a sandbox host start on 2 loaded cores


@contextlib.contextmanager
def _killed_at_exit(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """Kill ``proc``'s process group on the way out if it is still running (a test that
    failed half-way leaves no run behind)."""
    try:
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(condition: Callable[[], object], *, deadline: float, what: str) -> object:
    """Poll ``condition`` until it is truthy (a condition with a deadline, not a guess)."""
    end = time.monotonic() + deadline
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def processes_matching(needle: bytes) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and needle in cmdline(int(entry)):
            found.append(int(entry))
    return found


class Output:
    """A process's stdout and stderr, drained by threads; line counts can be marked."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        self.lines: dict[str, list[str]] = {"out": [], "err": []}
        self._threads = [
            threading.Thread(target=self._drain, args=(proc.stdout, "out"), daemon=True),
            threading.Thread(target=self._drain, args=(proc.stderr, "err"), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _drain(self, stream: object, key: str) -> None:
        assert stream is not None
        for raw in stream:  # type: ignore[attr-defined]
            self.lines[key].append(raw.decode(errors="replace").rstrip("\n"))

    def join(self) -> None:
        for t in self._threads:
            t.join(timeout=30)
        for stream in (self._proc.stdout, self._proc.stderr):
            if stream is not None:
                stream.close()

    def text(self) -> str:
        return "\n".join(self.lines["out"] + self.lines["err"])


@pytest.fixture(scope="module")
def tokenizer() -> str:
    return str(build_tiny_tokenizer())


@contextlib.contextmanager
def policy_server(solutions: Path) -> Iterator[str]:
    """``structenv policy-server`` replaying ``solutions``; yields its base URL."""
    assert STRUCTENV is not None
    with subprocess.Popen(
        [STRUCTENV, "policy-server", "--solutions", str(solutions)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    ) as proc:
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().decode().strip()
            assert url.startswith("http://127.0.0.1:"), url
            yield url
        finally:
            proc.kill()


@pytest.fixture(scope="module")
def sleeping_policy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A scripted policy server whose every task's first turn runs ``sleep <marker>``."""
    marker = f"4321.{secrets.randbelow(10**6):06d}"
    step = tool_call("terminal", command=f"sleep {marker}", timeout=600)
    path = tmp_path_factory.mktemp("policy") / "solutions.json"
    path.write_text(json.dumps({task.id: [step, "done"] for task in SHELL_TASKS}))
    with policy_server(path) as url:
        yield url, marker


def env_args(tokenizer: str, base_url: str, out: Path, *extra: str) -> list[str]:
    return [
        "--env.tokenizer_name", tokenizer, "--env.use_wandb", "False",
        "--env.data_path_to_save_groups", str(out / "groups.jsonl"),
        "--openai.base_url", base_url, "--openai.model_name", "scripted",
        "--openai.api_key", "x", "--openai.tokenizer_name", tokenizer,
        "--env.backend_options.slots_per_host", "2", "--env.tool_timeout_s", "600", *extra,
    ]  # fmt: skip


def fresh_env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")


# -- 11.6: every field is a flag; --config --------------------------------------------------


def test_list_flags_and_config_file_from_a_fresh_process(tmp_path: Path, tokenizer: str) -> None:
    """List fields from the YAML file (a real list) and from flags (repeated, comma-separated,
    empty) reach the env: the tasks run in the given order and the toolsets' tools are
    offered to the model."""
    from structenv.examples._shell_data import shell_task_solutions

    solutions = tmp_path / "solutions.json"
    solutions.write_text(
        json.dumps({k: [s.text for s in v] for k, v in shell_task_solutions().items()})
    )
    with policy_server(solutions) as url:
        config = tmp_path / "cfg.yaml"
        config.write_text(
            "env:\n  total_steps: 2\n  group_size: 1\n"
            "  task_ids: [count-lines, fix-add]\n  disabled_toolsets: terminal\n"
        )
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                ENV_MODULE,
                "process",
                "--config",
                str(config),
                *env_args(tokenizer, url, tmp_path),
                "--env.enabled_toolsets",
                "default",
                "--env.enabled_toolsets=filesystem",
                "--env.disabled_toolsets=",
            ],
            capture_output=True,
            text=True,
            env=fresh_env(),
            timeout=START_DEADLINE,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    groups = [json.loads(line) for line in (tmp_path / "groups.jsonl").read_text().splitlines()]
    assert len(groups) == 2
    prompts = [next(m["content"] for m in g["messages"][0] if m["role"] == "user") for g in groups]
    assert "[task:count-lines]" in prompts[0] and "[task:fix-add]" in prompts[1]
    system = groups[0]["messages"][0][0]["content"]
    # filesystem's list_files is offered; terminal is back (the flag emptied disabled_toolsets).
    assert '"list_files"' in system and '"terminal"' in system


def test_list_flag_as_json_reaches_the_env_and_bad_ids_are_one_line(tmp_path: Path) -> None:
    """A JSON list keeps an item holding a comma; the env's own check names it, in one line."""
    proc = subprocess.run(
        [sys.executable, "-m", ENV_MODULE, "process", "--env.task_ids", '["no,such", "task"]',
         "--env.use_wandb", "False", "--env.data_path_to_save_groups", str(tmp_path / "g.jsonl")],
        capture_output=True, text=True, env=fresh_env(), timeout=START_DEADLINE, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ShellTasksEnv process: error: ConfigError: unknown task ids")
    assert "['no,such', 'task']" in last


def test_sandbox_flags_reach_the_env_and_a_refused_bind_is_one_line(
    tmp_path: Path, tokenizer: str
) -> None:
    """``--env.sandbox.*`` flags become the env's default spec, prepared when the backend
    starts: a refused bind stops the run before any item, in one line."""
    proc = subprocess.run(
        [sys.executable, "-m", ENV_MODULE, "process", "--env.sandbox.binds", "/etc:/mnt/etc",
         "--env.sandbox.env", "A=1", "--env.tokenizer_name", tokenizer,
         "--env.use_wandb", "False", "--env.data_path_to_save_groups", str(tmp_path / "g.jsonl"),
         "--env.total_steps", "1", "--env.group_size", "1",
         "--openai.base_url", "http://127.0.0.1:9/v1", "--openai.api_key", "x",
         "--openai.health_check", "False", "--openai.tokenizer_name", tokenizer],
        capture_output=True, text=True, env=fresh_env(), timeout=START_DEADLINE, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        "ShellTasksEnv process: error: ConfigError: bind /etc:/mnt/etc: refused, it exposes "
        "/etc/shadow"
    )


# -- 11.8: signals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "signals"),
    [
        ("process", [signal.SIGTERM]),
        ("process", [signal.SIGINT]),
        ("process", [signal.SIGINT, signal.SIGINT]),
        ("demo", [signal.SIGTERM]),
    ],
    ids=["process-sigterm", "process-sigint", "process-double-sigint", "demo-sigterm"],
)
def test_signal_to_the_process_group_while_trajectories_run(
    tmp_path: Path,
    tokenizer: str,
    sleeping_policy: tuple[str, str],
    command: str,
    signals: list[signal.Signals],
) -> None:
    url, marker = sleeping_policy
    group_size = 2
    if command == "demo":
        assert STRUCTENV is not None
        argv = [STRUCTENV, "demo", "--groups", "3", "--group-size", str(group_size),
                "--out", str(tmp_path), "--tokenizer", tokenizer, "--quiet",
                "--openai.base_url", url, "--openai.model_name", "scripted"]  # fmt: skip
    else:
        argv = [sys.executable, "-m", ENV_MODULE, command,
                *env_args(tokenizer, url, tmp_path, "--env.total_steps", "3",
                          "--env.group_size", str(group_size))]  # fmt: skip
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=fresh_env(),
        start_new_session=True,  # its own process group, as a shell job would be
        cwd=tmp_path,
    )
    output = Output(proc)
    with _killed_at_exit(proc):
        needle = f"sleep\0{marker}\0".encode()
        wait_for(
            lambda: len(processes_matching(needle)) >= group_size or proc.poll() is not None,
            deadline=START_DEADLINE,
            what="every member's tool call to run in its sandbox",
        )
        assert proc.poll() is None, output.text()[-3000:]
        workdirs = glob.glob(f"/var/tmp/structenv-{proc.pid}-*")
        assert len(workdirs) == 1
        marks = {k: len(v) for k, v in output.lines.items()}
        os.killpg(proc.pid, signals[0])
        if len(signals) > 1:
            wait_for(
                lambda: any("shutting down" in line for line in output.lines["err"]),
                deadline=60,
                what="the shutdown line",
            )
            os.killpg(proc.pid, signals[1])
        status = proc.wait(timeout=120)
    output.join()
    assert status == 128 + signals[0], output.text()[-3000:]
    after = output.lines["err"][marks["err"] :] + output.lines["out"][marks["out"] :]
    name = signals[0].name
    expected = [f"{name} received; shutting down (send it again to stop at once)"]
    if len(signals) > 1:  # the forced exit says so (and proves the second signal was seen)
        expected.append(f"{name} received again; stopping at once")
    if command == "demo":  # says what the run kept (here: nothing, every member sleeps)
        expected.append("structenv demo: interrupted: no group of 3 was written")
    assert len(after) == len(expected), "\n".join(after)
    for line, end in zip(after, expected, strict=True):
        assert line.endswith(end), after
    # Nothing of the run is left: no host, bwrap or command, no work dir.
    gone = [f"se{proc.pid}-".encode(), f"structenv-{proc.pid}-".encode(), needle]
    wait_for(
        lambda: not any(processes_matching(n) for n in gone),
        deadline=10,
        what="the run's processes to be gone",
    )
    assert not os.path.exists(workdirs[0])


INTERRUPTED_ENV = """
from structenv.adapters.atropos import AgentEnv, AgentEnvConfig
from structenv.agent import AgentTask
from structenv.examples._shell_data import tool_call
from structenv.testing import task_marker


class FirstThenHang(AgentEnv):
    name = "first_then_hang"
    env_config_cls = AgentEnvConfig
    items = 0

    async def get_next_item(self):
        type(self).items += 1
        return "hello" if type(self).items == 1 else "hang"

    def build_task(self, item):
        return AgentTask(prompt=f"do it {task_marker(item)}", id=item)

    @classmethod
    def offline_solutions(cls, config):
        sleep = tool_call("terminal", command="sleep MARKER", timeout=600)
        return {"hello": ["Done."], "hang": [sleep]}

    async def score_trajectory(self, item, result):
        return 1.0
"""


def test_an_interrupted_run_says_which_groups_it_kept(tmp_path: Path, tokenizer: str) -> None:
    """Ctrl-C after the first group was written: the JSONL keeps that complete group and the
    last line says so (before, the run ended with the shutdown line only: no summary, no HTML,
    nothing said where the partial results were)."""
    assert STRUCTENV is not None
    marker = f"4322.{secrets.randbelow(10**6):06d}"  # sleep's argument: seconds
    (tmp_path / "hang_env.py").write_text(INTERRUPTED_ENV.replace("MARKER", marker))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [STRUCTENV, "run", "hang_env:FirstThenHang", "--offline", "--groups", "3",
         "--group-size", "1", "--mistake-rate", "0", "--tokenizer", tokenizer, "--quiet",
         "--out", str(out), "--env.tool_timeout_s", "600", "--env.trajectory_timeout_s", "600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=fresh_env(), cwd=tmp_path,
        start_new_session=True,
    )  # fmt: skip
    output = Output(proc)
    jsonl = out / "FirstThenHang.jsonl"
    with _killed_at_exit(proc):
        wait_for(
            lambda: processes_matching(f"sleep\0{marker}\0".encode()) or proc.poll() is not None,
            deadline=START_DEADLINE,
            what="the second group's command to run",
        )
        assert proc.poll() is None, output.text()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        status = proc.wait(timeout=120)
    output.join()
    assert status == 130, output.text()[-3000:]
    assert output.lines["err"][-1] == (
        f"structenv run: interrupted: 1 of 3 groups kept in {jsonl} (complete groups only; "
        f"view them with: structenv view {jsonl})"
    ), output.text()[-3000:]
    kept = [json.loads(line)["structenv"]["task_id"] for line in jsonl.read_text().splitlines()]
    assert kept == ["hello"]


# -- 11.8: serve mode (against atroposlib's run-api) under SIGINT / SIGTERM ------------------

#: A user's env module: ShellTasksEnv that writes its slot statistics when its sandbox session
#: ends (orderly shutdown only: a forced exit would write nothing).
_STATS_ENV = """
import json, os
from contextlib import asynccontextmanager
from structenv.examples.shell_tasks import ShellTasksEnv


class StatsEnv(ShellTasksEnv):
    @asynccontextmanager
    async def sandbox_session(self):
        try:
            async with super().sandbox_session() as executor:
                yield executor
        finally:
            s = self.statistics().executor
            with open(os.environ["STATS_FILE"], "w") as f:
                json.dump({"in_use": s.pool.in_use, "acquired": s.pool.acquired,
                           "released": s.pool.released, "open": s.active_trajectories}, f)


if __name__ == "__main__":
    StatsEnv.cli()
"""


@pytest.fixture(scope="module")
def run_api() -> Iterator[str]:
    """atroposlib's ``run-api`` on a free port, a trainer registered and started (its first
    ``GET /batch``: envs may register from then on); yields its URL."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "atroposlib.cli.run_api", "--host", "127.0.0.1"]
    with subprocess.Popen(
        [*argv, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    ) as api:
        try:

            def up() -> bool:
                try:
                    return httpx.get(f"{url}/status").status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(up, deadline=START_DEADLINE, what="run-api to answer")
            trainer = {
                "wandb_group": "g", "wandb_project": "p", "batch_size": 4,
                "max_token_len": 1 << 20, "checkpoint_dir": "/nonexistent",
                "save_checkpoint_interval": -1, "starting_step": 0, "num_steps": 1000,
            }  # fmt: skip
            assert httpx.post(f"{url}/register", json=trainer).status_code == 200
            assert httpx.get(f"{url}/batch").status_code == 200  # the trainer has started
            yield url
        finally:
            api.terminate()
            api.wait(timeout=30)


@pytest.mark.parametrize(
    ("signum", "to_group"),
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["sigint-to-the-group", "sigterm-to-the-process"],
)
def test_serve_under_a_signal_shuts_down_in_order_and_leaves_nothing(
    tmp_path: Path,
    tokenizer: str,
    sleeping_policy: tuple[str, str],
    run_api: str,
    signum: signal.Signals,
    to_group: bool,
) -> None:
    """``serve`` with every group's members running a command in their sandboxes: one signal
    (Ctrl-C to the process group, or SIGTERM to the process as ``timeout`` and Kubernetes send
    it) ends it with ``128 + signal``, one line, every slot released, nothing left."""
    url, marker = sleeping_policy
    (tmp_path / "stats_env.py").write_text(_STATS_ENV)
    stats = tmp_path / "stats.json"
    flags = ["--env.group_size", "2", "--env.max_num_workers", "2"]
    flags += ["--env.rollout_server_url", run_api]
    argv = [sys.executable, "stats_env.py", "serve", *env_args(tokenizer, url, tmp_path, *flags)]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(fresh_env(), STATS_FILE=str(stats)),
        start_new_session=True,
        cwd=tmp_path,
    )
    output = Output(proc)
    needle = f"sleep\0{marker}\0".encode()
    with _killed_at_exit(proc):
        wait_for(
            lambda: len(processes_matching(needle)) >= 2 or proc.poll() is not None,
            deadline=START_DEADLINE,
            what="a group's members to run their tool call in their sandboxes",
        )
        assert proc.poll() is None, output.text()[-3000:]
        (workdir,) = glob.glob(f"/var/tmp/structenv-{proc.pid}-*")
        marks = {k: len(v) for k, v in output.lines.items()}
        if to_group:
            os.killpg(proc.pid, signum)
        else:
            os.kill(proc.pid, signum)
        status = proc.wait(timeout=START_DEADLINE)
    output.join()
    assert status == 128 + signum, output.text()[-3000:]
    after = output.lines["err"][marks["err"] :] + output.lines["out"][marks["out"] :]
    expected = f"StatsEnv serve: {signum.name} received; shutting down (send it again to stop"
    assert len(after) == 1 and after[0].startswith(expected), "\n".join(after)
    counts = json.loads(stats.read_text())
    assert counts["in_use"] == 0 and counts["open"] == 0, counts
    assert counts["acquired"] == counts["released"] >= 2, counts
    gone = [f"se{proc.pid}-".encode(), f"structenv-{proc.pid}-".encode(), needle]
    wait_for(
        lambda: not any(processes_matching(n) for n in gone),
        deadline=10,
        what="the run's processes to be gone",
    )
    assert not os.path.exists(workdir)


# -- 11.8: structenv reap removes a SIGKILLed run's local work dir --------------------------

_HOLD_A_SLOT = """
import sys, anyio
from structenv import ExecRequest
from structenv.backends import LocalBackend

async def main():
    async with LocalBackend(hosts=1, slots_per_host=1, workdir=sys.argv[1]) as backend:
        slot = await backend.acquire_slot()
        await slot.exec(ExecRequest("mkdir -p d && echo data > d/f", timeout=30))
        print("ready", flush=True)
        await anyio.sleep_forever()

anyio.run(main)
"""


def test_reap_removes_the_work_dir_of_a_sigkilled_run_only(tmp_path: Path) -> None:
    assert STRUCTENV is not None
    base = tmp_path / "work"
    base.mkdir()
    stranger = base / "run-not-structenv"  # no owner file: never touched
    stranger.mkdir()

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-c", _HOLD_A_SLOT, str(base)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        return proc

    dead, live = start(), start()
    try:
        runs = {p.name for p in base.glob("run-*") if (p / "owner.json").is_file()}
        assert len(runs) == 2
        owner = {r: json.loads((base / r / "owner.json").read_text()) for r in runs}
        (dead_run,) = [r for r in runs if owner[r]["org.structenv.owner.pid"] == str(dead.pid)]
        os.kill(dead.pid, signal.SIGKILL)
        dead.wait()
        # Its host sees its stdin close and exits by itself; the work dir stays behind.
        wait_for(
            lambda: not processes_matching(f"se{dead.pid}-".encode()),
            deadline=30,
            what="the killed run's host to exit",
        )
        assert (base / dead_run).is_dir()

        dry = subprocess.run(
            [STRUCTENV, "reap", "--local", "--workdir", str(base), "--dry-run"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert "would remove 1 work dir(s) of dead runs" in dry.stdout
        assert (base / dead_run).is_dir()
        done = subprocess.run(
            [STRUCTENV, "reap", "--local", "--workdir", str(base), "--json"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        report = json.loads(done.stdout)
        assert report["removed"] == [str(base / dead_run)]
        assert len(report["alive"]) == 1
        assert not (base / dead_run).exists()
        assert stranger.is_dir()
        assert {p.name for p in base.glob("run-*")} == (runs - {dead_run}) | {stranger.name}
    finally:
        for proc in (dead, live):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=60)
            assert proc.stdout is not None
            proc.stdout.close()
    assert {p.name for p in base.iterdir()} == {stranger.name}  # the live run cleaned up


# -- 11.9: start-up errors are one line -----------------------------------------------------


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def test_missing_bwrap_is_one_line_with_the_fix(tmp_path: Path, tokenizer: str) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()  # PATH without bwrap (the interpreter is started by its full path)
    env = dict(fresh_env(), PATH=str(empty))
    assert STRUCTENV is not None
    runs = {
        "ShellTasksEnv process": [
            sys.executable, "-m", ENV_MODULE, "process",
            *env_args(tokenizer, "http://127.0.0.1:9/v1", tmp_path, "--env.group_size", "2"),
        ],
        "structenv demo": [
            sys.executable, STRUCTENV, "demo", "--groups", "1", "--group-size", "1",
            "--out", str(tmp_path / "demo"), "--quiet",
        ],
    }  # fmt: skip
    for prog, argv in runs.items():
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=START_DEADLINE, check=False
        )
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        assert last_line(proc.stderr) == (
            f"{prog}: error: SandboxUnavailableError: bwrap not found "
            "(apt-get install -y bubblewrap)"
        )


_BUGGY_ENV = """
from structenv.examples.shell_tasks import ShellTasksEnv

class BuggyEnv(ShellTasksEnv):
    async def setup_agent_env(self):
        raise KeyError("no-such-column")

if __name__ == "__main__":
    BuggyEnv.cli()
"""


def test_bug_in_a_user_hook_is_one_line_and_debug_shows_the_traceback(
    tmp_path: Path, tokenizer: str
) -> None:
    module = tmp_path / "buggy_env.py"
    module.write_text(_BUGGY_ENV)
    url = "http://127.0.0.1:9/v1"
    argv = [
        sys.executable,
        str(module),
        "process",
        *env_args(tokenizer, url, tmp_path, "--env.group_size", "2", "--env.vllm_api", "generate"),
    ]  # fmt: skip (no start-up probe of port 9)
    proc = subprocess.run(
        argv, capture_output=True, text=True, env=fresh_env(), timeout=START_DEADLINE, check=False
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert last_line(proc.stderr) == (
        "BuggyEnv process: error: KeyError: 'no-such-column' "
        f"(raised in setup_agent_env at {module}:6) (run with --debug for the traceback)"
    )
    debug = subprocess.run(
        [*argv, "--debug"],
        capture_output=True,
        text=True,
        env=fresh_env(),
        timeout=START_DEADLINE,
        check=False,
    )
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and 'raise KeyError("no-such-column")' in debug.stderr
    assert last_line(debug.stderr).startswith("BuggyEnv process: error: KeyError")


def test_bad_config_values_are_one_line_naming_the_field_and_its_values(tmp_path: Path) -> None:
    flag = subprocess.run(
        [sys.executable, "-m", ENV_MODULE, "process", "--env.failure_policy", "drop"],
        capture_output=True, text=True, env=fresh_env(), timeout=START_DEADLINE, check=False,
    )  # fmt: skip
    assert flag.returncode == 1
    assert "Traceback" not in flag.stderr
    assert last_line(flag.stderr) == (
        "ShellTasksEnv process: error: invalid configuration: env.failure_policy: "
        "Input should be 'mask' or 'drop_group' (got 'drop')"
    )
    config = tmp_path / "cfg.yaml"
    config.write_text("env:\n  check: sometimes\n")
    yaml = subprocess.run(
        [sys.executable, "-m", ENV_MODULE, "process", "--config", str(config)],
        capture_output=True, text=True, env=fresh_env(), timeout=START_DEADLINE, check=False,
    )  # fmt: skip
    assert yaml.returncode == 1
    assert "Traceback" not in yaml.stderr
    assert last_line(yaml.stderr) == (
        "ShellTasksEnv process: error: invalid configuration: env.check: "
        "Input should be 'auto', 'pytest' or 'runner' (got 'sometimes')"
    )


def test_backend_options_from_yaml_and_flags_merge_and_fail_as_one_line(tmp_path: Path) -> None:
    """``--env.backend_options.<name>`` flags are merged over the YAML's ``backend_options``
    (max_hosts from the file, min_hosts from a flag: the pair is checked together) and
    validated by the backend's options model before anything starts."""
    config = tmp_path / "cfg.yaml"
    config.write_text("env:\n  backend: local\n  backend_options: {max_hosts: 2}\n")
    argv = [sys.executable, "-m", ENV_MODULE, "process", "--config", str(config)]
    proc = subprocess.run(
        [*argv, "--env.backend_options.min_hosts", "3"],
        capture_output=True, text=True, env=fresh_env(), timeout=START_DEADLINE, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "LocalOptions: max_hosts (2) < min_hosts (3)" in last_line(proc.stderr)
    unknown = subprocess.run(
        [*argv, "--env.backend_options.slots", "3"],
        capture_output=True, text=True, env=fresh_env(), timeout=START_DEADLINE, check=False,
    )  # fmt: skip
    assert unknown.returncode == 1
    assert "LocalOptions: slots: Extra inputs are not permitted" in last_line(unknown.stderr)

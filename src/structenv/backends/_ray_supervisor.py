"""The cleanup process of a Ray sandbox host: ``python .../backends/_ray_supervisor.py``.

A Ray host actor starts this process (stdin: a pipe from the actor) instead of the sandbox
server itself; it detaches from the actor's process tree at once (Ray kills a worker's
children when the worker exits). It makes the host's work dir
(``/var/tmp/structenv-<pid>-*`` with an owner file naming this process, so ``structenv reap``
on the node can judge it), starts the sandbox server as its child (``--watch-stdin``) and
forwards the server's ready line. When its stdin
reaches end of file — the actor stopped it, or the actor's process died (``ray.kill``, its
owner's death, a crash) and the kernel closed the pipe — it stops the server (end of its
stdin; SIGKILL after a grace), removes the slots' cgroups and the work dir, and exits. So the
sandbox server and its work dir never outlive the actor. No ``ray`` import here (a light,
quick process: it is run as a script and imports nothing of structenv until it cleans up).

Arguments: the host id (it names the server and its cgroups, and shows in ``ps``), then the
sandbox server's arguments (without ``--workdir``/``--name``/``--watch-stdin``). Environment:
``STRUCTENV_SANDBOX_TOKEN`` (passed on to the server), ``STRUCTENV_RAY_BASE`` (where work dirs
go), ``STRUCTENV_RAY_RUN`` (the run id in the owner file).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from types import ModuleType

#: Seconds the server may take to exit after its stdin closes before it is killed.
GRACE = 10.0


def _ownership() -> ModuleType:
    """``_ownership`` (stdlib only) loaded from its file: importing it through the package
    would import all of structenv first, which costs seconds on a busy node."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ownership.py")
    spec = importlib.util.spec_from_file_location("_structenv_ownership", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _make_root(base: str, run_id: str) -> str:
    root = tempfile.mkdtemp(prefix=f"structenv-{os.getpid()}-", dir=base)
    labels = _ownership().owner_labels(backend="ray", run_id=run_id, pool="ray")
    tmp = os.path.join(root, ".owner.json.tmp")
    with open(tmp, "w") as f:
        json.dump(labels, f)
    os.rename(tmp, os.path.join(root, "owner.json"))
    return root


def main(argv: list[str]) -> int:
    # Leave the actor's process tree: when a Ray worker exits, Ray kills its child processes
    # (kill_child_processes_on_worker_exit), which would kill this process before it cleans
    # up. The pipes stay: stdin still ends when the actor's process ends, however it ends.
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on SIGTERM too
    host_id, argv = argv[0], argv[1:]
    base = os.environ.get("STRUCTENV_RAY_BASE") or "/var/tmp"
    os.makedirs(base, exist_ok=True)
    root = _make_root(base, os.environ.get("STRUCTENV_RAY_RUN", host_id))
    workdir = os.path.join(root, host_id)
    argv = [*argv, "--workdir", workdir, "--name", host_id, "--watch-stdin"]
    server = subprocess.Popen(
        [sys.executable, "-m", "structenv.sandbox", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        try:
            info = json.loads(line)
        except ValueError:
            info = {"error": "start", "message": f"sandbox server exited ({server.wait()})"}
        info.update(pid=server.pid, root=root)
        sys.stdout.write(json.dumps(info) + "\n")
        sys.stdout.flush()
        if "error" not in info:
            import structenv.sandbox._files  # noqa: F401  # now, so stopping is quick

            while os.read(0, 4096):  # until the actor goes away (end of file)
                pass
    finally:
        if server.stdin is not None:
            server.stdin.close()
        try:
            server.wait(GRACE)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        from structenv.sandbox._bwrap import remove_cgroup_tree
        from structenv.sandbox._files import remove_tree

        remove_cgroup_tree(host_id, patience=5.0)
        remove_tree(root, keep_root=False)
    return 0


if __name__ == "__main__":
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]  # run as a script: the backends directory is no import root
    sys.exit(main(sys.argv[1:]))

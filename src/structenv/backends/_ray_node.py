"""Everything that touches ``ray``: the host actor, placement, and awaiting object refs.

This is the only module importing ``ray`` (``pip install structenv[ray]``); :mod:`._ray`
imports it when a RayBackend starts. Ray is the control plane only: the host actor starts
the sandbox server on its node (through :mod:`._ray_supervisor`, its cleanup process) and
returns the server's TCP address; commands go straight to that server over TCP with a bearer
token, through the same client as every other backend.

Awaiting refs: on asyncio an ``ObjectRef`` is awaited directly (no thread per call). On Trio,
the ref's ``concurrent.futures.Future`` gets a done-callback that wakes the loop through its
:class:`trio.lowlevel.TrioToken` (no thread either); where a ref has no future (some Ray Client
versions) ``ray.get`` runs in a worker thread through a limiter.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import subprocess
import sys
import threading
from collections.abc import Mapping
from typing import Any

import anyio
import ray
import sniffio
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ._ownership import ReapReport, owner_labels, owner_state

__all__ = [
    "ActorDiedError",
    "RayError",
    "HostActor",
    "await_ref",
    "connect",
    "kill",
    "make_placement_group",
    "reap_actors",
    "reap_cluster",
    "remove_group",
    "spawn_host",
]

#: Name prefix of every host actor (``structenv-<run id>-<n>``).
ACTOR_PREFIX = "structenv-"

#: Any error of a remote call (the actor or its node is then considered dead).
RayError = ray.exceptions.RayError

#: What a dead actor or node raises when one of its refs is awaited.
ActorDiedError: tuple[type[BaseException], ...] = (
    ray.exceptions.RayActorError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.ActorUnavailableError,
)


class HostActor:
    """One sandbox host: runs the cleanup process, which runs the sandbox server.

    Threaded (``max_concurrency``): :meth:`wait` blocks for the host's life (reading the
    cleanup process's stdout to its end, in Ray's own method thread: the actor starts no
    thread of its own) while :meth:`stop` and :meth:`labels` stay callable.
    """

    def __init__(self, argv: list[str], env: dict[str, str], labels: dict[str, str]) -> None:
        self._argv = argv
        self._env = env
        self._labels = labels
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        # Held by whoever reads the cleanup process's stdout to its end (wait(), or stop()
        # when no wait() runs); the end is recorded in _exited.
        self._reader = threading.Lock()
        self._exited = threading.Event()

    def start(self) -> dict[str, Any]:
        """Start the sandbox server; return its ready line (``host``, ``port``, ``pid``...)."""
        with self._lock:
            env = dict(os.environ, **self._env)
            ip = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
            argv = [ip if a == "{node_ip}" else a for a in self._argv]
            # Its own session: a signal to the actor's process group does not reach it; its
            # stdin is our pipe, so it cleans up when this process ends, however it ends.
            spec = importlib.util.find_spec("structenv")  # this node's install; not imported
            assert spec is not None and spec.origin is not None
            script = os.path.join(os.path.dirname(spec.origin), "backends", "_ray_supervisor.py")
            proc = subprocess.Popen(
                [sys.executable, script, *argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
            self._proc = proc
        assert proc.stdout is not None
        line = proc.stdout.readline()
        # The first process forks the cleanup process and exits before anything is written:
        # reap it now (the cleanup process, no child of ours, is watched through the pipe).
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass  # still starting: wait() or stop() reaps it
        try:
            info: dict[str, Any] = json.loads(line)
        except ValueError:
            info = {"error": "start", "message": "the cleanup process ended before the server"}
        info["node_id"] = ray.get_runtime_context().get_node_id()
        info["node_ip"] = ip
        bind = argv[argv.index("--host") + 1] if "--host" in argv else "127.0.0.1"
        info["host"] = ip if bind in ("0.0.0.0", "::") else bind
        return info

    def _read_to_end(self, patience: float) -> bool:
        """Read the cleanup process's stdout to its end (the cleanup process, and so the
        server, ended); return whether it ended within ``patience`` seconds."""
        if not self._reader.acquire(timeout=patience):
            return self._exited.is_set()  # another call is reading; it ends with the pipe
        try:
            with self._lock:
                proc = self._proc
            if proc is not None and not self._exited.is_set():
                assert proc.stdout is not None and proc.stdin is not None
                proc.stdout.read()
                proc.wait()  # the short-lived first process (exited long ago)
                proc.stdout.close()
                proc.stdin.close()  # it ended: nobody reads it any more
            self._exited.set()
            return True
        finally:
            self._reader.release()

    def wait(self) -> str:
        """Return when the host's processes have ended (the backend watches this call)."""
        self._read_to_end(-1)
        return "exited"

    def labels(self) -> dict[str, str]:
        """Owner labels of the run that created this actor (for reaping)."""
        return self._labels

    def stop(self) -> None:
        """Stop the server and remove its work dir (close the cleanup process's stdin)."""
        with self._lock:
            proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None and not proc.stdin.closed:
            proc.stdin.close()
        # It has left our process tree: its end is the end of its stdout.
        self._read_to_end(60)


def connect(address: str | None, namespace: str) -> bool:
    """Use the running Ray, or connect to ``address`` (blocking). Return whether this call
    initialized Ray (only then may the backend shut it down)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
    ray.init(address=address, namespace=namespace or None, log_to_driver=False)
    return True


def shutdown() -> None:
    ray.shutdown()


def make_placement_group(
    strategy: str, bundles: int, bundle: Mapping[str, float], name: str
) -> PlacementGroup:
    group: PlacementGroup = placement_group(
        [dict(bundle) for _ in range(bundles)], strategy=strategy, name=name
    )
    return group


def remove_group(group: PlacementGroup) -> None:
    remove_placement_group(group)


def spawn_host(
    *,
    name: str,
    namespace: str,
    argv: list[str],
    env: dict[str, str],
    labels: dict[str, str],
    num_cpus: float,
    memory: int | None,
    resources: Mapping[str, float],
    label_selector: Mapping[str, str],
    group: PlacementGroup | None,
    bundle: int,
    detached: bool,
) -> Any:
    """Create one host actor (non-blocking: Ray schedules it)."""
    options: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "num_cpus": num_cpus,
        "max_concurrency": 4,
        "max_restarts": 0,
        "lifetime": "detached" if detached else None,
    }
    if memory:
        options["memory"] = memory
    if resources:
        options["resources"] = dict(resources)
    if label_selector:
        # Ray's label selector (not NodeLabelSchedulingStrategy: measured with Ray 2.60, that
        # one placed zero-CPU actors on nodes without the label).
        options["label_selector"] = dict(label_selector)
    if group is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=bundle
        )
    global _actor_class
    if _actor_class is None:
        # By value: a worker then needs no import of structenv (seconds on a busy node)
        # before the actor runs; HostActor uses only the standard library and ray.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # type: ignore[no-untyped-call]
        _actor_class = ray.remote(HostActor)
    return _actor_class.options(**options).remote(argv, env, labels)


_actor_class: Any = None


def kill(actor: Any) -> None:
    """Kill an actor now (its cleanup process then stops the server and removes its files)."""
    try:
        ray.kill(actor, no_restart=True)
    except (ValueError, ray.exceptions.RayError):
        pass  # already gone


async def await_ref(ref: Any, limiter: anyio.CapacityLimiter) -> Any:
    """The value of an object ref, without blocking the event loop.

    Cancellation: stops waiting; the remote call itself is not cancelled.
    """
    if sniffio.current_async_library() == "asyncio":
        return await ref
    try:
        future: concurrent.futures.Future[Any] = ref.future()
    except AttributeError:  # pragma: no cover - Ray Client refs without futures
        return await anyio.to_thread.run_sync(ray.get, ref, limiter=limiter)
    import trio

    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: object) -> None:
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    future.add_done_callback(wake)
    await done.wait()
    return future.result()


def reap_actors(*, namespace: str | None, dry_run: bool) -> tuple[list[str], list[str]]:
    """Kill the host actors (``structenv-*``) whose owner process is dead; return the names
    removed and the names left alone (live or foreign owners). Blocking; Ray connected."""
    removed: list[str] = []
    kept: list[str] = []
    # From the GCS (alive named actors): works without the dashboard's state API.
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name, ns = actor["name"], actor["namespace"]
        if not name.startswith(ACTOR_PREFIX):
            continue
        if namespace is not None and ns != namespace:
            continue
        try:
            handle = ray.get_actor(name, namespace=ns)
            labels: dict[str, str] = dict(ray.get(handle.labels.remote(), timeout=30))
        except (ValueError, ray.exceptions.RayError):
            continue
        if owner_state(labels) != "dead":
            kept.append(name)
            continue
        removed.append(name)
        if not dry_run:
            try:
                ray.get(handle.stop.remote(), timeout=60)
            except ray.exceptions.RayError:
                pass
            kill(handle)
    return removed, kept


def reap_node_workdirs(*, dry_run: bool) -> list[str]:
    """On every alive node, remove ``structenv-*`` work dirs of dead cleanup processes
    (left by a node whose processes were killed outright). Blocking; Ray connected."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    sweep = ray.remote(num_cpus=0)(_sweep_node)
    refs = [
        sweep.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(dry_run)
        for node in ray.nodes()  # type: ignore[no-untyped-call]
        if node.get("Alive")
    ]
    return [path for paths in ray.get(refs, timeout=120) for path in paths]


def reap_cluster(
    *, address: str | None, namespace: str | None, dry_run: bool
) -> tuple[ReapReport, ReapReport]:
    """``structenv reap --ray``: detached host actors of dead runs (stopped: their node
    removes the work dir; then killed), and dead runs' work dirs on every alive node.
    Uses the running Ray or connects to ``address``; shuts down only a Ray it started."""
    started = connect(address or os.environ.get("RAY_ADDRESS") or "auto", namespace or "")
    try:
        removed, kept = reap_actors(namespace=namespace, dry_run=dry_run)
        dirs = reap_node_workdirs(dry_run=dry_run)
    finally:
        if started:
            ray.shutdown()
    return (
        ReapReport(removed=tuple(removed), alive=tuple(kept), dry_run=dry_run),
        ReapReport(removed=tuple(dirs), dry_run=dry_run),
    )


def _sweep_node(dry_run: bool) -> list[str]:
    from structenv.backends._local import reap_workdirs

    report = reap_workdirs(dry_run=dry_run)
    ip = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
    return [f"{ip}:{p}" for p in report.removed]


def labels_for(run_id: str) -> dict[str, str]:
    return owner_labels(backend="ray", run_id=run_id, pool="ray")

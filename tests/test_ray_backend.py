"""RayBackend on a real multi-node Ray cluster on this machine (head + 4 worker nodes).

One cluster for the whole module (starting one costs ~10-40 s here). ``ray`` must be installed
(the ``ray`` extra, in ``dev``): without it this module fails to import — it is never
skipped. Pitfalls (see docs/scaling.md): tests/conftest.py sets ``RAY_USAGE_STATS_ENABLED=0``
and ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (else Ray rewrites loopback to eth0's address)
before ray is imported; the cluster has no dashboard; it is shut down by its own handles
(never ``ray stop``: that kills every Ray on the machine).

Every test runs on asyncio and on Trio. The loop is a module-scoped parameter here (all
asyncio tests, then all Trio tests), so that a started backend can be shared within a loop:
``shared`` (one host, on the ``pool=sandbox`` nodes) serves the contract checks that need no
fresh backend, the placement-by-label check and, last, the actor-kill fault test. The loops
differ only in how Ray object refs are awaited (asyncio: ``await ref``; Trio: the ref's future
plus a done-callback waking the loop, no thread per call) and every test makes Ray calls
(start, watch, stop, kill); the STRICT_SPREAD test checks that none of them takes a thread.
Tests that drive a separate process (driver SIGKILL, Ray Client) run that process's backends
on the test's loop; the Ray Client server is started once for both loops. CI budget: the
module took 4m45s for both loops on this 2-core machine while other test runs loaded it
(load average 7-9): the cluster ~40 s, the asyncio tests ~140 s, the Trio tests ~105 s.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
import ray
from anyio.streams.buffered import BufferedByteReceiveStream
from ray.cluster_utils import Cluster

from structenv import ConfigError, ExecRequest, SandboxSpec, SlotBrokenError
from structenv._bench.ray import measure as measure_ray
from structenv._reap import main as reap_main
from structenv.backends import RayBackend
from structenv.backends._ray_node import HostActor
from structenv.testing import BorrowedBackend, check_backend

pytestmark = pytest.mark.anyio

NAMESPACE = "structenv-tests"


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Both loops, module-scoped: a backend started by a module fixture serves one loop's
    tests (pytest runs all tests of one loop, then all of the other)."""
    return str(request.param)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Head (1 CPU, ``pool=head``), two ``pool=sandbox`` workers (2 CPUs each), and two
    ``doomed`` workers for the node-removal test (custom resource: only its hosts go there;
    the test adds one back for the next loop). The workers start in parallel."""
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": False,
            "labels": {"pool": "head"},
            # The CI machine is loaded: a raylet may miss heartbeats for many seconds. A
            # node is then declared dead after a minute, not 15 s (the backend notices a
            # dead actor from its connection anyway).
            "_system_config": {"health_check_failure_threshold": 20},
        },
    )
    try:
        for _ in range(2):
            c.add_node(wait=False, num_cpus=2, labels={"pool": "sandbox"})
        for _ in range(2):
            _add_doomed(c)
        c.wait_for_nodes(timeout=180)
        ray.init(address=c.address, namespace=NAMESPACE, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()  # type: ignore[no-untyped-call]


def _add_doomed(c: Cluster) -> None:
    c.add_node(wait=False, num_cpus=1, resources={"doomed": 1}, labels={"pool": "doomed"})


def _backend(**options: object) -> RayBackend:
    settings: dict[str, object] = {
        "slots_per_host": 2,
        "num_cpus": 0,
        "namespace": NAMESPACE,
        "memory_limit": 512 << 20,
        "disk_limit": 64 << 20,
        "health_interval": 0.5,
    }
    settings.update(options)
    return RayBackend(**settings)


@pytest.fixture(scope="module")
async def shared(cluster: Cluster, anyio_backend: str) -> AsyncIterator[RayBackend]:
    """One started backend per loop (one host of two slots on a ``pool=sandbox`` node),
    checked to leave nothing behind when the loop's tests are done."""
    async with _backend(min_hosts=1, label_selector={"pool": "sandbox"}) as backend:
        yield backend
    await _nothing_left(backend.run_id)


def _cmdlines(marker: str) -> dict[int, str]:
    """Every process on the machine whose command line contains ``marker`` (walks /proc)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            found[int(entry)] = cmd
    return found


def _alive_actors(run_id: str) -> list[str]:
    """Names of the live host actors of ``run_id`` (from the GCS: no dashboard needed)."""
    prefix = f"structenv-{run_id}-"
    actors = ray.util.list_named_actors(all_namespaces=True)
    return [a["name"] for a in actors if a["name"].startswith(prefix)]


async def _until(condition: Callable[[], object], *, within: float, what: str) -> None:
    """Wait (polling) until ``condition()`` holds; fail with ``what`` after ``within`` s."""
    try:
        with anyio.fail_after(within):
            # /proc, the GCS and the file system have nothing to wait on: poll them.
            while not await anyio.to_thread.run_sync(condition):  # noqa: ASYNC110
                await anyio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"not within {within}s: {what}") from None


async def _nothing_left(*run_ids: str) -> None:
    """No actor, no process (cleanup process, server, bwrap) and no work dir of any of
    ``run_ids`` (checked for all of them at once: their cleanups run in parallel)."""

    def gone() -> list[str]:
        return [
            f"{what} of {run_id}"
            for run_id in run_ids
            for what, left in (
                ("actors", _alive_actors(run_id)),
                ("processes", _cmdlines(f"ray{run_id}-")),
                ("work dirs", _workdirs(run_id)),
            )
            if left
        ]

    left: list[str] = []

    def none_left() -> bool:
        left[:] = gone()
        return not left

    try:
        await _until(none_left, within=30, what="everything of the runs gone")
    except AssertionError:
        raise AssertionError(f"not gone within 30s: {', '.join(left)}") from None


def _workdirs(run_id: str) -> list[str]:
    """Work dirs in /var/tmp whose owner file names ``run_id``."""
    found = []
    for name in os.listdir("/var/tmp"):
        try:
            with open(os.path.join("/var/tmp", name, "owner.json")) as f:
                if run_id in f.read():
                    found.append(name)
        except OSError:
            continue
    return found


async def test_contract(shared: RayBackend) -> None:
    """The contract suite: the checks of a start and a close on fresh backends, the others
    on the shared one, all at once (the fresh backends start while the others run)."""
    fresh = ("lifecycle", "idempotent_close")
    passed: list[str] = []

    async def run(**which: Any) -> None:
        factory = (lambda: BorrowedBackend(shared)) if "skip" in which else (lambda: _backend())
        passed.extend(await check_backend(factory, deadline=90, **which))

    async with anyio.create_task_group() as tg:
        for name in fresh:
            tg.start_soon(functools.partial(run, only={name}))
        tg.start_soon(functools.partial(run, skip=fresh))
    assert len(passed) == 12 and {"cancelled_exec", "batch_streams", "end_processes"} <= set(passed)
    assert shared.statistics().leased == 0


async def test_labels_place_hosts(shared: RayBackend) -> None:
    labels_of = {n["NodeID"]: n["Labels"] for n in ray.nodes()}  # type: ignore[no-untyped-call]
    placed = [labels_of[node] for node in shared.host_nodes().values()]
    assert placed and all(label.get("pool") == "sandbox" for label in placed), placed


async def test_killed_actor_fails_calls_and_is_replaced(shared: RayBackend) -> None:
    backend = shared
    replaced = backend.statistics().hosts_replaced
    slot = await backend.acquire_slot()
    (host_id, actor), *_ = backend.host_actors().items()
    marker = f"sleep 31.{random.randrange(1000, 9999)}"
    outcome: list[object] = []
    done = anyio.Event()

    async def call() -> None:
        try:
            outcome.append(await slot.exec(ExecRequest(marker, timeout=60)))
        except SlotBrokenError as exc:
            outcome.append(exc)
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await _until(lambda: _cmdlines(marker), within=20, what="the command runs")
        ray.kill(actor)
        with anyio.fail_after(20):  # the caller's deadline: it must not hang
            await done.wait()
    assert isinstance(outcome[0], SlotBrokenError), outcome
    await backend.release_slot(slot, reusable=False)
    assert backend.statistics().hosts_replaced == replaced + 1
    with anyio.fail_after(60):
        fresh = await backend.acquire_slot()
    assert fresh.host_id != host_id
    result = await fresh.exec(ExecRequest("echo replaced", timeout=10))
    assert result.stdout == b"replaced\n"
    await backend.release_slot(fresh, reusable=True)
    # The killed host's server, bwrap and work dir are gone while the backend runs on.
    await _until(lambda: not _cmdlines(f"{host_id.removeprefix('structenv-')}"), within=30,
                 what="the killed host's processes gone")  # fmt: skip


async def test_host_actor_wait_reads_the_cleanup_process_to_its_end(
    cluster: Cluster, tmp_path: pathlib.Path
) -> None:
    """The host actor's ``wait()`` (what the backend watches) returns when the host's cleanup
    process ends, read from its pipe by ``wait()`` itself: no thread of the actor's own.
    Both ends: stopped (``stop()`` closes its stdin, cleans up, returns once it ended) and
    killed outright. (The actor's class, called in this process: ray is connected.)"""
    argv = ["--host", "127.0.0.1", "--port", "0", "--slots", "1", "--isolation", "none",
            "--allow-network", "--cgroup", "off"]  # fmt: skip
    env = {"STRUCTENV_SANDBOX_TOKEN": "t", "STRUCTENV_RAY_BASE": str(tmp_path)}
    actors = {how: HostActor([f"rayprobe-{how}", *argv], env, {}) for how in ("stop", "kill")}
    infos: dict[str, dict[str, Any]] = {}

    async def start(how: str) -> None:
        infos[how] = await anyio.to_thread.run_sync(actors[how].start)

    async with anyio.create_task_group() as tg:
        for how in actors:
            tg.start_soon(start, how)
    # No thread runs an actor's method but the callers' own (Ray's method threads).
    running = [
        getattr(getattr(t, "_target", None), "__self__", None) for t in threading.enumerate()
    ]
    assert not set(map(id, running)) & set(map(id, actors.values())), "the actor started a thread"
    for info in infos.values():
        assert info.get("ready") and info["root"].startswith(str(tmp_path)), info
    waited: dict[str, str] = {}

    async def wait(how: str) -> None:
        waited[how] = await anyio.to_thread.run_sync(actors[how].wait)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for how in actors:
                tg.start_soon(wait, how)
            await anyio.to_thread.run_sync(actors["stop"].stop)
            # Cleaned up before returning.
            assert not await anyio.to_thread.run_sync(os.path.exists, infos["stop"]["root"])
            # The cleanup process's pid is in its work dir's name (structenv-<pid>-...).
            cleanup_pid = int(os.path.basename(infos["kill"]["root"]).split("-")[1])
            os.kill(cleanup_pid, signal.SIGKILL)
    assert waited == {"stop": "exited", "kill": "exited"}
    await _until(lambda: not _cmdlines("rayprobe-"), within=30, what="the servers exited")


async def test_strict_spread_puts_one_host_per_node_and_slots_per_spec(cluster: Cluster) -> None:
    """STRICT_SPREAD placement, slots per spec; object refs awaited without a thread; and
    the teardown's blocking Ray calls (``ray.kill``, removing the placement group) use the
    backend's own thread limiter: they do not queue behind other code holding every token of
    anyio's default one."""
    default = anyio.to_thread.current_default_thread_limiter()
    borrowers = [object() for _ in range(int(default.total_tokens))]
    backend = _backend(min_hosts=2, num_cpus=1, placement="STRICT_SPREAD", get_concurrency=1)
    # Object refs are awaited without a thread on either loop (asyncio: ``await ref``; Trio:
    # the ref's future wakes the loop): with the ray.get fallback's only token taken, every
    # Ray call of this backend (placement group, start, watch, stop) still completes.
    no_get_thread = object()
    backend._limiter.acquire_on_behalf_of_nowait(no_get_thread)
    async with backend:
        # Two 1-CPU hosts would fit on one sandbox node (2 CPUs): spread, one per node.
        assert len(set(backend.host_nodes().values())) == 2
        slot = await backend.acquire_slot()
        result = await slot.exec(ExecRequest("echo placed", timeout=10))
        assert result.stdout == b"placed\n" and result.sandboxed
        await backend.release_slot(slot, reusable=True)
        # Slots per spec, as on every hosted backend: env, PATH, workdir and limits travel
        # to the node; a spec needing files from the driver's machine is refused up front.
        spec = SandboxSpec(env={"TASK": "ray"}, path=("/opt/task/bin",), name="task")
        slot = await backend.acquire_slot(spec)
        result = await slot.exec(ExecRequest('echo "$TASK:$PATH"', timeout=10))
        assert result.stdout.decode().startswith("ray:/opt/task/bin:"), result
        await backend.release_slot(slot, reusable=True)
        assert backend.statistics().specs["task"].cold_starts == 1
        for bad in (SandboxSpec(image="task:1"), SandboxSpec(rootfs="/srv/rootfs")):
            with pytest.raises(ConfigError, match="RayBackend does not support a spec's"):
                await backend.acquire_slot(bad)
        for borrower in borrowers:
            default.acquire_on_behalf_of_nowait(borrower)
        began = anyio.current_time()
    try:
        took = anyio.current_time() - began
        # Queued behind the default limiter, the close would wait out close_grace (30 s).
        assert took < 20, f"closing took {took:.1f}s with the default thread limiter full"
    finally:
        for borrower in borrowers:
            default.release_on_behalf_of(borrower)
    backend._limiter.release_on_behalf_of(no_get_thread)
    await _nothing_left(backend.run_id)


async def test_removed_node_fails_calls_and_host_moves(cluster: Cluster) -> None:
    nodes = ray.nodes()  # type: ignore[no-untyped-call]
    if sum(1 for n in nodes if n["Alive"] and "doomed" in n["Resources"]) < 2:
        _add_doomed(cluster)  # the other loop removed one: a target for the replacement
    async with _backend(min_hosts=1, resources={"doomed": 1}) as backend:
        slot = await backend.acquire_slot()
        (node_id,) = backend.host_nodes().values()
        (doomed,) = [n for n in cluster.worker_nodes if n.node_id == node_id]
        marker = f"sleep 32.{random.randrange(1000, 9999)}"
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:

                async def call() -> None:
                    with pytest.raises(SlotBrokenError):
                        await slot.exec(ExecRequest(marker, timeout=60))

                tg.start_soon(call)
                await _until(lambda: _cmdlines(marker), within=20, what="the command runs")
                # Graceful: the node leaves the cluster at once (killed outright, it would stay
                # "alive" for the scheduler until its heartbeats are missed for a minute).
                cluster.remove_node(doomed, allow_graceful=True)  # main thread: signals
        await backend.release_slot(slot, reusable=False)
        assert backend.statistics().hosts_replaced == 1
        # The replacement goes to the other node with the resource.
        with anyio.fail_after(90):
            fresh = await backend.acquire_slot()
        assert backend.host_nodes()[fresh.host_id] != node_id
        result = await fresh.exec(ExecRequest("echo moved", timeout=10))
        assert result.stdout == b"moved\n"
        await backend.release_slot(fresh, reusable=True)
    await _nothing_left(backend.run_id)


async def test_cancellation_leaves_nothing(cluster: Cluster) -> None:
    """A cancelled start or acquire (at random points) leaves no actor, no process, no work
    dir, and no token of the backend's thread limiters."""
    rng = random.Random(os.getpid())
    run_ids = []
    for delay in (rng.uniform(0.0, 0.5), rng.uniform(0.5, 4.0)):
        backend = _backend(min_hosts=2, label_selector={"pool": "sandbox"})
        run_ids.append(backend.run_id)
        with anyio.move_on_after(delay):
            async with backend:
                await anyio.sleep_forever()
        assert backend.statistics().hosts == 0
        assert backend._limiter.borrowed_tokens == backend._control_limiter.borrowed_tokens == 0
    labels = {"pool": "sandbox"}
    async with _backend(
        min_hosts=1, max_hosts=3, slots_per_host=1, label_selector=labels
    ) as backend:
        run_ids.append(backend.run_id)
        held = await backend.acquire_slot()
        for delay in (rng.uniform(0.0, 0.5), rng.uniform(0.5, 3.0)):
            with anyio.move_on_after(delay):
                extra = await backend.acquire_slot()
                await backend.release_slot(extra, reusable=True)
        assert backend.statistics().leased == 1
        await backend.release_slot(held, reusable=True)
    assert backend.statistics().leased == 0
    assert backend._limiter.borrowed_tokens == backend._control_limiter.borrowed_tokens == 0
    await _nothing_left(*run_ids)


async def test_bench_ray_row(cluster: Cluster) -> None:
    """``structenv bench ray``'s measurements, at a small size on the module's cluster: the
    time to start N hosts, and exec round trip + throughput through RayBackend beside
    LocalBackend in one run; its hosts (Ray namespace ``structenv``) are gone afterwards."""
    out = await measure_ray(calls=4, host_counts=(1,), hosts=1, slots_per_host=2, callers=2)
    assert [s["hosts"] for s in out["start_hosts"]] == [1], out
    assert out["start_hosts"][0]["seconds"] > 0, out
    for name in ("ray", "local"):
        assert out[name]["round_trip"]["p50_us"] > 0, out
        assert out[name]["throughput_2"]["cmds_per_s"] > 0, out

    def bench_actors() -> list[str]:
        actors = ray.util.list_named_actors(all_namespaces=True)
        return [a["name"] for a in actors if a["namespace"] == "structenv"]

    await _until(lambda: not bench_actors(), within=30, what="the bench's host actors gone")


_DRIVER = textwrap.dedent(
    """
    import json, sys, anyio, ray
    from structenv import ExecRequest
    from structenv.backends import RayBackend

    async def main():
        opts = dict(slots_per_host=1, num_cpus=0, namespace=sys.argv[2])
        owned = RayBackend(min_hosts=1, **opts)
        detached = RayBackend(min_hosts=1, detached=True, **opts)

        async def hold(backend, *, task_status):
            async with backend:
                task_status.started()
                await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            async with anyio.create_task_group() as starting:  # both start at once
                starting.start_soon(tg.start, hold, owned)
                starting.start_soon(tg.start, hold, detached)
            slot = await owned.acquire_slot()
            tg.start_soon(slot.exec, ExecRequest("sleep 33.3", timeout=300))
            print(json.dumps([owned.run_id, detached.run_id]), flush=True)

    ray.init(address=sys.argv[1], log_to_driver=False)
    anyio.run(main, backend=sys.argv[3])
    """
)


async def test_driver_sigkill_leaves_nothing_and_reap_removes_detached(
    cluster: Cluster, anyio_backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A driver (running its backends on this test's loop) SIGKILLed mid-command: its own
    hosts leave nothing on any node; its detached ones stay until ``structenv reap``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    argv = [sys.executable, "-c", _DRIVER, cluster.address, NAMESPACE, anyio_backend]
    async with await anyio.open_process(argv, env=env, stderr=None) as proc:
        try:
            assert proc.stdout is not None
            with anyio.fail_after(120):
                line = await BufferedByteReceiveStream(proc.stdout).receive_until(b"\n", 4096)
            owned, detached = json.loads(line)
            await _until(lambda: _cmdlines("sleep 33.3"), within=20, what="the command runs")
            assert _alive_actors(owned) and _alive_actors(detached)
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
    # Non-detached hosts die with their owner: actors, servers, bwrap, work dirs.
    await _nothing_left(owned)
    # Detached ones survive it until reaped (their owner is dead: this host, pid gone).
    assert _alive_actors(detached)
    assert re.search(detached, " ".join(_cmdlines(f"ray{detached}-").values()))
    status = await anyio.to_thread.run_sync(
        reap_main, ["--ray", "--ray-namespace", NAMESPACE, "--json"]
    )
    assert status == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ray_actor"]["removed"] == [f"structenv-{detached}-1"]
    await _nothing_left(detached)


_CLIENT_DRIVER = textwrap.dedent(
    """
    import json, sys, anyio, ray
    from structenv import ExecRequest
    from structenv.backends import RayBackend

    async def main(**address):
        opts = dict(slots_per_host=1, num_cpus=0, namespace=sys.argv[2], health_interval=0.5)
        async with RayBackend(min_hosts=1, **opts, **address) as backend:
            assert ray.util.client.ray.is_connected()  # really through Ray Client
            slot = await backend.acquire_slot()
            result = await slot.exec(ExecRequest("echo hi; id -u", timeout=30))
            await backend.release_slot(slot, reusable=True)
        out = result.stdout.decode().split()
        return dict(run_id=backend.run_id, stdout=out, sandboxed=result.sandboxed)

    if sys.argv[3] == "asyncio":
        # The job connected (ray.init) and the backend uses that connection.
        ray.init(sys.argv[1], namespace=sys.argv[2], log_to_driver=False)
        done = anyio.run(main)
    else:
        # The backend connects to the ray:// address itself, and disconnects on close.
        done = anyio.run(lambda: main(address=sys.argv[1]), backend="trio")
    print(json.dumps(dict(done, connected=ray.is_initialized())), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _client_servers(address: str) -> dict[int, str]:
    """Ray Client server processes of the cluster at ``address``."""
    return {pid: cmd for pid, cmd in _cmdlines("ray.util.client.server").items() if address in cmd}


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def client_server(cluster: Cluster) -> Iterator[str]:
    """A Ray Client server on the test cluster (for both loops), in its own process group:
    killed at the end and checked gone. Yields its ``ray://`` address.

    Legacy mode: one server process, connected to the cluster, on a free port. (Proxy mode,
    as ``ray start --head`` runs it, starts a server per client on fixed ports from 23000:
    once, in a full module run, that server exited at once: probably a port clash with
    another run on the machine, not confirmed.)
    """
    port = _free_port()
    argv = [sys.executable, "-m", "ray.util.client.server", "--address", cluster.address,
            "--host", "127.0.0.1", "--port", str(port), "--mode", "legacy"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    server = subprocess.Popen(argv, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _listening(port):  # a port has nothing to wait on: poll it
            assert server.poll() is None, f"the Ray Client server exited ({server.returncode})"
            assert time.monotonic() < deadline, "the Ray Client server did not listen in 60s"
            time.sleep(0.1)
        yield f"ray://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    deadline = time.monotonic() + 30
    while _client_servers(cluster.address):
        assert time.monotonic() < deadline, "the Ray Client server's processes outlived it"
        time.sleep(0.1)


async def test_ray_client_address(client_server: str, anyio_backend: str) -> None:
    """Through Ray Client (``ray://``): a fresh driver process connected to the module's Ray
    Client server (Ray Client cannot share a process with this one's ``ray.init``) runs a
    command in a slot on this test's loop (asyncio awaits a client ref; Trio uses its
    future) and leaves nothing behind. Who connects differs by loop (it is loop-neutral
    code; one driver each keeps the module's time): on asyncio the job's ``ray.init`` (left
    connected), on Trio the backend itself with ``address="ray://..."`` (disconnected on
    close)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    argv = [sys.executable, "-c", _CLIENT_DRIVER, client_server, NAMESPACE, anyio_backend]
    with anyio.fail_after(90):
        done = await anyio.run_process(argv, env=env, stderr=None)
    (result,) = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert result["connected"] == (anyio_backend == "asyncio"), result
    assert result["stdout"][0] == "hi" and result["stdout"][1] != "0", result
    assert result["sandboxed"], result
    await _nothing_left(result["run_id"])

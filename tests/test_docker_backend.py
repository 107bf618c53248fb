"""DockerBackend against the real engine: contract, isolation, transport, scaling, cancellation,
an end-to-end run through ToolExecutor."""

from __future__ import annotations

import datetime
import itertools
import os

import anyio
import pytest

from structenv import BackendError, ExecRequest, ExecutorConfig, ToolExecutor
from structenv.sandbox import HostClient
from structenv.testing import check_backend
from test_docker_support import containers_of, docker_backend, docker_image, new_run_id, wait_until

_ = docker_image
pytestmark = [pytest.mark.anyio, pytest.mark.docker, pytest.mark.usefixtures("docker_image")]


async def test_contract() -> None:
    passed = await check_backend(lambda: docker_backend(), deadline=60)
    assert "cancelled_exec" in passed and "batch_streams" in passed


async def test_isolation_labels_and_limits() -> None:
    run_id = new_run_id()
    async with docker_backend(run_id=run_id, cpus=1.5) as b:
        assert b.sandboxed and b.transport == "unix"
        slot = await b.acquire_slot()
        try:
            assert slot.sandboxed
            probe = (
                "grep CapEff /proc/self/status; cat /proc/net/dev; "
                "for p in /run/structenv /var/run/docker.sock /run; do "
                "[ -e $p ] && echo VISIBLE=$p; done; echo pid=$$; exit 0"
            )
            r = await slot.exec(ExecRequest(probe, timeout=10))
            out = r.stdout.decode()
            assert r.exit_code == 0 and r.sandboxed, r
            assert "CapEff:\t0000000000000000" in out
            assert "VISIBLE=" not in out, out
            interfaces = [ln.split(":")[0].strip() for ln in out.splitlines() if ":" in ln[:8]]
            assert "lo" in interfaces and "eth0" not in out
        finally:
            await b.release_slot(slot, reusable=True)
        (container,) = containers_of(run_id)
        labels = container.labels
        assert labels["org.structenv.owner.pid"] == str(os.getpid())
        assert labels["org.structenv.run"] == run_id and labels["org.structenv.managed"] == "1"
        assert float(labels["org.structenv.created"]) > 0
        host = container.attrs["HostConfig"]
        assert host["NetworkMode"] == "none"
        assert host["Memory"] == 512 << 20 and host["PidsLimit"] == 256
        assert host["NanoCpus"] == 1_500_000_000
        assert host["CapDrop"] == ["ALL"] and "no-new-privileges" in host["SecurityOpt"]
    assert containers_of(run_id) == []


async def test_network_allowed_uses_tcp_with_token() -> None:
    async with docker_backend(allow_network=True) as b:
        assert b.transport == "tcp" and b.allow_network
        slot = await b.acquire_slot()
        try:
            r = await slot.exec(ExecRequest("echo over-tcp", timeout=10))
            assert r.exit_code == 0 and r.stdout == b"over-tcp\n" and r.sandboxed
            box = next(iter(b._hosts.values()))
            # The same server without the token refuses everything.
            stranger = HostClient(host=box.client._host, port=box.client._port)
            status, body = await stranger.request("GET", "/v1/health")
            await stranger.aclose()
            assert status == 401, body
        finally:
            await b.release_slot(slot, reusable=True)


async def test_scale_up_on_demand_and_down_when_idle() -> None:
    run_id = new_run_id()
    async with docker_backend(
        run_id=run_id, slots_per_host=1, min_hosts=1, max_hosts=2, idle_timeout=0.3
    ) as b:
        assert b.capacity == 2 and b.statistics().hosts == 1
        first = await b.acquire_slot()
        with anyio.fail_after(30):
            second = await b.acquire_slot()  # scales up through the creation limiter
        assert first.host_id != second.host_id and b.statistics().hosts == 2
        assert len(containers_of(run_id)) == 2
        for s in (first, second):
            await b.release_slot(s, reusable=True)

        async def scaled_down() -> bool:
            return b.statistics().hosts == 1 and len(containers_of(run_id)) == 1

        await wait_until(scaled_down, deadline=15)
        assert b.scaling_statistics()["scaled_down"] == 1
        slot = await b.acquire_slot()  # the remaining container still serves
        assert (await slot.exec(ExecRequest("echo ok", timeout=10))).exit_code == 0
        await b.release_slot(slot, reusable=True)
    assert containers_of(run_id) == []


@pytest.mark.parametrize("delay", [0.02, 0.15, 0.4, 0.8])
async def test_cancelled_start_leaves_no_container(delay: float) -> None:
    run_id = new_run_id()
    with anyio.move_on_after(delay):
        async with docker_backend(run_id=run_id, min_hosts=2):
            await anyio.sleep_forever()
    assert containers_of(run_id) == []


async def test_cancelled_acquire_during_scale_up_leaves_nothing() -> None:
    run_id = new_run_id()
    async with docker_backend(run_id=run_id, slots_per_host=1, min_hosts=1, max_hosts=2) as b:
        held = await b.acquire_slot()
        with anyio.move_on_after(0.05) as scope:
            await b.acquire_slot()
        assert scope.cancelled_caught
        assert b.statistics().leased == 1
        await b.release_slot(held, reusable=True)
        assert b.statistics().leased == 0
    assert containers_of(run_id) == []


async def test_missing_image_is_a_clear_error() -> None:
    # The advice names the tag to build (a bare `structenv image build` makes the default one).
    tag = "structenv-sandbox:does-not-exist"
    with pytest.raises(BackendError, match=f"build it with `structenv image build --tag {tag}`"):
        async with docker_backend(image=tag):
            pass


async def test_end_to_end_trajectories_through_executor() -> None:
    run_id = new_run_id()
    async with docker_backend(run_id=run_id, min_hosts=2) as b:
        config = ExecutorConfig(trajectory_timeout=60, tool_timeout=20)
        async with ToolExecutor(b, config=config) as executor:
            outcomes: dict[int, tuple[str, bool]] = {}

            async def trajectory(n: int) -> None:
                async with executor.trajectory(f"t{n}") as traj:
                    await traj.exec(ExecRequest(f"seq 1 {n * 10} > numbers.txt", timeout=10))
                    r = await traj.exec(
                        ExecRequest("python3 -c 'print(sum(map(int, open(\"numbers.txt\"))))'")
                    )
                    outcomes[n] = (r.stdout.decode().strip(), r.sandboxed)
                    listing = [e.path for e in await traj.slot.list_files(".")]
                    assert listing == ["numbers.txt"], listing

            async with anyio.create_task_group() as tg:
                for n in range(1, 5):
                    tg.start_soon(trajectory, n)
            stats = executor.statistics()
        assert outcomes == {n: (str(sum(range(1, n * 10 + 1))), True) for n in range(1, 5)}
        assert stats.pool.in_use == 0
        assert b.statistics().leased == 0 and b.statistics().hosts == 2
    assert containers_of(run_id) == []


async def test_unsandboxed_mode_says_so_and_executor_refuses_it() -> None:
    from structenv import SandboxUnavailableError

    async with docker_backend(isolation="none", require_sandbox=False) as b:
        assert not b.sandboxed
        slot = await b.acquire_slot()
        try:
            r = await slot.exec(ExecRequest("cat /proc/net/dev", timeout=10))
            assert r.exit_code == 0 and not r.sandboxed and not slot.sandboxed
            assert b"eth0" not in r.stdout  # still no network: the container has none
        finally:
            await b.release_slot(slot, reusable=True)
        with pytest.raises(SandboxUnavailableError):
            async with ToolExecutor(b, config=ExecutorConfig(require_sandbox=True)):
                pass


async def test_container_creation_is_rate_limited() -> None:
    run_id = new_run_id()
    async with docker_backend(
        run_id=run_id, min_hosts=3, creation_concurrency=4, creation_rate=2.0
    ):
        created = sorted(
            datetime.datetime.fromisoformat(c.attrs["Created"][:26]).timestamp()
            for c in containers_of(run_id)
        )
    gaps = [b - a for a, b in itertools.pairwise(created)]
    assert len(created) == 3 and min(gaps) >= 0.3, gaps


async def test_purge_on_start_takes_over_the_pool() -> None:
    pool = f"purge-{new_run_id()}"
    first_run, second_run = new_run_id(), new_run_id()
    async with docker_backend(run_id=first_run, pool=pool) as first:
        (old_id,) = first.container_ids().values()
        async with docker_backend(run_id=second_run, pool=pool, purge_on_start=True) as second:
            # Purge removes even a live run's containers of that pool (and only that pool).
            assert old_id not in {c.id for c in containers_of(first_run)}
            assert len(containers_of(second_run)) == 1 and second.statistics().hosts == 1
    assert containers_of(first_run) == [] and containers_of(second_run) == []

"""Sandbox specs on LocalBackend with real bwrap: slots per spec, rootfs slots, the default
toolchain, attacks from inside a spec'd slot, bad specs, and cancellation across specs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import pytest

from spec_support import cancel_mixed_specs_at_random, make_rootfs
from structenv import ConfigError, ExecRequest, SandboxSpec, SlotPool
from structenv.backends import LocalBackend
from structenv.testing import child_processes
from test_sandbox_support import local_backend

pytestmark = pytest.mark.anyio

#: The interpreter structenv runs with: a default slot's python3 is this one.
PREFIX = os.path.realpath(sys.prefix)


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two tiny root filesystems ("a", "b") and one with planted traps ("evil")."""
    base = tmp_path_factory.mktemp("roots")
    a = make_rootfs(str(base / "a"), marker="rootfs-a")
    b = make_rootfs(str(base / "b"), marker="rootfs-b")
    evil = make_rootfs(str(base / "evil"), marker="evil")
    # A setuid-root shell and id: under no_new_privs and a nosuid root they gain nothing.
    for name in ("bash", "id"):
        path = os.path.join(evil, "usr", "bin", name)
        os.chown(path, 0, 0)
        os.chmod(path, 0o4755)
    # Symlinks that point at host secrets if they were ever followed on the host.
    os.symlink("/etc/shadow", os.path.join(evil, "etc", "hostshadow"))
    os.symlink("/root", os.path.join(evil, "hostroot"))
    os.symlink("../../../../../../etc", os.path.join(evil, "usr", "up"))
    return {"a": a, "b": b, "evil": evil}


def sh(command: str) -> ExecRequest:
    return ExecRequest(command, timeout=30)


async def test_slots_are_per_spec_with_statistics(roots: dict[str, str]) -> None:
    spec_a = SandboxSpec(rootfs=roots["a"], env={"WHO": "a"}, workdir="repo/src", name="a")
    spec_b = SandboxSpec(rootfs=roots["b"], name="b")
    spec_env = SandboxSpec(env={"WHO": "env"}, path=("/opt/x",), name="env")
    async with local_backend(slots_per_host=2) as backend:
        pool = SlotPool(backend, acquire_timeout=60)
        async with pool.slot(spec_a) as slot:
            got = await slot.exec(sh('cat /etc/marker; echo " $WHO $PWD"; ls /usr/bin | wc -l'))
            assert got.stdout.decode().split("\n")[0] == "rootfs-a a /workspace/repo/src"
            first = slot.id
        async with pool.slot(spec_a) as slot:  # warm: the same slot, built for a
            assert slot.id == first
            assert (await slot.exec(sh("cat /etc/marker"))).stdout == b"rootfs-a"
        async with pool.slot(spec_a) as held, pool.slot(spec_b) as other:
            assert other.id != held.id
            assert (await other.exec(sh("cat /etc/marker; echo $WHO"))).stdout == b"rootfs-b\n"
        # Both slots are warm for a and b now; the env-only spec evicts the coldest (a's
        # slot, leased before b's), b's stays.
        async with pool.slot(spec_env) as slot:
            got = await slot.exec(sh('echo "$WHO $PATH"; test -e /etc/marker || echo host'))
            assert got.stdout.decode().startswith("env /opt/x:") and got.stdout.endswith(b"host\n")
        async with pool.slot(spec_b) as slot:
            assert (await slot.exec(sh("cat /etc/marker"))).stdout == b"rootfs-b"
        async with pool.slot() as slot:  # the default spec: the host's system again
            got = await slot.exec(sh("test -e /etc/marker || echo host; echo ${WHO:-none}"))
            assert got.stdout == b"host\nnone\n"
        specs = backend.statistics().specs
        assert (specs["a"].hits, specs["a"].misses, specs["a"].cold_starts) == (2, 1, 1)
        assert (specs["b"].hits, specs["b"].misses, specs["b"].cold_starts) == (1, 1, 1)
        assert (specs["env"].hits, specs["env"].cold_starts) == (0, 1)
        assert specs["default"].cold_starts == 1  # rebuilt from a spec'd slot
        assert sum(s.warm for s in specs.values()) == 2
        assert sum(s.leased for s in specs.values()) == 0
        stats = pool.statistics()
        assert stats.in_use == 0 and stats.acquired == stats.released == 7


async def test_default_slot_has_a_working_toolchain() -> None:
    """What issue 10 found missing: pytest on PATH, the interpreter's own python3, git."""
    async with local_backend(slots_per_host=1) as backend:
        slot = await backend.acquire_slot()
        try:
            script = (
                "set -e; python3 -m pytest --version; pytest --version; git --version; "
                "bash -c 'echo bash'; ls / >/dev/null; echo x | grep x | sed s/x/y/; "
                "find . -maxdepth 0; python3 -c 'import structenv, sys; print(sys.prefix)'"
            )
            got = await slot.exec(sh(script))
            assert got.exit_code == 0, got.stderr
            out = got.stdout.decode()
            assert "pytest" in out and "git version" in out and "bash\ny\n.\n" in out
            assert out.rstrip().endswith(PREFIX)
        finally:
            await backend.release_slot(slot, reusable=True)


async def test_attacks_from_an_image_rootfs_slot_fail(
    roots: dict[str, str], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "readme").write_text("shared")
    (data / "shadow-link").symlink_to("/etc/shadow")
    spec = SandboxSpec(rootfs=roots["evil"], binds=[f"{data}:/data"], name="evil")
    async with local_backend(slots_per_host=1) as backend:
        pool = SlotPool(backend)
        async with pool.slot(spec) as slot:
            # setuid binaries run with the slot's own uid: nothing gained.
            got = await slot.exec(sh("id -u; /usr/bin/id -u; bash -p -c 'id -u'"))
            uids = set(got.stdout.split())
            assert len(uids) == 1 and b"0" not in uids, got
            status = await slot.exec(sh("cat /proc/self/status"))
            fields = dict(
                line.split(":", 1) for line in status.stdout.decode().splitlines() if ":" in line
            )
            assert int(fields["CapEff"], 16) == 0 and fields["NoNewPrivs"].strip() == "1"
            assert fields["Seccomp"].strip() == "2"
            # Symlinks resolve inside the slot's root, never on the host.
            for path in ("/etc/hostshadow", "/hostroot/.bashrc", "/usr/up/shadow"):
                got = await slot.exec(sh(f"cat {path}"))
                assert got.exit_code != 0 and got.stdout == b"", (path, got)
            got = await slot.exec(sh("cat /data/shadow-link"))
            assert got.stdout == b""  # the bind's link points into the slot's root, not the host's
            # The rootfs, the bind and the host loader are read-only; the host's /etc is absent.
            for target in ("/etc/marker", "/usr/bin/cat", "/data/readme", "/newfile"):
                got = await slot.exec(sh(f"echo x >> {target}"))
                assert got.exit_code != 0, target
            got = await slot.exec(sh("cat /data/readme; echo; ls /.structenv/host"))
            listing = got.stdout.decode().split()
            assert listing[0] == "shared" and "etc" not in listing
            got = await slot.exec(
                sh("cat /.structenv/host/etc/shadow /.structenv/host/root/.bashrc")
            )
            assert got.stdout == b""
            # Only the slot's own processes are visible.
            got = await slot.exec(sh("ls /proc"))
            assert 1 <= sum(n.isdigit() for n in got.stdout.decode().split()) <= 4
        # Nothing the slot did reached its rootfs on the host.
        assert await anyio.Path(roots["evil"], "etc", "marker").read_text() == "evil"
        assert not await anyio.Path(roots["evil"], "newfile").exists()


async def test_bad_specs_fail_before_anything_runs(tmp_path: Path) -> None:
    empty = tmp_path / "no-shell"
    (empty / "bin").mkdir(parents=True)
    cases = [
        (SandboxSpec(rootfs=str(empty)), "has no /bin/sh"),
        (SandboxSpec(rootfs=str(tmp_path / "missing")), "does not exist"),
        (SandboxSpec(rootfs="/"), "binding the host's / is refused"),
        (SandboxSpec(binds=["/etc:/mnt/etc"]), "exposes /etc/shadow"),
        (SandboxSpec(binds=["/var/run:/mnt/run"]), "refused"),
    ]
    async with local_backend(slots_per_host=1) as backend:
        pool = SlotPool(backend)
        for spec, message in cases:
            with pytest.raises(ConfigError, match=message):
                async with pool.slot(spec):
                    pytest.fail("a bad spec got a slot")
        own = SandboxSpec(binds=[f"{backend._root}:/mnt/own"])  # the server's own work dir
        with pytest.raises(ConfigError, match="refused"):
            await backend.prepare_spec(own)
        stats = backend.statistics()
        assert stats.acquires == 0 and all(s.cold_starts == 0 for s in stats.specs.values())
        async with pool.slot() as slot:  # the backend is unharmed
            assert (await slot.exec(sh("echo ok"))).stdout == b"ok\n"


async def test_bind_roots_limit_binds_and_rootfs_directories(
    roots: dict[str, str], tmp_path: Path
) -> None:
    allowed = tmp_path / "allowed"
    (allowed / "data").mkdir(parents=True)
    (allowed / "data" / "readme").write_text("inside")
    (allowed / "escape").symlink_to(roots["a"])  # a link out of the root
    async with local_backend(slots_per_host=1, bind_roots=(str(allowed),)) as backend:
        pool = SlotPool(backend)
        async with pool.slot(SandboxSpec(binds=[f"{allowed / 'data'}:/data"])) as slot:
            assert (await slot.exec(sh("cat /data/readme"))).stdout == b"inside"
        for spec in (
            SandboxSpec(rootfs=roots["a"]),
            SandboxSpec(rootfs=str(allowed / "escape")),
            SandboxSpec(binds=[f"{roots['b']}:/data"]),
        ):
            with pytest.raises(ConfigError, match="is outside the backend's bind_roots") as info:
                async with pool.slot(spec):
                    pytest.fail("a spec outside the bind roots got a slot")
            assert "\n" not in str(info.value)
        assert backend.statistics().acquires == 1
    for bad, message in ((("/etc",), "bind root /etc: refused"), (("x",), "absolute")):
        with pytest.raises(ConfigError, match=message):
            async with local_backend(slots_per_host=1, bind_roots=bad):
                pytest.fail("started with a refused bind root")


async def test_isolation_none_refuses_rootfs_specs(roots: dict[str, str]) -> None:
    backend = LocalBackend(
        slots_per_host=1, isolation="none", require_sandbox=False, allow_network=True
    )
    async with backend:
        with pytest.raises(ConfigError, match="needs bwrap"):
            await backend.prepare_spec(SandboxSpec(rootfs=roots["a"]))


async def test_cancelling_trajectories_of_mixed_specs_leaks_nothing(roots: dict[str, str]) -> None:
    specs = [
        None,
        SandboxSpec(rootfs=roots["a"], name="a"),
        SandboxSpec(rootfs=roots["b"], name="b"),
        SandboxSpec(env={"X": "1"}, name="x"),
    ]
    before = set(child_processes())
    async with local_backend(slots_per_host=2) as backend:
        pool = SlotPool(backend, acquire_timeout=120)
        await cancel_mixed_specs_at_random(pool, specs, 16)
        with anyio.fail_after(60):
            async with pool.slot(specs[1]) as slot:  # every slot is usable again
                assert (await slot.exec(sh("cat /etc/marker"))).stdout == b"rootfs-a"
        assert backend.statistics().leased == 0
    assert set(child_processes()) - before == set()

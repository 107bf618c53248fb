"""SandboxSpec as data: parsing (YAML/flags), identity, and the bind policy (no engine)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from structenv import Bind, ConfigError, SandboxSpec
from structenv._spec import check_bind, check_bind_roots
from structenv.adapters.atropos import AgentEnvConfig
from structenv.adapters.atropos._cli import fold_model_flags


def test_spec_identity_ignores_name_and_env_order() -> None:
    a = SandboxSpec(image="x:1", env={"A": "1", "B": "2"}, name="one")
    b = SandboxSpec(image="x:1", env={"B": "2", "A": "1"}, name="two")
    assert a == b and hash(a) == hash(b) and a.key == b.key and len(a.key) == 16
    assert a.label == "one" and SandboxSpec(image="x:1").label.startswith("x:1#")
    assert SandboxSpec().is_default and not a.is_default
    assert SandboxSpec(env={"A": "1"}).key != SandboxSpec(env={"A": "2"}).key


def test_spec_parses_text_as_flags_and_yaml_give_it() -> None:
    spec = SandboxSpec.model_validate(
        {
            "rootfs": "/srv/root",
            "binds": "/opt/a,/opt/b:/data",
            "env": "K=V,X=1=2",
            "path": "/opt/bin",
            "limits": {"memory": "1000000"},
            "workdir": "repo",
        }
    )
    assert spec.binds == (Bind(source="/opt/a"), Bind(source="/opt/b", target="/data"))
    assert spec.binds[0].target == "/opt/a"
    assert dict(spec.env) == {"K": "V", "X": "1=2"} and spec.path == ("/opt/bin",)
    assert spec.limits.memory == 1_000_000
    assert SandboxSpec.model_validate({"env": '{"A": "b,c"}'}).env == {"A": "b,c"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"image": "a", "rootfs": "/r"}, "one base at most"),
        ({"context": "/c"}, "context needs a dockerfile"),
        ({"rootfs": "relative"}, "must be absolute"),
        ({"workdir": "../up"}, "relative to the workspace"),
        ({"workdir": "/abs"}, "relative to the workspace"),
        ({"binds": ["rel"]}, "absolute path"),
        ({"binds": ["/a:/"]}, "below /"),
        ({"env": {"A=B": "x"}}, "bad environment variable"),
        ({"limits": {"memory": 0}}, "greater than 0"),
        ({"imgae": "typo"}, "Extra inputs"),
    ],
)
def test_bad_specs_are_refused_with_a_reason(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SandboxSpec.model_validate(data)


def test_env_config_takes_the_spec_from_yaml_and_folded_flags() -> None:
    argv = fold_model_flags(
        [
            "process",
            "--env.sandbox.image", "task:1",
            "--env.group_size", "2",
            "--env.sandbox.env=A=1,B=2",
            "--env.sandbox.limits.pids", "64",
        ],
        "env.sandbox",
    )  # fmt: skip
    assert argv[0] == "process" and argv[2:] == ["--env.group_size", "2"]
    flag, _, text = argv[1].partition("=")
    assert flag == "--env.sandbox"
    config = AgentEnvConfig(sandbox=text)
    assert config.sandbox == SandboxSpec(
        image="task:1", env={"A": "1", "B": "2"}, limits={"pids": 64}
    )
    yaml_like = AgentEnvConfig.model_validate({"sandbox": {"rootfs": "/r", "binds": ["/opt"]}})
    assert yaml_like.sandbox.rootfs == "/r"
    assert AgentEnvConfig().sandbox.is_default
    with pytest.raises(ConfigError, match="not a JSON object"):
        fold_model_flags(["--env.sandbox", "[1]"], "env.sandbox")


def _bind(source: str | Path, target: str = "") -> Bind:
    return Bind(source=str(source), target=target)


def test_bind_policy_allows_plain_directories(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    assert check_bind(_bind(tmp_path / "data", "/data")) == str(tmp_path / "data")
    assert check_bind(_bind("/usr/share")) == "/usr/share"


@pytest.mark.parametrize(
    "source",
    [
        p
        for p in (
            "/",
            "/proc",
            "/proc/self",
            "/sys/fs/cgroup",
            "/dev",
            "/run",
            "/var/run",
            "/etc",
            "/etc/shadow",
            "/root",
            "/root/.ssh",
            "/home",
            "/var",
            "/var/lib/docker",
        )
        if os.path.lexists(p)  # e.g. /root/.ssh exists only where someone made it
    ],
)
def test_bind_policy_refuses_host_secrets_and_control_files(source: str) -> None:
    with pytest.raises(ConfigError, match=r"^bind .*(refused|not exist|only files)"):
        check_bind(_bind(source, "/mnt/x"))


def test_bind_policy_sees_through_symlinks_and_refuses_sockets_and_own_dirs(
    tmp_path: Path,
) -> None:
    link = tmp_path / "innocent"
    link.symlink_to("/etc")
    with pytest.raises(ConfigError, match="exposes /etc/shadow"):
        check_bind(_bind(link, "/mnt/x"))
    (tmp_path / "docker.sock").symlink_to("/var/run/docker.sock")
    with pytest.raises(ConfigError, match=r"refused|not exist|not sockets"):
        check_bind(_bind(tmp_path / "docker.sock", "/mnt/s"))
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        with pytest.raises(ConfigError, match="not sockets"):
            check_bind(_bind(path, "/mnt/s"))
    own = tmp_path / "server"
    (own / "w").mkdir(parents=True)
    with pytest.raises(ConfigError, match="exposes"):
        check_bind(_bind(own / "w", "/mnt/w"), denied=[str(own)])
    with pytest.raises(ConfigError, match="exposes"):
        check_bind(_bind(tmp_path, "/mnt/w"), denied=[str(own)])
    runs = tmp_path / "structenv-123-x"
    runs.mkdir()
    prefix = str(tmp_path / "structenv-")
    with pytest.raises(ConfigError, match="structenv's own"):
        check_bind(_bind(runs, "/mnt/r"), denied_prefixes=[prefix])
    with pytest.raises(ConfigError, match="contains structenv's own"):
        check_bind(_bind(tmp_path, "/mnt/r"), denied_prefixes=[prefix])
    with pytest.raises(ConfigError, match="does not exist"):
        check_bind(_bind(tmp_path / "missing", "/mnt/m"))


@pytest.mark.parametrize("target", ["/proc/x", "/workspace", "/tmp/a", "/.structenv", "/dev"])
def test_bind_targets_never_cover_the_sandbox_mounts(tmp_path: Path, target: str) -> None:
    with pytest.raises(ConfigError, match="overlaps the sandbox's own"):
        check_bind(_bind(tmp_path, target))


def test_bind_roots_confine_binds_through_symlinks(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "data").mkdir(parents=True)
    outside.mkdir()
    (root / "link").symlink_to(outside)
    roots = check_bind_roots([str(root)])
    assert check_bind(_bind(root / "data", "/data"), roots=roots) == str(root / "data")
    for source in (outside, root / "link"):
        with pytest.raises(ConfigError, match=r"is outside the backend's bind_roots \(.*root\)"):
            check_bind(_bind(source, "/data"), roots=roots)
    with pytest.raises(ConfigError, match=r"bind_roots \(none\)"):
        check_bind(_bind(root / "data", "/data"), roots=())


@pytest.mark.parametrize(
    ("root", "reserved", "message"),
    [
        ("/etc", (), "bind root /etc: refused, it exposes /etc/shadow"),
        ("/usr/share", ("/usr",), "bind root /usr/share: refused, it overlaps /usr"),
        ("/var/tmp", ("/var/tmp/structenv-sandbox",), "overlaps /var/tmp/structenv-sandbox"),
        ("relative/dir", (), "must be an absolute path"),
        ("/etc/hostname", (), "not a directory"),
    ],
)
def test_bad_bind_roots_are_refused(root: str, reserved: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_bind_roots([root], reserved=reserved)


@pytest.mark.anyio
async def test_callers_waiting_for_a_failed_preparation_get_its_error() -> None:
    """A group's members ask for one spec at once: when its preparation fails (a Dockerfile
    that does not build), those waiting get that error instead of each building it again in
    turn; a later caller tries again (failures are not cached)."""
    import anyio

    from structenv.backends import LocalBackend

    backend = LocalBackend(hosts=1, slots_per_host=1)  # never started: only prepare_spec runs
    attempts = 0
    release = anyio.Event()

    async def failing_resolve(spec: SandboxSpec) -> object:
        nonlocal attempts
        attempts += 1
        await release.wait()
        raise ConfigError(f"building {spec.dockerfile} failed: attempt {attempts}")

    backend._resolve_spec = failing_resolve  # type: ignore[method-assign,assignment]
    spec = SandboxSpec(dockerfile="/tasks/broken/Dockerfile")
    errors: list[str] = []

    async def member() -> None:
        with pytest.raises(ConfigError) as failed:
            await backend.prepare_spec(spec)
        errors.append(str(failed.value))

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(member)
        lock = None
        while lock is None or lock.statistics().tasks_waiting < 7:  # the first attempt runs;
            await anyio.lowlevel.checkpoint()  # the other seven wait on the spec's lock
            lock = backend._spec_locks.get(spec.key)
        release.set()
    assert attempts == 1
    assert errors == ["building /tasks/broken/Dockerfile failed: attempt 1"] * 8
    with pytest.raises(ConfigError, match="attempt 2"):  # the next caller tries again
        await backend.prepare_spec(spec)

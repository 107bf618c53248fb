"""Backend options: one shared host-pool model, one model per backend, and the registry."""

from __future__ import annotations

import pydantic
import pytest

from structenv import ConfigError
from structenv.backends import (
    BackendEntry,
    DockerBackend,
    DockerOptions,
    HostedOptions,
    LocalBackend,
    LocalOptions,
    ModalOptions,
    NomadOptions,
    RayBackend,
    RayOptions,
    backend_entry,
    create_backend,
    register_backend,
)
from structenv.backends._registry import _REGISTRY


def test_models_share_the_host_pool_options_and_keep_their_defaults() -> None:
    for model in (LocalOptions, DockerOptions, NomadOptions, ModalOptions, RayOptions):
        assert issubclass(model, HostedOptions)
        assert {"slots_per_host", "min_hosts", "max_hosts", "start_timeout"} <= set(
            model.model_fields
        )
    assert NomadOptions().start_timeout == 300.0 and LocalOptions().health_interval == 5.0
    with pytest.raises(pydantic.ValidationError):
        LocalOptions().slots_per_host = 2  # type: ignore[misc]  # frozen


def test_constructors_take_a_model_and_or_overrides() -> None:
    local = LocalBackend(hosts=2, slots_per_host=3)
    assert (local.options.min_hosts, local.options.host_bound, local.capacity) == (2, 2, 6)
    docker = DockerBackend(DockerOptions(image="me/sandbox:1", max_hosts=4), slots_per_host=2)
    assert docker.image == "me/sandbox:1" and docker.capacity == 8
    ray = RayBackend(RayOptions(placement="STRICT_SPREAD"), min_hosts=2)  # ray not imported
    assert ray.options.host_bound == 2 and ray.capacity == 8
    # hosts= replaces both bounds of a model given with them.
    assert LocalBackend(LocalOptions(min_hosts=1, max_hosts=3), hosts=2).capacity == 8


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LocalBackend(slots_per_host=0), "LocalOptions: slots_per_host: Input should"),
        (lambda: DockerBackend(min_hosts=3, max_hosts=2), r"max_hosts \(2\) < min_hosts \(3\)"),
        (lambda: LocalBackend(isolation="none"), "isolation='none' needs require_sandbox=False"),
        (lambda: DockerBackend(slots=4), "DockerOptions: slots: Extra inputs are not permitted"),
        (lambda: RayBackend(placement="SIDEWAYS"), "RayOptions: placement: Input should be"),
        (
            lambda: DockerBackend(LocalOptions()),  # type: ignore[arg-type]
            "expected DockerOptions, got LocalOptions",
        ),
        (lambda: LocalBackend(hosts=2, min_hosts=1), "give hosts or min_hosts/max_hosts"),
    ],
)
def test_bad_options_are_one_line_config_errors(make: object, message: str) -> None:
    assert callable(make)
    with pytest.raises(ConfigError, match=message) as info:
        make()
    assert "\n" not in str(info.value)


def test_registry_maps_names_to_class_and_model(monkeypatch: pytest.MonkeyPatch) -> None:
    assert backend_entry("ray").options is RayOptions
    backend = create_backend("ray", {"min_hosts": 2, "max_hosts": 3, "num_cpus": 0.5})
    assert isinstance(backend, RayBackend) and backend.capacity == 12
    with pytest.raises(ConfigError, match="backend 'docker' takes DockerOptions"):
        create_backend("docker", LocalOptions())
    monkeypatch.setattr("structenv.backends._registry._REGISTRY", dict(_REGISTRY))
    entry = BackendEntry("mine", LocalBackend, LocalOptions)
    register_backend(entry)
    with pytest.raises(ConfigError, match="already registered"):
        register_backend(entry)
    assert isinstance(create_backend("mine", {"hosts": 1}), LocalBackend)


def test_path_lists_take_comma_separated_text_as_the_specs_binds_do() -> None:
    """``--env.backend_options.bind_roots /data,/tasks`` (a flag's text) was refused with
    "bind_roots: Input should be a valid tuple" while ``--env.sandbox.binds /a,/b`` worked."""
    assert DockerOptions(bind_roots="/data, /tasks,").bind_roots == ("/data", "/tasks")
    assert LocalOptions(bind_roots="/data").bind_roots == ("/data",)
    assert LocalOptions(bind_roots=["/data"]).bind_roots == ("/data",)
    assert LocalOptions().bind_roots is None and DockerOptions().bind_roots == ()
    assert NomadOptions(datacenters="dc1,dc2").datacenters == ("dc1", "dc2")

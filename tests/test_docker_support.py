"""Helpers shared by the Docker tests (no tests here).

The tests need a running Docker Engine and build the sandbox image once per session (cached by
a hash of the sources: a rerun with unchanged sources takes about a second; from scratch
~2 min). There is deliberately no skip: without an engine these tests fail.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import docker
import pytest

import prefetch_support
from structenv._image import DEFAULT_TAG, build_image
from structenv.backends._docker import DockerBackend
from structenv.backends._ownership import LABEL_RUN

#: Test-sized limits; a fast health check so dead containers are noticed quickly.
DEFAULTS: dict[str, Any] = {
    "slots_per_host": 2,
    "memory_limit": 512 << 20,
    "pids_limit": 256,
    "workspace_size": 64 << 20,
    "health_interval": 0.2,
    "start_timeout": 30.0,
}


@pytest.fixture(scope="session")
def docker_image() -> str:
    """Build (or confirm up to date) the sandbox image once per test session."""
    prefetch_support.wait("image")  # started at collection (tests/conftest.py)
    return build_image(os.environ.get("STRUCTENV_TEST_IMAGE", DEFAULT_TAG))


def new_run_id(prefix: str = "t") -> str:
    return f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"


def docker_backend(**options: Any) -> DockerBackend:
    """A DockerBackend with test-sized defaults (pool ``pytest`` unless given)."""
    settings: dict[str, Any] = {
        "image": os.environ.get("STRUCTENV_TEST_IMAGE", DEFAULT_TAG),
        "pool": "pytest",
        **DEFAULTS,
    }
    settings.update(options)
    return DockerBackend(**settings)


def sdk() -> Any:
    return docker.from_env()


def containers_of(run_id: str) -> list[Any]:
    """Every container (running or not) labelled with ``run_id``."""
    client = sdk()
    try:
        return list(
            client.containers.list(
                all=True, filters={"label": f"{LABEL_RUN}={run_id}"}, ignore_removed=True
            )
        )
    finally:
        client.close()


async def wait_until(condition: Callable[[], Awaitable[bool]], *, deadline: float) -> None:
    """Poll ``condition`` until it holds, failing the test after ``deadline`` seconds.

    The Docker engine's state (a container gone, a process started in it) has no event this
    process can wait on, so these waits poll, always under a deadline.
    """
    with anyio.fail_after(deadline):
        while not await condition():  # noqa: ASYNC110 - external state, nothing to wait on
            await anyio.sleep(0.05)

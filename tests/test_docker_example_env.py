"""The shell-tasks example env end to end (``structenv demo``) with its sandboxes in Docker.

The env's backend is built by the registry as ``docker`` (with the test image and pool);
everything else is the real demo: atroposlib process mode, the scripted policy server over
HTTP, real commands in bwrap'd container slots.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import atroposlib  # noqa: F401  (the atropos extra is part of the dev install)
import pytest

from structenv._demo import main
from structenv.abc import SandboxBackend
from structenv.adapters.atropos import AgentEnv
from structenv.backends import DockerBackend, create_backend
from test_docker_support import containers_of, docker_backend, docker_image, new_run_id

_ = docker_image
pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_image")]


def test_demo_on_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_id = new_run_id("demo")
    made: list[DockerBackend] = []
    test_defaults = docker_backend()  # the test image and pool, small limits

    def create_docker_backend(self: AgentEnv) -> SandboxBackend:
        c = self.config  # the demo's backend_options (slots, hosts), on Docker
        options = {
            **c.backend_options,
            "allow_network": c.allow_network,
            "require_sandbox": c.require_sandbox,
            "image": test_defaults.image,
            "pool": "pytest",
            "run_id": run_id,
        }
        backend = create_backend("docker", options)
        assert isinstance(backend, DockerBackend)
        made.append(backend)
        return backend

    monkeypatch.setattr(AgentEnv, "create_backend", create_docker_backend)
    out = tmp_path / "out"
    code = main(["--groups", "2", "--group-size", "2", "--out", str(out), "--quiet"])
    assert code == 0
    groups = [json.loads(line) for line in (out / "shell-tasks.jsonl").read_text().splitlines()]
    assert len(groups) == 2 and all(len(g["tokens"]) == 2 for g in groups)
    (backend,) = made
    stats: Any = backend.statistics()
    assert backend.sandboxed and stats.acquires == stats.releases >= 4
    assert backend.scaling_statistics()["created"] >= 1
    assert containers_of(run_id) == []

"""SandboxSpec: what a slot's filesystem and process environment hold.

A spec names the slot's base filesystem (the host's read-only system, a root filesystem
directory, or a container image given by name or by Dockerfile), extra read-only binds,
environment variables, ``PATH`` entries, the working directory and resource limits. The pool
leases slots *per spec*: a slot built for one spec is never handed to a trajectory of another.

Specs are plain, frozen, hashable values (pydantic models, so they load from YAML and
``--env.sandbox.*`` flags); :attr:`SandboxSpec.key` is a stable digest that names a spec in
statistics and caches. The bind policy (:func:`check_bind`) runs before anything starts: a
bind that would give a slot a secret, a socket or a host control file is a
:class:`~structenv.ConfigError`, never a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ._exceptions import ConfigError

__all__ = [
    "Bind",
    "ResourceLimits",
    "SandboxSpec",
    "check_bind",
    "check_bind_roots",
    "sensitive_paths",
]

#: Paths inside a slot that a bind may not cover: the sandbox's own mounts.
_RESERVED_TARGETS = ("/proc", "/dev", "/sys", "/tmp", "/workspace", "/.structenv", "/run")
#: Host paths never bound into a slot (nor any directory holding one of them).
_SENSITIVE = (
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/var/run",
    "/var/lib/docker",
    "/var/lib/containerd",
    "/boot",
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/ssh",
    "/etc/docker",
    "/tmp/.X11-unix",
)
#: Per-home secrets (under every home directory and /root).
_HOME_SECRETS = (
    ".ssh",
    ".aws",
    ".azure",
    ".docker",
    ".gnupg",
    ".kube",
    ".netrc",
    ".git-credentials",
    ".pypirc",
    ".config/gcloud",
    ".config/gh",
    ".cache/structenv",
    ".bash_history",
)


class Bind(BaseModel):
    """An extra read-only bind: host ``source`` at ``target`` inside the slot.

    Attributes:
        source: Absolute host path (a file or directory).
        target: Absolute path inside the slot (default: the same as ``source``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str
    target: str = ""

    @model_validator(mode="after")
    def _absolute(self) -> Bind:
        if not os.path.isabs(self.source):
            raise ValueError(f"bind source must be an absolute path, got {self.source!r}")
        if not self.target:
            object.__setattr__(self, "target", self.source)
        target = os.path.normpath(self.target)
        if not os.path.isabs(target) or target == "/":
            raise ValueError(f"bind target must be an absolute path below /, got {self.target!r}")
        object.__setattr__(self, "target", target)
        return self

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        # "SRC" or "SRC:TARGET", as in `docker run -v` (read-only is implied).
        if isinstance(data, str):
            source, _, target = data.partition(":")
            return {"source": source, "target": target}
        return data


class ResourceLimits(BaseModel):
    """Per-slot resource limits of a spec; ``None`` keeps the backend's setting.

    Attributes:
        memory: Bytes of memory per slot (and address space per process).
        pids: Processes per slot.
        cpus: CPU cores per slot.
        file_size: Largest file a command may write.
        cpu_seconds: CPU seconds per process (0: none).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory: int | None = Field(default=None, gt=0)
    pids: int | None = Field(default=None, gt=0)
    cpus: float | None = Field(default=None, gt=0)
    file_size: int | None = Field(default=None, gt=0)
    cpu_seconds: int | None = Field(default=None, ge=0)


class SandboxSpec(BaseModel):
    """What a slot's filesystem and process environment hold.

    At most one base: nothing (the host's read-only system, the default), ``rootfs`` (a
    directory used as the slot's ``/``), ``image`` (a local container image) or
    ``dockerfile`` (built locally, once per content hash; ``context`` defaults to its
    directory). No registry is ever contacted: an image must exist in the local engine.

    Attributes:
        image: Local container image (name, tag or id).
        dockerfile: Path of a Dockerfile to build (once per content hash of it and its context).
        context: Build context directory of ``dockerfile``.
        rootfs: Host directory to use as the slot's root filesystem (read-only).
        binds: Extra read-only binds (see :func:`check_bind` for what is refused).
        env: Environment variables of every command (after the backend's defaults).
        path: Directories put first on ``PATH``.
        workdir: Directory commands start in, relative to the workspace.
        limits: Resource limits overriding the backend's.
        name: A label for statistics and logs (not part of the spec's identity).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    image: str | None = None
    dockerfile: str | None = None
    context: str | None = None
    rootfs: str | None = None
    binds: tuple[Bind, ...] = ()
    env: Mapping[str, str] = Field(default_factory=dict)
    path: tuple[str, ...] = ()
    workdir: str | None = None
    limits: ResourceLimits = Field(default_factory=ResourceLimits)
    name: str = Field(default="", exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _from_json(cls, data: Any) -> Any:
        # A flag's text (``--env.sandbox '{...}'`` or the folded ``--env.sandbox.*`` flags),
        # wherever the annotation is copied to (atroposlib rebuilds the config models).
        if isinstance(data, list) and len(data) == 1 and isinstance(data[0], str):
            data = data[0]
        if isinstance(data, str):
            try:
                return json.loads(data) if data.strip() else {}
            except ValueError as exc:
                raise ValueError(f"a sandbox spec as text must be a JSON object ({exc})") from None
        return data

    @field_validator("binds", "path", mode="before")
    @classmethod
    def _list_from_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v for v in value.split(",") if v] if not value.startswith("[") else value
        return value

    @field_validator("env", mode="before")
    @classmethod
    def _env_from_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.startswith("{"):
                return json.loads(value)
            pairs = [p.partition("=") for p in value.split(",") if p]
            return {k: v for k, _, v in pairs}
        if isinstance(value, Mapping):
            # --env.sandbox.env.PORT 8080 folds to a JSON number: a variable is its text.
            return {k: v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _check(self) -> SandboxSpec:
        bases = [b for b in ("image", "dockerfile", "rootfs") if getattr(self, b)]
        if len(bases) > 1:
            raise ValueError(f"a spec has one base at most, got {' and '.join(bases)}")
        if self.context and not self.dockerfile:
            raise ValueError("context needs a dockerfile")
        for p in (self.rootfs, self.dockerfile, self.context, *self.path):
            if p is not None and not os.path.isabs(p):
                raise ValueError(f"paths in a spec must be absolute, got {p!r}")
        if self.workdir is not None:
            norm = os.path.normpath(self.workdir)
            if os.path.isabs(norm) or norm == ".." or norm.startswith("../"):
                raise ValueError(f"workdir is relative to the workspace, got {self.workdir!r}")
        for key in self.env:
            if not key or "=" in key or "\0" in key:
                raise ValueError(f"bad environment variable name {key!r}")
        return self

    @property
    def key(self) -> str:
        """A stable digest of everything that makes the spec (not ``name``): 16 hex digits."""
        data = self.model_dump(mode="json")
        data["env"] = dict(sorted(self.env.items()))
        raw = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(raw).hexdigest()[:16]

    @property
    def label(self) -> str:
        """How statistics name the spec: ``name`` if set, else the base and the key."""
        if self.name:
            return self.name
        base = self.image or self.dockerfile or self.rootfs or "host"
        return f"{base}#{self.key[:8]}"

    @property
    def is_default(self) -> bool:
        """Whether this spec changes nothing (the backend's own default slot)."""
        return self.key == _DEFAULT_KEY

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SandboxSpec) and other.key == self.key


_DEFAULT_KEY = SandboxSpec().key


def _home_dirs() -> list[str]:
    homes = {"/root", os.path.expanduser("~")}
    try:
        homes.update(os.path.join("/home", n) for n in os.listdir("/home"))
    except OSError:
        pass
    return sorted(homes)


def sensitive_paths(extra: Iterable[str] = ()) -> list[str]:
    """Host paths a bind may neither be inside of nor contain (real paths)."""
    paths = [*_SENSITIVE, *extra]
    for home in _home_dirs():
        paths += [os.path.join(home, s) for s in _HOME_SECRETS]
    out = []
    for p in paths:
        out.append(os.path.normpath(p))
        real = os.path.realpath(p)
        if real != out[-1]:
            out.append(real)
    return out


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_bind(
    bind: Bind,
    *,
    denied: Iterable[str] = (),
    denied_prefixes: Iterable[str] = (),
    roots: Sequence[str] | None = None,
    where: str = "",
) -> str:
    """Apply the bind policy; return the bind's real host source path.

    Refused: a missing source; ``/``; a source inside, or containing, a sensitive path (the
    kernel's ``/proc``, ``/sys``, ``/dev``; ``/run`` and its sockets, the Docker socket and
    engine state; ``/etc/shadow`` and friends; SSH, cloud, Docker and GnuPG credentials in any
    home; ``denied`` — e.g. the server's own work and cache directories); a source whose
    real path has a name starting with one of ``denied_prefixes``; a socket or device; a
    target over the sandbox's own mounts; with ``roots`` (real paths, see
    :func:`check_bind_roots`), a source outside every one of them. Symlinks are resolved
    first, so a link to a refused path (or out of the roots) is refused too.

    Raises:
        ConfigError: The bind is refused; the message names the bind (``where``, default
            ``bind SRC:TARGET``) and the reason.
    """
    where = where or f"bind {bind.source}:{bind.target}"
    for reserved in _RESERVED_TARGETS:
        if _within(bind.target, reserved) or _within(reserved, bind.target):
            raise ConfigError(f"{where}: the target overlaps the sandbox's own {reserved}")
    real = os.path.realpath(bind.source)
    if roots is not None and not any(_within(real, root) for root in roots):
        allowed = ", ".join(roots) or "none"
        raise ConfigError(
            f"{where}: {real} is outside the backend's bind_roots ({allowed}); "
            "add a directory holding it to the backend's bind_roots option"
        )
    try:
        st = os.stat(real)
    except OSError as exc:
        raise ConfigError(f"{where}: the source does not exist ({exc.strerror})") from None
    if real == "/":
        raise ConfigError(f"{where}: binding the host's / is refused")
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise ConfigError(f"{where}: only files and directories may be bound (not sockets/devices)")
    for secret in sensitive_paths(denied):
        if _within(real, secret) or _within(secret, real):
            raise ConfigError(f"{where}: refused, it exposes {secret}")
    for prefix in denied_prefixes:
        parent = os.path.dirname(prefix.rstrip("/"))
        base = os.path.basename(prefix)
        if _within(real, parent) and os.path.basename(
            real[len(parent) :].lstrip("/").split("/")[0]
        ).startswith(base):
            raise ConfigError(f"{where}: refused, it is structenv's own {prefix}*")
        if _within(parent, real):
            raise ConfigError(f"{where}: refused, it contains structenv's own {prefix}*")
    return real


def check_bind_roots(
    roots: Iterable[str],
    *,
    denied: Iterable[str] = (),
    denied_prefixes: Iterable[str] = (),
    reserved: Iterable[str] = (),
) -> tuple[str, ...]:
    """Check a backend's ``bind_roots`` (the host directories binds and rootfs directories
    may come from); return their real paths.

    A root passes the bind policy itself (:func:`check_bind`: no secrets, sockets or
    structenv's own directories in it), is a directory, and neither is inside nor contains
    one of ``reserved`` (paths a root must not be mounted over, e.g. a container's system
    directories).

    Raises:
        ConfigError: A root is refused; the message names it and the reason.
    """
    out: list[str] = []
    denied, reserved = list(denied), list(reserved)
    for root in roots:
        where = f"bind root {root}"
        if not os.path.isabs(root):
            raise ConfigError(f"{where}: must be an absolute path")
        real = check_bind(
            Bind(source=root, target="/.bind-root"),
            denied=denied,
            denied_prefixes=denied_prefixes,
            where=where,
        )
        if not os.path.isdir(real):
            raise ConfigError(f"{where}: not a directory")
        for path in reserved:
            if _within(real, path) or _within(path, real):
                raise ConfigError(f"{where}: refused, it overlaps {path}")
        out.append(real)
    return tuple(out)

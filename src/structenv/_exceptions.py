"""The exception tree of structenv.

Everything structenv raises on purpose derives from :class:`StructEnvError`::

    StructEnvError
    ├── ConfigError                 bad input from the user; raised before anything starts
    ├── SandboxUnavailableError     isolation asked for (require_sandbox / allow_network=False)
    │                               is not usable here: fail closed, never fall back
    ├── BackendError                the control plane failed (start, scale, stop a host)
    │   └── HostCrashedError        a sandbox host vanished while a slot was in use
    ├── SlotError
    │   ├── SlotAcquireTimeout      no slot within the acquire deadline (also a TimeoutError)
    │   ├── StaleLeaseError         an exec/reset carried a lease the slot no longer has
    │   └── SlotBrokenError         the slot's sandbox is gone or quarantined
    ├── ProtocolError               a peer (sandbox server, tool server, LLM) spoke nonsense
    └── PolicyError                 an LLM endpoint failed after the allowed retries
        └── ContextExhaustedError   the conversation no longer fits the model's context

Deliberately *not* in the tree: cancellation (never converted), the builtin ``TimeoutError`` for
deadlines the caller set, anyio's ``ClosedResourceError`` (we closed it) and
``BrokenResourceError`` (the peer vanished). A nonzero exit code or a failing tool is data
(:class:`~structenv.ExecResult`, :class:`~structenv.ToolResult`), never an exception.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "ConfigError",
    "ContextExhaustedError",
    "HostCrashedError",
    "PolicyError",
    "ProtocolError",
    "SandboxUnavailableError",
    "SlotAcquireTimeout",
    "SlotBrokenError",
    "SlotError",
    "StaleLeaseError",
    "StructEnvError",
]


class StructEnvError(Exception):
    """Root of every error structenv raises on purpose."""


class ConfigError(StructEnvError, ValueError):
    """Invalid configuration or arguments; raised before any resource is created."""


class SandboxUnavailableError(StructEnvError):
    """Requested isolation is not available on this machine (fail closed)."""


class BackendError(StructEnvError):
    """The control plane of a backend failed."""


class HostCrashedError(BackendError):
    """A sandbox host died while it had slots in use."""


class SlotError(StructEnvError):
    """Base of slot-level failures."""


class SlotAcquireTimeout(SlotError, TimeoutError):
    """No slot became free before the acquire deadline.

    Attributes:
        pool_size: How many slots the pool holds.
        in_use: Slots leased at the moment of the timeout.
        waiters: Tasks (including this one) that were waiting.
        waited: Seconds this caller waited.
    """

    def __init__(self, *, pool_size: int, in_use: int, waiters: int, waited: float) -> None:
        self.pool_size = pool_size
        self.in_use = in_use
        self.waiters = waiters
        self.waited = waited
        super().__init__(
            f"no sandbox slot within {waited:.3g}s: pool size {pool_size}, {in_use} in use, "
            f"{waiters} waiting (raise the pool size or the acquire timeout)"
        )


class StaleLeaseError(SlotError):
    """An operation carried a lease generation the slot no longer has."""


class SlotBrokenError(SlotError):
    """The slot can no longer run anything (its host died or it was quarantined)."""


class ProtocolError(StructEnvError):
    """A peer answered something that does not follow the protocol."""


class PolicyError(StructEnvError):
    """The policy (LLM) endpoint failed after the retries the config allows."""


class ContextExhaustedError(PolicyError):
    """The conversation no longer fits the model's context window.

    Raised by a policy when the server refuses the prompt as too long (or a configured
    context budget is used up). The agent loop ends the trajectory with the finish reason
    ``"context_exhausted"``: an outcome of the trajectory, not an endpoint failure.
    """

"""ExecutorConfig: every knob of the executor, pool and batcher, validated once."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ._types import DEFAULT_MAX_OUTPUT

__all__ = ["ExecutorConfig"]


class ExecutorConfig(BaseModel):
    """Configuration of a :class:`~structenv.ToolExecutor`.

    Deadlines live here, not in function signatures: the executor applies them with
    ``fail_after`` / ``move_on_after`` around the operations they bound.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_window_ms: float = Field(
        0.0,
        ge=0,
        description="How long a batch stays open after its first call. 0 dispatches whatever "
        "is queued at once, so batches form under load without adding latency when idle.",
    )
    max_batch_size: int = Field(256, ge=1, description="A batch closes at this many calls.")
    max_pending_calls: int = Field(
        4096, ge=1, description="Capacity of the fan-in channel (back-pressure beyond it)."
    )
    pool_size: int | None = Field(
        None, ge=1, description="Slots leased at once (default: the backend's capacity)."
    )
    acquire_timeout: float = Field(60.0, gt=0, description="Seconds to wait for a slot.")
    release_timeout: float = Field(
        30.0, gt=0, description="Seconds a slot reset may take before the slot is quarantined."
    )
    trajectory_timeout: float | None = Field(
        None, gt=0, description="Deadline of a whole trajectory, slot acquisition included."
    )
    tool_timeout: float = Field(60.0, gt=0, description="Default deadline of one tool call.")
    max_tool_timeout: float = Field(
        600.0, gt=0, description="Largest per-call deadline a model may ask for."
    )
    tool_deadline_grace: float = Field(
        5.0,
        ge=0,
        description="Extra seconds the client waits beyond the server-enforced command deadline "
        "before giving up on the host.",
    )
    max_output_bytes: int = Field(DEFAULT_MAX_OUTPUT, ge=0, description="Cap on stdout/stderr.")
    allow_network: bool = Field(
        False, description="Slots may reach the network. Set by config only, never by a model."
    )
    require_sandbox: bool = Field(
        True, description="Refuse to run unless the backend isolates its slots."
    )
    shutdown_grace: float = Field(
        10.0, gt=0, description="Seconds in-flight calls may finish when the executor exits."
    )

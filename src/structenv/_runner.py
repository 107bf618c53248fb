"""run_group: one task group per group of trajectories; a failure is a result, not a crash."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, Literal, TypeVar

import anyio

from ._exceptions import StructEnvError

__all__ = ["Outcome", "run_group"]

T = TypeVar("T")
log = logging.getLogger("structenv.runner")

#: Exceptions that end one trajectory without being a harness failure.
TRAJECTORY_FAILURES: tuple[type[Exception], ...] = (TimeoutError, StructEnvError)


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome(Generic[T]):
    """What one member of a group produced: a value or the failure that ended it."""

    index: int
    value: T | None = None
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        """The member returned normally."""
        return self.error is None


async def run_group(
    member: Callable[[int], Awaitable[T]],
    size: int,
    *,
    on_failure: Literal["result", "cancel_group"] = "result",
    failures: tuple[type[Exception], ...] = TRAJECTORY_FAILURES,
) -> list[Outcome[T]]:
    """Run ``member(0) .. member(size - 1)`` concurrently in one task group.

    A member that raises one of ``failures`` (deadlines and structenv errors by default)
    becomes an :class:`Outcome` with ``error`` set and its siblings go on, unless
    ``on_failure="cancel_group"``, in which case the first failure cancels the rest (their
    outcomes carry the failure that stopped them). Any other exception is a harness failure:
    it cancels the group and propagates in an exception group.

    Cancellation: every member is cancelled and the cancellation propagates; no outcome list
    is returned.
    """
    outcomes: list[Outcome[T] | None] = [None] * size
    first_failure: list[Exception] = []

    async with anyio.create_task_group() as tg:

        async def run(i: int) -> None:
            try:
                outcomes[i] = Outcome(i, value=await member(i))
            except failures as exc:
                log.info("trajectory %d failed: %r", i, exc)
                outcomes[i] = Outcome(i, error=exc)
                if on_failure == "cancel_group" and not first_failure:
                    first_failure.append(exc)
                    tg.cancel_scope.cancel()

        for i in range(size):
            tg.start_soon(run, i)

    stopped = first_failure[0] if first_failure else None
    return [
        o if o is not None else Outcome(i, error=stopped or RuntimeError("member never finished"))
        for i, o in enumerate(outcomes)
    ]

"""How structenv's commands behave as processes: signals, and errors that end a command.

Signals (:func:`run_until_signal`): the first SIGINT or SIGTERM (Ctrl-C, ``timeout``, slurm,
Kubernetes) prints one line and cancels the work (nothing else is printed about it), so the
orderly shutdown runs once: every slot released, hosts stopped, the run's work dir removed.
The command then exits with ``128 + signal`` (:class:`Interrupted`). A second signal while
that shutdown runs prints a second line and stops at once: the emergency cleanups
(:mod:`structenv._emergency`: host processes killed, work dirs removed) run synchronously and
the process exits with the same status. Sandbox hosts run in sessions of their own, so the
terminal's Ctrl-C reaches only this process, never the hosts before it.

Errors (:func:`describe_error`, :func:`report_error`): an error that ends a command is one
line on stderr saying what failed and what to do (the exception-group structure of task
groups is looked through); the traceback is printed only with ``--debug`` or when logging is
at DEBUG.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import anyio
import tenacity

from . import _emergency
from ._exceptions import StructEnvError

__all__ = ["Interrupted", "describe_error", "report_error", "run_until_signal"]

T = TypeVar("T")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The command was stopped by a signal after its orderly shutdown finished.

    Attributes:
        signum: The signal that stopped it; the exit status is ``128 + signum``.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


async def run_until_signal(fn: Callable[..., Awaitable[T]], *args: Any, prog: str) -> T:
    """Await ``fn(*args)``; the first SIGINT/SIGTERM cancels it, a second one forces the exit.

    Outside the main thread (where signals cannot be handled) this is just ``await fn(*args)``.

    Raises:
        Interrupted: A signal stopped the work; the orderly shutdown has finished.

    Cancellation: ``fn`` is cancelled and awaited; the signal handlers are restored.
    """
    if threading.current_thread() is not threading.main_thread():
        return await fn(*args)
    received: list[int] = []
    outcome: list[tuple[bool, Any]] = []
    work_scope = anyio.CancelScope()
    with anyio.open_signal_receiver(*_SIGNALS) as signals:
        async with anyio.create_task_group() as tg:

            async def work() -> None:
                try:
                    with work_scope:
                        outcome.append((True, await fn(*args)))
                except Exception as exc:  # re-raised below, outside the task group
                    outcome.append((False, exc))
                finally:
                    tg.cancel_scope.cancel()  # stops the signal watcher below

            tg.start_soon(work)
            async for signum in signals:
                if not received:
                    received.append(signum)
                    name = signal.Signals(signum).name
                    print(
                        f"{prog}: {name} received; shutting down (send it again to stop at once)",
                        file=sys.stderr,
                        flush=True,
                    )
                    work_scope.cancel()
                else:
                    name = signal.Signals(signum).name
                    print(f"{prog}: {name} received again; stopping at once", file=sys.stderr)
                    _force_exit(received[0])
    if received:
        cause = outcome[0][1] if outcome and not outcome[0][0] else None
        raise Interrupted(received[0]) from cause
    if not outcome:  # pragma: no cover - work_scope is only cancelled by a signal
        raise RuntimeError("the command was cancelled without a signal")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def _force_exit(signum: int) -> None:
    """Second signal: kill hosts and remove work dirs synchronously, then exit at once."""
    _emergency.run_all()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(128 + signum)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, cancellations and exits left out; a
    retry that gave up (tenacity's ``RetryError``) stands for its last attempt's error."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    if not isinstance(exc, Exception):  # cancellation, KeyboardInterrupt, SystemExit
        return []
    last = _last_attempt_error(exc)
    if last is not None:
        return _leaves(last)
    return [exc]


def _last_attempt_error(exc: BaseException) -> BaseException | None:
    """The error of the last attempt of a tenacity ``RetryError``; ``None`` for anything else
    (or an attempt that was cancelled or did not finish)."""
    if not isinstance(exc, tenacity.RetryError):
        return None
    try:
        last = exc.last_attempt.exception()
    except BaseException:  # a cancelled or unfinished attempt: keep the RetryError itself
        return None
    return last if isinstance(last, BaseException) else None


def unwrap_retry(exc: BaseException) -> tuple[BaseException, int | None]:
    r"""The innermost error behind (nested) tenacity ``RetryError``\ s and the outermost
    retry's attempt count; ``(exc, None)`` for anything that is not a ``RetryError``."""
    last = _last_attempt_error(exc)
    if last is None:
        return exc, None
    assert isinstance(exc, tenacity.RetryError)
    return unwrap_retry(last)[0], exc.last_attempt.attempt_number


def _attempts(exc: BaseException) -> dict[int, int]:
    """id of each given-up retry's last error -> how many attempts were made."""
    if isinstance(exc, BaseExceptionGroup):
        return {k: v for sub in exc.exceptions for k, v in _attempts(sub).items()}
    last = _last_attempt_error(exc)
    if last is None:
        return {}
    found = _attempts(last)
    assert isinstance(exc, tenacity.RetryError)
    found.setdefault(id(last), exc.last_attempt.attempt_number)
    return found


def _where(exc: BaseException) -> str:
    tb = exc.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return f"{code.co_name} at {code.co_filename}:{tb.tb_lineno}"


def _describe_validation(exc: Any, prefixes: Mapping[str, str]) -> str:
    prefix = prefixes.get(str(getattr(exc, "title", "")), "")
    parts = []
    for error in exc.errors()[:3]:
        loc = ".".join(str(p) for p in error.get("loc", ()))
        msg = str(error.get("msg"))
        if not loc:  # a model-level check: its message names the fields itself
            parts.append(msg.removeprefix("Value error, "))
            continue
        got = error.get("input")
        shown = f" (got {got!r})" if isinstance(got, str | int | float | bool) else ""
        parts.append(f"{prefix}{loc}: {msg}{shown}")
    more = exc.error_count() - len(parts)
    tail = f" (and {more} more)" if more > 0 else ""
    return "invalid configuration: " + "; ".join(parts) + tail


def describe_error(exc: BaseException, *, prefixes: Mapping[str, str] | None = None) -> str:
    """One line saying what failed and what to do.

    Args:
        exc: The error (exception groups are looked through: the first real error is shown).
        prefixes: Pydantic model title -> prefix of its field names in messages (``"--env."``).
    """
    leaves = _leaves(exc) or [exc]
    # A deliberate error (StructEnvError, a bad value) explains itself; prefer it to a
    # secondary failure it caused elsewhere in the group.
    leaves.sort(key=lambda e: 0 if _is_user_facing(e) else 1)
    first = leaves[0]
    if _is_validation_error(first):
        line = _describe_validation(first, prefixes or {})
    elif isinstance(first, StructEnvError | OSError):
        line = f"{type(first).__name__}: {first}"
    else:
        where = _where(first)
        line = f"{type(first).__name__}: {first}" + (f" (raised in {where})" if where else "")
    tries = _attempts(exc).get(id(first))
    if tries:
        line += f" (gave up after {tries} attempts)"
    if len(leaves) > 1:
        line += f" (and {len(leaves) - 1} more error(s))"
    return " ".join(line.split())  # one line, whatever the messages held


def _is_validation_error(exc: BaseException) -> bool:
    return type(exc).__name__ == "ValidationError" and hasattr(exc, "errors")


def _is_user_facing(exc: BaseException) -> bool:
    return isinstance(exc, StructEnvError) or _is_validation_error(exc)


def debug_wanted(argv_debug: bool) -> bool:
    """Whether tracebacks are wanted: ``--debug`` or the root logger at DEBUG."""
    return argv_debug or logging.getLogger().isEnabledFor(logging.DEBUG)


def report_error(
    exc: BaseException,
    *,
    prog: str,
    debug: bool = False,
    prefixes: Mapping[str, str] | None = None,
) -> int:
    """Print ``exc`` as one line on stderr (the traceback first when ``debug``); the exit
    status to use (``128 + signal`` for :class:`Interrupted`, else 1)."""
    if isinstance(exc, Interrupted):
        return exc.exit_status  # its one line was printed when the signal arrived
    if debug_wanted(debug):
        traceback.print_exception(exc, file=sys.stderr)
    hint = "" if debug_wanted(debug) else " (run with --debug for the traceback)"
    bug = not any(_is_user_facing(e) or isinstance(e, OSError) for e in _leaves(exc) or [exc])
    print(
        f"{prog}: error: {describe_error(exc, prefixes=prefixes)}{hint if bug else ''}",
        file=sys.stderr,
        flush=True,
    )
    return 1

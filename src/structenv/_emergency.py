"""Cleanups that must run even when the process exits at once (a second SIGINT/SIGTERM).

The orderly shutdown (cancellation, shielded and bounded teardown) removes everything a run
made. When the user insists — a second signal while that shutdown runs — the process exits
without waiting for it, and what only the orderly path would remove is taken care of here:
a backend registers a *synchronous*, bounded callback while it holds local resources (host
processes, the run's work dir) and unregisters it once its own teardown finished.

The callbacks run in the signal-handling task, on the event loop's thread, just before
``os._exit``: they must not await, and they must tolerate running while the orderly teardown
is half-way through.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

__all__ = ["register", "run_all", "unregister"]

logger = logging.getLogger("structenv")

_callbacks: dict[int, Callable[[], None]] = {}
_tokens = itertools.count()


def register(callback: Callable[[], None]) -> int:
    """Run ``callback`` if the process is forced to exit; returns a token for
    :func:`unregister`."""
    token = next(_tokens)
    _callbacks[token] = callback
    return token


def unregister(token: int) -> None:
    """Forget a callback (its owner cleaned up itself). Unknown tokens are ignored."""
    _callbacks.pop(token, None)


def run_all() -> None:
    """Run every registered callback once, newest first; errors are logged, not raised."""
    while _callbacks:
        token = max(_callbacks)
        callback = _callbacks.pop(token)
        try:
            callback()
        except Exception:  # one failed cleanup must not stop the others
            logger.exception("emergency cleanup %r failed", callback)

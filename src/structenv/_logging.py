"""Logging: what structenv's commands configure, and what importing structenv never does.

Imported as a library, structenv configures nothing: no handler, no root level, no
``basicConfig`` (the process's logging belongs to the application). The one exception is a
repair: atroposlib pins the loggers of ``atroposlib.envs.base`` and ``atroposlib.envs.eval``
at DEBUG when it is imported (``logger.setLevel(logging.DEBUG)``), so once anything has a
root handler — the application's ``basicConfig``, or atroposlib's own module-level
``logging.warning(...)``, which calls ``basicConfig`` itself — every item's DEBUG lines
reach it whatever level the application chose. :func:`unpin_atroposlib_loggers` sets them
back to ``NOTSET`` (inherit), so they follow the application's configuration like any other
logger; a level the application sets on them later is left alone.

structenv's commands (``structenv demo``, ``structenv run``, ``structenv bench env``, an env's
``serve``/``process``) are applications and do configure: :func:`configure_cli_logging`.
"""

from __future__ import annotations

import logging

__all__ = ["NOISY_LOGGERS", "configure_cli_logging", "unpin_atroposlib_loggers"]

#: Libraries whose INFO/DEBUG lines are per request or per item: kept at WARNING by the
#: commands unless ``--debug``.
NOISY_LOGGERS = ("atroposlib", "httpx", "httpcore", "urllib3", "openai", "aiohttp", "asyncio")
#: atroposlib modules that pin their logger at DEBUG on import.
_PINNED = ("atroposlib.envs.base", "atroposlib.envs.eval")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def unpin_atroposlib_loggers() -> None:
    """Let atroposlib's DEBUG-pinned loggers inherit their level again (see the module
    docstring). Touches only a logger still at the DEBUG atroposlib set."""
    for name in _PINNED:
        log = logging.getLogger(name)
        if log.level == logging.DEBUG:
            log.setLevel(logging.NOTSET)


def configure_cli_logging(*, debug: bool) -> None:
    """Logging of a structenv command: WARNING and above on stderr (everything with
    ``debug``), third-party per-request noise (:data:`NOISY_LOGGERS`) at WARNING unless
    ``debug``. A root handler someone already installed (an env module's own
    ``basicConfig``) is kept, and so is its level unless ``debug`` lowers it."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    if debug:
        root.setLevel(logging.DEBUG)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if debug else logging.WARNING)
    for name in _PINNED:
        logging.getLogger(name).setLevel(logging.NOTSET)

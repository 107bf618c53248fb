"""structenv's HTML viewer in place of atroposlib's, for ``process`` mode.

atroposlib's ``BaseEnv.process_manager`` ends with ``generate_html(jsonl)`` from
``atroposlib.frontend.jsonl2html``, which renders message text as unescaped markdown (a file
the model wrote and ``cat``-ed runs as script in the page), hides tool tags and repeats the
tool schema per member. While :func:`structenv_html` is active the name ``generate_html`` in
``atroposlib.envs.base`` is :func:`structenv._viewer.write_html` instead (escaped, no script;
see ``docs/writing-an-env.md``). Entered and left around each ``process_manager``; nested and
concurrent uses are counted, so the original comes back when the last one leaves.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import atroposlib.envs.base as _base

from ..._viewer import write_html

__all__ = ["generate_html", "structenv_html"]

log = logging.getLogger("structenv.adapters.atropos")

_original: Any = None
_users = 0


def generate_html(input_path: str | None, output_path: str | None = None) -> Path | None:
    """atroposlib's ``generate_html`` signature, rendering with structenv's viewer.

    Nothing to do (``None``) when the env saves no groups. An unreadable file is logged,
    not raised: the groups are already written and the run must still end cleanly.
    """
    if input_path is None:
        return None
    try:
        target = write_html(input_path, output_path)
    except (OSError, ValueError) as exc:
        log.error("could not write the HTML view of %s: %s", input_path, exc)
        return None
    log.info("HTML view of the groups: %s", target)
    return target


@contextmanager
def structenv_html() -> Iterator[None]:
    """Within the block, atroposlib's process mode writes structenv's HTML view."""
    global _original, _users
    if _users == 0:
        _original = _base.generate_html
        _base.generate_html = generate_html
    _users += 1
    try:
        yield
    finally:
        _users -= 1
        if _users == 0:
            _base.generate_html = _original
            _original = None

"""Shared test configuration: every async test runs on asyncio and trio; a hang guard."""

from __future__ import annotations

import faulthandler
import os
import sys
from collections.abc import Iterator

import pytest

#: A test that runs longer than this dumps every thread's stack and kills the run, so a hang
#: shows where it hangs instead of eating CI's budget.
HANG_GUARD_SECONDS = float(os.environ.get("STRUCTENV_HANG_GUARD", "300"))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    faulthandler.dump_traceback_later(HANG_GUARD_SECONDS, exit=True, file=sys.__stderr__ or 2)
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()


#: The testing kit's plugin is opt-in (docs/testing.md); this suite uses its fixtures.
pytest_plugins = ["pytester", "structenv.testing.pytest_plugin"]

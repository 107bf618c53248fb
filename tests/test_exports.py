"""Every public namespace's ``__all__`` is complete, sorted and exports nothing else."""

from __future__ import annotations

import importlib
import types

import pytest

PUBLIC = [
    "structenv",
    "structenv.abc",
    "structenv.adapters",
    "structenv.agent",
    "structenv.backends",
    "structenv.sandbox",
    "structenv.testing",
    "structenv.tools",
]


@pytest.mark.parametrize("name", PUBLIC)
def test_all_is_complete_and_sorted(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert exported == sorted(exported), f"{name}.__all__ is not sorted"
    assert [n for n in exported if not hasattr(module, n)] == []
    # No helper leaks out as a public name (typing names, imported classes, ...): every
    # public attribute that is not a submodule is in __all__.
    public = {
        n
        for n, value in vars(module).items()
        if not n.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public - set(exported) == set(), f"{name} exposes names missing from __all__"

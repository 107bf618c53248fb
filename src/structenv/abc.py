"""What backends implement: :class:`SandboxBackend` and :class:`Slot` (docs/adding-a-backend.md).

The implementation lives in ``structenv._abc``; this namespace re-exports the public names only.
"""

from ._abc import BackendStatistics as BackendStatistics
from ._abc import FileEntry as FileEntry
from ._abc import ResultCallback as ResultCallback
from ._abc import SandboxBackend as SandboxBackend
from ._abc import Slot as Slot
from ._abc import SpecStatistics as SpecStatistics

__all__ = [
    "BackendStatistics",
    "FileEntry",
    "ResultCallback",
    "SandboxBackend",
    "Slot",
    "SpecStatistics",
]

"""Testing kit: a fake backend, the backend contract suite, leak checks, virtual time.

Works under anyio's pytest plugin and under pytest-trio. The fixtures live in the opt-in
pytest plugin :mod:`structenv.testing.pytest_plugin`; docs/testing.md shows every feature.
"""

from ._clock import VirtualTimeEventLoop as VirtualTimeEventLoop
from ._clock import virtual_time_backend as virtual_time_backend
from ._contract import BackendFactory as BackendFactory
from ._contract import BorrowedBackend as BorrowedBackend
from ._contract import check_backend as check_backend
from ._fake import ExecHandler as ExecHandler
from ._fake import FakeBackend as FakeBackend
from ._fake import FakeSlot as FakeSlot
from ._leaks import LeakChecker as LeakChecker
from ._leaks import LeakError as LeakError
from ._leaks import assert_no_leaks as assert_no_leaks
from ._leaks import child_processes as child_processes
from ._leaks import cmdline as cmdline
from ._modal_fake import FakeModal as FakeModal
from ._modal_fake import FakeSandbox as FakeSandbox
from ._modal_fake import open_modal_fake as open_modal_fake
from ._nomad_fake import FakeAllocation as FakeAllocation
from ._nomad_fake import NomadFake as NomadFake
from ._nomad_fake import open_nomad_fake as open_nomad_fake
from ._policy_server import Fault as Fault
from ._policy_server import PolicyServer as PolicyServer
from ._policy_server import PolicyServerStatistics as PolicyServerStatistics
from ._policy_server import ReplayScript as ReplayScript
from ._policy_server import ReplayStep as ReplayStep
from ._policy_server import Script as Script
from ._policy_server import serve_policy_server as serve_policy_server
from ._policy_server import task_marker as task_marker

__all__ = [
    "BackendFactory",
    "BorrowedBackend",
    "ExecHandler",
    "FakeAllocation",
    "FakeBackend",
    "FakeModal",
    "FakeSandbox",
    "FakeSlot",
    "Fault",
    "LeakChecker",
    "LeakError",
    "NomadFake",
    "PolicyServer",
    "PolicyServerStatistics",
    "ReplayScript",
    "ReplayStep",
    "Script",
    "VirtualTimeEventLoop",
    "assert_no_leaks",
    "check_backend",
    "child_processes",
    "cmdline",
    "open_modal_fake",
    "open_nomad_fake",
    "serve_policy_server",
    "task_marker",
    "virtual_time_backend",
]

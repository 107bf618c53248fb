"""structenv: structured-concurrency agent trajectories with sandboxed tool calls."""

from ._batcher import Batcher as Batcher
from ._batcher import BatcherStatistics as BatcherStatistics
from ._config import ExecutorConfig as ExecutorConfig
from ._exceptions import BackendError as BackendError
from ._exceptions import ConfigError as ConfigError
from ._exceptions import ContextExhaustedError as ContextExhaustedError
from ._exceptions import HostCrashedError as HostCrashedError
from ._exceptions import PolicyError as PolicyError
from ._exceptions import ProtocolError as ProtocolError
from ._exceptions import SandboxUnavailableError as SandboxUnavailableError
from ._exceptions import SlotAcquireTimeout as SlotAcquireTimeout
from ._exceptions import SlotBrokenError as SlotBrokenError
from ._exceptions import SlotError as SlotError
from ._exceptions import StaleLeaseError as StaleLeaseError
from ._exceptions import StructEnvError as StructEnvError
from ._executor import ExecutorStatistics as ExecutorStatistics
from ._executor import LatencyStatistics as LatencyStatistics
from ._executor import ToolExecutor as ToolExecutor
from ._executor import Trajectory as Trajectory
from ._pool import PoolStatistics as PoolStatistics
from ._pool import SlotPool as SlotPool
from ._runner import Outcome as Outcome
from ._runner import run_group as run_group
from ._spec import Bind as Bind
from ._spec import ResourceLimits as ResourceLimits
from ._spec import SandboxSpec as SandboxSpec
from ._types import ExecRequest as ExecRequest
from ._types import ExecResult as ExecResult
from ._types import ToolCall as ToolCall
from ._types import ToolResult as ToolResult

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "Batcher",
    "BatcherStatistics",
    "Bind",
    "ConfigError",
    "ContextExhaustedError",
    "ExecRequest",
    "ExecResult",
    "ExecutorConfig",
    "ExecutorStatistics",
    "HostCrashedError",
    "LatencyStatistics",
    "Outcome",
    "PolicyError",
    "PoolStatistics",
    "ProtocolError",
    "ResourceLimits",
    "SandboxSpec",
    "SandboxUnavailableError",
    "SlotAcquireTimeout",
    "SlotBrokenError",
    "SlotError",
    "SlotPool",
    "StaleLeaseError",
    "StructEnvError",
    "ToolCall",
    "ToolExecutor",
    "ToolResult",
    "Trajectory",
    "run_group",
]

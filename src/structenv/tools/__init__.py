"""Tools the model can call: the registry, built-in sandbox tools, external tool servers."""

from ._base import CommandTool as CommandTool
from ._base import Tool as Tool
from ._base import ToolContext as ToolContext
from ._base import ToolRegistry as ToolRegistry
from ._base import format_exec_result as format_exec_result
from ._builtin import ListFilesTool as ListFilesTool
from ._builtin import ReadFileTool as ReadFileTool
from ._builtin import TerminalTool as TerminalTool
from ._builtin import WriteFileTool as WriteFileTool
from ._builtin import default_registry as default_registry
from ._client import ExternalTool as ExternalTool
from ._client import ToolServerClient as ToolServerClient
from ._client import ToolServerError as ToolServerError
from ._server import ServedTool as ServedTool
from ._server import ToolServer as ToolServer
from ._server import serve_tool_server as serve_tool_server
from ._stateful import StatefulTerminalTool as StatefulTerminalTool
from ._stateful import TerminalSlot as TerminalSlot
from ._stateful import TmuxTool as TmuxTool

__all__ = [
    "CommandTool",
    "ExternalTool",
    "ListFilesTool",
    "ReadFileTool",
    "ServedTool",
    "StatefulTerminalTool",
    "TerminalSlot",
    "TerminalTool",
    "TmuxTool",
    "Tool",
    "ToolContext",
    "ToolRegistry",
    "ToolServer",
    "ToolServerClient",
    "ToolServerError",
    "WriteFileTool",
    "default_registry",
    "format_exec_result",
    "serve_tool_server",
]

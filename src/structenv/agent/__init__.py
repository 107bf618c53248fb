"""The agent layer: policy clients, tool-call parsing and the ReACT loop."""

from ._openai import OpenAIPolicy as OpenAIPolicy
from ._openai import OpenAIPolicyConfig as OpenAIPolicyConfig
from ._openai import PolicyStatistics as PolicyStatistics
from ._openai import parse_chat_completion as parse_chat_completion
from ._parsing import ParsedMessage as ParsedMessage
from ._parsing import ParseError as ParseError
from ._parsing import parse_hermes as parse_hermes
from ._parsing import parse_message as parse_message
from ._parsing import parse_openai_tool_calls as parse_openai_tool_calls
from ._policy import Completion as Completion
from ._policy import Policy as Policy
from ._prompts import format_parse_error as format_parse_error
from ._prompts import format_tool_response as format_tool_response
from ._prompts import hermes_system_prompt as hermes_system_prompt
from ._react import AgentConfig as AgentConfig
from ._react import AgentResult as AgentResult
from ._react import AgentTask as AgentTask
from ._react import FinishReason as FinishReason
from ._react import ToolRunner as ToolRunner
from ._react import run_agent as run_agent
from ._tokenizer import TinyCodec as TinyCodec
from ._tokenizer import build_tiny_tokenizer as build_tiny_tokenizer
from ._tokenizer import default_tokenizer_dir as default_tokenizer_dir
from ._tokens import PromptRenderer as PromptRenderer
from ._tokens import TokenTracker as TokenTracker
from ._tokens import TrackedPolicy as TrackedPolicy

__all__ = [
    "AgentConfig",
    "AgentResult",
    "AgentTask",
    "Completion",
    "FinishReason",
    "OpenAIPolicy",
    "OpenAIPolicyConfig",
    "ParseError",
    "ParsedMessage",
    "Policy",
    "PolicyStatistics",
    "PromptRenderer",
    "TinyCodec",
    "TokenTracker",
    "ToolRunner",
    "TrackedPolicy",
    "build_tiny_tokenizer",
    "default_tokenizer_dir",
    "format_parse_error",
    "format_tool_response",
    "hermes_system_prompt",
    "parse_chat_completion",
    "parse_hermes",
    "parse_message",
    "parse_openai_tool_calls",
    "run_agent",
]

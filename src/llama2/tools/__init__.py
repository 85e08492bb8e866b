"""Tool use: the call format inside chat answers (format.py), the tools the engine runs (toolbox.py: an exact
calculator, BM25 search over a local corpus, registered Python functions)."""

from .format import (CALL_CLOSE, CALL_OPEN, RESULT_CLOSE, RESULT_OPEN, ToolCall, ToolSpec, as_spec,
                     final_answer, parse_call_block, result_text, results_text, split_calls, tools_prompt,
                     with_tools_prompt)
from .search import Search
from .toolbox import Tool, Toolbox, as_specs, calculator_tool, load_tools, search_tool, tool_from_function

__all__ = ["CALL_CLOSE", "CALL_OPEN", "RESULT_CLOSE", "RESULT_OPEN", "ToolCall", "ToolSpec", "as_spec",
           "final_answer", "parse_call_block", "result_text", "results_text", "split_calls", "tools_prompt",
           "with_tools_prompt", "Search", "Tool", "Toolbox", "as_specs", "calculator_tool", "load_tools",
           "search_tool", "tool_from_function"]

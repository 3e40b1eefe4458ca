"""Gymnasium tool environments. Importing this package registers the built-in ids (``alp/MathTool-v0``, ...)."""

from envs.base import ToolEnv, ToolEnvConfig
from envs.datasets import DatasetConfig, load_tasks
from envs.grading import Grader, GradeResult, GradingConfig, extract_boxed, grade_answer
from envs.math_env import MathEnvConfig, MathToolEnv
from envs.parsing import STOP_STRINGS, ParsedTurn, parse_turn
from envs.protocol import ChatEnv, StepInfo
from envs.registration import BUILTIN_IDS, load_env_modules, register_builtins, register_env, register_tool_env
from envs.synthetic import SyntheticTasks, make_task
from envs.task import Task
from envs.tools import PYTHON_TOOL, Tool, ToolContext, ToolOutput, tool, tool_prompt_section

register_builtins()

__all__ = [
    "BUILTIN_IDS",
    "ChatEnv",
    "PYTHON_TOOL",
    "STOP_STRINGS",
    "DatasetConfig",
    "GradeResult",
    "Grader",
    "GradingConfig",
    "MathEnvConfig",
    "MathToolEnv",
    "ParsedTurn",
    "StepInfo",
    "SyntheticTasks",
    "Task",
    "Tool",
    "ToolContext",
    "ToolEnv",
    "ToolEnvConfig",
    "ToolOutput",
    "extract_boxed",
    "grade_answer",
    "load_env_modules",
    "load_tasks",
    "make_task",
    "parse_turn",
    "register_builtins",
    "register_env",
    "register_tool_env",
    "tool",
    "tool_prompt_section",
]

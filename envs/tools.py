"""Tools are typed Python functions; their JSON schema (for chat templates' ``tools=``) comes from the signature.

A user writes::

    def lookup(city: str, unit: Literal["C", "F"] = "C") -> str:
        '''Current temperature of a city.

        Args:
            city: City name, e.g. "Paris".
            unit: Temperature unit.
        '''

and `Tool.from_function(lookup)` gives the schema, argument validation and a call that never raises (an exception
becomes an error observation). A parameter annotated `ToolContext` is injected by the env and hidden from the
schema: that is how the built-in `python` tool reaches the episode's persistent sandbox session.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from sandbox.base import ExecResult, ExecStatus, Session

logger = logging.getLogger(__name__)


@dataclass
class ToolContext:
    """What a tool may use besides its arguments. `session()` opens the episode's sandbox session on first use."""

    session: Callable[[], Session]
    timeout_s: float | None = None
    env: Any = None


@dataclass
class ToolOutput:
    """Result of one tool call as the env sees it: text for the model plus flags for `info`."""

    content: str
    error: bool = False
    status: str = "ok"  # ExecStatus value for sandboxed code; "ok" / "error" for host tools
    info: dict = field(default_factory=dict)


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}


def _schema_of(tp: Any) -> dict:
    """JSON schema of a type annotation (the subset chat templates and models understand)."""
    if tp is inspect.Parameter.empty or tp is Any:
        return {}
    origin = get_origin(tp)
    if origin is Literal:
        values = list(get_args(tp))
        out: dict = {"enum": values}
        kinds = {_JSON_TYPES.get(type(v)) for v in values}
        if len(kinds) == 1 and None not in kinds:
            out["type"] = kinds.pop()
        return out
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return _schema_of(args[0]) if len(args) == 1 else {"anyOf": [_schema_of(a) for a in args]}
    if origin in (list, tuple, set, typing.Sequence):
        args = get_args(tp)
        return {"type": "array", **({"items": _schema_of(args[0])} if args else {})}
    if origin is dict:
        return {"type": "object"}
    if tp in _JSON_TYPES:
        return {"type": _JSON_TYPES[tp]}
    return {}


def _parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {param: description}) from a Google-style ``Args:`` section or Sphinx ``:param x:`` lines."""
    doc = inspect.cleandoc(doc or "")
    params: dict[str, str] = {}
    for m in re.finditer(r":param\s+(\w+):\s*(.+)", doc):
        params[m.group(1)] = m.group(2).strip()
    section = re.search(r"^(?:Args|Arguments|Parameters):\s*\n((?:[ \t]+.*\n?|\s*\n)*)", doc, re.MULTILINE)
    if section:
        current = None
        for line in section.group(1).splitlines():
            m = re.match(r"\s+(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)", line)
            if m and (current is None or len(line) - len(line.lstrip()) <= 8):
                current = m.group(1)
                params[current] = m.group(2).strip()
            elif current and line.strip():
                params[current] += " " + line.strip()
    description = re.split(
        r"\n\s*\n|^(?:Args|Arguments|Parameters|Returns|Raises):|^:param", doc, maxsplit=1, flags=re.MULTILINE
    )
    return " ".join(description[0].split()), params


def _type_ok(value: Any, schema: dict) -> bool:
    if "enum" in schema:
        return value in schema["enum"]
    if "anyOf" in schema:
        return any(_type_ok(value, s) for s in schema["anyOf"])
    kind = schema.get("type")
    checks = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
    }
    return checks.get(kind, lambda v: True)(value)


class Tool:
    """A callable the model may invoke by name, with its JSON schema and argument validation."""

    def __init__(self, fn: Callable[..., Any], name: str | None = None, description: str | None = None):
        self.fn = fn
        self.name = name or fn.__name__
        doc_description, doc_params = _parse_docstring(fn.__doc__)
        self.description = description or doc_description or self.name
        hints = typing.get_type_hints(fn)
        self.context_param: str | None = None
        properties: dict[str, dict] = {}
        required: list[str] = []
        for pname, param in inspect.signature(fn).parameters.items():
            tp = hints.get(pname, param.annotation)
            if tp is ToolContext:
                self.context_param = pname
                continue
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            prop = _schema_of(tp)
            if pname in doc_params:
                prop["description"] = doc_params[pname]
            properties[pname] = prop
            if param.default is inspect.Parameter.empty:
                required.append(pname)
        self.parameters = {"type": "object", "properties": properties, "required": required}

    @classmethod
    def from_function(cls, fn: Callable[..., Any], name: str | None = None, description: str | None = None) -> Tool:
        return cls(fn, name=name, description=description)

    def schema(self) -> dict:
        """OpenAI/HF function schema, the form `tokenizer.apply_chat_template(tools=[...])` accepts."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def validate(self, arguments: Any) -> str | None:
        """None when `arguments` fit the schema, else a message for the model."""
        if not isinstance(arguments, dict):
            return f"arguments of '{self.name}' must be a JSON object, got {type(arguments).__name__}"
        props = self.parameters["properties"]
        unknown = sorted(set(arguments) - set(props))
        if unknown:
            return f"unknown argument(s) {unknown} for '{self.name}'; expected {sorted(props)}"
        missing = [p for p in self.parameters["required"] if p not in arguments]
        if missing:
            return f"missing required argument(s) {missing} for '{self.name}'"
        for key, value in arguments.items():
            if not _type_ok(value, props[key]):
                return f"argument '{key}' of '{self.name}' should be {props[key].get('type', props[key])}"
        return None

    def __call__(self, arguments: dict, ctx: ToolContext) -> ToolOutput:
        """Run the tool; validation errors and exceptions become error outputs, never raise."""
        problem = self.validate(arguments)
        if problem:
            return ToolOutput(f"Error: {problem}", error=True, status="bad_arguments")
        kwargs = dict(arguments)
        if self.context_param:
            kwargs[self.context_param] = ctx
        try:
            result = self.fn(**kwargs)
        except Exception as exc:  # noqa: BLE001  a user tool's failure is the model's observation, not a crash of the episode
            return ToolOutput(f"Error: {type(exc).__name__}: {exc}", error=True, status="error")
        if isinstance(result, ToolOutput):
            return result
        return ToolOutput(result if isinstance(result, str) else repr(result))

    def __repr__(self) -> str:
        return f"Tool({self.name!r})"


def tool(fn: Callable | None = None, *, name: str | None = None, description: str | None = None):
    """Decorator form: ``@tool`` or ``@tool(name="calc")`` turns a function into a `Tool`."""
    if fn is None:
        return lambda f: Tool(f, name=name, description=description)
    return Tool(fn, name=name, description=description)


def as_tool(obj: Tool | Callable) -> Tool:
    return obj if isinstance(obj, Tool) else Tool(obj)


# --------------------------------------------------------------------------------------------------- python tool

_STATUS_NOTES = {
    ExecStatus.TIMEOUT: "[Execution timed out. The interpreter was restarted: earlier variables are gone.]",
    ExecStatus.MEMORY: "[Out of memory. The interpreter may have been restarted: earlier variables may be gone.]",
    ExecStatus.OUTPUT_LIMIT: "[Too much output: it was cut. Print less.]",
    ExecStatus.CRASHED: "[The interpreter crashed and was restarted: earlier variables are gone.]",
    ExecStatus.EXITED: "[exit() was called; the session and its variables are kept.]",
    ExecStatus.SANDBOX_ERROR: "[Sandbox error: the code did not run.]",
}


def format_exec_result(res: ExecResult) -> str:
    """Text the model sees after its code ran: stdout, then stderr (traceback), then a note on abnormal endings."""
    parts = []
    if res.state_lost and res.status not in (ExecStatus.TIMEOUT, ExecStatus.CRASHED):
        parts.append("[Note: the interpreter had been restarted before this call; earlier variables are gone.]")
    if res.stdout:
        parts.append(res.stdout.rstrip("\n"))
    if res.stderr:
        parts.append(res.stderr.rstrip("\n"))
    note = _STATUS_NOTES.get(res.status)
    if note:
        parts.append(note)
    if res.truncated and res.status != ExecStatus.OUTPUT_LIMIT:
        parts.append("[Output was cut at the sandbox's limit.]")
    if not parts:
        return "(no output; use print() to show values)"
    return "\n".join(parts)


def python(code: str, ctx: ToolContext) -> ToolOutput:
    """Run Python code in a persistent interpreter and return what it prints.

    Variables, functions and imports persist between calls within the episode. The value of a trailing
    expression is printed, as in a notebook.

    Args:
        code: Python source code to execute.
    """
    try:
        session = ctx.session()
    except Exception as exc:  # noqa: BLE001  infrastructure failure: the episode sees it, the rollout goes on
        logger.warning("could not open a sandbox session: %s", exc)
        return ToolOutput(f"[Sandbox error: the code did not run ({type(exc).__name__}).]", True, "sandbox_error")
    res = session.run(code, ctx.timeout_s)
    error = res.status != ExecStatus.OK
    return ToolOutput(
        format_exec_result(res),
        error=error,
        status=res.status.value,
        info={"duration_s": res.duration_s, "truncated": res.truncated, "state_lost": res.state_lost},
    )


PYTHON_TOOL = Tool(python)


# --------------------------------------------------------------------------------------------------- tool prompt

_TOOL_SECTION = """# Tools

You may call one or more functions to help with the task. The functions, as JSON schemas:
<tools>
{schemas}
</tools>

To call a function, write a JSON object with its name and arguments inside <tool_call></tool_call> tags, then stop:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>
The result comes back in the next message."""


def tool_prompt_section(schemas: list[dict]) -> str:
    """The tool section for a system prompt (Hermes/Qwen call format) when the chat template does not render
    `tools=` itself: the names, the JSON schemas and how to call them."""
    return _TOOL_SECTION.format(schemas="\n".join(json.dumps(s, ensure_ascii=False) for s in schemas))

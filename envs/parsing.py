"""Turn one model turn (text) into tool calls, call errors and a final answer. Never raises on model text.

Two formats:

* ``fenced``: tool-integrated reasoning's usual format. Every ```` ```python ```` (or ``py``/``python3``) block is a
  call of the `python` tool with the block as ``code``. The rollout stops generation at ``"\\n```\\n"`` (a closing
  fence on its own line), which the opening ```` ```python ```` cannot match.
* ``json``: chat templates' function calls, Hermes/Qwen style:
  ``<tool_call>{"name": "python", "arguments": {"code": "..."}}</tool_call>``. Stop string ``"</tool_call>"``.

Whatever the model wrote, the result is a `ParsedTurn`; every malformed call becomes a `CallError` with a `kind` (a
short stable label counted in `info`) and a `message` (what the model is told).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from typing import Literal

from envs.grading import extract_boxed
from envs.tools import Tool

ToolFormat = Literal["fenced", "json"]

FENCED_STOP = "\n```\n"
JSON_STOP = "</tool_call>"
STOP_STRINGS: dict[str, list[str]] = {"fenced": [FENCED_STOP], "json": [JSON_STOP]}

# Error kinds, stable labels for metrics.
INVALID_TEXT = "invalid_text"  # not valid UTF-8 / lone surrogates; replaced, the turn is still parsed
UNCLOSED_FENCE = "unclosed_fence"
UNCLOSED_TOOL_CALL = "unclosed_tool_call"
INVALID_JSON = "invalid_json"
UNKNOWN_TOOL = "unknown_tool"
BAD_ARGUMENTS = "bad_arguments"
TOO_LONG = "too_long"
EMPTY_CALL = "empty_call"


@dataclass
class ToolCall:
    name: str
    arguments: dict
    raw: str = ""


@dataclass
class CallError:
    kind: str
    message: str


@dataclass
class ParsedTurn:
    """What one turn contains. `answer` is the last \\boxed{} outside code/tool calls (None if absent)."""

    text: str
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[CallError] = field(default_factory=list)
    answer: str | None = None

    @property
    def attempted_call(self) -> bool:
        """True when the model tried to call a tool (well-formed or not): such a turn is not void."""
        return bool(self.calls) or any(e.kind != INVALID_TEXT for e in self.errors)


def sanitize_text(action: str | bytes) -> tuple[str, bool]:
    """(valid UTF-8 str, whether anything had to be replaced). Bytes are decoded; lone surrogates replaced."""
    if isinstance(action, (bytes, bytearray)):
        try:
            return bytes(action).decode("utf-8"), False
        except UnicodeDecodeError:
            return bytes(action).decode("utf-8", "replace"), True
    try:
        action.encode("utf-8")
        return action, False
    except UnicodeEncodeError:
        return action.encode("utf-8", "replace").decode("utf-8"), True


def _preview(s: str, n: int = 80) -> str:
    s = s.replace("\n", "\\n")
    return s if len(s) <= n else s[:n] + "..."


# --------------------------------------------------------------------------------------------------- fenced

_OPEN = re.compile(r"```[ \t]*(python3?|py)\b[^\n]*\n", re.IGNORECASE)
_CLOSE = re.compile(r"^[ \t]*```[ \t]*$", re.MULTILINE)  # a bare fence line; "```python" never closes


def parse_fenced(text: str, max_call_chars: int = 16000, tool_name: str = "python") -> ParsedTurn:
    """Every complete ```python block is a call; an opening fence without a closing one is an error."""
    turn = ParsedTurn(text=text)
    outside: list[str] = []
    pos = 0
    while True:
        m = _OPEN.search(text, pos)
        if not m:
            outside.append(text[pos:])
            break
        outside.append(text[pos : m.start()])
        close = _CLOSE.search(text, m.end())
        if not close:
            turn.errors.append(
                CallError(
                    UNCLOSED_FENCE, "Your ```python block was not closed with ``` on its own line; it was not run."
                )
            )
            break
        code = text[m.end() : close.start()]
        pos = close.end()
        if len(code) > max_call_chars:
            turn.errors.append(CallError(TOO_LONG, f"Code block of {len(code)} characters exceeds {max_call_chars}."))
        elif not code.strip():
            turn.errors.append(CallError(EMPTY_CALL, "The ```python block was empty."))
        else:
            turn.calls.append(ToolCall(tool_name, {"code": code}, raw=text[m.start() : close.end()]))
    turn.answer = extract_boxed("".join(outside))
    return turn


# --------------------------------------------------------------------------------------------------- json

_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_FENCE_WRAP = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def _decode_call(body: str, tools: dict[str, Tool]) -> tuple[list[ToolCall], list[CallError]]:
    body = body.strip()
    m = _FENCE_WRAP.match(body)
    if m:
        body = m.group(1)
    if not body:
        return [], [CallError(EMPTY_CALL, "Empty <tool_call></tool_call>.")]
    try:
        data = json.loads(body, strict=False)  # strict=False: raw newlines inside strings, as models write code
    except (json.JSONDecodeError, RecursionError) as exc:
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "nesting too deep"
        return [], [CallError(INVALID_JSON, f"Invalid JSON in <tool_call>: {msg}. Got: {_preview(body)}")]
    items = data if isinstance(data, list) else [data]
    calls, errors = [], []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            errors.append(CallError(BAD_ARGUMENTS, 'A tool call must be {"name": ..., "arguments": {...}}.'))
            continue
        name = item["name"]
        if name not in tools:
            errors.append(CallError(UNKNOWN_TOOL, f"Unknown tool '{_preview(name, 40)}'. Available: {sorted(tools)}."))
            continue
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):  # some models send the arguments as a JSON string
            with contextlib.suppress(json.JSONDecodeError):
                args = json.loads(args, strict=False)
        problem = tools[name].validate(args)
        if problem:
            errors.append(CallError(BAD_ARGUMENTS, f"Error: {problem}."))
            continue
        calls.append(ToolCall(name, args, raw=body))
    return calls, errors


def parse_json_calls(text: str, tools: dict[str, Tool], max_call_chars: int = 16000) -> ParsedTurn:
    """Every <tool_call>...</tool_call> holds one JSON call (or a list of them)."""
    turn = ParsedTurn(text=text)
    outside: list[str] = []
    pos = 0
    for m in _CALL.finditer(text):
        outside.append(text[pos : m.start()])
        pos = m.end()
        body = m.group(1)
        if len(body) > max_call_chars:
            turn.errors.append(CallError(TOO_LONG, f"Tool call of {len(body)} characters exceeds {max_call_chars}."))
            continue
        calls, errors = _decode_call(body, tools)
        turn.calls += calls
        turn.errors += errors
    rest = text[pos:]
    if "<tool_call>" in rest:
        outside.append(rest[: rest.index("<tool_call>")])
        turn.errors.append(CallError(UNCLOSED_TOOL_CALL, "<tool_call> was not closed with </tool_call>; not run."))
    else:
        outside.append(rest)
    turn.answer = extract_boxed("".join(outside))
    return turn


def parse_turn(action: str | bytes, fmt: ToolFormat, tools: dict[str, Tool], max_call_chars: int = 16000) -> ParsedTurn:
    """Parse one model turn in format `fmt`. Invalid text is repaired and reported, never raised."""
    text, repaired = sanitize_text(action)
    try:
        if fmt == "json":
            turn = parse_json_calls(text, tools, max_call_chars)
        elif "python" in tools:
            turn = parse_fenced(text, max_call_chars)
        else:  # an env without a python tool: code blocks are prose
            turn = ParsedTurn(text=text, answer=extract_boxed(text))
    except RecursionError:  # pathological nesting in a regex/JSON corner; still a defined outcome
        turn = ParsedTurn(text=text, errors=[CallError(INVALID_JSON, "The message could not be parsed.")])
    if repaired:
        turn.errors.insert(
            0, CallError(INVALID_TEXT, "Your message contained invalid (non-UTF-8) characters; they were replaced.")
        )
    return turn

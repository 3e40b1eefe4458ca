"""The parser turns any model text into calls / errors / answer and never raises."""

from __future__ import annotations

import random

import pytest

from envs.parsing import (
    BAD_ARGUMENTS,
    EMPTY_CALL,
    FENCED_STOP,
    INVALID_JSON,
    INVALID_TEXT,
    TOO_LONG,
    UNCLOSED_FENCE,
    UNCLOSED_TOOL_CALL,
    UNKNOWN_TOOL,
    parse_turn,
)
from envs.tools import PYTHON_TOOL

TOOLS = {"python": PYTHON_TOOL}


def kinds(turn):
    return [e.kind for e in turn.errors]


def test_fenced_single_block_and_answer_outside_code():
    t = parse_turn("Let me compute.\n```python\nprint(6*7)\n```\n", "fenced", TOOLS)
    assert [c.arguments["code"] for c in t.calls] == ["print(6*7)\n"]
    assert t.errors == [] and t.answer is None
    t = parse_turn("```python\nprint('\\\\boxed{1}')\n```\nSo the answer is \\boxed{42}.", "fenced", TOOLS)
    assert t.answer == "42"  # the box inside code does not count


def test_fenced_variants():
    assert parse_turn("```py\nx=1\n```", "fenced", TOOLS).calls[0].arguments == {"code": "x=1\n"}
    assert parse_turn("```Python3\nx=1\n```", "fenced", TOOLS).calls
    assert not parse_turn("```text\nhello\n```\n\\boxed{3}", "fenced", TOOLS).calls  # other languages are prose
    two = parse_turn("```python\na=1\n```\nthen\n```python\nprint(a)\n```", "fenced", TOOLS)
    assert [c.arguments["code"] for c in two.calls] == ["a=1\n", "print(a)\n"]


def test_fenced_stop_string_does_not_match_opening_fence():
    text = "I will compute.\n```python\nprint(1)\n```\n"
    assert FENCED_STOP not in text[: text.index("print")]  # opening fence never triggers the stop
    assert text.endswith(FENCED_STOP)


@pytest.mark.parametrize(
    "text,kind",
    [
        ("```python\nprint(1)", UNCLOSED_FENCE),
        ("```python\n```", EMPTY_CALL),
        ("```python\n" + "x=1\n" * 10_000 + "```", TOO_LONG),
    ],
)
def test_fenced_errors(text, kind):
    t = parse_turn(text, "fenced", TOOLS, max_call_chars=16000)
    assert kind in kinds(t) and not t.calls and t.attempted_call


def test_json_calls():
    ok = '<tool_call>\n{"name": "python", "arguments": {"code": "print(1)"}}\n</tool_call>'
    t = parse_turn(ok, "json", TOOLS)
    assert t.calls[0].name == "python" and t.calls[0].arguments == {"code": "print(1)"}
    raw_newline = '<tool_call>{"name": "python", "arguments": {"code": "a=1\nprint(a)"}}</tool_call>'
    assert parse_turn(raw_newline, "json", TOOLS).calls[0].arguments["code"] == "a=1\nprint(a)"
    as_string = '<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"print(2)\\"}"}</tool_call>'
    assert parse_turn(as_string, "json", TOOLS).calls[0].arguments == {"code": "print(2)"}
    fenced_json = '<tool_call>```json\n{"name": "python", "arguments": {"code": "1"}}\n```</tool_call>'
    assert parse_turn(fenced_json, "json", TOOLS).calls
    answer = parse_turn("Done: \\boxed{7}", "json", TOOLS)
    assert answer.answer == "7" and not answer.attempted_call


@pytest.mark.parametrize(
    "text,kind",
    [
        ('<tool_call>{"name": "python", "arguments": {"code": "1"}', UNCLOSED_TOOL_CALL),
        ("<tool_call>{name: python}</tool_call>", INVALID_JSON),
        ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', UNKNOWN_TOOL),
        ('<tool_call>{"name": "python", "arguments": {"cmd": "1"}}</tool_call>', BAD_ARGUMENTS),
        ('<tool_call>{"name": "python", "arguments": {"code": 5}}</tool_call>', BAD_ARGUMENTS),
        ('<tool_call>{"name": "python"}</tool_call>', BAD_ARGUMENTS),
        ("<tool_call>[1, 2]</tool_call>", BAD_ARGUMENTS),
        ("<tool_call></tool_call>", EMPTY_CALL),
        ("<tool_call>" + "[" * 100_000 + "</tool_call>", TOO_LONG),
    ],
)
def test_json_errors(text, kind):
    t = parse_turn(text, "json", TOOLS)
    assert kind in kinds(t) and not t.calls and t.attempted_call
    assert all(e.message for e in t.errors)


def test_deep_json_nesting_is_an_error_not_a_crash():
    t = parse_turn("<tool_call>" + "[" * 5000 + "]" * 5000 + "</tool_call>", "json", TOOLS)
    assert t.errors and not t.calls


def test_invalid_text_is_repaired_and_counted():
    t = parse_turn("```python\nprint('\udcff')\n```", "fenced", TOOLS)  # lone surrogate
    assert kinds(t)[0] == INVALID_TEXT and t.calls  # still runs (the replacement char is valid UTF-8)
    t = parse_turn(b"\\boxed{4} \xff\xfe", "fenced", TOOLS)  # raw non-UTF-8 bytes
    assert kinds(t) == [INVALID_TEXT] and t.answer == "4" and not t.attempted_call
    assert parse_turn(b"\\boxed{4}", "fenced", TOOLS).errors == []


def test_never_raises_on_random_text():
    rng = random.Random(0)
    pieces = [
        "```python\n",
        "```",
        "\n",
        "<tool_call>",
        "</tool_call>",
        '{"name": "python"',
        '"arguments":',
        "{",
        "}",
        "\\boxed{",
        "print(1)",
        "\udcff",
        "\x00",
        "é",
        "[",
        '"code": "x"',
        "```py",
        "\\fbox 3",
    ]
    for fmt in ("fenced", "json"):
        for _ in range(2000):
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
            parse_turn(text, fmt, TOOLS)  # must not raise

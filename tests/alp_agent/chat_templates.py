"""Chat templates written in the tests (no download), put on the tiny models' SmolLM2 tokenizer:

- `CHATML`: SmolLM2's own (append-only ChatML; ignores `tools=` and `tool_calls`);
- `QWEN3_STYLE`: Qwen3's template in its parts that matter here: a "# Tools" system block from `tools=`, native
  `tool_calls` rendered as <tool_call> blocks, `tool` messages grouped as <tool_response> in a user turn, and history
  rewriting: `<think>` of turns after the last user query re-formatted as "<think>\\n" + reasoning.strip() +
  "\\n</think>\\n\\n" + content;
- `R1_STYLE`: DeepSeek-R1 (distill) style: earlier reasoning dropped (content after the last </think>), the
  generation prompt opens "<think>\\n", no tool rendering. Its end of sentence is the tokenizer's EOS (<|im_end|>),
  as R1's own template closes turns with its tokenizer's EOS.

A fourth, `user`, joins them when `ALP_CHECK_TEMPLATE` names a chat template to check: a Hugging Face model id or
folder (its tokenizer's template is used, with the SmolLM2 vocabulary of the tiny models) or a .jinja file, e.g.

    ALP_CHECK_TEMPLATE=Qwen/Qwen3-8B python -m pytest tests/alp_agent/test_rollout_templates.py
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

QWEN3_STYLE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0].role == 'system' %}"
    "{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' and message.content is string %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}"
    "{%- endif %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set reasoning_content = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' "
    "+ content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{%- if message.tool_calls %}{%- for tool_call in message.tool_calls %}"
    "{%- if (loop.first and content) or (not loop.first) %}{{- '\\n' }}{%- endif %}"
    "{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'<tool_call>\\n{"name": "\' }}{{- tool_call.name }}{{- \'", "arguments": \' }}'
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

R1_STYLE = (
    "{%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}{{- '<｜User｜>' + message.content }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{{- '<｜Assistant｜>' + content + '<|im_end|>' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<｜tool▁output▁begin｜>' + message.content + '<｜tool▁output▁end｜>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<｜Assistant｜><think>\\n' }}{%- endif %}"
)


def _user_template() -> str | None:
    spec = os.environ.get("ALP_CHECK_TEMPLATE")
    if not spec:
        return None
    if Path(spec).is_file():
        return Path(spec).read_text(encoding="utf-8")
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(spec).chat_template
    if isinstance(template, dict):  # several named templates: the tool-use one where there is one
        template = template.get("tool_use") or template.get("default")
    if not isinstance(template, str):
        raise ValueError(f"ALP_CHECK_TEMPLATE={spec}: no chat template found")
    return template


TEMPLATES: dict[str, str | None] = {"chatml": None, "qwen3": QWEN3_STYLE, "r1": R1_STYLE}
CLOSING = {"chatml": "<|im_end|>\n", "qwen3": "<|im_end|>\n", "r1": "<|im_end|>"}  # user: read off the template
if (_user := _user_template()) is not None:
    TEMPLATES["user"] = _user


def with_template(tokenizer, name: str):
    """A copy of `tokenizer` carrying template `name` ("chatml" keeps SmolLM2's own)."""
    tok = copy.deepcopy(tokenizer)
    if TEMPLATES[name] is not None:
        tok.chat_template = TEMPLATES[name]
    return tok

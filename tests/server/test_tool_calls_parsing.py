"""Tool calls read back from text (whole and streamed piece by piece), and tools and tool turns
as the chat template receives them (native templates and the Hermes convention), model-free."""

from __future__ import annotations

import json

import pytest

from lamina.loading.chat_template import render_chat_template
from lamina.server.protocol import ChatCompletionRequest
from lamina.server.tools import ToolCallParser, ToolUse, messages_for_template

NAMES = ["get_weather", "add"]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def parse_whole(text: str, parallel: bool = True):
    return ToolCallParser(NAMES, parallel).feed(text, done=True)


def parse_streamed(text: str, step: int, parallel: bool = True):
    parser = ToolCallParser(NAMES, parallel)
    content, calls = "", []
    for end in range(step, len(text) + step, step):
        c, new = parser.feed(text[:end], done=end >= len(text))
        content += c
        calls += new
    return content, calls


CASES = {
    "one call": (CALL, "", [("get_weather", {"city": "Paris"})]),
    "text then calls": (
        f"Let me check.\n{CALL}\n{CALL.replace('Paris', 'Rome')}",
        "Let me check.",
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})],
    ),
    "call then text": (
        f"{CALL}\n\nDone <soon>.",
        "Done <soon>.",
        [("get_weather", {"city": "Paris"})],
    ),
    "unknown function stays text": (
        CALL.replace("get_weather", "launch"),
        CALL.replace("get_weather", "launch"),
        [],
    ),
    "broken json stays text": (
        "<tool_call>{oops</tool_call> ok",
        "<tool_call>{oops</tool_call> ok",
        [],
    ),
    "bare json call": (
        '{"name": "add", "arguments": {"a": 1, "b": 2}}',
        "",
        [("add", {"a": 1, "b": 2})],
    ),
    "plain json answer": ('{"answer": 3}', '{"answer": 3}', []),
    "a tag-like ending": ("x < y and <tool", "x < y and <tool", []),
    "unterminated call at the end": (
        CALL[: -len("</tool_call>")],
        "",
        [("get_weather", {"city": "Paris"})],
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_parse_whole_and_streamed_agree(name):
    text, content, calls = CASES[name]
    want = [(n, a) for n, a in calls]
    for got_content, got_calls in [parse_whole(text)] + [
        parse_streamed(text, k) for k in (1, 3, 7)
    ]:
        assert got_content == content
        assert [(c.function.name, json.loads(c.function.arguments)) for c in got_calls] == want
        assert all(c.id.startswith("call_") for c in got_calls)


def test_streaming_holds_back_what_may_become_a_call():
    parser = ToolCallParser(NAMES)
    assert parser.feed("Sure <tool_", done=False) == ("Sure", [])  # the space may be layout
    content, calls = parser.feed('Sure <tool_call>\n{"name": "add", "argu', done=False)
    assert (content, calls) == ("", [])
    content, calls = parser.feed(
        'Sure <tool_call>\n{"name": "add", "arguments": {}}\n</tool_call>', done=False
    )
    assert content == ""
    assert [c.function.name for c in calls] == ["add"]


def test_parallel_false_keeps_the_first_call():
    _, calls = parse_whole(f"{CALL}\n{CALL.replace('Paris', 'Rome')}", parallel=False)
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris"}]


# ---- what the template receives -----------------------------------------------------------
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
]


def tool_use(choice="auto") -> ToolUse:
    req = ChatCompletionRequest(messages=HISTORY, tools=TOOLS, tool_choice=choice)
    use = ToolUse.from_request(req)
    assert use is not None
    return use


def test_hermes_convention_for_templates_without_tools():
    msgs = messages_for_template(HISTORY, tool_use(), native=False)
    assert msgs[0]["role"] == "system"
    assert "<tools>" in msgs[0]["content"]
    assert json.dumps(TOOLS[0]["function"]) in msgs[0]["content"]
    assert msgs[2] == {
        "role": "assistant",
        "content": CALL,
    }
    assert msgs[3] == {"role": "user", "content": "<tool_response>\n18 C\n</tool_response>"}
    none = messages_for_template(HISTORY, tool_use("none"), native=False)
    assert none[0]["role"] == "user"  # tool_choice none: the tools are not offered


def test_native_templates_get_tools_and_argument_objects():
    template = (
        "{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}{{ m.role }}:"
        "{% for c in m.tool_calls or [] %}{{ c.function.arguments.city }}{% endfor %}"
        "{{ m.content }};{% endfor %}"
    )
    msgs = messages_for_template(HISTORY, tool_use(), native=True)
    text = render_chat_template(
        template, msgs, add_generation_prompt=True, special_tokens={}, tools=TOOLS
    )
    assert text == "[get_weather]user:Weather in Paris?;assistant:Paris;tool:18 C;"


def test_required_and_named_choices_build_grammars():
    assert tool_use("auto").grammar() is None
    required = tool_use("required").grammar()
    assert required is not None
    assert required.grammar is not None
    assert '("\\n" call)*' in required.grammar
    named = tool_use({"type": "function", "function": {"name": "get_weather"}}).grammar()
    assert named is not None
    assert named.grammar is not None
    assert '"const": "get_weather"' in named.grammar
    assert "call)*" not in named.grammar  # a named function is called once

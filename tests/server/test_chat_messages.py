"""Chat messages the template cannot take are a 400 naming the message, as `LLM.chat` refuses
them: an unknown role, a missing content, a content part that is not text."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import SERVED_MODEL_NAME as MODEL


@pytest.mark.parametrize(
    ("messages", "named"),
    [
        ([{"role": "human", "content": "hi"}], "messages[0] has role 'human'; accepted roles"),
        ([{"role": "user"}], "messages[0] (user) has no 'content'"),
        ([{"role": "user", "content": None}], "messages[0] (user) has no 'content'"),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}],
            "messages[1] (assistant) has no 'content'",
        ),
    ],
)
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/tokenize"])
def test_bad_messages_are_400(server, route, messages, named):
    body = {"model": MODEL, "messages": messages, "max_tokens": 2}
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        resp = c.post(route, json=body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert named in err["message"]
    assert err["param"] == "messages"
    server.assert_all_blocks_free()


def test_tool_call_turn_without_content_is_accepted(server):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "call f"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        resp = c.post("/tokenize", json={"model": MODEL, "messages": messages})
    assert resp.status_code == 200, resp.text

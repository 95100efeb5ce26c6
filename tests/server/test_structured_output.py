"""Structured output and tool calling through the OpenAI API: response_format, vLLM's guided_*
and structured_outputs, tools / tool_choice (streamed and not), their 400s; the openai SDK's
`parse` with a pydantic model and a tool round trip, on the tiny model and on SmolLM2."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.helpers import SERVED_MODEL_NAME as MODEL

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["a"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "hello"}]


# a template that reads `tools` (so they reach it natively) but writes only their names: the
# tiny model's context is 256 byte-tokens
NATIVE_TEMPLATE = (
    "{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %}{{ c.function.arguments | tojson }}{% endfor %}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.fixture(scope="module")
def tool_server(tiny_folder, live_server_cls):
    from lamina import LLM
    from lamina.server import ServerSettings

    llm = LLM(str(tiny_folder), dtype="float32")
    llm.engine.tokenizer.chat_template = NATIVE_TEMPLATE
    srv = live_server_cls(llm.engine, ServerSettings(served_model_name=MODEL)).start()
    yield srv
    srv.stop()


def chat(client, **kw):
    kw.setdefault("model", MODEL)
    kw.setdefault("messages", ASK)
    kw.setdefault("max_tokens", 150)
    return client.chat.completions.create(**kw)


def error_of(server, path: str, body: dict) -> tuple[int, dict]:
    import httpx

    r = httpx.post(server.base_url + path, json={"model": MODEL, **body}, timeout=60)
    return r.status_code, r.json().get("error", {})


# ---- structured output -------------------------------------------------------------------
def test_response_format_json_schema_and_guided_fields(server):
    c = server.client()
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    for temperature in (0, 1.0):
        r = chat(c, response_format=fmt, temperature=temperature, seed=1, n=2)
        for ch in r.choices:
            assert ch.finish_reason == "stop"
            jsonschema.validate(json.loads(ch.message.content), PERSON)
    r = chat(c, temperature=1.0, extra_body={"guided_regex": r"[a-c]{2}\d"})
    assert re.fullmatch(r"[a-c]{2}[0-9]", r.choices[0].message.content)
    r = c.completions.create(
        model=MODEL, prompt="x", max_tokens=20, extra_body={"guided_choice": ["up", "down"]}
    )
    assert r.choices[0].text in ("up", "down")
    r = c.completions.create(
        model=MODEL,
        prompt="x",
        max_tokens=100,
        temperature=1.0,
        extra_body={"guided_json": PERSON},
    )
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)
    r = c.completions.create(
        model=MODEL,
        prompt="x",
        max_tokens=30,
        extra_body={"structured_outputs": {"grammar": 'root ::= "v" [0-9] "." [0-9]'}},
    )
    assert re.fullmatch(r"v[0-9]\.[0-9]", r.choices[0].text)
    server.assert_all_blocks_free()


def test_streamed_json_equals_the_whole_response(server):
    c = server.client()
    kw = {
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    }
    whole = chat(c, temperature=0, **kw).choices[0].message.content
    parts = [
        ch.choices[0].delta.content or ""
        for ch in chat(c, temperature=0, stream=True, **kw)
        if ch.choices
    ]
    assert "".join(parts) == whole


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    legs: int = Field(ge=0, le=4)
    name: str = Field(max_length=5)
    vaccinated: bool


def test_sdk_parse_with_a_pydantic_model(server):
    r = server.client().chat.completions.parse(
        model=MODEL, messages=ASK, response_format=Pet, max_tokens=150, temperature=0.7, seed=3
    )
    pet = r.choices[0].message.parsed
    assert isinstance(pet, Pet)
    assert 0 <= pet.legs <= 4


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [
        (
            "/v1/chat/completions",
            {
                "messages": ASK,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objectx"}},
                },
            },
            "response_format",
            "objectx",
        ),
        (
            "/v1/completions",
            {"prompt": "x", "guided_regex": "a(b"},
            "guided_regex",
            "unclosed group",
        ),
        ("/v1/completions", {"prompt": "x", "guided_choice": []}, "guided_choice", "empty"),
        (
            "/v1/completions",
            {"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]},
            "guided_choice",
            "one structured-output constraint",
        ),
        (
            "/v1/chat/completions",
            {"messages": ASK, "response_format": {"type": "json_schema"}},
            "response_format",
            "json_schema is given exactly when",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": ASK,
                "tools": [WEATHER],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            "tool_choice",
            "not in tools",
        ),
        (
            "/v1/chat/completions",
            {"messages": ASK, "tool_choice": "required"},
            "tool_choice",
            "no tools",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": ASK,
                "tools": [WEATHER],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
            "give one of them",
        ),
        (
            "/v1/chat/completions",
            {"messages": ASK, "tools": [{"type": "function", "function": {"name": "a b"}}]},
            "tools",
            "pattern",
        ),
        ("/v1/chat/completions", {"messages": ASK, "tools": [WEATHER, WEATHER]}, "tools", "unique"),
        (
            "/v1/chat/completions",
            {
                "messages": ASK,
                "tools": [
                    {**WEATHER, "function": {**WEATHER["function"], "parameters": {"type": 5}}}
                ],
                "tool_choice": "required",
            },
            "tools",
            "",
        ),
        (
            "/v1/chat/completions",
            {"messages": ASK, "functions": [WEATHER["function"]]},
            "functions",
            "does not implement",
        ),
    ],
)
def test_bad_constraints_are_400s_naming_the_field(server, path, body, param, words):
    status, err = error_of(server, path, body)
    assert status == 400, err
    assert err["param"] == param or err["param"].startswith(param), err
    assert words in err["message"]


# ---- tool calls --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_tool_calls_parse_and_stream_alike(tool_server, choice):
    c = tool_server.client()
    r = chat(c, tools=[WEATHER, ADD], tool_choice=choice, temperature=0)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    assert ch.message.content is None
    assert ch.message.tool_calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
    for call in ch.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    if isinstance(choice, dict):
        assert [t.function.name for t in ch.message.tool_calls] == ["get_weather"]
    streamed: dict[int, tuple[str, str]] = {}
    finish = None
    for chunk in chat(c, tools=[WEATHER, ADD], tool_choice=choice, temperature=0, stream=True):
        for part in chunk.choices[0].delta.tool_calls or []:
            streamed[part.index] = (part.function.name, part.function.arguments)
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [streamed[i] for i in sorted(streamed)] == [
        (t.function.name, t.function.arguments) for t in ch.message.tool_calls
    ]


def test_tool_round_trip_through_the_sdk(tool_server):
    c = tool_server.client()
    first = chat(c, tools=[WEATHER], tool_choice="required", temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"},
    ]
    r = chat(c, messages=history, tools=[WEATHER], max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the template got the tools, the call's arguments as an object, and the tool's answer
    arguments = json.dumps(json.loads(call.function.arguments), ensure_ascii=False)
    # (templates render with trim_blocks: the newline after a block tag is dropped)
    prompt = f"[get_weather]user: helloassistant: {arguments}tool: 18 degreesassistant: "
    tokenizer = tool_server.engine.tokenizer
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))


def test_tool_choice_none_and_auto_leave_plain_text(tool_server):
    c = tool_server.client()
    plain = chat(c, temperature=0, max_tokens=12)
    none = chat(c, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=12)
    assert none.choices[0].message.content == plain.choices[0].message.content
    auto = chat(c, tools=[WEATHER], temperature=0, max_tokens=12)
    assert auto.choices[0].message.tool_calls == []
    assert auto.choices[0].finish_reason == "length"


# ---- SmolLM2 -----------------------------------------------------------------------------
class Person(BaseModel):
    name: str
    age: int
    city: str


@pytest.mark.slow
def test_smollm2_sdk_parse_and_tool_round_trip(smol_server):
    c = openai.OpenAI(api_key="none", base_url=smol_server.base_url + "/v1")
    ask = [{"role": "user", "content": "Describe Ann, 31, from Oslo, as JSON."}]
    for parse in (c.chat.completions.parse, c.beta.chat.completions.parse):
        r = parse(
            model="smollm2", messages=ask, response_format=Person, temperature=0, max_tokens=80
        )
        assert r.choices[0].message.parsed == Person(name="Ann", age=31, city="Oslo")
    weather = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
    r = c.chat.completions.create(
        model="smollm2",
        messages=weather,
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_tokens=80,
    )
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] == "Paris"
    history = [
        *weather,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]
    r = c.chat.completions.create(
        model="smollm2", messages=history, tools=[WEATHER], temperature=0, max_tokens=40
    )
    assert r.choices[0].message.content
    smol_server.assert_all_blocks_free()

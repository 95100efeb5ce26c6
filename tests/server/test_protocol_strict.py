"""Strict request schemas (issue #18): an unknown field is a 400 naming it (with the closest
known name), unimplemented OpenAI/vLLM fields pass only with a value that asks for nothing,
strings that are not valid Unicode are a 400, stream_options needs stream; plus
GET /v1/models/{id}, streamed completion logprobs, and an OpenAPI document that says 400."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.helpers import SERVED_MODEL_NAME as MODEL

COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def post(server, path: str, body: dict | str) -> httpx.Response:
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        if isinstance(body, str):  # raw JSON text (escapes httpx would not send)
            headers = {"content-type": "application/json"}
            return c.post(path, content=body.encode(), headers=headers)
        return c.post(path, json=body)


def error(resp: httpx.Response, status: int = 400) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# ---- unknown fields ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "field", "hint"),
    [
        ("/v1/completions", {**COMPLETION, "max_token": 5}, "max_token", "max_tokens"),
        ("/v1/completions", {**COMPLETION, "temprature": 0.5}, "temprature", "temperature"),
        ("/v1/chat/completions", {**CHAT, "top_logprob": 2}, "top_logprob", "top_logprobs"),
        ("/v1/chat/completions", {**CHAT, "presense_penalty": 1}, "presense_penalty", None),
        ("/v1/completions", {**COMPLETION, "frobnicate": True}, "frobnicate", None),
    ],
)
def test_unknown_field_is_400_naming_it(server, path, body, field, hint):
    err = error(post(server, path, body))
    assert err["type"] == "invalid_request_error"
    assert err["param"] == field
    assert field in err["message"]
    if hint is not None:
        assert f"did you mean '{hint}'" in err["message"]


def test_unknown_nested_field_is_400(server):
    body = {**COMPLETION, "stream": True, "stream_options": {"include_usage": True, "x": 1}}
    err = error(post(server, "/v1/completions", body))
    assert err["param"] == "stream_options.x"


def test_vllm_extras_are_accepted_but_not_their_misspellings(server):
    extras = {
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
        "min_tokens": 1,
        "stop_token_ids": [3],
        "ignore_eos": True,
        "skip_special_tokens": False,
        "include_stop_str_in_output": True,
        "bad_words": ["zzz"],
        "truncate_prompt_tokens": 8,
        "user": "u1",
    }
    assert post(server, "/v1/completions", {**COMPLETION, **extras}).status_code == 200
    messages = [{"role": "user", "content": "hi", "name": "bob"}]
    resp = post(server, "/v1/chat/completions", {**CHAT, **extras, "messages": messages})
    assert resp.status_code == 200, resp.text
    err = error(post(server, "/v1/completions", {**COMPLETION, **extras, "min_token": 1}))
    assert err["param"] == "min_token"
    assert "did you mean 'min_tokens'" in err["message"]
    server.assert_all_blocks_free()


# (path, field, a value that asks for nothing, a value lamina would have to act on)
UNIMPLEMENTED = [
    ("/v1/chat/completions", "functions", [], [{"name": "f"}]),
    ("/v1/chat/completions", "function_call", "none", {"name": "f"}),
    ("/v1/chat/completions", "guided_decoding_backend", None, "xgrammar"),
    ("/v1/chat/completions", "use_beam_search", False, True),
    ("/v1/chat/completions", "store", False, True),
    ("/v1/chat/completions", "echo", False, True),
    ("/v1/completions", "use_beam_search", False, True),
    ("/v1/completions", "length_penalty", 1.0, 0.5),
    ("/v1/completions", "guided_whitespace_pattern", None, " "),
    ("/v1/completions", "prompt_logprobs", None, 1),
    ("/v1/completions", "priority", 0, 1),
    ("/v1/completions", "add_special_tokens", True, False),
]


@pytest.mark.parametrize(
    ("path", "field", "neutral", "active"),
    UNIMPLEMENTED,
    ids=[f"{p}:{f}" for p, f, *_ in UNIMPLEMENTED],
)
def test_unimplemented_fields_only_with_neutral_values(server, path, field, neutral, active):
    base = CHAT if "chat" in path else COMPLETION
    resp = post(server, path, {**base, field: neutral})
    assert resp.status_code == 200, resp.text
    err = error(post(server, path, {**base, field: active}))
    assert err["param"] == field
    assert field in err["message"]
    assert "does not implement" in err["message"]


def test_any_value_fields_are_accepted_where_they_belong(server):
    body = {**CHAT, "metadata": {"k": "v"}, "service_tier": "auto", "parallel_tool_calls": True}
    assert post(server, "/v1/chat/completions", body).status_code == 200
    # chat's tool fields are unknown to /v1/completions, whatever their value
    for field, value in (("parallel_tool_calls", True), ("tools", [])):
        err = error(post(server, "/v1/completions", {**COMPLETION, field: value}))
        assert err["param"] == field


@pytest.mark.parametrize(
    ("path", "body", "param", "types"),
    [
        ("/v1/completions", {**COMPLETION, "prompt": [[1.5]]}, "prompt", "list[list[int]]"),
        ("/v1/completions", {**COMPLETION, "prompt": 5}, "prompt", "str, list[str]"),
        ("/v1/completions", {**COMPLETION, "stop": [1]}, "stop", "str or list[str]"),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": 5}]},
            "messages.0.content",
            "list[ContentPart]",
        ),
        ("/v1/completions", {**COMPLETION, "logit_bias": {"str": "x"}}, "logit_bias.str", None),
    ],
)
def test_wrong_type_of_a_union_field_names_the_field(server, path, body, param, types):
    err = error(post(server, path, body))
    assert err["param"] == param  # not pydantic's "prompt.str"
    if types is not None:
        assert types in err["message"]


# ---- invalid Unicode --------------------------------------------------------------------------
# a JSON "\ud800" escape decodes to a lone surrogate, which UTF-8 (and so no tokenizer) encodes
BAD = "\\ud800"
INVALID_UNICODE = [
    ("/v1/completions", f'{{"model": "{MODEL}", "prompt": "a{BAD}b", "max_tokens": 2}}', "prompt"),
    ("/v1/completions", f'{{"model": "{MODEL}", "prompt": ["ok", "{BAD}"]}}', "prompt.1"),
    ("/v1/completions", f'{{"model": "{MODEL}", "prompt": "a", "stop": ["{BAD}"]}}', "stop.0"),
    ("/v1/completions", f'{{"model": "{MODEL}", "prompt": "a", "stop": "x{BAD}"}}', "stop"),
    ("/v1/completions", f'{{"model": "{MODEL}{BAD}", "prompt": "a"}}', "model"),
    (
        "/v1/chat/completions",
        f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "{BAD}"}}]}}',
        "messages.0.content",
    ),
    (
        "/v1/chat/completions",
        f'{{"messages": [{{"role": "user", "content": [{{"type": "text", "text": "{BAD}"}}]}}]}}',
        "messages.0.content.0.text",
    ),
    (
        "/v1/chat/completions",
        f'{{"messages": [{{"role": "user", "content": "hi"}}], "stop": "{BAD}"}}',
        "stop",
    ),
    ("/v1/completions", f'{{"prompt": "a", "logit_bias": {{"{BAD}": 1}}}}', "logit_bias."),
    ("/v1/completions", f'{{"prompt": "a", "{BAD}": 1}}', None),
    ("/tokenize", f'{{"prompt": "{BAD}"}}', "prompt"),
    ("/tokenize", f'{{"messages": [{{"role": "user", "content": "{BAD}"}}]}}', "messages."),
]


@pytest.mark.parametrize(
    ("path", "body", "param"), INVALID_UNICODE, ids=[b for _, b, _ in INVALID_UNICODE]
)
def test_invalid_unicode_is_400_naming_the_field(server, path, body, param):
    err = error(post(server, path, body))
    assert err["type"] == "invalid_request_error"
    assert "not valid Unicode" in err["message"]
    assert err["param"]
    if param is not None:
        assert err["param"] == param or (param.endswith(".") and err["param"].startswith(param))
    server.assert_all_blocks_free()


# ---- stream_options ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [None, False])
def test_stream_options_need_stream(server, path, stream):
    body = {**(CHAT if "chat" in path else COMPLETION), "stream_options": {"include_usage": True}}
    if stream is not None:
        body["stream"] = stream
    err = error(post(server, path, body))
    assert err["param"] == "stream_options"
    assert "stream" in err["message"]
    resp = post(server, path, {**body, "stream": True})  # with stream, as before
    assert resp.status_code == 200, resp.text
    assert '"usage"' in resp.text


# ---- an assistant turn of tool calls ----------------------------------------------------------
# a template of the kind that concatenates content (a missing one fails it, None would read "None")
CONCATENATING = (
    "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '\\n' }}{% endfor %}"
)


def test_tool_call_turn_with_null_content_renders_as_empty(server, monkeypatch):
    tokenizer = server.app.state.serving.tokenizer
    monkeypatch.setattr(tokenizer, "chat_template", CONCATENATING)
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}

    def turns(content):
        return [
            {"role": "user", "content": "call f"},
            {"role": "assistant", "content": content, "tool_calls": [call]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        ]

    null = post(server, "/tokenize", {"model": MODEL, "messages": turns(None)})
    empty = post(server, "/tokenize", {"model": MODEL, "messages": turns("")})
    assert null.status_code == empty.status_code == 200, (null.text, empty.text)
    assert null.json()["tokens"] == empty.json()["tokens"]
    resp = post(server, "/v1/chat/completions", {**CHAT, "messages": turns(None)})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["prompt_tokens"] == empty.json()["count"]
    server.assert_all_blocks_free()


# ---- GET /v1/models/{id} ----------------------------------------------------------------------
def test_model_by_id(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        listed = c.get("/v1/models").json()["data"][0]
        resp = c.get(f"/v1/models/{MODEL}")
        assert resp.status_code == 200, resp.text
        card = resp.json()
        assert card["id"] == MODEL
        assert card["object"] == "model"
        assert {k: v for k, v in card.items() if k != "created"} == {
            k: v for k, v in listed.items() if k != "created"
        }
        for other in ("gpt-4", f"{MODEL}x", f"{MODEL}/extra"):
            err = error(c.get(f"/v1/models/{other}"), 404)
            assert err["code"] == "model_not_found"
            assert err["type"] == "not_found_error"
    assert server.client().models.retrieve(MODEL).id == MODEL


# ---- streamed completion logprobs -------------------------------------------------------------
@pytest.mark.parametrize("echo", [False, True])
def test_streamed_logprobs_equal_the_whole_response(server, echo):
    body = {
        **COMPLETION,
        "prompt": "the quick brown",
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": 2,
        "ignore_eos": True,
        "echo": echo,
    }
    whole = post(server, "/v1/completions", body)
    assert whole.status_code == 200, whole.text
    want = whole.json()["choices"][0]
    streamed = post(server, "/v1/completions", {**body, "stream": True})
    assert streamed.status_code == 200, streamed.text
    got: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
    got["text_offset"] = []
    text = ""
    for line in streamed.text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data: ") :])
        for choice in event["choices"]:
            text += choice["text"]
            lp = choice["logprobs"]
            assert set(lp) == set(got), lp  # the non-streaming shape, never {}
            for key in got:
                got[key] += lp[key]
    assert text == want["text"]
    assert got["tokens"] == want["logprobs"]["tokens"]
    assert got["text_offset"] == want["logprobs"]["text_offset"]
    assert got["token_logprobs"] == pytest.approx(want["logprobs"]["token_logprobs"], abs=1e-4)
    assert len(got["top_logprobs"]) == len(want["logprobs"]["top_logprobs"])
    for g, w in zip(got["top_logprobs"], want["logprobs"]["top_logprobs"], strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            assert set(g) == set(w)
            assert list(g.values()) == pytest.approx(list(w.values()), abs=1e-4)
    server.assert_all_blocks_free()


# ---- the OpenAPI document ---------------------------------------------------------------------
def test_openapi_says_400_with_the_error_schema(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        doc = c.get("/openapi.json").json()
        schemas = doc["components"]["schemas"]
        assert "ErrorResponse" in schemas
        assert "HTTPValidationError" not in schemas
        assert "ValidationError" not in schemas
        assert "422" not in json.dumps(
            {p: {m: op["responses"] for m, op in ops.items()} for p, ops in doc["paths"].items()}
        )
        with_body = []
        for path, operations in doc["paths"].items():
            for method, op in operations.items():
                if "requestBody" not in op:
                    continue
                with_body.append(path)
                bad = op["responses"]["400"]["content"]["application/json"]["schema"]
                assert bad == {"$ref": "#/components/schemas/ErrorResponse"}
                # and the server really answers an invalid body with it
                resp = c.request(method, path, json={"model": 5, "prompt": [[1.5]]})
                err = error(resp, 400)
                assert err["type"] == "invalid_request_error"
        assert {"/v1/completions", "/v1/chat/completions", "/tokenize"} <= set(with_body)
        assert "/v1/models/{model_id}" in doc["paths"]


def test_openapi_describes_every_answer(server):
    """Each route's 200 names its body (and the event stream where there is one), and every
    error status it can send is listed with ErrorResponse: what schemathesis checks against."""
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        doc = c.get("/openapi.json").json()
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    ok = {
        ("get", "/v1/models"): "ModelList",
        ("get", "/v1/models/{model_id}"): "ModelCard",
        ("post", "/v1/completions"): "Completion",
        ("post", "/v1/chat/completions"): "ChatCompletion",
        ("get", "/tokenizer_info"): "TokenizerInfo",
        ("post", "/tokenize"): "TokenizeResponse",
        ("post", "/v1/detokenize"): "DetokenizeResponse",
    }
    for (method, path), name in ok.items():
        content = doc["paths"][path][method]["responses"]["200"]["content"]
        assert content["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
        assert ("text/event-stream" in content) == ("completions" in path)
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            errors = {s: r for s, r in op["responses"].items() if s != "200"}
            if path == "/health":
                assert errors == {}
                assert "content" not in op["responses"]["200"]  # an empty body
                continue
            want = {"400", "401", "429", "500"}
            want |= {"408", "413"} if "requestBody" in op else set()
            want |= {"503", "504"} if "completions" in path else set()
            want |= {"404"} if path == "/v1/models/{model_id}" else set()
            assert set(errors) == want, (method, path)
            for r in errors.values():
                assert r["content"]["application/json"]["schema"] == error_ref

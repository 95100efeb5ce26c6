"""Error statuses and OpenAI's error shape, API keys, body bounds, tokenizer routes, /health
and /metrics."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import SERVED_MODEL_NAME as MODEL

COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def assert_error(resp: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str)
    assert err["message"]
    if param != "any":
        assert err["param"] == param, err
    return err


CASES = [
    ("/v1/completions", {**COMPLETION, "temperature": -0.5}, "temperature"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, "top_p"),
    ("/v1/completions", {**COMPLETION, "top_p": 1.5}, "top_p"),
    ("/v1/completions", {**COMPLETION, "n": 0}, "n"),
    ("/v1/completions", {**COMPLETION, "n": 1000}, "n"),
    ("/v1/completions", {**COMPLETION, "best_of": 1, "n": 2}, "best_of"),
    ("/v1/completions", {**COMPLETION, "model": "gpt-4"}, "model"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 250, "prompt": "x" * 10}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "prompt": "x" * 400}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [1, 2, 99999]}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [-1]}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": []}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": ""}, "prompt"),
    ("/v1/completions", {**COMPLETION, "logprobs": 50}, "logprobs"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"100000": 1}}, "logit_bias"),
    ("/v1/completions", {**COMPLETION, "stop_token_ids": [100000]}, "stop_token_ids"),
    ("/v1/completions", {**COMPLETION, "seed": 2**70}, "seed"),
    ("/v1/completions", {**COMPLETION, "stop": [""]}, "stop"),
    ("/v1/completions", {**COMPLETION, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {**COMPLETION, "stream": True, "best_of": 3}, "best_of"),
    ("/v1/completions", {"model": MODEL}, "prompt"),
    ("/v1/completions", [1, 2], None),
    ("/v1/chat/completions", {**CHAT, "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 10_000}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "model": "nope"}, "model"),
    ("/v1/chat/completions", {**CHAT, "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/chat/completions", {**CHAT, "top_k": -5}, "top_k"),
    ("/v1/chat/completions", {**CHAT, "min_p": 2}, "min_p"),
    ("/tokenize", {"model": MODEL}, "prompt"),
    ("/detokenize", {"tokens": [100000]}, "tokens"),
]


@pytest.mark.parametrize(
    ("path", "body", "param"), CASES, ids=[f"{p}:{b}"[:60] for p, b, _ in CASES]
)
def test_invalid_fields_are_400(server, path, body, param):
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        err = assert_error(c.post(path, json=body), 400, param)
    assert err["type"] == "invalid_request_error"


def test_malformed_json_is_400(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        headers = {"content-type": "application/json"}
        err = assert_error(c.post("/v1/completions", content=b'{"prompt": ', headers=headers), 400)
        assert "JSON" in err["message"]
        assert_error(c.post("/v1/chat/completions", content=b"nope", headers=headers), 400)
        assert_error(c.post("/v1/completions", content=b"{}"), 400)  # no content type


def test_unknown_route_and_method(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        assert_error(c.get("/v1/nothing"), 404)
        assert_error(c.post("/v2/completions", json=COMPLETION), 404)
        assert_error(c.get("/v1/completions"), 405)


def test_body_limit_is_413(start_server):
    small = start_server(max_body_bytes=1000)
    with httpx.Client(base_url=small.base_url, timeout=30) as c:
        assert_error(c.post("/v1/completions", json={**COMPLETION, "prompt": "x" * 2000}), 413)

        def chunks():  # no content-length: counted as it arrives
            for _ in range(20):
                yield b" " * 100

        assert_error(c.post("/v1/completions", content=chunks()), 413)
        assert c.post("/v1/completions", json=COMPLETION).status_code == 200
    small.assert_all_blocks_free()


def test_prompt_length_bound(start_server):
    bounded = start_server(max_prompt_tokens=8)
    with httpx.Client(base_url=bounded.base_url, timeout=30) as c:
        err = assert_error(
            c.post("/v1/completions", json={**COMPLETION, "prompt": "x" * 9}), 400, "prompt"
        )
        assert "at most 8" in err["message"]
        assert c.post("/v1/completions", json={**COMPLETION, "prompt": "x" * 8}).status_code == 200


def test_api_key(start_server):
    from openai import AuthenticationError

    keyed = start_server(api_key="s3cret")
    with httpx.Client(base_url=keyed.base_url, timeout=30) as c:
        err = assert_error(c.post("/v1/completions", json=COMPLETION), 401)
        assert err["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer nope"}
        assert_error(c.post("/v1/completions", json=COMPLETION, headers=wrong), 401)
        assert_error(c.get("/v1/models", headers={"Authorization": "s3cret"}), 401)
        assert_error(c.post("/tokenize", json={"prompt": "a"}), 401)
        assert c.get("/health").status_code == 200  # probes carry no key
        key = {"Authorization": "Bearer s3cret"}
        for path in ("/metrics", "/openapi.json", "/docs"):  # they describe the server
            assert_error(c.get(path), 401)
            assert c.get(path, headers=key).status_code == 200
    with pytest.raises(AuthenticationError):
        keyed.client(api_key="wrong").models.list()
    assert keyed.client().models.list().data[0].id == MODEL


def test_tokenizer_routes_in_lm_eval_shape(server, tiny_llm):
    tok = tiny_llm.tokenizer
    for prefix in ("", "/v1"):
        with httpx.Client(base_url=server.base_url + prefix, timeout=30) as c:
            info = c.get("/tokenizer_info").json()
            assert info["eos_token"] == tok.eos_token
            assert info["bos_token"] == tok.bos_token
            assert info["chat_template"] == tok.chat_template
            assert info["model_max_length"] == 256
            r = c.post("/tokenize", json={"prompt": "hello world", "add_special_tokens": False})
            body = r.json()
            assert body["tokens"] == tok.encode("hello world", add_special_tokens=False)
            assert body["count"] == len(body["tokens"])
            assert body["max_model_len"] == 256
            eos = c.post("/tokenize", json={"prompt": tok.eos_token, "add_special_tokens": False})
            assert eos.json()["tokens"][0] == tok.eos_token_id
            assert c.post("/detokenize", json={"tokens": body["tokens"]}).json() == {
                "prompt": "hello world"
            }
            msgs = [{"role": "user", "content": "hi"}]
            chat = c.post("/tokenize", json={"messages": msgs, "return_token_strs": True}).json()
            assert chat["tokens"] == tok.apply_chat_template(msgs, tokenize=True)
            assert len(chat["token_strs"]) == chat["count"]


def test_health(server):
    assert httpx.get(server.base_url + "/health", timeout=30).status_code == 200


def test_metrics(server, metric):
    client = server.client()
    client.completions.create(
        model=MODEL,
        prompt="Metrics please",
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    r = httpx.get(server.base_url + "/metrics", timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "lamina:num_requests_running",
        "lamina:num_requests_waiting",
        "lamina:kv_cache_usage_perc",
        "lamina:prefix_cache_queries_total",
        "lamina:prefix_cache_hits_total",
        "lamina:prompt_tokens_total",
        "lamina:generation_tokens_total",
    ):
        metric(text, name, model_name=MODEL)
    assert metric(text, "lamina:generation_tokens_total") >= 5
    assert metric(text, "lamina:prompt_tokens_total") >= 2
    assert metric(text, "lamina:time_to_first_token_seconds_count") >= 1
    assert metric(text, "lamina:inter_token_latency_seconds_count") >= 4
    assert metric(text, "lamina:e2e_request_latency_seconds_count") >= 1
    assert metric(text, "lamina:request_success_total", finished_reason="length") >= 1
    assert 0 <= metric(text, "lamina:kv_cache_usage_perc") <= 1
    # the same prompt again hits the prefix cache
    for _ in range(2):
        client.completions.create(model=MODEL, prompt="z" * 40, max_tokens=2, temperature=0)
    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    assert metric(text, "lamina:prefix_cache_hits_total") >= 32
    server.assert_all_blocks_free()


def test_too_many_requests_in_flight_is_503(start_server):
    busy = start_server(max_pending_requests=2)
    with httpx.Client(base_url=busy.base_url, timeout=30) as c:
        err = assert_error(c.post("/v1/completions", json={**COMPLETION, "prompt": ["a"] * 3}), 503)
        assert "busy" in err["message"]
        assert (
            c.post("/v1/completions", json={**COMPLETION, "prompt": ["a"] * 2}).status_code == 200
        )
    busy.assert_all_blocks_free()


def test_client_cannot_supply_a_chat_template(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        plain = c.post("/tokenize", json={"messages": CHAT["messages"]}).json()
        body = {**CHAT, "temperature": 0, "chat_template_kwargs": {"chat_template": "{{ 'x' }}"}}
        resp = c.post("/v1/chat/completions", json=body).json()
    assert resp["usage"]["prompt_tokens"] == plain["count"]

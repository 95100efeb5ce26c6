"""NaN and Infinity in a JSON body (Python's json reads those literals) are a 400 naming the
field, never a 200 that samples garbage nor a 500."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import SAMPLING_FLOAT_FIELDS
from tests.helpers import SERVED_MODEL_NAME as MODEL

COMPLETION = f'{{"model": "{MODEL}", "prompt": "hi", "max_tokens": 4, '
CHAT = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}], '
FLOATS = SAMPLING_FLOAT_FIELDS
INTS = ["n", "seed", "top_k", "best_of", "logprobs", "max_tokens"]
LITERALS = ["NaN", "Infinity", "-Infinity"]


def post(server, path: str, body: str) -> httpx.Response:
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        return c.post(path, content=body, headers={"content-type": "application/json"})


def assert_400(resp: httpx.Response, param: str) -> None:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param or err["param"].startswith(param + "."), err
    assert param in err["message"]


@pytest.mark.parametrize("literal", LITERALS)
@pytest.mark.parametrize("name", FLOATS + INTS)
def test_completions_non_finite(server, name, literal):
    assert_400(post(server, "/v1/completions", COMPLETION + f'"{name}": {literal}}}'), name)


@pytest.mark.parametrize("literal", LITERALS)
@pytest.mark.parametrize("name", [*FLOATS, "top_logprobs"])
def test_chat_non_finite(server, name, literal):
    assert_400(post(server, "/v1/chat/completions", CHAT + f'"{name}": {literal}}}'), name)


@pytest.mark.parametrize("literal", LITERALS)
def test_logit_bias_non_finite(server, literal):
    body = COMPLETION + f'"logit_bias": {{"5": {literal}}}}}'
    assert_400(post(server, "/v1/completions", body), "logit_bias")


def test_finite_values_still_work(server):
    resp = post(server, "/v1/completions", COMPLETION + '"temperature": 0.5, "seed": 1}')
    assert resp.status_code == 200, resp.text
    server.assert_all_blocks_free()

"""`lamina serve --skip-tokenizer-init`: a model folder without tokenizer files serves token-id
prompts on /v1/completions; everything that needs text (text prompts, chat, stop strings,
/tokenize, /detokenize, /tokenizer_info) is a 400 saying the server runs without a tokenizer."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from lamina import LLM, SamplingParams
from lamina.server import ServerSettings
from tests.helpers import SERVED_MODEL_NAME as MODEL

PROMPT = [5, 40, 77, 12, 99, 31]


@pytest.fixture(scope="module")
def bare_server(tiny_model_factory, tmp_path_factory, live_server_cls):
    src = tiny_model_factory("llama_gqa")[0]
    folder = tmp_path_factory.mktemp("bare_server")
    for f in src.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    assert not (folder / "tokenizer.json").exists()
    llm = LLM(str(folder), dtype="float32", skip_tokenizer_init=True)
    server = live_server_cls(llm.engine, ServerSettings(served_model_name=MODEL)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(tiny_model_factory) -> LLM:
    """The same weights with their tokenizer, offline."""
    return LLM(str(tiny_model_factory("llama_gqa")[0]), dtype="float32")


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json={"model": MODEL, **body}, timeout=60)


def no_tokenizer_400(resp: httpx.Response, param: str | None) -> str:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert "without a tokenizer (--skip-tokenizer-init)" in err["message"], err
    assert "token-id prompts on /v1/completions" in err["message"], err
    assert err["param"] == param, err
    return str(err["message"])


def test_token_id_completion_matches_offline(bare_server, reference):
    want = reference.generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    resp = post(
        bare_server,
        "/v1/completions",
        {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 1},
    )
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["text"] == ""
    assert choice["finish_reason"] == "length"
    # without a tokenizer, tokens are spelled vLLM's way: token_id:N
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in want.token_ids]
    assert resp.json()["usage"]["completion_tokens"] == 8


def test_echo_and_stop_token_ids(bare_server, reference):
    want = reference.generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    stop = want.token_ids[3]
    resp = post(
        bare_server,
        "/v1/completions",
        {
            "prompt": PROMPT,
            "max_tokens": 8,
            "temperature": 0,
            "stop_token_ids": [stop],
            "echo": True,
            "logprobs": 0,
        },
    )
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"], choice["text"]) == ("stop", stop, "")
    cut = want.token_ids.index(stop) + 1
    spelled = [f"token_id:{t}" for t in [*PROMPT, *want.token_ids[:cut]]]
    assert choice["logprobs"]["tokens"] == spelled


def test_streamed_token_id_completion(bare_server):
    with httpx.stream(
        "POST",
        f"{bare_server.base_url}/v1/completions",
        json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "stream": True},
        timeout=60,
    ) as resp:
        assert resp.status_code == 200
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks) == ""


def test_text_prompt_is_400(bare_server):
    msg = no_tokenizer_400(
        post(bare_server, "/v1/completions", {"prompt": "hello", "max_tokens": 4}), "prompt"
    )
    assert "the prompt is text; give token ids" in msg


def test_stop_strings_are_400(bare_server):
    resp = post(bare_server, "/v1/completions", {"prompt": PROMPT, "stop": ["\n"]})
    assert "use stop_token_ids" in no_tokenizer_400(resp, "stop")


def test_chat_is_400(bare_server):
    resp = post(
        bare_server,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert "chat template" in no_tokenizer_400(resp, "messages")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {"prompt": "hi"}, "prompt"),
        ("/v1/tokenize", {"messages": [{"role": "user", "content": "hi"}]}, "messages"),
        ("/detokenize", {"tokens": [5, 6]}, None),
    ],
)
def test_tokenizer_routes_are_400(bare_server, path, body, param):
    no_tokenizer_400(post(bare_server, path, body), param)


def test_tokenizer_info_is_400(bare_server):
    resp = httpx.get(f"{bare_server.base_url}/tokenizer_info", timeout=60)
    no_tokenizer_400(resp, None)


def test_the_server_still_serves_after_refusals(bare_server):
    bare_server.assert_all_blocks_free()
    resp = post(bare_server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert resp.status_code == 200, resp.text
